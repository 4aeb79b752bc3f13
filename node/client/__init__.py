"""The client side of the daemon's local API.

A running daemon leaves two files in the node home, ``daemon.json`` and ``client-auth``
(node/localapi/contract.py, which this package re-exports). ``DaemonClient`` reads both and calls
the API with
``http.client`` from the standard library, synchronously, for the command line and the Python
library. Errors the daemon reports come back as the same ``KacheryError`` subclass. A connection
whose answer was read to its end is kept open (HTTP/1.1 keep-alive) and reused by the next call
from any thread of the process within ``REUSE_SECONDS``, well inside the time the daemon keeps an
idle connection (``KEEP_ALIVE_SECONDS``): most calls cost no TCP connection of their own.

Non-goals: asynchronous use (call it from a worker thread inside Trio), and reaching a daemon on
another machine: the API listens on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import kachery.protocol.errors
import kachery.storage.errors
from kachery.node.errors import DaemonNotRunning, NodeError
from kachery.node.localapi.contract import (
    API_HOST,
    AUTH_HEADER,
    KEEP_ALIVE_SECONDS,
    not_running,
    read_client_auth,
    read_daemon_info,
)
from kachery.protocol.errors import KacheryError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
"""Seconds a call may stay silent: calls that need peers (join) wait on the network, and the
daemon bounds those waits itself well below this."""

REUSE_SECONDS = KEEP_ALIVE_SECONDS / 2
"""A client reuses an idle connection only this long after its last answer, so the daemon never
closes one as a call is sent on it (a call is never sent twice: an action runs at most once)."""

KEPT_CONNECTIONS = 16
"""Idle API connections a process keeps (one per thread that calls at once, in practice)."""


# -- the client --------------------------------------------------------------------------------


class DaemonClient:
    """Calls the local API of the daemon that runs for a node home.

    The daemon's port and token are read afresh for every call, so a client outlives daemon
    restarts. Methods take keyword arguments only (JSON values); see
    ``kachery.node.localapi.server``.

    Args:
        home_path: the node home.
        timeout: seconds ``call`` waits for the daemon before giving up (None: forever).
        stream_timeout: seconds ``stream`` waits for each next event (default None: forever,
            since live feeds may be quiet for a long time).
    """

    def __init__(
        self,
        home_path: Path | str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        stream_timeout: float | None = None,
    ) -> None:
        self.home_path = Path(home_path).expanduser().absolute()
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    def call(self, method: str, /, **kwargs: Any) -> Any:
        """Run ``method`` in the daemon and return its result (events of a streaming method are
        dropped).

        Raises:
            DaemonNotRunning: no daemon runs for this home.
            KacheryError: the daemon's error, as the same class when it is a known one.
        """
        with self._open(method, kwargs, self.timeout) as events:
            for _ in events:
                pass
            return events.result

    def stream(self, method: str, /, **kwargs: Any) -> CallStream:
        """Start ``method`` in the daemon; iterate the returned ``CallStream`` for its events,
        then read its ``result``::

            with client.stream("download", uri=uri) as events:
                for event in events:
                    show(event)
            print(events.result)

        Raises:
            DaemonNotRunning: no daemon runs for this home.
            KacheryError: the daemon refused the call (here) or failed (at the end of iteration).
        """
        return self._open(method, kwargs, self.stream_timeout)

    def _open(self, method: str, kwargs: dict[str, Any], timeout: float | None) -> CallStream:
        info = read_daemon_info(self.home_path)
        if info is None:
            raise DaemonNotRunning(not_running(self.home_path))
        token = read_client_auth(self.home_path)
        try:
            body = json.dumps(kwargs, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise kachery.protocol.errors.InvalidInput(
                f"the arguments of {method} are not JSON: {exc}"
            ) from None
        conn = _KEPT.take(info.api_port, timeout)
        try:
            conn.request(
                "POST",
                f"/api/{method}",
                body=body,
                headers={"Content-Type": "application/json", AUTH_HEADER: token},
            )
            response = conn.getresponse()
        except ConnectionRefusedError:
            conn.close()
            raise DaemonNotRunning(not_running(self.home_path)) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _lost(method, exc) from None
        events = CallStream(method, conn, response)
        if response.status != 200:
            with events:
                raise _error_from(method, _read_json(method, response.read()), response.status)
        return events


class CallStream:
    """The answer to one call: iterate it for the events, then read ``result``.

    Iteration raises the daemon's error if the call fails; the connection closes when iteration
    ends, on ``close``, or when a ``with`` block exits.
    """

    def __init__(
        self, method: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        self.method = method
        self._conn: http.client.HTTPConnection | None = conn
        self._response = response
        self._done = False
        self._result: Any = None

    @property
    def result(self) -> Any:
        """The call's result, once iteration has ended."""
        if not self._done:
            raise NodeError(f"the result of {self.method} is not known before its events are read")
        return self._result

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            if self._response.getheader("Content-Type", "").startswith("application/x-ndjson"):
                yield from self._read_lines()
            else:
                self._finish(_read_json(self.method, self._read(self._response.read)))
        finally:
            self.close()

    def _read_lines(self) -> Iterator[dict[str, Any]]:
        while line := self._read(self._response.readline):
            item = _read_json(self.method, line)
            if "event" in item:
                yield item["event"]
            else:
                self._finish(item)
                self._read(self._response.read)  # the end of the body: the connection is free
                return
        raise NodeError(f"the daemon ended {self.method} without a result")

    def _read(self, read: Callable[[], bytes]) -> bytes:
        try:
            data: bytes = read()
        except (OSError, http.client.HTTPException) as exc:
            raise _lost(self.method, exc) from None
        return data

    def _finish(self, item: dict[str, Any]) -> None:
        if "result" not in item:
            raise _error_from(self.method, item, self._response.status)
        self._result = item["result"]
        self._done = True

    def close(self) -> None:
        """Close the connection (a streaming method still running in the daemon is cancelled);
        once the whole answer was read, keep it for the next call instead."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._response.isclosed() and not self._response.will_close:
            _KEPT.put(conn)
        else:
            conn.close()

    def __enter__(self) -> CallStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _KeptConnections:
    """Idle connections to the local API, shared by the threads of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._pid = os.getpid()

    def take(self, port: int, timeout: float | None) -> http.client.HTTPConnection:
        """An idle connection to ``port`` that the daemon still holds open, else a new one."""
        found = None
        stale = []
        with self._lock:
            self._forget_if_forked()
            now = time.monotonic()
            for i in range(len(self._idle) - 1, -1, -1):  # the most recently used first
                conn, idle_since = self._idle[i]
                if conn.port != port:
                    continue
                del self._idle[i]
                if now - idle_since < REUSE_SECONDS and _still_open(conn):
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        if found is None:
            return http.client.HTTPConnection(API_HOST, port, timeout=timeout)
        found.timeout = timeout
        assert found.sock is not None
        found.sock.settimeout(timeout)
        return found

    def put(self, conn: http.client.HTTPConnection) -> None:
        """Keep a connection whose last answer was read to its end."""
        dropped = None
        with self._lock:
            self._forget_if_forked()
            self._idle.append((conn, time.monotonic()))
            if len(self._idle) > KEPT_CONNECTIONS:
                dropped, _ = self._idle.pop(0)
        if dropped is not None:
            dropped.close()

    def _forget_if_forked(self) -> None:
        """A forked child never shares its parent's connections (it closes its copies)."""
        if self._pid != os.getpid():
            for conn, _ in self._idle:
                conn.close()
            self._idle.clear()
            self._pid = os.getpid()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection is still usable: nothing to read, where an end of file would
    mean the daemon closed it (it restarted, or stopped)."""
    if conn.sock is None:
        return False
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return not poller.poll(0)


_KEPT = _KeptConnections()


def _read_json(method: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise NodeError(
            f"unexpected answer to {method} from the local API port: is it a kachery-node daemon?"
        )
    return value


def _lost(method: str, exc: BaseException) -> NodeError:
    if isinstance(exc, TimeoutError):
        return NodeError(f"the kachery-node daemon did not answer {method} in time")
    return NodeError(f"lost the connection to the kachery-node daemon during {method}: {exc}")


def _error_from(method: str, item: dict[str, Any], status: int) -> KacheryError:
    """The exception an ``{"error": {"type": ..., "message": ...}}`` answer stands for."""
    error = item.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return NodeError(f"the daemon failed {method} (HTTP {status}) without saying why")
    message: str = error["message"]
    cls = _error_classes().get(str(error.get("type")))
    if cls is not None:
        try:
            return cls(message)
        except TypeError:  # a class whose constructor wants more than a message
            pass
    return NodeError(message)


@functools.cache
def _error_classes() -> dict[str, type[KacheryError]]:
    """Error classes by name: an error the daemon reports is re-raised as the same class."""
    from kachery.node import (
        errors as node_errors,  # here: kachery.node imports this module while loading
    )

    found: dict[str, type[KacheryError]] = {}
    for module in (kachery.protocol.errors, kachery.storage.errors, node_errors):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, KacheryError):
                found[name] = value
    return found
