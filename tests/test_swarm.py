"""Channels between real nodes: real websockets on 127.0.0.1, separate homes, one Trio loop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from kachery.node.daemon.node import Node
from kachery.node.daemon.peer import HandshakeFailed
from kachery.node.daemon.transport import DialError, LinkClosed, dial
from kachery.node.errors import NotPermitted
from kachery.protocol import CloseCode, InvalidInput, KeyPair
from kachery.protocol.channel import Invite, Role
from kachery.protocol.messages import DocRequest, DocResponse

from .swarm import WAIT, control, lab, swarm, wait


async def test_invited_nodes_join_share_one_document_and_find_each_other(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, channel = await lab(s)
        expected = {owner.node_id, a.node_id, b.node_id}

        def sees_all(node: Node) -> Callable[[], bool]:
            def check() -> bool:
                doc = node.membership.current(channel)
                return doc is not None and {m.node_id for m in doc.doc.members} == expected

            return check

        for node in (owner, a, b):
            await wait(node, sees_all(node))
        versions = {n.membership.current(channel).doc.version for n in (owner, a, b)}  # type: ignore[union-attr]
        assert versions == {3}
        # a and b were only told the owner's address; peer exchange lets them meet.
        await wait(a, lambda: b.node_id in a.connections)
        await wait(b, lambda: a.node_id in b.connections)
        members = await control(a).channel_members("lab")
        assert {m["nodeId"] for m in members["members"]} == expected


async def test_a_non_member_is_refused_during_the_handshake(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner = await s.start("owner")
        await control(owner).channel_create("lab")
        outsider = await s.start("outsider")
        await control(outsider).channel_create("elsewhere")
        with pytest.raises(HandshakeFailed, match="not a member of any channel") as info:
            await outsider.connect(owner.addresses[0], expected_peer=owner.node_id)
        assert info.value.code == CloseCode.NOT_A_MEMBER
        assert outsider.node_id not in owner.connections


async def test_invites_that_are_expired_forged_tampered_or_used_up_say_which(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner = await s.start("owner")
        await control(owner).channel_create("lab")
        joiner = await s.start("joiner")
        second = await s.start("second")

        expired = (
            await control(owner).channel_invite("lab", ["requestFiles"], expires_seconds=0.001)
        )["token"]
        await trio.sleep(0.01)  # let the 1 ms expiry pass (this is the thing under test)
        with pytest.raises(InvalidInput, match="expired"):
            await control(joiner).channel_join(expired)

        token = (await control(owner).channel_invite("lab", ["requestFiles"], uses=1))["token"]
        tampered = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
        with pytest.raises(InvalidInput, match=r"tampered|damaged"):
            await control(joiner).channel_join(tampered)

        # A token signed by a node that is not the issuing admin: the admin does not know it.
        real = Invite.from_token(token)
        impostor = KeyPair(os.urandom(32))
        forged_invite = Invite(
            channel_id=real.channel_id,
            label=real.label,
            name=real.name,
            admin_id=impostor.id,
            bootstrap=real.bootstrap,
            roles=frozenset(Role),
            expires_at=real.expires_at,
            invite_id=os.urandom(16),
            secret=os.urandom(32),
        )
        with pytest.raises(NotPermitted, match="not the admin this invite names"):
            await control(joiner).channel_join(forged_invite.to_token(impostor))
        forged_for_owner = Invite(
            channel_id=real.channel_id,
            label=real.label,
            name=real.name,
            admin_id=owner.node_id,
            bootstrap=real.bootstrap,
            roles=frozenset(Role),
            expires_at=real.expires_at,
            invite_id=os.urandom(16),
            secret=os.urandom(32),
        )
        # Without the owner's node key the token cannot be signed: signed by anyone else, it is
        # refused as tampered before any network traffic.
        assert forged_for_owner.body()["admin"] == bytes.fromhex(owner.node_id)
        with pytest.raises(InvalidInput, match="tampered"):
            Invite.from_token(_resign(forged_for_owner, impostor))

        await control(joiner).channel_join(token)
        assert joiner.membership.is_member(real.channel_id, joiner.node_id)
        with pytest.raises(NotPermitted, match="used up"):
            await control(second).channel_join(token)
        assert not second.membership.has(real.channel_id)


def _resign(invite: Invite, key: KeyPair) -> str:
    import base64

    from kachery.protocol.channel import INVITE_PREFIX
    from kachery.protocol.codec import encode

    data = encode([invite.body(), key.sign_body(invite.body())])
    return INVITE_PREFIX + base64.urlsafe_b64encode(data).decode().rstrip("=")


async def test_a_removed_member_is_cut_off_and_cannot_come_back(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, channel = await lab(s)
        await wait(owner, lambda: {a.node_id, b.node_id} <= set(owner.connections))
        await wait(b, lambda: a.node_id in b.connections)
        await control(owner).channel_remove("lab", a.node_id)
        await wait(owner, lambda: a.node_id not in owner.connections)
        await wait(
            b, lambda: a.node_id not in b.connections and b.membership.history(channel).version == 4
        )
        await wait(a, lambda: not a.connections)
        with pytest.raises(HandshakeFailed, match="not a member") as info:
            await a.connect(owner.addresses[0], expected_peer=owner.node_id)
        assert info.value.code == CloseCode.NOT_A_MEMBER
        assert owner.node_id in b.connections  # everyone else carries on


async def test_a_removed_member_learns_it_and_stops_reaching_for_that_channel(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, channel = await lab(s)
        await wait(owner, lambda: {a.node_id, b.node_id} <= set(owner.connections))
        await control(owner).channel_remove("lab", a.node_id)
        # The signed document that removes a is sent to a before its sessions are closed.
        await wait(a, lambda: not a.membership.is_member(channel, a.node_id))
        assert a.membership.history(channel).version == 4
        assert a.membership.members_to_reach() == {}  # no more dials for this channel
        assert a.membership.active_channels() == []
        [listed] = await control(a).channel_list()
        assert (listed["member"], listed["roles"], listed["members"]) == (False, [], 2)
        s.stop("a")
        await wait(owner, lambda: a.node_id not in owner.connections)
        a.home.close()
        again = await s.start("a")
        assert not again.membership.is_member(channel, again.node_id)  # it was saved
        assert again.membership.members_to_reach() == {}


async def test_a_member_removed_while_away_is_told_when_it_comes_back(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, channel = await lab(s)
        await wait(a, lambda: a.membership.history(channel).version == 3)
        s.stop("a")
        await wait(owner, lambda: a.node_id not in owner.connections)
        a.home.close()
        await control(owner).channel_remove("lab", a.node_id)
        token = (await control(owner).channel_invite("lab", ["requestFiles"]))["token"]
        late = await s.start("late")
        await control(late).channel_join(token)  # joins after the removal: a must not learn of it
        again = await s.start("a")
        assert again.membership.is_member(channel, again.node_id)  # as it left things
        # It dials the members it knows; they cannot admit it, but they tell it why.
        await wait(again, lambda: not again.membership.is_member(channel, again.node_id))
        assert again.membership.history(channel).version == 4
        assert again.membership.members_to_reach() == {}
        assert not again.connections
        assert late.node_id not in {
            m.node_id for m in again.membership.current(channel).doc.members
        }


async def test_a_document_taken_in_is_saved_even_when_the_taker_is_cancelled(
    tmp_path: Path,
) -> None:
    # A removed member's session closes right behind the document that removes it, cancelling
    # the handler that is taking the document in: memory and disk must not part ways there.
    async with swarm(tmp_path) as s:
        owner, a, _b, channel = await lab(s)
        await wait(a, lambda: a.membership.history(channel).version == 3)
        s.stop("a")
        await wait(owner, lambda: a.node_id not in owner.connections)
        removal = await owner.membership.remove("lab", a.node_id)
        with trio.CancelScope() as scope:
            scope.cancel()
            await a.membership.accept_docs(channel, [removal.to_wire()])
        assert a.membership.history(channel).version == 4
        assert [d.doc.version for d in a.home.channels.load_docs(channel)][-1] == 4


async def test_a_restarted_member_rejoins_without_a_new_invite(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, channel = await lab(s)
        await wait(owner, lambda: a.node_id in owner.connections)
        s.stop("a")
        await wait(owner, lambda: a.node_id not in owner.connections)
        a.home.close()
        again = await s.start("a")
        assert again.node_id == a.node_id
        assert again.membership.is_member(channel, again.node_id)
        await wait(again, lambda: owner.node_id in again.connections)


async def test_requests_are_answered_inside_the_channel(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, channel = await lab(s)
        await wait(a, lambda: owner.node_id in a.connections)
        reply = await a.connections[owner.node_id].request(
            DocRequest(id=0, channel=channel, after=0)
        )
        assert isinstance(reply, DocResponse)
        assert len(reply.docs) == 3


async def test_bad_frames_close_only_that_session(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, channel = await lab(s)
        await wait(a, lambda: owner.node_id in a.connections)
        url = owner.addresses[0]
        for payload in (b"\x00" * 10, b"garbage", os.urandom(2000), os.urandom(5 << 20)):
            async with dial(url) as link:
                with contextlib.suppress(LinkClosed):  # the oversized one may be cut off mid-send
                    await link.send(payload)
                with pytest.raises(LinkClosed) as info, trio.fail_after(WAIT):
                    await link.receive()
            assert info.value.code in (
                CloseCode.PROTOCOL_ERROR,
                CloseCode.BAD_FRAME,
                CloseCode.MESSAGE_TOO_BIG,
            )
        # The owner still serves its members.
        reply = await a.connections[owner.node_id].request(
            DocRequest(id=0, channel=channel, after=2)
        )
        assert isinstance(reply, DocResponse)


async def test_a_version_mismatch_is_refused_naming_both_versions(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner = await s.start("owner")
        with pytest.raises(DialError) as info:
            async with dial(owner.addresses[0], offer="kachery/2"):
                pass
        assert "kachery/1" in str(info.value)
        assert "kachery/2" in str(info.value)
