"""Shared fixtures: node homes in temporary directories, and kachery's reference file contents."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from kachery.node.home import HOME_ENV, NodeHome
from kachery.node.testing import Daemon

settings.register_profile(
    "default",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=5_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("KACHERY_FUZZ", "default"))
"""Property tests (the fuzzing in tests/test_fuzz_protocol.py) run a bounded budget by default;
``KACHERY_FUZZ=long`` runs 5,000 examples per test (add ``-o faulthandler_timeout=0``)."""

VECTORS_DIR = Path(__file__).parent / "vectors"


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS_DIR / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=8)
def pattern_bytes(size: int) -> bytes:
    """kachery's reference contents: byte i is i % 251 (see vectors/kachery-client-1.2.0.json)."""
    block = bytes(range(251))
    return (block * (size // 251 + 1))[:size]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NodeHome]:
    """An initialized node home in a temporary directory, also set as $KACHERY_NODE_HOME."""
    path = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(path))
    node_home, created = NodeHome.init(path)
    assert created
    yield node_home
    node_home.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    """Daemons in subprocesses, made on first use by name (``daemons["owner"]``), killed after."""
    made: dict[str, Daemon] = {}

    class Factory(dict[str, Daemon]):
        def __missing__(self, name: str) -> Daemon:
            made[name] = self[name] = Daemon(tmp_path / name)
            return made[name]

    yield Factory()
    for d in made.values():
        d.kill()
