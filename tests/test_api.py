"""The local API end to end: real hypercorn on 127.0.0.1 port 0, real HTTP from ``DaemonClient``.

The blocking client runs in a worker thread (``trio.to_thread.run_sync``) so that the server keeps
running on the test's Trio loop. The control object is a fake with a few methods of its own.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

import kachery.node.localapi.server
from kachery.node.cli.groups import parse_duration
from kachery.node.client import DaemonClient
from kachery.node.errors import DaemonNotRunning, NodeError, NotPermitted, Unavailable
from kachery.node.localapi.contract import (
    AUTH_HEADER,
    CLIENT_AUTH_FILE,
    DAEMON_INFO_FILE,
    DaemonInfo,
    ensure_client_auth,
    read_daemon_info,
    remove_daemon_info,
    write_daemon_info,
)
from kachery.node.localapi.methods import MethodSpec, StreamResult, exposed, methods_of
from kachery.node.localapi.server import serve_api
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.storage.errors import AlreadyExists, NotFound

from .test_cli import assert_one_line_error, kn

NODE_ID = "ab" * 32
T = TypeVar("T")

FAILURES: dict[str, KacheryError] = {
    "invalid": InvalidInput("the name 'a b' has a space"),
    "not-found": NotFound("no channel named lab"),
    "not-permitted": NotPermitted("this node is not an admin of lab"),
    "exists": AlreadyExists("a channel named lab exists"),
    "unavailable": Unavailable("no admin of lab answered"),
    "other": NodeError("the node is confused"),
}


class FakeControl:
    """A control object: plain calls, failures on demand, and streams."""

    def __init__(self) -> None:
        self.stream_closed = trio.Event()
        self.shutdown_requested = trio.Event()

    @exposed
    async def status(self) -> dict[str, Any]:
        return {"nodeId": NODE_ID, "peers": 0}

    @exposed
    async def echo(self, text: str, times: int = 1) -> dict[str, Any]:
        return {"text": text * times}

    @exposed
    async def fail(self, kind: str) -> None:
        raise FAILURES[kind]

    @exposed
    async def crash(self) -> None:
        raise RuntimeError("secret detail: /etc/kachery/internal.db")

    @exposed
    async def progress(self, steps: int) -> AsyncIterator[dict[str, Any] | StreamResult]:
        for step in range(steps):
            yield {"step": step}
        yield StreamResult({"done": steps})

    @exposed
    async def failing_stream(self) -> AsyncIterator[dict[str, Any]]:
        yield {"step": 0}
        raise NotFound("the file went away")

    @exposed
    async def endless(self) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"step": 0}
            await trio.sleep_forever()
        finally:
            self.stream_closed.set()

    @exposed
    async def shutdown(self) -> dict[str, Any]:
        self.shutdown_requested.set()
        return {"stopping": True}


@asynccontextmanager
async def running_api(home: Path, control: FakeControl) -> AsyncIterator[int]:
    """Serve the fake on a free port, publish daemon.json, yield the port; stop on exit."""
    token = ensure_client_auth(home)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            functools.partial(serve_api, methods_of(control), node_id=NODE_ID, token=token, port=0)
        )
        write_daemon_info(
            home, DaemonInfo(pid=os.getpid(), api_port=port, node_id=NODE_ID, listen="x:1")
        )
        yield port
        nursery.cancel_scope.cancel()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


def client(home: Path) -> DaemonClient:
    return DaemonClient(home, timeout=30, stream_timeout=30)


def raw(
    port: int, verb: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """One plain HTTP request; the status and the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(verb, path, body=body, headers=headers or {})
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def auth(home: Path) -> dict[str, str]:
    return {AUTH_HEADER: (home / CLIENT_AUTH_FILE).read_text().strip()}


# -- routes and auth ---------------------------------------------------------------------------


async def test_a_call_round_trips_and_the_token_file_is_private(home: Path) -> None:
    async with running_api(home, FakeControl()):
        assert await in_thread(client(home).call, "echo", text="ab", times=2) == {"text": "abab"}
        assert await in_thread(client(home).call, "status") == {"nodeId": NODE_ID, "peers": 0}
    for name in (CLIENT_AUTH_FILE, DAEMON_INFO_FILE):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    assert ensure_client_auth(home) == (home / CLIENT_AUTH_FILE).read_text().strip()


