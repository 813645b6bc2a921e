"""The local directory queue, on real files, with real competing processes."""

from __future__ import annotations

import grp
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.queues.local import (CLAIMED, DEAD, LOCK_NAME, LocalQueueSource, LockTimeout,
                                    QueueWriteError, enqueue, share_queue_tree, soft_lock)
from tests.realparts import full_filesystem

Q = "local_test"


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "queue"


@pytest.fixture
def src(root):
    s = LocalQueueSource(root, runner_id="slot-1")
    yield s
    s.close()


def client_write(root: Path, queue: str, name: str, body: bytes, mtime: float | None = None):
    """What studioml's LocalQueue.enqueue does: take the soft lock, write in place, unlock."""
    folder = root / queue
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).touch()
    (folder / name).write_bytes(body)
    if mtime is not None:
        os.utime(folder / name, (mtime, mtime))
    (folder / LOCK_NAME).unlink()


def test_enqueue_claim_ack(src, root):
    msgid = src.enqueue(Q, b'{"x": 1}')
    assert src.queues() == [Q]
    assert src.depths() == {Q: 1}
    assert not (root / Q / LOCK_NAME).exists()
    msg = src.claim(Q)
    assert (msg.source, msg.queue, msg.message_id, msg.body) == ("local", Q, msgid, b'{"x": 1}')
    assert src.depths() == {Q: 0}
    assert src.claimed_counts() == {Q: 1}
    assert src.claim(Q) is None
    src.ack(msg)
    assert src.claimed_counts() == {Q: 0}
    assert list((root / Q).iterdir()) == []


def test_fifo_by_mtime_then_name(src, root):
    now = time.time()
    client_write(root, Q, "c", b"3", mtime=now - 30)
    client_write(root, Q, "a", b"2", mtime=now - 40)
    client_write(root, Q, "b", b"1", mtime=now - 50)
    client_write(root, Q, "e", b"5", mtime=now - 10)
    client_write(root, Q, "d", b"4", mtime=now - 10)
    assert [src.claim(Q).body for _ in range(5)] == [b"1", b"2", b"3", b"4", b"5"]


def test_a_deep_queue_stays_fifo_as_messages_come_between_claims(src, root):
    now = time.time()
    for i, name in enumerate("wxyz"):
        client_write(root, Q, name, name.encode(), mtime=now - 100 + i)
    assert src.claim(Q).body == b"w"  # the others are listed (and remembered) now
    client_write(root, Q, "older", b"older", mtime=now - 200)  # came later, written long ago
    client_write(root, Q, "newer", b"newer", mtime=now)
    assert [src.claim(Q).body for _ in range(5)] == [b"older", b"x", b"y", b"z", b"newer"]


def test_an_empty_message_still_being_written_is_claimed_once_written(src, root):
    (root / Q).mkdir(parents=True)
    (root / Q / "m").write_bytes(b"")  # a lock-less writer has created it, not written it
    assert src.claim(Q) is None
    (root / Q / "m").write_bytes(b'{"x": 1}')
    assert src.claim(Q).body == b'{"x": 1}'


def test_ignores_lock_temp_files_and_other_dirs(src, root):
    (root / Q).mkdir(parents=True)
    (root / Q / ".half-written.tmp").write_bytes(b"{")
    (root / "not_a_local_queue").mkdir()
    (root / "not_a_local_queue" / "m").write_text("{}")
    assert src.queues() == [Q]
    assert src.depths() == {Q: 0}
    assert src.claim(Q) is None


def test_lock_blocks_claim_until_released(src, root):
    client_write(root, Q, "m1", b"{}")
    (root / Q / LOCK_NAME).touch()
    assert src.locked(Q)
    assert src.claim(Q) is None
    assert src.depths() == {Q: 1}  # the lock file itself is no message
    (root / Q / LOCK_NAME).unlink()
    assert src.claim(Q).message_id == "m1"


