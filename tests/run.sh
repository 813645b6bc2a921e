#!/usr/bin/env bash
# The test command (README): installs what the tests need on a fresh Debian/Ubuntu machine,
# starts dockerd if it is not running, then runs pytest. Run as root: tests make cgroups.
#   sudo tests/run.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/run.sh: run as root (sudo tests/run.sh): the tests create cgroups, mount /dev/shm and start dockerd" >&2
    exit 2
fi

step() { printf '\n== %s\n' "$*"; }

missing=()
for pkg in docker.io rabbitmq-server parallel python3-venv tmux prometheus; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # keep the package's own RabbitMQ service from starting: the tests start their own on 127.0.0.1
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

step "python environment (.venv)"
# Debian's own interpreter when there is one: workloads run as unprivileged slot accounts, which
# cannot execute an interpreter under a private folder such as /root/.pyenv
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x /usr/bin/python3 ] && PYTHON=/usr/bin/python3
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# bytecode for the runners' -OO too, as install.sh makes it (a runner never compiles from source)
.venv/bin/python -m compileall -q -o 0 -o 2 appliance >/dev/null

if ! docker info >/dev/null 2>&1; then
    step "starting dockerd"
    mkdir -p /var/log
    nohup dockerd --iptables=false --bridge=none >/var/log/appliance-test-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/appliance-test-dockerd.log" >&2; tail -20 /var/log/appliance-test-dockerd.log >&2; exit 1; }
fi

step "pytest"
# Workloads run as unprivileged slot accounts, so the homes the tests make must be reachable by
# them: a base folder of this checkout's own (pytest turns its shared /tmp/pytest-of-root back
# to 0700 whenever any session starts; tests/conftest.py opens what it makes to traversal).
BASETEMP=/tmp/appliance-tests-$(pwd | sha1sum | cut -c1-8)
exec .venv/bin/python -m pytest -q -p no:cacheprovider --basetemp "$BASETEMP" "$@"
