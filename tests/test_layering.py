"""The layering is a tested rule: protocol/ is sans-I/O, storage/ never reaches up into node/, the
packages of node/ import each other only downwards (the README's Development section states the
rules), and no import statement anywhere in node/ closes a circle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

FORBIDDEN = {
    "protocol": {
        "trio",
        "trio_websocket",
        "wsproto",
        "socket",
        "ssl",
        "asyncio",
        "sqlalchemy",
        "sqlite3",
        "kachery.node",
        "kachery.storage",
        "time",
        "random",
        "secrets",
        "os",
    },
    "storage": {"trio", "trio_websocket", "wsproto", "asyncio", "kachery.node"},
}


NODE_FORBIDDEN = {
    # the services see the node through services/host.py only, and never the HTTP server
    "kachery.node.services": {
        "kachery.node.daemon.node",
        "kachery.node.daemon.routes",
        "kachery.node.localapi.server",
        "kachery.node.client",
        "kachery.node.cli",
        "hypercorn",
    },
    # the client talks HTTP to a daemon: it never loads one
    "kachery.node.client": {
        "kachery.node.daemon",
        "kachery.node.services",
        "kachery.node.localapi.server",
        "kachery.node.localapi.methods",
        "kachery.node.cli",
        "hypercorn",
    },
    # the local API knows methods, not who serves them; the daemon never drives a client
    "kachery.node.localapi": {
        "kachery.node.daemon",
        "kachery.node.services",
        "kachery.node.client",
        "kachery.node.cli",
    },
    "kachery.node.daemon": {"kachery.node.client", "kachery.node.cli"},
}
"""Package of node/ -> modules it may not import (by any import statement, lazy ones too)."""


def module_name(path: Path) -> str:
    """``node/daemon/peer.py`` -> ``kachery.node.daemon.peer`` (a package is its __init__)."""
    parts = ["kachery", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, *, as_module: str | None = None) -> set[str]:
    """Every module an import statement in ``path`` names (inside functions and
    ``if TYPE_CHECKING:`` too): ``from a import b`` names ``a.b`` where that is a module of
    node/, else ``a``; relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = as_module or (module_name(path) if path.is_relative_to(ROOT) else "")
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            elif node.module:
                module = node.module
            else:
                continue
            submodules = {f"{module}.{alias.name}" for alias in node.names} & NODE_MODULES
            names.update(submodules or {module})
    return names


NODE_MODULES = {module_name(p) for p in (ROOT / "node").rglob("*.py")}


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in imported_modules(path):
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def node_violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / "node").rglob("*.py")):
        if not (module_name(path) + ".").startswith(package + "."):
            continue
        for name in imported_modules(path):
            for banned in NODE_FORBIDDEN[package]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def import_graph() -> dict[str, set[str]]:
    return {
        module_name(path): imported_modules(path) & NODE_MODULES
        for path in sorted((ROOT / "node").rglob("*.py"))
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


@pytest.mark.parametrize("package", sorted(NODE_FORBIDDEN))
def test_node_packages_import_only_downwards(package: str) -> None:
    assert node_violations(package) == []


def test_no_import_circle_in_node() -> None:
    assert find_cycle(import_graph()) is None


def test_the_circle_check_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_node_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kachery.node.daemon import node\n"
        "def f():\n    from ..cli import main\n    from . import files\n"
    )
    names = imported_modules(probe, as_module="kachery.node.services.probe")
    assert {"kachery.node.daemon.node", "kachery.node.cli.main"} <= names
    assert "kachery.node.services.files" in names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    assert violations(layer) == []


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom sqlalchemy import select\nfrom kachery.node import cli\n")
    assert imported_modules(bad) >= {"trio", "sqlalchemy", "kachery.node.cli"}


@pytest.mark.parametrize("package", ["kachery.node", "kachery.storage"])
def test_every_lazily_exported_name_is_listed_and_resolves(package: str) -> None:
    """A package's exports are written three times (imports for the type checker, ``__all__``,
    and the lazy table): a name missing from the table would fail only when first used."""
    module = importlib.import_module(package)
    homes = vars(module)["_HOMES"]
    assert sorted(homes) == sorted(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        assert importlib.import_module(homes[name], package).__dict__[name] is value
