"""CPU latency of edgeinfer against ONNX Runtime, side by side in one run.

What it measures
----------------
For each model and each thread count T, batch 1, fp32:

  * mobilenet_v2: torchvision MobileNetV2 with ImageNet weights (models/mobilenet_v2.onnx);
  * resnet18, resnet50: torchvision ``resnet18()`` / ``resnet50()``, random init after
    ``torch.manual_seed(0)``, eval;
  * vit_tiny: timm ``vit_tiny_patch16_224`` (pretrained=False), random init after
    ``torch.manual_seed(0)``, eval (timm's default fused attention, which the legacy exporter
    writes as MatMul / Softmax);

measured as:

  * ONNX Runtime: an in-process ``InferenceSession`` (CPUExecutionProvider,
    intra_op_num_threads=T, inter_op_num_threads=1, ORT_ENABLE_ALL), 5 warm-up runs, then
    ``--runs`` timed ``session.run`` calls (time.perf_counter).
  * edgeinfer: ``edgeinfer run --device cpu --repeat N --warmup 5 --input-tensor ...
    --dump-outputs ...`` with RAYON_NUM_THREADS=T (candle's CPU thread pool follows it), plus the
    words of ``--edgeinfer-args`` (e.g. ``--edgeinfer-args="--kernels candle"``). The binary times
    its own runs (after 5 warm-up runs, as ONNX Runtime gets) and prints median / p95 / min; this
    script parses them.

Only inference is timed on both sides: no process start, model load or import.
Per model and thread count the two alternate in ``--rounds`` rounds of ``--runs / --rounds``
runs each (a fresh ORT session and a fresh edgeinfer process per round; ORT first in even
rounds, edgeinfer first in odd ones), so a machine that changes speed mid-cell (shared
hosts flip between states up to 1.8x apart for seconds at a time) hits both alike. A cell's
median and p95 are the medians of the rounds' medians and p95s (each by the same nearest-rank
rule, sorted[round((n-1)*q)], ties rounded up, as edgeinfer does); its ratio is the median of
the rounds' paired ratios edgeinfer/ORT. Each row also gives the largest
|edgeinfer - ORT| over the ``logits`` of the same input: a check that both ran the same model.
When thread counts 1 and T > 1 were both run, a line per model after the table gives each
runtime's T-thread over 1-thread speed-up (ratio of medians).

The table is printed and written, with the onnxruntime / torch versions, the edgeinfer extra
arguments, the CPU, the load average and the exact command line, to ``--out``. The exit status
is non-zero only on errors (missing binary, failed import or run, unparsable output), never
because of the numbers.

Python packages: benches/peers/setup.sh creates a venv (default target/bench-venv) with the
pinned versions of benches/peers/requirements.txt; /work/venv has them too.

Run (from the repository root, after ``cargo build --release``)::

    /work/venv/bin/python benches/compare_ort.py     # all four models, 1 and 2 threads, 30 runs
    /work/venv/bin/python benches/compare_ort.py --models resnet18 --threads 1 --runs 50
    /work/venv/bin/python benches/compare_ort.py --edgeinfer-args="--no-optimize"
    /work/venv/bin/python benches/compare_ort.py --ort-only      # ONNX Runtime's half alone

Inputs it creates under ``--work-dir`` (default target/bench/, not committed): resnet18.onnx,
resnet50.onnx and vit_tiny.onnx (exported here: opset 17, legacy TorchScript exporter, static
input [1,3,224,224] ``input``, output ``logits``), MODEL.safetensors (``edgeinfer import``),
MODEL.input.safetensors (seeded standard-normal input, key ``input``) and
MODEL.edgeinfer_tT.safetensors (edgeinfer's outputs). models/mobilenet_v2.onnx is regenerated
with models/make_fixtures.py when missing.
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
from statistics import median

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = ("mobilenet_v2", "resnet18", "resnet50", "vit_tiny")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 3, 224, 224)
INPUT_SEEDS = {"mobilenet_v2": 1000, "resnet18": 1001, "resnet50": 1002, "vit_tiny": 1003}
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
    # Median over rounds of the round's edgeinfer median / ORT median.
    ratio: float | None = None
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


def export_legacy(model, path: Path) -> Path:
    """Export an eval-mode torch module with the legacy (TorchScript) exporter: opset 17, static
    input INPUT_SHAPE named INPUT_NAME, output OUTPUT_NAME."""
    import warnings

    import torch

    example = torch.zeros(INPUT_SHAPE)
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice; timm's shape asserts traced as constants
        warnings.simplefilter("ignore")
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
    if not path.is_file():
        raise BenchError(f"torch.onnx.export did not write {path}")
    return path


def torchvision_onnx(arch: str, work_dir: Path) -> Path:
    """Export torchvision's ARCH (seeded random init, no download) to work_dir/ARCH.onnx."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=1000).eval()
    return export_legacy(model, work_dir / f"{arch}.onnx")


