"""The ``mutable`` commands: this node's own key/value store, never shared.

Keys and values are JSON when they parse as JSON, else plain strings (kachery's convention).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from kachery.node.cli.groups import AddCommand, action_group
from kachery.node.home import NodeHome
from kachery.storage.errors import NotFound


def add_mutable_commands(command: AddCommand) -> None:
    p = command("mutable", cmd_mutable_help, "node-local key/value store (never shared)")
    action = action_group(p, "mutable")
    a = action("set", cmd_mutable_set, "set KEY to VALUE")
    a.description = (
        "Set KEY to VALUE. KEY and VALUE are JSON when they parse as JSON, else plain strings."
    )
    a.add_argument("key", metavar="KEY")
    a.add_argument("value", metavar="VALUE")
    a.add_argument("--no-update", action="store_true", help="refuse to overwrite a value")
    a = action("get", cmd_mutable_get, "print KEY's value as JSON (null if unset)")
    a.add_argument("key", metavar="KEY")
    a = action("delete", cmd_mutable_delete, "remove KEY")
    a.add_argument("key", metavar="KEY")
    action("list", cmd_mutable_list, "print all keys and values as JSON lines")


def cmd_mutable_help(args: argparse.Namespace, out: TextIO) -> int:
    raise AssertionError("argparse requires a mutable action")


def _json_or_string(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_mutable_set(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    home.mutables.set(
        _json_or_string(args.key), _json_or_string(args.value), update=not args.no_update
    )
    return 0


def cmd_mutable_get(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    print(json.dumps(home.mutables.get(_json_or_string(args.key))), file=out)
    return 0


def cmd_mutable_delete(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    if not home.mutables.delete(_json_or_string(args.key)):
        raise NotFound(f"mutable {args.key!r} has no value")
    return 0


def cmd_mutable_list(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    for key, value in home.mutables.items():
        print(json.dumps({"key": key, "value": value}), file=out)
    return 0
