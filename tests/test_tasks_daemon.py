"""Tasks end to end: real daemons in subprocesses, real worker processes running a user's script
(``kn.taskfunction`` + ``kn.run_task_backend``), the Python client and the command line. A
worker is killed with SIGKILL in the middle of a task; the daemon survives and the task runs
elsewhere, or fails once its timeout passes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import kachery.node as kn
from kachery.node.client.tasks import TaskFunction, execute_job, load_result
from kachery.node.errors import NodeError
from kachery.node.home import HOME_ENV, NodeHome
from kachery.node.testing import CommandFailed, Daemon
from kachery.protocol.errors import InvalidInput
from kachery.protocol.tasks import INLINE_RESULT_BYTES, TaskType
from kachery.storage.errors import NotFound

WAIT = 60.0
"""Seconds a test waits for a worker's line: a safety net, never a pacing device."""

WORKER = """
import os, pathlib, threading
import kachery.node as kn

@kn.taskfunction("add.v1")
def add(a, b):
    return a + b

@kn.taskfunction("slow.v1")
def slow(x):
    print("started", x, flush=True)
    if os.environ.get("BLOCK") == "1":
        threading.Event().wait()  # until the worker is killed
    return x + 1

@kn.taskfunction("electrodes.v1")
def electrodes(probe):
    raise RuntimeError(f"no electrodes on probe {probe}")

@kn.taskfunction("raw.v1")
def raw(n):
    return bytes(range(n))

@kn.taskfunction("report.v1")
def report(title):
    path = pathlib.Path(os.environ["OUT"]) / f"{title}.txt"
    path.write_text(f"report {title}")
    return path

@kn.taskfunction("notebook.append.v1", type="action")
def append(feed, text):
    kn.load_feed(feed).get_subfeed("entries").append_message({"text": text})

kn.run_task_backend(on_ready=lambda event: print("ready", event["backendId"], flush=True))
"""


