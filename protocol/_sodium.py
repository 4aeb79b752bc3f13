"""PyNaCl's compiled libsodium, called directly where the public bindings cost more than the work.

``nacl.bindings`` checks its arguments and copies its result out of a fresh buffer on every
call: ~1.3 us per call for a 32-byte scalar operation, ~44-230 us for a 256 KiB AEAD frame.
``nacl._sodium`` is PyNaCl's private cffi module; when it is missing, or lacks a function a
caller needs, ``libsodium`` returns None and the caller uses the public bindings instead (same
bytes: the tests check that both paths agree).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sodium:
    """PyNaCl's cffi ``ffi`` and ``lib`` objects."""

    ffi: Any
    lib: Any
    uncleared: Any
    """Allocates C buffers without zero-filling them (each byte is written before use)."""


def libsodium(*needed: str) -> Sodium | None:
    """PyNaCl's compiled libsodium if it exposes every function in ``needed``, else None."""
    try:
        sodium = importlib.import_module("nacl._sodium")
    except ImportError:
        return None
    ffi, lib = getattr(sodium, "ffi", None), getattr(sodium, "lib", None)
    if ffi is None or not all(hasattr(lib, name) for name in needed):
        return None
    return Sodium(ffi, lib, ffi.new_allocator(should_clear_after_alloc=False))
