"""Regenerate every model file and test fixture that the Rust tests use.

    /work/venv/bin/python models/make_fixtures.py            # everything
    /work/venv/bin/python models/make_fixtures.py resnet18_pruned vit_tiny   # some

Sections (names usable on the command line):
  mobilenet_v2     models/mobilenet_v2.onnx (+ .ops.json), models/imagenet_labels.txt,
                   models/samples/*.png, tests/fixtures/mobilenet_v2/   (see export_mobilenet_v2.py)
  resnet18_pruned  tests/fixtures/resnet18_pruned/  structurally pruned ResNet-18, irregular channel counts
  vit_tiny         tests/fixtures/vit_tiny/         small timm VisionTransformer (LayerNorm, MatMul, Softmax, Erf)
  squeezenet       tests/fixtures/squeezenet/       squeezenet1_1 (Concat, ceil-mode MaxPool)

Each random-weight fixture directory holds:
  model.onnx            the model (opset 17, static shapes, input "input", output "logits")
  input.safetensors     seeded standard-normal input, key = ONNX input name
  expected.safetensors  onnxruntime CPU outputs, keys = ONNX output names
  info.json             how it was built, sizes, channel counts, torch-vs-onnxruntime differences
  ops.json              op types, opset, attributes and input variants used by model.onnx

All weights are random (seeded), rounded to float16-representable values; no downloads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_utils as fu  # noqa: E402
import export_mobilenet_v2  # noqa: E402

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _write_fixture(name: str, model: torch.nn.Module, input_shape: tuple, input_seed: int,
                   info: OrderedDict, max_onnx_mb: float) -> OrderedDict:
    """Round weights to f16, export, check, run onnxruntime and torch, write the five files."""
    out_dir = fu.FIXTURES_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"

    model.eval()
    info["f16_rounded_torch_tensors"] = fu.round_module_to_f16(model)
    x = fu.seeded_normal(input_seed, input_shape)
    fu.export_onnx_legacy(model, torch.from_numpy(x), onnx_path, INPUT_NAME, OUTPUT_NAME)
    raw_out = fu.run_ort(onnx_path, {INPUT_NAME: x})
    f16_stats = fu.finalize_onnx(onnx_path, round_f16=True)
    size_mb = onnx_path.stat().st_size / 1e6
    if size_mb > max_onnx_mb:
        raise SystemExit(f"{onnx_path}: {size_mb:.2f} MB > {max_onnx_mb} MB")

    import onnx
    m = onnx.load(str(onnx_path))
    in_names = [i.name for i in m.graph.input]
    assert in_names == [INPUT_NAME], in_names
    outs = fu.run_ort(onnx_path, {INPUT_NAME: x})
    assert list(outs) == [OUTPUT_NAME], list(outs)
    fu.save_tensors(out_dir / "input.safetensors", {INPUT_NAME: x})
    fu.save_tensors(out_dir / "expected.safetensors", outs)

    with torch.no_grad():
        t_out = model(torch.from_numpy(x)).numpy()
    y = outs[OUTPUT_NAME]
    ops = fu.describe_ops(onnx_path)
    ops["notes"] = OrderedDict([
        ("exporter", f"torch.onnx.export(dynamo=False), torch {torch.__version__}, training=EVAL, "
                     "do_constant_folding=True, static shapes"),
        ("f16", "every float32 initializer (weight) is exactly representable in float16; Constant-node scalars are left untouched"),
    ])
    fu.write_json(out_dir / "ops.json", ops)

    info["onnx"] = OrderedDict([
        ("file", "model.onnx"),
        ("bytes", onnx_path.stat().st_size),
        ("sha256", _sha256(onnx_path)),
        ("opset", fu.OPSET),
        ("exporter", f"torch.onnx.export(dynamo=False) (TorchScript exporter), torch {torch.__version__}"),
        ("op_types", ops["op_types"]),
        ("batchnorm_folded_into_conv", "BatchNormalization" not in ops["op_types"]),
        ("f16_rounding_after_export", f16_stats),
    ])
    info["input"] = OrderedDict([
        ("file", "input.safetensors"), ("name", INPUT_NAME), ("shape", list(x.shape)), ("dtype", "float32"),
        ("generator", f"numpy.random.default_rng({input_seed}).standard_normal(shape, dtype=float32)"),
    ])
    info["expected"] = OrderedDict([
        ("file", "expected.safetensors"), ("name", OUTPUT_NAME), ("shape", list(y.shape)), ("dtype", "float32"),
        ("reference", f"onnxruntime {fu.ort.__version__} CPUExecutionProvider, graph optimizations "
                      "disabled, 1 thread"),
        ("min", float(y.min())), ("max", float(y.max())), ("mean", float(y.mean())), ("std", float(y.std())),
        ("argmax", int(np.argmax(y))),
        ("torch_argmax", int(np.argmax(t_out))),
        ("max_abs_diff_torch_vs_ort", float(np.max(np.abs(t_out - y)))),
        ("max_abs_diff_torch_vs_ort_before_f16_rounding_of_exported_weights",
         float(np.max(np.abs(t_out - raw_out[OUTPUT_NAME])))),
    ])
    fu.write_json(out_dir / "info.json", info)
    print(f"{name}: {size_mb:.2f} MB, ops={ops['op_types']}, "
          f"max|torch-ort|={info['expected']['max_abs_diff_torch_vs_ort']:.3g}")
    return info


def _calibrate_bn(model: torch.nn.Module, seed: int, passes: int, batch: int, shape: tuple) -> None:
    """Collect BatchNorm running statistics from seeded random batches (train mode, no grad)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all passes: order-independent, exact mean
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn((batch,) + tuple(shape), generator=gen))
    model.eval()


