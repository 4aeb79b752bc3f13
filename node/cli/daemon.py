"""``kachery-node start``, and the commands that talk to a running daemon about the network:
``status``, ``peers``, ``channel ...``, ``join``, ``leave``.

Non-goal: logic of its own (node/daemon/ does the work).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit

from kachery.node.cli.groups import (
    PROG,
    AddCommand,
    action_group,
    cli_type,
    daemon_client,
    parse_duration,
    parse_size,
)
from kachery.node.client import DEFAULT_TIMEOUT, DaemonClient
from kachery.node.home import NodeHome
from kachery.node.progress import format_bytes, format_duration
from kachery.protocol.channel import MAX_ADDRESS_CHARS, Role, parse_roles
from kachery.protocol.errors import InvalidInput

DEFAULT_LISTEN_PORT = 20432
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_LISTEN_PORT}"
DEFAULT_API_PORT = 20431
"""kachery-daemon's API port, so tools that probe it find kachery-node."""


def add_daemon_commands(command: AddCommand) -> None:
    """``start`` and the commands that talk to a running daemon."""
    p = command(
        "start",
        cmd_start,
        "run this node's daemon in the foreground; Ctrl-C stops it",
        "The daemon accepts peers on --listen and serves the other commands (status, peers,\n"
        "channel, join, leave) through a local API on 127.0.0.1 only.\n\n"
        "examples:\n  kachery-node start\n"
        "  kachery-node start --listen 0.0.0.0:20432 --announce ws://lab1.example.org:20432",
    )
    p.add_argument(
        "--listen",
        type=cli_type(_host_port, "listen address"),
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="where peers connect (default %(default)s)",
    )
    p.add_argument(
        "--api-port",
        type=cli_type(_port, "port"),
        default=DEFAULT_API_PORT,
        metavar="PORT",
        help="local API port on 127.0.0.1 (default %(default)s, kachery-daemon's)",
    )
    p.add_argument(
        "--max-upload-rate",
        type=cli_type(parse_size, "rate"),
        default=None,
        metavar="BYTES",
        help="cap on what this node serves to peers, per second, like 50M (default: no cap)",
    )
    p.add_argument(
        "--announce",
        action="extend",
        nargs="+",
        type=cli_type(_announce_address, "address"),
        default=[],
        metavar="ADDR",
        help="address peers should dial: ws://HOST:PORT or wss://HOST:PORT (repeatable)",
    )
    # SUPPRESS: without -v here, the global `kachery-node -v start` keeps its value.
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log debugging detail",
    )

    p = command("status", cmd_status, "print what the running daemon is doing", "")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "peers",
        cmd_peers,
        "list the peers the daemon is connected to",
        "examples:\n  kachery-node peers\n  kachery-node peers --wait 2   # until 2 are connected",
    )
    p.add_argument(
        "--wait",
        type=cli_type(_count_arg, "count"),
        default=0,
        metavar="N",
        help="first wait (up to --timeout) until N peers are connected",
    )
    p.add_argument(
        "--wait-for",
        nargs="+",
        default=[],
        metavar="NODE_ID",
        help="first wait (up to --timeout) for these peers",
    )
    p.add_argument(
        "--timeout",
        type=cli_type(_seconds_arg, "seconds"),
        default=30,
        metavar="S",
        help="seconds --wait and --wait-for wait at most (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON array")

    p = command(
        "channel",
        cmd_channel_help,
        "create channels, invite nodes, manage members",
        "examples:\n  kachery-node channel create lab --label 'Smith lab'\n"
        "  kachery-node channel invite lab --roles requestFiles,provideFiles --expires 2d\n"
        "  kachery-node channel members lab",
    )
    action = action_group(p, "channel")

    a = action("create", cmd_channel_create, "create a channel, with this node as its admin")
    a.add_argument("name", metavar="NAME", help="this node's name for it (no spaces)")
    a.add_argument("--label", help="a description shown to members (default: NAME)")
    a.add_argument("--json", action="store_true", help="print the channel as JSON")
    a = action("invite", cmd_channel_invite, "print an invite token granting roles")
    a.add_argument("name", metavar="NAME")
    a.add_argument(
        "--roles",
        required=True,
        type=cli_type(_role_names, "roles"),
        metavar="ROLES",
        help=f"comma-separated: {', '.join(r.value for r in Role)}, or all",
    )
    a.add_argument(
        "--expires",
        type=cli_type(parse_duration, "duration"),
        metavar="DURATION",
        help="lifetime like 30m, 12h, 7d; 0 for never (default 7d)",
    )
    a.add_argument("--uses", type=int, metavar="N", help="how many nodes may use it (default any)")
    a = action("list", cmd_channel_list, "list this node's channels")
    a.add_argument("--json", action="store_true", help="print one JSON array")
    a = action("members", cmd_channel_members, "list a channel's members and their roles")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a = action("set-roles", cmd_channel_set_roles, "give a member exactly these roles (admin)")
    a.add_argument("name", metavar="NAME")
    a.add_argument("node_id", metavar="NODE_ID")
    a.add_argument("roles", metavar="ROLES", type=cli_type(_role_names, "roles"))
    a = action("remove", cmd_channel_remove, "remove a member from a channel (admin)")
    a.add_argument("name", metavar="NAME")
    a.add_argument("node_id", metavar="NODE_ID")

    p = command("join", cmd_join, "join a channel with an invite token", "")
    p.add_argument("token", metavar="TOKEN")
    p.add_argument("--name", help="this node's name for the channel (default: from its label)")
    p.add_argument("--json", action="store_true", help="print the channel as JSON")

    p = command("leave", cmd_leave, "stop taking part in a channel on this node", "")
    p.add_argument("name", metavar="NAME")


def cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    from kachery.node.daemon.process import (
        run_daemon,  # here: only `start` needs trio and the network stack
    )

    home = NodeHome.open()
    run_daemon(
        home,
        listen=args.listen,
        api_port=args.api_port,
        announce=args.announce,
        verbose=args.verbose,
        max_upload_rate=args.max_upload_rate,
    )
    print(f"{PROG}: daemon stopped", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    status = daemon_client().call("status")
    if args.json:
        print(json.dumps(status), file=out)
        return 0
    width = max((len(_label(key)) for key in status), default=0) + 2
    for key, value in status.items():
        if isinstance(value, dict):  # a service's counters: "label value" items, wrapped
            items = [f"{_label(k)} {_show(k, v)}" for k, v in value.items()]
            lines = _pack(items, STATUS_COLUMNS - width) or ["-"]
        else:
            lines = [_show(key, value)]
        print(f"{_label(key) + ':':<{width}}{lines[0]}", file=out)
        for line in lines[1:]:
            print(" " * width + line, file=out)
    return 0


def cmd_peers(args: argparse.Namespace, out: TextIO) -> int:
    if args.wait or args.wait_for:
        # The daemon gives up after --timeout; the client waits a little longer for its answer.
        client = DaemonClient(NodeHome.open().path, timeout=max(DEFAULT_TIMEOUT, args.timeout + 30))
        peers = client.call(
            "wait_peers",
            node_ids=args.wait_for or None,
            count=args.wait or 1,
            within_seconds=args.timeout,
        )
    else:
        peers = daemon_client().call("peers")
    if args.json:
        print(json.dumps(peers), file=out)
        return 0
    if not peers:
        print("no peers connected", file=sys.stderr)
        return 0
    rows = [
        [
            str(p.get("nodeId", ""))[:16],
            str(p.get("address") or "-"),
            str(p.get("direction", "")),
            _show("channels", p.get("channels", [])),
            "-" if p.get("rttMs") is None else f"{p['rttMs']:.1f}",
            format_duration(float(p.get("connectedSeconds", 0))),
        ]
        for p in peers
    ]
    headers = ["NODE", "ADDRESS", "DIR", "CHANNELS", "RTT MS", "CONNECTED"]
    _print_table(headers, rows, out)
    return 0


def cmd_channel_help(args: argparse.Namespace, out: TextIO) -> int:
    raise AssertionError("argparse requires a channel action")


def cmd_channel_create(args: argparse.Namespace, out: TextIO) -> int:
    channel = daemon_client().call("channel_create", name=args.name, label=args.label)
    if args.json:
        print(json.dumps(channel), file=out)
    else:
        print(channel.get("channelId", ""), file=out)
        print(f"created channel {args.name}", file=sys.stderr)
    return 0


def cmd_channel_invite(args: argparse.Namespace, out: TextIO) -> int:
    if not args.roles:
        raise InvalidInput("--roles names no role: an invite must grant at least one")
    answer = daemon_client().call(
        "channel_invite",
        name=args.name,
        roles=args.roles,
        expires_seconds=args.expires,
        uses=args.uses,
    )
    print(answer["token"], file=out)
    return 0


def cmd_channel_list(args: argparse.Namespace, out: TextIO) -> int:
    channels = daemon_client().call("channel_list")
    if args.json:
        print(json.dumps(channels), file=out)
        return 0
    rows = [
        [
            str(c.get("name", "")),
            str(c.get("label", "")),
            str(c.get("members", "")),
            str(c.get("version", "")),
            _show("roles", c.get("roles", [])) if c.get("member", True) else "(removed)",
            str(c.get("channelId", ""))[:16],
        ]
        for c in channels
    ]
    if rows:
        _print_table(["NAME", "LABEL", "MEMBERS", "VERSION", "MY ROLES", "CHANNEL"], rows, out)
    return 0


def cmd_channel_members(args: argparse.Namespace, out: TextIO) -> int:
    channel = daemon_client().call("channel_members", name=args.name)
    if args.json:
        print(json.dumps(channel), file=out)
        return 0
    rows = []
    for m in channel.get("members", []):
        mark = " (this node)" if m.get("self") else (" (connected)" if m.get("connected") else "")
        rows.append(
            [str(m.get("nodeId", "")), str(m.get("label", "")) + mark, _show("roles", m["roles"])]
        )
    if rows:
        _print_table(["NODE ID", "LABEL", "ROLES"], rows, out)
    return 0


def cmd_channel_set_roles(args: argparse.Namespace, out: TextIO) -> int:
    daemon_client().call(
        "channel_set_roles", name=args.name, node_id=args.node_id, roles=args.roles
    )
    print(f"{args.node_id[:16]}... now has roles: {_show('roles', args.roles)}", file=sys.stderr)
    return 0


def cmd_channel_remove(args: argparse.Namespace, out: TextIO) -> int:
    daemon_client().call("channel_remove", name=args.name, node_id=args.node_id)
    print(f"removed {args.node_id[:16]}... from {args.name}", file=sys.stderr)
    return 0


def cmd_join(args: argparse.Namespace, out: TextIO) -> int:
    channel = daemon_client().call("channel_join", token=args.token, name=args.name)
    if args.json:
        print(json.dumps(channel), file=out)
    else:
        print(channel.get("name", ""), file=out)
        roles = _show("roles", channel.get("roles", []))
        print(f"joined channel {channel.get('label', '')!r} with roles: {roles}", file=sys.stderr)
    return 0


def cmd_leave(args: argparse.Namespace, out: TextIO) -> int:
    daemon_client().call("channel_leave", name=args.name)
    print(f"left channel {args.name}", file=sys.stderr)
    return 0


def _role_names(text: str) -> list[str]:
    return sorted(role.value for role in parse_roles(text))


def _host_port(text: str) -> str:
    _, sep, port = text.rpartition(":")
    if not sep:
        raise InvalidInput(f"{text!r} is not HOST:PORT (like 0.0.0.0:{DEFAULT_LISTEN_PORT})")
    _port(port)
    return text


def _announce_address(text: str) -> str:
    """An address peers dial: ``ws://HOST:PORT`` or ``wss://HOST:PORT`` (a path may follow)."""
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port is None:
        raise InvalidInput(
            f"{text!r} is not an address peers can dial: use ws://HOST:PORT or wss://HOST:PORT"
            f" (like ws://lab1.example.org:{DEFAULT_LISTEN_PORT})"
        )
    if len(text) > MAX_ADDRESS_CHARS:
        raise InvalidInput(f"{text[:40]!r}... is longer than {MAX_ADDRESS_CHARS} characters")
    return text


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidInput(f"{text!r} is not a count (0, 1, 2, ...)")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise InvalidInput(f"{text!r} is not a number of seconds, like 30 or 2.5")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise InvalidInput(f"{text!r} is not a port number (0-65535)")
    return port


STATUS_COLUMNS = 100
"""``status`` wraps a service's counters to this width."""

_LABELS = {"nodeId": "node ID", "pid": "process ID"}


def _label(key: str) -> str:
    """A daemon answer's camelCase key, for people: ``bytesUploaded`` -> ``uploaded``,
    ``uptimeSeconds`` -> ``uptime``, ``offencesByPeer`` -> ``offences by peer`` (the unit
    shows in the value)."""
    if key in _LABELS:
        return _LABELS[key]
    words = re.sub(r"([A-Z])", r" \1", key).lower().split()
    if len(words) > 1 and words[-1] == "seconds":
        words.pop()
    if len(words) > 1 and words[0] == "bytes":
        words.pop(0)
    return " ".join(words)


def _show(key: str, value: Any) -> str:
    """A value of a daemon answer, for people."""
    if isinstance(value, list):
        return ", ".join(_short(_show(key, item)) for item in value) or "-"
    if isinstance(value, dict):
        if "name" in value:  # a channel, a peer
            return str(value["name"])
        return ", ".join(f"{_short(k)} {_show(k, v)}" for k, v in value.items()) or "-"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if key.endswith("Seconds"):
            return format_duration(value)
        if key.startswith("bytes") or key.endswith("Bytes"):
            return format_bytes(value)
    return str(value)


def _short(text: str) -> str:
    """A node ID or SHA-1 (hex, 40+ digits) cut to 16 digits; other text as it is."""
    return text[:16] + "..." if len(text) >= 40 and re.fullmatch(r"[0-9a-f]+", text) else text


def _pack(items: list[str], width: int) -> list[str]:
    """``items`` joined by ", " into lines of at most ``width`` characters (an item longer
    than that gets a line of its own)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) + 1 <= width:
            lines[-1] += f", {item}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(item)
    return lines


def _print_table(headers: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
