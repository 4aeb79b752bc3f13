"""The commands on files: ``store``, ``load``, ``downloads``, ``find``, ``cat``, ``ls``,
``verify``.

What is stored here is read from the node home directly; what must come from a channel is
fetched through the running daemon (``file_load``, ``file_fetch_range``), with progress on
stderr. ``load -o`` copies out of the store atomically (a temporary file, then a rename).

Non-goal: logic of its own (node/home.py and node/services/files/ do the work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from kachery.node.cli.groups import AddCommand, UsageError, count, daemon_client
from kachery.node.client import DaemonClient
from kachery.node.errors import DaemonNotRunning
from kachery.node.home import NodeHome
from kachery.node.progress import ProgressBar, format_bytes
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import NotFound


def add_file_commands(command: AddCommand) -> None:
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
    daemon = daemon_client()
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
    providers = daemon_client().call("file_find", uri=args.uri)
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
        yield daemon_client()
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
    with daemon_client().stream("file_load", uri=str(uri), from_node=from_node) as stream:
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
        print(f"{count(checked, 'file')} checked, {len(problems)} corrupt", file=out)
    return 1 if problems else 0  # corruption was found, whether or not it was removed


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
