"""CPU latency of edgeinfer against ONNX Runtime, side by side in one run.

What it measures
----------------
For each model (MobileNetV2 with ImageNet weights, a randomly initialised ResNet-18) and each
thread count T, batch 1, fp32:

  * ONNX Runtime: an in-process ``InferenceSession`` (CPUExecutionProvider,
    intra_op_num_threads=T, inter_op_num_threads=1, ORT_ENABLE_ALL), 5 warm-up runs, then
    ``--runs`` timed ``session.run`` calls (time.perf_counter).
  * edgeinfer: ``edgeinfer run --device cpu --repeat N --input-tensor ... --dump-outputs ...``
    with RAYON_NUM_THREADS=T (candle's CPU thread pool follows it). The binary times its own
    runs (after one warm-up of its own) and prints median / p95 / min; this script parses them.

Only inference is timed on both sides: no process start, model load or import.
Per model and thread count the two are measured back to back (ORT, then edgeinfer), so machine
noise hits both alike. Both sides report the median and the p95 with the same nearest-rank rule
(sorted[round((n-1)*q)], ties rounded up, as edgeinfer does). Each row also gives the largest
|edgeinfer - ORT| over the ``logits`` of the same input: a check that both ran the same model.

The table is printed and written, with the onnxruntime / torch versions, the CPU, the load
average and the exact command line, to ``--out``. The exit status is non-zero only on errors
(missing binary, failed import or run, unparsable output), never because of the numbers.

Run (from the repository root, after ``cargo build --release``)::

    /work/venv/bin/python benches/compare_ort.py
    /work/venv/bin/python benches/compare_ort.py --models resnet18 --threads 1 --runs 50
    /work/venv/bin/python benches/compare_ort.py --ort-only      # ONNX Runtime's half alone

Inputs it creates under ``--work-dir`` (default target/bench/, not committed): resnet18.onnx
(exported here: torchvision ``resnet18()`` after ``torch.manual_seed(0)``, eval, opset 17,
legacy exporter), MODEL.safetensors (``edgeinfer import``), MODEL.input.safetensors (seeded
standard-normal input, key ``input``) and MODEL.edgeinfer_tT.safetensors (edgeinfer's outputs).
models/mobilenet_v2.onnx is regenerated with models/make_fixtures.py when missing.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = ("mobilenet_v2", "resnet18")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 3, 224, 224)
INPUT_SEEDS = {"mobilenet_v2": 1000, "resnet18": 1001}
ORT_WARMUP = 5
LATENCY_RE = re.compile(
    r"latency over (\d+) runs on (\S+): median ([0-9.]+) ms, p95 ([0-9.]+) ms, min ([0-9.]+) ms"
)


class BenchError(Exception):
    """Anything that makes the comparison impossible (not: a slow result)."""


@dataclass
class Row:
    model: str
    threads: int
    ort_median: float
    ort_p95: float
    ei_median: float | None = None
    ei_p95: float | None = None
    max_abs_diff: float | None = None


# ---------------------------------------------------------------------------------------------
# models and inputs


def mobilenet_v2_onnx(work_dir: Path) -> Path:
    path = REPO / "models" / "mobilenet_v2.onnx"
    if not path.is_file():
        print(f"{path} missing: regenerating with models/make_fixtures.py mobilenet_v2", flush=True)
        run_checked([sys.executable, str(REPO / "models" / "make_fixtures.py"), "mobilenet_v2"])
        if not path.is_file():
            raise BenchError(f"models/make_fixtures.py did not produce {path}")
    return path


def resnet18_onnx(work_dir: Path) -> Path:
    """Export torchvision's resnet18 (seeded random init, no download) to work_dir."""
    import torch
    import torchvision

    path = work_dir / "resnet18.onnx"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    example = torch.zeros(INPUT_SHAPE)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            export_params=True,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            training=torch.onnx.TrainingMode.EVAL,
        )
    return path


MODEL_SOURCES = {"mobilenet_v2": mobilenet_v2_onnx, "resnet18": resnet18_onnx}


