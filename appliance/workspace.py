"""Pack a directory as the StudioML client packs an experiment's workspace.

The client (`studio/storage/storage_util.py: tar_artifact`) writes an uncompressed tar whose
members are the directory's entries under their plain relative names (`train.py`,
`pkg/mod.py`: no leading `./`, no top folder), and stores it at
`blobstore/<sha256 of the tar file>.tar`. Runners unpack it into the experiment's workspace
folder and run `python <filename>` there.

Unlike the client we skip what is never part of an experiment (`.git`, `__pycache__`,
`.venv`), write members in sorted order with owner names cleared (so the same tree gives the
same hash, and no user names leak), leave out what `.applianceignore` and `.gitignore` files
say (appliance/ignore.py), and what a runner would refuse anyway: sockets, fifos, devices,
and symlinks that lead outside the directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from appliance import ignore
from appliance.ignore import IGNORE_FILES

SKIP_NAMES = frozenset({".git", "__pycache__", ".venv"})


def workspace_key(sha256: str) -> str:
    return f"blobstore/{sha256}.tar"


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@dataclass
class Entry:
    rel: str            # "pkg/model.py"
    path: Path
    kind: str           # "dir", "file" or "symlink"
    st: os.stat_result


def walk(path, on_skip: Optional[Callable[[str, str], None]] = None,
         gitignore: bool = True) -> list:
    """The entries a workspace holds, in the order they are packed: SKIP_NAMES and what the
    ignore files (appliance/ignore.py) leave out are not there; `on_skip(relpath, why)` hears
    about each entry left out for another reason."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    skip = on_skip or (lambda rel, why: None)
    names = IGNORE_FILES if gitignore else IGNORE_FILES[1:]
    out: list = []
    _walk(root, root, "", [], names, skip, out)
    return out


def _walk(root: Path, folder: Path, base: str, rules: list, names, skip, out: list) -> None:
    rules = list(rules)
    for name in names:
        try:
            rules += ignore.parse((folder / name).read_text(errors="replace"), base)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
    for name in sorted(os.listdir(folder)):
        if name in SKIP_NAMES:
            continue
        full = folder / name
        rel = f"{base}/{name}" if base else name
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            if ignore.ignored(rules, rel, False):
                continue
            target = os.readlink(full)
            resolved = os.path.realpath(full)
            if os.path.isabs(target) or not (resolved == str(root) or
                                             resolved.startswith(str(root) + os.sep)):
                skip(rel, f"symlink leads outside the workspace ({target})")
                continue
            out.append(Entry(rel, full, "symlink", st))
        elif stat.S_ISDIR(st.st_mode):
            if ignore.ignored(rules, rel, True):
                continue
            out.append(Entry(rel, full, "dir", st))
            _walk(root, full, rel, rules, names, skip, out)
        elif stat.S_ISREG(st.st_mode):
            if not ignore.ignored(rules, rel, False):
                out.append(Entry(rel, full, "file", st))
        elif not ignore.ignored(rules, rel, False):
            skip(rel, "not a regular file, folder or symlink")


def manifest_key(entries: list) -> str:
    """A hash of what the tar would be made of (names, kinds, sizes, mtimes, modes, link
    targets): the same key means the same tar, unless a file changed without its size or
    mtime changing (see `recently_changed`)."""
    h = hashlib.sha256()
    for e in entries:
        link = os.readlink(e.path) if e.kind == "symlink" else ""
        h.update(f"{e.rel}\0{e.kind}\0{e.st.st_size if e.kind == 'file' else 0}\0{e.st.st_mtime_ns}"
                 f"\0{e.st.st_mode}\0{link}\n".encode())
    return h.hexdigest()


def recently_changed(entries: list, now_ns: int, window_s: float = 2.0) -> bool:
    """Whether some entry changed in the last `window_s`: it could change again within the
    same mtime tick, so its size and mtime are no proof of its content."""
    return any(now_ns - e.st.st_mtime_ns < window_s * 1e9 for e in entries)


def total_bytes(entries: list) -> int:
    return sum(e.st.st_size for e in entries if e.kind == "file")


def pack_directory(path, out_dir=None,
                   on_skip: Optional[Callable[[str, str], None]] = None,
                   entries: Optional[list] = None,
                   progress: Optional[Callable[[int], None]] = None) -> tuple:
    """Tar `path` (or the `entries` walk() gave) into a new file in `out_dir` (default: the
    temp dir). `progress(n)` hears of each n bytes of file content packed.

    Returns `(tar_path, sha256)`; the caller removes the file. `on_skip(relpath, why)` hears
    about each entry left out for a reason other than SKIP_NAMES and the ignore files.
    """
    import tempfile  # (a small workspace is packed in memory: pack_bytes)

    if entries is None:
        entries = walk(path, on_skip)
    fd, tmp = tempfile.mkstemp(prefix="workspace-", suffix=".tar", dir=out_dir)
    os.close(fd)
    out = Path(tmp)
    try:
        with open(out, "wb") as raw:
            sha = _write_tar(raw, entries, progress, leave_out=out)
        return out, sha
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def pack_bytes(entries: list, progress: Optional[Callable[[int], None]] = None) -> tuple:
    """The same tar as pack_directory's, of the `entries` walk() gave, in memory: `(bytes,
    sha256)`. For a small workspace (no temporary file to write, read back and remove)."""
    raw = io.BytesIO()
    sha = _write_tar(raw, entries, progress)
    return raw.getvalue(), sha


def _write_tar(raw, entries: list, progress, leave_out: Optional[Path] = None) -> str:
    """Write the tar of `entries` to the binary file `raw`; its sha256 (hex)."""
    tell = progress or (lambda n: None)
    hashed = _Hashing(raw)  # the hash is taken as the tar is written: no second read
    with tarfile.open(fileobj=hashed, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            if e.path == leave_out:
                continue  # packing into the directory being packed
            info = _normalize(tf.gettarinfo(str(e.path), arcname=e.rel))
            if e.kind == "file":
                with open(e.path, "rb") as fh:
                    tf.addfile(info, _Counting(fh, tell))
            else:
                tf.addfile(info)
    return hashed.sha.hexdigest()


class _Hashing:
    """A file written by tarfile whose sha256 is kept as it is written."""

    def __init__(self, fh):
        self.fh, self.sha, self.pos = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.pos += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.pos


class _Counting:
    """A file read by tarfile that reports how much it has read."""

    def __init__(self, fh, tell):
        self.fh, self.tell = fh, tell

    def read(self, n=-1):
        data = self.fh.read(n)
        self.tell(len(data))
        return data
