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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import NotFound

from .home import HOME_ENV, NodeHome, default_home
from .progress import ProgressBar, format_bytes

PROG = "kachery-node"

Command = Callable[[argparse.Namespace, TextIO], int]


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
    parser.add_argument("--home", metavar="DIR", help=f"node home (overrides ${HOME_ENV})")
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
        p.set_defaults(command=func)
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
    p.add_argument("--link", action="store_true", help="index files where they lie (no copy)")
    p.add_argument("--json", action="store_true", help="print a JSON line per file")

    p = command("load", cmd_load, "copy a stored file out (or print its local path)")
    p.add_argument("uri", metavar="URI")
    p.add_argument("-o", "--output", metavar="DEST", help="file or directory to copy it to")

    p = command("cat", cmd_cat, "write a file's bytes (or a byte range) to stdout")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--start", type=int, default=None, metavar="N", help="first byte (default 0)")
    p.add_argument("--end", type=int, default=None, metavar="M", help="byte after the last")

    p = command("ls", cmd_ls, "list stored and linked files, newest first")
    p.add_argument("--limit", type=int, default=None, metavar="N")
    p.add_argument("--all", action="store_true", help="also list the manifests of large files")
    p.add_argument("--json", action="store_true", help="print a JSON line per file")

    p = command("verify", cmd_verify, "re-hash every stored file and report corrupt ones")
    p.add_argument("--remove", action="store_true", help="remove corrupt files from the store")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("mutable", cmd_mutable_help, "node-local key/value store (never shared)")
    msub = p.add_subparsers(title="mutable commands", metavar="ACTION", required=True)
    ms = msub.add_parser(
        "set",
        help="set KEY to VALUE",
        description="Set KEY to VALUE. KEY and "
        "VALUE are JSON when they parse as JSON, else plain strings.",
    )
    ms.add_argument("key", metavar="KEY")
    ms.add_argument("value", metavar="VALUE")
    ms.add_argument("--no-update", action="store_true", help="refuse to overwrite a value")
    ms.set_defaults(command=cmd_mutable_set)
    mg = msub.add_parser("get", help="print KEY's value as JSON (null if unset)")
    mg.add_argument("key", metavar="KEY")
    mg.set_defaults(command=cmd_mutable_get)
    md = msub.add_parser("delete", help="remove KEY")
    md.add_argument("key", metavar="KEY")
    md.set_defaults(command=cmd_mutable_delete)
    ml = msub.add_parser("list", help="print all keys and values as JSON lines")
    ml.set_defaults(command=cmd_mutable_list)
    return parser


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
    entry = home.files.require(uri)
    if args.output is None:
        if uri.chunk_of is not None:
            raise InvalidInput("a chunk has no local file of its own: use -o DEST or 'cat'")
        print(entry.path, file=out)
        return 0
    dest = Path(args.output)
    if dest.is_dir():
        dest = dest / (Path(uri.label).name or uri.sha1)
    start, end = _byte_range(uri, entry.size, None, None)
    bar = ProgressBar(f"copying {dest.name}", end - start)
    blocks = home.files.iter_range(entry, start, end)
    _write_file_atomically(dest, blocks, bar)
    bar.finish()
    if uri.chunk_of is not None:
        home.files.check_chunk(uri, dest.read_bytes())
    print(dest, file=out)
    return 0


def cmd_cat(args: argparse.Namespace, out: TextIO) -> int:
    home = NodeHome.open()
    uri = parse_file_uri(args.uri)
    entry = home.files.require(uri)
    start, end = _byte_range(uri, entry.size, args.start, args.end)
    sink = out.buffer if hasattr(out, "buffer") else None
    for block in home.files.iter_range(entry, start, end):
        if sink is not None:
            sink.write(block)
        else:
            out.write(block.decode("utf-8", errors="replace"))
    out.flush()
    return 0


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
        print(f"{checked} files checked, {len(problems)} corrupt", file=out)
    return 1 if problems and not args.remove else 0


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


# -- helpers -----------------------------------------------------------------------------------


def _byte_range(uri: FileURI, size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """The absolute ``[lo, hi)`` to read: a chunk URI's range (or the whole file), narrowed by
    ``--start``/``--end``, which count from the beginning of that range."""
    base, limit = (uri.chunk_of.start, uri.chunk_of.end) if uri.chunk_of else (0, size)
    lo = base + (0 if start is None else start)
    hi = limit if end is None else base + end
    if not base <= lo <= hi <= limit:
        shown = f"{0 if start is None else start}..{limit - base if end is None else end}"
        raise InvalidInput(f"byte range {shown} is outside 0..{limit - base}")
    return lo, hi


def _write_file_atomically(dest: Path, blocks: Iterable[bytes], bar: ProgressBar) -> None:
    """Write blocks to a temporary file beside ``dest``, then rename: no partial ``dest``."""
    tmp = dest.with_name(f".{dest.name}.kachery-part")
    done = 0
    try:
        with open(tmp, "wb") as f:
            for block in blocks:
                f.write(block)
                done += len(block)
                bar.update(done)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KacheryError(f"cannot write {dest}: {exc.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
