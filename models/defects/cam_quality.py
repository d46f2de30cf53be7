#!/usr/bin/env python3
"""Class Activation Mapping quality of the defect classifier against the exact pixel masks.

    cam_quality.py MODEL DATA_DIR [--json out.json] [--per-image]

MODEL is the ONNX export (models/defects/defect_cnn.onnx) or the PyTorch checkpoint written by
train_defect_cnn.py (defect_cnn.pt). DATA_DIR is a folder made by make_defects.py
(tests/fixtures/defects). The ONNX path needs only numpy, Pillow and onnxruntime.

For every defect image (scratch, spot, crack), with F the feature map fed to GlobalAveragePool
([C,h,w]) and W the weight of the final Linear/Gemm ([classes,C]):
  1. cam = sum_c W[k,c] * F[c] for the TRUE class k (the Linear bias is a constant and dropped);
  2. ReLU, then min-max normalise to [0,1] (an all-zero map stays zero);
  3. bilinear upsampling to the image size, half-pixel centres, edge-clamped (what
     torch.nn.functional.interpolate(mode="bilinear", align_corners=False) and cv2.INTER_LINEAR do);
  4. Otsu threshold from a 256-bin histogram on [0,1] (bin centres as candidate thresholds,
     foreground = cam > threshold, as skimage.filters.threshold_otsu); an all-zero map gives an
     empty foreground;
  5. against the mask: Dice = 2|A∩B|/(|A|+|B|), IoU = |A∩B|/|A∪B|, pointing game = the arg-max
     pixel (first in row-major order) lies inside the mask.
Held-out accuracy is over all images, `ok` included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ok", "scratch", "spot", "crack")
DEFECTS = CLASSES[1:]


# ----------------------------------------------------------------------------- metric pieces

def upsample_bilinear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[h,w] -> [out_h,out_w], align_corners=False (half-pixel), clamped at the borders."""
    h, w = a.shape

    def axis(n_in, n_out):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = src - i0
        return i0, i1, f

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    a = a.astype(np.float64)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bot = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bot * fy[:, None]).astype(np.float32)


def otsu_threshold(x: np.ndarray, nbins: int = 256) -> float:
    """Otsu on a histogram over [0,1] with nbins bins; returns the chosen bin centre."""
    hist, edges = np.histogram(x.ravel(), bins=nbins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = np.cumsum(hist * centers) / w1
        m2 = (np.cumsum((hist * centers)[::-1]) / w2[::-1])[::-1]
    var = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    var = np.nan_to_num(var, nan=-1.0)
    return float(centers[int(np.argmax(var))])


def cam_for(features: np.ndarray, weight: np.ndarray, k: int) -> np.ndarray:
    """features [C,h,w], weight [K,C] -> ReLU'd, min-max normalised CAM [h,w] for class k."""
    cam = np.tensordot(weight[k].astype(np.float64), features.astype(np.float64), axes=(0, 0))
    cam = np.maximum(cam, 0.0)
    lo, hi = cam.min(), cam.max()
    if hi > lo:
        cam = (cam - lo) / (hi - lo)
    else:
        cam = np.zeros_like(cam)
    return cam.astype(np.float32)


def score(cam_small: np.ndarray, mask: np.ndarray) -> dict:
    H, W = mask.shape
    cam = upsample_bilinear(cam_small, H, W)
    if cam.max() <= 0:
        pred = np.zeros_like(mask)
        thr = None
    else:
        thr = otsu_threshold(cam)
        pred = cam > thr
    inter = int(np.count_nonzero(pred & mask))
    a, b = int(np.count_nonzero(pred)), int(np.count_nonzero(mask))
    union = a + b - inter
    dice = 2 * inter / (a + b) if a + b else 1.0
    iou = inter / union if union else 1.0
    am = int(np.argmax(cam))
    pointing = bool(mask.ravel()[am]) if cam.max() > 0 else False
    return {"dice": dice, "iou": iou, "pointing": pointing, "threshold": thr,
            "pred_px": a, "mask_px": b}


# ----------------------------------------------------------------------------- data and models

def load_dir(d: Path):
    """[(class, name, uint8 HxWx3, bool mask or None)] in class order, then file name order."""
    items = []
    for ci, cls in enumerate(CLASSES):
        folder = d / "images" / cls
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.png")):
            rgb = np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8)
            mp = d / "masks" / cls / p.name
            mask = (np.asarray(Image.open(mp)) > 127) if cls != "ok" else None
            items.append((cls, p.name, rgb, mask))
    return items


def preprocess(rgb: np.ndarray, mean, std) -> np.ndarray:
    x = rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)[None].copy()