def test_stale_lock_is_ignored(src, root):
    client_write(root, Q, "m1", b"{}")
    lock = root / Q / LOCK_NAME
    lock.touch()
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert not src.locked(Q)
    assert src.claim(Q).message_id == "m1"


def test_enqueue_breaks_stale_lock_but_waits_for_live_one(root):
    lock = root / Q / LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.touch()
    with pytest.raises(LockTimeout):
        with soft_lock(lock, timeout=0.05):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))
    with soft_lock(lock, timeout=0.05):
        assert lock.exists()
    assert not lock.exists()


def test_release_puts_it_back_in_place(src, root):
    now = time.time()
    client_write(root, Q, "first", b"1", mtime=now - 20)
    client_write(root, Q, "second", b"2", mtime=now - 10)
    msg = src.claim(Q)
    assert msg.message_id == "first"
    src.release(msg)
    assert src.depths() == {Q: 2}
    assert src.claim(Q).message_id == "first"


def test_dead_letter_keeps_reason(src, root):
    client_write(root, Q, "bad", b"not json")
    msg = src.claim(Q)
    src.dead_letter(msg, "message: not JSON")
    assert (root / DEAD / Q / "bad").read_bytes() == b"not json"
    assert (root / DEAD / Q / "bad.reason").read_text() == "message: not JSON\n"
    assert src.dead_counts() == {Q: 1}
    assert src.dead_letters() == [(Q, "bad", "message: not JSON")]
    assert src.depths() == {Q: 0} and src.claimed_counts() == {Q: 0}


def test_close_releases_unsettled(root):
    s = LocalQueueSource(root, runner_id="slot-1")
    s.enqueue(Q, b"{}")
    assert s.claim(Q) is not None
    s.close()
    assert LocalQueueSource(root).depths() == {Q: 1}


def test_reader_without_watch_creates_nothing(tmp_path):
    s = LocalQueueSource(tmp_path / "nowhere", watch=False)
    assert s.queues() == [] and s.depths() == {} and s.dead_counts() == {}
    assert s.wait(0) is False
    assert not (tmp_path / "nowhere").exists()


def test_bad_queue_name(src):
    for name in ("rmq_x", "../local", "local/x", "", "local\n", "local_q\n"):
        with pytest.raises(ValueError):
            src.claim(name)
        with pytest.raises(ValueError):
            src.enqueue(name, b"{}")


def _claim_and_exit(root: str) -> None:
    s = LocalQueueSource(Path(root), runner_id="doomed")
    assert s.claim(Q) is not None
    os._exit(0)  # dies holding the claim, no close()


def test_recover_orphan_of_dead_process(src, root):
    src.enqueue(Q, b"{}")
    p = multiprocessing.get_context("fork").Process(target=_claim_and_exit, args=(str(root),))
    p.start()
    p.join()
    assert src.depths() == {Q: 0} and src.claimed_counts() == {Q: 1}
    assert src.recover_orphans() == 1
    assert src.depths() == {Q: 1}
    assert src.claim(Q) is not None


def test_live_claims_are_not_recovered(src, root):
    src.enqueue(Q, b"{}")
    msg = src.claim(Q)
    assert LocalQueueSource(root, runner_id="other").recover_orphans() == 0
    assert src.claimed_counts() == {Q: 1}
    src.ack(msg)


def test_reused_pid_counts_as_dead(src, root):
    """Same pid, different start time: the pid was reused, the claim is orphaned."""
    src.enqueue(Q, b"{}")
    msg = src.claim(Q)
    runner, proc = msg.handle.name.split("@", 1)[1].rsplit("@", 1)
    pid, start, ns = proc.split(".")
    fake = msg.handle.with_name(f"{msg.message_id}@{runner}@{pid}.{int(start) + 1}.{ns}")
    os.rename(msg.handle, fake)
    assert src.recover_orphans() == 1


