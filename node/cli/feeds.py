"""``kachery-node feed ...``: the feed commands of the command line.

Each command calls the running daemon's ``feed_*`` API, like every daemon command (see cli.py
for the conventions: results on stdout, one-line errors on stderr, exit codes 0/1/2/130).
Messages are JSON: ``append`` takes each argument as one JSON value (``-`` reads one JSON value
per line from stdin); ``read`` and ``watch`` print ``<number><TAB><message as JSON>`` per line,
or one full JSON record per line with ``--json``.

Non-goal: logic of its own (node/services/feeds/ does the work).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from kachery.node.cli.groups import AddCommand, UsageError, action_group, daemon_client
from kachery.protocol.errors import InvalidInput
from kachery.protocol.uri import parse_feed_uri

EPILOG = """examples:
  id=$(kachery-node feed create notebook)
  kachery-node feed append feed://$id/entries '{"session": 3, "note": "probe B"}'
  kachery-node feed read feed://$id/entries --start 0
  kachery-node feed watch feed://$id/entries          # on another node, after:
  kachery-node feed subscribe feed://$id/entries lab
  kachery-node feed grant feed://$id/entries <node id>   # that node may 'feed submit'"""


def add_feed_commands(command: AddCommand) -> None:
    """Register ``feed`` and its actions with the top-level ``command`` helper of main.py."""
    p = command(
        "feed",
        cmd_feed_help,
        "signed append-only logs: create, append, read, watch live, share",
        EPILOG,
    )
    action = action_group(p, "feed")

    a = action("create", cmd_feed_create, "create a feed owned by this node; print its ID")
    a.add_argument("name", nargs="?", metavar="NAME", help="a local name to find it by")
    a.add_argument("--exist-ok", action="store_true", help="print the existing feed of NAME")
    a.add_argument("--json", action="store_true", help="print one JSON object")

    a = action("list", cmd_feed_list, "list feeds on this node, their subfeeds and counts")
    a.add_argument("--json", action="store_true", help="print one JSON array")

    a = action("append", cmd_feed_append, "sign and append messages; print their numbers")
    a.add_argument("uri", metavar="URI", help="feed://<feed id>/<subfeed name>")
    a.add_argument("messages", nargs="+", metavar="JSON", help="a JSON value; - reads stdin")

    a = action("read", cmd_feed_read, "print messages of a subfeed held on this node")
    a.add_argument("uri", metavar="URI")
    a.add_argument("--start", type=int, default=0, metavar="N", help="first message (default 0)")
    a.add_argument("--limit", type=int, default=None, metavar="M", help="at most M messages")
    a.add_argument("--json", action="store_true", help="print full records as JSON lines")
    a.add_argument(
        "--signed", action="store_true", help="include the signed body and signature (needs --json)"
    )

    a = action("watch", cmd_feed_watch, "print messages as they arrive (Ctrl-C stops)")
    a.add_argument("uri", metavar="URI")
    a.add_argument("--start", type=int, default=None, metavar="N", help="first replay from N")
    a.add_argument("--json", action="store_true", help="print full records as JSON lines")

    a = action("count", cmd_feed_count, "print how many messages of a subfeed are held here")
    a.add_argument("uri", metavar="URI")

    a = action("subscribe", cmd_feed_subscribe, "follow a subfeed live through a channel")
    a.add_argument("uri", metavar="URI")
    a.add_argument("channel", metavar="CHANNEL")

    a = action("unsubscribe", cmd_feed_unsubscribe, "stop following a subfeed")
    a.add_argument("uri", metavar="URI")
    a.add_argument("channel", nargs="?", metavar="CHANNEL", help="default: every channel")

    a = action("grant", cmd_feed_grant, "let a node submit messages to an owned subfeed")
    a.add_argument("uri", metavar="URI")
    a.add_argument("node_id", metavar="NODE_ID")
    a.add_argument("--revoke", action="store_true", help="take the grant back")

    a = action("submit", cmd_feed_submit, "ask the owner's node to append messages (granted)")
    a.add_argument("uri", metavar="URI")
    a.add_argument("messages", nargs="+", metavar="JSON", help="a JSON value; - reads stdin")
    a.add_argument("--channel", metavar="CHANNEL", help="where to find the owner (default: all)")

    a = action("delete", cmd_feed_delete, "remove a feed and its messages from this node")
    a.add_argument("feed_id", metavar="FEED_ID")
    a.add_argument(
        "--force", action="store_true", help="also for an owned feed: destroys its private key"
    )

    a = action("forks", cmd_feed_forks, "show evidence of forks (two messages, one number)")
    a.add_argument("feed_id", nargs="?", metavar="FEED_ID")
    a.add_argument("--json", action="store_true", help="print one JSON array")


