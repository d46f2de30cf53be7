"""Reference fixtures for the Rust explain layer (CAM, Grad-CAM, Eigen-CAM, ViT attention rollout).

    /work/venv/bin/python models/make_explain_fixtures.py

Writes tests/fixtures/explain/:
  cases.json                                   every case: model, input, target layer (ONNX value name),
                                               target class, shapes, keys, formulas, checks
  mobilenet_v2.features_18.chelsea.safetensors Grad-CAM / Eigen-CAM / CAM at features[-1] (= features[18])
  mobilenet_v2.features_18.coffee.safetensors  same, coffee
  mobilenet_v2.features_17.chelsea.safetensors Grad-CAM at features[17] (non-trivial backward)
  vit_tiny.rollout.safetensors                 attention probabilities of the 4 blocks + rollout masks

Inputs are not copied: cases.json points at tests/fixtures/mobilenet_v2/{chelsea,coffee}.input.safetensors
and tests/fixtures/vit_tiny/input.safetensors.

Weights. The MobileNetV2 reference is the torchvision model of export_mobilenet_v2.load_model() (f16-rounded
ImageNet weights) with every BatchNorm replaced by Identity and every Conv given the BN-folded, f16-exact
weight and bias of models/mobilenet_v2.onnx - i.e. exactly the weights of models/mobilenet_v2.safetensors
(checked tensor by tensor). The ViT is make_fixtures.build_vit_tiny() rounded to f16 like _write_fixture does,
checked against tests/fixtures/vit_tiny/expected.safetensors.

Grad-CAM and Eigen-CAM come from pytorch-grad-cam (PyPI `grad-cam`); the stored maps are the
7x7 maps *before* pytorch-grad-cam resizes/normalises them (see cases.json "formulas").
"""

from __future__ import annotations

import os

# single-threaded LAPACK/BLAS (Eigen-CAM's SVD) before numpy is imported
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import importlib.metadata  # noqa: E402
import sys  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx.numpy_helper  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_utils as fu  # noqa: E402
import export_mobilenet_v2 as emv  # noqa: E402
import make_fixtures as mf  # noqa: E402

from pytorch_grad_cam import EigenCAM, GradCAM  # noqa: E402
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

OUT_DIR = fu.FIXTURES_DIR / "explain"
MNV2_ONNX = emv.ONNX_PATH
MNV2_MODEL = fu.MODELS_DIR / "mobilenet_v2.safetensors"
MNV2_INPUTS = {name: emv.FIX_DIR / f"{name}.input.safetensors" for name in ("chelsea", "coffee")}
VIT_DIR = fu.FIXTURES_DIR / "vit_tiny"
VIT_ONNX = VIT_DIR / "model.onnx"
VIT_INPUT = VIT_DIR / "input.safetensors"
VIT_EXPECTED = VIT_DIR / "expected.safetensors"
ROLLOUT_VARIANTS = [("mean", 0.0), ("mean", 0.9), ("max", 0.0), ("min", 0.0)]
MAX_TOTAL_BYTES = 3_000_000


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.astype(np.float64).mean()
    b = b.astype(np.float64).ravel() - b.astype(np.float64).mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


# --------------------------------------------------------------------------------------------- ONNX helpers

def ort_with_extra_outputs(path: Path, extra: list[str], feeds: dict) -> dict[str, np.ndarray]:
    """Run onnxruntime on an in-memory copy of the model with `extra` values added as graph outputs."""
    import onnxruntime as ort
    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    for name in extra:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def match_value(activation: np.ndarray, ort_values: dict[str, np.ndarray]) -> tuple[str, float, float]:
    """The ONNX value whose tensor equals the torch activation: (name, max abs diff, runner-up diff)."""
    cands = sorted((maxdiff(v, activation), n) for n, v in ort_values.items() if v.shape == activation.shape)
    assert cands, f"no ONNX value of shape {activation.shape}"
    best = cands[0]
    second = cands[1][0] if len(cands) > 1 else None
    scale = float(np.max(np.abs(activation)))
    assert best[0] < 1e-3 * max(scale, 1.0), f"closest ONNX value {best[1]} differs by {best[0]}"
    assert second is None or second > 100 * best[0], f"ambiguous match: {cands[:2]}"
    return best[1], best[0], second


