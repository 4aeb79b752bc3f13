"""Who serves which task functions: this node's announcements, and what members announced.

A node announces the functions its workers serve in each channel where it has ``provideTasks``
(``TaskProviders``) on every new session and whenever its workers come or go; it remembers each
peer's latest announcement per channel while that session lasts. ``candidates`` lists the members
(this node included) that serve a function in some channel now, for the requester's choice.

Non-goal: choosing among them (kachery.protocol.tasks.choose_provider).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kachery.node.changes import Changes
from kachery.node.daemon.peer import PeerConnection
from kachery.node.services.host import Host
from kachery.node.services.tasks.common import has_role, log
from kachery.protocol.channel import Role
from kachery.protocol.task_jobs import JobBook
from kachery.protocol.tasks import Candidate, TaskProviders, TaskType


@dataclass(slots=True)
class Announced:
    """What a peer last announced in a channel."""

    conn: PeerConnection
    serial: int
    generation: int
    functions: dict[str, TaskType]


class ProviderDirectory:
    """Task functions served in this node's channels."""

    def __init__(self, node: Host, book: JobBook, wake_requests: Callable[[], None]) -> None:
        self.node = node
        self.book = book
        self.wake_requests = wake_requests
        """Wakes the requests following a provider (its session may have closed)."""
        self.changed = Changes()
        """Notified whenever who serves what may have changed."""
        self.remote: dict[tuple[str, str], Announced] = {}
        """The latest announcement of each (peer, channel), while its session lasts."""
        self._announced: dict[PeerConnection, dict[str, tuple[int, dict[str, str]]]] = {}
        self._serials: dict[PeerConnection, int] = {}
        self._next_serial = 1

    def updated(self) -> None:
        """This node's workers changed: announce, and wake requests waiting for a provider."""
        self.changed.notify()
        self.node.notify()

    def _session_state(self) -> tuple[Any, ...]:
        m = self.node.membership
        return (
            tuple((c, frozenset(c.channels)) for c in self.node.connections.values()),
            tuple((c, m.history(c).version) for c in m.channel_ids()),
            self.book.generation,
        )

    async def watch(self) -> None:
        """On every change of sessions, membership or workers: announce what this node serves
        where it changed, forget announcements of ended sessions, wake requests."""
        while True:
            state = self._session_state()

            def changed(state: tuple[Any, ...] = state) -> bool:
                return self._session_state() != state

            await self._announce()
            self._forget_closed()
            self.changed.notify()
            self.wake_requests()
            await self.node.wait_until(changed)

    async def _announce(self) -> None:
        me = self.node.node_id
        for conn in list(self.node.connections.values()):
            sent = self._announced.setdefault(conn, {})
            for channel in sorted(conn.channels):
                functions: dict[str, str] = {}
                if has_role(self.node, channel, me, Role.PROVIDE_TASKS):
                    functions = {f: str(t) for f, t in self.book.functions_in(channel).items()}
                state = (self.book.generation, functions)
                previous = sent.get(channel)
                if previous == state or (previous is None and not functions):
                    continue
                if previous is not None and previous[1] == functions == {}:
                    continue
                sent[channel] = state
                msg = TaskProviders(
                    channel=channel, generation=self.book.generation, functions=functions
                )
                conn.send_quietly(msg)

    def _forget_closed(self) -> None:
        live = set(self.node.connections.values())
        for conn in [c for c in self._announced if c not in live]:
            del self._announced[conn]
        for conn in [c for c in self._serials if c not in live]:
            del self._serials[conn]
        for key in [k for k, a in self.remote.items() if a.conn not in live]:
            del self.remote[key]

    async def on_providers(self, conn: PeerConnection, msg: TaskProviders) -> None:
        if msg.channel not in conn.channels:
            return
        if self.node.connections.get(conn.node_id) is not conn:
            # A duplicate session on its way out: what it says would replace what the session
            # that stays said, and be forgotten when it closes, while the peer, having told the
            # session that stays, would never say it again.
            return
        if not has_role(self.node, msg.channel, conn.node_id, Role.PROVIDE_TASKS) and msg.functions:
            log.debug("ignored task functions from %s...: it lacks provideTasks", conn.node_id[:16])
            return
        serial = self._serials.get(conn)
        if serial is None:
            serial = self._serials[conn] = self._next_serial
            self._next_serial += 1
        self.remote[(conn.node_id, msg.channel)] = Announced(
            conn,
            serial,
            msg.generation,
            {f: TaskType(t) for f, t in msg.functions.items()},
        )
        self.changed.notify()

    def candidates(self, function_id: str, channels: list[str]) -> list[Candidate]:
        """Members that serve ``function_id`` in one of ``channels`` now (this node included)."""
        me = self.node.node_id
        found: dict[str, Candidate] = {}
        for channel in channels:
            if has_role(self.node, channel, me, Role.PROVIDE_TASKS):
                task_type = self.book.serves(function_id, channel)
                if task_type is not None:
                    found[me] = Candidate(me, channel, task_type, (0, self.book.generation))
                    break
        for (node_id, channel), announced in self.remote.items():
            if node_id in found or channel not in channels:
                continue
            conn = self.node.connections.get(node_id)
            if conn is not announced.conn or conn.closed.is_set() or channel not in conn.channels:
                continue
            if not has_role(self.node, channel, node_id, Role.PROVIDE_TASKS):
                continue
            task_type = announced.functions.get(function_id)
            if task_type is not None:
                marker = (announced.serial, announced.generation)
                found[node_id] = Candidate(node_id, channel, task_type, marker)
        return list(found.values())

    def known_functions(self, channels: list[str]) -> list[str]:
        known: set[str] = set()
        for (_, channel), announced in self.remote.items():
            if channel in channels:
                known.update(announced.functions)
        for channel in channels:
            known.update(self.book.functions_in(channel))
        return sorted(known)
