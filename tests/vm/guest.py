"""A Debian 12 guest under qemu for the VM test: build (cached), boot, run commands over ssh.

The image comes from tests/vm/build-image.sh and is cached in /var/cache/appliance-vm/<hash of
that script>/; every boot writes to a throwaway qcow2 overlay, so the cached image stays clean.
KVM is not used (nested guests do not boot on the machines this runs on): qemu emulates (TCG).
sshd is reached through a user-mode network port forward bound to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("APPLIANCE_VM_CACHE", "/var/cache/appliance-vm"))
SSH_OPTS = ["-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=6"]
T0 = time.monotonic()
TRANSCRIPT = os.environ.get("APPLIANCE_VM_TRANSCRIPT")


def log(message: str) -> None:
    """One transcript line: seconds since the start, then the message (stdout and the file)."""
    line = f"[{time.monotonic() - T0:7.1f}s] {message}"
    print(line, flush=True)
    sys.stdout.flush()
    if TRANSCRIPT:
        with open(TRANSCRIPT, "a") as f:
            f.write(line + "\n")


def image_dir() -> Path:
    """The cached image for this build script, built first if missing."""
    script = HERE / "build-image.sh"
    key = hashlib.sha256(script.read_bytes()).hexdigest()[:16]
    out = CACHE / key
    if (out / "rootfs.img").exists() and (out / "vmlinuz").exists():
        log(f"image: cached {out}")
        return out
    log(f"image: building {out} (debootstrap of Debian 12; a few minutes)")
    start = time.monotonic()
    with open(CACHE.parent / f"appliance-vm-build-{key}.log", "w") if os.access(CACHE.parent, os.W_OK) \
            else tempfile.TemporaryFile("w") as out_log:
        result = subprocess.run([str(script), str(out)], stdout=out_log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"building the VM image failed (exit {result.returncode}); see "
                           f"{CACHE.parent}/appliance-vm-build-{key}.log")
    log(f"image: built in {time.monotonic() - start:.0f}s")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """One running qemu guest. Use as a context manager: the guest is powered off on exit."""

    def __init__(self, image: Path, workdir: Path, cpus: int = 2, memory_mib: int = 2048):
        self.image, self.workdir = image, workdir
        self.cpus, self.memory_mib = cpus, memory_mib
        self.port = free_port()
        self.key = workdir / "id_ed25519"
        self.serial = workdir / "serial.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Guest":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        disk = self.workdir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image / "rootfs.img"), "-F", "raw",
                        str(disk)], check=True)
        self.key.write_bytes((self.image / "id_ed25519").read_bytes())
        self.key.chmod(0o600)
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-smp", str(self.cpus), "-m", str(self.memory_mib),
                "-nographic", "-no-user-config", "-nodefaults", "-monitor", "none",
                "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", "root=/dev/vda rw console=ttyS0",
                "-drive", f"file={disk},if=virtio,format=qcow2",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device", "virtio-net-pci,netdev=n0",
                "-serial", f"file:{self.serial}"]
        log(f"boot: qemu TCG, {self.cpus} vCPUs, {self.memory_mib} MiB, ssh on 127.0.0.1:{self.port}")
        start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "qemu.err", "w"))
        self.wait_ssh(timeout=300)
        log(f"boot: ssh answers after {time.monotonic() - start:.0f}s; "
            f"{self.run('uname -r; ps -p1 -o comm=; stat -fc %T /sys/fs/cgroup').stdout.split()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.run("systemctl poweroff", check=False, timeout=30)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log("guest powered off")

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited ({self.proc.returncode}); see {self.workdir}/qemu.err and serial.log")
            if self.run("systemctl is-system-running --wait >/dev/null; true", check=False, timeout=120,
                        quiet=True).returncode == 0:
                return
            time.sleep(2)
        raise RuntimeError(f"the guest did not answer ssh within {timeout:.0f}s; see {self.serial}")

    def run(self, command: str, user: str = "root", check: bool = True, timeout: float = 600,
            input: bytes | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
        """Run a shell command in the guest as `user` (a login shell: PATH, groups as a user has them)."""
        argv = ["ssh", *SSH_OPTS, "-i", str(self.key), "-p", str(self.port), f"{user}@127.0.0.1",
                "bash -lc " + shlex.quote(command)]
        try:
            result = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"timed out after {timeout}s in the guest: {command}") from e
        out = subprocess.CompletedProcess(argv, result.returncode, result.stdout.decode(errors="replace"),
                                          result.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise AssertionError(f"in the guest as {user}: `{command}` exited {out.returncode}\n"
                                 f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}")
        return out

    def reboot(self) -> None:
        """Reboot the guest (qemu keeps running) and wait until systemd is up again."""
        boot_id = self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        self.run("systemctl reboot", check=False, timeout=30)
        start = time.monotonic()
        deadline = start + 300
        while time.monotonic() < deadline:
            time.sleep(3)
            try:
                self.wait_ssh(timeout=30)
            except RuntimeError:
                continue
            now = self.run("cat /proc/sys/kernel/random/boot_id", check=False).stdout.strip()
            if now and now != boot_id:
                log(f"reboot: back after {time.monotonic() - start:.0f}s")
                return
        raise RuntimeError("the guest did not come back from the reboot")

    def copy_in(self, files: list[Path], base: Path, dest: str, user: str = "root") -> None:
        """tar the files (relative to base) into dest in the guest."""
        tar = subprocess.run(["tar", "-C", str(base), "-cf", "-", *[str(f) for f in files]],
                             capture_output=True, check=True).stdout
        self.run(f"mkdir -p {shlex.quote(dest)} && tar -C {shlex.quote(dest)} -xf -", user=user, input=tar)


def source_files() -> list[Path]:
    """The project as a developer has it: tracked and new files, not ignored ones (.venv, ...)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return [Path(p) for p in out.splitlines() if (REPO / p).is_file()]


def build_wheelhouse(dest: Path) -> list[Path]:
    """The project's dependencies (and pip/setuptools to build it) as wheels, for the guest's pip."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(dest),
                    str(REPO), "setuptools>=77", "wheel", "pip"], check=True, capture_output=True)
    for wheel in dest.glob("appliance-*.whl"):
        wheel.unlink()  # install.sh installs the project from its source, as a user would
    return sorted(p.relative_to(dest) for p in dest.iterdir())