# ------------------------------------------------------------------------------------------------ MobileNetV2

def mobilenet_with_onnx_weights() -> tuple[torch.nn.Module, OrderedDict, set]:
    """export_mobilenet_v2's f16-rounded model, BN folded exactly as in models/mobilenet_v2.onnx."""
    model, weights_info = emv.load_model()
    model.eval()
    g = onnx.load(str(MNV2_ONNX)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    onnx_convs = [n for n in g.node if n.op_type == "Conv"]

    # torch Conv2d modules in forward order, each followed by a BatchNorm2d in the same parent
    # (named_modules is pre-order = registration order, which is the forward order in MobileNetV2)
    mods = dict(model.named_modules())
    convs, bns = [], []
    for name, child in model.named_modules():
        if isinstance(child, torch.nn.Conv2d):
            parent_name, own = name.rsplit(".", 1)
            parent = mods[parent_name]
            kids = list(parent.named_children())
            i = [k for k, _ in kids].index(own)
            nxt = kids[i + 1] if i + 1 < len(kids) else None
            assert nxt is not None and isinstance(nxt[1], torch.nn.BatchNorm2d), name
            convs.append(child)
            bns.append((parent, nxt[0], nxt[1]))
    assert len(convs) == len(onnx_convs) == 52, (len(convs), len(onnx_convs))

    max_fold_change = 0.0
    with torch.no_grad():
        for conv, (parent, bn_name, bn), node in zip(convs, bns, onnx_convs):
            w, b = inits[node.input[1]].copy(), inits[node.input[2]].copy()
            assert tuple(w.shape) == tuple(conv.weight.shape), (node.name, w.shape, conv.weight.shape)
            # sanity: the ONNX weights are this conv folded with this BN (up to the f16 rounding)
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w_fold = conv.weight * s[:, None, None, None]
            max_fold_change = max(max_fold_change, float((w_fold - torch.from_numpy(w)).abs().max()))
            assert torch.allclose(w_fold, torch.from_numpy(w), rtol=2e-3, atol=1e-6), node.name
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias = torch.nn.Parameter(torch.from_numpy(b))
            setattr(parent, bn_name, torch.nn.Identity())
        gemm = [n for n in g.node if n.op_type == "Gemm"][0]
        lin = model.classifier[1]
        assert np.array_equal(inits[gemm.input[1]], lin.weight.numpy())
        assert np.array_equal(inits[gemm.input[2]], lin.bias.numpy())
    assert not any(isinstance(mm, torch.nn.BatchNorm2d) for mm in model.modules())

    # the ONNX initializers are exactly the f16 weights of our model file
    with safe_open(str(MNV2_MODEL), "np") as f:
        prov = f.metadata().get("edgeinfer.provenance", "")
        stored_graph = json.loads(f.metadata()["edgeinfer.graph"])
        st_keys = set(f.keys())
        compared = 0
        for name, arr in sorted(inits.items()):
            if name in st_keys:
                t = f.get_tensor(name)
                assert t.dtype == np.float16 and np.array_equal(t.astype(np.float32), arr), name
                compared += 1
    onnx_sha = sha256(MNV2_ONNX)
    assert onnx_sha in prov, "models/mobilenet_v2.safetensors was not imported from this models/mobilenet_v2.onnx"
    assert compared == len(st_keys), (compared, len(st_keys))
    stored_values = {o for n in stored_graph["nodes"] for o in n["outputs"]}
    info = OrderedDict([
        ("torch_model", "export_mobilenet_v2.load_model() (torchvision mobilenet_v2, ImageNet weights rounded to "
                        "f16), then every BatchNorm2d replaced by Identity and every Conv2d given the BN-folded "
                        "weight+bias of models/mobilenet_v2.onnx (f16-exact), so torch, the ONNX file and "
                        "models/mobilenet_v2.safetensors hold identical weights"),
        ("weights_source", weights_info),
        ("onnx_sha256", onnx_sha),
        ("model_file_tensors_checked_equal_to_onnx_initializers", compared),
        ("max_abs_change_folded_torch_vs_onnx_conv_weights", max_fold_change),
    ])
    return model, info, stored_values


def gradcam_raw(model, layer, x: torch.Tensor, target: int):
    """pytorch-grad-cam GradCAM up to (and incl.) the np.maximum of compute_cam_per_layer, before scaling."""
    cam = GradCAM(model=model, target_layers=[layer])
    ag = cam.activations_and_grads
    outputs = ag(x)
    targets = [ClassifierOutputTarget(target)]
    model.zero_grad()
    loss = sum(t(o) for t, o in zip(targets, outputs))
    loss.backward(retain_graph=True)
    acts = ag.activations[0].numpy()
    grads = ag.gradients[0].numpy()
    weights = cam.get_cam_weights(x, [layer], targets, acts, grads)
    raw = cam.get_cam_image(x, layer, targets, acts, grads, eigen_smooth=False)
    relu = np.maximum(raw, 0)
    logits = outputs.detach().numpy()
    # consistency: the package's own end-to-end call == our raw map pushed through its scaling
    full = cam(x, targets)
    mine = scale_cam_image(np.maximum(scale_cam_image(relu, (x.shape[-1], x.shape[-2]))[:, None], 0).mean(1))
    assert maxdiff(full, mine) == 0.0
    ag.release()
    model.zero_grad(set_to_none=True)
    return OrderedDict(acts=acts, grads=grads, weights=weights, raw=raw, relu=relu, logits=logits,
                       full_224=full)


def eigencam_raw(model, layer, x: torch.Tensor):
    cam = EigenCAM(model=model, target_layers=[layer])
    ag = cam.activations_and_grads
    with torch.no_grad():
        ag(x)
    acts = ag.activations[0].numpy()
    raw = cam.get_cam_image(x, layer, None, acts, None, eigen_smooth=False)
    relu = np.maximum(raw, 0)
    full = cam(x, None)
    mine = scale_cam_image(np.maximum(scale_cam_image(relu, (x.shape[-1], x.shape[-2]))[:, None], 0).mean(1))
    assert maxdiff(full, mine) == 0.0
    ag.release()
    # float64 re-derivation (same formula) to document precision and the sign convention
    a = acts[0].reshape(acts.shape[1], -1).T.astype(np.float64)      # [HW, C]
    a = a - a.mean(axis=0)
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    p64 = (a @ vt[0]).reshape(acts.shape[2:])
    sign = 1.0 if float(np.sum(p64 * raw[0])) >= 0 else -1.0
    return OrderedDict(acts=acts, raw=raw, relu=relu, p64=sign * p64, sign_vs_f64=sign, singular_values=s)


def make_mobilenet_cases(labels: list[str]) -> tuple[list, dict, OrderedDict]:
    model, model_info, stored_values = mobilenet_with_onnx_weights()
    # for the record only: the same f16-rounded torchvision model with its BatchNorms unfolded (not the
    # weights of our model file: folding+f16-rounding changes the logits by up to ~0.06)
    unfolded, _ = emv.load_model()
    unfolded.eval()
    g = onnx.load(str(MNV2_ONNX)).graph
    float_values = [o for n in g.node if n.op_type != "Constant" for o in n.output if o != "logits"]
    producers = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    layers = [("features_18", "features[-1] (= features[18]: Conv2dNormActivation 1x1 conv 320->1280, BN, ReLU6)",
               model.features[-1], ["chelsea", "coffee"], True),
              ("features_17", "features[17] (InvertedResidual 160->320, no residual; output = its BN-folded "
                              "1x1 projection conv, no activation)", model.features[17], ["chelsea"], False)]
    cases, files = [], {}
    expected_json = emv.FIX_DIR / "expected.json"
    ort_top1 = {k: v["ort_top5"][0]["index"] for k, v in json.loads(expected_json.read_text())["photos"].items()}

    W = model.classifier[1].weight.detach().numpy().astype(np.float64)
    for lkey, ldesc, layer, images, with_eigen_and_cam in layers:
        for img in images:
            x_np = load_file(str(MNV2_INPUTS[img]))["input"]
            x = torch.from_numpy(x_np)
            with torch.no_grad():
                logits = model(x).numpy()
            target = int(np.argmax(logits[0]))
            assert target == ort_top1[img], (img, target, ort_top1[img])
            gc = gradcam_raw(model, layer, x, target)
            assert maxdiff(gc["logits"], logits) == 0.0
            acts = gc["acts"]

            ort = ort_with_extra_outputs(MNV2_ONNX, float_values, {"input": x_np})
            vname, vdiff, runner_up = match_value(acts, {k: v for k, v in ort.items() if k != "logits"})
            pnode = producers[vname]
            cons = [n.op_type for n in consumers.get(vname, [])]
            if lkey == "features_18":
                assert pnode.op_type == "Clip" and cons == ["GlobalAveragePool"], (pnode.op_type, cons)
            else:
                assert pnode.op_type == "Conv" and cons == ["Conv"], (pnode.op_type, cons)
            # the stored (pre-optimisation) graph of models/mobilenet_v2.safetensors keeps the ONNX value names
            assert vname in stored_values, vname
            logit_diff = maxdiff(ort["logits"], logits)
            assert logit_diff < 1e-3, logit_diff

            tensors = OrderedDict()
            tensors["features"] = f32(acts[0])
            tensors["logits"] = f32(logits[0])
            tensors["gradcam.grads"] = f32(gc["grads"][0])
            tensors["gradcam.weights"] = f32(gc["weights"][0])
            tensors["gradcam.raw"] = f32(gc["raw"][0])
            tensors["gradcam.relu"] = f32(gc["relu"][0])
            methods = OrderedDict()
            methods["gradcam"] = OrderedDict([
                ("library", "pytorch_grad_cam.GradCAM"),
                ("target", f"ClassifierOutputTarget({target}) = logits[0, {target}] (raw logit, no softmax)"),
                ("keys", {"grads": "gradcam.grads", "weights": "gradcam.weights", "raw": "gradcam.raw",
                          "relu": "gradcam.relu"}),
                ("raw_min_max", [float(gc["raw"].min()), float(gc["raw"].max())]),
                ("check_weights_equal_mean_of_grads", maxdiff(gc["weights"][0], gc["grads"][0].mean(axis=(1, 2)))),
            ])
            if with_eigen_and_cam:
                # gradient of logits[k] w.r.t. the post-ReLU6 features is W[k,c]/49 everywhere
                g_expected = np.broadcast_to(W[target][:, None, None] / 49.0, gc["grads"][0].shape)
                methods["gradcam"]["check_grads_vs_W_over_HW_max_abs_diff"] = maxdiff(gc["grads"][0], g_expected)
                cam = np.tensordot(W[target], acts[0].astype(np.float64), axes=1)        # [7,7]
                r = pearson(cam, gc["raw"][0])
                assert r > 0.9999, r
                ratio = float(np.sum(cam * gc["raw"][0]) / np.sum(gc["raw"][0].astype(np.float64) ** 2))
                tensors["cam.raw"] = f32(cam)
                tensors["cam.relu"] = f32(np.maximum(cam, 0))
                methods["cam"] = OrderedDict([
                    ("library", "numpy (float64, stored as f32)"),
                    ("formula", f"cam[h,w] = sum_c W[{target},c] * features[c,h,w], W = classifier.1.weight "
                                "(Gemm B, [1000,1280]); no bias, no ReLU in 'raw'"),
                    ("keys", {"raw": "cam.raw", "relu": "cam.relu"}),
                    ("pearson_vs_gradcam_raw", r),
                    ("least_squares_ratio_cam_over_gradcam", ratio),
                    ("max_abs_diff_cam_vs_49_x_gradcam_raw", maxdiff(cam, 49.0 * gc["raw"][0])),
                ])
                ec = eigencam_raw(model, layer, x)
                assert maxdiff(ec["acts"], acts) == 0.0
                tensors["eigencam.raw"] = f32(ec["raw"][0])
                tensors["eigencam.relu"] = f32(ec["relu"][0])
                tensors["eigencam.relu_flipped"] = f32(np.maximum(-ec["raw"][0], 0))
                raw0 = ec["raw"][0].astype(np.float64)
                methods["eigencam"] = OrderedDict([
                    ("library", "pytorch_grad_cam.EigenCAM (get_2d_projection, float32 numpy SVD)"),
                    ("target", "none (class-agnostic)"),
                    ("keys", {"raw": "eigencam.raw", "relu": "eigencam.relu",
                              "relu_of_negated_raw": "eigencam.relu_flipped"}),
                    ("raw_min_max", [float(raw0.min()), float(raw0.max())]),
                    ("raw_sum", float(raw0.sum())),
                    ("sign_note", "SVD sign is arbitrary; this raw map is whatever numpy/LAPACK returned. "
                                  "raw sums to ~0 (centred data). Compare up to sign, or flip so that "
                                  "sum(raw * cam.raw) > 0"),
                    ("sign_agrees_with_cam", bool(np.sum(raw0 * cam) > 0)),
                    ("abs_min_gt_abs_max", bool(abs(raw0.min()) > abs(raw0.max()))),
                    ("max_abs_diff_vs_float64_recomputation_same_sign", maxdiff(ec["p64"], raw0)),
                    ("top3_singular_values", [float(v) for v in ec["singular_values"][:3]]),
                ])

            if lkey == "features_17":
                # G17 = W18^T (1[0 < z < 6] * W[k] / 49), z = pre-Clip output of features[18]'s conv
                conv18 = model.features[18][0]
                z = conv18(torch.from_numpy(acts)).detach().numpy()[0].astype(np.float64)   # [1280,7,7]
                live = (z > 0) & (z < 6)
                w18 = conv18.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)        # [1280,320]
                g17 = np.einsum("oc,ohw->chw", w18, live * (W[target][:, None, None] / 49.0))
                methods["gradcam"]["check_grads_vs_numpy_backward_max_abs_diff"] = maxdiff(g17, gc["grads"][0])
                methods["gradcam"]["backward_note"] = (
                    "G = W18^T (1[0 < z < 6] * W[k,:] / 49) with z = conv(features[18][0]) pre-Clip [1280,7,7], "
                    "W18 = its 1x1 weight [1280,320]; ReLU6 passes the gradient only where 0 < z < 6")
                methods["gradcam"]["clip_pass_fraction"] = float(live.mean())
                methods["gradcam"]["clip_saturated_at_6_fraction"] = float((z >= 6).mean())
            ulayer = unfolded.features[18] if lkey == "features_18" else unfolded.features[17]
            ugc = gradcam_raw(unfolded, ulayer, x, target)
            methods["gradcam"]["raw_max_abs_diff_vs_unfolded_bn_torch_model"] = maxdiff(ugc["raw"], gc["raw"])

            fname = f"mobilenet_v2.{lkey}.{img}.safetensors"
            files[fname] = tensors
            shapes = OrderedDict((k, list(v.shape)) for k, v in tensors.items())
            case = OrderedDict([
                ("id", f"mobilenet_v2.{lkey}.{img}"),
                ("file", fname),
                ("model_file", fu.rel_path(MNV2_MODEL)),
                ("onnx", fu.rel_path(MNV2_ONNX)),
                ("input", fu.rel_path(MNV2_INPUTS[img])),
                ("input_key", "input"),
                ("torch_layer", ldesc),
                ("target_layer", vname),
                ("target_layer_producer", f"{pnode.op_type} {pnode.name}"),
                ("target_layer_consumers", cons),
                ("target_layer_in_model_file_stored_graph", True),
                ("feature_shape", list(acts.shape)),
                ("target_class", target),
                ("target_label", labels[target]),
                ("target_logit", float(logits[0, target])),
                ("methods", methods),
                ("tensor_shapes", shapes),
                ("checks", OrderedDict([
                    ("max_abs_diff_features_torch_vs_ort", vdiff),
                    ("runner_up_onnx_value_diff", runner_up),
                    ("max_abs_diff_logits_torch_vs_ort", logit_diff),
                ])),
            ])
            cases.append(case)
            print(f"{case['id']}: target {target} {labels[target]!r}, layer {vname} {list(acts.shape)}, "
                  f"|torch-ort| feat {vdiff:.2g} logits {logit_diff:.2g}")
    return cases, files, model_info