def test_foreign_namespace_uses_lease(root):
    """A runner in another pid namespace (container) cannot be checked by pid: use the lease."""
    s = LocalQueueSource(root, runner_id="host", lease_s=60)
    claimed = root / CLAIMED / Q
    claimed.mkdir(parents=True)
    fresh = claimed / "m1@slot-9@1.1234.4026531836999"
    old = claimed / "m2@slot-9@1.1234.4026531836999"
    fresh.write_text("{}")
    old.write_text("{}")
    t = time.time() - 600
    os.utime(old, (t, t))
    assert s.recover_orphans() == 1
    assert [p.name for p in (root / Q).iterdir()] == ["m2"]
    s.close()


def test_wait_times_out_without_messages(src):
    assert src.wait(0.05) is False


def test_wait_wakes_on_client_write(src, root):
    (root / Q).mkdir()
    t = threading.Timer(0.05, client_write, args=(root, Q, "m1", b"{}"))
    t.start()
    assert src.wait(30) is True
    t.join()
    assert src.claim(Q).message_id == "m1"


def test_wait_wakes_on_enqueue_to_new_queue(src, root):
    other = LocalQueueSource(root, runner_id="submitter")
    t = threading.Timer(0.05, other.enqueue, args=("local_new", b"{}"))
    t.start()
    assert src.wait(30) is True
    t.join()
    deadline = time.monotonic() + 30
    while src.depths().get("local_new") != 1 and time.monotonic() < deadline:
        src.wait(0.1)
    assert src.claim("local_new") is not None


def test_wait_wakes_when_lock_is_released(src, root):
    client_write(root, Q, "m1", b"{}")
    src.wait(0)  # drain the events of that write
    (root / Q / LOCK_NAME).touch()
    assert src.wait(0.05) is False  # creating the lock is no reason to wake
    assert src.claim(Q) is None  # blocked by the lock: now its removal matters
    t = threading.Timer(0.05, (root / Q / LOCK_NAME).unlink)
    t.start()
    assert src.wait(30) is True
    t.join()
    assert src.claim(Q).message_id == "m1"


def test_unblocked_lock_removal_does_not_wake(src, root):
    (root / Q).mkdir()
    src.wait(0)
    (root / Q / LOCK_NAME).touch()
    (root / Q / LOCK_NAME).unlink()
    assert src.wait(0.05) is False


def test_wait_survives_queue_dir_recreated(src, root):
    """The studioml client's LocalQueue() does rm -rf of the queue folder, then mkdir."""
    (root / Q).mkdir()
    shutil.rmtree(root / Q)
    src.wait(0.05)
    (root / Q).mkdir()
    src.wait(0.05)
    t = threading.Timer(0.05, client_write, args=(root, Q, "m1", b"{}"))
    t.start()
    assert src.wait(30) is True
    t.join()


def _drain(root: str, runner: str, out: str) -> None:
    s = LocalQueueSource(Path(root), runner_id=runner)
    got = []
    while True:
        msg = s.claim(Q)
        if msg is None:
            break
        got.append(msg.body.decode())
        s.ack(msg)
    Path(out).write_text("\n".join(got))


def test_two_processes_claim_each_message_once(root, tmp_path):
    writer = LocalQueueSource(root)
    sent = {f"msg-{i}" for i in range(200)}
    for body in sorted(sent):
        writer.enqueue(Q, body.encode())
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as runners are
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_drain, args=(str(root), f"slot-{i}", str(outs[i])))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [line for o in outs for line in o.read_text().splitlines()]
    assert len(got) == 200 and set(got) == sent
    assert writer.depths() == {Q: 0} and writer.claimed_counts() == {Q: 0}
    writer.close()


def test_claim_while_client_writes_concurrently(root, tmp_path):
    """A writer process using the soft lock and in-place writes, a reader claiming meanwhile:
    every message read is complete."""
    code = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from appliance.queues.local import soft_lock
folder = {str(root / Q)!r}
os.makedirs(folder, exist_ok=True)
for i in range(100):
    with soft_lock(os.path.join(folder, 'lock.lock')):
        with open(os.path.join(folder, 'm%03d' % i), 'w') as fh:
            fh.write('{{"n": ' + '0' * 5000)
            fh.flush()
            fh.write(', "i": %d}}' % i)
