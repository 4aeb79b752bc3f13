"""What the command modules share: the command signature, usage errors, and groups of actions
(``kachery-node channel create``, ``feed append``, ``task request``, ...).

Non-goals: the commands themselves (cli.py, cli_feeds.py, cli_tasks.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TextIO

from kachery.node.home import HOME_ENV

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