# ------------------------------------------------------------------------------------------------ ViT rollout

def rollout(attns: list[np.ndarray], fusion: str, discard: float, dtype=np.float64):
    """Attention rollout exactly as specified in cases.json (computed in `dtype`)."""
    T = attns[0].shape[-1]
    eye = np.eye(T, dtype=dtype)
    result = np.eye(T, dtype=dtype)
    discarded = []
    for A in attns:
        A = A.astype(dtype)
        fused = {"mean": A.mean(0), "max": A.max(0), "min": A.min(0)}[fusion]
        if discard > 0:
            flat = fused.flatten()
            k = int(flat.size * discard)
            srt = np.sort(flat)                 # for the record: values either side of the cut
            idx = np.argsort(flat, kind="stable")[:k]
            idx = idx[idx != 0]
            flat[idx] = 0
            fused = flat.reshape(fused.shape)
            discarded.append((np.sort(idx), float(srt[k - 1]), float(srt[k])))
        a = (fused + eye) / 2
        a = a / a.sum(-1, keepdims=True)
        result = a @ result
    mask = result[0, 1:].reshape(8, 8)
    mask = mask / mask.max()
    return mask, result, discarded


def make_vit_case() -> tuple[list, dict]:
    model, _ = mf.build_vit_tiny()
    fu.round_module_to_f16(model)         # as make_fixtures._write_fixture does before export
    model.eval()
    assert len(model.blocks) == 4 and all(not b.attn.fused_attn for b in model.blocks)
    x_np = load_file(str(VIT_INPUT))["input"]
    expected = load_file(str(VIT_EXPECTED))["logits"]

    probs = []
    hooks = [b.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.detach().numpy().copy()))
             for b in model.blocks]
    with torch.no_grad():
        logits = model(torch.from_numpy(x_np)).numpy()
    for h in hooks:
        h.remove()
    assert len(probs) == 4 and all(p.shape == (1, 3, 65, 65) for p in probs)
    logit_diff = maxdiff(logits, expected)
    assert logit_diff < 1e-5, logit_diff
    for p in probs:
        assert maxdiff(p.sum(-1), 1.0) < 1e-5

    g = onnx.load(str(VIT_ONNX)).graph
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    assert len(softmax) == 4
    names = [n.output[0] for n in softmax]
    ort = ort_with_extra_outputs(VIT_ONNX, names, {"input": x_np})
    diffs = []
    for i, (n, p) in enumerate(zip(names, probs)):
        # graph order == block order, and nothing else matches better
        others = [maxdiff(ort[m], p) for j, m in enumerate(names) if j != i]
        d = maxdiff(ort[n], p)
        assert d < 1e-5 and all(o > 100 * d for o in others), (n, d, others)
        diffs.append(d)
    ort_logit_diff = maxdiff(ort["logits"], expected)

    attns = [p[0] for p in probs]
    tensors = OrderedDict()
    for i, a in enumerate(attns):
        tensors[f"attn.{i}"] = f32(a)
    variants = []
    for fusion, discard in ROLLOUT_VARIANTS:
        key = f"rollout.{fusion}.d{discard:.1f}"
        mask, result, discarded = rollout(attns, fusion, discard, np.float64)
        mask32, result32, discarded32 = rollout(attns, fusion, discard, np.float32)
        tensors[f"{key}.mask"] = f32(mask)
        tensors[f"{key}.result"] = f32(result)
        v = OrderedDict([
            ("fusion", fusion), ("discard_ratio", discard),
            ("keys", {"mask": f"{key}.mask", "result": f"{key}.result"}),
            ("argmax_patch", int(np.argmax(mask))),
            ("mask_min", float(mask.min())),
            ("max_abs_diff_mask_float32_computation", maxdiff(mask32, mask)),
        ])
        ort_attns = [ort[n][0] for n in names]
        mask_o, _, discarded_o = rollout(ort_attns, fusion, discard, np.float64)
        v["max_abs_diff_mask_from_ort_attention"] = maxdiff(mask_o, mask)
        if discard > 0:
            v["ort_attention_discards_same_entries"] = all(
                np.array_equal(a[0], b[0]) for a, b in zip(discarded, discarded_o))
            k = int(65 * 65 * discard)
            same = all(np.array_equal(a[0], b[0]) for a, b in zip(discarded, discarded32))
            assert same, "float32 and float64 rollouts discard different entries"
            v["k_discarded_per_block"] = k
            # True where flat index 0 (fused[0,0], cls->cls) was among the k smallest and so was spared
            v["flat_index_0_spared_per_block"] = [bool(len(d[0]) == k - 1) for d in discarded]
            v["entries_zeroed_per_block"] = [int(len(d[0])) for d in discarded]
            # k-th and (k+1)-th smallest fused values: a Rust run on its own attention probabilities
            # selects the same entries only if its error stays below this gap
            v["sorted_values_k_and_k_plus_1_per_block"] = [[d[1], d[2]] for d in discarded]
            v["min_gap_at_threshold"] = min(d[2] - d[1] for d in discarded)
            v["float32_and_float64_discard_same_entries"] = same
        variants.append(v)
        print(f"vit rollout {fusion} discard={discard}: argmax patch {v['argmax_patch']}, "
              f"|f32-f64| {v['max_abs_diff_mask_float32_computation']:.2g}")

    case = OrderedDict([
        ("id", "vit_tiny.rollout"),
        ("file", "vit_tiny.rollout.safetensors"),
        ("model_file", fu.rel_path(VIT_ONNX)),
        ("onnx", fu.rel_path(VIT_ONNX)),
        ("onnx_sha256", sha256(VIT_ONNX)),
        ("input", fu.rel_path(VIT_INPUT)),
        ("input_key", "input"),
        ("method", "attention_rollout"),
        ("torch_model", "make_fixtures.build_vit_tiny(), weights rounded to f16 (fixture_utils.round_module_to_f16)"
                        " exactly as make_fixtures._write_fixture; attention probabilities from forward hooks "
                        "on blocks[i].attn.attn_drop (Dropout, identity in eval) = softmax(q*scale @ k^T)"),
        ("tokens", 65), ("heads", 3), ("blocks", 4), ("grid", [8, 8]),
        ("target_layers", names),
        ("target_layer_producers", [n.name for n in softmax]),
        ("attention_shape", [3, 65, 65]),
        ("attention_keys", [f"attn.{i}" for i in range(4)]),
        ("softmax_axis", -1),
        ("target_class", None),
        ("rollout", variants),
        ("tensor_shapes", OrderedDict((k, list(v.shape)) for k, v in tensors.items())),
        ("checks", OrderedDict([
            ("max_abs_diff_attention_torch_vs_ort_per_block", diffs),
            ("max_abs_diff_logits_torch_vs_expected", logit_diff),
            ("max_abs_diff_logits_ort_vs_expected", ort_logit_diff),
        ])),
    ])
    return [case], {case["file"]: tensors}