"""
    writer = subprocess.Popen([sys.executable, "-c", code])
    s = LocalQueueSource(root, runner_id="reader")
    got = []
    while len(got) < 100:
        msg = s.claim(Q)
        if msg is None:
            assert writer.poll() in (None, 0)
            s.wait(0.2)
            continue
        assert msg.body.endswith(b"}"), msg.body[-20:]
        got.append(msg.message_id)
        s.ack(msg)
    assert writer.wait(60) == 0
    assert len(set(got)) == 100
    s.close()


def test_a_queue_folder_made_by_root_belongs_to_the_queue_roots_owner(tmp_path):
    # runners that dropped to `isolation.user` own the queue root; a `sudo appliance submit`
    # must not leave them a queue folder they cannot claim from
    from tests.realparts import need

    need(os.geteuid() == 0, "root (to own files as another user)")
    root = tmp_path / "queue"
    root.mkdir()
    os.chown(root, 65534, 65534)
    enqueue(root, "local_shared", b"{}")
    st = (root / "local_shared").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    # and so does the message root wrote into it: the runner can read what it claims
    [msg] = [p for p in (root / "local_shared").iterdir() if p.name != LOCK_NAME]
    assert (msg.stat().st_uid, msg.stat().st_gid) == (65534, 65534)


# ---------------------------------------------------------------- who may read the queue

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def shared_group() -> grp.struct_group:
    """A real group to stand in for `appliance` (creating one would change the machine)."""
    from tests.realparts import need

    need(os.geteuid() == 0, "root (to hand files to a group and act as another user)")
    return grp.getgrnam("daemon")


@pytest.fixture
def open_dir():
    """A folder another user may walk into (pytest's tmp_path is root's alone)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="queue-perm-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def as_nobody(cmd: str, groups=()) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], user=NOBODY, group=NOBODY, extra_groups=list(groups),
                          capture_output=True, text=True)


def test_group_members_drop_messages_but_read_or_remove_only_their_own(open_dir, shared_group):
    top = open_dir / "studioml"
    root = top / "queue"
    enqueue(root, "local_old", b'{"keys": "secret"}')  # a home from before: umask modes
    old = next((root / "local_old").glob("*-*"))
    old.chmod(0o664)

    said = share_queue_tree(top, group=shared_group.gr_name)
    assert said and shared_group.gr_name in said
    for d in (top, root, root / "local_old", top / "experiments"):
        assert (mode(d), d.stat().st_gid) == (0o3770, shared_group.gr_gid), d
    assert (mode(old), old.stat().st_gid) == (0o600, shared_group.gr_gid)  # no longer the group's to read

    # what root (`sudo appliance submit`, a runner) writes is root's alone, 0600
    msgid = enqueue(root, "local_new", b'{"keys": "secret"}')
    new = root / "local_new" / msgid
    assert (mode(new), new.stat().st_gid) == (0o600, shared_group.gr_gid)
    assert mode(root / "local_new") == 0o3770

    # a member (a StudioML client) drops a message without sudo; what it makes takes the group
    member = as_nobody(f"echo '{{}}' > {root}/local_new/by-member && mkdir {root}/local_member",
                       groups=[shared_group.gr_gid])
    assert member.returncode == 0, member.stderr
    assert (root / "local_new" / "by-member").stat().st_gid == shared_group.gr_gid
    assert (root / "local_member").stat().st_gid == shared_group.gr_gid
    # whatever its umask, its message is its own (the folders' default ACL): the group reads none
    by_member = as_nobody(f"umask 000 && echo '{{}}' > {root}/local_new/open-umask", groups=[shared_group.gr_gid])
    assert by_member.returncode == 0, by_member.stderr
    assert mode(root / "local_new" / "open-umask") & 0o077 == 0
    # ... but reads, replaces and removes no message of another (sticky folder, 0600 files)
    for cmd in (f"cat {new}", f"rm -f {new}", f"mv {new} {root}/local_new/mine", f"echo x > {new}"):
        other = as_nobody(cmd, groups=[shared_group.gr_gid])
        assert other.returncode != 0, cmd
    assert new.read_bytes() == b'{"keys": "secret"}'

    # anyone else can neither read nor write
    for cmd in (f"cat {new}", f"ls {root}", f"echo x > {root}/local_new/intruder"):
        other = as_nobody(cmd)
        assert other.returncode != 0 and "Permission denied" in other.stderr, cmd

    # a dead letter and its reason are its sender's alone
    src = LocalQueueSource(root, runner_id="t", watch=False)
    msg = src.claim("local_new")
    src.dead_letter(msg, "poison")
    dead = root / DEAD / "local_new"
    assert mode(dead) == 0o3770
    for f in (dead / msg.message_id, dead / f"{msg.message_id}.reason"):
        assert (mode(f), f.stat().st_gid) == (0o600, shared_group.gr_gid), f
    src.close()


