"""The ``kachery-node`` command line.

Every command prints its result on stdout (a URI alone on its line, so scripts can capture it;
JSON with ``--json``), progress on stderr when stderr is a terminal, and exits 0 on success or 1
with a one-line ``kachery-node: error: ...`` otherwise (2 for usage mistakes, 130 for Ctrl-C).
Non-goal: logic of its own. Commands call the same ``NodeHome`` API the Python client uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from kachery.node.cli.daemon import add_daemon_commands
from kachery.node.cli.feeds import add_feed_commands
from kachery.node.cli.files import add_file_commands
from kachery.node.cli.groups import PROG, Command, UsageError, add_home_option
from kachery.node.cli.mutables import add_mutable_commands
from kachery.node.cli.tasks import add_task_commands
from kachery.node.home import HOME_ENV, NodeHome, default_home
from kachery.node.progress import format_bytes
from kachery.protocol.errors import KacheryError


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kachery-node`` console script."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run one command; returns the exit code (``main`` exits with it)."""
    out = stdout if stdout is not None else sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.home is not None:
        os.environ[HOME_ENV] = str(Path(args.home).expanduser().absolute())
    command: Command = args.command
    try:
        return command(args, out)
    except UsageError as exc:
        usage_parser: argparse.ArgumentParser = getattr(args, "usage_parser", parser)
        usage_parser.error(str(exc))  # exits 2
    except KacheryError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`kachery-node cat ... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Share files, feeds and tasks peer to peer inside private lab channels.",
        epilog=f"The node home is ${HOME_ENV} (default ~/.kachery-node), or --home.",
    )
    parser.add_argument(
        "--home", metavar="DIR", help=f"node home (overrides ${HOME_ENV}); also after the command"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(
        name: str, func: Command, help_text: str, epilog: str = ""
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(command=func, usage_parser=p)
        add_home_option(p)
        return p

    command("init", cmd_init, "create the node home and its key; print the node ID")

    p = command("info", cmd_info, "print the node ID, home, and store size and counts")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    add_file_commands(command)
    add_mutable_commands(command)
    add_feed_commands(command)
    add_task_commands(command)
    add_daemon_commands(command)
    return parser


def cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    home, created = NodeHome.init(default_home())
    print(home.node_id, file=out)
    what = "created" if created else "already existed"
    print(f"node home {home.path} {what}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    stats = home.files.stats()
    info = {
        "nodeId": home.node_id,
        "home": str(home.path),
        "files": stats.count,
        "linkedFiles": stats.linked,
        "totalBytes": stats.total_bytes,
    }
    if args.json:
        print(json.dumps(info), file=out)
    else:
        print(f"node ID:  {home.node_id}", file=out)
        print(f"home:     {home.path}", file=out)
        print(
            f"files:    {stats.count} ({stats.linked} linked), {format_bytes(stats.total_bytes)}",
            file=out,
        )
    return 0
