"""Slot cgroups: CPU-list syntax, version detection, v2 writes on a fake tree, v1 for real."""

from __future__ import annotations

import os
import subprocess

import pytest

from appliance.slot import cgroup
from appliance.slot.cgroup import CgroupError, Hierarchy, SlotCgroup
from appliance.slot.limits import format_cpu_list, parse_cpu_list
from tests.cgroup_fixtures import wait_empty
from tests.realparts import need

MiB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "30"])


# --------------------------------------------------------------------------- CPU lists


@pytest.mark.parametrize(
    "text, cpus",
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]),
        (" 3,1,2 ", [1, 2, 3]),
        ("1,1,0-1", [0, 1]),
        ("", []),
        ("\n", []),
    ],
)
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["x", "1-", "-1", "3-1", "0,,1", "1.5", "0-2-4", "²"])
def test_parse_cpu_list_rejects_garbage_naming_it(text):
    with pytest.raises(ValueError, match="bad CPU list"):
        parse_cpu_list(text)


@pytest.mark.parametrize(
    "cpus, text",
    [([], ""), ([0], "0"), ([0, 1, 2, 3], "0-3"), ([11, 10, 8, 0, 1, 2, 3], "0-3,8,10-11"), ([5, 5, 7], "5,7")],
)
def test_format_cpu_list_round_trips(cpus, text):
    assert format_cpu_list(cpus) == text
    assert parse_cpu_list(text) == sorted(set(cpus))


def test_format_cpu_list_rejects_negative():
    with pytest.raises(ValueError, match="start at 0"):
        format_cpu_list([-1])


# --------------------------------------------------------------------------- detection

V1_LINES = [
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset",
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd",
]
V2_LINE = "41 31 0:38 / {path} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"


def _mountinfo(tmp_path, lines):
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(["22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw"] + lines) + "\n")
    return str(path)


def test_cgroup_version_from_mountinfo(tmp_path):
    unified = V2_LINE.format(path="/sys/fs/cgroup/unified")
    assert cgroup.cgroup_version(_mountinfo(tmp_path, V1_LINES)) == "v1"
    assert cgroup.cgroup_version(_mountinfo(tmp_path, V1_LINES + [unified])) == "hybrid"
    assert cgroup.cgroup_version(_mountinfo(tmp_path, [V2_LINE.format(path="/sys/fs/cgroup")])) == "v2"
    assert cgroup.cgroup_version(_mountinfo(tmp_path, [])) == "none"


def test_this_host_version_is_known():
    assert cgroup.cgroup_version() in ("v1", "v2", "hybrid", "none")


def test_detect_prefers_v1_controllers_on_hybrid(tmp_path):
    unified = V2_LINE.format(path="/sys/fs/cgroup/unified")
    h = Hierarchy.detect(_mountinfo(tmp_path, V1_LINES + [unified]))
    assert (h.version, h.cpuset, h.memory) == ("v1", "/sys/fs/cgroup/cpuset", "/sys/fs/cgroup/memory")