def test_sharing_again_fixes_new_client_folders_without_a_walk(open_dir, shared_group):
    top = open_dir / "studioml"
    share_queue_tree(top, group=shared_group.gr_name)
    assert share_queue_tree(top, group=shared_group.gr_name) is None  # all right already
    # the StudioML client makes its queue folder with its umask
    (top / "queue" / "local_client").mkdir()
    (top / "queue" / "local_client").chmod(0o2755)
    # deep inside a folder that is right, nothing is looked at again
    deep = top / "experiments" / "k1"
    deep.mkdir()
    deep.chmod(0o2755)
    assert share_queue_tree(top, group=shared_group.gr_name)
    assert mode(top / "queue" / "local_client") == 0o3770
    assert mode(deep) == 0o2755


def test_without_the_group_the_queue_is_the_owners_alone(tmp_path):
    top = tmp_path / "studioml"
    (top / "queue" / "local_q").mkdir(parents=True, mode=0o755)  # a home from before
    (top / "queue").chmod(0o755), top.chmod(0o755)
    said = share_queue_tree(top, group="no-such-group-here")
    assert said and "groupadd" in said
    assert share_queue_tree(top, group="no-such-group-here") is None
    assert mode(top) == mode(top / "queue") == mode(top / "queue" / "local_q") == 0o700
    msgid = enqueue(top / "queue", "local_q", b"{}")
    assert mode(top / "queue" / "local_q" / msgid) == 0o600
    enqueue(top / "queue", "local_new", b"{}")
    assert mode(top / "queue" / "local_new") == 0o700


# ---------------------------------------------------------------- dead letters expire

def dead_letter(src: LocalQueueSource, root: Path, body: bytes, age_s: float = 0) -> str:
    src.enqueue(Q, body)
    msg = src.claim(Q)
    src.dead_letter(msg, "poison")
    if age_s:
        t = time.time() - age_s
        for f in (root / DEAD / Q / msg.message_id, root / DEAD / Q / f"{msg.message_id}.reason"):
            os.utime(f, (t, t))
    return msg.message_id


def test_dead_letters_older_than_the_ttl_are_deleted(root):
    src = LocalQueueSource(root, runner_id="t", dead_ttl_s=3600)
    old = dead_letter(src, root, b"old", age_s=7200)
    young = dead_letter(src, root, b"young", age_s=600)
    # the enqueue time does not count: a message dead-lettered now is young
    src.enqueue(Q, b"queued long ago")
    t = time.time() - 7200
    [queued] = [p for p in (root / Q).iterdir() if p.name != LOCK_NAME]
    os.utime(queued, (t, t))
    fresh = src.claim(Q)
    src.dead_letter(fresh, "poison")
    src.close()

    runner = LocalQueueSource(root, runner_id="next", dead_ttl_s=3600)
    assert runner.claim(Q) is None  # the first claim sweeps
    assert [m for _q, m, _r in runner.dead_letters()] == [young, fresh.message_id]
    assert not (root / DEAD / Q / old).exists() and not (root / DEAD / Q / f"{old}.reason").exists()
    runner.close()


