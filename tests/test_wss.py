"""A node behind a TLS-terminating reverse proxy, announced as wss://: real TLS over 127.0.0.1.

The proxy here stands in for nginx or a lab's HTTPS gateway: it takes TLS connections with the
test certificate in tests/vectors/tls (self-signed for 127.0.0.1, valid 2000-2126; its key is a
test key, public on purpose) and passes the plain bytes on to the node's ws:// listener.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import pytest
import trio

from kachery.node.daemon.transport import DialError, dial

from .swarm import WAIT, control, swarm, wait
from .test_files import files_of, store_random

TLS = Path(__file__).parent / "vectors" / "tls"


async def tls_proxy(nursery: trio.Nursery, target: dict[str, int]) -> int:
    """Serve TLS on a free port, forwarding each connection to 127.0.0.1:target["port"]."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "localhost.crt", TLS / "localhost.key")

    async def pipe(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
        try:
            while data := await source.receive_some(1 << 16):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(sink)

    async def forward(client: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", target["port"])
        except OSError:
            await trio.aclose_forcefully(client)
            return
        async with trio.open_nursery() as inner:
            inner.start_soon(pipe, client, upstream)
            inner.start_soon(pipe, upstream, client)

    serve = functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, forward, 0, context)
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return port


async def test_a_member_joins_and_loads_through_a_wss_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "localhost.crt"))  # trust the test CA
    async with swarm(tmp_path) as s:
        target: dict[str, int] = {}
        proxy = await tls_proxy(s.nursery, target)
        owner = await s.start("owner", announce=[f"wss://127.0.0.1:{proxy}"])
        target["port"] = owner.listen_port
        await control(owner).channel_create("lab")
        member = await s.start("member")
        token = (await control(owner).channel_invite("lab", ["all"]))["token"]
        await control(member).channel_join(
            token
        )  # dials the announced wss:// address: TLS, then ws
        await wait(member, lambda: owner.node_id in member.connections)
        assert member.connections[owner.node_id].address == f"wss://127.0.0.1:{proxy}"
        entry, data = store_random(owner, tmp_path, 3_000_000)
        with trio.fail_after(WAIT):
            got = await files_of(member).download(entry.uri())
        assert got.path.read_bytes() == data
        s.nursery.cancel_scope.cancel()


async def test_a_wss_peer_whose_certificate_is_not_trusted_is_a_clear_dial_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system CAs do not know the test CA
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    async with swarm(tmp_path) as s:
        target: dict[str, int] = {}
        proxy = await tls_proxy(s.nursery, target)
        owner = await s.start("owner")
        target["port"] = owner.listen_port
        with pytest.raises(DialError, match=r"TLS handshake failed .*certificate verify failed"):
            async with dial(f"wss://127.0.0.1:{proxy}"):
                pass
        s.nursery.cancel_scope.cancel()