async def test_the_probe_needs_no_token(home: Path) -> None:
    async with running_api(home, FakeControl()) as port:
        status, answer = await in_thread(raw, port, "GET", "/probe")
        assert status == 200
        assert answer["success"] is True
        assert answer["nodeId"] == NODE_ID
        assert isinstance(answer["kacheryNodeVersion"], str)
        status, _ = await in_thread(raw, port, "POST", "/probe")
        assert status == 405


@pytest.mark.parametrize("token", [None, "0" * 64, ""])
async def test_calls_without_the_right_token_are_refused(home: Path, token: str | None) -> None:
    async with running_api(home, FakeControl()) as port:
        headers = {} if token is None else {AUTH_HEADER: token}
        status, answer = await in_thread(raw, port, "POST", "/api/status", b"{}", headers)
        assert status == 401
        assert answer["error"]["type"] == "NotPermitted"
        assert AUTH_HEADER in answer["error"]["message"]
        # Unknown methods and routes are not revealed without the token either.
        status, _ = await in_thread(raw, port, "POST", "/api/nosuch", b"{}", headers)
        assert status == 401


async def test_a_client_holding_a_wrong_token_gets_not_permitted(home: Path) -> None:
    async with running_api(home, FakeControl()):
        (home / CLIENT_AUTH_FILE).write_text("f" * 64 + "\n")
        with pytest.raises(NotPermitted, match=AUTH_HEADER):
            await in_thread(client(home).call, "status")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "cls"),
    [
        ("invalid", 400, InvalidInput),
        ("not-found", 404, NotFound),
        ("not-permitted", 403, NotPermitted),
        ("exists", 409, AlreadyExists),
        ("unavailable", 503, Unavailable),
        ("other", 500, NodeError),
    ],
)
async def test_errors_map_to_a_status_and_come_back_as_the_same_class(
    home: Path, kind: str, status: int, cls: type[KacheryError]
) -> None:
    async with running_api(home, FakeControl()) as port:
        body = json.dumps({"kind": kind}).encode()
        got, answer = await in_thread(raw, port, "POST", "/api/fail", body, auth(home))
        assert got == status
        assert answer == {"error": {"type": cls.__name__, "message": str(FAILURES[kind])}}
        with pytest.raises(cls) as caught:
            await in_thread(client(home).call, "fail", kind=kind)
        assert type(caught.value) is cls
        assert str(caught.value) == str(FAILURES[kind])


