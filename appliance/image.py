"""Build the runner image for the docker backend, locally, with no registry.

The image is a root filesystem made from this host: the Python interpreter that runs us (its
real prefix: executable, standard library, libpython), the venv's site-packages (the appliance
and its dependencies), a shell and basic tools, and every shared library those need (found with
`ldd`). It is written to a temporary tar file and handed to `docker import`.

Paths are kept as they are on the host (a pyenv Python stays under /root/.pyenv/...), because
interpreters and libraries find each other by absolute paths (RUNPATH, the ELF interpreter).
Inside the image a venv at /opt/appliance/venv ties the interpreter to the packages; it is first
on PATH, so `python -m appliance.runner` works there.

    python -m appliance.image [--tag appliance-runner:latest]
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from typing import Callable, Iterable

DEFAULT_TAG = "appliance-runner:latest"
VENV = "/opt/appliance/venv"
PY_VERSION = f"python{sys.version_info.major}.{sys.version_info.minor}"

# Host tools a workload may expect next to a shell. Missing ones are skipped.
TOOLS = [
    "sh", "bash", "env", "cat", "ls", "cp", "mv", "rm", "mkdir", "rmdir", "ln", "chmod", "chown",
    "echo", "printf", "true", "false", "test", "sleep", "head", "tail", "wc", "sort", "uniq",
    "cut", "tr", "tee", "touch", "date", "id", "whoami", "uname", "pwd", "basename", "dirname",
    "readlink", "realpath", "df", "du", "grep", "sed", "find", "xargs", "tar", "gzip", "nproc",
    "stat", "timeout", "kill", "ps",
]

# Parts of the standard library no runner needs (tests, GUI, the static libpython).
STDLIB_SKIP = {"test", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo"}

# Files never shipped: static libraries, and the Tk binding (it drags in X11).
SKIP_FILE = re.compile(r"\.a$|^_tkinter\.")

# Small /etc files that make user names, TLS and name lookups work.
ETC_FILES = ["/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/ssl/certs/ca-certificates.crt"]

IMAGE_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
}


class Rootfs:
    """A tar being filled with host paths, each written once, with uid/gid 0."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        self.seen: set[str] = set()
        self.shared_objects: list[str] = []  # host paths of shipped *.so files, for ldd
        self.bytes = 0

    def add(self, path: str) -> None:
        """Add host `path` at the same place, with every directory and symlink on the way to
        it; symlinks are kept and their targets added too."""
        parts = [p for p in os.path.abspath(path).split("/") if p]
        current = "/"
        for i, part in enumerate(parts):
            current = os.path.join(current, part)
            if os.path.islink(current):
                self.copy(current)
                target = os.path.join(os.path.dirname(current), os.readlink(current))
                self.add(os.path.join(os.path.normpath(target), *parts[i + 1:]))
                return
            self.copy(current)

    def add_tree(self, src: str, dest: str | None = None, skip: Iterable[str] = ()) -> None:
        """Copy host directory `src` recursively to `dest` (default: the same path). `skip`
        names top-level entries to leave out; SKIP_FILE files are left out everywhere."""
        if dest is None:
            self.add(src)
            src = dest = os.path.realpath(src)
        self.mkdirs(dest)
        for root, dirs, files in os.walk(src):
            if root == src:
                dirs[:] = [d for d in dirs if d not in skip]
                files = [f for f in files if f not in skip]
            dirs.sort()
            rel = os.path.relpath(root, src)
            target = dest if rel == "." else os.path.join(dest, rel)
            self.copy(root, target)
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            for name in sorted(files) + links:
                if not SKIP_FILE.search(name):
                    self.copy(os.path.join(root, name), os.path.join(target, name))

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        self._write(path, info, io.BytesIO(data))

    def add_symlink(self, path: str, target: str) -> None:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self._write(path, info)

    def mkdirs(self, path: str, mode: int = 0o755) -> None:
        """Directory entries for `path` and its parents that are not in the tar yet."""
        parent = os.path.dirname(path)
        if parent != path:
            self.mkdirs(parent)
        if path != "/" and path not in self.seen:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
            self._write(path, info)

    def copy(self, src: str, dest: str | None = None) -> None:
        """Copy one host file, directory entry or symlink (not followed) to `dest`."""
        dest = dest or src
        if dest in self.seen:
            return
        info = self.tar.gettarinfo(src, arcname=dest.lstrip("/"))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if info.isdir():
            info.mode |= 0o755  # /root is 0700 on the host, and a non-root runner needs a way in
        if info.isreg():
            if re.search(r"\.so(\.|$)", src):
                self.shared_objects.append(src)
            with open(src, "rb") as f:
                self._write(dest, info, f)
        else:
            self._write(dest, info)

    def _write(self, path: str, info: tarfile.TarInfo, fileobj=None) -> None:
        self.mkdirs(os.path.dirname(path))
        self.seen.add(path)
        self.tar.addfile(info, fileobj)
        self.bytes += info.size


