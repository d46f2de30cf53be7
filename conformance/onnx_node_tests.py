#!/usr/bin/env python3
"""Run the ONNX backend *node* conformance tests against the edgeinfer binary.

The test cases are the ones shipped inside the pinned `onnx` wheel
(onnx/backend/test/data/node/<case>/model.onnx + test_data_set_*/{input,output}_N.pb),
enumerated with `onnx.backend.test.loader.load_model_tests(kind="node")`.

A case is selected when every node of its graph (sub-graphs and model-local
functions included) is a default-domain op that edgeinfer supports.  Each
selected case is materialised in a temporary directory and run through

    edgeinfer import model.onnx -o model.safetensors
    edgeinfer run --model model.safetensors --input-tensor inputs.safetensors \
                  --dump-outputs outputs.safetensors

and the dumped outputs are compared with the expected ones.  See README.md.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.test.loader import load_model_tests

# Used when `edgeinfer ops` is not available (or prints nothing usable).
BUILTIN_OPS = """
Conv ConvTranspose BatchNormalization Relu Clip LeakyRelu PRelu Sigmoid
HardSigmoid HardSwish Tanh Erf Gelu Softmax Add Sub Mul Div Pow Sqrt Exp Log
Max Min Sum MatMul Gemm MaxPool AveragePool GlobalAveragePool GlobalMaxPool
Flatten Reshape Transpose Concat Split Slice Squeeze Unsqueeze Resize Pad
ReduceMean ReduceMax LayerNormalization Identity Dropout Shape Gather Cast
ConstantOfShape Range Expand Equal Where Constant
""".split()

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-5
TIMEOUT_S = 60
DEFAULT_OPS_DOMAINS = ("", "ai.onnx")

PASS, FAIL, UNSUPPORTED = "PASS", "FAIL", "UNSUPPORTED"

# --------------------------------------------------------------------------
# safetensors (https://github.com/huggingface/safetensors, format only):
#   u64 LE header length N | N bytes of JSON header | raw little-endian data
# header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
# offsets are relative to the start of the data section.
# --------------------------------------------------------------------------
_ST_TO_NP = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
try:  # bfloat16 only when ml_dtypes (an onnx dependency) is importable
    import ml_dtypes

    _ST_TO_NP["BF16"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    pass
_NP_TO_ST = {(dt.kind, dt.itemsize, dt.name): code for code, dt in _ST_TO_NP.items()}


class HarnessUnsupported(Exception):
    """The harness itself cannot express this case (e.g. a string tensor)."""


def st_dtype(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    code = _NP_TO_ST.get((dt.kind, dt.itemsize, dt.name))
    if code is None:
        raise HarnessUnsupported(f"dtype {dt} has no safetensors encoding")
    return code


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
    header: dict[str, dict] = {}
    blobs = []
    offset = 0
    for name, arr in tensors:
        arr = np.asarray(arr)
        code = st_dtype(arr.dtype)
        data = np.ascontiguousarray(arr, dtype=_ST_TO_NP[code]).tobytes()
        header[name] = {
            "dtype": code,
            "shape": [int(d) for d in arr.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Returns the tensors in the order of their data offsets (file order)."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise ValueError(f"{os.path.basename(path)}: truncated safetensors file")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError(f"{os.path.basename(path)}: header length {n} past end of file")
    header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    data = memoryview(buf)[8 + n :]
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: (kv[1]["data_offsets"][0], kv[1]["data_offsets"][1]))
    out: dict[str, np.ndarray] = {}
    for name, info in entries:
        code = info["dtype"]
        if code not in _ST_TO_NP:
            raise ValueError(f"output {name!r}: safetensors dtype {code} not understood by harness")
        dt = _ST_TO_NP[code]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(data) or end - begin != count * dt.itemsize:
            raise ValueError(
                f"output {name!r}: data_offsets {begin}..{end} inconsistent with "
                f"{code}{list(shape)} / data size {len(data)}"
            )
        if code == "BOOL":
            arr = np.frombuffer(data[begin:end], dtype=np.uint8) != 0
        else:
            arr = np.frombuffer(data[begin:end], dtype=dt)
        out[name] = arr.reshape(shape).copy()
    return out


# --------------------------------------------------------------------------
# Test case discovery
# --------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    model_dir: str
    rtol: float
    atol: float
    ops: set[str]  # op types ("domain::Op" for non-default domains)
    is_float: bool
    opset: int
    model: onnx.ModelProto = field(repr=False)


def _graph_ops(graph: onnx.GraphProto, ops: set[str]) -> None:
    for node in graph.node:
        dom = node.domain
        ops.add(node.op_type if dom in DEFAULT_OPS_DOMAINS else f"{dom}::{node.op_type}")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_ops(attr.g, ops)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _graph_ops(g, ops)


def model_ops(model: onnx.ModelProto) -> set[str]:
    ops: set[str] = set()
    _graph_ops(model.graph, ops)
    local = {(f.domain, f.name) for f in model.functions}
    for f in model.functions:
        for node in f.node:
            dom = node.domain
            ops.add(node.op_type if dom in DEFAULT_OPS_DOMAINS else f"{dom}::{node.op_type}")
    for dom, name in local:  # a call to a model-local function is not a builtin op
        if dom in DEFAULT_OPS_DOMAINS:
            ops.add(f"{dom or 'local'}::{name}")
    return ops


def _is_f32_tensor(vi: onnx.ValueInfoProto) -> bool:
    t = vi.type
    return t.HasField("tensor_type") and t.tensor_type.elem_type == onnx.TensorProto.FLOAT


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_OPS_DOMAINS:
            return imp.version
    return 0


def discover(supported: set[str], name_filter: str | None) -> tuple[list[Case], int]:
    all_cases = load_model_tests(kind="node")
    selected = []
    for tc in sorted(all_cases, key=lambda t: t.name):
        if tc.model_dir is None:
            continue
        if name_filter and name_filter not in tc.name:
            continue
        model = onnx.load(os.path.join(tc.model_dir, "model.onnx"))
        ops = model_ops(model)
        if not ops or not ops <= supported:
            continue
        io = graph_inputs(model) + list(model.graph.output)
        is_float = all(_is_f32_tensor(vi) for vi in io)
        selected.append(
            Case(
                name=tc.name,
                model_dir=tc.model_dir,
                rtol=max(DEFAULT_RTOL, tc.rtol),
                atol=max(DEFAULT_ATOL, tc.atol),
                ops=ops,
                is_float=is_float,
                opset=default_opset(model),
                model=model,
            )
        )
    return selected, len(all_cases)


def load_datasets(case: Case) -> list[tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]]:
    """[(inputs, expected_outputs)] with (graph name, array) pairs, one per test_data_set_N."""
    ins = graph_inputs(case.model)
    outs = list(case.model.graph.output)
    sets = sorted(
        (d for d in os.listdir(case.model_dir) if d.startswith("test_data_set_")),
        key=lambda d: int(d.rsplit("_", 1)[1]),
    )

    def read(path: str, vi: onnx.ValueInfoProto) -> np.ndarray:
        if not vi.type.HasField("tensor_type"):
            kind = vi.type.WhichOneof("value")
            raise HarnessUnsupported(f"{vi.name}: unsupported {kind} value (harness handles tensors only)")
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        return numpy_helper.to_array(t)

    result = []
    for ds in sets:
        d = os.path.join(case.model_dir, ds)

        def collect(prefix: str, vis: list[onnx.ValueInfoProto]) -> list[tuple[str, np.ndarray]]:
            n = len([f for f in os.listdir(d) if f.startswith(prefix + "_") and f.endswith(".pb")])
            if n > len(vis):
                raise HarnessUnsupported(f"{ds}: {n} {prefix} files but {len(vis)} graph {prefix}s")
            tensors = [(vis[i].name, read(os.path.join(d, f"{prefix}_{i}.pb"), vis[i])) for i in range(n)]
            for tname, arr in tensors:  # raises for dtypes safetensors cannot carry (string, 4/8-bit floats)
                try:
                    st_dtype(arr.dtype)
                except HarnessUnsupported as e:
                    raise HarnessUnsupported(f"{prefix} {tname!r}: {e}") from None
            return tensors

        result.append((collect("input", ins), collect("output", outs)))
    return result


# --------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    is_float: bool
    status: str
    message: str = ""
    seconds: float = 0.0


def _first_line(text: str, prefer: str | None = None) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if prefer:
        for ln in lines:
            if prefer in ln.lower():
                return ln
    return lines[0] if lines else ""


def _panic_message(text: str) -> str:
    """`thread 'main' panicked at src/x.rs:1:2:` plus the message line after it (Rust >= 1.73)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "panicked" in ln:
            if ln.endswith(":") and i + 1 < len(lines):
                return f"{ln} {lines[i + 1]}"
            return ln
    return "panicked"


