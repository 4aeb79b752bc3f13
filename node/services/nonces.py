"""Ed25519 signing nonces made ahead of time by a helper process, for the feed signers.

A feed owner signs every message, one after another (each body holds the signature before it),
and the base-point multiplication of an RFC 8032 signature (~18 us of ~20) sits on the event
loop, in series. With a precomputed nonce (``protocol.identity.Nonce`` explains the
construction and why it is safe) a signature costs ~2.5 us, so nonces are made ahead of time on
the other core.

By a process, not a thread. A worker thread making them was measured first: its trips in and
out of the GIL (two libsodium calls per nonce) delayed the event loop every time it released
the GIL for SQLite, and single appends fell from 12.2k/s to 8.9k/s instead of rising. The nonce
maker is ``python -m kachery.node.services.nonces``, started on the first ``take``. It writes
64-byte records (r || R) into a pipe until the pipe is full, then sleeps in ``write``. The pipe
is the reserve: up to PIPE_BYTES of nonces in kernel memory, costing nothing while nobody signs,
and a pipe hands each byte to exactly one reader, so no nonce comes out twice, even to a fork.

Nothing ever waits for a nonce: when none is ready (the maker is starting, or a burst outran it),
``take`` returns None and the signer uses RFC 8032 for that message. If the maker cannot start
or dies, the node logs it and signs by RFC 8032 (only slower) until a retry RESTART_SECONDS later.

Rules kept: the random bytes come from ``os.urandom`` in the maker; a nonce is read from the pipe
once and handed out once (``take`` moves past it); nonces live in memory and in the pipe only;
a forked child drops the records its parent had already read (``os.register_at_fork``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import termios
import weakref

import trio

from kachery.node.changes import Doorbell
from kachery.protocol.identity import NONCE_RANDOM_BYTES, Nonce

log = logging.getLogger(__name__)

RECORD_BYTES = 64
"""One nonce in the pipe: the scalar r, then the point R."""

WRITE_RECORDS = 64
"""Records per write: 4096 bytes, at most PIPE_BUF, so each write lands whole (atomically)."""

READ_RECORDS = 256
"""Records read from the pipe at a time (one read syscall per 256 signatures)."""

PIPE_BYTES = 1 << 20
"""The pipe's capacity asked for (Linux's default limit for unprivileged processes): 16,384
nonces, 0.4 s of appends at 40k/s, made in ~0.35 s of one core. Otherwise the default 64 KiB."""

RESTART_SECONDS = 30.0
"""Wait before starting the maker again after it failed."""


class NonceReserve:
    """Precomputed signing nonces: run ``run`` in a nursery and hand ``take`` to signers.

    Attributes:
        dry: calls to ``take`` that found none ready (the signer used RFC 8032).
        starts: times the maker process was started.
    """

    def __init__(self) -> None:
        self._records = b""
        self._at = 0
        self._fd: int | None = None
        self._wanted = Doorbell()
        self.dry = 0
        self.starts = 0
        self.maker_pid: int | None = None
        _RESERVES.add(self)

    def take(self) -> Nonce | None:
        """A nonce nobody else will get, or None if none is ready. Never blocks."""
        at = self._at
        if at >= len(self._records):
            if not self._read():
                self.dry += 1
                return None
            at = 0
        records = self._records
        self._at = at + RECORD_BYTES
        return Nonce.precomputed(records[at : at + 32], records[at + 32 : at + RECORD_BYTES])

    def ready(self) -> int:
        """How many nonces are ready now: read and not yet handed out, plus those in the pipe."""
        held = (len(self._records) - self._at) // RECORD_BYTES
        if self._fd is None:
            return held
        waiting = bytearray(4)
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, waiting)
        except OSError:
            return held
        return held + int.from_bytes(waiting, sys.byteorder) // RECORD_BYTES

    def _read(self) -> bool:
        """Read the next records from the pipe; False if none are there yet."""
        if self._fd is None:
            self._wanted.ring()  # start the maker (or note that it is wanted after a failure)
            return False
        try:
            data = os.read(self._fd, READ_RECORDS * RECORD_BYTES)
        except BlockingIOError:
            return False
        whole = len(data) - len(data) % RECORD_BYTES  # always all of it: see WRITE_RECORDS
        self._records, self._at = data[:whole], 0
        return whole > 0

    async def run(self) -> None:
        """Start the maker when a nonce is first wanted, and again after it fails; until
        cancelled (which stops it)."""
        if getattr(sys, "frozen", False):  # a bundled app: sys.executable is not a Python
            log.info("no nonce maker in a frozen app: feed appends sign by RFC 8032")
            return
        while True:
            await self._wanted.wait()
            if await self._run_maker():
                await trio.sleep(RESTART_SECONDS)

    async def _run_maker(self) -> bool:
        """Run one maker process until it exits (True: it failed) or this is cancelled."""
        read_end, write_end = os.pipe()
        try:
            with contextlib.suppress(AttributeError, OSError):  # not Linux: the default size
                fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            os.set_blocking(read_end, False)
            process = await trio.lowlevel.open_process(
                [sys.executable, "-P", "-m", __name__],
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                start_new_session=True,  # the terminal's Ctrl-C is for the node, not for it
            )
        except OSError as exc:
            os.close(read_end)
            log.warning("cannot start the nonce maker (%s): feed appends sign by RFC 8032", exc)
            return True
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.starts += 1
        self._fd, self.maker_pid = read_end, process.pid
        try:
            code = await process.wait()
            log.warning("the nonce maker exited (code %s): feed appends sign by RFC 8032", code)
            return True
        finally:
            self._fd = self.maker_pid = None
            self._records, self._at = b"", 0
            os.close(read_end)
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()

    def _forget(self) -> None:
        self._records, self._at = b"", 0


_RESERVES: weakref.WeakSet[NonceReserve] = weakref.WeakSet()


def _forget_all_in_child() -> None:
    for reserve in list(_RESERVES):
        reserve._forget()


os.register_at_fork(after_in_child=_forget_all_in_child)


def make_nonces(out: int) -> None:
    """The maker: write nonce records to ``out`` until the reader goes away. It runs at the
    lowest CPU priority: it only ever works ahead, so a core the node needs is the node's."""
    with contextlib.suppress(OSError):
        os.nice(19)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        while True:
            records = []
            for _ in range(WRITE_RECORDS):
                scalar, point = Nonce(os.urandom(NONCE_RANDOM_BYTES)).spend()
                records.append(scalar + point)
            os.write(out, b"".join(records))


if __name__ == "__main__":
    make_nonces(sys.stdout.fileno())