def write_input(name: str, work_dir: Path) -> tuple[Path, np.ndarray]:
    from safetensors.numpy import save_file

    x = np.random.default_rng(INPUT_SEEDS[name]).standard_normal(INPUT_SHAPE, dtype=np.float32)
    path = work_dir / f"{name}.input.safetensors"
    save_file({INPUT_NAME: x}, str(path))
    return path, x


# ---------------------------------------------------------------------------------------------
# timing


def nearest_rank(sorted_ms: list[float], q: float) -> float:
    """sorted[round((n-1)*q)] with halves rounded up - the rule edgeinfer's --repeat uses."""
    return sorted_ms[int(math.floor((len(sorted_ms) - 1) * q + 0.5))]


def time_ort(onnx_path: Path, x: np.ndarray, threads: int, runs: int) -> tuple[float, float, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {INPUT_NAME: x}
    for _ in range(ORT_WARMUP):
        sess.run([OUTPUT_NAME], feeds)
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], feeds)
        ms.append((time.perf_counter() - t0) * 1e3)
    (y,) = sess.run([OUTPUT_NAME], feeds)
    del sess  # stop ORT's (spinning) worker threads before edgeinfer runs
    ms.sort()
    return nearest_rank(ms, 0.5), nearest_rank(ms, 0.95), y