def test_detect_v2_needs_cpuset_and_memory(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    mountinfo = _mountinfo(tmp_path, [V2_LINE.format(path=root)])
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert Hierarchy.detect(mountinfo).version == "v2"
    (root / "cgroup.controllers").write_text("cpu io pids\n")
    with pytest.raises(CgroupError, match="cpuset and memory controllers"):
        Hierarchy.detect(mountinfo)


def test_detect_without_cgroupfs_says_what_to_do(tmp_path):
    with pytest.raises(CgroupError, match="no cgroup filesystem.*fix:"):
        Hierarchy.detect(_mountinfo(tmp_path, []))


def test_mountinfo_escapes_are_decoded(tmp_path):
    line = "34 31 0:31 / /mnt/my\\040cgroups rw - cgroup cgroup rw,cpuset,memory"
    h = Hierarchy.detect(_mountinfo(tmp_path, [line]))
    assert h.roots() == ["/mnt/my cgroups"]


def test_bad_parent_env_is_refused(monkeypatch):
    monkeypatch.setenv(cgroup.PARENT_ENV, "../etc")
    with pytest.raises(CgroupError, match=cgroup.PARENT_ENV):
        cgroup.cgroup_parent()


@pytest.mark.parametrize("name", ["", "a/b", "..", " slot"])
def test_bad_slot_names(name):
    with pytest.raises(ValueError, match="bad slot name"):
        SlotCgroup(name, Hierarchy.v2("/nonexistent"), "appliance")


# --------------------------------------------------------------------------- v2 on a fake tree


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    """A directory standing in for a cgroup2 mount: the kernel's files we read are pre-made."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("")
    monkeypatch.setenv(cgroup.PARENT_ENV, "appliance")
    return root


def test_v2_setup_writes_limits_and_enables_controllers(fake_v2):
    h = Hierarchy.v2(str(fake_v2))
    cg = cgroup.setup_slot("slot-0", [2, 3, 4, 7], [0], 512 * MiB, hierarchy=h, pids_max=1000)
    slot = fake_v2 / "appliance" / "slot-0"
    assert cg.cpuset_dir == cg.memory_dir == str(slot)
    for level in (fake_v2, fake_v2 / "appliance", slot):
        assert (level / "cgroup.subtree_control").read_text() == "+cpuset +memory +pids"
    assert (slot / "job" / "pids.max").read_text() == "1000"  # a fork bomb stops there...
    assert (slot / "pids.max").read_text() == str(1000 + cgroup.RUNNER_PIDS)  # ...and its runner still forks
    assert (slot / "cpuset.cpus").read_text() == "2-4,7"
    assert (slot / "cpuset.mems").read_text() == "0"
    assert (slot / "memory.max").read_text() == str(512 * MiB)
    assert (slot / "memory.swap.max").read_text() == "0"
    assert (slot / "job" / "memory.oom.group").read_text() == "1"
    assert (slot / "runner").is_dir()
    assert not (slot / "runner" / "memory.oom.group").exists()  # OOM never takes the runner with the job


def test_v2_setup_is_idempotent_and_updates(fake_v2):
    h = Hierarchy.v2(str(fake_v2))
    cgroup.setup_slot("slot-0", [0], [0], 256 * MiB, hierarchy=h)
    # The kernel would now list the enabled controllers; a second run must not write again.
    (fake_v2 / "cgroup.subtree_control").write_text("cpuset memory pids\n")
    cgroup.setup_slot("slot-0", [1], [0], 128 * MiB, hierarchy=h)
    slot = fake_v2 / "appliance" / "slot-0"
    assert (fake_v2 / "cgroup.subtree_control").read_text() == "cpuset memory pids\n"
    assert (slot / "job" / "pids.max").read_text() == "max"  # no bound asked: none
    assert (slot / "cpuset.cpus").read_text() == "1"
    assert (slot / "memory.max").read_text() == str(128 * MiB)


def test_v2_a_new_job_leaf_gets_its_own_limit_and_the_oom_group(fake_v2):
    from appliance.slot.cgroup import v2

    h = Hierarchy.v2(str(fake_v2))
    cg = cgroup.setup_slot("slot-0", [0], [0], 512 * MiB, hierarchy=h, pids_max=100)
    job = fake_v2 / "appliance" / "slot-0" / "job"
    for f in job.iterdir():  # what fresh_job's rmdir leaves: nothing
        f.unlink()
    job.rmdir()
    v2.make_job(cg, 256 * MiB, "100")
    assert (job / "memory.max").read_text() == str(256 * MiB)  # the request's ram
    assert (job / "memory.oom.group").read_text() == "1"  # an OOM takes the whole workload
    v2.make_job(cg, None, None)  # no ram: the slot's limit holds, nothing written
    assert (job / "memory.max").read_text() == str(256 * MiB)


def test_v2_checks_cpus_against_parent_effective_set(fake_v2):
    h = Hierarchy.v2(str(fake_v2))
    cgroup.setup_slot("slot-0", [0], [0], 256 * MiB, hierarchy=h)
    (fake_v2 / "appliance" / "cpuset.cpus.effective").write_text("0-3\n")
    with pytest.raises(CgroupError, match="CPU 9 is not available.*allows 0-3"):
        cgroup.setup_slot("slot-0", [3, 9], [0], 256 * MiB, hierarchy=h)


def test_v2_missing_controller_is_named(fake_v2):
    (fake_v2 / "cgroup.controllers").write_text("cpu io pids\n")
    with pytest.raises(CgroupError, match="lacks the cpuset and memory controller"):
        cgroup.setup_slot("slot-0", [0], [0], 256 * MiB, hierarchy=Hierarchy.v2(str(fake_v2)))


def test_v2_join_pids_and_accounting(fake_v2):
    h = Hierarchy.v2(str(fake_v2))
    cgroup.setup_slot("slot-0", [0], [0], 256 * MiB, hierarchy=h)
    slot = fake_v2 / "appliance" / "slot-0"
    cgroup.join_job("slot-0", hierarchy=h)
    assert (slot / "job" / "cgroup.procs").read_text() == str(os.getpid())
    assert cgroup.slot_pids("slot-0", hierarchy=h) == [os.getpid()]
    assert cgroup.oom_kills("slot-0", hierarchy=h) == 0  # no memory.events yet: unknown
    (slot / "job" / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 1\n")
    assert cgroup.oom_kills("slot-0", hierarchy=h) == 2
    assert cgroup.memory_usage("slot-0", hierarchy=h) is None
    (slot / "memory.current").write_text("123456\n")
    assert cgroup.memory_usage("slot-0", hierarchy=h) == 123456


def test_v2_cpu_seconds_from_cpu_stat(fake_v2):
    h = Hierarchy.v2(str(fake_v2))
    cgroup.setup_slot("slot-0", [0], [0], 256 * MiB, hierarchy=h)
    assert cgroup.cpu_seconds("slot-0", hierarchy=h) is None  # no cpu.stat: unknown
    (fake_v2 / "appliance" / "slot-0" / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert cgroup.cpu_seconds("slot-0", hierarchy=h) == 2.5


def test_v2_delegate_job_hands_over_only_procs_files(fake_v2):
    need(os.geteuid() == 0, "root (to chown)")
    h = Hierarchy.v2(str(fake_v2))
    cg = cgroup.setup_slot("slot-0", [0], [0], 256 * MiB, hierarchy=h)
    slot = fake_v2 / "appliance" / "slot-0"
    for p in (slot / "cgroup.procs", slot / "runner" / "cgroup.procs", slot / "job" / "cgroup.procs"):
        p.write_text("")
    cg.delegate_job(65534, 65534)
    for p in (slot / "cgroup.procs", slot / "job" / "cgroup.procs"):
        assert p.stat().st_uid == 65534
    assert (slot / "runner" / "cgroup.procs").stat().st_uid == 0
    assert (slot / "memory.max").stat().st_uid == 0


# --------------------------------------------------------------------------- real cgroups (v1 here)


def test_real_setup_join_and_remove(cgroup_parent):
    h = cgroup.current_hierarchy()
    cg = cgroup.setup_slot("s0", [0], [0], 256 * MiB)
    assert cg.parent == cgroup_parent
    if h.version == "v1":
        assert _read(cg.cpuset_dir, "cpuset.cpus") == "0"
        assert _read(cg.cpuset_dir, "runner", "cpuset.cpus") == "0"
        assert _read(cg.cpuset_dir, "job", "cpuset.mems") == "0"
        assert _read(cg.memory_dir, "memory.limit_in_bytes") == str(256 * MiB)
    else:
        assert _read(cg.cpuset_dir, "cpuset.cpus") == "0"
        assert _read(cg.memory_dir, "memory.max") == str(256 * MiB)

    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: cgroup.join_job("s0"))
    try:
        assert cgroup.slot_pids("s0") == [child.pid]
        assert _cpus_allowed(child.pid) == "0"
        own = open(f"/proc/{child.pid}/cgroup").read()
        assert f"/{cgroup_parent}/s0/job\n" in own
        assert cgroup.memory_usage("s0") is not None
        with pytest.raises(CgroupError, match=f"processes: \\[{child.pid}\\].*stop the slot"):
            cgroup.remove_slot("s0")
    finally:
        child.kill()
        child.wait()
    wait_empty(cg)
    cgroup.remove_slot("s0")
    for root in h.roots():
        assert not os.path.exists(os.path.join(root, cgroup_parent, "s0"))
    cgroup.remove_slot("s0")  # already gone: fine


def test_real_cpu_seconds_count_a_finished_workload(cgroup_parent):
    """The slot's CPU time (v1: its cpuacct cgroup, v2: cpu.stat) keeps what an exited job used."""
    h = cgroup.current_hierarchy()
    need(h.version == "v2" or h.cpuacct is not None, "a cpuacct controller (cgroup v1) or cgroup v2")
    cg = cgroup.setup_slot("s0", [0], [0], 256 * MiB)
    assert cgroup.cpu_seconds("s0") == 0
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    subprocess.run(["python3", "-c", busy], preexec_fn=lambda: cgroup.join_job("s0"), check=True)
    assert cgroup.cpu_seconds("s0") >= 0.3
    wait_empty(cg)
    cgroup.remove_slot("s0")
    if h.version == "v1":
        assert not os.path.exists(os.path.join(h.cpuacct, cgroup_parent, "s0"))


def test_real_update_of_a_live_slot(cgroup_parent):
    need(len(os.sched_getaffinity(0)) >= 2, "two CPUs")
    cgroup.setup_slot("s0", [0], [0], 256 * MiB)
    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: cgroup.join_runner("s0"))
    try:
        cg = cgroup.setup_slot("s0", [1], [0], 128 * MiB)  # move CPUs while a process runs
        assert _cpus_allowed(child.pid) == "1"
        if cg.hierarchy.version == "v1":
            assert _read(cg.cpuset_dir, "cpuset.cpus") == "1"
            assert _read(cg.memory_dir, "memory.limit_in_bytes") == str(128 * MiB)
            assert _read(cg.memory_dir, "memory.memsw.limit_in_bytes") == str(128 * MiB)
        cgroup.setup_slot("s0", [0, 1], [0], 512 * MiB)  # and grow again
        assert _cpus_allowed(child.pid) == "0-1"
        if cg.hierarchy.version == "v1":
            assert _read(cg.memory_dir, "memory.limit_in_bytes") == str(512 * MiB)
    finally:
        child.kill()
        child.wait()