# ------------------------------------------------------------------------------------------------------ main

FORMULAS = OrderedDict([
    ("gradcam", "pytorch-grad-cam GradCAM: A = activations of the target layer [C,H,W] (forward hook on the "
                "module output), G = d logits[0,k] / dA (k = target_class, raw logit via ClassifierOutputTarget, "
                "no softmax). weights[c] = mean_{h,w} G[c,h,w] (np.mean over axes 2,3); "
                "raw[h,w] = sum_c weights[c] * A[c,h,w] (BaseCAM.get_cam_image, eigen_smooth=False); "
                "relu = max(raw, 0) (BaseCAM.compute_cam_per_layer). Not stored: the package then applies "
                "scale_cam_image (min-max normalise: x - min, / (1e-7 + max), then cv2.resize to 224x224), "
                "a second max(.,0)+mean over layers and another scale_cam_image."),
    ("eigencam", "pytorch-grad-cam EigenCAM (utils/svd_on_activations.get_2d_projection): "
                 "M = A.reshape(C, H*W).T  [H*W, C]; M = M - M.mean(axis=0) (each CHANNEL centred over the "
                 "spatial positions); U,S,VT = np.linalg.svd(M, full_matrices=True) in float32; "
                 "raw = (M @ VT[0]).reshape(H, W) (projection of the centred data on the first right singular "
                 "vector = U[:,0]*S[0]); relu = max(raw, 0). No sign correction: the sign of VT[0] is whatever "
                 "LAPACK returns; no gradients, no target class."),
    ("cam", "plain CAM in numpy float64: raw[h,w] = sum_c W[k,c] * A[c,h,w], W = classifier Linear weight "
            "[1000,1280] (the Gemm B input); relu = max(raw, 0). For features[-1] of MobileNetV2 the tail is "
            "GAP -> Linear, so G[c,h,w] = W[k,c]/(H*W) and gradcam.raw = cam.raw / 49 exactly (up to f32 "
            "rounding)."),
    ("attention_rollout", "result = I(65); for A in attn.0..attn.3 ([heads,T,T], float64): fused = A.mean(0) | "
                          "A.max(0) | A.min(0); if discard_ratio > 0: flat = fused.flatten(); "
                          "k = int(flat.size * discard_ratio); idx = np.argsort(flat, kind='stable')[:k]; "
                          "idx = idx[idx != 0]; flat[idx] = 0; fused = flat.reshape(T,T); "
                          "a = (fused + I) / 2; a = a / a.sum(-1, keepdims=True); result = a @ result. "
                          "mask = result[0, 1:].reshape(8, 8); mask = mask / mask.max(). Stored: mask and "
                          "the final result [65,65], both cast to f32."),
])


