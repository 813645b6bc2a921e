"""A real dockerd for tests, and the runner image built once per session.

Start the daemon yourself (no registry needed): `dockerd --iptables=false --bridge=none &`.
Locally a missing daemon skips the tests that ask for it; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import pytest

from tests.realparts import need

TEST_IMAGE = "appliance-runner:test"


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001  (SDK missing, socket missing, daemon down)
        need(False, f"a running dockerd ({e})")
    yield client
    client.close()


@pytest.fixture(scope="session")
def runner_image(docker_client):
    """The tag of a freshly built runner image; removed at the end of the session."""
    from appliance.image import build_image

    build_image(TEST_IMAGE, progress=lambda line: None, client=docker_client)
    yield TEST_IMAGE
    try:
        docker_client.images.remove(TEST_IMAGE, force=True)
    except Exception:  # noqa: BLE001  (still used by a leftover container: leave it)
        pass