def test_a_ttl_of_zero_keeps_dead_letters(root):
    src = LocalQueueSource(root, runner_id="t", dead_ttl_s=0)
    old = dead_letter(src, root, b"old", age_s=400 * 86400)
    assert src.sweep_dead() == 0
    assert [m for _q, m, _r in src.dead_letters()] == [old]
    src.close()


# ---------------------------------------------------------------- attempts (issue 13)

def test_every_claim_counts_and_release_keeps_the_count(src, root):
    from appliance.queues.local import ATTEMPTS

    msgid = src.enqueue(Q, b'{"x": 1}')
    first = src.claim(Q)
    assert first.attempt == 1
    assert (root / ATTEMPTS / Q / msgid).read_text() == "1\n"  # on disk before the runner works
    src.release(first)
    second = src.claim(Q)
    assert (second.message_id, second.attempt, second.body) == (msgid, 2, b'{"x": 1}')
    src.release(second, counted=False)  # only looked at (held back for another slot)
    third = src.claim(Q)
    assert third.attempt == 2
    src.ack(third)
    assert not (root / ATTEMPTS / Q / msgid).exists()
    assert src.depths() == {Q: 0} and src.claimed_counts() == {Q: 0}
    # the client's layout is untouched: the queue folder holds only message files
    other = src.enqueue(Q, b"{}")
    m = src.claim(Q)
    src.release(m)
    assert sorted(p.name for p in (root / Q).iterdir()) == [other]


def test_an_uncounted_first_look_leaves_no_count(src, root):
    from appliance.queues.local import ATTEMPTS

    msgid = src.enqueue(Q, b"{}")
    src.release(src.claim(Q), counted=False)
    assert not (root / ATTEMPTS / Q / msgid).exists()
    assert src.claim(Q).attempt == 1


def _claim_and_hang(root: str, ready: str) -> None:
    s = LocalQueueSource(Path(root), runner_id="doomed")
    msg = s.claim(Q)
    Path(ready).write_text(str(msg.attempt))
    time.sleep(600)


def test_a_message_that_kills_its_runner_is_counted_and_stopped(src, root, tmp_path):
    """The crash loop of issue 13: each runner is SIGKILLed while holding the message; its claim
    is recovered and claimed again, the count goes up, and past the limit it is dead-lettered."""
    import signal

    from appliance.queues.base import over_attempts

    msgid = src.enqueue(Q, b'{"poison": true}')
    seen = []
    for i in range(3):
        ready = tmp_path / f"ready{i}"
        p = multiprocessing.get_context("fork").Process(target=_claim_and_hang, args=(str(root), str(ready)))
        p.start()
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(int(ready.read_text()))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert src.depths() == {Q: 0} and src.claimed_counts() == {Q: 1}
        assert src.recover_orphans() == 1
    assert seen == [1, 2, 3]
    msg = src.claim(Q)
    assert (msg.message_id, msg.attempt, msg.body) == (msgid, 4, b'{"poison": true}')
    assert over_attempts(msg, 4) is None
    reason = over_attempts(msg, 3)
    assert reason == ("claimed 3 times without finishing (the limit is runner.max_attempts = 3): "
                      "it crashed or outlived its runner each time")
    src.dead_letter(msg, reason)
    assert src.dead_letters() == [(Q, msgid, reason)]
    # a human puts it back by hand: it starts counting afresh
    os.rename(root / DEAD / Q / msgid, root / Q / msgid)
    assert src.claim(Q).attempt == 1


def test_the_source_set_passes_attempts_through(tmp_path):
    from appliance.paths import Home
    from appliance.queues.sources import SourceSet

    home = Home.at(tmp_path / "home")
    home.ensure()
    enqueue(home.queue_root, Q, b"{}")
    sources = SourceSet(home, slot="slot-3", write_serving=False)
    try:
        msg = sources.claim(f"local/{Q}")
        assert msg.attempt == 1
        sources.release(msg, counted=False)
        msg = sources.claim(f"local/{Q}")
        assert msg.attempt == 1
        sources.release(msg)
        assert sources.claim(f"local/{Q}").attempt == 2
    finally:
        sources.close()


