"""``kachery-node task ...``: request tasks, follow them, and see who serves what.

Each command calls the running daemon's ``task_*`` API (see cli.py for the conventions: results
on stdout, one-line errors on stderr, exit codes 0/1/2/130). ``task request`` prints the result
on stdout (a JSON value as JSON; a bytes or file result as its URI; nothing for an action), a
one-line summary on stderr, and each status change on stderr when stderr is a terminal; with
``--json``, one JSON line per status change and a last line with the result. A failed task exits
1 with its error message.

Non-goals: serving tasks (a worker process does: ``kn.run_task_backend``) and logic of its own
(node/services/tasks/ does the work).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from kachery.node.cli.groups import AddCommand, action_group, daemon_client
from kachery.node.home import NodeHome
from kachery.node.progress import format_duration
from kachery.protocol.errors import InvalidInput

EPILOG = """examples:
  kachery-node task request spikesort.v1 --kwargs '{"recording": "sha1://4f2a..."}'
  kachery-node task request temperature.v1 --type query --timeout 5
  kachery-node task request notebook.append.v1 --type action --kwargs '{"text": "probe B"}'
  kachery-node task status <task or request ID>
  kachery-node task list
  kachery-node task providers

Functions are served by a worker process that calls kn.run_task_backend(); see the README."""


TASK_TYPES = ("pure-calculation", "query", "action")
"""kachery's task types (protocol.tasks.TaskType) spelled out, so that building the command line
does not import the task protocol (~27 ms on every command); a test checks that they agree."""


def add_task_commands(command: AddCommand) -> None:
    """Register ``task`` and its actions with the top-level ``command`` helper of main.py."""
    p = command(
        "task",
        cmd_task_help,
        "request tasks (cached calculations, queries, actions) from the channel",
        EPILOG,
    )
    action = action_group(p, "task")

    a = action("request", cmd_task_request, "ask the channel to run a task; print its result")
    a.add_argument("function_id", metavar="FUNCTION_ID")
    a.add_argument(
        "--kwargs", default="{}", metavar="JSON", help="keyword arguments, a JSON object"
    )
    a.add_argument(
        "--type",
        dest="task_type",
        default=TASK_TYPES[0],
        choices=TASK_TYPES,
        help="as the function was registered (default %(default)s)",
    )
    a.add_argument("--channel", metavar="NAME", help="where to ask (default: every channel)")
    a.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="seconds before it fails"
    )
    a.add_argument(
        "--request-id", metavar="ID", help="reuse to retry an action safely (runs at most once)"
    )
    a.add_argument("--no-wait", action="store_true", help="print the request ID and return")
    a.add_argument("--json", action="store_true", help="print status changes as JSON lines")

    a = action("status", cmd_task_status, "show a request (by request or task ID)")
    a.add_argument("id", metavar="ID")
    a.add_argument("--json", action="store_true", help="print one JSON object")

    a = action("list", cmd_task_list, "list recent requests and the jobs this node runs")
    a.add_argument("--limit", type=int, default=50, metavar="N")
    a.add_argument("--json", action="store_true", help="print one JSON object")

    a = action("providers", cmd_task_providers, "list the members that serve task functions")
    a.add_argument("--json", action="store_true", help="print one JSON array")


def cmd_task_help(args: argparse.Namespace, out: TextIO) -> int:
    raise AssertionError("argparse requires a task action")


def _kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"--kwargs is not JSON ({exc.msg}): pass an object like '{{\"x\": 1}}'"
        ) from None
    if not isinstance(value, dict):
        raise InvalidInput(f"--kwargs must be a JSON object, not {type(value).__name__}")
    return value


def _progress(state: dict[str, Any]) -> str:
    status = str(state["status"])
    if state.get("provider") and status in ("pending", "queued", "running"):
        status += f" at {str(state['provider'])[:16]}..."
    if state.get("note"):
        status += f" ({state['note']})"
    return status


def _elapsed(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s" if seconds < 60 else format_duration(seconds)


def _summary(state: dict[str, Any]) -> str:
    elapsed = _elapsed(float(state.get("elapsedSeconds") or 0))
    where = str(state.get("provider") or "")[:16]
    if state.get("fallback"):
        how = f"fallback: the last result, since {state.get('note') or 'no provider answered'}"
    elif state.get("cached"):
        how = "cached" + (f" (from {where}...)" if where else "")
    else:
        how = f"computed by {where}..." if where else "done"
    return f"{state['functionId']} {state['status']} in {elapsed}: {how}"


def cmd_task_request(args: argparse.Namespace, out: TextIO) -> int:
    from kachery.node.client.tasks import TaskFailed, load_result  # here: see TASK_TYPES

    daemon = daemon_client()
    state = daemon.call(
        "task_request",
        function_id=args.function_id,
        kwargs=_kwargs(args.kwargs),
        task_type=args.task_type,
        channel=args.channel,
        timeout_seconds=args.timeout,
        request_id=args.request_id,
    )
    if args.no_wait:
        if args.json:
            print(json.dumps(state), file=out)
        else:
            print(state["requestId"], file=out)
            print(f"task {state['taskId']}: {state['status']}", file=sys.stderr)
        return 0
    show = sys.stderr.isatty() and not args.json
    if state["status"] not in ("finished", "error"):
        with daemon.stream("task_wait", request_id=state["requestId"]) as events:
            for event in events:
                if args.json:
                    print(json.dumps({"event": "status", **event}), file=out, flush=True)
                elif show:
                    print(f"  {_progress(event)}", file=sys.stderr, flush=True)
            state = events.result
    if state["status"] == "error":
        if args.json:
            print(json.dumps({"event": "done", **state}), file=out)
        raise TaskFailed(f"task {args.function_id} failed: {state['error']}")
    data = state.pop("resultData", None)  # the value's bytes, shown below as the value
    value = load_result(state.get("resultUri"), state.get("resultKind"), data)
    if data is not None and isinstance(value, bytes):
        # Shown as its URI: stored now, so 'kachery-node load' reads it from the store even
        # with the daemon stopped (the daemon keeps a small result in its record, and stores
        # it only when its URI is loaded through the daemon).
        NodeHome.open().files.store_bytes(value)
    if args.json:
        shown = value if state.get("resultKind") == "json" else state.get("resultUri")
        print(json.dumps({"event": "done", **state, "result": shown}), file=out)
        return 0
    if state.get("resultKind") == "json":
        print(json.dumps(value), file=out)
    elif state.get("resultUri"):
        print(state["resultUri"], file=out)
    print(_summary(state), file=sys.stderr)
    return 0


def cmd_task_status(args: argparse.Namespace, out: TextIO) -> int:
    state = daemon_client().call("task_status", task=args.id)
    state.pop("resultData", None)  # a small result's bytes, for the Python client
    if args.json:
        print(json.dumps(state), file=out)
        return 0
    keys = [
        "requestId",
        "taskId",
        "functionId",
        "taskType",
        "status",
        "error",
        "provider",
        "cached",
        "fallback",
        "resultUri",
        "note",
        "elapsedSeconds",
    ]
    for key in keys:
        if key in state and state[key] not in (None, ""):
            print(f"{key + ':':<16} {_show(key, state[key])}", file=out)
    return 1 if state.get("status") == "error" else 0


def _show(key: str, value: Any) -> str:
    if key == "elapsedSeconds":
        return _elapsed(float(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def cmd_task_list(args: argparse.Namespace, out: TextIO) -> int:
    listing = daemon_client().call("task_list", limit=args.limit)
    if args.json:
        print(json.dumps(listing), file=out)
        return 0
    rows = [
        [
            r["requestId"][:12],
            r["functionId"],
            r["taskType"],
            r["status"]
            + (" (cached)" if r["cached"] else "")
            + (" (fallback)" if r["fallback"] else ""),
            str(r.get("provider") or "-")[:16],
            _elapsed(float(r["elapsedSeconds"])),
        ]
        for r in listing["requests"]
    ]
    if rows:
        _table(["REQUEST", "FUNCTION", "TYPE", "STATUS", "PROVIDER", "TIME"], rows, out)
    else:
        print("no task requests made through this node since it started", file=sys.stderr)
    jobs = [
        [j["jobId"], j["functionId"], j["taskType"], j["status"], str(j["waiters"])]
        for j in listing["jobs"]
    ]
    if jobs:
        print(file=out)
        _table(["JOB (run here)", "FUNCTION", "TYPE", "STATUS", "WAITERS"], jobs, out)
    return 0


def cmd_task_providers(args: argparse.Namespace, out: TextIO) -> int:
    providers = daemon_client().call("task_providers")
    if args.json:
        print(json.dumps(providers), file=out)
        return 0
    rows = [
        [
            p["nodeId"][:16] + (" (this node)" if p["self"] else ""),
            p["channel"],
            ", ".join(f"{f} ({t})" for f, t in sorted(p["functions"].items())),
        ]
        for p in providers
    ]
    if rows:
        _table(["NODE", "CHANNEL", "FUNCTIONS"], rows, out)
    else:
        print("no connected member serves task functions", file=sys.stderr)
    return 0


def _table(headers: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