class OnnxCam:
    """Runs the ONNX graph with the GlobalAveragePool input added as an extra output."""

    def __init__(self, path: Path):
        import onnx
        import onnx.numpy_helper
        import onnxruntime as ort
        m = onnx.load(str(path))
        gap = [n for n in m.graph.node if n.op_type == "GlobalAveragePool"]
        gemm = [n for n in m.graph.node if n.op_type == "Gemm"]
        if len(gap) != 1 or len(gemm) != 1:
            raise SystemExit(f"{path}: expected one GlobalAveragePool and one Gemm")
        self.feature_name = gap[0].input[0]
        self.gemm_weight_name = gemm[0].input[1]
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        w = inits[self.gemm_weight_name]
        trans_b = next((a.i for a in gemm[0].attribute if a.name == "transB"), 0)
        self.weight = w if trans_b else w.T
        meta = {p.key: p.value for p in m.metadata_props}
        self.mean = json.loads(meta["edgeinfer_mean"]) if "edgeinfer_mean" in meta else None
        self.std = json.loads(meta["edgeinfer_std"]) if "edgeinfer_std" in meta else None
        m.graph.output.append(onnx.helper.make_tensor_value_info(self.feature_name, onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray):
        logits, feats = self.sess.run(["logits", self.feature_name], {"input": x})
        return logits[0], feats[0]


class TorchCam:
    def __init__(self, path: Path):
        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import train_defect_cnn as tdc
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
        self.model = tdc.build_model(**ck["arch"])
        self.model.load_state_dict(ck["state_dict"])
        self.model.eval()
        self.mean, self.std = ck["mean"], ck["std"]
        self.weight = self.model.fc.weight.detach().numpy()
        self.feature_name = "(torch) model.features output"
        self.gemm_weight_name = "(torch) model.fc.weight"
        self.torch = torch

    def __call__(self, x: np.ndarray):
        with self.torch.no_grad():
            f = self.model.features(self.torch.from_numpy(x))
            logits = self.model.fc(f.mean(dim=(2, 3)))
        return logits[0].numpy(), f[0].numpy()


def evaluate(runner, items, mean, std, per_image=False) -> dict:
    """Accuracy over all items and CAM metrics over the defect items."""
    rows = []
    correct = {c: [0, 0] for c in CLASSES}
    for cls, name, rgb, mask in items:
        logits, feats = runner(preprocess(rgb, mean, std))
        k = CLASSES.index(cls)
        pred = int(np.argmax(logits))
        correct[cls][0] += int(pred == k)
        correct[cls][1] += 1
        if mask is None:
            continue
        r = score(cam_for(feats, runner.weight, k), mask)
        r.update({"class": cls, "file": name, "pred": CLASSES[pred]})
        rows.append(r)
    return summarize(rows, correct, per_image)


def summarize(rows, correct, per_image=False) -> dict:
    out = {"accuracy": {}, "cam": {}}
    tot = [0, 0]
    for c, (ok, n) in correct.items():
        if n:
            out["accuracy"][c] = round(ok / n, 4)
            tot[0] += ok
            tot[1] += n
    out["accuracy"]["all"] = round(tot[0] / max(tot[1], 1), 4)
    out["accuracy"]["correct"] = tot[0]
    out["accuracy"]["images"] = tot[1]
    for c in list(DEFECTS) + ["all"]:
        rs = [r for r in rows if c == "all" or r["class"] == c]
        if not rs:
            continue
        out["cam"][c] = {
            "images": len(rs),
            "dice": round(float(np.mean([r["dice"] for r in rs])), 4),
            "iou": round(float(np.mean([r["iou"] for r in rs])), 4),
            "pointing": round(float(np.mean([r["pointing"] for r in rs])), 4),
        }
    if per_image:
        out["per_image"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="CAM quality against the defect masks")
    ap.add_argument("model", type=Path, help="defect_cnn.onnx or defect_cnn.pt")
    ap.add_argument("data", type=Path, help="a make_defects.py output folder")
    ap.add_argument("--mean", type=float, nargs=3, default=None, help="default: from the model (or 0.5)")
    ap.add_argument("--std", type=float, nargs=3, default=None, help="default: from the model (or 0.25)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--per-image", action="store_true")
    a = ap.parse_args()
    runner = OnnxCam(a.model) if a.model.suffix == ".onnx" else TorchCam(a.model)
    mean = a.mean or runner.mean or [0.5, 0.5, 0.5]
    std = a.std or runner.std or [0.25, 0.25, 0.25]
    res = evaluate(runner, load_dir(a.data), mean, std, a.per_image)
    res = {"model": str(a.model), "data": str(a.data), "feature_map": runner.feature_name,
           "gemm_weight": runner.gemm_weight_name, "mean": list(mean), "std": list(std), **res}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