def shared_libraries(binaries: list[str]) -> set[str]:
    """The shared libraries (and the ELF interpreter) `ldd` says these files need."""
    libs: set[str] = set()
    for i in range(0, len(binaries), 200):
        out = subprocess.run(["ldd", *binaries[i:i + 200]], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _python_parts() -> dict:
    """Where the running interpreter and its packages really live."""
    import appliance  # noqa: PLC0415  (the package we ship, wherever it is imported from)
    return {
        "executable": os.path.realpath(sys.executable),
        "stdlib": sysconfig.get_path("stdlib"),  # the base prefix's, also from inside a venv
        "site_packages": sysconfig.get_path("purelib"),
        "appliance": os.path.dirname(os.path.realpath(appliance.__file__)),
        # where ensurepip (and so `python -m venv`) finds pip, when not bundled in the stdlib
        "wheels": sysconfig.get_config_var("WHEEL_PKG_DIR"),
    }


def write_rootfs(tar_path: str, progress: Callable[[str], None] = print) -> int:
    """Write the runner root filesystem to `tar_path`; return its size in bytes."""
    py = _python_parts()
    site = py["site_packages"]
    venv_site = f"{VENV}/lib/{PY_VERSION}/site-packages"
    installed = py["appliance"].startswith(os.path.realpath(site) + os.sep)
    tools = [p for p in (shutil.which(t, path="/usr/bin:/bin") for t in TOOLS) if p]

    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        fs = Rootfs(tar)
        fs.mkdirs("/tmp", 0o1777)

        progress(f"image: python {py['executable']}, stdlib {py['stdlib']}")
        fs.add(py["executable"])
        fs.add_tree(py["stdlib"], skip=STDLIB_SKIP)
        fs.mkdirs(os.path.join(py["stdlib"], "site-packages"))
        if py["wheels"] and os.path.isdir(py["wheels"]):  # Debian keeps ensurepip's wheels here
            fs.add_tree(py["wheels"])
        progress(f"image: {fs.bytes / 1e6:.0f} MB so far")

        progress(f"image: venv {VENV} with the packages of {site}"
                 + ("" if installed else f" and appliance from {py['appliance']}"))
        fs.add_bytes(f"{VENV}/pyvenv.cfg", (
            f"home = {os.path.dirname(py['executable'])}\n"
            "include-system-site-packages = false\n"
            f"version = {'.'.join(map(str, sys.version_info[:3]))}\n").encode())
        for name in ("python", "python3", PY_VERSION):
            fs.add_symlink(f"{VENV}/bin/{name}", py["executable"])
        # An editable install of appliance points outside site-packages: ship the package itself.
        editable = () if installed else [n for n in os.listdir(site) if n == "appliance"
                                         or n.startswith("__editable__") and "appliance" in n]
        fs.add_tree(site, venv_site, skip=editable)
        if not installed:
            fs.add_tree(py["appliance"], f"{venv_site}/appliance", skip=["__pycache__"])
        progress(f"image: {fs.bytes / 1e6:.0f} MB so far")

        progress(f"image: /bin/sh and {len(tools)} host tools")
        for path in ["/bin/sh", *tools, *(e for e in ETC_FILES if os.path.exists(e))]:
            fs.add(path)

        libs = shared_libraries([py["executable"], *tools, *fs.shared_objects])
        libc = next((lib for lib in libs if os.path.basename(lib) == "libc.so.6"), None)
        if libc:  # glibc dlopens libgcc_s for thread cancellation; ldd cannot see that
            gcc_s = os.path.join(os.path.dirname(os.path.realpath(libc)), "libgcc_s.so.1")
            if os.path.exists(gcc_s):
                libs.add(gcc_s)
        progress(f"image: {len(libs)} shared libraries")
        for lib in sorted(libs):
            fs.add(lib)
        progress(f"image: rootfs {fs.bytes / 1e6:.0f} MB")
    return os.path.getsize(tar_path)


def build_image(tag: str = DEFAULT_TAG, progress: Callable[[str], None] = print,
                client=None) -> str:
    """Build (or rebuild) the runner image `tag` from this host; return the image id."""
    import docker  # noqa: PLC0415  (only the docker backend needs the SDK)

    client = client or docker.from_env()
    old = _image_id(client, tag)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="appliance-image-") as tmp:
        tar_path = os.path.join(tmp, "rootfs.tar")
        size = write_rootfs(tar_path, progress)
        progress(f"image: importing {size / 1e6:.0f} MB into dockerd as {tag}")
        repository, version = _split_tag(tag)
        changes = [f"ENV {k}={v}" for k, v in IMAGE_ENV.items()]
        changes += ['WORKDIR /', 'CMD ["python", "-m", "appliance.runner"]']
        out = client.api.import_image(src=tar_path, repository=repository, tag=version,
                                      changes=changes)
    image_id = _import_result(out)
    if old and old != image_id:  # the previous build, now untagged; keep it if still in use
        try:
            client.images.remove(old)
        except docker.errors.APIError:
            pass
    image = client.images.get(tag)
    progress(f"image: {tag} {image.short_id} ({image.attrs['Size'] / 1e6:.0f} MB) "
             f"built in {time.monotonic() - started:.1f} s")
    return image.id


def _split_tag(tag: str) -> tuple[str, str]:
    """"name:1.0" -> ("name", "1.0"); "host:5000/name" -> ("host:5000/name", "latest")."""
    name, _, version = tag.rpartition(":")
    if not name or "/" in version:
        return tag, "latest"
    return name, version


def _image_id(client, tag: str) -> str | None:
    import docker  # noqa: PLC0415
    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def _import_result(out: str) -> str:
    """The image id from dockerd's import answer (JSON lines ending in {"status": id})."""
    last = [line for line in str(out).splitlines() if line.strip()][-1]
    message = json.loads(last)
    if "error" in message:
        raise RuntimeError(f"docker import failed: {message['error']}")
    return message.get("status", "")


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m appliance.image",
                                     description="Build the runner image for the docker backend.")
    parser.add_argument("--tag", default=DEFAULT_TAG)
    args = parser.parse_args(argv)
    from appliance.slot.docker_slot import docker_problems  # noqa: PLC0415
    problems = docker_problems()
    if problems:
        for p in problems:
            print(f"appliance image: {p}", file=sys.stderr)
        return 2
    build_image(args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
