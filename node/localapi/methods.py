"""How the daemon and its services declare local-API methods, without the HTTP server.

A method marked ``@exposed`` is served under its own name; ``methods_of`` collects the marked
methods of the node and its services into the table that server.py's ``serve_api`` serves. The
services import this module only, so importing a service never loads hypercorn.

Non-goal: serving (server.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

_EXPOSED = "__kachery_api__"

F = TypeVar("F", bound=Callable[..., Any])


def exposed(func: F) -> F:
    """Mark a method of the daemon's control object as served by the API under its own name.

    The method is async and takes JSON-compatible keyword arguments (the request body's keys are
    the parameter names); it returns a JSON-compatible value whose object keys are camelCase, or
    it is an async generator and streams (see ``StreamResult``).
    """
    setattr(func, _EXPOSED, True)
    return func


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One API method.

    Attributes:
        func: the bound coroutine function to call with the request's keyword arguments; for a
            streaming method, a function returning (or a coroutine resolving to) an async
            iterator of events.
        streams: answer as NDJSON, one line per event.
    """

    func: Callable[..., Any]
    streams: bool = False
    signature: inspect.Signature = field(init=False, compare=False)
    """The parameters a call's arguments are checked against (computed once)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "signature", inspect.signature(self.func))


@dataclass(frozen=True, slots=True)
class StreamResult:
    """Yield this last from a streaming method to give the call its result (default None)."""

    value: Any


def methods_of(*controls: object) -> dict[str, MethodSpec]:
    """The method table for ``serve_api``: every ``@exposed`` method of the control objects
    (the node and its services), by name, streaming if it is an async generator function.

    Raises:
        TypeError: two objects expose the same name (a bug in the daemon).
    """
    table: dict[str, MethodSpec] = {}
    for control in controls:
        for name in dir(type(control)):
            func = getattr(control, name, None)
            if callable(func) and getattr(func, _EXPOSED, False):
                if name in table:
                    raise TypeError(f"API method {name!r} is exposed twice")
                table[name] = MethodSpec(func, streams=inspect.isasyncgenfunction(func))
    return table