async def test_an_unexpected_exception_is_a_500_that_hides_internals(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_api(home, FakeControl()) as port:
        with caplog.at_level(logging.ERROR, logger="kachery.node.localapi.server"):
            status, answer = await in_thread(raw, port, "POST", "/api/crash", b"", auth(home))
        assert status == 500
        assert answer["error"]["type"] == "InternalError"
        assert "secret" not in answer["error"]["message"]
        assert "crash" in answer["error"]["message"]
        with pytest.raises(NodeError) as caught:
            await in_thread(client(home).call, "crash")
        assert type(caught.value) is NodeError
        assert "secret" not in str(caught.value)
    [record, *_] = [r for r in caplog.records if r.name == "kachery.node.localapi.server"]
    assert record.exc_info is not None
    assert "secret detail" in str(record.exc_info[1])  # the log has it, the client does not


async def test_unknown_methods_bad_json_and_wrong_arguments_are_refused(home: Path) -> None:
    async with running_api(home, FakeControl()) as port:
        status, answer = await in_thread(raw, port, "POST", "/api/nosuch", b"{}", auth(home))
        assert status == 404
        assert "no API method 'nosuch'" in answer["error"]["message"]
        with pytest.raises(NodeError, match="no API method 'nosuch'"):
            await in_thread(client(home).call, "nosuch")
        status, answer = await in_thread(raw, port, "POST", "/api/echo", b"{nope", auth(home))
        assert (status, answer["error"]["type"]) == (400, "InvalidInput")
        assert "not JSON" in answer["error"]["message"]
        status, answer = await in_thread(raw, port, "POST", "/api/echo", b"[1]", auth(home))
        assert (status, answer["error"]["type"]) == (400, "InvalidInput")
        assert "JSON object" in answer["error"]["message"]
        status, _ = await in_thread(raw, port, "GET", "/api/echo", b"", auth(home))
        assert status == 405
        with pytest.raises(InvalidInput, match="unexpected keyword argument 'nope'"):
            await in_thread(client(home).call, "echo", text="x", nope=1)
        with pytest.raises(InvalidInput, match="missing a required argument: 'text'"):
            await in_thread(client(home).call, "echo")


# -- streams -----------------------------------------------------------------------------------


async def test_a_stream_gives_events_then_its_result(home: Path) -> None:
    def run() -> tuple[list[dict[str, Any]], Any]:
        with client(home).stream("progress", steps=3) as events:
            seen = list(events)
        return seen, events.result

    async with running_api(home, FakeControl()):
        seen, result = await in_thread(run)
        assert seen == [{"step": 0}, {"step": 1}, {"step": 2}]
        assert result == {"done": 3}
        # call() on a streaming method skips the events; stream() on a plain one has none.
        assert await in_thread(client(home).call, "progress", steps=2) == {"done": 2}
        plain = await in_thread(client(home).stream, "echo", text="x")
        assert await in_thread(list, plain) == []
        assert plain.result == {"text": "x"}


async def test_a_stream_that_fails_raises_after_its_events(home: Path) -> None:
    def run() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        events = client(home).stream("failing_stream")
        with pytest.raises(NotFound, match="the file went away"):
            seen.extend(events)
        return seen

    async with running_api(home, FakeControl()):
        assert await in_thread(run) == [{"step": 0}]


async def test_a_client_that_goes_away_cancels_its_stream(home: Path) -> None:
    control = FakeControl()

    def first_event_then_close() -> dict[str, Any]:
        with client(home).stream("endless") as events:
            return next(iter(events))

    async with running_api(home, control):
        assert await in_thread(first_event_then_close) == {"step": 0}
        with trio.fail_after(30):  # a guard against hanging, not a wait
            await control.stream_closed.wait()


# -- connections -------------------------------------------------------------------------------


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ports of the TCP connections clients open, in order."""
    opened: list[int] = []
    connect = http.client.HTTPConnection.connect

    def counted(self: http.client.HTTPConnection) -> None:
        opened.append(self.port)
        connect(self)

    monkeypatch.setattr(http.client.HTTPConnection, "connect", counted)
    return opened


async def test_calls_and_streams_read_to_their_end_share_one_kept_alive_connection(
    home: Path, connects: list[int]
) -> None:
    def calls() -> list[Any]:
        answers = [client(home).call("echo", text="a")]
        with client(home).stream("progress", steps=2) as events:
            answers.append([*events, events.result])
        with pytest.raises(NotFound):
            client(home).call("fail", kind="not-found")
        answers.append(client(home).call("progress", steps=1))
        return answers

    async with running_api(home, FakeControl()) as port:
        assert await in_thread(calls) == [
            {"text": "a"},
            [{"step": 0}, {"step": 1}, {"done": 2}],
            {"done": 1},
        ]
    # The error answer closed its connection (errors are rare): one more for the call after it.
    assert connects == [port, port]


async def test_a_stream_left_early_is_cancelled_and_its_connection_never_reused(
    home: Path, connects: list[int]
) -> None:
    control = FakeControl()

    def first_event_then_close() -> dict[str, Any]:
        with client(home).stream("endless") as events:
            return next(iter(events))

    async with running_api(home, control) as port:
        assert await in_thread(first_event_then_close) == {"step": 0}
        with trio.fail_after(30):  # a guard against hanging, not a wait
            await control.stream_closed.wait()
        assert await in_thread(client(home).call, "echo", text="b") == {"text": "b"}
    assert connects == [port, port]


async def test_the_daemon_closes_a_connection_left_idle_after_its_answer(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kachery.node.localapi.server, "KEEP_ALIVE_SECONDS", 0.1)

    def call_then_wait_for_the_close(port: int, path: str, body: bytes) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers=auth(home))
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            assert conn.sock is not None
            return bytes(conn.sock.recv(1))  # blocks until the daemon closes it (or 30 s pass)
        finally:
            conn.close()

    async with running_api(home, FakeControl()) as port:
        for path, body in (("/api/echo", b'{"text": "x"}'), ("/api/progress", b'{"steps": 1}')):
            assert await in_thread(call_then_wait_for_the_close, port, path, body) == b""


async def test_a_daemon_restarted_on_the_same_port_is_called_on_a_new_connection(
    home: Path, connects: list[int]
) -> None:
    async with running_api(home, FakeControl()) as port:
        assert await in_thread(client(home).call, "echo", text="x") == {"text": "x"}
    token = ensure_client_auth(home)
    methods = methods_of(FakeControl())
    async with trio.open_nursery() as nursery:
        again = functools.partial(serve_api, methods, node_id=NODE_ID, token=token, port=port)
        assert await nursery.start(again) == port
        # The kept connection was closed by the daemon that stopped: it is not used.
        assert await in_thread(client(home).call, "echo", text="y") == {"text": "y"}
        nursery.cancel_scope.cancel()
    assert connects == [port, port]


# -- finding the daemon, and stopping it --------------------------------------------------------


def test_no_daemon_json_means_no_daemon(home: Path) -> None:
    with pytest.raises(DaemonNotRunning) as caught:
        client(home).call("status")
    assert str(caught.value) == (
        f"no kachery-node daemon is running for {home}: start one with 'kachery-node start'"
    )


def test_a_port_that_refuses_means_no_daemon(home: Path) -> None:
    ensure_client_auth(home)
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        write_daemon_info(home, {"pid": 1, "apiPort": port, "nodeId": NODE_ID, "listen": "x:1"})
        with pytest.raises(DaemonNotRunning, match="start one with 'kachery-node start'"):
            client(home).call("status")


def test_daemon_info_round_trips_and_is_removed_only_by_its_owner(home: Path) -> None:
    info = DaemonInfo(pid=4242, api_port=20431, node_id=NODE_ID, listen="0.0.0.0:20432")
    write_daemon_info(home, info)
    assert read_daemon_info(home) == info
    remove_daemon_info(home)  # another pid: the file stays
    assert read_daemon_info(home) == info
    remove_daemon_info(home, pid=4242)
    assert read_daemon_info(home) is None
    (home / DAEMON_INFO_FILE).write_text('{"pid": "x"}')
    with pytest.raises(NodeError, match="'pid' must be a int"):
        read_daemon_info(home)


async def test_cancelling_serve_api_stops_it_and_lets_an_answer_out(home: Path) -> None:
    control = FakeControl()
    token = ensure_client_auth(home)
    methods = {"shutdown": MethodSpec(control.shutdown)}
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(serve_api, methods, node_id=NODE_ID, token=token, port=0)
            )
            write_daemon_info(home, {"pid": 1, "apiPort": port, "nodeId": NODE_ID, "listen": ""})

            async def stop_when_asked() -> None:
                await control.shutdown_requested.wait()
                scope.cancel()  # as the daemon does: cancel as soon as shutdown() returns

            nursery.start_soon(stop_when_asked)
            answer = await in_thread(client(home).call, "shutdown")
    assert answer == {"stopping": True}
    assert scope.cancelled_caught
    with pytest.raises(DaemonNotRunning):
        await in_thread(client(home).call, "shutdown")


async def test_a_busy_port_is_a_clear_error(home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(NodeError, match=f"cannot listen for the local API on 127.0.0.1:{port}"):
            await serve_api({}, node_id=NODE_ID, token="t", port=port)


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
    ],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["7", "", "d", "-1d", "3 days", "1y"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"use a number and a unit \(30m, 12h, 7d"):
        parse_duration(text)


def test_daemon_commands_without_a_daemon_fail_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    kn(home, "init")
    for args in (["status"], ["peers", "--json"], ["channel", "list"], ["leave", "lab"]):
        assert_one_line_error(
            kn(home, *args, check=False),
            f"no kachery-node daemon is running for {home}",
            "start one with 'kachery-node start'",
        )


def test_unknown_roles_and_durations_are_usage_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    kn(home, "init")
    proc = kn(home, "channel", "invite", "lab", "--roles", "requestFiles,fly", check=False)
    assert proc.returncode == 2
    assert b"unknown role 'fly'; known roles: requestFiles" in proc.stderr
    proc = kn(home, "channel", "invite", "lab", "--roles", "all", "--expires", "7", check=False)
    assert proc.returncode == 2
    assert b"invalid duration '7'" in proc.stderr
