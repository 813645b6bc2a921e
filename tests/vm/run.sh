#!/usr/bin/env bash
# run.sh: the VM test. Builds the Debian 12 guest image if needed (cached in /var/cache/appliance-vm),
# boots it under qemu (software emulation, 2 vCPUs, 2 GiB), installs the appliance there as the
# README says and checks the systemd + cgroup v2 promises; prints a transcript (also written to
# tests/vm/transcript.txt, or $APPLIANCE_VM_TRANSCRIPT). About 15-20 minutes. Run as root:
#
#   sudo tests/vm/run.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" -eq 0 ] || { echo "tests/vm/run.sh: run as root (debootstrap builds the image)" >&2; exit 2; }

missing=()
for pkg in qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# the guest's Python is Debian 12's 3.11: the host's pip builds the wheelhouse, so it must be 3.11 too
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "tests/vm/run.sh: $PYTHON is not Python 3.11 (the guest's); set PYTHON=python3.11" >&2; exit 2; }
"$PYTHON" -c 'import pytest' 2>/dev/null || "$PYTHON" -m pip install -q pytest

export APPLIANCE_VM_TEST=1
export APPLIANCE_VM_TRANSCRIPT=${APPLIANCE_VM_TRANSCRIPT:-$PWD/tests/vm/transcript.txt}
: > "$APPLIANCE_VM_TRANSCRIPT"
# --noconftest: the guest needs none of the suite's fixtures (nor their imports on this host)
exec "$PYTHON" -m pytest --noconftest -p no:cacheprovider -s -v tests/vm/test_vm.py "$@"