def make_resnet18_pruned() -> None:
    import torch_pruning as tp

    ratio = 0.61  # global L1: gives 0 of 20 conv widths divisible by 8, ONNX ~7 MB
    fu.seed_everything(0)
    model = torchvision.models.resnet18(num_classes=1000)  # random init from torch.manual_seed(0)
    params_before = _count_params(model)
    # torchvision starts BatchNorm at weight=1, bias=0; draw them so the affine part is exercised
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)       # U(0.5, 1.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)         # N(0, 0.1)
    _calibrate_bn(model, seed=1, passes=20, batch=4, shape=(3, 224, 224))

    example = torch.zeros(1, 3, 224, 224)
    importance = tp.importance.MagnitudeImportance(p=1)  # group L1 norm
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, pruning_ratio=ratio, global_pruning=True,
        max_pruning_ratio=0.9, ignored_layers=[model.fc], round_to=None,
    )
    pruner.step()
    # the remaining channels now see different inputs: refresh the BN statistics
    _calibrate_bn(model, seed=2, passes=20, batch=4, shape=(3, 224, 224))

    layers = OrderedDict()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            layers[n] = OrderedDict([("type", "Conv2d"), ("in_channels", m.in_channels),
                                     ("out_channels", m.out_channels), ("kernel", list(m.kernel_size)),
                                     ("stride", list(m.stride)), ("padding", list(m.padding))])
        elif isinstance(m, torch.nn.BatchNorm2d):
            layers[n] = OrderedDict([("type", "BatchNorm2d"), ("channels", m.num_features)])
        elif isinstance(m, torch.nn.Linear):
            layers[n] = OrderedDict([("type", "Linear"), ("in_features", m.in_features),
                                     ("out_features", m.out_features)])
    convs = [v["out_channels"] for v in layers.values() if v["type"] == "Conv2d"]
    info = OrderedDict([
        ("model", "torchvision.models.resnet18(num_classes=1000), random init after torch.manual_seed(0)"),
        ("batchnorm_affine", "weight ~ U(0.5,1.5), bias ~ N(0,0.1) from torch.Generator seed 3 "
                             "(drawn after init, before calibration and pruning)"),
        ("calibration", "BatchNorm running stats: reset, then 20 train-mode forward passes (no grad, "
                        "cumulative average) on torch.randn(4,3,224,224) from torch.Generator seed 1; "
                        "repeated after pruning with seed 2; then eval()"),
        ("pruning", OrderedDict([
            ("library", f"torch-pruning {importlib.metadata.version('torch-pruning')}"),
            ("pruner", "tp.pruner.MetaPruner (== MagnitudePruner)"),
            ("importance", "tp.importance.MagnitudeImportance(p=1) (group L1 norm, mean reduction)"),
            ("global_pruning", True), ("pruning_ratio", ratio), ("max_pruning_ratio", 0.9),
            ("ignored_layers", ["fc"]), ("round_to", None),
        ])),
        ("params_before_pruning", params_before),
        ("params_after_pruning", _count_params(model)),
        ("conv_out_channels", convs),
        ("conv_out_channels_multiple_of_8", int(sum(c % 8 == 0 for c in convs))),
        ("layers", layers),
    ])
    _write_fixture("resnet18_pruned", model, (1, 3, 224, 224), input_seed=100, info=info, max_onnx_mb=8.0)


