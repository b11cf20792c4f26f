"""The chaos tests start a local cluster and kill its nodes: run them alone with
``pytest tests/chaos`` or ``pytest -m chaos``."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: kills nodes of a real local cluster (minutes)")