def run_checked(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(
            f"command failed ({proc.returncode}): {shlex.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def edgeinfer_import(binary: Path, onnx_path: Path, out: Path) -> None:
    run_checked([str(binary), "import", str(onnx_path), "-o", str(out)])


def time_edgeinfer(binary: Path, model: Path, inp: Path, dump: Path, threads: int,
                   runs: int) -> tuple[float, float, np.ndarray]:
    from safetensors.numpy import load_file

    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    if dump.exists():
        dump.unlink()
    cmd = [str(binary), "run", "--model", str(model), "--input-tensor", str(inp),
           "--device", "cpu", "--repeat", str(runs), "--dump-outputs", str(dump)]
    stdout = run_checked(cmd, env=env)
    m = LATENCY_RE.search(stdout)
    if not m:
        raise BenchError(f"no latency line in the output of {shlex.join(cmd)}:\n{stdout[-2000:]}")
    if int(m.group(1)) != runs or m.group(2) != "cpu":
        raise BenchError(f"unexpected latency line (wanted {runs} runs on cpu): {m.group(0)}")
    outs = load_file(str(dump))
    if OUTPUT_NAME not in outs:
        raise BenchError(f"{dump} has no '{OUTPUT_NAME}' (it holds: {', '.join(outs)})")
    return float(m.group(3)), float(m.group(4)), outs[OUTPUT_NAME]


# ---------------------------------------------------------------------------------------------
# report


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    lines = [
        "| model | threads | ORT median ms | ORT p95 ms | edgeinfer median ms | edgeinfer p95 ms "
        "| edgeinfer/ORT | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "-" if r.ei_median is None else f"{r.ei_median / r.ort_median:.2f}x"
        lines.append(
            f"| {r.model} | {r.threads} | {fmt(r.ort_median)} | {fmt(r.ort_p95)} | "
            f"{fmt(r.ei_median)} | {fmt(r.ei_p95)} | {ratio} | "
            f"{fmt(r.max_abs_diff, '.2e')} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
    except OSError:
        return platform.processor() or "unknown"
    name = info.get("model name", "unknown")
    extra = [f"{k} {info[k]}" for k in ("cpu family", "model") if k in info]
    flags = set(info.get("flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(extra)}; {' '.join(simd) or 'no avx2'}), {os.cpu_count()} logical CPUs"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def edgeinfer_version(binary: Path | None) -> str:
    if binary is None:
        return "not run (--ort-only)"
    try:
        return run_checked([str(binary), "--version"]).strip()
    except (BenchError, OSError):
        return "unknown"


def write_report(path: Path, rows: list[Row], args, binary: Path | None, load_before: str) -> None:
    import onnxruntime
    import torch

    command = shlex.join([sys.executable, *sys.argv])
    text = "\n".join([
        "# edgeinfer vs ONNX Runtime, CPU, batch 1, fp32",
        "",
        table(rows),
        "",
        f"- runs: {args.runs} timed per cell (ORT: {ORT_WARMUP} warm-up runs first; edgeinfer: its own "
        "--repeat warm-up of 1); median and p95 by nearest rank",
        f"- ORT: onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, intra_op_num_threads=threads, "
        "inter_op_num_threads=1, ORT_ENABLE_ALL",
        (f"- edgeinfer: {edgeinfer_version(binary)} ({binary}), --device cpu, RAYON_NUM_THREADS=threads"
         if binary else "- edgeinfer: not run (--ort-only)"),
        f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}",
        f"- CPU: {cpu_model()}",
        f"- load average (1/5/15 min) before: {load_before}, after: {loadavg()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- command: `{command}` (cwd {os.getcwd()})",
        "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


def parse_list(text: str, allowed=None, cast=str) -> list:
    items = [cast(s.strip()) for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: parse_list(s, MODELS), default=list(MODELS),
                    help="comma-separated, from: " + ",".join(MODELS) + " (default: both)")
    ap.add_argument("--threads", type=lambda s: parse_list(s, cast=int), default=[1, 2],
                    help="comma-separated thread counts (default: 1,2)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per cell (default: 30)")
    ap.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "edgeinfer",
                    help="the edgeinfer binary (default: target/release/edgeinfer)")
    ap.add_argument("--work-dir", type=Path, default=REPO / "target" / "bench",
                    help="exported models, inputs and outputs (default: target/bench/)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown report (default: WORK_DIR/compare_ort.md)")
    ap.add_argument("--ort-only", action="store_true",
                    help="measure ONNX Runtime alone (no edgeinfer binary needed)")
    args = ap.parse_args()
    if args.runs < 2:
        ap.error("--runs must be at least 2 (edgeinfer prints latencies only with --repeat > 1)")
    if any(t < 1 for t in args.threads):
        ap.error("--threads must be positive")
    out_path = args.out or args.work_dir / "compare_ort.md"

    binary = None if args.ort_only else args.binary.resolve()
    if binary is not None and not os.access(binary, os.X_OK):
        raise BenchError(f"{binary} is not an executable (cargo build --release, or --ort-only)")
    if max(args.threads) > (os.cpu_count() or 1):
        print(f"warning: {max(args.threads)} threads on {os.cpu_count()} logical CPUs", file=sys.stderr)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = args.work_dir.resolve()
    load_before = loadavg()
    rows = []
    for name in args.models:
        onnx_path = MODEL_SOURCES[name](work)
        inp_path, x = write_input(name, work)
        model_path = work / f"{name}.safetensors"
        if binary is not None:
            edgeinfer_import(binary, onnx_path, model_path)
        for t in args.threads:
            ort_med, ort_p95, y_ort = time_ort(onnx_path, x, t, args.runs)
            row = Row(name, t, ort_med, ort_p95)
            if binary is not None:
                dump = work / f"{name}.edgeinfer_t{t}.safetensors"
                row.ei_median, row.ei_p95, y_ei = time_edgeinfer(binary, model_path, inp_path, dump, t,
                                                                 args.runs)
                if y_ei.shape != y_ort.shape:
                    raise BenchError(f"{name}: edgeinfer logits {y_ei.shape} vs ORT {y_ort.shape}")
                row.max_abs_diff = float(np.max(np.abs(y_ei.astype(np.float64) - y_ort)))
            rows.append(row)
            print(f"{name} threads={t}: ORT {ort_med:.2f}/{ort_p95:.2f} ms, edgeinfer "
                  f"{fmt(row.ei_median)}/{fmt(row.ei_p95)} ms (median/p95)", file=sys.stderr, flush=True)

    print(table(rows))
    write_report(out_path, rows, args, binary, load_before)
    print(f"\nwritten to {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
