"""Write Fashion-MNIST images as PNG files, one sub-folder per class (numpy + Pillow only).

    export_images.py --out DIR --split test|train --count N [--offset K] [--data-dir D]

Image i of the split (i = K .. K+N-1, in file order) goes to DIR/<label>/<i>.png, where <label>
is the class name below (the folder names are the labels of models/fashion_resnet.safetensors)
and <i> is the zero-padded index into the split. The PNGs are 28x28 8-bit grey ("L"), the
stored bytes unchanged. The data comes from the Debian package dataset-fashion-mnist
(Zalando SE, MIT licence), read straight from its idx .gz files.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

# Fashion-MNIST classes in index order (Zalando's names, made file-name safe).
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot")

_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip): big-endian magic 0x0000 <dtype 0x08 = ubyte> <ndim>, dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SystemExit(f"{path}: {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def load_split(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,28,28] and labels uint8 [N] of 'train' (60000) or 'test' (10000)."""
    p = _PREFIX[split]
    x = _read_idx(Path(data_dir) / f"{p}-images-idx3-ubyte.gz")
    y = _read_idx(Path(data_dir) / f"{p}-labels-idx1-ubyte.gz")
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
        raise SystemExit(f"{split}: unexpected shapes images {x.shape} labels {y.shape}")
    if y.max() >= len(CLASSES):
        raise SystemExit(f"{split}: label {y.max()} out of range")
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=("test", "train"), required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    a = ap.parse_args()

    from PIL import Image

    x, y = load_split(a.split, a.data_dir)
    if a.offset < 0 or a.count < 0 or a.offset + a.count > len(y):
        raise SystemExit(f"--offset {a.offset} --count {a.count}: the {a.split} split has {len(y)} images")
    width = len(str(len(y) - 1))
    counts = [0] * len(CLASSES)
    for c in CLASSES:
        (a.out / c).mkdir(parents=True, exist_ok=True)
    for i in range(a.offset, a.offset + a.count):
        label = int(y[i])
        Image.fromarray(np.ascontiguousarray(x[i])).save(a.out / CLASSES[label] / f"{i:0{width}d}.png")
        counts[label] += 1
    print(f"{a.count} {a.split} images ({a.offset}..{a.offset + a.count - 1}) -> {a.out}: "
          + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts)))


if __name__ == "__main__":
    main()
