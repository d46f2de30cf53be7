"""Compares the x86-64 and aarch64 runs that cross/smoke-aarch64.sh leaves in DIR: top-1
classes of the demo reports (x86/demo.jsonl, arm/demo.jsonl) and every dumped output tensor
(x86-P.safetensors against arm-P.safetensors) within 1e-4. Needs only the standard library.
"""

import json
import struct
import sys
from pathlib import Path

TOL = 1e-4


def read_f32_tensors(path: Path) -> dict[str, list[float]]:
    """The F32 tensors of a safetensors file (8-byte header length, JSON header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = list(struct.unpack(f"<{(b - a) // 4}f", data[a:b]))
    return out


def main(tmp: Path) -> int:
    failures = []
    top1 = {}
    for side in ("x86", "arm"):
        lines = (tmp / side / "demo.jsonl").read_text().splitlines()
        top1[side] = [(r["source"], r["top"][0]["class"]) for r in map(json.loads, lines)]
    if top1["x86"] != top1["arm"]:
        failures.append(f"top-1 differs: x86 {top1['x86']} arm {top1['arm']}")
    print(f"demo top-1 (x86 = arm): {top1['x86']}")
    for x86 in sorted(tmp.glob("x86-*.safetensors")):
        arm = tmp / x86.name.replace("x86-", "arm-", 1)
        a, b = read_f32_tensors(x86), read_f32_tensors(arm)
        if a.keys() != b.keys():
            failures.append(f"{x86.name}: outputs {sorted(a)} vs {sorted(b)}")
            continue
        for name in a:
            worst = max((abs(p - q) for p, q in zip(a[name], b[name])), default=0.0)
            scale = max((abs(p) for p in a[name]), default=1.0) or 1.0
            print(f"{x86.name[4:-12]} {name}: max |x86 - arm| = {worst:.3g} (|x| ≤ {scale:.3g})")
            if len(a[name]) != len(b[name]) or worst > TOL * max(1.0, scale):
                failures.append(f"{x86.name} {name}: differs by {worst}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
