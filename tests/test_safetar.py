"""safe_extract against hostile tarballs built on the spot."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from appliance.studioml.safetar import UnsafeArchive, safe_extract

MB = 2**20


def member(name, type=tarfile.REGTYPE, data=b"", linkname="", mode=0o644, size=None):
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = linkname
    info.mode = mode
    info.size = len(data) if size is None else size
    info.mtime = 1_000_000_000
    return info, data


def build(path: Path, *members, fmt="w") -> Path:
    with tarfile.open(path, fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


@pytest.fixture
def box(tmp_path):
    """dest inside a box, with a file outside it that attacks aim at."""
    (tmp_path / "secret").write_text("keep me")
    return tmp_path


def test_extracts_a_normal_workspace(box):
    tar = build(box / "ok.tar",
                member("train.py", data=b"print(1)\n"),
                member("pkg", tarfile.DIRTYPE, mode=0o755),
                member("pkg/mod.py", data=b"x = 1\n"),
                member("./data/x.csv", data=b"a,b\n"),
                member("link_to_mod", tarfile.SYMTYPE, linkname="pkg/mod.py"),
                member("pkg/up", tarfile.SYMTYPE, linkname="../train.py"),
                member("hard", tarfile.LNKTYPE, linkname="train.py"),
                member("run.sh", data=b"#!/bin/sh\n", mode=0o4777))
    dest = box / "dest"
    written = safe_extract(tar, dest, max_bytes=MB)
    assert written == len(b"print(1)\n") + len(b"x = 1\n") + len(b"a,b\n") + len(b"#!/bin/sh\n")
    assert (dest / "train.py").read_text() == "print(1)\n"
    assert (dest / "data" / "x.csv").exists()
    assert (dest / "link_to_mod").read_text() == "x = 1\n"
    assert (dest / "pkg" / "up").read_text() == "print(1)\n"
    assert os.stat(dest / "hard").st_ino == os.stat(dest / "train.py").st_ino
    mode = stat.S_IMODE(os.stat(dest / "run.sh").st_mode)
    assert not mode & (stat.S_ISUID | stat.S_IWOTH | stat.S_IWGRP)
    assert mode & stat.S_IXUSR
    # mtimes kept, the folder's too although files were written into it after it
    assert os.stat(dest / "pkg").st_mtime == os.stat(dest / "train.py").st_mtime == 1_000_000_000


def test_accepts_a_stream(box):
    tar = build(box / "ok.tar.gz", member("a.txt", data=b"hello"), fmt="w:gz")

    class OneWay(io.RawIOBase):  # no seek, like an S3 body
        def __init__(self, data):
            self.buf = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.buf.read(len(b))
            b[:len(chunk)] = chunk
            return len(chunk)

    safe_extract(OneWay(tar.read_bytes()), box / "dest", max_bytes=MB)
    assert (box / "dest" / "a.txt").read_text() == "hello"


def test_dot_root_entry_is_fine(box):
    tar = build(box / "t.tar", member(".", tarfile.DIRTYPE, mode=0o755),
                member("./a", data=b"1"))
    safe_extract(tar, box / "dest", max_bytes=MB)
    assert (box / "dest" / "a").read_text() == "1"


@pytest.mark.parametrize("members, culprit, why", [
    ([member("/etc/evil", data=b"x")], "/etc/evil", "absolute"),
    ([member("../secret", data=b"x")], "../secret", "'..'"),
    ([member("a/../../secret", data=b"x")], "a/../../secret", "'..'"),
    ([member("evil", tarfile.SYMTYPE, linkname="/etc/passwd")], "evil", "absolute"),
    ([member("evil", tarfile.SYMTYPE, linkname="../secret")], "evil", "outside"),
    ([member("d", tarfile.DIRTYPE, mode=0o755),
      member("d/evil", tarfile.SYMTYPE, linkname="../../secret")], "d/evil", "outside"),
    ([member("evil", tarfile.LNKTYPE, linkname="../secret")], "evil", "'..'"),
    ([member("evil", tarfile.LNKTYPE, linkname="/etc/passwd")], "evil", "absolute"),
    ([member("evil", tarfile.LNKTYPE, linkname="nothing")], "evil", "missing"),
    ([member("null", tarfile.CHRTYPE)], "null", "character device"),
    ([member("sda", tarfile.BLKTYPE)], "sda", "block device"),
    ([member("pipe", tarfile.FIFOTYPE)], "pipe", "fifo"),
    ([member("big", data=b"x" * 700), member("big2", data=b"x" * 400)], "big2", "more than"),
    ([member("n" * 300, data=b"x")], "n" * 300, "longer than the filesystem allows"),
    ([member("d/" + "n" * 300, tarfile.DIRTYPE)], "d/" + "n" * 300, "longer than the filesystem allows"),
    ([member("l", tarfile.SYMTYPE, linkname="t" * 5000)], "l", "longer than the filesystem allows"),
])
def test_rejects(box, members, culprit, why):
    tar = build(box / "bad.tar", *members)
    with pytest.raises(UnsafeArchive) as e:
        safe_extract(tar, box / "dest", max_bytes=1000)
    assert e.value.member.startswith(culprit)
    assert repr(culprit) in str(e.value) and why in str(e.value)
    assert (box / "secret").read_text() == "keep me"


def test_symlink_planted_then_written_through(box):
    """Classic two-step: a link to the parent folder (allowed as such would be outside), then
    a file through it. The link itself is refused."""
    tar = build(box / "bad.tar", member("up", tarfile.SYMTYPE, linkname=".."),
                member("up/secret", data=b"pwned"))
    with pytest.raises(UnsafeArchive, match="'up'"):
        safe_extract(tar, box / "dest", max_bytes=MB)
    assert (box / "secret").read_text() == "keep me"


def test_write_through_existing_link_in_dest(box):
    """A link already in dest (a cached older unpack, another artifact) is not a way out."""
    dest = box / "dest"
    dest.mkdir()
    os.symlink(box, dest / "out")
    os.symlink(box / "secret", dest / "s")
    tar = build(box / "bad.tar", member("out/secret", data=b"pwned"))
    with pytest.raises(UnsafeArchive, match="outside"):
        safe_extract(tar, dest, max_bytes=MB)
    # a regular file over an existing link replaces the link, it does not write through it
    tar = build(box / "ok.tar", member("s", data=b"new"))
    safe_extract(tar, dest, max_bytes=MB)
    assert (box / "secret").read_text() == "keep me"
    assert (dest / "s").read_text() == "new" and not (dest / "s").is_symlink()


def test_link_chain_cannot_escape(box):
    """Inner links are fine one by one; a later link re-pointing a component outside is not."""
    tar = build(box / "bad.tar",
                member("a", tarfile.SYMTYPE, linkname="b/c"),
                member("b", tarfile.SYMTYPE, linkname=".."),
                member("a2", data=b"x"))
    with pytest.raises(UnsafeArchive, match="'b'"):
        safe_extract(tar, box / "dest", max_bytes=MB)


def test_hard_link_through_symlink_to_outside(box):
    dest = box / "dest"
    dest.mkdir()
    os.symlink(box, dest / "out")
    tar = build(box / "bad.tar", member("h", tarfile.LNKTYPE, linkname="out/secret"))
    with pytest.raises(UnsafeArchive, match="outside"):
        safe_extract(tar, dest, max_bytes=MB)


def test_size_counts_declared_sizes_before_writing(box):
    tar = build(box / "big.tar", member("big", data=b"x" * 5000))
    with pytest.raises(UnsafeArchive, match="more than 4096 bytes"):
        safe_extract(tar, box / "dest", max_bytes=4096)
    assert not (box / "dest" / "big").exists()


def test_too_many_members(box):
    tar = build(box / "many.tar", *[member(f"f{i}", data=b"") for i in range(20)])
    with pytest.raises(UnsafeArchive, match="more than 10 members"):
        safe_extract(tar, box / "dest", max_bytes=MB, max_members=10)


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 100])
def test_garbage(box, data):
    (box / "junk.tar").write_bytes(data)
    with pytest.raises(UnsafeArchive, match="not a readable tar"):
        safe_extract(box / "junk.tar", box / "dest", max_bytes=MB)


def test_truncated(box):
    tar = build(box / "t.tar", member("a", data=b"x" * 5000))
    (box / "cut.tar").write_bytes(tar.read_bytes()[:1500])
    with pytest.raises(UnsafeArchive, match="not a readable tar"):
        safe_extract(box / "cut.tar", box / "dest", max_bytes=MB)


def test_file_replacing_directory(box):
    tar = build(box / "t.tar", member("d", tarfile.DIRTYPE, mode=0o755),
                member("d", data=b"x"))
    with pytest.raises(UnsafeArchive, match="replaces a directory"):
        safe_extract(tar, box / "dest", max_bytes=MB)


def test_long_path_symlink_trick(box):
    """CVE-2025-4517 (the shape of CPython's test_realpath_limit_attack): links and folders whose
    expansion passes PATH_MAX, so realpath() gives up while the kernel still follows them; then
    a link climbing out through that chain, and writes through it (the old extractor replaced
    `secret` and made `newfile` beside dest)."""
    dest = box / "dest"
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(box, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members.append(member(os.path.join(path, component), tarfile.DIRTYPE, mode=0o777))
        members.append(member(os.path.join(path, step), tarfile.SYMTYPE, linkname=component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members += [member(linkpath, tarfile.SYMTYPE, linkname=os.path.join(*[".."] * len(steps))),
                member("escape", tarfile.SYMTYPE, linkname=os.path.join(linkpath, "..")),
                member("escape/secret", data=b"pwned"),
                member("escape/newfile", data=b"new")]
    tar = build(box / "bad.tar", *members, fmt="w:gz")
    with pytest.raises(UnsafeArchive, match="symlink") as e:
        safe_extract(tar, dest, max_bytes=MB)
    assert e.value.member == linkpath
    assert (box / "secret").read_text() == "keep me"
    assert sorted(p.name for p in box.iterdir()) == ["bad.tar", "dest", "secret"]


def test_member_through_a_symlink_member_is_refused(box):
    """Even a link that stays inside is not a path to write through: the later member is refused."""
    tar = build(box / "bad.tar", member("sub", tarfile.DIRTYPE, mode=0o755),
                member("l", tarfile.SYMTYPE, linkname="sub"),
                member("l/f", data=b"x"))
    with pytest.raises(UnsafeArchive, match="'l/f'.*folder 'l' is a symlink"):
        safe_extract(tar, box / "dest", max_bytes=MB)
    assert not (box / "dest" / "sub" / "f").exists()


def test_symlink_target_with_dotdot_after_a_name_is_refused(box):
    """`sub/s -> ../b/..` is dest itself while `b` is missing, but once `b -> .` arrives it is
    the folder above dest: a '..' after a name depends on what that name becomes later."""
    tar = build(box / "bad.tar", member("sub/s", tarfile.SYMTYPE, linkname="../b/.."),
                member("b", tarfile.SYMTYPE, linkname="."))
    with pytest.raises(UnsafeArchive, match="'sub/s'.*'..' after a name"):
        safe_extract(tar, box / "dest", max_bytes=MB)
    assert not os.path.lexists(box / "dest" / "sub" / "s")


@pytest.mark.parametrize("how", ["existing hard link in dest", "through a symlink member"])
def test_hard_link_to_a_file_outside_is_refused(box, how):
    """A hard link may only name a file this archive extracted: a name already in dest can be a
    hard link to a file outside (and `owner=` would then hand that file to the workload)."""
    dest = box / "dest"
    dest.mkdir()
    if how == "existing hard link in dest":
        os.link(box / "secret", dest / "old")
        members = [member("h", tarfile.LNKTYPE, linkname="old")]
        why = "not extracted by this archive"
    else:
        members = [member("sub/f", data=b"x"), member("l", tarfile.SYMTYPE, linkname="sub"),
                   member("h", tarfile.LNKTYPE, linkname="l/f")]
        why = "folder 'l' is a symlink"
    tar = build(box / "bad.tar", *members)
    with pytest.raises(UnsafeArchive, match=f"'h'.*{why}"):
        safe_extract(tar, dest, max_bytes=MB, owner=(65534, 65534))
    assert not os.path.lexists(dest / "h")
    assert (box / "secret").read_text() == "keep me" and (box / "secret").stat().st_uid == os.getuid()


def test_lying_size_header(box):
    """A negative size (GNU base-256 numbers can be negative) counted -1 against the limit while
    tarfile copied 16 KiB of the following headers into the file; refused, and the limit counts
    the bytes actually written too."""
    tar = build(box / "bad.tar", member("neg"), *[member(f"e{i}") for i in range(40)])
    raw = bytearray(tar.read_bytes())
    raw[124:136] = b"\xff" * 12  # the size field of the first header: -1
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    tar.write_bytes(raw)
    with pytest.raises(UnsafeArchive, match="'neg'.*negative size"):
        safe_extract(tar, box / "dest", max_bytes=1000)
    assert sum(p.stat().st_size for p in (box / "dest").iterdir()) <= 1000


def test_owner_is_given_to_everything_created(box):
    """A root runner hands the tree to the workload's uid (tests run as root)."""
    tar = build(box / "t.tar", member("d", tarfile.DIRTYPE, mode=0o755),
                member("d/f", data=b"x"), member("implied/g", data=b"y"),
                member("s", tarfile.SYMTYPE, linkname="d/f"), member("h", tarfile.LNKTYPE, linkname="d/f"))
    dest = box / "dest"
    safe_extract(tar, dest, max_bytes=MB, owner=(65534, 65534))
    for name in ("d", "d/f", "implied", "implied/g", "s", "h"):
        st = os.lstat(dest / name)
        assert (st.st_uid, st.st_gid) == (65534, 65534), name
    assert (box / "secret").stat().st_uid == 0
