"""Finding a file: which connected peers provide it.

``Finder.find`` asks every session whose peer has ``provideFiles`` in a channel where this node
has ``requestFiles`` (one ``FindFile`` each, in parallel, FIND_TIMEOUT each) and, if nobody has
it, waits up to FIND_WAIT for another provider to connect. Positive answers are cached for
FIND_CACHE_SECONDS (at most MAX_FIND_CACHE files); "nobody has it" never is. Peers banned for
corrupt data (the shared ``PenaltyBox``) are left out. ``agreeing`` picks, among providers that
disagree on a file's size or manifest, those whose claim most of them make.

Non-goal: fetching bytes (fetching.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from kachery.node.daemon.peer import PeerConnection
from kachery.node.errors import NotPermitted, Unavailable
from kachery.protocol.channel import Role
from kachery.protocol.errors import KacheryError
from kachery.protocol.files import FindFile, FindFileResponse
from kachery.protocol.penalties import PenaltyBox
from kachery.protocol.uri import FileURI
from kachery.storage.errors import NotFound

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger("kachery.node.services.files")

FIND_TIMEOUT = 5.0
"""Seconds to wait for one peer's answer to FindFile."""

FIND_WAIT = 10.0
"""Seconds to wait for a provider to be connected before saying a file is not in the channel."""

FIND_CACHE_SECONDS = 10.0
"""How long answers to FindFile are reused."""

MAX_FIND_CACHE = 4096
"""Finds cached at once (the oldest go first beyond it)."""


@dataclass(frozen=True, slots=True)
class Provider:
    """A peer that answered FindFile: it serves the file in ``channel``."""

    node_id: str
    channel: str
    size: int
    manifest_sha1: str | None


