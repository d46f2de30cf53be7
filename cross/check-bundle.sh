#!/usr/bin/env bash
# Verifies a bundle made by cross/package.sh:
#   * the tarball has one top folder, named like the tarball, and no absolute or ../ paths;
#   * the expected files are there (bin/edgeinfer, boards/*.toml, the model and its licences,
#     the systemd unit and its environment file, INSTALL.md, BUILD-INFO, MANIFEST.sha256);
#   * `sha256sum -c MANIFEST.sha256` passes inside the folder and the manifest lists every file;
#   * the binary's ELF machine matches the bundle's target (readelf -h, else file);
#   * when the binary can run here (x86-64 on x86-64, aarch64 on aarch64 or under
#     `qemu-aarch64 -L /usr/aarch64-linux-gnu`): `--version` gives the bundle's version,
#     `bin/edgeinfer boards` lists every shipped board, and a 5-frame synthetic run on the shipped
#     model writes 5 JSON lines.
# Prints what the binary needs from the system (interpreter, libraries, newest glibc symbol); a
# binary whose libraries this machine lacks (a CUDA build without the NVIDIA driver) gets the
# static checks only, and says so.
# Exits non-zero with a message naming the first failure.
#
# Usage: cross/check-bundle.sh dist/edgeinfer-<version>-<target>.tar.gz
set -euo pipefail

fail() {
    echo "check-bundle: FAIL: $*" >&2
    exit 1
}
ok() { echo "  ok    $*"; }
info() { echo "  info  $*"; }

[ $# -eq 1 ] || {
    echo "usage: $0 TARBALL" >&2
    exit 2
}
tarball=$1
[ -f "$tarball" ] || fail "$tarball: no such file"
base=$(basename "$tarball")
case "$base" in
    edgeinfer-*.tar.gz) top=${base%.tar.gz} ;;
    *) fail "$base: expected a name edgeinfer-<version>-<target>.tar.gz" ;;
esac
echo "== $tarball"

# Layout of the archive, before unpacking anything.
listing=$(tar -tzf "$tarball") || fail "$tarball: not a readable .tar.gz"
tops=$(printf '%s\n' "$listing" | cut -d/ -f1 | sort -u)
[ "$tops" = "$top" ] || fail "expected one top folder '$top', found: $(echo "$tops" | paste -sd' ' -)"
if printf '%s\n' "$listing" | grep -Eq '^/|(^|/)\.\.(/|$)'; then
    fail "the archive has absolute or ../ paths"
fi
ok "one top folder $top/, $(printf '%s\n' "$listing" | grep -vc '/$') files"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$tarball" -C "$tmp"
root="$tmp/$top"

# Expected files.
for f in bin/edgeinfer models/mobilenet_v2.safetensors models/README.md \
    systemd/edgeinfer.service systemd/edgeinfer.env INSTALL.md BUILD-INFO MANIFEST.sha256; do
    [ -f "$root/$f" ] || fail "missing $f"
done
[ -x "$root/bin/edgeinfer" ] || fail "bin/edgeinfer is not executable"
shopt -s nullglob
board_files=("$root"/boards/*.toml)
licences=("$root"/LICENSE* "$root"/COPYING*)
shopt -u nullglob
[ ${#board_files[@]} -gt 0 ] || fail "no boards/*.toml"
grep -q '^## Licences' "$root/models/README.md" || fail "models/README.md has no '## Licences' section"
ok "expected files present (${#board_files[@]} board profiles, ${#licences[@]} LICENSE files)"

# Checksums: every listed file matches, and every file is listed.
(cd "$root" && sha256sum --check --strict --quiet MANIFEST.sha256) ||
    fail "sha256sum -c MANIFEST.sha256 failed"
unlisted=$(cd "$root" && comm -23 \
    <(find . -type f ! -name MANIFEST.sha256 -printf '%P\n' | LC_ALL=C sort) \
    <(sed 's/^[0-9a-f]\{64\} [ *]//' MANIFEST.sha256 | LC_ALL=C sort))
[ -z "$unlisted" ] || fail "files not in MANIFEST.sha256: $(echo "$unlisted" | paste -sd' ' -)"
ok "sha256sum -c MANIFEST.sha256 ($(wc -l < "$root/MANIFEST.sha256") files)"

# Target and version, from BUILD-INFO, against the folder name.
target=$(sed -n 's/^target: //p' "$root/BUILD-INFO")
version=$(sed -n 's/^version: //p' "$root/BUILD-INFO")
if [ -z "$target" ] || [ -z "$version" ]; then fail "BUILD-INFO has no target or version"; fi
case "$top" in
    "edgeinfer-$version-$target" | "edgeinfer-$version-$target+"*) ;;
    *) fail "folder $top does not match BUILD-INFO (version $version, target $target)" ;;
esac
ok "BUILD-INFO: version $version, target $target, features $(sed -n 's/^features: //p' "$root/BUILD-INFO")"

# ELF machine.
bin="$root/bin/edgeinfer"
case "$target" in
    x86_64-*) want_readelf="Advanced Micro Devices X86-64" want_file="x86-64" ;;
    aarch64-*) want_readelf="AArch64" want_file="ARM aarch64" ;;
    *) fail "unknown target $target" ;;
esac
if command -v readelf > /dev/null; then
    header=$(readelf -h "$bin" 2> /dev/null) || fail "bin/edgeinfer is not an ELF file"
    machine=$(sed -n 's/^ *Machine: *//p' <<< "$header")
    class=$(sed -n 's/^ *Class: *//p' <<< "$header")
    [ "$machine" = "$want_readelf" ] || fail "bin/edgeinfer is for '$machine', the target $target needs '$want_readelf'"
    [ "$class" = ELF64 ] || fail "bin/edgeinfer is $class, expected ELF64"
    ok "ELF64, machine $machine"
    interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd' ' -)
    glibc=$(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -Vu | tail -1 || true)
    info "interpreter ${interp:-none (static)}; needs: ${needed:-nothing}; newest symbol version: ${glibc:-none}"
