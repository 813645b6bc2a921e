"""`appliance gc`: results past the retention and workspaces no job needs leave the store."""

from __future__ import annotations

import json

import pytest

from appliance.cli import main
from appliance.queues.local import LocalQueueSource
from appliance.retention import select

DAY = 86400.0
NOW = 100 * DAY
OLD, NEW = NOW - 40 * DAY, NOW - DAY
CUTOFF = NOW - 30 * DAY


@pytest.mark.parametrize("objects, keys, exps, workspaces, experiments", [
    ([("blobstore/a.tar", 10, OLD)], set(), set(), ["blobstore/a.tar"], {}),
    ([("blobstore/a.tar", 10, NEW)], set(), set(), [], {}),                      # young
    ([("blobstore/a.tar", 10, OLD)], {"blobstore/a.tar"}, set(), [], {}),        # a job needs it
    ([("experiments/k/output.tar", 5, OLD), ("experiments/k/retval.tar", 5, OLD)], set(), set(), [],
     {"k": ["experiments/k/output.tar", "experiments/k/retval.tar"]}),
    ([("experiments/k/output.tar", 5, OLD), ("experiments/k/retval.tar", 5, NEW)], set(), set(), [], {}),
    ([("experiments/k/output.tar", 5, OLD)], set(), {"k"}, [], {}),              # queued again
    ([("studioml-meta/x", 5, OLD), ("other/y", 5, OLD)], set(), set(), [], {}),  # not ours to judge
])
def test_what_goes(objects, keys, exps, workspaces, experiments):
    doomed = select(objects, keys, exps, CUTOFF)
    assert (doomed.workspaces, doomed.experiments) == (workspaces, experiments)


def test_gc_against_the_store(store_home, store, capsys):
    import uuid

    bucket = f"gc-{uuid.uuid4().hex[:8]}"  # its own: the session's bucket holds other tests' objects
    s3 = store.client()
    s3.create_bucket(Bucket=bucket)
    store_home.config_file.write_text(store_home.config_file.read_text().replace(
        f'bucket = "{store.bucket}"', f'bucket = "{bucket}"'))
    for key in ("blobstore/gc-unneeded.tar", "blobstore/gc-needed.tar", "experiments/gc-old/output.tar",
                "experiments/gc-queued/output.tar"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x" * 100)
    body = {"experiment": {"key": "gc-queued", "artifacts": {"workspace": {"key": "blobstore/gc-needed.tar"}}}}
    LocalQueueSource(store_home.queue_root, watch=False).enqueue("local_appliance", json.dumps(body).encode())

    def stored():
        return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

    before = stored()
    assert main(["--home", str(store_home.root), "gc", "--dry-run", "--older-than", "1ms"]) == 0
    out = capsys.readouterr().out
    assert "would remove workspace blobstore/gc-unneeded.tar" in out
    assert "would remove results of gc-old" in out
    assert "gc-needed" not in out and "gc-queued" not in out
    assert stored() == before
    assert main(["--home", str(store_home.root), "gc", "--older-than", "1ms"]) == 0
    assert stored() == {"blobstore/gc-needed.tar", "experiments/gc-queued/output.tar"}
    assert "removed 1 workspace(s) and the results of 1 experiment(s)" in capsys.readouterr().out


def test_zero_retention_keeps_everything(store_home, capsys):
    store_home.config_file.write_text(store_home.config_file.read_text() + '\nretention = "0"\n')
    assert main(["--home", str(store_home.root), "gc"]) == 0
    assert "nothing is removed" in capsys.readouterr().out


def test_what_a_queue_member_plants_is_passed_over(tmp_path):
    """gc runs as root over files any member of the queue's group may write."""
    import os

    from appliance.paths import Home
    from appliance.queues.depths import pending_local_requests

    home = Home.at(tmp_path / "home")
    home.ensure()
    good = {"experiment": {"key": "k1", "artifacts": {}}}
    LocalQueueSource(home.queue_root, watch=False).enqueue("local_x", json.dumps(good).encode())
    q = home.queue_root / "local_x"
    os.mkfifo(q / "a-fifo")                                   # would block a plain read
    os.symlink("/etc/passwd", q / "a-link")
    (q / "deep").write_text("[" * 100000 + "]" * 100000)       # exhausts the parser
    (q / "junk").write_text("not json")
    assert pending_local_requests(home) == [good]
