"""The layering is a tested rule: protocol/ is sans-I/O, storage/ never reaches up into node/."""

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


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in imported_modules(path):
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    assert violations(layer) == []


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom sqlalchemy import select\nfrom kachery.node import cli\n")
    assert imported_modules(bad) >= {"trio", "sqlalchemy", "kachery.node"}


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
