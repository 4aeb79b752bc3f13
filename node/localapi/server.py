"""The daemon's local API: a generic RPC over HTTP/1.1 and JSON, on 127.0.0.1 only.

The daemon marks the methods it serves with ``@exposed``; ``methods_of`` collects them into the
table (name -> bound coroutine function) that ``serve_api`` serves (both in methods.py, which the
services import without the HTTP server). Each
``POST /api/<name>`` whose body is a JSON object calls one with those keyword arguments and
answers ``{"result": ...}``; a streaming method answers NDJSON instead, one ``{"event": ...}``
line per event, flushed as it happens, and a last line ``{"result": ...}`` or ``{"error": ...}``.
Errors are ``{"error": {"type": <class name>, "message": ...}}`` with a status chosen from the
class (``status_for``), so the client re-raises the same class. Features add methods to the
table, never HTTP plumbing. ``GET /probe`` answers like kachery-daemon's probe and needs no
token; ``GET /sha1/<hash>[/<label>]`` is a read-only gateway to stored files, with Range
support, for browser tools; every other route needs the ``KACHERY-CLIENT-AUTH-CODE`` header
(contract.py keeps the token file). hypercorn's Trio worker serves the small ASGI app below
on the daemon's own loop.

Non-goals: remote access (loopback only, no TLS), browsers (no CORS, no HTML), and being a web
framework: routing is one dictionary lookup.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import inspect
import json
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from kachery.node.errors import NodeError, NotPermitted, Unavailable
from kachery.node.localapi.contract import API_HOST, AUTH_HEADER, KEEP_ALIVE_SECONDS
from kachery.node.localapi.methods import MethodSpec, StreamResult
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)
http_log = logging.getLogger(f"{__name__}.http")
"""hypercorn's own log (start-up, access lines): quiet unless the daemon runs verbose."""

MAX_BODY_BYTES = 1024 * 1024
"""Bytes in a request body: arguments are small (files travel by path, never through the API)."""

GRACEFUL_SECONDS = 2.0
"""Seconds in-flight calls get to finish when the daemon stops, before they are cancelled."""

JSON_TYPE = b"application/json"
NDJSON_TYPE = b"application/x-ndjson"


_STATUS: tuple[tuple[type[KacheryError], int], ...] = (
    (InvalidInput, 400),
    (NotPermitted, 403),
    (NotFound, 404),
    (AlreadyExists, 409),
    (Unavailable, 503),
)


def status_for(error: KacheryError) -> int:
    """The HTTP status of an error: 400 invalid input, 403 not permitted, 404 not found, 409
    already exists, 503 the network could not answer, 500 any other kachery error."""
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