class Finder:
    """Providers of files among this node's sessions."""

    def __init__(self, node: Host, penalties: PenaltyBox) -> None:
        self.node = node
        self.penalties = penalties
        self.find_wait = FIND_WAIT
        self._cache: dict[str, tuple[float, list[Provider]]] = {}

    def _asking_channels(self, conn: PeerConnection) -> list[str]:
        """Channels in which this node may ask ``conn``'s peer for files."""
        m = self.node.membership
        return [
            c
            for c in sorted(conn.channels)
            if Role.REQUEST_FILES in m.roles_of(c, self.node.node_id)
            and Role.PROVIDE_FILES in m.roles_of(c, conn.node_id)
        ]

    def check_may_request(self) -> None:
        m = self.node.membership
        if not any(
            Role.REQUEST_FILES in m.roles_of(c, self.node.node_id) for c in m.active_channels()
        ):
            raise NotPermitted(
                "not permitted: this node lacks role requestFiles in every channel it is in"
            )

    async def find(
        self, sha1: str, *, only: str | None = None, refresh: bool = False
    ) -> list[Provider]:
        """Providers of a file among connected peers (waiting up to FIND_WAIT for one).

        Raises:
            NotPermitted: this node may not request files in any channel.
        """
        self.check_may_request()
        cached = self._cache.get(sha1)
        fresh = cached is not None and trio.current_time() - cached[0] < FIND_CACHE_SECONDS
        if cached is not None and fresh and not refresh:
            found = cached[1]
        else:
            found = await self._ask_all(sha1)
            if not found:
                with trio.move_on_after(self.find_wait):
                    asked = set(self.candidates())
                    await self.node.wait_until(lambda: bool(set(self.candidates()) - asked))
                    found = await self._ask_all(sha1)
            if found:  # "nobody has it" is never cached: a provider may connect any moment
                self._remember_find(sha1, found)
        if only is not None:
            found = [p for p in found if p.node_id == only]
        banned = self.penalties.banned_peers(trio.current_time())
        return [p for p in found if p.node_id not in banned]

    def _remember_find(self, sha1: str, found: list[Provider]) -> None:
        """Cache a find; expired entries go first, then the oldest beyond MAX_FIND_CACHE."""
        now = trio.current_time()
        cache = self._cache
        cache.pop(sha1, None)
        cache[sha1] = (now, found)  # insertion order is age order
        while (
            len(cache) > MAX_FIND_CACHE or now - next(iter(cache.values()))[0] > FIND_CACHE_SECONDS
        ):
            del cache[next(iter(cache))]

    def candidates(self) -> list[str]:
        return [n for n, conn in self.node.connections.items() if self._asking_channels(conn)]

    async def _ask_all(self, sha1: str) -> list[Provider]:
        found: list[Provider] = []

        async def ask(conn: PeerConnection, channel: str) -> None:
            try:
                reply = await conn.request(
                    FindFile(id=0, channel=channel, sha1=sha1), reply_timeout=FIND_TIMEOUT
                )
            except Unavailable as exc:
                current = self.node.connections.get(conn.node_id)
                if current is not None and current is not conn:  # the session was replaced
                    await ask(current, channel)
                else:
                    log.debug("FindFile to %s...: %s", conn.node_id[:16], exc)
                return
            except KacheryError as exc:
                log.debug("FindFile to %s...: %s", conn.node_id[:16], exc)
                return
            if isinstance(reply, FindFileResponse) and reply.has and reply.size is not None:
                found.append(Provider(conn.node_id, channel, reply.size, reply.manifest_sha1))

        async with trio.open_nursery() as nursery:
            for conn in list(self.node.connections.values()):
                channels = self._asking_channels(conn)
                if channels:
                    nursery.start_soon(ask, conn, channels[0])
        return sorted(found, key=lambda p: p.node_id)

    def node_named(self, name: str) -> str:
        """The connected node whose ID starts with ``name`` (as ``peers`` prints them), if
        exactly one does; else ``name`` itself (a full ID, or one that finds nobody)."""
        matches = [n for n in self.node.connections if n.startswith(name.lower())]
        return matches[0] if len(matches) == 1 else name

    def not_found(self, uri: FileURI, only: str | None = None) -> NotFound:
        """The error for a file no usable provider has, saying whom it asked."""
        banned = self.penalties.banned_peers(trio.current_time())
        if only is not None:
            if only in banned:
                why = "is not asked for a while: it sent corrupt data repeatedly"
            elif only not in self.node.connections:
                why = "is not connected to this node (see 'kachery-node peers')"
            elif only not in self.candidates():
                why = (
                    "does not provide files (role provideFiles) in a channel shared with this node"
                )
            else:
                why = "does not have it"
            return NotFound(f"{uri}: node {only[:16]}... {why}")
        channels = ", ".join(
            self.node.membership.name_of(c) for c in self.node.membership.active_channels()
        )
        candidates = self.candidates()
        asked = len(candidates) - len(banned.intersection(candidates))
        detail = (
            f" ({len(banned)} more sent corrupt data and are not asked for now)" if banned else ""
        )
        return NotFound(
            f"{uri} was not found in channel {channels or '(none)'}: none of the {asked} connected"
            f" peers that provide files has it{detail}"
        )


def agreeing(uri: FileURI, providers: list[Provider]) -> list[Provider]:
    """The providers whose own claim of a file's size and manifest is the one most of them make
    (ties: the larger size, then the manifest hash), for a URI that pins neither.

    Only providers that made the claim a download follows are asked for its pieces, so a piece
    that fails the claimed hashes contradicts its sender's own authenticated answer: proof
    enough to penalise it. A member that lies about the size or the manifest only keeps itself
    out of the download; it cannot get honest providers penalised.
    """
    claims: dict[tuple[int, str], list[Provider]] = {}
    for p in providers:
        claims.setdefault((p.size, p.manifest_sha1 or ""), []).append(p)
    if len(claims) == 1:
        return providers
    chosen = max(claims, key=lambda c: (len(claims[c]), c))
    others = [p.node_id[:16] + "..." for c, ps in claims.items() if c != chosen for p in ps]
    log.warning(
        "providers of %s disagree on its size or manifest; following the claim of %d of them"
        " (%d bytes), not that of %s",
        uri.sha1[:12],
        len(claims[chosen]),
        chosen[0],
        ", ".join(others),
    )
    return claims[chosen]
