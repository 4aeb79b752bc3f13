"""Real ``kachery-node`` daemons in subprocesses: for end-to-end tests, the demo, benchmarks.

``Daemon(home)`` initializes a node home; ``start()`` runs ``kachery-node start`` on loopback
with free ports (``--listen 127.0.0.1:0 --api-port 0``) and returns once its log says the local
API is up (a thread reads the log: nothing polls or sleeps); ``cli(...)`` runs any command
against it; ``stop()`` is Ctrl-C. Labs can use it to test their own tooling against real nodes.
Non-goal: managing long-lived production daemons (use a service manager).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

EXE = str(Path(sys.executable).with_name("kachery-node"))
"""The console script of this installation."""


class CommandFailed(Exception):
    """A ``kachery-node`` command exited with an error (its stderr is the message)."""


class Daemon:
    """One node: its home, and its daemon process once started."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.node_id = self.cli("init").strip()

    def env(self) -> dict[str, str]:
        return {**os.environ, "KACHERY_NODE_HOME": str(self.home)}

    def cli(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [EXE, *args], capture_output=True, text=True, env=self.env(), timeout=120
        )
        if check and proc.returncode != 0:
            raise CommandFailed(f"kachery-node {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout if check else proc.stdout + proc.stderr

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def last_load_seconds(self) -> float:
        """How long the daemon's last download took, from its log ("loaded ... in 2.91 s"): from
        the request to the verified file in the store, without the command's start-up or a
        copy out of the store (``load -o``)."""
        lines = [line for line in self.log if " loaded sha1://" in line]
        if not lines:
            raise CommandFailed("the daemon has logged no finished download")
        return float(lines[-1].rsplit(" in ", 1)[1].split()[0])

    def start(self, *extra: str, timeout: float = 60) -> None:
        self.log = []
        self._ready.clear()
        self.proc = subprocess.Popen(
            [EXE, "start", "--listen", "127.0.0.1:0", "--api-port", "0", *extra],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=self.env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise CommandFailed("the daemon did not start:\n" + "".join(self.log))

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if "local API on 127.0.0.1:" in line:
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        """Ctrl-C the daemon and wait for it; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None