elif command -v file > /dev/null; then
    desc=$(file -b "$bin")
    [[ "$desc" == *ELF\ 64-bit* && "$desc" == *"$want_file"* ]] ||
        fail "bin/edgeinfer is '$desc', the target $target needs an ELF 64-bit $want_file binary"
    ok "$desc"
else
    fail "neither readelf (binutils) nor file is installed: cannot check the ELF machine"
fi

# Can it run here?
run=()
host=$(uname -m)
case "$target" in
    x86_64-*) [ "$host" = x86_64 ] && run=("$bin") ;;
    aarch64-*)
        if [ "$host" = aarch64 ]; then
            run=("$bin")
        elif command -v qemu-aarch64 > /dev/null && [ -d /usr/aarch64-linux-gnu ]; then
            run=(qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin")
        fi
        ;;
esac
if [ ${#run[@]} -eq 0 ]; then
    echo "  skip  running bin/edgeinfer: a $target binary cannot run on this $host host" \
        "(for aarch64 install qemu-user and the aarch64 libc: bash cross/setup-aarch64.sh)"
    echo "check-bundle: PASS (static checks only) $tarball"
    exit 0
fi
if [ "${run[0]}" = "$bin" ] && command -v ldd > /dev/null; then
    # A CUDA build needs libcuda.so.1 and the CUDA libraries: without them it cannot start here.
    missing=$(ldd "$bin" 2> /dev/null | awk '/not found/ { print $1 }' | paste -sd' ' -)
    if [ -n "$missing" ]; then
        echo "  skip  running bin/edgeinfer: this machine lacks the libraries it needs: $missing"
        echo "check-bundle: PASS (static checks only) $tarball"
        exit 0
    fi
fi
[ "${run[0]}" = "$bin" ] || info "running under ${run[*]:0:3}"

out=$(cd "$root" && "${run[@]}" --version 2>&1) || fail "bin/edgeinfer --version failed: $out"
[ "$out" = "edgeinfer $version" ] || fail "bin/edgeinfer --version says '$out', the bundle is $version"
ok "--version: $out"

boards=$(cd "$root" && "${run[@]}" boards 2>&1) || fail "bin/edgeinfer boards failed: $boards"
listed=$(awk 'NR > 1 { print $1 }' <<< "$boards")
for f in "${board_files[@]}"; do
    b=$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "$f" | head -1)
    [ -n "$b" ] || fail "boards/$(basename "$f") has no name = \"...\""
    grep -qxF "$b" <<< "$listed" || fail "bin/edgeinfer boards does not list boards/$(basename "$f") ($b)"
done
ok "bin/edgeinfer boards lists all ${#board_files[@]} shipped boards"

jsonl="$tmp/frames.jsonl"
start=$(date +%s%N)
if ! log=$(cd "$root" && "${run[@]}" run --model models/mobilenet_v2.safetensors \
    --synthetic 224x224@30:5 --device cpu --quiet --jsonl "$jsonl" --summary "$tmp/summary.json" 2>&1); then
    echo "$log" >&2
    fail "bin/edgeinfer run --synthetic 224x224@30:5 failed"
fi
ms=$((($(date +%s%N) - start) / 1000000))
[ -f "$jsonl" ] || fail "the synthetic run wrote no $jsonl"
lines=$(wc -l < "$jsonl")
[ "$lines" -eq 5 ] || fail "the synthetic run wrote $lines JSON lines, expected 5"
for i in 0 1 2 3 4; do
    grep -q "^{\"frame\":$i," "$jsonl" || fail "no JSON line for frame $i in the synthetic run"
done
if command -v python3 > /dev/null; then
    python3 - "$jsonl" "$tmp/summary.json" << 'EOF' || fail "the synthetic run's JSON lines or summary do not parse"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    assert r["verdict"] in ("ok", "over_budget", "dropped", "error"), r["verdict"]
json.load(open(sys.argv[2]))
EOF
fi
verdicts=$(grep -o '"verdict":"[a-z_]*"' "$jsonl" | cut -d'"' -f4 | sort | uniq -c | awk '{ printf "%s%s %s", sep, $1, $2; sep = ", " }')
ok "synthetic 224x224@30:5 on the CPU: 5 JSON lines ($verdicts) in ${ms} ms"
echo "check-bundle: PASS $tarball"
