"""The node's own control methods, served by the local API: ``status``, ``peers``,
``channel_*``, ``wait_peers``, ``shutdown``.

Each is a thin call into the node (sessions, membership) that answers in JSON with camelCase
keys. The services expose their own methods (``file_*``, ``feed_*``, ``task_*``) the same way.

Non-goal: the HTTP side (node/localapi/server.py) and the work itself (node.py, membership.py).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import trio

from kachery.node.daemon.membership import now_ms
from kachery.node.daemon.peer import HandshakeFailed
from kachery.node.daemon.transport import DialError
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.localapi.methods import exposed
from kachery.protocol.channel import Invite, parse_roles
from kachery.protocol.errors import CloseCode, InvalidInput
from kachery.protocol.messages import ChannelLeave

if TYPE_CHECKING:
    from kachery.node.daemon.node import Node

_REFUSING_CODES = {
    CloseCode.INVITE_REFUSED,
    CloseCode.AUTHENTICATION_FAILED,
    CloseCode.NOT_A_MEMBER,
}
"""A join that ends with one of these was refused (NotPermitted), not unreachable."""


class NodeControl:
    """The control methods of one node (``methods_of`` collects them with the services')."""

    def __init__(self, node: Node) -> None:
        self.node = node

    @exposed
    async def status(self) -> dict[str, Any]:
        node = self.node
        return {
            "nodeId": node.node_id,
            "home": str(node.home.path),
            "listen": f"{node.listen_host}:{node.listen_port}",
            "addresses": node.addresses,
            "pid": os.getpid(),
            "uptimeSeconds": round(time.time() - node.started_at, 1),
            "peers": len(node.connections),
            **node.faults.statistics(),
            "handshakesRefusedBusy": node.refused_handshakes,
            "messagesRefusedRole": node.unpermitted_messages,
            "channels": [node.membership.describe(c) for c in node.membership.channel_ids()],
            **{s.name: s.statistics() for s in node.services.all()},
        }

    @exposed
    async def peers(self) -> list[dict[str, Any]]:
        result = []
        for conn in sorted(self.node.connections.values(), key=lambda c: c.node_id):
            stats = conn.statistics()
            stats["channels"] = [self.node.membership.name_of(c) for c in sorted(conn.channels)]
            result.append(stats)
        return result

    @exposed
    async def channel_create(self, name: str, label: str | None = None) -> dict[str, Any]:
        channel = await self.node.membership.create(name, label, self.node.addresses)
        return self.node.membership.describe(channel)

    @exposed
    async def channel_invite(
        self,
        name: str,
        roles: list[str],
        expires_seconds: float | None = None,
        uses: int | None = None,
    ) -> dict[str, Any]:
        token = await self.node.membership.invite(
            name,
            parse_roles(roles),
            expires_seconds=expires_seconds,
            uses=uses,
            addresses=self.node.addresses,
        )
        return {"token": token}

    @exposed
    async def channel_join(self, token: str, name: str | None = None) -> dict[str, Any]:
        invite = Invite.from_token(token)
        if invite.expires_at and now_ms() >= invite.expires_at:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(invite.expires_at / 1000))
            raise InvalidInput(f"this invite expired at {when}: ask for a new one")
        if self.node.membership.has(invite.channel_id) and self.node.membership.is_member(
            invite.channel_id, self.node.node_id
        ):
            return self.node.membership.describe(invite.channel_id)
        errors: list[str] = []
        refused = False
        for address in invite.bootstrap:
            try:
                await self.node.connect(
                    address, expected_peer=invite.admin_id, invite=invite, join_name=name
                )
            except HandshakeFailed as exc:
                if exc.code == CloseCode.AUTHENTICATION_FAILED and "dialed node" in str(exc):
                    errors.append(
                        f"the node at {address} is not the admin this invite names"
                        " (a forged invite, or a stale address)"
                    )
                else:
                    errors.append(str(exc))
                refused = refused or exc.code in _REFUSING_CODES
                continue
            except DialError as exc:
                errors.append(str(exc))
                continue
            self.node.notify()
            return self.node.membership.describe(invite.channel_id)
        if refused:
            raise NotPermitted("invite refused: " + "; ".join(errors))
        raise Unavailable("could not join: " + "; ".join(errors or ["the invite lists no address"]))

    @exposed
    async def channel_list(self) -> list[dict[str, Any]]:
        return [self.node.membership.describe(c) for c in self.node.membership.channel_ids()]

    @exposed
    async def channel_members(self, name: str) -> dict[str, Any]:
        channel = self.node.membership.resolve(name)
        current = self.node.membership.current(channel)
        members = (
            []
            if current is None
            else [
                {
                    **m.to_wire(),
                    "connected": m.node_id in self.node.connections,
                    "self": m.node_id == self.node.node_id,
                }
                for m in current.doc.members
            ]
        )
        return {**self.node.membership.describe(channel), "members": members}

    @exposed
    async def channel_set_roles(self, name: str, node_id: str, roles: list[str]) -> dict[str, Any]:
        signed = await self.node.membership.set_roles(name, node_id, parse_roles(roles))
        return {"version": signed.doc.version}

    @exposed
    async def channel_remove(self, name: str, node_id: str) -> dict[str, Any]:
        signed = await self.node.membership.remove(name, node_id)
        return {"version": signed.doc.version}

    @exposed
    async def channel_leave(self, name: str) -> dict[str, Any]:
        channel = self.node.membership.resolve(name)
        for conn in list(self.node.connections.values()):
            if channel in conn.channels:
                conn.send_quietly(ChannelLeave(channel=channel))
        await self.node.membership.leave(name)
        return {"channelId": channel}

    @exposed
    async def wait_peers(
        self, node_ids: list[str] | None = None, count: int = 1, within_seconds: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until connected to all of ``node_ids`` (or to ``count`` peers); return the peers.

        Raises:
            Unavailable: not so within ``within_seconds``.
        """
        wanted = set(node_ids or [])

        def ready() -> bool:
            connected = set(self.node.connections)
            return wanted <= connected if wanted else len(connected) >= count

        with trio.move_on_after(within_seconds):
            await self.node.wait_until(ready)
        if not ready():
            have = len(self.node.connections)
            if wanted:
                missing = ", ".join(
                    n[:16] + "..." for n in sorted(wanted - set(self.node.connections))
                )
                raise Unavailable(
                    f"not connected to {missing} within {within_seconds:g} s"
                    f" ({have} peer{'' if have == 1 else 's'} connected)"
                )
            raise Unavailable(f"only {have} of {count} peers connected within {within_seconds:g} s")
        return await self.peers()

    @exposed
    async def shutdown(self) -> dict[str, Any]:
        self.node.shutdown_requested.set()
        return {"stopping": True}
