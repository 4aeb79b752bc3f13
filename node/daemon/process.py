"""``kachery-node start``: one daemon per node home, as a process.

``run_daemon`` takes the home's lock (a second daemon for the same home is refused, naming the
pid that holds it), tunes glibc's allocator for the session's large buffers, runs the node and
the local API on 127.0.0.1 in one Trio loop (``serve_node``), publishes ``daemon.json`` for
clients, and stops cleanly on Ctrl-C, SIGTERM or the API's ``shutdown``.

Non-goal: what the node does (node.py) and the API's HTTP (node/localapi/server.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from kachery.node.daemon.control import NodeControl
from kachery.node.daemon.node import Node
from kachery.node.errors import NodeError, lone_error
from kachery.node.home import NodeHome
from kachery.protocol.errors import InvalidInput, KacheryError

log = logging.getLogger("kachery.node")

LOCK_FILE = "daemon.lock"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


async def _stop_on_signals(
    node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM (a service manager) starts an orderly shutdown.

    Handling the signal here, rather than letting Trio raise KeyboardInterrupt wherever the
    daemon happens to be (inside hypercorn, mid-request), makes the stop deterministic. Once the
    first signal is handled the default behaviour returns: a second Ctrl-C interrupts at once.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s received: stopping", signal.Signals(signum).name)
            node.shutdown_requested.set()
            return


def tune_malloc() -> bool:
    """Let glibc serve the daemon's large, short-lived buffers from its heap.

    By default glibc maps every buffer over 128 KiB fresh from the kernel and unmaps it when
    freed, so each 256 KiB websocket frame costs ~100 page faults; measured here (two processes
    over loopback, AEGIS and SHA-1 per frame) that halves to quarters session throughput. Raising
    the mmap threshold to 4 MiB and the trim threshold to 16 MiB keeps them in the heap, at the
    price of up to 16 MiB of freed memory held. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20) and mallopt(_M_TRIM_THRESHOLD, 16 << 20))


@contextmanager
def daemon_lock(home: NodeHome) -> Iterator[None]:
    """Hold the home's daemon lock, or raise NodeError naming the daemon that holds it."""
    path = home.path / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise NodeError(
                f"a kachery-node daemon is already running for {home.path} (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def serve_node(
    home: NodeHome,
    *,
    listen: str,
    api_port: int,
    announce: list[str],
    verbose: bool = False,
    max_upload_rate: float | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node and its local API until cancelled or asked to shut down."""
    from kachery.node.localapi.contract import (
        ensure_client_auth,
        remove_daemon_info,
        write_daemon_info,
    )
    from kachery.node.localapi.methods import methods_of
    from kachery.node.localapi.server import serve_api

    host, _, port_text = listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidInput(f"--listen {listen!r} is not HOST:PORT") from None
    node = Node(
        home,
        listen_host=host or "0.0.0.0",
        listen_port=port,
        announce=announce,
        max_upload_rate=max_upload_rate,
    )
    token = ensure_client_auth(home.path)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        bound_api = await nursery.start(
            functools.partial(
                serve_api,
                methods_of(NodeControl(node), *node.services.controls()),
                node_id=node.node_id,
                token=token,
                port=api_port,
                verbose=verbose,
                locate=home.files.locate,
            )
        )
        write_daemon_info(
            home.path,
            {
                "pid": os.getpid(),
                "apiPort": bound_api,
                "nodeId": node.node_id,
                "listen": f"{node.listen_host}:{node.listen_port}",
            },
        )
        if threading.current_thread() is threading.main_thread():
            await nursery.start(_stop_on_signals, node)
        log.info("local API on 127.0.0.1:%d", bound_api)
        task_status.started(node)
        try:
            await node.shutdown_requested.wait()
        finally:
            remove_daemon_info(home.path)
            nursery.cancel_scope.cancel()


def run_daemon(
    home: NodeHome,
    *,
    listen: str,
    api_port: int,
    announce: list[str],
    verbose: bool,
    max_upload_rate: float | None = None,
) -> None:
    """``kachery-node start``: run in the foreground until Ctrl-C (or the ``shutdown`` call).

    Raises:
        KacheryError: the node could not start (home locked, port busy, bad address), as itself
            rather than inside the exception group that Trio's nurseries wrap errors in.
    """
    logging.getLogger("kachery").setLevel(logging.DEBUG if verbose else logging.INFO)
    tune_malloc()
    with daemon_lock(home):
        home.files.blobs.clean_temp()
        run = functools.partial(
            serve_node,
            home,
            listen=listen,
            api_port=api_port,
            announce=announce,
            verbose=verbose,
            max_upload_rate=max_upload_rate,
        )
        try:
            trio.run(run)
        except BaseException as exc:
            error = lone_error(exc)
            if isinstance(error, KeyboardInterrupt):
                log.info("stopped (Ctrl-C)")
                return
            if isinstance(error, KacheryError):
                raise error from None
            raise
        log.info("stopped")
