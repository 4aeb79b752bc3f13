"""The reserve of precomputed signing nonces (node/services/nonces.py): a real maker process
and pipe."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from kachery.node.services import nonces as nonces_module
from kachery.node.services.nonces import NonceReserve
from kachery.protocol.identity import KeyPair, Nonce, verify

from .swarm import until


async def first_nonce(reserve: NonceReserve) -> Nonce:
    """Take nonces until one is ready (the maker starts on the first ``take``)."""
    taken: list[Nonce | None] = [None]

    def took() -> bool:
        taken[0] = reserve.take()
        return taken[0] is not None

    await until(took)
    assert taken[0] is not None
    return taken[0]


async def test_the_maker_starts_on_first_demand_and_each_nonce_comes_out_once() -> None:
    reserve = NonceReserve()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve.run)
        await trio.sleep(0.1)
        assert reserve.starts == 0  # nobody asked: no process
        assert reserve.take() is None  # nothing ready: the signer uses RFC 8032, nothing waits
        assert reserve.dry == 1
        key = KeyPair(os.urandom(32))
        nonces = [await first_nonce(reserve)]
        await until(lambda: reserve.ready() >= 2000)  # let the maker get ahead
        nonces += [n for n in (reserve.take() for _ in range(2000)) if n is not None]
        assert len(nonces) == 2001
        points = set()
        for i, nonce in enumerate(nonces):
            signature = key.sign_with(b"message %d" % i, nonce)
            assert verify(key.public_key, b"message %d" % i, signature)
            points.add(signature[:32])
        assert len(points) == len(nonces)  # no nonce came out twice
        assert reserve.starts == 1
        pid = reserve.maker_pid
        assert pid is not None
        nursery.cancel_scope.cancel()
    assert reserve.maker_pid is None
    with pytest.raises(ProcessLookupError):  # stopping the reserve stopped (and reaped) the maker
        os.kill(pid, 0)


async def test_a_dead_maker_means_rfc_8032_signatures_until_it_is_restarted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nonces_module, "RESTART_SECONDS", 0.2)
    reserve = NonceReserve()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve.run)
        await first_nonce(reserve)
        pid = reserve.maker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: reserve.maker_pid != pid)
        assert reserve.take() is None  # the records read before it died are dropped with it
        await first_nonce(reserve)  # started again
        assert reserve.starts == 2
        assert reserve.maker_pid not in (None, pid)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_forked_child_gets_none_of_the_records_its_parent_read() -> None:
    reserve = NonceReserve()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve.run)
        await first_nonce(reserve)  # the parent now holds records read from the pipe
        assert reserve._records
        pid = os.fork()
        if pid == 0:  # the child: its copy of those records must be gone
            os._exit(0 if reserve._records == b"" else 1)
        _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert reserve._records  # the parent keeps its own
        nursery.cancel_scope.cancel()


async def test_a_maker_that_cannot_start_leaves_rfc_8032_signing_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(nonces_module.sys, "executable", "/nonexistent/python")
    reserve = NonceReserve()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve.run)
        assert reserve.take() is None
        await until(lambda: "cannot start the nonce maker" in caplog.text)
        assert reserve.take() is None  # still nothing: the signer keeps using RFC 8032
        assert reserve.starts == 0
        assert reserve.ready() == 0
        nursery.cancel_scope.cancel()


async def test_a_frozen_app_starts_no_maker(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a bundled app, sys.executable is the app itself: running it with -m would not make
    nonces (it might start another node), so the reserve stays empty and signing is RFC 8032."""
    monkeypatch.setattr(nonces_module.sys, "frozen", True, raising=False)
    reserve = NonceReserve()
    with trio.fail_after(5):
        await reserve.run()  # returns at once instead of waiting to start a maker
    assert reserve.take() is None
    assert reserve.starts == 0