def _run(cmd: list[str], cwd: str, what: str) -> tuple[str | None, str]:
    """Runs one binary invocation. Returns (status or None on success, message)."""
    try:
        p = subprocess.run(
            cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return FAIL, f"{what}: timeout after {TIMEOUT_S:g} s"
    except OSError as e:
        return FAIL, f"{what}: cannot execute binary: {e}"
    err = p.stderr.decode("utf-8", "replace")
    out = p.stdout.decode("utf-8", "replace")
    both = err + "\n" + out
    if "panicked" in both:
        return FAIL, f"{what}: {_panic_message(both)}"
    if p.returncode < 0:
        return FAIL, f"{what}: killed by signal {-p.returncode}" + (f": {_first_line(err)}" if err.strip() else "")
    if p.returncode != 0:
        if "unsupported" in both.lower():
            return UNSUPPORTED, f"{what}: {_first_line(both, 'unsupported')}"
        msg = _first_line(err) or _first_line(out) or "(no message)"
        return FAIL, f"{what}: exit {p.returncode}: {msg}"
    return None, ""


def compare(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> str | None:
    if got.dtype != want.dtype:
        return f"output {name!r}: dtype {got.dtype} != expected {want.dtype}"
    if got.shape != want.shape:
        return f"output {name!r}: shape {list(got.shape)} != expected {list(want.shape)}"
    if want.size == 0:
        return None
    if want.dtype.kind in "fcV" or want.dtype.name in ("bfloat16",):
        if want.dtype.name == "float16":
            rtol = max(rtol, 2e-3)
        elif want.dtype.name == "bfloat16":
            rtol = max(rtol, 1e-2)
        g = got.astype(np.float64)
        w = want.astype(np.float64)
        ok = np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        if ok.all():
            return None
        bad = np.argwhere(~ok)
        idx = tuple(int(i) for i in bad[0])
        with np.errstate(invalid="ignore"):
            err = np.abs(g - w)
            err = np.where(np.isnan(err), np.inf, err)
        return (
            f"output {name!r}: {len(bad)}/{want.size} values differ "
            f"(first at {list(idx)}: got {g[idx]:.8g} want {w[idx]:.8g}; max abs err {float(err.max()):.3g})"
        )
    ok = got == want
    if ok.all():
        return None
    bad = np.argwhere(~ok)
    idx = tuple(int(i) for i in bad[0])
    return (
        f"output {name!r}: {len(bad)}/{want.size} values differ "
        f"(first at {list(idx)}: got {got[idx].item()!r} want {want[idx].item()!r})"
    )


def run_case(case: Case, binary: str, root: str, keep: bool) -> Result:
    t0 = time.monotonic()
    d = os.path.join(root, case.name)
    os.makedirs(d, exist_ok=True)

    def result(status: str, msg: str = "") -> Result:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)
        return Result(case.name, case.is_float, status, msg, time.monotonic() - t0)

    try:
        shutil.copyfile(os.path.join(case.model_dir, "model.onnx"), os.path.join(d, "model.onnx"))
        datasets = load_datasets(case)
        st_inputs = []
        for i, (ins, outs) in enumerate(datasets):
            sfx = "" if i == 0 else f"_{i}"
            write_safetensors(os.path.join(d, f"inputs{sfx}.safetensors"), ins)
            st_inputs.append(f"inputs{sfx}.safetensors")
            if keep:
                write_safetensors(os.path.join(d, f"expected_outputs{sfx}.safetensors"), outs)
    except HarnessUnsupported as e:
        return result(UNSUPPORTED, f"harness: {e}")

    # edgeinfer fixes every shape at import, so parameters a test feeds as graph inputs (a
    # Resize's scales, a Reshape's shape) are frozen to the test's values, the way a deployment
    # gives TensorRT its shape tensors at build time. The importer names each one it needs.
    input_names = {name for name, _ in datasets[0][0]} if datasets else set()
    frozen: list[str] = []
    while True:
        cmd = [binary, "import", "model.onnx", "-o", "model.safetensors"]
        for name in frozen:
            cmd += ["--freeze", f"{name}={st_inputs[0]}"]
        status, msg = _run(cmd, d, "import")
        m = re.search(r"\('([^']+)'\) must be constant", msg or "")
        if status and m and m.group(1) in input_names and m.group(1) not in frozen and len(datasets) == 1:
            frozen.append(m.group(1))
            continue
        break
    if status:
        return result(status, msg)

    for i, (ins, outs) in enumerate(datasets):
        sfx = "" if i == 0 else f"_{i}"
        out_file = f"outputs{sfx}.safetensors"
        status, msg = _run(
            [binary, "run", "--model", "model.safetensors", "--input-tensor", st_inputs[i],
             "--dump-outputs", out_file],
            d,
            "run",
        )
        if status:
            return result(status, msg)
        try:
            got = read_safetensors(os.path.join(d, out_file))
        except (OSError, ValueError, KeyError, TypeError) as e:
            return result(FAIL, f"run: cannot read {out_file}: {e}")
        got_list = list(got.items())
        for pos, (oname, want) in enumerate(outs):
            if oname in got:
                arr = got[oname]
            elif len(got_list) == len(outs):  # names differ: fall back to order
                arr = got_list[pos][1]
            else:
                return result(
                    FAIL,
                    f"output {oname!r} missing (dumped: {', '.join(got) or 'nothing'})",
                )
            err = compare(oname, arr, want, case.rtol, case.atol)
            if err:
                return result(FAIL, err)
    return result(PASS)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def supported_ops(binary: str) -> tuple[set[str], str]:
    try:
        p = subprocess.run(
            [binary, "ops"], stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT_S
        )
        if p.returncode == 0:
            names = set()
            for line in p.stdout.decode("utf-8", "replace").splitlines():
                tok = line.strip().split()[0] if line.strip() else ""
                if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", tok):
                    names.add(tok)
            if names:
                return names, f"`{os.path.basename(binary)} ops`"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return set(BUILTIN_OPS), "built-in list (`ops` subcommand unavailable)"


def print_stats(cases: list[Case]) -> None:
    per_op: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    attrs: dict[str, set[str]] = collections.defaultdict(set)
    opsets: dict[str, set[int]] = collections.defaultdict(set)
    for c in cases:
        for op in c.ops:
            per_op[op][0 if c.is_float else 1] += 1
            opsets[op].add(c.opset)
        for node in c.model.graph.node:
            for a in node.attribute:
                v = onnx.helper.get_attribute_value(a)
                if isinstance(v, bytes):
                    v = v.decode("utf-8", "replace")
                elif isinstance(v, onnx.TensorProto):
                    v = f"tensor<{onnx.TensorProto.DataType.Name(v.data_type)}>"
                attrs[node.op_type].add(f"{a.name}={v}")
    print(f"{'op':<22}{'float':>6}{'other':>6}  opsets")
    for op in sorted(per_op):
        f, o = per_op[op]
        print(f"{op:<22}{f:>6}{o:>6}  {sorted(opsets[op])}")
    print()
    for op in sorted(attrs):
        print(f"{op}: " + "; ".join(sorted(attrs[op])))


def main() -> int:
    global TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/edgeinfer", help="edgeinfer binary (default: %(default)s)")
    ap.add_argument("--filter", metavar="SUBSTR", help="only cases whose name contains SUBSTR")
    ap.add_argument("--keep", metavar="DIR", help="materialise cases in DIR/<case> and keep them")
    ap.add_argument("--jobs", type=int, default=2, help="cases run in parallel (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="S",
                    help="per-process time limit in seconds (default: %(default)s)")
    ap.add_argument("--list", action="store_true", help="print the selected case names and exit")
    ap.add_argument("--stats", action="store_true", help="print per-op case counts and attributes seen, then exit")
    ap.add_argument("--verbose", action="store_true", help="also print PASS cases")
    args = ap.parse_args()
    TIMEOUT_S = args.timeout

    binary = args.binary
    if os.sep not in binary:
        binary = shutil.which(binary) or binary
    elif not os.path.isabs(binary) and not os.path.exists(binary):
        # a relative path that is not under the cwd: try it relative to the repository root
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(repo_root, binary)):
            binary = os.path.join(repo_root, binary)
    binary = os.path.abspath(binary) if os.sep in binary else binary
    ops, ops_source = supported_ops(binary)
    cases, total = discover(ops, args.filter)

    if args.list:
        for c in cases:
            print(c.name)
        return 0
    if args.stats:
        nf = sum(c.is_float for c in cases)
        print(f"onnx {onnx.__version__}: {len(cases)} of {total} node cases selected "
              f"({nf} float, {len(cases) - nf} non-float); ops from {ops_source}\n")
        print_stats(cases)
        return 0

    if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        print(f"error: binary {args.binary!r} not found or not executable "
              f"(build it with `cargo build --release`, or pass --binary)", file=sys.stderr)
        return 2

    print(f"onnx {onnx.__version__}: {len(cases)} of {total} node cases selected; "
          f"supported ops from {ops_source}; binary {binary}", flush=True)

    if args.keep:
        root = os.path.abspath(args.keep)
        os.makedirs(root, exist_ok=True)
        cleanup = False
    else:
        root = tempfile.mkdtemp(prefix="edgeinfer-onnx-node-")
        cleanup = True
    t0 = time.monotonic()
    results: list[Result] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futs = {pool.submit(run_case, c, binary, root, bool(args.keep)): c for c in cases}
            for fut in concurrent.futures.as_completed(futs):
                c = futs[fut]
                try:
                    results.append(fut.result())
                except Exception as e:  # a harness bug must not hide the other cases
                    results.append(Result(c.name, c.is_float, FAIL, f"harness error: {type(e).__name__}: {e}"))
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)

    results.sort(key=lambda r: r.name)
    for r in results:
        if r.status != PASS or args.verbose:
            kind = "float" if r.is_float else "non-float"
            line = f"{r.status:<11} {r.name} [{kind}]"
            print(line + (f": {r.message}" if r.message else ""))

    def count(rs: list[Result]) -> tuple[int, int, int]:
        return tuple(sum(r.status == s for r in rs) for s in (PASS, FAIL, UNSUPPORTED))  # type: ignore

    n, m, k = count(results)
    fa, fb, fc = count([r for r in results if r.is_float])
    na, nb, nc = count([r for r in results if not r.is_float])
    print(f"({time.monotonic() - t0:.0f} s, {max(1, args.jobs)} jobs)")
    print(
        f"onnx node tests: {n} passed, {m} failed, {k} unsupported "
        f"(float: {fa} passed, {fb} failed, {fc} unsupported; "
        f"non-float: {na} passed, {nb} failed, {nc} unsupported)"
    )
    # The closing line counts the cases that gate CI (float data); the line above has them all.
    print(f"conformance: {fa} passed, {fb} failed", flush=True)
    return 1 if fb else 0


if __name__ == "__main__":
    sys.exit(main())
