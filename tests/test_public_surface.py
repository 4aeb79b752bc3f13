"""What users import stays where it was, whatever moves inside node/: the Python API
(``import kachery.node as kn``), the console script, the test daemon and the client class."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import kachery.node as kn

ROOT = Path(__file__).parent.parent

PUBLIC_API = [
    "Feed",
    "KacheryError",
    "Subfeed",
    "TaskFailed",
    "TaskHandle",
    "create_feed",
    "get",
    "get_feed_id",
    "load_bytes",
    "load_feed",
    "load_file",
    "load_json",
    "load_npy",
    "load_subfeed",
    "load_text",
    "request_task",
    "run_task_backend",
    "set",
    "store_bytes",
    "store_file",
    "store_json",
    "store_npy",
    "store_text",
    "taskfunction",
]


def test_the_python_api_is_unchanged() -> None:
    assert kn.__all__ == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(kn, name) is not None


def test_the_console_script_resolves_to_a_callable() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["kachery-node"].partition(":")
    assert module == "kachery.node.cli"
    assert callable(getattr(importlib.import_module(module), attr))


def test_the_test_daemon_and_the_client_class_are_where_users_import_them() -> None:
    from kachery.node.client import DaemonClient
    from kachery.node.testing import Daemon

    assert callable(DaemonClient)
    assert callable(Daemon)


def test_every_package_of_node_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        "kachery." + ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.glob("node/**/__init__.py")
    }
    assert found <= listed