def _messages(values: Iterable[str]) -> list[Any]:
    """Each argument as one JSON value; ``-`` reads one JSON value per non-empty stdin line."""
    out: list[Any] = []
    for text in values:
        lines = [line for line in sys.stdin if line.strip()] if text == "-" else [text]
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                shown = line.strip() if len(line) <= 60 else line.strip()[:57] + "..."
                raise InvalidInput(
                    f"{shown!r} is not JSON ({exc.msg}); quote strings: '\"text\"'"
                ) from None
    return out


def _print_record(record: dict[str, Any], as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(record), file=out)
    else:
        message = json.dumps(record["message"], ensure_ascii=False)
        print(f"{record['messageNumber']}\t{message}", file=out)
    out.flush()


def cmd_feed_help(args: argparse.Namespace, out: TextIO) -> int:
    raise AssertionError("argparse requires a feed action")


def cmd_feed_create(args: argparse.Namespace, out: TextIO) -> int:
    result = daemon_client().call("feed_create", name=args.name, exist_ok=args.exist_ok)
    if args.json:
        print(json.dumps(result), file=out)
    else:
        print(result["feedId"], file=out)
        what = "created" if result["created"] else "exists:"
        print(f"{what} feed {args.name or ''}".rstrip(), file=sys.stderr)
    return 0


def cmd_feed_list(args: argparse.Namespace, out: TextIO) -> int:
    feeds = daemon_client().call("feed_list")
    if args.json:
        print(json.dumps(feeds), file=out)
        return 0
    rows = []
    for f in feeds:
        subfeeds = f["subfeeds"] or [{"name": "-", "subfeedHash": "", "count": 0, "following": []}]
        for s in subfeeds:
            rows.append(
                [
                    f["feedId"][:16],
                    f["name"] or "-",
                    "yes" if f["owned"] else "no",
                    s["name"] or f"~{s['subfeedHash'][:12]}",
                    str(s["count"]),
                    ", ".join(s["following"]) or "-",
                    str(f["forks"]) if f["forks"] else "-",
                ]
            )
    if rows:
        headers = ["FEED", "NAME", "OWNED", "SUBFEED", "COUNT", "FOLLOWING IN", "FORKS"]
        widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
        for row in [headers, *rows]:
            line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
            print(line.rstrip(), file=out)
    else:
        print("no feeds on this node", file=sys.stderr)
    return 0


def cmd_feed_append(args: argparse.Namespace, out: TextIO) -> int:
    messages = _messages(args.messages)
    result = daemon_client().call("feed_append", uri=args.uri, messages=messages)
    for n in range(result["start"], result["start"] + result["count"]):
        print(n, file=out)
    return 0


