"""What the command modules share: the command signature, usage errors, groups of actions
(``kachery-node channel create``, ``feed append``, ``task request``, ...), the daemon client,
and the argument types (sizes, durations) several commands take.

Non-goals: the commands themselves (main.py, files.py, daemon.py, feeds.py, tasks.py,
mutables.py).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Protocol, TextIO, TypeVar

from kachery.node.client import DaemonClient
from kachery.node.home import HOME_ENV, NodeHome
from kachery.protocol.errors import InvalidInput

Command = Callable[[argparse.Namespace, TextIO], int]
"""A command: its parsed arguments and stdout in, an exit code out."""


class UsageError(Exception):
    """Arguments that do not go together (``feed read --signed`` without ``--json``), found by
    a command: reported as argparse reports its own, with the command's usage line, exit 2."""


Action = Callable[[str, Command, str], argparse.ArgumentParser]
"""Adds one action to a group: its name, command and help text; returns its parser."""


def add_home_option(parser: argparse.ArgumentParser) -> None:
    """``--home DIR`` on a command, so it works after the command name as well as before it
    (``kachery-node info --home DIR``); given in neither place, the default stays None."""
    parser.add_argument(
        "--home",
        metavar="DIR",
        default=argparse.SUPPRESS,  # absent here: keep what the top-level --home set
        help=f"node home (overrides ${HOME_ENV}); also accepted before the command",
    )


def action_group(parser: argparse.ArgumentParser, noun: str) -> Action:
    """Give ``parser`` (a command like ``feed``) required actions; returns the function that
    adds one (``action("append", cmd_feed_append, "append messages")``)."""
    sub = parser.add_subparsers(title=f"{noun} commands", metavar="ACTION", required=True)

    def action(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help_text, description=help_text)
        a.set_defaults(command=func, usage_parser=a)
        add_home_option(a)
        return a

    return action


PROG = "kachery-node"


class AddCommand(Protocol):
    """Adds one command: its name, function, help text and epilog; returns its parser."""

    def __call__(
        self, name: str, func: Command, help_text: str, epilog: str = ""
    ) -> argparse.ArgumentParser: ...


def daemon_client(stream_timeout: float | None = None) -> DaemonClient:
    """A client of the daemon of the current node home (``--home``, or the default)."""
    return DaemonClient(NodeHome.open().path, stream_timeout=stream_timeout)


def count(n: int, noun: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(text: str) -> float:
    """``50M`` (also ``500k``, ``1.5G``, ``2e6``, plain bytes) -> bytes; decimal units."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        try:
            value = float(text)
        except ValueError:
            raise InvalidInput(f"{text!r} is not a size like 50M, 500k or 1.5G") from None
    else:
        value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise InvalidInput(f"{text!r} must be more than 0")
    return value


def parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d`` (also ``s`` and ``w``) -> seconds; ``0`` -> 0, meaning never.

    Raises:
        InvalidInput: anything else (a bare number is refused: seconds or days?).
    """
    text = text.strip()
    if text == "0":
        return 0.0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise InvalidInput(
            f"invalid duration {text!r}: use a number and a unit (30m, 12h, 7d, 2w), or 0 for never"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


T = TypeVar("T")


def cli_type(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type`` that shows ``parse``'s InvalidInput message (argparse would show
    only "invalid value") as a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert
