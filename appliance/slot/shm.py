"""A private /dev/shm of a fixed size for the calling process and its children.

Python 3.11 has no os.unshare and no mount(2) wrapper, so this goes through libc with ctypes.
The new tmpfs lives in a new mount namespace: the host's /dev/shm is untouched, and pages
written to it are charged to the writer's memory cgroup (the slot).
"""

from __future__ import annotations

import os

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REC = 0x4000
MS_SLAVE = 0x80000

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
