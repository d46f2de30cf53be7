#!/usr/bin/env bash
# Builds the deployable bundle for one target and writes
#   dist/edgeinfer-<version>-<target>.tar.gz
# with a single top folder edgeinfer-<version>-<target>/ holding bin/edgeinfer, boards/*.toml,
# models/mobilenet_v2.safetensors + models/README.md (licences), systemd/edgeinfer.service,
# systemd/edgeinfer.env, INSTALL.md, LICENSE* (when the repository has any), BUILD-INFO and
# MANIFEST.sha256 (the sha256 of every other file; `sha256sum -c MANIFEST.sha256`).
#
# Usage: cross/package.sh [TARGET]
#   TARGET: x86_64-unknown-linux-gnu (default, the host) or aarch64-unknown-linux-gnu
#   EDGEINFER_FEATURES=v4l2 cross/package.sh ...   builds with cargo features (comma-separated);
#   the bundle name then ends in +<features> (e.g. ...-x86_64-unknown-linux-gnu+v4l2.tar.gz), so
#   CPU and CUDA builds ship as separate tarballs. CARGO_TARGET_DIR is honoured, e.g. for the CUDA
#   build (cross/JETSON.md): source cross/cuda-env.sh;
#   EDGEINFER_FEATURES=cuda CARGO_TARGET_DIR=target/cuda cross/package.sh
#
# The binary is `cargo build --profile dist --locked --target TARGET` (cargo reuses it when
# nothing changed). The tarball is reproducible for a given binary: entries sorted, owner 0:0,
# every mtime the last commit's time (or SOURCE_DATE_EPOCH), gzip without a name or time stamp.
# Check a bundle with cross/check-bundle.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-x86_64-unknown-linux-gnu}
features=${EDGEINFER_FEATURES:-}
case "$target" in
    x86_64-unknown-linux-gnu | aarch64-unknown-linux-gnu) ;;
    *)
        echo "package.sh: unsupported target '$target' (x86_64-unknown-linux-gnu or aarch64-unknown-linux-gnu)" >&2
        exit 2
        ;;
esac

# The package version, as Cargo.toml gives it: `cargo pkgid` prints
# path+file:///…/main#edgeinfer@0.1.0 (older cargo: file:///…/main#0.1.0 or …#edgeinfer:0.1.0).
pkgid=$(cargo pkgid --offline 2>/dev/null || cargo pkgid)
version=${pkgid##*[#@:]}
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]]; then
    echo "package.sh: cannot read the version from cargo pkgid ('$pkgid')" >&2
    exit 1
fi

name="edgeinfer-$version-$target"
if [ -n "$features" ]; then
    name="$name+${features//,/+}"
fi

echo "== building $name"
if [ "$target" = aarch64-unknown-linux-gnu ]; then
    bash cross/setup-aarch64.sh
fi
cargo_args=(build --profile dist --locked --target "$target")
if [ -n "$features" ]; then
    cargo_args+=(--features "$features")
fi
start=$(date +%s)
cargo "${cargo_args[@]}"
build_s=$(($(date +%s) - start))
bin="${CARGO_TARGET_DIR:-target}/$target/dist/edgeinfer"
[ -x "$bin" ] || {
    echo "package.sh: $bin was not built" >&2
    exit 1
}
echo "binary: $bin, $(stat -c %s "$bin") bytes (cargo: ${build_s} s)"

mkdir -p dist
stage=$(mktemp -d "dist/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root="$stage/$name"
mkdir -p "$root/bin" "$root/boards" "$root/models" "$root/systemd"

install -m 0755 "$bin" "$root/bin/edgeinfer"
install -m 0644 boards/*.toml "$root/boards/"
install -m 0644 models/mobilenet_v2.safetensors models/README.md "$root/models/"
install -m 0644 cross/edgeinfer.service cross/edgeinfer.env "$root/systemd/"
install -m 0644 cross/INSTALL.md "$root/INSTALL.md"
shopt -s nullglob
for f in LICENSE* COPYING*; do
    [ -f "$f" ] && install -m 0644 "$f" "$root/"
done
shopt -u nullglob

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=""
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    dirty=" (working tree had uncommitted changes)"
fi
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
{
    echo "name: edgeinfer"
    echo "version: $version"
    echo "target: $target"
    echo "features: ${features:-none (CPU)}"
    echo "profile: dist (release + thin LTO + stripped)"
    echo "commit: $commit$dirty"
    echo "rustc: $(rustc --version)"
    echo "built: $(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ) (commit time)"
} > "$root/BUILD-INFO"
chmod 0644 "$root/BUILD-INFO"

# Every file but the manifest itself, by relative path, in a fixed order.
(
    cd "$root"
    find . -type f -printf '%P\n' | LC_ALL=C sort | while IFS= read -r f; do
        sha256sum -- "$f"
    done > ../MANIFEST.sha256
)
mv "$stage/MANIFEST.sha256" "$root/MANIFEST.sha256"
chmod 0644 "$root/MANIFEST.sha256"
find "$root" -type d -exec chmod 0755 {} +

tarball="dist/$name.tar.gz"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$epoch" --format=gnu -cf - "$name" | gzip -n -9 > "$tarball.tmp"
mv -f "$tarball.tmp" "$tarball"

size=$(stat -c %s "$tarball")
echo "bundle: $tarball, $size bytes ($(numfmt --to=iec --suffix=B "$size" 2>/dev/null || echo "$size B"))"
echo "sha256: $(sha256sum "$tarball" | cut -d' ' -f1)"