def main() -> None:
    fu.configure_torch()
    fu.seed_everything(0)
    labels = emv.LABELS_PATH.read_text(encoding="utf-8").splitlines()
    assert len(labels) == 1000

    mcases, files, mnv2_info = make_mobilenet_cases(labels)
    vcases, vfiles = make_vit_case()
    files.update(vfiles)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*.safetensors"):
        if old.name not in files:
            old.unlink()
    for name, tensors in files.items():
        fu.save_tensors(OUT_DIR / name, tensors)

    doc = OrderedDict([
        ("generator", "models/make_explain_fixtures.py"),
        ("versions", OrderedDict([
            ("torch", torch.__version__), ("grad-cam", importlib.metadata.version("grad-cam")),
            ("numpy", np.__version__), ("onnx", onnx.__version__), ("onnxruntime", fu.ort.__version__),
            ("timm", importlib.metadata.version("timm")),
        ])),
        ("layout", "one safetensors file per case (model, target layer, input), all f32, batch dimension "
                   "dropped; inputs are referenced by path, not copied"),
        ("reference", "ONNX values from onnxruntime CPUExecutionProvider, graph optimizations disabled, 1 thread, "
                      "on an in-memory copy of the model with the tapped values added as graph outputs"),
        ("mobilenet_v2", mnv2_info),
        ("formulas", FORMULAS),
        ("cases", mcases + vcases),
    ])
    fu.write_json(OUT_DIR / "cases.json", doc)

    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    for p in sorted(OUT_DIR.iterdir()):
        print(f"  {fu.rel_path(p)}  {p.stat().st_size} bytes")
    print(f"total {total} bytes")
    assert total <= MAX_TOTAL_BYTES, total


if __name__ == "__main__":
    main()
