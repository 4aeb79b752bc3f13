"""Progress reporting on stderr: a one-line bar with rate and ETA when stderr is a terminal.

Non-goal: machine-readable progress (``--json`` output prints JSON lines instead).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.1
"""Redraw at most this often: faster is flicker and wasted CPU on a fast transfer."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``5`` -> ``'5s'``, ``125`` -> ``'2m05s'``, ``3720`` -> ``'1h02m'``, ``90000`` -> ``'1d01h'``:
    the unit is in the text, so ``2m05s`` cannot be read as hours and minutes."""
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressBar:
    """A progress line for one long operation.

    Args:
        label: what is being done (``storing data.nwb``).
        total: bytes expected, if known.
        stream: where to draw (stderr).
        enabled: draw at all; by default only when ``stream`` is a terminal.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._done = 0
        self.extra = ""

    def update(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= REDRAW_SECONDS:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self._done / elapsed
        parts = [self.label]
        if self.total:
            frac = min(self._done / self.total, 1.0)
            width = 24
            filled = int(frac * width)
            parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%")
            parts.append(f"{format_bytes(self._done)}/{format_bytes(self.total)}")
            if rate > 0 and self._done < self.total:
                parts.append(f"ETA {format_duration((self.total - self._done) / rate)}")
        else:
            parts.append(format_bytes(self._done))
        parts.append(f"{format_bytes(rate)}/s")
        if self.extra:
            parts.append(self.extra)
        self.stream.write("\r\x1b[2K" + "  ".join(parts))
        self.stream.flush()

    def finish(self) -> None:
        """Clear the line."""
        if self.enabled and self._last_draw:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