async def serve_api(
    methods: Mapping[str, MethodSpec],
    *,
    node_id: str,
    token: str,
    port: int,
    verbose: bool = False,
    locate: Locate | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on 127.0.0.1 until cancelled; start it with ``nursery.start``.

    The socket is bound here, so a busy port fails with a clear error and port 0 works; its
    descriptor is handed to hypercorn. When cancelled, in-flight calls get
    ``GRACEFUL_SECONDS`` to finish (so ``shutdown`` gets its answer out) before they are
    cancelled too.

    Args:
        methods: the method table (``methods_of``).
        node_id: reported by ``/probe``.
        token: the client-auth token every other route requires.
        port: the port to bind; 0 picks a free one.
        verbose: let hypercorn log start-up and every request.
        locate: where stored files are (enables the read-only ``GET /sha1/...`` gateway).
        task_status: receives the bound port once the API accepts connections.

    Raises:
        NodeError: the port cannot be bound.
    """
    listener = _bind(port)
    bound_port: int = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]
    config.graceful_timeout = GRACEFUL_SECONDS
    config.keep_alive_timeout = KEEP_ALIVE_SECONDS  # clients reuse idle connections well within
    config.include_server_header = False
    http_log.setLevel(logging.NOTSET if verbose else logging.WARNING)
    config.errorlog = http_log
    config.accesslog = http_log if verbose else None
    app = _App(methods, node_id=node_id, token=token, locate=locate)
    stop = trio.Event()
    # hypercorn runs shielded from our caller's cancellation, so that cancelling serve_api turns
    # into hypercorn's graceful shutdown (stop) rather than cutting answers off mid-write; the
    # deadline set below bounds that shutdown.
    server_scope = trio.CancelScope(shield=True)

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_server)
        log.debug("local API listening on http://%s:%d", API_HOST, bound_port)
        task_status.started(bound_port)
        try:
            await trio.sleep_forever()
        finally:
            stop.set()
            server_scope.deadline = trio.current_time() + GRACEFUL_SECONDS + 1.0


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        sock.bind((API_HOST, port))
    except OSError as exc:
        sock.close()
        raise NodeError(
            f"cannot listen for the local API on {API_HOST}:{port}: {exc.strerror}"
            " (is another daemon running? choose another port with --api-port)"
        ) from None
    return sock


# -- the ASGI app ------------------------------------------------------------------------------


class _Refused(Exception):
    """A request refused before any method runs."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


Locate = Callable[[FileURI], "tuple[Path, int, int] | None"]
"""Where the bytes of a URI are stored on this node: (file, start, end), or None."""


class _App:
    """The ASGI application: lifespan, ``GET /probe``, ``POST /api/<method>``, and the
    read-only gateway ``GET /sha1/...``."""

    def __init__(
        self,
        methods: Mapping[str, MethodSpec],
        *,
        node_id: str,
        token: str,
        locate: Locate | None = None,
    ) -> None:
        self._methods = dict(methods)
        self._locate = locate
        self._token = token.encode("utf-8")
        self._probe = {"success": True, "nodeId": node_id, "kacheryNodeVersion": _version()}

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            # hypercorn's Trio worker fails at start-up unless the app answers these.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "no websockets here"})

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["path"].startswith("/sha1/") and self._locate is not None:
            await _gateway(scope, send, self._locate)
            return
        try:
            name = self._route(scope)
            if name is None:
                await _send_json(send, 200, self._probe)
                return
            body = await _read_body(receive)
            if body is None:
                return  # the client went away
            spec = self._methods[name]
            kwargs = _arguments(name, spec, body)
        except _Refused as refused:
            error = {"type": refused.kind, "message": refused.message}
            await _send_json(send, refused.status, {"error": error})
            return
        if spec.streams:
            answer = await _unless_disconnected(receive, _stream(name, spec, kwargs, send))
        else:
            answer = await _unless_disconnected(receive, _call(name, spec, kwargs))
        if answer is None:
            return  # the client went away: the call was cancelled
        # The last bytes go out here, past the disconnect watcher: within this send hypercorn
        # readies the connection for the client's next call (keep-alive), which the watcher's
        # cancelled scope would cut short, leaving the connection without its idle timeout.
        status, last = answer
        if status is not None:
            await _send_start(send, status, JSON_TYPE, len(last))
        await send({"type": "http.response.body", "body": last, "more_body": False})

    def _route(self, scope: HTTPScope) -> str | None:
        """The method a request names (None for the probe), once it is authorized."""
        path, verb = scope["path"], scope["method"]
        if path == "/probe":
            if verb != "GET":
                raise _Refused(405, "InvalidInput", "use GET /probe")
            return None
        if not self._authorized(scope["headers"]):
            raise _Refused(
                401,
                "NotPermitted",
                f"missing or wrong {AUTH_HEADER} header: the token is in the node home's"
                " client-auth file",
            )
        name = path.removeprefix("/api/")
        if name == path:
            raise _Refused(404, "NotFound", f"no route {path}: the API is POST /api/<method>")
        if name not in self._methods:
            raise _Refused(
                404,
                "UnknownMethod",
                f"the daemon has no API method {name!r} (is it older than this client? restart it)",
            )
        if verb != "POST":
            raise _Refused(405, "InvalidInput", f"use POST /api/{name}")
        return name

    def _authorized(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        wanted = AUTH_HEADER.lower().encode("ascii")
        given = [value for key, value in headers if key.lower() == wanted]
        return len(given) == 1 and hmac.compare_digest(given[0], self._token)


GATEWAY_BLOCK = 1024 * 1024
"""Bytes read and sent per step by the file gateway."""


async def _gateway(scope: HTTPScope, send: ASGISendCallable, locate: Locate) -> None:
    """Serve a stored file (or a byte range of it) by URI: ``GET /sha1/<hash>[/<label>]``.

    Read-only and local-only: it serves what is stored on this node and never fetches from
    peers. Content-addressed, so responses are immutable and cacheable; no token is needed,
    since knowing a file's hash is what it takes to ask for it. One ``Range: bytes=`` range is
    honoured (206); several, or none, get the whole file.
    """
    if scope["method"] not in ("GET", "HEAD"):
        await _send_json(send, 405, {"error": {"type": "InvalidInput", "message": "use GET"}})
        return
    text = "sha1://" + scope["path"][len("/sha1/") :]
    query = scope["query_string"].decode("latin-1")
    if query:
        text += "?" + query
    try:
        uri = parse_file_uri(text)
    except (InvalidInput, ValueError) as exc:
        await _send_json(send, 400, {"error": {"type": "InvalidURI", "message": str(exc)}})
        return
    try:
        located = await trio.to_thread.run_sync(locate, uri)
    except InvalidInput as exc:  # a chunk URI whose range or hash does not match the stored file
        await _send_json(send, 400, {"error": {"type": "InvalidURI", "message": str(exc)}})
        return
    if located is None:
        message = f"{uri} is not stored on this node (the gateway does not fetch from peers)"
        await _send_json(send, 404, {"error": {"type": "NotFound", "message": message}})
        return
    path, lo, hi = located
    size = hi - lo
    status, first, last = 200, 0, size
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/octet-stream"),
        (b"accept-ranges", b"bytes"),
        (b"etag", f'"{uri.sha1}"'.encode()),
        (b"cache-control", b"public, max-age=31536000, immutable"),
    ]
    range_header = dict(scope["headers"]).get(b"range", b"").decode("latin-1")
    try:
        wanted = _byte_range(range_header, size)
    except ValueError:
        headers.append((b"content-range", f"bytes */{size}".encode()))
        await send({"type": "http.response.start", "status": 416, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if wanted is not None:
        status, (first, last) = 206, wanted
        headers.append((b"content-range", f"bytes {first}-{last - 1}/{size}".encode()))
    headers.append((b"content-length", str(last - first).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if scope["method"] == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
    try:
        position, end = lo + first, lo + last
        while position < end:
            n = min(GATEWAY_BLOCK, end - position)
            block = await trio.to_thread.run_sync(os.pread, fd, n, position)
            position += len(block)
            await send({"type": "http.response.body", "body": block, "more_body": position < end})
            if not block:
                break
        if lo + first == end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        os.close(fd)


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The one range a ``Range: bytes=a-b`` header asks for, as [start, end); None for the
    whole file (no header, several ranges, or a unit other than bytes).

    Raises:
        ValueError: the range cannot be satisfied (answer 416).
    """
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    if not (first_text or last_text) or not (first_text + last_text).isdigit():
        return None
    if not first_text:  # a suffix: the last N bytes
        n = int(last_text)
        if n <= 0 or not size:
            raise ValueError("empty suffix range")
        return max(size - n, 0), size
    first = int(first_text)
    last = int(last_text) + 1 if last_text else size
    if first >= size or last <= first:
        raise ValueError("range outside the file")
    return first, min(last, size)


async def _read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        size += len(message["body"])
        if size > MAX_BODY_BYTES:
            raise _Refused(413, "InvalidInput", f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(message["body"])
        if not message["more_body"]:
            return b"".join(chunks)


def _arguments(name: str, spec: MethodSpec, body: bytes) -> dict[str, Any]:
    """Parse a body into keyword arguments that fit the method's signature."""
    try:
        value = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise _Refused(400, "InvalidInput", f"the body of {name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Refused(
            400, "InvalidInput", f"the body of {name} must be a JSON object of keyword arguments"
        )
    try:
        spec.signature.bind(**value)
    except TypeError as exc:
        raise _Refused(400, "InvalidInput", f"wrong arguments for {name}: {exc}") from None
    return value


_Answer = tuple[int | None, bytes]
"""The end of an answer: the status to start it with (None: it was started), its last bytes."""


async def _unless_disconnected(
    receive: ASGIReceiveCallable, call: Awaitable[_Answer]
) -> _Answer | None:
    """Run a method's call; None if its client went away first (the call is then cancelled)."""
    answer = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        answer = await call
        nursery.cancel_scope.cancel()
    return answer


async def _call(name: str, spec: MethodSpec, kwargs: dict[str, Any]) -> _Answer:
    """Run a plain method; the status and body of its answer."""
    try:
        return 200, _dumps({"result": await spec.func(**kwargs)})
    except Exception as exc:
        status, error = _failure(name, exc)
        return status, _dumps({"error": error})


async def _stream(
    name: str, spec: MethodSpec, kwargs: dict[str, Any], send: ASGISendCallable
) -> _Answer:
    """Run a streaming method, sending its events as they come; its last line is for the caller
    to send."""
    await _send_start(send, 200, NDJSON_TYPE, None)
    final: dict[str, Any] = {"result": None}
    iterator: Any = None
    try:
        iterator = spec.func(**kwargs)
        if inspect.isawaitable(iterator):
            iterator = await iterator
        async for item in _as_async_iterator(iterator):
            if isinstance(item, StreamResult):
                final = {"result": item.value}
                break
            line = _dumps({"event": item})
            await send({"type": "http.response.body", "body": line, "more_body": True})
        _dumps(final)  # an unencodable result is the method's failure, reported below
    except Exception as exc:
        final = {"error": _failure(name, exc)[1]}
    finally:
        if isinstance(iterator, AsyncGenerator):
            await iterator.aclose()
    return None, _dumps(final)


def _as_async_iterator(value: object) -> AsyncIterator[Any]:
    if not isinstance(value, AsyncIterator):
        raise TypeError(f"a streaming method returned {type(value).__name__}, not an iterator")
    return value


def _failure(name: str, exc: Exception) -> tuple[int, dict[str, str]]:
    """The status and error object for a method's exception. Only deliberate (kachery) errors
    show their message; anything else is a bug, logged with its traceback and never shown."""
    error: BaseException = exc
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]  # a nursery wrapped one error of a task
    if isinstance(error, KacheryError):
        return status_for(error), {"type": type(error).__name__, "message": str(error)}
    log.error("API method %s failed", name, exc_info=exc)
    message = f"the daemon failed {name} with an internal error (its log has the details)"
    return 500, {"type": "InternalError", "message": message}


async def _cancel_on_disconnect(receive: ASGIReceiveCallable, scope: trio.CancelScope) -> None:
    """Cancel the call when its client goes away (a closed stream must not run on)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_json(send: ASGISendCallable, status: int, value: object) -> None:
    body = _dumps(value)
    await _send_start(send, status, JSON_TYPE, len(body))
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_start(
    send: ASGISendCallable, status: int, content_type: bytes, length: int | None
) -> None:
    headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
    if length is not None:
        headers.append((b"content-length", str(length).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": headers})


def _dumps(value: object) -> bytes:
    """One compact JSON line (strict: NaN and non-JSON types raise)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def _version() -> str:
    try:
        return importlib.metadata.version("kachery-node")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
