"""Channels this node belongs to, their membership documents, invites issued here, and peers.

Documents are stored exactly as signed (body bytes and signature) and re-verified when loaded,
so a tampered database cannot grant anyone a role. Invites keep their secret here, on the issuing
admin's node only; redeeming one decrements its remaining uses in the same transaction that
checks it, so two joiners cannot both take the last use.

Non-goal: deciding what is valid (kachery.protocol.channel does) or talking to peers (node/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, delete, select, update

from kachery.protocol.channel import Announcement, Invite, Role, SignedDoc, parse_roles
from kachery.protocol.codec import decode, encode
from kachery.protocol.errors import KacheryError

from . import schema
from .db import Database
from .errors import AlreadyExists, InviteRefused, NotFound


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """A channel this node takes part in, under its local name."""

    channel_id: str
    name: str
    joined_at: float


@dataclass(frozen=True, slots=True)
class InviteRecord:
    """An invite issued by this node (the admin side)."""

    invite_id: bytes
    channel_id: str
    secret: bytes
    roles: frozenset[Role]
    expires_at: int
    uses_left: int | None


class Channels:
    """The channels, channel_docs, invites and peers tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- channels ------------------------------------------------------------------------------

    def add(self, channel_id: str, name: str) -> ChannelRecord:
        """Record that this node takes part in a channel, under a local name.

        Raises:
            AlreadyExists: the name is taken by another channel.
        """
        table = schema.channels
        with self.db.begin() as conn:
            existing = conn.execute(select(table).where(table.c.channel_id == channel_id)).first()
            if existing is not None:
                return ChannelRecord(existing.channel_id, existing.name, existing.joined_at)
            clash = conn.execute(select(table).where(table.c.name == name)).first()
            if clash is not None:
                raise AlreadyExists(f"a channel named {name!r} exists already; choose another name")
            now = time.time()
            conn.execute(table.insert().values(channel_id=channel_id, name=name, joined_at=now))
        return ChannelRecord(channel_id, name, now)

    def all(self) -> list[ChannelRecord]:
        table = schema.channels
        with self.db.begin() as conn:
            rows = conn.execute(select(table).order_by(table.c.name)).all()
        return [ChannelRecord(r.channel_id, r.name, r.joined_at) for r in rows]

    def find(self, name_or_id: str) -> ChannelRecord:
        """A channel by local name, or by channel ID (or a unique prefix of it).

        Raises:
            NotFound: no such channel here.
        """
        records = self.all()
        for r in records:
            if name_or_id in (r.name, r.channel_id):
                return r
        matches = [
            r for r in records if len(name_or_id) >= 8 and r.channel_id.startswith(name_or_id)
        ]
        if len(matches) == 1:
            return matches[0]
        names = ", ".join(r.name for r in records) or "none"
        raise NotFound(f"no channel {name_or_id!r} on this node (channels: {names})")

    def remove(self, channel_id: str) -> None:
        """Forget a channel and its documents (leaving it)."""
        with self.db.begin() as conn:
            conn.execute(delete(schema.channels).where(schema.channels.c.channel_id == channel_id))
            conn.execute(
                delete(schema.channel_docs).where(schema.channel_docs.c.channel_id == channel_id)
            )

    # -- documents -----------------------------------------------------------------------------

    def save_docs(self, channel_id: str, docs: list[SignedDoc]) -> None:
        """Replace the stored chain of a channel's documents with ``docs``."""
        table = schema.channel_docs
        with self.db.begin() as conn:
            conn.execute(delete(table).where(table.c.channel_id == channel_id))
            if docs:
                conn.execute(
                    table.insert(),
                    [
                        {
                            "channel_id": channel_id,
                            "version": d.doc.version,
                            "signer": d.signer,
                            "body": d.body_bytes,
                            "signature": d.signature,
                        }
                        for d in docs
                    ],
                )

    def load_docs(self, channel_id: str) -> list[SignedDoc]:
        """The stored documents, re-verified (a row that no longer verifies is dropped)."""
        table = schema.channel_docs
        with self.db.begin() as conn:
            rows = conn.execute(
                select(table).where(table.c.channel_id == channel_id).order_by(table.c.version)
            ).all()
        docs = []
        for r in rows:
            try:
                docs.append(SignedDoc.from_wire({"body": r.body, "signature": r.signature}))
            except KacheryError:
                continue
        return docs

    # -- invites -------------------------------------------------------------------------------

    def add_invite(self, invite: Invite, uses: int | None) -> None:
        with self.db.begin() as conn:
            conn.execute(
                schema.invites.insert().values(
                    invite_id=invite.invite_id.hex(),
                    channel_id=invite.channel_id,
                    secret=invite.secret,
                    roles=",".join(sorted(r.value for r in invite.roles)),
                    expires_at=invite.expires_at,
                    uses_left=uses,
                    created_at=time.time(),
                )
            )

    def get_invite(self, invite_id: bytes) -> InviteRecord | None:
        table = schema.invites
        with self.db.begin() as conn:
            row = conn.execute(select(table).where(table.c.invite_id == invite_id.hex())).first()
        return None if row is None else _invite(row)

    def redeem_invite(self, invite_id: bytes, now_ms: int) -> InviteRecord:
        """Use one redemption of an invite, atomically.

        Raises:
            InviteRefused: unknown, expired, or used up (the message says which).
        """
        table = schema.invites
        with self.db.begin() as conn:
            row = conn.execute(select(table).where(table.c.invite_id == invite_id.hex())).first()
            if row is None:
                raise InviteRefused("unknown invite: forged, revoked, or issued by another node")
            record = _invite(row)
            if record.expires_at and now_ms >= record.expires_at:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.expires_at / 1000))
                raise InviteRefused(f"invite expired at {when}")
            if record.uses_left is not None:
                if record.uses_left <= 0:
                    raise InviteRefused("invite already used up")
                conn.execute(
                    update(table)
                    .where(table.c.invite_id == invite_id.hex())
                    .values(uses_left=record.uses_left - 1)
                )
        return record

    # -- peers ---------------------------------------------------------------------------------

    def save_announcement(self, announcement: Announcement) -> bool:
        """Keep ``announcement`` if it is newer than the one held; True if it was."""
        table = schema.peers
        data = encode(announcement.to_wire())
        with self.db.begin() as conn:
            known = select(table.c.announced_at).where(table.c.node_id == announcement.node_id)
            row = conn.execute(known).first()
            if row is None:
                if _insert_new(
                    conn,
                    table,
                    node_id=announcement.node_id,
                    announcement=data,
                    announced_at=announcement.timestamp,
                ):
                    return True
                row = conn.execute(known).one()  # mark_connected made the row meanwhile
            if row.announced_at >= announcement.timestamp:
                return False
            conn.execute(
                update(table)
                .where(table.c.node_id == announcement.node_id)
                .values(announcement=data, announced_at=announcement.timestamp)
            )
        return True

    def announcements(self) -> list[Announcement]:
        """Every stored announcement, re-verified."""
        with self.db.begin() as conn:
            rows = conn.execute(select(schema.peers.c.announcement)).all()
        found = []
        for r in rows:
            if r.announcement is None:
                continue
            try:
                found.append(Announcement.from_wire(decode(r.announcement)))
            except KacheryError:
                continue
        return found

    def mark_connected(self, node_id: str) -> None:
        table = schema.peers
        with self.db.begin() as conn:
            result = conn.execute(
                update(table).where(table.c.node_id == node_id).values(last_connected=time.time())
            )
            if not result.rowcount and not _insert_new(
                conn,
                table,
                node_id=node_id,
                announcement=None,
                announced_at=0,
                last_connected=time.time(),
            ):  # save_announcement made the row meanwhile
                conn.execute(
                    update(table)
                    .where(table.c.node_id == node_id)
                    .values(last_connected=time.time())
                )


def _insert_new(conn: Connection, table: Table, **values: Any) -> bool:
    """Insert a row unless one with its primary or unique key exists (another thread may have
    made it since this transaction looked); True if this call inserted it."""
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement: Any = sqlite_insert(table).values(**values).on_conflict_do_nothing()
    elif conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        statement = pg_insert(table).values(**values).on_conflict_do_nothing()
    else:
        statement = table.insert().values(**values)
    return bool(conn.execute(statement).rowcount)


def _invite(row: Any) -> InviteRecord:
    return InviteRecord(
        invite_id=bytes.fromhex(row.invite_id),
        channel_id=row.channel_id,
        secret=bytes(row.secret),
        roles=parse_roles(row.roles),
        expires_at=int(row.expires_at),
        uses_left=row.uses_left,
    )