def cmd_feed_read(args: argparse.Namespace, out: TextIO) -> int:
    if args.signed and not args.json:
        raise UsageError("--signed needs --json (the signatures are fields of the JSON records)")
    daemon = daemon_client()
    position, remaining = args.start, args.limit
    forked = False
    while remaining is None or remaining > 0:
        limit = 1000 if remaining is None else min(1000, remaining)
        result = daemon.call(
            "feed_read", uri=args.uri, start=position, limit=limit, signed=args.signed
        )
        forked = forked or result["forked"]
        for record in result["messages"]:
            _print_record(record, args.json, out)
        got = len(result["messages"])
        position += got
        if remaining is not None:
            remaining -= got
        if got < limit:
            break
    if forked:
        print(
            "kachery-node: warning: this subfeed has FORKED (its key signed two different"
            " messages with one number); this node keeps its own history: see 'feed forks'",
            file=sys.stderr,
        )
    return 0


def cmd_feed_watch(args: argparse.Namespace, out: TextIO) -> int:
    with daemon_client().stream("feed_watch", uri=args.uri, start=args.start) as events:
        for record in events:
            _print_record(record, args.json, out)
    if events.result and events.result.get("deleted"):
        print("the feed was deleted from this node", file=sys.stderr)
    return 0


def cmd_feed_count(args: argparse.Namespace, out: TextIO) -> int:
    print(daemon_client().call("feed_count", uri=args.uri), file=out)
    return 0


def cmd_feed_subscribe(args: argparse.Namespace, out: TextIO) -> int:
    result = daemon_client().call("feed_subscribe", uri=args.uri, channel=args.channel)
    print(
        f"following in {result['channel']}; {result['count']} messages held here so far",
        file=sys.stderr,
    )
    return 0


def cmd_feed_unsubscribe(args: argparse.Namespace, out: TextIO) -> int:
    result = daemon_client().call("feed_unsubscribe", uri=args.uri, channel=args.channel)
    print(f"stopped {result['unsubscribed']} follow(s); messages held stay", file=sys.stderr)
    return 0


def cmd_feed_grant(args: argparse.Namespace, out: TextIO) -> int:
    daemon_client().call("feed_grant", uri=args.uri, node_id=args.node_id, revoke=args.revoke)
    verb = "may no longer" if args.revoke else "may now"
    print(f"{args.node_id[:16]}... {verb} submit messages to {args.uri}", file=sys.stderr)
    return 0


def cmd_feed_submit(args: argparse.Namespace, out: TextIO) -> int:
    messages = _messages(args.messages)
    result = daemon_client().call(
        "feed_submit", uri=args.uri, messages=messages, channel=args.channel
    )
    for n in range(result["start"], result["start"] + result["count"]):
        print(n, file=out)
    print(f"appended by the owner's node {result['owner'][:16]}...", file=sys.stderr)
    return 0


def cmd_feed_delete(args: argparse.Namespace, out: TextIO) -> int:
    result = daemon_client().call("feed_delete", feed_id=args.feed_id, force=args.force)
    extra = " and its private key" if result["owned"] else ""
    print(f"deleted feed {result['feedId']}: {result['messages']} messages{extra}", file=sys.stderr)
    return 0


def _feed_id(text: str) -> str:
    """A FEED_ID argument (``feed://`` optional), checked and lowercased like ``feed delete``'s.

    Raises:
        InvalidURI: not 64 hex digits.
    """
    return parse_feed_uri(f"feed://{text.removeprefix('feed://')}").feed_id


def cmd_feed_forks(args: argparse.Namespace, out: TextIO) -> int:
    feed_id = None if args.feed_id is None else _feed_id(args.feed_id)
    forks = daemon_client().call("feed_forks", feed_id=feed_id)
    if args.json:
        print(json.dumps(forks), file=out)
        return 0
    if not forks:
        print("no forks seen", file=sys.stderr)
    for f in forks:
        print(
            f"feed {f['feedId']} subfeed {f['subfeedHash']} message {f['messageNumber']}"
            f" (other from {(f['reportedBy'] or '?')[:16]}...):",
            file=out,
        )
        print(f"  kept:  {json.dumps(f['kept']['message'])}", file=out)
        print(f"  other: {json.dumps(f['other']['message'])}", file=out)
    return 0
