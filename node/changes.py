"""The two ways a Trio task here waits for another: a broadcast of changes, and a doorbell.

Trio's ``Event`` cannot be cleared, so both are an event replaced when spent, written once here
rather than at every place that waits.

- ``Changes``: state changed; every task waiting wakes and re-checks what it waits for
  (``wait_until(predicate)``). Waiters that arrive after a change wait for the next one.
- ``Doorbell``: one consumer's wake-up. ``ring`` is remembered until the consumer's next
  ``wait`` returns, so a ring while it works is not lost; many rings wake it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio


class Changes:
    """Wakes every waiter when ``notify`` is called."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        """State changed: wake everyone waiting now."""
        self._event.set()
        self._event = trio.Event()

    async def wait(self, *, deadline: float = math.inf) -> None:
        """Wait for the next change, or until ``deadline`` (trio time)."""
        event = self._event
        with trio.move_on_at(deadline):
            await event.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (without polling) until ``predicate()`` holds after some change."""
        while not predicate():
            await self._event.wait()


class Doorbell:
    """One consumer's wake-up: rings are kept until its next ``wait`` returns."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, *, deadline: float = math.inf) -> None:
        """Wait until rung (or ``deadline``, trio time); either way the rings so far are spent."""
        with trio.move_on_at(deadline):
            await self._event.wait()
        self._event = trio.Event()
