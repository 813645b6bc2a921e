#!/usr/bin/env bash
# tests/gpu/run.sh: the proof on a real GPU (docs/gpu.md). Run as root on the GPU box, no network
# needed, after tests/gpu/pack.sh filled tests/gpu/packed/ on a box with network:
#
#   tests/gpu/run.sh          install the appliance from the packed files into a temporary home,
#                             start it, check every GPU feature on the card, stop it
#
# Each check prints `ok`, `FAIL: why` or `n/a: why` with its figures, then one line
# `gpu proof: N ok, M n/a, K FAIL`. The JSON report (with NVML's own answers, for the fake) goes to
# $OUT/gpu-proof.json when OUT is set, else to a path it prints. Exit 1 on any FAIL. Without an
# NVIDIA driver it says so in one line and exits 0. PYTHON picks the box's python (python3).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PACKED=$HERE/packed
PY=${PYTHON:-python3}
FAKE_ENV=()
LIMIT_S=${GPU_PROOF_LIMIT_S:-330}  # the whole run, install and `down` included: under 6 minutes
START=$(date +%s)
die() { echo "run.sh: $*" >&2; exit 2; }

case "${1:-}" in -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

command -v "$PY" >/dev/null || die "no $PY on this box: set PYTHON to a python 3.9 or newer"
if [ -n "${GPU_PROOF_FAKE_NVML:-}" ]; then
    # a rehearsal on a box without a card (docs/gpu.md): NVML answers from tests/fake_nvml with
    # this JSON description, CUDA is absent, so the workload checks FAIL; the rest runs for real
    echo "run.sh: REHEARSAL with the fake NVML ($GPU_PROOF_FAKE_NVML): not a proof"
    FAKE_ENV=(APPLIANCE_FAKE_NVML="$GPU_PROOF_FAKE_NVML" PYTHONPATH="$REPO/tests/fake_nvml${PYTHONPATH:+:$PYTHONPATH}")
else
    "$PY" "$HERE/proof.py" --driver-check
    case $? in
        0) ;;
        3) exit 0 ;;  # no driver: proof.py printed the one line
        4) exit 1 ;;  # a driver whose NVML does not start: proof.py said so
        *) die "$PY could not run tests/gpu/proof.py --driver-check" ;;
    esac
fi
[ "$(id -u)" -eq 0 ] || die "run it as root: the appliance makes cgroups, slot accounts and mounts"
ls "$PACKED"/wheels/boto3-*.whl "$PACKED"/seaweedfs/weed.xz >/dev/null 2>&1 ||
    die "nothing packed in $PACKED: run tests/gpu/pack.sh on a box with network first, then copy the tree here"

T=$(mktemp -d /tmp/gpu-proof.XXXXXX)
chmod 755 "$T"
VENV=$T/venv
REPORT=${OUT:+$OUT/gpu-proof.json}
REPORT=${REPORT:-$T/gpu-proof.json}
[ -z "${OUT:-}" ] || mkdir -p "$OUT"
down() {
    [ -x "$VENV/bin/appliance" ] && [ -d "$T/home" ] &&
        timeout 90 "$VENV/bin/appliance" --home "$T/home" down --timeout 60 >/dev/null 2>&1
    return 0
}
trap down EXIT
trap 'down; exit 130' INT TERM
step() { printf 'run.sh: %s (%ss)\n' "$*" "$(($(date +%s) - START))"; }

step "installing the appliance into $VENV (no network)"
WHEEL_PIP=$(ls "$PACKED"/wheels/pip-*.whl 2>/dev/null | head -n1)
if timeout 60 "$PY" -m venv "$VENV" >/dev/null 2>&1 && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    PIP=("$VENV/bin/python" -m pip)
else  # no ensurepip on this python (Debian without python3-venv): pip runs from its wheel
    rm -rf "$VENV"
    timeout 60 "$PY" -m venv --without-pip "$VENV" || die "$PY -m venv failed: this python cannot make a virtualenv"
    [ -n "$WHEEL_PIP" ] || die "no pip wheel in $PACKED/wheels: run tests/gpu/pack.sh again"
    timeout 60 "$VENV/bin/python" "$WHEEL_PIP/pip" install -q --disable-pip-version-check --no-index "$WHEEL_PIP" ||
        die "installing pip into $VENV from $WHEEL_PIP failed"
    PIP=("$VENV/bin/python" -m pip)
fi
PIPQ=(--disable-pip-version-check --no-index --find-links "$PACKED/wheels" -q)
# by name, so pip picks the packed wheel that fits this python
mapfile -t WHEELS < <(ls "$PACKED"/wheels/*.whl | sed 's|.*/||; s|-.*||' | grep -vx -e pip -e setuptools | sort -u)
timeout 120 "${PIP[@]}" install "${PIPQ[@]}" "${WHEELS[@]}" || die "installing the packed wheels failed (see above)"
# pip builds in the tree it installs from: build from a copy, as install.sh does
mkdir -p "$T/src"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=./tests/gpu/packed -cf - . | tar -C "$T/src" -xf -
timeout 120 "${PIP[@]}" install "${PIPQ[@]}" --no-deps "$T/src" || die "installing the appliance from $REPO failed"
"$VENV/bin/python" - "$PACKED/seaweedfs/weed.xz" "$VENV/bin/weed" <<'PYEOF' || die "unpacking the store's binary failed"
import lzma, os, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PYEOF

# workloads run as the slots' unprivileged accounts: they must reach this interpreter
BOX_PY=$("$PY" -c 'import sys; print(sys.executable)')
if command -v runuser >/dev/null && id nobody >/dev/null 2>&1 &&
    ! timeout 30 runuser -u nobody -- "$BOX_PY" -c 'import sys' >/dev/null 2>&1; then
    echo "run.sh: warning: an unprivileged account cannot run $BOX_PY (a folder on its path is closed?):" \
        "the workloads will fail; set PYTHON to an interpreter every account can run"
fi
step "proving on the card (workloads run in $BOX_PY; report: $REPORT)"
DEADLINE=$((START + LIMIT_S))
LEFT=$((DEADLINE - $(date +%s) + 20))
env "${FAKE_ENV[@]}" timeout --kill-after=10 "$LEFT" "$VENV/bin/python" "$HERE/drive.py" --home "$T/home" --work "$T/work" \
    --python "$BOX_PY" --deadline "$DEADLINE" --report "$REPORT"
rc=$?
down
step "done, rc $rc"
echo "run.sh: report in $REPORT"
[ "$rc" -eq 0 ] || exit 1
