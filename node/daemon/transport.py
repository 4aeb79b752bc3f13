"""Websocket transport: listening, dialing, and the ``Link`` a peer session runs over.

trio-websocket carries one kachery frame per binary websocket message, under the subprotocol
``kachery/1``. A dialer that offers another version is rejected at the HTTP upgrade with a body
naming both versions. Its defaults are tuned for bulk transfer (a 4 KiB receive buffer caps a
connection near 150 MB/s; messages above 1 MiB are refused): see RECEIVE_BUFFER_BYTES.

A ``wss://`` address is dialed through TLS, for a node behind a TLS-terminating reverse proxy
(a lab whose firewall passes only HTTPS): the certificate is checked against the system's CAs
(OpenSSL's ``SSL_CERT_FILE``/``SSL_CERT_DIR`` name a private CA). Nodes themselves listen on
plain ``ws://``: TLS adds no security to a session, whose handshake authenticates both nodes and
encrypts every frame; it only gets the bytes through.

``Link`` is the small interface the session driver needs; ``MemoryLink`` pairs implement it
in memory for socket-free tests. Non-goal: what the frames say (protocol/session.py).
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NoReturn, Protocol
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    serve_websocket,
    wrap_client_stream,
)

from kachery.node.daemon import wsmask
from kachery.node.daemon.boundary import PeerFaults, leaves
from kachery.node.errors import LinkClosed as LinkClosed  # re-exported: where a Link raises it
from kachery.node.errors import NodeError
from kachery.protocol.session import MAX_FRAME_BYTES, PROTOCOL

log = logging.getLogger(__name__)

MASKING_IN_C = wsmask.install()
"""Frames a dialer sends are masked, and unmasked by the listener, in C (see wsmask.py)."""

RECEIVE_BUFFER_BYTES = 1024 * 1024
"""Bytes read from the socket per receive: trio-websocket's 4 KiB default caps a connection
near 0.25 GB/s; 1 MiB reached 1.5-2.3 GB/s plain and ~1 GB/s with AEGIS and SHA-1 here."""

MESSAGE_QUEUE = 4
"""Websocket messages buffered between trio-websocket's reader and ours (bounded memory)."""

DIAL_TIMEOUT = 10.0
"""Seconds to open a TCP connection and finish the websocket upgrade."""

CLOSE_TIMEOUT = 1.0
"""Seconds to wait for the peer's half of the websocket close handshake before dropping TCP."""


class DialError(NodeError):
    """A peer could not be reached, or refused the websocket upgrade."""


class Link(Protocol):
    """One bidirectional message pipe to a peer."""

    remote: str
    """Where the peer is, as ``ws://host:port`` (dialed) or ``host`` (accepted)."""

    async def send(self, data: bytes) -> None:
        """Send one message; raises LinkClosed."""

    async def receive(self) -> bytes:
        """Receive one message; raises LinkClosed."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the link (idempotent)."""


class WebSocketLink:
    """A ``Link`` over a trio-websocket connection."""

    def __init__(self, ws: WebSocketConnection, remote: str) -> None:
        self._ws = ws
        self.remote = remote

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_message(data)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None
        if isinstance(message, str):
            await self.close(1003, "kachery frames are binary")
            raise LinkClosed(1003, "peer sent a text frame")
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        # aclose closes the TCP stream in its finally, even when the timeout cuts it short.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(code, reason[:120])


def _closed(exc: ConnectionClosed) -> LinkClosed:
    reason = exc.reason
    return LinkClosed(None, None) if reason is None else LinkClosed(reason.code, reason.reason)