def test_real_bad_limits(cgroup_parent):
    with pytest.raises(CgroupError, match="CPU 4095 is not available"):
        cgroup.setup_slot("s0", [0, 4095], [0], 256 * MiB)
    with pytest.raises(CgroupError, match="memory node 63 is not available"):
        cgroup.setup_slot("s0", [0], [63], 256 * MiB)
    with pytest.raises(ValueError, match="memory limit must be a positive"):
        cgroup.setup_slot("s0", [0], [0], 0)
    with pytest.raises(ValueError, match="at least one CPU"):
        cgroup.setup_slot("s0", [], [0], 256 * MiB)


def test_real_join_before_setup_says_what_to_do(cgroup_parent):
    with pytest.raises(CgroupError, match="cannot write .*/nosuch/job/cgroup.procs.*set the slot up first"):
        cgroup.join_job("nosuch")


def test_real_prune_keeps_listed_and_busy_slots(cgroup_parent):
    for name in ("keep", "busy", "stale"):
        cgroup.setup_slot(name, [0], [0], 256 * MiB)
    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: cgroup.join_job("busy"))
    try:
        assert cgroup.prune({"keep"}) == ["stale"]
        h = cgroup.current_hierarchy()
        for root in h.roots():
            assert {"busy", "keep"} <= set(os.listdir(os.path.join(root, cgroup_parent)))
            assert not os.path.exists(os.path.join(root, cgroup_parent, "stale"))
    finally:
        child.kill()
        child.wait()


