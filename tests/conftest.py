"""Shared test setup.

Fixtures that start real services live in `tests/*_fixtures.py`, one module per real part
(store, RabbitMQ, dockerd, ...); they are all loaded here so any test can ask for them.
"""

from pathlib import Path

import pytest

# fixture modules import each other; rewrite their asserts whichever is imported first
pytest.register_assert_rewrite(*(f"tests.{p.stem}" for p in Path(__file__).parent.glob("*_fixtures.py")))

pytest_plugins = sorted(f"tests.{p.stem}" for p in Path(__file__).parent.glob("*_fixtures.py"))
