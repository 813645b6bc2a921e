#!/usr/bin/env bash
# install.sh: set up the appliance on this Linux box and start it. Safe to run again.
#
#   ./install.sh [--home DIR]                 install (or update) and start
#   ./install.sh --uninstall [--home DIR]     remove what install.sh added; keep the data
#   ./install.sh --uninstall --purge          ... and delete the data (store, queue, results) too
#
# As root the home is /var/lib/appliance; otherwise ~/.local/share/appliance and sudo is used
# where root is needed (packages, cgroups, the systemd unit).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOME_DIR=""
UNINSTALL=0
PURGE=0
NO_START=0
GROUP=appliance  # its members submit and read results without sudo

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 1; }
say() { printf '==> %s\n' "$*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --home) [ $# -ge 2 ] || die "--home needs a directory"; HOME_DIR=$2; shift 2 ;;
        --home=*) HOME_DIR=${1#--home=}; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        --no-start) NO_START=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done
[ "$PURGE" -eq 0 ] || [ "$UNINSTALL" -eq 1 ] || die "--purge goes with --uninstall"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
    : "${HOME_DIR:=/var/lib/appliance}"
    BIN_DIR=/usr/local/bin
else
    command -v sudo >/dev/null || die "not root and no sudo: run as root, or install sudo"
    SUDO="sudo"
    : "${HOME_DIR:=${XDG_DATA_HOME:-$HOME/.local/share}/appliance}"
    BIN_DIR=$HOME/.local/bin
fi
mkdir -p "$HOME_DIR" 2>/dev/null || $SUDO mkdir -p "$HOME_DIR"
HOME_DIR=$(cd "$HOME_DIR" && pwd)
VENV=$HOME_DIR/venv
LAUNCHER=$BIN_DIR/appliance
UNIT=/etc/systemd/system/appliance.service
systemd_is_init() { [ "$(ps -p 1 -o comm= 2>/dev/null)" = "systemd" ] && command -v systemctl >/dev/null; }

if [ "$UNINSTALL" -eq 1 ]; then
    if systemd_is_init && [ -f "$UNIT" ] && grep -q -- "--home $HOME_DIR " "$UNIT"; then
        say "stopping and removing the systemd unit"
        $SUDO systemctl disable --now appliance.service || true
        $SUDO rm -f "$UNIT"
        $SUDO systemctl daemon-reload
    fi
    if [ -x "$VENV/bin/appliance" ]; then
        say "stopping the appliance"
        $SUDO "$VENV/bin/appliance" --home "$HOME_DIR" down || true
    fi
    if [ -f "$LAUNCHER" ] && grep -q "$VENV" "$LAUNCHER"; then rm -f "$LAUNCHER"; fi
    $SUDO rm -rf "$VENV" "$HOME_DIR/run"
    if [ "$PURGE" -eq 1 ]; then
        say "purging $HOME_DIR (store data, queue, results, config, secrets)"
        $SUDO rm -rf "$HOME_DIR"
    else
        say "kept the data in $HOME_DIR (config, store, queue, results); --uninstall --purge deletes it"
    fi
    getent group "$GROUP" >/dev/null && say "kept the group '$GROUP' (\`groupdel $GROUP\` removes it)"
    exit 0
fi

# 1. Python with venv (Debian/Ubuntu split venv out of python3), one every user can run: members
#    run the launcher without sudo, so not an interpreter under /root (pyenv, conda). The system's
#    /usr/bin/python3 when there is one; PYTHON=/path/to/python3 ./install.sh picks another.
runs_for_everyone() {  # whether an unprivileged user (nobody) can run the interpreter "$1"
    [ "$(id -u)" -eq 0 ] && command -v runuser >/dev/null && getent passwd nobody >/dev/null || return 0
    (cd / && runuser -u nobody -- "$1" -c 'pass' </dev/null >/dev/null 2>&1)
}
PYTHON_GIVEN=${PYTHON:+1}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x /usr/bin/python3 ] && PYTHON=/usr/bin/python3
fi
command -v "$PYTHON" >/dev/null || { say "installing python3"; $SUDO apt-get update -qq; $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv; }
if ! runs_for_everyone "$PYTHON"; then
    [ -z "$PYTHON_GIVEN" ] || die "PYTHON=$PYTHON cannot be run by other users (it lives where only its owner may enter): members could not use the appliance; use an interpreter every user can run, e.g. PYTHON=/usr/bin/python3"
    say "$PYTHON cannot be run by other users: installing the system's python3"
    $SUDO apt-get update -qq; $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
    PYTHON=/usr/bin/python3
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$PYTHON is older than 3.9; install a newer python3"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    say "installing python3-venv"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