def build_vit_tiny() -> tuple[torch.nn.Module, OrderedDict]:
    """The vit_tiny model (eval mode, weights not yet f16-rounded) and its info dict.

    Also used by make_explain_fixtures.py; `_write_fixture` rounds the weights to f16.
    """
    import timm
    from timm.layers import set_fused_attn
    from timm.models.vision_transformer import VisionTransformer

    cfg = OrderedDict([("img_size", 64), ("patch_size", 8), ("in_chans", 3), ("num_classes", 10),
                       ("embed_dim", 96), ("depth", 4), ("num_heads", 3), ("mlp_ratio", 4.0),
                       ("qkv_bias", True), ("global_pool", "token"), ("class_token", True)])
    set_fused_attn(False)  # explicit q@k^T*scale -> softmax -> @v instead of scaled_dot_product_attention
    fu.seed_everything(0)
    model = VisionTransformer(**cfg)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            assert not m.fused_attn
    # timm's init (weights std 0.02, zero biases, LayerNorm 1/0) gives near-uniform attention and
    # tiny logits; re-draw every tensor so softmax is peaked and every bias / LN affine matters
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("weight") and p.dim() >= 2:        # Linear / patch Conv
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5))
            elif "norm" in pname and pname.endswith("weight"):  # LayerNorm gamma
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:                                               # biases, LN beta, cls_token, pos_embed
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    info = OrderedDict([
        ("model", "timm.models.vision_transformer.VisionTransformer built after torch.manual_seed(0), "
                  "then every parameter re-drawn from torch.Generator seed 1: weights (dim>=2) "
                  "N(0, (1.5/sqrt(fan_in))^2), LayerNorm weight 1+N(0,0.2^2), everything else "
                  "(biases, LayerNorm bias, cls_token, pos_embed) N(0, 0.1^2)"),
        ("timm", timm.__version__),
        ("config", cfg),
        ("fused_attn", False),
        ("norm", "LayerNorm eps=1e-6, exported as LayerNormalization (opset 17)"),
        ("activation", "nn.GELU (exact, erf) - exported as Div/Erf/Add/Mul/Mul"),
        ("params", _count_params(model)),
        ("tokens", 1 + (64 // 8) ** 2),
    ])
    return model, info


def make_vit_tiny() -> None:
    model, info = build_vit_tiny()
    _write_fixture("vit_tiny", model, (1, 3, 64, 64), input_seed=200, info=info, max_onnx_mb=6.0)


def make_squeezenet() -> None:
    fu.seed_everything(0)
    model = torchvision.models.squeezenet1_1(num_classes=1000)
    # torchvision zero-initialises the conv biases; draw them so they matter
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
    model.eval()
    info = OrderedDict([
        ("model", "torchvision.models.squeezenet1_1(num_classes=1000), random init (torchvision's) "
                  "after torch.manual_seed(0); conv biases re-drawn N(0, 0.05^2) from torch.Generator "
                  "seed 1; no BatchNorm, nothing calibrated"),
        ("params", _count_params(model)),
        ("notes", "MaxPool2d(3, stride=2, ceil_mode=True) -> MaxPool ceil_mode=1; Fire modules -> Concat "
                  "on axis 1; Dropout removed in eval export; AdaptiveAvgPool2d(1) -> GlobalAveragePool"),
    ])
    _write_fixture("squeezenet", model, (1, 3, 224, 224), input_seed=300, info=info, max_onnx_mb=6.0)


SECTIONS = OrderedDict([
    ("mobilenet_v2", export_mobilenet_v2.main),
    ("resnet18_pruned", make_resnet18_pruned),
    ("vit_tiny", make_vit_tiny),
    ("squeezenet", make_squeezenet),
])


def main(argv: list[str]) -> None:
    fu.configure_torch()
    names = argv or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    for n in names:
        SECTIONS[n]()


if __name__ == "__main__":
    main(sys.argv[1:])
