#!/usr/bin/env python3
"""edgeinfer's CUDA path against PyTorch eager on the same GPU, in one run.

For torchvision's MobileNetV2, ResNet-18 and ResNet-50 (seeded random init, no download; the
weights do not change the timing), exported with the legacy ONNX exporter (opset 17) and
imported with `edgeinfer import`, it times batch-1 224x224 inference the same way on both
sides: a host tensor in, the logits back on the host (upload and download included), median
and p95 over RUNS after a warm-up, f32 and f16. It checks edgeinfer's f32 logits against
PyTorch's (max abs difference) so the timed work is the right work.

    python3 benches/compare_cuda.py --binary path/to/edgeinfer [--runs 200] [--out report.md]

Needs a CUDA GPU, the CUDA build of edgeinfer (cross/build-cuda.sh), and torch, torchvision,
numpy and safetensors. Not part of CI (no GPU there).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

LATENCY_RE = re.compile(
    r"latency over (\d+) runs on (\S+): median ([0-9.]+) ms, p95 ([0-9.]+) ms"
)
MODELS = ["mobilenet_v2", "resnet18", "resnet50"]


def export(arch: str, work: Path):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=1000).eval()
    path = work / f"{arch}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])
    return model, path


def time_torch(model, x, dtype, runs: int) -> tuple[float, float, "object"]:
    import torch

    m = model.to("cuda", dtype)
    ms = []
    with torch.no_grad():
        for i in range(runs + 10):
            t0 = time.perf_counter()
            out = m(x.to("cuda", dtype)).float().cpu()
            if i >= 10:
                ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return statistics.median(ms), ms[round((len(ms) - 1) * 0.95)], out.numpy()


def time_edgeinfer(binary: str, model: Path, inp: Path, dtype: str, runs: int, dump: Path):
    from safetensors.numpy import load_file

    cmd = [binary, "run", "--model", str(model), "--input-tensor", str(inp), "--device",
           "cuda:0", "--compute-dtype", dtype, "--repeat", str(runs), "--explain", "off",
           "--dump-outputs", str(dump)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    m = LATENCY_RE.search(out.stdout)
    if not m or m.group(2) != "cuda:0":
        raise SystemExit(f"no CUDA latency line from {' '.join(cmd)}:\n{out.stdout[-2000:]}")
    return float(m.group(3)), float(m.group(4)), load_file(str(dump))["logits"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True, help="the CUDA build of edgeinfer")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, help="also write the table here")
    a = ap.parse_args()

    import numpy as np
    import torch
    from safetensors.numpy import save_file

    # f32 means f32 on both sides: no TF32 in PyTorch's convolutions and products.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name(0)
    rows = [f"# edgeinfer CUDA vs PyTorch {torch.__version__} eager on {gpu}", "",
            f"batch 1, 224x224, host tensor in and logits out, median (p95) of {a.runs} runs, ms",
            "", "| model | dtype | edgeinfer | PyTorch eager | PyTorch / edgeinfer | f32 logits max abs diff |",
            "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in MODELS:
            model, onnx = export(arch, work)
            st = work / f"{arch}.safetensors"
            subprocess.run([a.binary, "import", str(onnx), "-o", str(st)], check=True,
                           capture_output=True)
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
            inp = work / f"{arch}.input.safetensors"
            save_file({"input": x}, str(inp))
            xt = torch.from_numpy(x)
            for dtype, tdtype in [("f32", torch.float32), ("f16", torch.float16)]:
                e50, e95, elog = time_edgeinfer(a.binary, st, inp, dtype, a.runs,
                                                work / "dump.safetensors")
                t50, t95, tlog = time_torch(model, xt, tdtype, a.runs)
                diff = "" if dtype != "f32" else f"{np.abs(elog.astype(np.float32) - tlog).max():.2e}"
                rows.append(f"| {arch} | {dtype} | {e50:.2f} ({e95:.2f}) | {t50:.2f} ({t95:.2f}) "
                            f"| {t50 / e50:.2f}x | {diff} |")
                print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