def test_real_unprivileged_setup_names_the_fix(cgroup_parent):
    """A non-root user gets a one-line reason naming the path and `run as root`."""
    code = (
        "import sys; from appliance.slot import cgroup\n"
        "try:\n cgroup.setup_slot('s0', [0], [0], 1 << 28)\n"
        "except cgroup.CgroupError as e:\n print(e); sys.exit(3)\n"
    )
    need(os.access("/usr/bin/python3", os.X_OK), "a system python3 that user nobody can run")
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run(
        ["/usr/bin/python3", "-c", code], env=env, capture_output=True, text=True, user=65534, group=65534
    )
    assert done.returncode == 3, done.stderr
    assert "Permission denied" in done.stdout
    assert cgroup_parent in done.stdout
    assert "run as root (sudo ./install.sh)" in done.stdout


def _read(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read().strip()


def _cpus_allowed(pid: int) -> str:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def test_two_homes_on_one_host_never_share_slot_cgroups(tmp_path, monkeypatch):
    """Two appliances (two `--home`s) on one host, each with a slot-N: each slot gets its own
    cgroup, and the leftovers sweep of one (`down` after its supervisord died) never finds,
    and so never stops, the other's runner."""
    from appliance import leftovers
    from appliance.paths import Home
    from tests.cgroup_fixtures import real_hierarchy, remove_cgroup_parent

    hierarchy = real_hierarchy()
    need(os.geteuid() == 0, "root (to create cgroups)")
    need(hierarchy is not None, "a cgroupfs with the cpuset and memory controllers")
    monkeypatch.delenv(cgroup.PARENT_ENV, raising=False)  # what a user has: no override
    homes = [Home.at(tmp_path / "a"), Home.at(tmp_path / "b")]
    slot = f"slot-t{os.getpid()}"  # a name no other appliance on this host uses
    cpus = sorted(os.sched_getaffinity(0))[:1]
    made, runner = [], None
    try:
        for home in homes:  # as each appliance's programs see it
            monkeypatch.setenv("APPLIANCE_HOME", str(home.root))
            made.append(cgroup.setup_slot(slot, cpus, [0], 64 * MiB))
        assert made[0].cpuset_dir != made[1].cpuset_dir
        monkeypatch.setenv("APPLIANCE_HOME", str(homes[0].root))
        runner = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: cgroup.join_runner(slot))
        assert f"/{made[0].parent}/{slot}/runner\n" in open(f"/proc/{runner.pid}/cgroup").read()

        monkeypatch.setenv("APPLIANCE_HOME", str(homes[1].root))  # appliance b's CLI
        assert leftovers.find(homes[0], [slot]).cgroup == {slot: [runner.pid]}
        assert not leftovers.find(homes[1], [slot]), "b's sweep would stop a's runner"
        assert cgroup.slot_pids(slot) == []  # and b's status shows its own, empty slot
    finally:
        if runner:
            runner.kill()
            runner.wait()
        for cg in made:
            wait_empty(cg)
            cg.remove()
            if cg.parent != cgroup.DEFAULT_PARENT:  # never remove the shared parent of older versions
                remove_cgroup_parent(cg.parent, hierarchy)


def test_cgroup_parent_follows_the_home_in_any_spelling(tmp_path, monkeypatch):
    monkeypatch.delenv(cgroup.PARENT_ENV, raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "home")
    parent = cgroup.cgroup_parent(str(tmp_path / "home"))
    assert parent.startswith("appliance-") and parent != cgroup.DEFAULT_PARENT
    assert cgroup.cgroup_parent(str(tmp_path / "link")) == parent
    assert cgroup.cgroup_parent(str(tmp_path / "other")) != parent
    monkeypatch.setenv(cgroup.PARENT_ENV, "tests/x")
    assert cgroup.cgroup_parent(str(tmp_path / "home")) == "tests/x"
