"""Shared helpers for the scripts that export ONNX models and write test fixtures.

Everything here is deterministic: no wall-clock time, no randomness, sorted output.
Used by export_mobilenet_v2.py and make_fixtures.py (run those, not this file).
"""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
FIXTURES_DIR = REPO / "tests" / "fixtures"

# The opset every model is exported with: the first one with LayerNormalization,
# and the last one where ReduceMean/Split/... still take their axes as attributes.
OPSET = 17

# Ops the Rust runtime is prepared to implement. An export producing anything
# else is an error (the scripts stop, nothing is silently accepted).
ALLOWED_OPS = frozenset(
    """Conv ConvTranspose BatchNormalization Relu Clip LeakyRelu PRelu Sigmoid
    HardSigmoid HardSwish Tanh Erf Gelu Softmax Add Sub Mul Div Pow Sqrt Exp Log
    Max Min Sum MatMul Gemm MaxPool AveragePool GlobalAveragePool GlobalMaxPool
    Flatten Reshape Transpose Concat Split Slice Squeeze Unsqueeze Resize Pad
    ReduceMean ReduceMax LayerNormalization Identity Dropout Shape Gather Cast
    ConstantOfShape Range Expand Equal Where Constant""".split()
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def configure_torch() -> None:
    """One thread so float reductions happen in the same order on every run."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process; already done
        pass


def round_module_to_f16(module: torch.nn.Module) -> int:
    """Round every floating parameter and buffer to float16 and back to float32, in place.

    Returns how many tensors were touched.
    """
    n = 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(torch.float32))
                n += 1
    return n


def _round_array_f16(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float16).astype(np.float32)


def round_onnx_initializers_to_f16(model: onnx.ModelProto) -> dict:
    """Make every float32 initializer (the weights) exactly representable in f16.

    The legacy exporter folds BatchNormalization into the preceding Conv, which
    produces new float32 weights that are generally not f16-exact even though the
    PyTorch weights were. The runtime stores weights as f16, so the reference ONNX
    must hold f16-exact values for the reference outputs to describe the very same
    weights. Scalars in Constant nodes (attention scale, sqrt(2) of GELU, Clip
    bounds) are part of the graph's arithmetic, not weights, and are left as they
    are. Returns statistics about what changed.
    """
    stats = {"tensors": 0, "tensors_changed": 0, "values": 0, "values_changed": 0, "max_abs_change": 0.0}

    def fix(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            return None
        arr = onnx.numpy_helper.to_array(tensor)
        rounded = _round_array_f16(arr)
        stats["tensors"] += 1
        stats["values"] += int(arr.size)
        changed = int(np.count_nonzero(rounded != arr))
        if changed:
            stats["tensors_changed"] += 1
            stats["values_changed"] += changed
            stats["max_abs_change"] = max(stats["max_abs_change"], float(np.max(np.abs(rounded - arr))))
        new = onnx.numpy_helper.from_array(rounded, tensor.name)
        return new

    for i, init in enumerate(model.graph.initializer):
        new = fix(init)
        if new is not None:
            model.graph.initializer[i].CopyFrom(new)
    return stats


def export_onnx_legacy(model: torch.nn.Module, example: torch.Tensor, path: Path,
                       input_name: str = "input", output_name: str = "logits") -> None:
    """Export with the TorchScript-based exporter, static shapes, eval mode, opset OPSET."""
    import warnings
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # timm's shape asserts are traced as constants - intended, the shapes are static
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _export(model, example, path, input_name, output_name)


def _export(model, example, path, input_name, output_name) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        export_params=True,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes=None,
        training=torch.onnx.TrainingMode.EVAL,
    )


def finalize_onnx(path: Path, round_f16: bool = True) -> dict:
    """Load, optionally f16-round the weights, strip non-deterministic fields, check, save.

    Returns the f16 rounding statistics (or an empty dict).
    """
    model = onnx.load(str(path))
    stats = round_onnx_initializers_to_f16(model) if round_f16 else {}
    # producer_version carries the torch version; keep it (useful provenance) -
    # it is deterministic for a given environment.
    onnx.checker.check_model(model, full_check=True)
    check_allowed_ops(model, path)
    check_static_io(model, path)
    onnx.save(model, str(path))
    return stats


def check_allowed_ops(model: onnx.ModelProto, path: Path) -> None:
    ops = set()
    for graph in _all_graphs(model.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise SystemExit(f"{path}: custom-domain op {node.domain}::{node.op_type}")
            ops.add(node.op_type)
    bad = sorted(ops - ALLOWED_OPS)
    if bad:
        raise SystemExit(f"{path}: ops outside the supported list: {bad}")


def check_static_io(model: onnx.ModelProto, path: Path) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise SystemExit(f"{path}: {vi.name} has a dynamic shape")


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


_DTYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}


def _attr_value(attr: onnx.AttributeProto):
    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, onnx.TensorProto):
        arr = onnx.numpy_helper.to_array(v)
        desc = {"tensor_dtype": _DTYPE_NAMES[v.data_type], "shape": list(arr.shape)}
        if arr.size <= 16:
            desc["value"] = arr.tolist()
        return desc
    if isinstance(v, (list, tuple)):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    if isinstance(v, float):
        return float(np.float32(v))  # as stored: a float32
    return v


def _shape_of(vi: onnx.ValueInfoProto):
    t = vi.type.tensor_type
    dims = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return _DTYPE_NAMES.get(t.elem_type, str(t.elem_type)), dims


def _fmt_shape(shape) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join(str(d) for d in shape) + "]"


def describe_ops(path: Path) -> dict:
    """Everything the runtime needs to know about which op variants a model uses.

    For each op type: how many nodes, the attributes seen with all their distinct
    values (in first-seen order), the input/output arities, which inputs are
    constants (initializer or Constant node) as opposed to computed tensors, the
    dtypes and ranks of inputs and outputs (from ONNX shape inference), and, for
    inputs that are constants and small, their values (e.g. Clip min/max,
    Reshape target shapes, Slice starts/ends).
    """
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    g = inferred.graph
    vinfo = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vinfo[vi.name] = _shape_of(vi)
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        vinfo[t.name] = (_DTYPE_NAMES[t.data_type], list(t.dims))
    const_nodes = {}
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    const_nodes[node.output[0]] = a.t

    ops: dict[str, dict] = {}
    for node in g.node:
        d = ops.setdefault(node.op_type, {
            "count": 0, "attributes": OrderedDict(), "num_inputs": set(), "num_outputs": set(),
            "constant_inputs": set(), "input_signatures": [], "output_signatures": [],
            "constant_input_values": [],
        })
        d["count"] += 1
        d["num_inputs"].add(len(node.input))
        d["num_outputs"].add(len(node.output))
        for a in node.attribute:
            vals = d["attributes"].setdefault(a.name, [])
            val = _attr_value(a)
            if val not in vals:
                vals.append(val)
        in_sig = []
        const_vals = {}
        for i, name in enumerate(node.input):
            if name == "":
                in_sig.append("<omitted>")
                continue
            dt, shape = vinfo.get(name, ("?", None))
            is_const = name in inits or name in const_nodes
            kind = "const" if is_const else "dyn"
            if is_const:
                d["constant_inputs"].add(i)
                t = inits.get(name) or const_nodes.get(name)
                arr = onnx.numpy_helper.to_array(t)
                if arr.size <= 8 and node.op_type != "Constant":
                    const_vals[i] = arr.tolist()
            in_sig.append(f"{kind}:{dt}{_fmt_shape(shape)}")
        out_sig = []
        for name in node.output:
            dt, shape = vinfo.get(name, ("?", None))
            out_sig.append(f"{dt}{_fmt_shape(shape)}")
        in_sig = ", ".join(in_sig)
        out_sig = ", ".join(out_sig)
        if in_sig not in d["input_signatures"]:
            d["input_signatures"].append(in_sig)
        if out_sig not in d["output_signatures"]:
            d["output_signatures"].append(out_sig)
        if const_vals:
            cv = {str(k): v for k, v in sorted(const_vals.items())}
            if cv not in d["constant_input_values"]:
                d["constant_input_values"].append(cv)

    out_ops = OrderedDict()
    for name in sorted(ops):
        d = ops[name]
        entry = OrderedDict()
        entry["count"] = d["count"]
        entry["attributes"] = OrderedDict(sorted(d["attributes"].items()))
        entry["num_inputs"] = sorted(d["num_inputs"])
        entry["num_outputs"] = sorted(d["num_outputs"])
        entry["constant_input_positions"] = sorted(d["constant_inputs"])
        entry["constant_input_values"] = d["constant_input_values"][:12]
        entry["input_signatures"] = d["input_signatures"][:12]
        entry["input_signatures_total"] = len(d["input_signatures"])
        entry["output_signatures"] = d["output_signatures"][:12]
        out_ops[name] = entry

    init_dtypes = sorted({_DTYPE_NAMES[t.data_type] for t in g.initializer})
    n_params = int(sum(int(np.prod(t.dims)) for t in g.initializer))
    return OrderedDict([
        ("file", path.name),
        ("op_types", sorted(ops)),
        ("opset", [{"domain": o.domain or "ai.onnx", "version": o.version} for o in model.opset_import]),
        ("ir_version", model.ir_version),
        ("producer", f"{model.producer_name} {model.producer_version}"),
        ("inputs", [{"name": vi.name, "dtype": _shape_of(vi)[0], "shape": _shape_of(vi)[1]} for vi in model.graph.input]),
        ("outputs", [{"name": vi.name, "dtype": _shape_of(vi)[0], "shape": _shape_of(vi)[1]} for vi in model.graph.output]),
        ("num_nodes", len(g.node)),
        ("num_initializers", len(g.initializer)),
        ("initializer_dtypes", init_dtypes),
        ("initializer_values_total", n_params),
        ("ops", out_ops),
    ])


def ort_session(path: Path) -> ort.InferenceSession:
    """A deterministic CPU session that runs the graph as written (no graph rewrites)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    return {n: np.ascontiguousarray(o.astype(np.float32)) for n, o in zip(names, outs)}


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {}
    for k, v in tensors.items():
        if v.dtype != np.float32:
            raise ValueError(f"{k}: fixtures are float32, got {v.dtype}")
        clean[k] = np.ascontiguousarray(v)
    save_file(clean, str(path))


def write_json(path: Path, obj) -> None:
    """JSON with 2-space indentation, but short lists of scalars kept on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(obj, default=_json_default))
    with open(path, "w", encoding="utf-8") as f:
        f.write(_dumps(plain, 0))
        f.write("\n")


def _is_flat(v) -> bool:
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) or (isinstance(x, list) and _is_flat(x)) for x in v)
    return not isinstance(v, dict)


def _dumps(v, level: int) -> str:
    pad = "  " * (level + 1)
    end = "  " * level
    if isinstance(v, dict):
        if not v:
            return "{}"
        one_line = json.dumps(v, separators=(", ", ": "))
        if all(_is_flat(x) for x in v.values()) and len(one_line) <= 100:
            return one_line
        items = [f"{pad}{json.dumps(k)}: {_dumps(x, level + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(v, list):
        one_line = json.dumps(v, separators=(", ", ": "))
        if _is_flat(v) and len(one_line) <= 100:
            return one_line
        if not v:
            return "[]"
        items = [pad + _dumps(x, level + 1) for x in v]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(v)


def _json_default(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def seeded_normal(seed: int, shape) -> np.ndarray:
    """Standard normal float32 from numpy's PCG64: identical on every platform."""
    return np.random.default_rng(seed).standard_normal(size=shape, dtype=np.float32)


def rel_path(p: Path) -> str:
    return os.path.relpath(p, REPO)
