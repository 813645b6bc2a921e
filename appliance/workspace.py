"""Pack a directory as the StudioML client packs an experiment's workspace.

The client (`studio/storage/storage_util.py: tar_artifact`) writes an uncompressed tar whose
members are the directory's entries under their plain relative names (`train.py`,
`pkg/mod.py`: no leading `./`, no top folder), and stores it at
`blobstore/<sha256 of the tar file>.tar`. Runners unpack it into the experiment's workspace
folder and run `python <filename>` there.

Unlike the client we skip what is never part of an experiment (`.git`, `__pycache__`,
`.venv`), write members in sorted order with owner names cleared (so the same tree gives the
same hash, and no user names leak), and leave out what a runner would refuse anyway: sockets,
fifos, devices, and symlinks that lead outside the directory.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Optional

SKIP_NAMES = frozenset({".git", "__pycache__", ".venv"})


def workspace_key(sha256: str) -> str:
    return f"blobstore/{sha256}.tar"


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack_directory(path, out_dir=None,
                   on_skip: Optional[Callable[[str, str], None]] = None) -> tuple:
    """Tar `path` into a new file in `out_dir` (default: the temp dir).

    Returns `(tar_path, sha256)`; the caller removes the file. `on_skip(relpath, why)` hears
    about each entry left out for a reason other than SKIP_NAMES.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    skip = on_skip or (lambda rel, why: None)
    fd, tmp = tempfile.mkstemp(prefix="workspace-", suffix=".tar", dir=out_dir)
    os.close(fd)
    out = Path(tmp)
    try:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
            _add_tree(tf, root, root, skip, out)
        return out, _sha256(out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _add_tree(tf: tarfile.TarFile, root: Path, folder: Path, skip, out: Path) -> None:
    for name in sorted(os.listdir(folder)):
        if name in SKIP_NAMES:
            continue
        full = folder / name
        rel = full.relative_to(root).as_posix()
        if full == out:
            continue  # packing into the directory being packed
        if full.is_symlink():
            target = os.readlink(full)
            resolved = os.path.realpath(full)
            if os.path.isabs(target) or not (resolved == str(root) or
                                             resolved.startswith(str(root) + os.sep)):
                skip(rel, f"symlink leads outside the workspace ({target})")
                continue
            tf.add(full, arcname=rel, recursive=False, filter=_normalize)
        elif full.is_dir():
            tf.add(full, arcname=rel, recursive=False, filter=_normalize)
            _add_tree(tf, root, full, skip, out)
        elif full.is_file():
            tf.add(full, arcname=rel, recursive=False, filter=_normalize)
        else:
            skip(rel, "not a regular file, folder or symlink")
