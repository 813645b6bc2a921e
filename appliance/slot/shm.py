"""A private /dev/shm of a fixed size for the calling process and its children, and a fresh
one for every job.

Python 3.11 has no os.unshare and no mount(2) wrapper, so this goes through libc with ctypes.
The new tmpfs lives in a new mount namespace: the host's /dev/shm is untouched, and pages
written to it are charged to the writer's memory cgroup (the slot).

Nothing a job writes there may outlive it (another tenant's job is next): `fresh_shm`, which
the runner calls after every job, swaps the slot's tmpfs for a new, empty one of the same size
(process backend: the runner is root in its own mount namespace), or, where the runner may not
mount (a docker container, whose /dev/shm is the container's own), deletes everything in it.
"""

from __future__ import annotations

import errno
import os

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2
SIZE_ENV = "APPLIANCE_SLOT_SHM_BYTES"  # the slot's /dev/shm size, set by the exec wrapper and docker_slot
NS_ENV = "APPLIANCE_SLOT_SHM_NS"  # the mount namespace whose /dev/shm is the slot's (the exec wrapper's)
BACKEND_ENV = "APPLIANCE_ISOLATION"  # "docker" in a docker backend's slot container (docker_slot sets it)

FIX_PRIVILEGE = (
    "a private /dev/shm needs CAP_SYS_ADMIN: run as root (sudo ./install.sh); inside a "
    "container use the docker backend (shm_size) instead"
)


class ShmError(RuntimeError):
    """Setting up the private /dev/shm failed; the message names the step and the fix."""


def private_shm(size_bytes: int, path: str = "/dev/shm") -> None:
    """Give the calling process (and what it starts later) its own tmpfs of size_bytes at path.

    Steps: unshare(CLONE_NEWNS); make / recursively a slave so no mount made here propagates
    back to the host (host mounts still propagate in); mount tmpfs size=N,mode=1777 on path.
    The process must be single-threaded (unshare of the mount namespace requires it).
    """
    if not isinstance(size_bytes, int) or size_bytes <= 0:
        raise ValueError(f"/dev/shm size must be a positive number of bytes, not {size_bytes!r}")
    import ctypes  # only the exec wrapper needs it; keeps `import appliance.slot.shm` cheap

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, step: str) -> None:
        if result == 0:
            return
        code = ctypes.get_errno()
        cause = os.strerror(code)
        fix = FIX_PRIVILEGE if code in (1, 13) else f"check that {path} exists and is a directory"
        raise ShmError(f"cannot {step}: {cause}; fix: {fix}")

    check(libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount (rslave)")
    options = f"size={size_bytes},mode=1777".encode()
    check(
        libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
        f"mount a tmpfs of {size_bytes} bytes on {path}",
    )


def fresh_shm(environ=None, path: str = "/dev/shm") -> str:
    """Give the slot an empty /dev/shm of its full size again (call between jobs, when no
    process of the last job is left). Returns what it did: "mounted" (a new tmpfs replaced
    the old one, which goes when its last user does), "emptied" (in a container: everything
    in it deleted), or "" (no slot of ours: the host's /dev/shm is never touched).
    ShmError when it could not."""
    environ = os.environ if environ is None else environ
    text = environ.get(SIZE_ENV, "")
    if not text.isdigit() or int(text) <= 0:
        return ""
    if _in_slot_namespace(environ):
        _remount(int(text), path)
        return "mounted"
    if in_slot_container(environ):
        _empty(path)
        return "emptied"
    return ""


def is_the_slots(environ=None) -> bool:
    """Whether /dev/shm here is the slot's own (not the host's): what fresh_shm would renew."""
    environ = os.environ if environ is None else environ
    if not environ.get(SIZE_ENV, "").isdigit():
        return False
    return _in_slot_namespace(environ) or in_slot_container(environ)


def in_slot_container(environ=None) -> bool:
    """Whether we run in a docker backend's slot container (said by docker_slot, not guessed
    from /.dockerenv: a host may itself be a container)."""
    environ = os.environ if environ is None else environ
    return environ.get(BACKEND_ENV) == "docker"


def mount_namespace() -> str:
    """This process's mount namespace ("mnt:[4026532...]"); the exec wrapper puts it in NS_ENV."""
    return os.readlink("/proc/self/ns/mnt")


def _in_slot_namespace(environ) -> bool:
    """Whether we run in the mount namespace the exec wrapper made for the slot (never the
    host's, whose /dev/shm is not ours to replace)."""
    try:
        return bool(environ.get(NS_ENV)) and environ.get(NS_ENV) == mount_namespace()
    except OSError:
        return False


def _remount(size_bytes: int, path: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise ShmError(f"cannot unmount the last job's {path}: {os.strerror(code)}; fix: {FIX_PRIVILEGE}")
    options = f"size={size_bytes},mode=1777".encode()
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        code = ctypes.get_errno()
        raise ShmError(f"cannot mount a tmpfs of {size_bytes} bytes on {path}: {os.strerror(code)}; "
                       f"fix: {FIX_PRIVILEGE}")


def _empty(path: str) -> None:
    """Delete everything below path, following no link (a job may have planted any), with a
    few file descriptors and no recursion, however deep the job nested its folders: a folder
    that is not empty has its entries moved up into path, a level per pass, until it is."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise ShmError(f"cannot open {path}: {err.strerror}") from None
    try:
        moved = 0
        while True:
            with os.scandir(top) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            if not entries:
                return
            for name, is_dir in entries:
                try:
                    if not is_dir:
                        os.unlink(name, dir_fd=top)
                        continue
                    try:
                        os.rmdir(name, dir_fd=top)
                        continue
                    except OSError as err:
                        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                    try:
                        with os.scandir(inner) as it:
                            for child in [e.name for e in it]:
                                moved += 1
                                gone = f".gone-{moved}-{os.urandom(8).hex()}"  # no name a job could have planted
                                os.rename(child, gone, src_dir_fd=inner, dst_dir_fd=top)
                    finally:
                        os.close(inner)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise ShmError(f"cannot delete {os.path.join(path, name)}: {err.strerror}") from None
    finally:
        os.close(top)
