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
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from kachery.node.cli.feeds import add_feed_commands
from kachery.node.cli.groups import Command, UsageError, action_group, add_home_option
from kachery.node.cli.tasks import add_task_commands
from kachery.node.client import DEFAULT_TIMEOUT, DaemonClient
from kachery.node.errors import DaemonNotRunning
from kachery.node.home import HOME_ENV, NodeHome, default_home
from kachery.node.progress import ProgressBar, format_bytes, format_duration
from kachery.protocol.channel import MAX_ADDRESS_CHARS, Role, parse_roles
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import NotFound

PROG = "kachery-node"
DEFAULT_LISTEN_PORT = 20432
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_LISTEN_PORT}"
DEFAULT_API_PORT = 20431
"""kachery-daemon's API port, so tools that probe it find kachery-node."""


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

    p = command(
        "store",
        cmd_store,
        "store files and print one URI per file",
        epilog="examples:\n  kachery-node store data.nwb\n  uri=$(kachery-node store -- - < x.bin)"
        "\n  kachery-node store --link /big/recording.dat",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="file to store; - reads stdin")
    p.add_argument(
        "--link", action="store_true", help="index files where they lie (no copy; not for -)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON line per file")

    p = command(
        "load",
        cmd_load,
        "get a file: from this node's store, else from the channel (through the daemon)",
        "Prints the file's local path, or copies it to DEST. A file not stored here is fetched\n"
        "from every member that provides it, verified piece by piece; an interrupted load\n"
        "resumes where it stopped.\n\n"
        "examples:\n  kachery-node load sha1://4f2a...?manifest=9b1c... -o recording.dat\n"
        "  kachery-node load sha1://4f2a... --from 1c9e77...   # only from that node",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("-o", "--output", metavar="DEST", help="file or directory to copy it to")
    p.add_argument("--from", dest="from_node", metavar="NODE_ID", help="fetch only from this node")
    p.add_argument(
        "--json", action="store_true", help="print progress and the result as JSON lines"
    )

    p = command(
        "downloads",
        cmd_downloads,
        "list unfinished loads, or discard one to free its space",
        "An unfinished load is one loading now, one that was interrupted, or a file read only in\n"
        "part (cat --start/--end fetches just the pieces a range needs). Its verified pieces stay\n"
        "on disk: run load again to finish it, or discard it (a later load starts over).\n\n"
        "examples:\n"
        "  kachery-node downloads\n"
        "  kachery-node downloads --discard sha1://4f2a...   # or just the 40 hex digits",
    )
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument(
        "--discard",
        metavar="URI",
        action="append",
        help="drop this unfinished load and its partial file (repeatable)",
    )

    p = command("find", cmd_find, "list the connected members that provide a file")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print one JSON line per provider")

    p = command(
        "cat",
        cmd_cat,
        "write a file's bytes (or a byte range) to stdout; a range of a file that is not\n"
        "stored here fetches only the pieces that cover it",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("--start", type=int, default=None, metavar="N", help="first byte (default 0)")
    p.add_argument("--end", type=int, default=None, metavar="M", help="byte after the last")

    p = command("ls", cmd_ls, "list stored and linked files, newest first")
    p.add_argument("--limit", type=int, default=None, metavar="N")
    p.add_argument("--all", action="store_true", help="also list the manifests of large files")
    p.add_argument("--json", action="store_true", help="print a JSON line per file")

    p = command(
        "verify",
        cmd_verify,
        "re-hash every stored file and report corrupt ones; exit 1 if any is corrupt",
    )
    p.add_argument(
        "--remove", action="store_true", help="remove corrupt files from the store (still exit 1)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

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

    add_feed_commands(command)
    add_task_commands(command)
    _add_daemon_commands(command)
    return parser


def _add_daemon_commands(
    command: Callable[[str, Command, str, str], argparse.ArgumentParser],
) -> None:
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
        type=_cli_type(_host_port, "listen address"),
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="where peers connect (default %(default)s)",
    )
    p.add_argument(
        "--api-port",
        type=_cli_type(_port, "port"),
        default=DEFAULT_API_PORT,
        metavar="PORT",
        help="local API port on 127.0.0.1 (default %(default)s, kachery-daemon's)",
    )
    p.add_argument(
        "--max-upload-rate",
        type=_cli_type(parse_size, "rate"),
        default=None,
        metavar="BYTES",
        help="cap on what this node serves to peers, per second, like 50M (default: no cap)",
    )
    p.add_argument(
        "--announce",
        action="extend",
        nargs="+",
        type=_cli_type(_announce_address, "address"),
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
        type=_cli_type(_count_arg, "count"),
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
        type=_cli_type(_seconds_arg, "seconds"),
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
        type=_cli_type(_role_names, "roles"),
        metavar="ROLES",
        help=f"comma-separated: {', '.join(r.value for r in Role)}, or all",
    )
    a.add_argument(
        "--expires",
        type=_cli_type(parse_duration, "duration"),
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
    a.add_argument("roles", metavar="ROLES", type=_cli_type(_role_names, "roles"))
    a = action("remove", cmd_channel_remove, "remove a member from a channel (admin)")
    a.add_argument("name", metavar="NAME")
    a.add_argument("node_id", metavar="NODE_ID")

    p = command("join", cmd_join, "join a channel with an invite token", "")
    p.add_argument("token", metavar="TOKEN")
    p.add_argument("--name", help="this node's name for the channel (default: from its label)")
    p.add_argument("--json", action="store_true", help="print the channel as JSON")

    p = command("leave", cmd_leave, "stop taking part in a channel on this node", "")
    p.add_argument("name", metavar="NAME")


# -- commands ----------------------------------------------------------------------------------


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


def cmd_store(args: argparse.Namespace, out: TextIO) -> int:
    if args.link and "-" in args.paths:
        raise UsageError("--link indexes a file where it lies: stdin has no place to link to")
    home = NodeHome.open()
    for name in args.paths:
        if name == "-":
            bar = ProgressBar("storing stdin", None)
            entry = home.files.store_stream(sys.stdin.buffer, progress=bar.update)
            label = ""
        else:
            path = Path(name)
            size = path.stat().st_size if path.is_file() else None
            verb = "hashing" if args.link else "storing"
            bar = ProgressBar(f"{verb} {path.name}", size)
            entry = home.files.store_path(path, link=args.link, progress=bar.update)
            label = path.name
        bar.finish()
        uri = entry.uri(label)
        if args.json:
            record = {"path": name, "uri": str(uri), "size": entry.size, "linked": entry.linked}
            print(json.dumps(record), file=out)
        else:
            print(uri, file=out)
    return 0


def cmd_load(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    uri = parse_file_uri(args.uri)
    located = home.stored_blob(uri)
    if located is None and uri.chunk_of is not None:
        located = home.files.locate(uri)  # a chunk is read from its whole file, if that is here
    if located is None:
        try:  # the daemon answers at once for what this node links, and fetches the rest
            located = _fetch(uri, args.from_node, args.json, out)
        except DaemonNotRunning:
            located = home.files.locate(uri)
            if located is None:
                raise _no_daemon_to_fetch(uri) from None
    path, lo, hi = located
    if args.output is None:
        if (lo, hi) != (0, path.stat().st_size):
            raise InvalidInput("a chunk has no local file of its own: use -o DEST or 'cat'")
        _print_result(args.json, out, {"event": "loaded", "path": str(path)}, str(path))
        return 0
    dest = Path(args.output)
    if dest.is_dir():
        dest = dest / (Path(uri.label).name or uri.sha1)
    bar = ProgressBar(f"copying {dest.name}", hi - lo, enabled=None if not args.json else False)
    # A chunk's bytes were checked where they were found (LocalFiles.locate, or the daemon).
    _copy_atomically(path, lo, hi, dest, bar)
    bar.finish()
    _print_result(args.json, out, {"event": "loaded", "path": str(dest)}, str(dest))
    return 0


def cmd_downloads(args: argparse.Namespace, out: TextIO) -> int:
    daemon = _daemon()
    if args.discard:
        uris = [u if "://" in u else f"sha1://{u}" for u in args.discard]
        for uri in uris:
            parse_file_uri(uri)  # every URI checked before anything is dropped
        for uri in uris:
            done = daemon.call("file_discard_download", uri=uri)
            if args.json:
                print(json.dumps(done), file=out)
            else:
                freed = format_bytes(done["freedBytes"])
                print(f"discarded sha1://{done['sha1']} ({freed} freed)", file=out)
        return 0
    downloads = daemon.call("file_downloads")
    if args.json:
        print(json.dumps(downloads), file=out)
        return 0
    if not downloads:
        print("no unfinished loads", file=out)
    for d in downloads:
        state = "loading" if d["active"] else "unfinished"
        print(
            f"sha1://{d['sha1']}  {format_bytes(d['size'])}  {d['verifiedPieces']}/{d['pieces']}"
            f" pieces verified ({format_bytes(d['verifiedBytes'])})  {state}",
            file=out,
        )
    return 0


def cmd_find(args: argparse.Namespace, out: TextIO) -> int:
    providers = _daemon().call("file_find", uri=args.uri)
    for p in providers:
        if args.json:
            print(json.dumps(p), file=out)
        else:
            print(f"{p['nodeId']}  {p['channel']}  {format_bytes(p['size'])}", file=out)
    if not providers and not args.json:
        raise NotFound(f"no connected member provides {args.uri}")
    return 0


def cmd_cat(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    uri = parse_file_uri(args.uri)
    _check_range_order(args.start, args.end)
    local = home.files.locate(uri)
    if local is not None:
        path, lo, hi = local
        what = "the file" if uri.chunk_of is None else "the chunk"
        first, stop = _relative_range(args.start, args.end, hi - lo, what)
        start, end = lo + first, lo + stop
    else:
        with _fetching(uri) as client:
            answer = client.call(
                "file_fetch_range", uri=str(uri), start=args.start or 0, end=args.end
            )
        path, start, end = Path(answer["path"]), answer["start"], answer["end"]
    sink = out.buffer if hasattr(out, "buffer") else None
    for block in _read_range(path, start, end):
        if sink is not None:
            sink.write(block)
        else:
            out.write(block.decode("utf-8", errors="replace"))
    out.flush()
    return 0


def _no_daemon_to_fetch(uri: FileURI) -> NotFound:
    return NotFound(
        f"{uri} is not stored on this node, and no daemon is running to fetch it from a"
        " channel: start one with 'kachery-node start'"
    )


@contextmanager
def _fetching(uri: FileURI) -> Iterator[DaemonClient]:
    """A daemon client for fetching ``uri``, with the error a user needs if none runs."""
    try:
        yield _daemon()
    except DaemonNotRunning:
        raise _no_daemon_to_fetch(uri) from None


def _fetch(
    uri: FileURI, from_node: str | None, as_json: bool, out: TextIO
) -> tuple[Path, int, int]:
    """Fetch a file (or chunk) through the daemon, showing progress; where it landed.

    Raises:
        DaemonNotRunning: no daemon runs for this home.
    """
    label = f"loading {uri.label or uri.sha1[:12]}"
    bar = ProgressBar(label, None, enabled=None if not as_json else False)
    with _daemon().stream("file_load", uri=str(uri), from_node=from_node) as stream:
        for event in stream:
            if as_json:
                print(json.dumps({"event": "progress", **event}), file=out, flush=True)
            else:
                bar.total = event.get("total")
                bar.extra = f"{event.get('providers', 0)} providers"
                bar.update(int(event.get("done", 0)))
        result = stream.result
    bar.finish()
    path = Path(result["path"])
    return path, 0, int(result["size"])


def _read_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        remaining = end - start
        while remaining:
            block = f.read(min(4 << 20, remaining))
            if not block:
                raise KacheryError(f"{path} ended before byte {end}")
            remaining -= len(block)
            yield block


def _print_result(as_json: bool, out: TextIO, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record) if as_json else text, file=out)


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    for entry in home.files.entries(limit=args.limit, include_manifests=args.all):
        if args.json:
            record = {
                "uri": str(entry.uri()),
                "size": entry.size,
                "linked": entry.linked,
                "path": str(entry.path),
                "storedAt": entry.stored_at,
            }
            print(json.dumps(record), file=out)
        else:
            kind = "link" if entry.linked else "    "
            print(f"{entry.uri()}  {format_bytes(entry.size):>10}  {kind}", file=out)
    return 0


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    total = home.files.stats().total_bytes
    bar = ProgressBar("verifying", total)
    checked, problems = home.files.verify(remove=args.remove, progress=bar.update)
    bar.finish()
    if args.json:
        report = {
            "checked": checked,
            "problems": [
                {"sha1": p.sha1, "path": str(p.path), "problem": p.problem, "removed": p.removed}
                for p in problems
            ],
        }
        print(json.dumps(report), file=out)
    else:
        for p in problems:
            action = " (removed)" if p.removed else ""
            print(f"CORRUPT {p.sha1} {p.path}: {p.problem}{action}", file=out)
        print(f"{_count(checked, 'file')} checked, {len(problems)} corrupt", file=out)
    return 1 if problems else 0  # corruption was found, whether or not it was removed


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


# -- the daemon and the commands that talk to it -----------------------------------------------


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


def _daemon() -> DaemonClient:
    return DaemonClient(NodeHome.open().path)


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    status = _daemon().call("status")
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
        peers = _daemon().call("peers")
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
    channel = _daemon().call("channel_create", name=args.name, label=args.label)
    if args.json:
        print(json.dumps(channel), file=out)
    else:
        print(channel.get("channelId", ""), file=out)
        print(f"created channel {args.name}", file=sys.stderr)
    return 0


def cmd_channel_invite(args: argparse.Namespace, out: TextIO) -> int:
    if not args.roles:
        raise InvalidInput("--roles names no role: an invite must grant at least one")
    answer = _daemon().call(
        "channel_invite",
        name=args.name,
        roles=args.roles,
        expires_seconds=args.expires,
        uses=args.uses,
    )
    print(answer["token"], file=out)
    return 0


def cmd_channel_list(args: argparse.Namespace, out: TextIO) -> int:
    channels = _daemon().call("channel_list")
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
    channel = _daemon().call("channel_members", name=args.name)
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
    _daemon().call("channel_set_roles", name=args.name, node_id=args.node_id, roles=args.roles)
    print(f"{args.node_id[:16]}... now has roles: {_show('roles', args.roles)}", file=sys.stderr)
    return 0


def cmd_channel_remove(args: argparse.Namespace, out: TextIO) -> int:
    _daemon().call("channel_remove", name=args.name, node_id=args.node_id)
    print(f"removed {args.node_id[:16]}... from {args.name}", file=sys.stderr)
    return 0


def cmd_join(args: argparse.Namespace, out: TextIO) -> int:
    channel = _daemon().call("channel_join", token=args.token, name=args.name)
    if args.json:
        print(json.dumps(channel), file=out)
    else:
        print(channel.get("name", ""), file=out)
        roles = _show("roles", channel.get("roles", []))
        print(f"joined channel {channel.get('label', '')!r} with roles: {roles}", file=sys.stderr)
    return 0


def cmd_leave(args: argparse.Namespace, out: TextIO) -> int:
    _daemon().call("channel_leave", name=args.name)
    print(f"left channel {args.name}", file=sys.stderr)
    return 0


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


T = TypeVar("T")


def _cli_type(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type`` that shows ``parse``'s InvalidInput message (argparse would show
    only "invalid value") as a usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


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


def _count(n: int, noun: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print_table(headers: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


# -- helpers -----------------------------------------------------------------------------------


def _check_range_order(start: int | None, end: int | None) -> None:
    """What can be said of ``--start``/``--end`` without knowing the size."""
    for flag, value in (("--start", start), ("--end", end)):
        if value is not None and value < 0:
            raise InvalidInput(f"{flag} {value} is negative: bytes are counted from 0")
    if start is not None and end is not None and start > end:
        raise InvalidInput(f"--start {start} is after --end {end}")


def _relative_range(
    start: int | None, end: int | None, size: int, what: str = "the file"
) -> tuple[int, int]:
    """``--start``/``--end`` (from the start of the URI's bytes), checked against ``size``."""
    _check_range_order(start, end)
    for flag, value in (("--start", start), ("--end", end)):
        if value is not None and value > size:
            raise InvalidInput(f"{flag} {value} is past the end of {what} (size {size} bytes)")
    return 0 if start is None else start, size if end is None else end


def _copy_atomically(path: Path, start: int, end: int, dest: Path, bar: ProgressBar) -> None:
    """Copy bytes ``[start, end)`` of ``path`` to a temporary file beside ``dest``, fsync it, then
    rename: no partial ``dest``. The copy bypasses the page cache where the filesystem allows
    (``copy_to``): through it, copying 1 GiB out of the store took this VM 0.75-3.7 s and up to
    3 CPU-seconds; with O_DIRECT, 0.8-1.0 s and 0.3."""
    from kachery.storage.blobstore import copy_to  # here: only load -o copies (~10 ms to import)

    try:
        source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise KacheryError(f"cannot read {path}: {exc.strerror}") from None
    tmp = dest.with_name(f".{dest.name}.kachery-part")
    try:
        with source, open(tmp, "wb", buffering=0) as f:
            source.seek(start)
            copy_to(source, f.fileno(), end - start, what=str(dest), progress=bar.update)
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KacheryError(f"cannot write {dest}: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