def vit_tiny_onnx(work_dir: Path) -> Path:
    """Export timm's vit_tiny_patch16_224 (seeded random init, no download) to work_dir."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    return export_legacy(model, work_dir / "vit_tiny.onnx")


MODEL_SOURCES = {
    "mobilenet_v2": mobilenet_v2_onnx,
    "resnet18": lambda work_dir: torchvision_onnx("resnet18", work_dir),
    "resnet50": lambda work_dir: torchvision_onnx("resnet50", work_dir),
    "vit_tiny": vit_tiny_onnx,
}


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
                   runs: int, extra_args: list[str]) -> tuple[float, float, np.ndarray]:
    from safetensors.numpy import load_file

    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    if dump.exists():
        dump.unlink()
    cmd = [str(binary), "run", "--model", str(model), "--input-tensor", str(inp),
           "--device", "cpu", "--repeat", str(runs), "--warmup", str(ORT_WARMUP),
           "--dump-outputs", str(dump), *extra_args]
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
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.model} | {r.threads} | {fmt(r.ort_median)} | {fmt(r.ort_p95)} | "
            f"{fmt(r.ei_median)} | {fmt(r.ei_p95)} | {ratio} | "
            f"{fmt(r.max_abs_diff, '.2e')} |"
        )
    return "\n".join(lines)


def speedups(rows: list[Row]) -> list[str]:
    """Per model and thread count T > 1: median(1 thread) / median(T threads) of each runtime,
    when both were run."""
    lines = []
    models = list(dict.fromkeys(r.model for r in rows))
    for name in models:
        by_t = {r.threads: r for r in rows if r.model == name}
        one = by_t.get(1)
        if one is None:
            continue
        for t in sorted(by_t):
            if t == 1:
                continue
            r = by_t[t]
            ort = f"ORT {one.ort_median / r.ort_median:.2f}x"
            ei = ("edgeinfer -" if r.ei_median is None or one.ei_median is None
                  else f"edgeinfer {one.ei_median / r.ei_median:.2f}x")
            lines.append(f"{name}: {t}-thread / 1-thread speed-up (ratio of medians): {ort}, {ei}")
    return lines


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
    ups = speedups(rows)
    text = "\n".join([
        "# edgeinfer vs ONNX Runtime, CPU, batch 1, fp32",
        "",
        table(rows),
        "",
        *([*(f"- {line}" for line in ups), ""] if ups else []),
        f"- runs: {args.runs // args.rounds * args.rounds} timed per cell and runtime, in "
        f"{args.rounds} alternating rounds of {args.runs // args.rounds}, each round after "
        f"{ORT_WARMUP} warm-up runs (edgeinfer: --warmup {ORT_WARMUP}); a cell is the median of "
        "its rounds' medians (p95s), its ratio the median of the rounds' paired ratios",
        f"- ORT: onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, intra_op_num_threads=threads, "
        "inter_op_num_threads=1, ORT_ENABLE_ALL",
        (f"- edgeinfer: {edgeinfer_version(binary)} ({binary}), --device cpu, RAYON_NUM_THREADS=threads; "
         f"extra run arguments (--edgeinfer-args): "
         f"{'`' + shlex.join(args.edgeinfer_args) + '`' if args.edgeinfer_args else 'none'}"
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
                    help="comma-separated, from: " + ",".join(MODELS) + " (default: all four)")
    ap.add_argument("--threads", type=lambda s: parse_list(s, cast=int), default=[1, 2],
                    help="comma-separated thread counts (default: 1,2)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per cell (default: 30)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating ORT / edgeinfer rounds per cell, --runs split evenly "
                         "among them (default: 5)")
    ap.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "edgeinfer",
                    help="the edgeinfer binary (default: target/release/edgeinfer)")
    ap.add_argument("--work-dir", type=Path, default=REPO / "target" / "bench",
                    help="exported models, inputs and outputs (default: target/bench/)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown report (default: WORK_DIR/compare_ort.md)")
    ap.add_argument("--edgeinfer-args", type=shlex.split, default=[], metavar='"ARGS"',
                    help="extra words appended to every `edgeinfer run` command line, split like a "
                         "shell would (e.g. --edgeinfer-args=\"--kernels candle\"; use the = form "
                         "when the value is a single word starting with -)")
    ap.add_argument("--ort-only", action="store_true",
                    help="measure ONNX Runtime alone (no edgeinfer binary needed)")
    args = ap.parse_args()
    if args.rounds < 1 or args.runs // max(args.rounds, 1) < 2:
        ap.error("--runs / --rounds must be at least 2 (edgeinfer prints latencies only with "
                 "--repeat > 1)")
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
            per = args.runs // args.rounds
            ort_meds, ort_p95s, ei_meds, ei_p95s = [], [], [], []
            y_ort = y_ei = None
            dump = work / f"{name}.edgeinfer_t{t}.safetensors"
            for r in range(args.rounds):
                sides = ["ort", "edgeinfer"] if binary is not None else ["ort"]
                for side in sides if r % 2 == 0 else sides[::-1]:
                    if side == "ort":
                        med, p95, y_ort = time_ort(onnx_path, x, t, per)
                        ort_meds.append(med)
                        ort_p95s.append(p95)
                    else:
                        med, p95, y_ei = time_edgeinfer(binary, model_path, inp_path, dump, t, per,
                                                        args.edgeinfer_args)
                        ei_meds.append(med)
                        ei_p95s.append(p95)
            row = Row(name, t, median(ort_meds), median(ort_p95s))
            if binary is not None:
                row.ei_median, row.ei_p95 = median(ei_meds), median(ei_p95s)
                row.ratio = median([e / o for e, o in zip(ei_meds, ort_meds)])
                if y_ei.shape != y_ort.shape:
                    raise BenchError(f"{name}: edgeinfer logits {y_ei.shape} vs ORT {y_ort.shape}")
                row.max_abs_diff = float(np.max(np.abs(y_ei.astype(np.float64) - y_ort)))
            rows.append(row)
            print(f"{name} threads={t}: ORT {row.ort_median:.2f}/{row.ort_p95:.2f} ms, edgeinfer "
                  f"{fmt(row.ei_median)}/{fmt(row.ei_p95)} ms (median/p95)", file=sys.stderr, flush=True)

    print(table(rows))
    ups = speedups(rows)
    if ups:
        print()
        print("\n".join(ups))
    write_report(out_path, rows, args, binary, load_before)
    print(f"\nwritten to {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