async def listen(
    handler: Callable[[WebSocketLink], Awaitable[None]],
    host: str,
    port: int,
    *,
    faults: PeerFaults,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve kachery/1 websockets; ``task_status.started(bound port)``; calls ``handler(link)``.

    Whatever a connection raises is contained in ``faults`` (node/daemon/boundary.py).
    """

    async def on_request(request: WebSocketRequest) -> None:
        # The peer boundary: a reset right after the upgrade (accept raises ConnectionClosed,
        # request.remote raises ENOTCONN) or any failure in the handler ends this connection
        # only; serve_websocket would otherwise let it end the listener, and the daemon.
        remote = "(address unknown)"
        with faults.contain(remote, "inbound connection from"):
            remote = str(getattr(request.remote, "address", request.remote))
            offered = list(request.proposed_subprotocols)
            if PROTOCOL not in offered:
                body = f"this node speaks {PROTOCOL}; the dialer offered {offered or 'nothing'}"
                await request.reject(400, body=body.encode())
                return
            ws = await request.accept(subprotocol=PROTOCOL)
            await handler(WebSocketLink(ws, remote))

    serve = functools.partial(
        serve_websocket,
        on_request,
        host,
        port,
        None,
        max_message_size=MAX_FRAME_BYTES + 1024,
        receive_buffer_size=RECEIVE_BUFFER_BYTES,
        message_queue_size=MESSAGE_QUEUE,
        connect_timeout=DIAL_TIMEOUT,
        disconnect_timeout=CLOSE_TIMEOUT,
    )
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(serve)
        task_status.started(server.port)
    raise AssertionError("serve_websocket returned")


@asynccontextmanager
async def dial(address: str, *, offer: str = PROTOCOL) -> AsyncIterator[WebSocketLink]:
    """Open a kachery/1 websocket to ``address`` (``ws://host:port``) for the ``async with`` body.

    The TCP stream is opened here and closed here, whether the body returns, raises or is
    cancelled, even mid-upgrade (trio-websocket's own connect leaves it open if cancelled there).
    trio-websocket's reader task runs in a nursery private to this function; an exception from
    the body comes out as itself, never wrapped in that nursery's exception group.

    Raises:
        DialError: unreachable, timed out, or refused (with the peer's reason). Exceptions from
            the body pass through unchanged.
    """
    parts = urlsplit(address)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise DialError(f"{address!r} is not a ws://host:port or wss://host:port address")
    tls = parts.scheme == "wss"
    host, port = parts.hostname, parts.port or (443 if tls else 80)
    stream: trio.abc.Stream
    try:
        with trio.fail_after(DIAL_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
            stream = tcp
            if tls:
                stream = trio.SSLStream(tcp, _tls_context(), server_hostname=host)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
    except trio.TooSlowError:
        raise DialError(f"{address}: timed out after {DIAL_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise DialError(f"{address}: cannot connect ({exc.strerror or exc})") from None
    except trio.BrokenResourceError as exc:  # the TLS handshake failed
        reason = exc.__cause__ or exc
        raise DialError(f"{address}: the TLS handshake failed ({reason})") from None
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(DIAL_TIMEOUT):
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    f"{host}:{port}",
                    parts.path or "/",
                    subprotocols=[offer],
                    max_message_size=MAX_FRAME_BYTES + 1024,
                    receive_buffer_size=RECEIVE_BUFFER_BYTES,
                    message_queue_size=MESSAGE_QUEUE,
                )
            if ws.subprotocol != offer:
                raise DialError(f"{address} did not agree to speak {offer}")
            link = WebSocketLink(ws, address)
            try:
                yield link
            except BaseException as exc:  # re-raised below, outside the nursery
                body_error = exc
            finally:
                with trio.CancelScope(shield=True):
                    await link.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_error is not None:
            raise body_error from None
        raise _dial_error(address, group) from None
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    if body_error is not None:
        raise body_error


def _tls_context() -> ssl.SSLContext:
    """The client TLS context for ``wss://`` (made once per trust configuration: loading the
    system's CAs takes milliseconds)."""
    return _tls_context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_context_for(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return ssl.create_default_context()  # reads SSL_CERT_FILE / SSL_CERT_DIR as they are now


def _dial_error(address: str, group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to report for a websocket upgrade that failed inside ``dial``."""
    for exc in leaves(group):
        if isinstance(exc, DialError):
            return exc
        if isinstance(exc, ConnectionRejected):
            detail = (exc.body or b"").decode(errors="replace") or f"HTTP {exc.status_code}"
            return DialError(f"{address} refused the connection: {detail}")
        if isinstance(exc, trio.TooSlowError):
            return DialError(f"{address}: the websocket upgrade timed out")
        if isinstance(exc, (HandshakeError, ConnectionClosed, OSError)):
            return DialError(f"{address}: the websocket upgrade failed ({exc})")
    return group


class MemoryLink:
    """One end of an in-memory link (for tests): ``MemoryLink.pair()`` makes two."""

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        remote: str,
    ) -> None:
        self._send = send_channel
        self._receive = receive_channel
        self.remote = remote
        self.close_code: int | None = None
        self.close_reason = ""
        self.peer: MemoryLink | None = None

    @classmethod
    def pair(cls, capacity: int = 16) -> tuple[MemoryLink, MemoryLink]:
        a_send, b_receive = trio.open_memory_channel[bytes](capacity)
        b_send, a_receive = trio.open_memory_channel[bytes](capacity)
        a = cls(a_send, a_receive, "memory:b")
        b = cls(b_send, b_receive, "memory:a")
        a.peer, b.peer = b, a
        return a, b

    async def send(self, data: bytes) -> None:
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkClosed(self.close_code, self.close_reason) from None

    async def receive(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            peer = self.peer
            code = peer.close_code if peer is not None else None
            reason = peer.close_reason if peer is not None else ""
            raise LinkClosed(code, reason) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        await self._send.aclose()
        await self._receive.aclose()