# 2. The virtualenv with the appliance and its dependencies
say "installing the appliance into $VENV"
# a venv whose interpreter is gone or that other users cannot run is made again (a re-run repairs it)
if [ -e "$VENV" ] && ! { "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 && runs_for_everyone "$VENV/bin/python"; }; then
    say "the virtualenv $VENV is broken or not usable by other users: making it again with $PYTHON"
    rm -rf "$VENV"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# pip builds in the tree it installs from (egg-info, build/): build from a copy, so the checkout
# stays its owner's (a later ./install.sh without sudo could not update root's egg-info)
BUILD_SRC=$(mktemp -d)
trap 'rm -rf "$BUILD_SRC"' EXIT
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$BUILD_SRC" -xf -
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$BUILD_SRC"
# runners run with -OO: their bytecode is compiled here too, as pip compiled the rest. Otherwise a
# runner started where .pyc files are not written (PYTHONDONTWRITEBYTECODE in the environment of
# `appliance up`, a read-only venv) compiles the package from source at every start: slower,
# and ~1.5 MB more of each slot's memory for good (measured)
PKG_DIR=$("$VENV/bin/python" -I -c 'import appliance, os; print(os.path.dirname(appliance.__file__))')  # -I: never a checkout in the cwd
"$VENV/bin/python" -I -m compileall -q -o 2 "$PKG_DIR" >/dev/null

# 3. A launcher on PATH that knows this home
mkdir -p "$BIN_DIR"
cat > "$LAUNCHER.tmp" <<EOF
#!/bin/sh
# installed by $SRC/install.sh
: "\${APPLIANCE_HOME:=$HOME_DIR}"
export APPLIANCE_HOME
exec "$VENV/bin/appliance" "\$@"
EOF
chmod 755 "$LAUNCHER.tmp" && mv "$LAUNCHER.tmp" "$LAUNCHER"
case ":$PATH:" in *":$BIN_DIR:"*) ;; *) say "add $BIN_DIR to your PATH to type \`appliance\`";; esac

# 4. The group whose members may use the queue (created before the home, which is handed to it)
if ! getent group "$GROUP" >/dev/null; then
    say "creating the system group '$GROUP' (its members submit without sudo)"
    $SUDO groupadd --system "$GROUP"
fi
ME=${SUDO_USER:-$(id -un)}
if [ "$ME" != root ] && ! id -nG "$ME" | tr ' ' '\n' | grep -qx "$GROUP"; then
    say "to submit without sudo, join the group: sudo usermod -aG $GROUP $ME (then log in again)"
fi

# 5. Home, commented config (never overwritten), credentials, rendered configs
say "preparing $HOME_DIR"
$SUDO "$VENV/bin/appliance" --home "$HOME_DIR" render

[ "$NO_START" -eq 0 ] || { say "installed; start with: $LAUNCHER up"; exit 0; }

# 6. Start: under systemd where it is PID 1, else in the background with `appliance up`
if systemd_is_init; then
    say "installing and starting the systemd unit"
    $SUDO "$VENV/bin/appliance" --home "$HOME_DIR" render --unit "$UNIT" >/dev/null
    $SUDO systemctl daemon-reload
    $SUDO systemctl enable --now appliance.service
    running=0
    for _ in $(seq 1 60); do
        $SUDO "$VENV/bin/appliance" --home "$HOME_DIR" status --json 2>/dev/null | grep -q '"running": true' && { running=1; break; }
        sleep 1
    done
    [ "$running" -eq 1 ] || die "appliance.service did not start: see \`sudo journalctl -u appliance\`"
    # The unit's `up --foreground` becomes supervisord, so it cannot wait for health, create the
    # buckets or write secrets/s3.env: `up` on the running appliance does that (and changes nothing).
    $SUDO "$VENV/bin/appliance" --home "$HOME_DIR" up
    $SUDO "$VENV/bin/appliance" --home "$HOME_DIR" status
else
    say "starting (no systemd as PID 1: \`appliance up\` runs it in the background)"
    $SUDO "$VENV/bin/appliance" --home "$HOME_DIR" up
fi
say "done: \`appliance status\` shows the slots; README.md shows how to submit an experiment"
