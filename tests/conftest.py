"""Shared test setup.

Fixtures that start real services live in `tests/*_fixtures.py`, one module per real part
(store, RabbitMQ, dockerd, ...); they are all loaded here so any test can ask for them.
"""

from pathlib import Path

import pytest

# fixture modules import each other; rewrite their asserts whichever is imported first
pytest.register_assert_rewrite(*(f"tests.{p.stem}" for p in Path(__file__).parent.glob("*_fixtures.py")))

pytest_plugins = sorted(f"tests.{p.stem}" for p in Path(__file__).parent.glob("*_fixtures.py"))


def _traversable_mktemp():
    """Workloads run as unprivileged slot accounts: an appliance home in a pytest temporary
    folder must be reachable by them, and pytest makes those folders 0700."""
    from _pytest.tmpdir import TempPathFactory

    make = TempPathFactory.mktemp

    def mktemp(self, basename, numbered=True):
        path = make(self, basename, numbered)
        base = self.getbasetemp()
        for p in [path, *path.parents]:
            p.chmod(p.stat().st_mode | 0o011)
            if p == base.parent:
                break
        return path

    TempPathFactory.mktemp = mktemp


_traversable_mktemp()


@pytest.fixture(scope="module")
def sqs_endpoint():
    """A local SQS-compatible server (moto) on 127.0.0.1, for the SQS source's tests."""
    from tests.realparts import free_port, need

    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        ThreadedMotoServer = None
    need(ThreadedMotoServer is not None, "moto[server] (a local SQS-compatible server)")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
