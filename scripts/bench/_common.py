"""Helpers shared by the benchmark scripts: timing, medians, and printing figures in a table."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

GIB = 1 << 30


def write_random_file(path: Path, size: int) -> None:
    """A file of incompressible bytes (random blocks, so nothing can shortcut them)."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = min(len(block), size - written)
            f.write(block[:n] if n < len(block) else block)
            block = block[1:] + block[:1]  # vary blocks cheaply
            written += n


def timed(
    fn: Callable[[], object], repeat: int, after: Callable[[], object] | None = None
) -> list[float]:
    """Wall-clock seconds of ``repeat`` runs of ``fn``; ``after`` runs untimed after each."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return times


def report(rows: list[tuple[str, float, list[float]]], reference: str) -> None:
    """Print rate (GB/s, median of runs), spread, and the ratio to the reference row."""
    ref = next(statistics.median(t) for name, _, t in rows if name == reference)
    print(f"{'what':44} {'GB/s':>7} {'min..max s':>15} {'vs ' + reference:>16}")
    for name, size, times in rows:
        med = statistics.median(times)
        print(
            f"{name:44} {size / med / 1e9:7.2f} {min(times):6.2f}..{max(times):<6.2f}"
            f" {ref / med:15.2f}x"
        )