def test_enqueue_on_a_full_disk_says_so_and_leaves_nothing(root):
    with full_filesystem(root, "256k") as disk:
        with pytest.raises(QueueWriteError, match="no space left on device; free space there"):
            enqueue(root, Q, b"x" * 300)
        assert [p.name for p in (root / Q).iterdir()] == []  # no .tmp, no lock left behind
        disk.free()
        msgid = enqueue(root, Q, b"x" * 300)
        assert (root / Q / msgid).read_bytes() == b"x" * 300


def test_a_message_swapped_for_a_link_is_neither_read_nor_owned_through_it(tmp_path):
    """A writer who replaces their message by a symlink after the listing (to another's message,
    to a root-only file) gets nothing read through it, nor its target's owner."""
    root = tmp_path / "queue"
    secret = tmp_path / "secret.json"
    secret.write_text('{"keys": "someone else\'s"}')
    os.chmod(secret, 0o600)
    enqueue(root, "local_q", b"{}")
    [name] = [p.name for p in (root / "local_q").iterdir() if p.name != "lock.lock"]
    src = LocalQueueSource(root, runner_id="t", watch=False)
    listed = src._messages
    def swap_after_listing(folder, dead=False):
        found = listed(folder, dead)
        if found and not dead:
            (folder / name).unlink()
            (folder / name).symlink_to(secret)
        return found
    src._messages = swap_after_listing
    assert src.claim("local_q") is None
    assert not any((root / ".claimed" / "local_q").iterdir())  # the link is gone, the target untouched
    assert secret.read_text() == '{"keys": "someone else\'s"}'
    src.close()


def test_a_claimed_message_carries_the_uid_of_its_file(tmp_path):
    from tests.realparts import need

    need(os.geteuid() == 0, "root (to give a message to another uid)")
    root = tmp_path / "queue"
    enqueue(root, "local_q", b"{}", owner_uid=65534)
    src = LocalQueueSource(root, runner_id="t", watch=False)
    msg = src.claim("local_q")
    assert msg.owner_uid == 65534
    src.close()


def _source_set(tmp_path, make_credentials=True):
    from appliance.paths import Home
    from appliance.queues.sources import SourceSet

    home = Home.at(tmp_path / "home")
    home.ensure()
    if not make_credentials:
        shutil.rmtree(home.credentials_dir, ignore_errors=True)
    # check_every_s: the fallback poll, far off: only the watch can see the change
    return home, SourceSet(home, slot="slot-w", write_serving=False, check_every_s=3600)


@pytest.mark.parametrize("made_later", [False, True])
def test_an_idle_source_set_sees_a_new_credentials_entry_without_polling(tmp_path, made_later):
    home, sources = _source_set(tmp_path, make_credentials=not made_later)
    try:
        assert sources.wait(0.05) is False
        if made_later:
            home.credentials_dir.mkdir()
            sources.wait(0.05)  # the folder appears; its entries are watched from now on
        (home.credentials_dir / "lab.toml").write_text("url = 'http://not-amqp/'\n")
        sources.wait(0.5)  # no source opens (the entry is broken), but it was read
        assert "lab.toml" in sources.broken and "AMQP URL" in sources.broken["lab.toml"].reason
    finally:
        sources.close()


def test_a_wake_fd_ends_the_wait_of_a_source_set(tmp_path):
    _home, sources = _source_set(tmp_path)
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        assert sources.wait(0.05, wake_fd=r) is False
        os.write(w, b"!")  # what a signal does to the runner's wake-up fd
        assert sources.wait(60, wake_fd=r) is True
        assert os.read(r, 10) == b"!"  # left for the caller
    finally:
        sources.close()
        os.close(r)
        os.close(w)


def test_a_message_id_is_a_random_uuid4_as_the_client_writes_it():
    import uuid

    from appliance.queues.local_write import uuid4

    ids = [uuid4() for _ in range(200)]
    assert len(set(ids)) == 200
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
