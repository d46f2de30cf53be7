"""Train a small ResNet on Fashion-MNIST, export it to ONNX and (optionally) import it into edgeinfer.

    train_fashion_resnet.py [--edgeinfer PATH] [--epochs E] [--widths 32,64,128] [--threads 2] ...

The recipe (all seeded; about 5 min on 2 cores):
  1. the Debian package dataset-fashion-mnist's idx files, read with numpy (export_images.load_split):
     60000 training and 10000 test images, 28x28 grey; input (x/255 - 0.2860)/0.3530, [1,1,28,28].
  2. a ResNet-style net: stem conv 3x3 -> BN -> ReLU, three stages of basic blocks (conv-BN-ReLU-conv-BN,
     residual Add, ReLU; the first block of stages 2 and 3 has stride 2 and a 1x1 conv+BN shortcut),
     GlobalAveragePool -> Flatten -> Linear(10). Feature maps 28 -> 14 -> 7.
  3. AdamW with a one-cycle learning rate, cross-entropy, random horizontal flips, the last epoch kept
     (the test set is never used to choose anything).
  4. weights rounded to f16-exact, ONNX export as models/fixture_utils.py does (dynamo=False, opset 17,
     eval mode so every BatchNorm folds into its Conv, static shapes, `input` -> `logits`), folded
     initializers rounded to f16 again; test accuracy in PyTorch and onnxruntime.
  5. with --edgeinfer, `edgeinfer import` writes models/fashion_resnet.safetensors (f16 weights, gray,
     mean 0.2860, std 0.3530, no resize), then `inspect` is printed.

Outputs: models/fashion/fashion_resnet.{onnx,pt} (not committed), models/fashion/labels.txt,
models/fashion/info.json, models/fashion_resnet.safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from export_images import CLASSES, load_split  # noqa: E402

MEAN = 0.2860
STD = 0.3530
SEED = 0


# ----------------------------------------------------------------------------- model

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class FashionResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), blocks=(1, 1, 1), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def conv_macs(model: nn.Module, size: int = 28) -> int:
    """Multiply-accumulates of one 1x1x28x28 forward pass (convs and the linear layer)."""
    macs = 0
    hooks = []

    def hook(m, inp, out):
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    for h in hooks:
        h.remove()
    return macs


# ----------------------------------------------------------------------------- data / eval

def to_input(x_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> f32 [N,1,28,28], (x/255 - MEAN)/STD."""
    x = torch.from_numpy(x_u8.astype(np.float32) / 255.0)
    return ((x - MEAN) / STD).unsqueeze(1)


@torch.no_grad()
def predict(fn, X: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(X[i:i + batch])).argmax(1) for i in range(0, len(X), batch)])


def accuracy_report(pred: np.ndarray, y: np.ndarray) -> dict:
    return {"accuracy": round(float((pred == y).mean()), 5), "correct": int((pred == y).sum()), "count": int(len(y)),
            "per_class": {c: round(float((pred[y == k] == k).mean()), 4) for k, c in enumerate(CLASSES)}}


# ----------------------------------------------------------------------------- training

def train(a, Xtr: torch.Tensor, ytr: torch.Tensor) -> FashionResNet:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model = FashionResNet(a.widths, a.blocks).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    steps = len(ytr) // a.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * steps, pct_start=0.2)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for ep in range(a.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        tl, tc = 0.0, 0
        for s in range(steps):
            idx = perm[s * a.batch:(s + 1) * a.batch]
            x = Xtr[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x).contiguous(memory_format=torch.channels_last)
            yb = ytr[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tl += float(loss.detach()) * len(idx)
            tc += int((logits.argmax(1) == yb).sum())
        n = steps * a.batch
        print(f"epoch {ep + 1}/{a.epochs}: loss {tl / n:.4f} train acc {tc / n:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    model.eval()
    return model.to(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- export

def export(model: FashionResNet, onnx_path: Path) -> dict:
    import onnx
    import fixture_utils as fu
    example = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 28, 28), np.float32))
    fu.export_onnx_legacy(model, example, onnx_path)
    raw = fu.run_ort(onnx_path, {"input": example.numpy()})["logits"]
    stats = fu.finalize_onnx(onnx_path, round_f16=True)
    m = onnx.load(str(onnx_path))
    for k, v in (("edgeinfer_mean", json.dumps([MEAN])), ("edgeinfer_std", json.dumps([STD])),
                 ("edgeinfer_labels", json.dumps(list(CLASSES)))):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(onnx_path))
    ref = fu.run_ort(onnx_path, {"input": example.numpy()})["logits"]
    with torch.no_grad():
        tl = model(example).numpy()
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    gap = [n for n in m.graph.node if n.op_type == "GlobalAveragePool"][0]
    gemm = [n for n in m.graph.node if n.op_type == "Gemm"][0]
    return {
        "f16_rounding": stats,
        "max_abs_diff_torch_vs_ort": float(np.max(np.abs(tl - ref))),
        "max_abs_diff_torch_vs_ort_before_f16_rounding_of_folded_weights": float(np.max(np.abs(tl - raw))),
        "ops": dict(sorted(ops.items())),
        "feature_map_value": gap.input[0],
        "gemm_weight": gemm.input[1],
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }


def _rel(p: Path) -> str:
    """p relative to the repository root when it lies inside it (the import runs there)."""
    p = p.resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=(32, 64, 128))
    ap.add_argument("--blocks", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 1, 1))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edgeinfer", type=Path, default=None, help="edgeinfer binary: also run `import` and `inspect`")
    ap.add_argument("--onnx", type=Path, default=HERE / "fashion_resnet.onnx")
    ap.add_argument("--safetensors", type=Path, default=REPO / "models" / "fashion_resnet.safetensors")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    t0 = time.time()
    xtr, ytr = load_split("train")
    xte, yte = load_split("test")
    Xtr, Ytr = to_input(xtr), torch.from_numpy(ytr.astype(np.int64))
    Xte, yte = to_input(xte), yte.astype(np.int64)
    print(f"data: train {len(Ytr)} test {len(yte)} ({time.time() - t0:.1f} s); "
          f"train pixel mean {xtr.mean() / 255:.4f} std {(xtr / 255).std():.4f}", flush=True)

    t1 = time.time()
    model = train(a, Xtr, Ytr)
    train_s = time.time() - t1
    params = int(sum(p.numel() for p in model.parameters()))
    macs = conv_macs(model)
    print(f"model: {params} params, {macs / 1e6:.1f} M MACs; trained in {train_s:.0f} s", flush=True)

    import fixture_utils as fu
    torch_f32 = accuracy_report(predict(model, Xte), yte)
    fu.round_module_to_f16(model)
    model.eval()
    torch_f16 = accuracy_report(predict(model, Xte), yte)
    torch.save({"arch": {"widths": list(a.widths), "blocks": list(a.blocks), "classes": len(CLASSES)},
                "state_dict": model.state_dict(), "mean": MEAN, "std": STD, "classes": list(CLASSES)},
               str(a.onnx.with_suffix(".pt")))
    info_export = export(model, a.onnx)
    sess = fu.ort_session(a.onnx)
    ort_pred = predict(lambda x: np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0]
                                                 for i in range(len(x))]), Xte)
    ort_acc = accuracy_report(ort_pred, yte)
    torch_pred = predict(model, Xte)
    print(f"test accuracy (10000): torch f32 {torch_f32['accuracy']:.4f}, torch f16-rounded "
          f"{torch_f16['accuracy']:.4f}, onnxruntime {ort_acc['accuracy']:.4f}; "
          f"first 2000: torch {float((torch_pred[:2000] == yte[:2000]).mean()):.4f} "
          f"onnxruntime {float((ort_pred[:2000] == yte[:2000]).mean()):.4f}; "
          f"top-1 torch != ort on {int((torch_pred != ort_pred).sum())} images", flush=True)
    print(json.dumps(info_export, indent=1))

    labels = HERE / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    import_cmd = ["import", _rel(a.onnx), "-o", _rel(a.safetensors), "--labels", _rel(labels),
                  "--weights-dtype", "f16", "--color", "gray",
                  "--mean", f"{MEAN:.4f}", "--std", f"{STD:.4f}", "--resize-shorter", "0", "--name", "fashion_resnet"]
    if a.edgeinfer:
        subprocess.run([str(a.edgeinfer.resolve())] + import_cmd, check=True, cwd=REPO)
        subprocess.run([str(a.edgeinfer.resolve()), "inspect", str(a.safetensors)], check=True)

    info = {
        "what": "Fashion-MNIST classifier models/fashion_resnet.safetensors",
        "data": {"source": "Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist/*-ubyte.gz",
                 "upstream": "https://github.com/zalandoresearch/fashion-mnist", "licence": "MIT (Zalando SE, 2017)",
                 "train": len(Ytr), "test": len(yte), "classes": list(CLASSES)},
        "training": {
            "command": "python models/fashion/train_fashion_resnet.py --edgeinfer target/release/edgeinfer",
            "seed": SEED, "epochs": a.epochs, "batch": a.batch,
            "optimizer": f"AdamW lr {a.lr} (one-cycle, 20 % warm-up) weight decay {a.weight_decay}",
            "loss": "cross-entropy", "augmentation": "random horizontal flips",
            "threads": a.threads, "train_seconds": round(train_s, 1),
            "selection": "last epoch (the test set is not used to choose anything)",
        },
        "model": {
            "widths": list(a.widths), "blocks_per_stage": list(a.blocks),
            "params": params, "macs": macs,
            "head": "GlobalAveragePool -> Flatten -> Gemm",
            "onnx_feature_map_value": info_export["feature_map_value"],
            "onnx_gemm_weight": info_export["gemm_weight"],
            "onnx_ops": info_export["ops"],
            "onnx_sha256": info_export["sha256"],
            "max_abs_diff_torch_vs_ort": info_export["max_abs_diff_torch_vs_ort"],
        },
        "preprocessing": {"scale": "pixel / 255", "mean": MEAN, "std": STD, "resize": "none (28x28 as is)",
                          "color": "gray", "layout": "NCHW"},
        "test_torch_f32": torch_f32,
        "test_torch_f16_weights": torch_f16,
        "test_onnxruntime": ort_acc,
        "first_2000_test": {"torch": int((torch_pred[:2000] == yte[:2000]).sum()),
                            "onnxruntime": int((ort_pred[:2000] == yte[:2000]).sum()),
                            "export": "python models/fashion/export_images.py --out /tmp/fm-test --split test "
                                      "--count 2000"},
        "import_command": "edgeinfer " + " ".join(import_cmd),
    }
    fu.write_json(HERE / "info.json", info)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