class Worker:
    """A worker process running WORKER for a node; its stdout lines arrive in a queue.

    Requests wait for providers to announce themselves, so nothing here waits for that.
    """

    def __init__(self, node: Daemon, tmp_path: Path, *, block: bool = False) -> None:
        script = tmp_path / "lab_tasks.py"
        script.write_text(WORKER)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        env = {**node.env(), "BLOCK": "1" if block else "0", "OUT": str(out)}
        log = tmp_path / f"worker-{node.node_id[:8]}-{os.urandom(2).hex()}.log"
        with open(log, "w") as stderr:  # the worker's log, for a failing test to show
            self.proc = subprocess.Popen(
                [sys.executable, str(script)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<exited>")

    def expect(self, prefix: str) -> str:
        """Wait for the worker's next line starting with ``prefix``."""
        while True:
            line = self.lines.get(timeout=WAIT)
            if line.startswith(prefix):
                return line
            assert line != "<exited>", f"the worker exited before printing {prefix!r}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    nodes = {name: Daemon(tmp_path / name) for name in ("p1", "p2", "requester", "third")}
    try:
        for node in nodes.values():
            node.start()
        nodes["p1"].cli("channel", "create", "lab")
        for name in ("p2", "requester", "third"):
            token = nodes["p1"].cli("channel", "invite", "lab", "--roles", "all").strip()
            nodes[name].cli("join", token)
        for node in nodes.values():
            others = [n.node_id for n in nodes.values() if n is not node]
            node.cli("peers", "--wait-for", *others)
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def test_the_python_client_requests_caches_and_reports_errors(
    lab: dict[str, Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1, requester, third = lab["p1"], lab["requester"], lab["third"]
    worker = Worker(p1, tmp_path)
    try:
        monkeypatch.setenv(HOME_ENV, str(requester.home))
        task = kn.request_task("add.v1", {"a": 2, "b": 3.5}, channel="lab")
        assert task.wait() == 5.5
        assert task.status == "finished"
        assert not task.cached
        again = kn.request_task("add.v1", {"a": 2, "b": 3.5})
        assert again.status == "finished"  # answered from this node's cache, in the call
        assert again.cached
        assert again.result == 5.5
        assert again.task_id == task.task_id

        with pytest.raises(InvalidInput, match=r"kwargs\['a'\] is a set"):
            kn.request_task("add.v1", {"a": {1}, "b": 2})
        failed = kn.request_task("electrodes.v1", {"probe": "B"})
        with pytest.raises(kn.TaskFailed, match="RuntimeError: no electrodes on probe B"):
            failed.wait()
        assert failed.status == "error"
        assert "lab_tasks.py" in (failed.error or "")

        raw = kn.request_task("raw.v1", {"n": 5})
        assert raw.wait() == bytes(range(5))
        # The requester keeps a small result in its task record; its URI still loads (the
        # provider's copy, fetched through the channel).
        assert raw.result_uri is not None
        requester.cli("load", raw.result_uri, "-o", str(tmp_path / "raw.bin"))
        assert (tmp_path / "raw.bin").read_bytes() == bytes(range(5))
        uri = kn.request_task("report.v1", {"title": "s3"}).wait()
        assert uri.startswith("sha1://")
        assert uri.endswith("/s3.txt")
        assert kn.load_text(uri) == "report s3"

        # The provider goes offline; the third member gets the cached result from the requester.
        worker.kill()
        p1.stop()
        monkeypatch.setenv(HOME_ENV, str(third.home))
        from_channel = kn.request_task("add.v1", {"a": 2, "b": 3.5})
        assert from_channel.wait() == 5.5
        assert from_channel.cached
        assert from_channel.state["provider"] == requester.node_id
    finally:
        worker.kill()


def test_a_worker_killed_mid_task_leaves_its_daemon_running_and_the_task_runs_elsewhere(
    lab: dict[str, Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1, p2, requester = lab["p1"], lab["p2"], lab["requester"]
    stuck = Worker(p1, tmp_path, block=True)
    quick: Worker | None = None
    try:
        monkeypatch.setenv(HOME_ENV, str(requester.home))
        task = kn.request_task("slow.v1", {"x": 41})
        assert stuck.expect("started") == "started 41"
        quick = Worker(p2, tmp_path)
        stuck.kill()  # SIGKILL, in the middle of the task
        assert task.wait(timeout=WAIT) == 42
        assert task.state["provider"] == p2.node_id
        assert quick.expect("started") == "started 41"
        assert p1.json("status")["tasks"]["backends"] == 0  # the daemon lives on
        # With no provider left, a killed worker's task fails once its timeout passes.
        again = Worker(p1, tmp_path, block=True)
        quick.kill()
        doomed = kn.request_task("slow.v1", {"x": 7}, timeout=3)
        assert again.expect("started") == "started 7"
        again.kill()
        with pytest.raises(kn.TaskFailed, match="timed out after 3 s") as failure:
            doomed.wait(timeout=WAIT)
        assert "its worker went away" in str(failure.value)
    finally:
        stuck.kill()
        if quick is not None:
            quick.kill()


def test_the_command_line_and_an_action_that_appends_to_a_feed(
    lab: dict[str, Daemon], tmp_path: Path
) -> None:
    p1, requester = lab["p1"], lab["requester"]
    worker = Worker(p1, tmp_path)
    try:
        assert requester.cli("task", "request", "add.v1", "--kwargs", '{"a": 1, "b": 2}') == "3\n"
        line = requester.cli("task", "request", "add.v1", "--kwargs", '{"a": 1, "b": 2}', "--json")
        done = json.loads(line.splitlines()[-1])
        assert (done["event"], done["result"], done["cached"]) == ("done", 3, True)
        status = requester.json("task", "status", done["taskId"])
        assert status["status"] == "finished"
        listing = requester.json("task", "list")
        assert [r["functionId"] for r in listing["requests"]] == ["add.v1", "add.v1"]
        assert "add.v1 (pure-calculation)" in requester.cli("task", "providers")

        bad = requester.cli("task", "request", "add.v1", "--kwargs", "{bad", check=False)
        assert "error: --kwargs is not JSON" in bad
        unknown = requester.cli("task", "request", "nope.v1", "--timeout", "1", check=False)
        assert (
            "error: task nope.v1 failed: timed out after 1 s: no member of channel lab" in unknown
        )
        assert "(members serve: add.v1, electrodes.v1" in unknown
        with pytest.raises(CommandFailed, match="RuntimeError: no electrodes on probe A"):
            requester.cli("task", "request", "electrodes.v1", "--kwargs", '{"probe": "A"}')

        feed = p1.cli("feed", "create", "lab-notebook").strip()
        args = ["task", "request", "notebook.append.v1", "--type", "action"]
        kwargs = json.dumps({"feed": feed, "text": "probe B in CA1"})
        for _ in range(2):  # the same request ID twice: a retry; it runs once
            out = requester.cli(*args, "--kwargs", kwargs, "--request-id", "note-1")
            assert out == ""
        requester.cli(*args, "--kwargs", kwargs, "--request-id", "note-2")
        messages = p1.cli("feed", "read", f"feed://{feed}/entries").splitlines()
        assert messages == ['0\t{"text": "probe B in CA1"}', '1\t{"text": "probe B in CA1"}']

        # A small bytes result is printed as its URI, which loads here with the provider gone.
        uri = requester.cli("task", "request", "raw.v1", "--kwargs", '{"n": 7}').strip()
        worker.kill()
        p1.stop()
        requester.cli("load", uri, "-o", str(tmp_path / "raw.bin"))
        assert (tmp_path / "raw.bin").read_bytes() == bytes(range(7))
    finally:
        worker.kill()


def test_a_result_is_loaded_from_its_blob_or_through_the_index_and_its_loss_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, _ = NodeHome.init(tmp_path / "home")
    monkeypatch.setenv(HOME_ENV, str(home.path))
    files = NodeHome.shared().files
    stored = files.store_bytes(b'{"a":[1,2]}')
    assert load_result(str(stored.uri()), "json") == {"a": [1, 2]}
    assert load_result(str(stored.uri()), "bytes") == b'{"a":[1,2]}'
    assert load_result(str(stored.uri("out.json")), "file") == str(stored.uri("out.json"))
    source = tmp_path / "linked.json"
    source.write_text('"linked"')
    linked = files.store_path(source, link=True)  # no blob: found through the index
    assert load_result(str(linked.uri()), "json") == "linked"
    files.remove(stored.sha1)
    with pytest.raises(NotFound, match="no longer in this node's store"):
        load_result(str(stored.uri()), "json")
    # A small result comes with the daemon's answer (base64), checked against its URI.
    data = base64.b64encode(b'{"a":[1,2]}').decode()
    assert load_result(str(stored.uri()), "json", data) == {"a": [1, 2]}
    with pytest.raises(NodeError, match="does not match its hash"):
        load_result(str(stored.uri()), "bytes", base64.b64encode(b"other").decode())


def test_a_task_error_is_placed_in_the_task_or_at_the_call(tmp_path: Path) -> None:
    home, _ = NodeHome.init(tmp_path / "home")

    def threshold(spikes: list[int], limit: int) -> int:
        if limit < 0:
            raise ValueError(f"limit {limit} is negative")
        return sum(1 for s in spikes if s > limit)

    fn = TaskFunction("threshold.v1", TaskType.PURE, threshold)
    raised = execute_job(home, fn, {"spikes": [1, 5], "limit": -1})
    assert raised["error"].startswith("ValueError: limit -1 is negative (at test_tasks_daemon.py:")
    assert raised["error"].endswith(" in threshold)")
    # A wrong argument fails at the call: placed there, not inside kachery-node's worker.
    missing = execute_job(home, fn, {"spikes": [1, 5]})
    assert missing["error"].startswith("TypeError: ")
    assert "missing 1 required positional argument: 'limit'" in missing["error"]
    assert missing["error"].endswith("(calling threshold.v1)")
    home.close()


def test_a_small_result_goes_with_the_report_and_a_large_one_into_the_store(
    tmp_path: Path,
) -> None:
    home, _ = NodeHome.init(tmp_path / "home")
    fn = TaskFunction("echo.v1", TaskType.PURE, lambda value: value)
    small = execute_job(home, fn, {"value": {"units": [1, 2]}})
    data = b'{"units":[1,2]}'
    assert small == {
        "status": "finished",
        "result_uri": f"sha1://{hashlib.sha1(data).hexdigest()}",
        "result_kind": "json",
        "result_data": base64.b64encode(data).decode("ascii"),
    }
    # Kept by the daemon in the result's record: the worker writes no blob of its own.
    assert not home.blobs.has(hashlib.sha1(data).hexdigest())
    large = os.urandom(INLINE_RESULT_BYTES + 1)
    report = execute_job(home, fn, {"value": large})
    assert "result_data" not in report
    assert report["result_uri"] == f"sha1://{hashlib.sha1(large).hexdigest()}"
    assert home.blobs.blob_path(hashlib.sha1(large).hexdigest()).read_bytes() == large
    home.close()
