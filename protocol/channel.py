"""Channels: roles, signed membership documents, invites, and signed address announcements.

A channel is owned by an Ed25519 key pair; its ID is the public key. Who belongs, and with which
roles, is the membership document: a body signed with kachery's one rule (canonical CBOR of a
body that names its format). Version 1 is signed by the owner. Version N + 1 is valid if the
owner signed it, or a node that is an admin in version N did; so nodes keep the chain of
documents, and the highest valid version wins. If two valid documents share a version (a revoked
admin racing the owner), the owner's wins; then a document that takes admin from the other's
signer (and keeps the other's signer's own), then the lower signature: every node picks the same.
A removal stands: a document signed by a node that a held version at or after its own version
took admin from never replaces the held one (else an ex-admin could re-sign an earlier version
with a lower signature and drop the chain that removed it).

Invites are tokens naming the channel, how to reach an admin, the roles granted, an expiry and a
secret; the admin who issued one signs it, so a tampered token is refused. A joiner proves it
holds the secret with a MAC over the handshake transcript, never sending the secret itself.

Non-goal: storage and timing. Callers pass the current time and persist what this returns.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._hex import is_public_key_hex
from .codec import decode, encode
from .errors import InvalidInput, RemoteProtocolError
from .identity import KeyPair, public_key_from_id, verify

DOC_FORMAT = "kachery-channel-doc/1"
INVITE_VERSION = 1
ANNOUNCE_FORMAT = "kachery-announce/1"
INVITE_PREFIX = "kachery-invite:"

MAX_MEMBERS = 10_000
"""Members per document: a lab channel has tens; the bound keeps a document under ~2 MB."""

MAX_ADDRESSES = 16
"""Addresses per announcement or bootstrap list."""

MAX_ADDRESS_CHARS = 300
"""Characters in one address."""

MAX_LABEL = 200
"""Characters in a channel or member label."""


class Role(StrEnum):
    """kachery's six permission names, plus admin (may sign new membership documents)."""

    REQUEST_FILES = "requestFiles"
    PROVIDE_FILES = "provideFiles"
    REQUEST_FEEDS = "requestFeeds"
    PROVIDE_FEEDS = "provideFeeds"
    REQUEST_TASKS = "requestTasks"
    PROVIDE_TASKS = "provideTasks"
    ADMIN = "admin"


ALL_ROLES = frozenset(Role)


def parse_roles(text: str | Iterable[str]) -> frozenset[Role]:
    """``"requestFiles,provideFiles"`` (or a list of names) -> roles; ``all`` means every role.

    Raises:
        InvalidInput: an unknown role name, listing the known ones.
    """
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    roles: set[Role] = set()
    for name in names:
        if not name:
            continue
        if name == "all":
            roles |= ALL_ROLES
            continue
        try:
            roles.add(Role(name))
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise InvalidInput(f"unknown role {name!r}; known roles: {known}, all") from None
    return frozenset(roles)


def _sorted_roles(roles: Iterable[Role]) -> list[str]:
    return sorted(r.value for r in roles)


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_public_key_hex(value):
        raise InvalidInput(f"{what} must be a 64-hex-digit public key")
    return value


def _check_label(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_LABEL:
        raise InvalidInput(f"{what} must be a string of at most {MAX_LABEL} characters")
    return value


def _check_int(value: object, what: str) -> int:
    if type(value) is not int:
        raise InvalidInput(f"{what} must be an integer")
    return value


def _check_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidInput(f"{what} must be a byte string")
    return value


def _check_addresses(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ADDRESSES:
        raise InvalidInput(f"{what} must be a list of at most {MAX_ADDRESSES} addresses")
    for a in value:
        if (
            not isinstance(a, str)
            or not a.startswith(("ws://", "wss://"))
            or len(a) > MAX_ADDRESS_CHARS
        ):
            raise InvalidInput(f"{what}: {a!r} is not a ws:// or wss:// address")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a channel: its node ID, a human label, and its roles."""

    node_id: str
    label: str
    roles: frozenset[Role]

    def to_wire(self) -> dict[str, Any]:
        return {"nodeId": self.node_id, "label": self.label, "roles": _sorted_roles(self.roles)}


@dataclass(frozen=True, slots=True)
class MembershipDoc:
    """One version of a channel's membership document (unsigned body).

    Use ``sign`` to produce a ``SignedDoc``. ``issued_at`` is milliseconds since the epoch.
    """

    channel_id: str
    label: str
    version: int
    members: tuple[Member, ...]
    bootstrap: tuple[str, ...] = ()
    issued_at: int = 0

    def __post_init__(self) -> None:
        _check_id(self.channel_id, "channel ID")
        _check_label(self.label, "channel label")
        if type(self.version) is not int or self.version < 1:
            raise InvalidInput("document version must be an integer >= 1")
        if len(self.members) > MAX_MEMBERS:
            raise InvalidInput(f"a channel has at most {MAX_MEMBERS} members")
        seen = set()
        for m in self.members:
            _check_id(m.node_id, "member node ID")
            _check_label(m.label, "member label")
            if m.node_id in seen:
                raise InvalidInput(f"member {m.node_id[:16]}... is listed twice")
            seen.add(m.node_id)
        _check_addresses(list(self.bootstrap), "bootstrap")

    def member(self, node_id: str) -> Member | None:
        for m in self.members:
            if m.node_id == node_id:
                return m
        return None

    def roles_of(self, node_id: str) -> frozenset[Role]:
        m = self.member(node_id)
        return frozenset() if m is None else m.roles

    def body(self, signer: str) -> dict[str, Any]:
        return {
            "format": DOC_FORMAT,
            "channelId": self.channel_id,
            "label": self.label,
            "version": self.version,
            "members": [m.to_wire() for m in self.members],
            "bootstrap": list(self.bootstrap),
            "issuedAt": self.issued_at,
            "signer": signer,
        }

    def sign(self, key: KeyPair) -> SignedDoc:
        """Sign as ``key`` (the channel key, or an admin's node key)."""
        body = self.body(key.id)
        return SignedDoc(
            doc=self, signer=key.id, body_bytes=encode(body), signature=key.sign_body(body)
        )

    def with_member(self, member: Member, *, issued_at: int) -> MembershipDoc:
        """The next version, with ``member`` added or its entry replaced."""
        others = tuple(m for m in self.members if m.node_id != member.node_id)
        return self._next((*others, member), issued_at)

    def without_member(self, node_id: str, *, issued_at: int) -> MembershipDoc:
        """The next version, without ``node_id``."""
        return self._next(tuple(m for m in self.members if m.node_id != node_id), issued_at)

    def _next(self, members: tuple[Member, ...], issued_at: int) -> MembershipDoc:
        return MembershipDoc(
            channel_id=self.channel_id,
            label=self.label,
            version=self.version + 1,
            members=members,
            bootstrap=self.bootstrap,
            issued_at=issued_at,
        )


@dataclass(frozen=True, slots=True)
class SignedDoc:
    """A membership document with its signature, as it travels and is stored."""

    doc: MembershipDoc
    signer: str
    body_bytes: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body_bytes, "signature": self.signature}

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> SignedDoc:
        """Parse and check the signature (not the authority: see ``ChannelHistory.accept``).

        Raises:
            RemoteProtocolError: malformed, or the signature does not verify.
        """
        try:
            body_bytes, signature = value["body"], value["signature"]
            if not isinstance(body_bytes, bytes) or not isinstance(signature, bytes):
                raise InvalidInput("body and signature must be bytes")
            body = decode(body_bytes)
            if body.get("format") != DOC_FORMAT:
                raise InvalidInput(f"format {body.get('format')!r} is not {DOC_FORMAT!r}")
            if encode(body) != body_bytes:
                raise InvalidInput("body is not canonical CBOR")
            members = tuple(
                Member(
                    node_id=_check_id(m["nodeId"], "member node ID"),
                    label=_check_label(m["label"], "member label"),
                    roles=parse_roles(m["roles"]),
                )
                for m in body["members"]
            )
            doc = MembershipDoc(
                channel_id=body["channelId"],
                label=body["label"],
                version=body["version"],
                members=members,
                bootstrap=_check_addresses(body["bootstrap"], "bootstrap"),
                issued_at=_check_int(body["issuedAt"], "issuedAt"),
            )
            signer = _check_id(body["signer"], "signer")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RemoteProtocolError(f"malformed membership document: {exc}") from None
        if not verify(public_key_from_id(signer), body_bytes, signature):
            raise RemoteProtocolError("membership document signature does not verify")
        return cls(doc=doc, signer=signer, body_bytes=body_bytes, signature=signature)


class ChannelHistory:
    """The accepted chain of a channel's documents, and the rule for accepting more.

    Args:
        channel_id: the channel (its owner's public key).
        docs: previously accepted documents, in any order.
    """

    def __init__(self, channel_id: str, docs: Iterable[SignedDoc] = ()) -> None:
        self.channel_id = channel_id
        self._by_version: dict[int, SignedDoc] = {}
        for d in sorted(docs, key=lambda d: d.doc.version):
            self.accept(d)

    def roles_of(self, node_id: str) -> frozenset[Role]:
        """A node's roles in the current document (none if it is not a member)."""
        current = self.current
        return frozenset() if current is None else current.doc.roles_of(node_id)

    @property
    def current(self) -> SignedDoc | None:
        if not self._by_version:
            return None
        return self._by_version[max(self._by_version)]

    @property
    def version(self) -> int:
        return 0 if not self._by_version else max(self._by_version)

    def docs_after(self, version: int) -> list[SignedDoc]:
        return [self._by_version[v] for v in sorted(self._by_version) if v > version]

    def accept(self, signed: SignedDoc) -> Accepted:
        """Take ``signed`` into the chain if it is valid and wins.

        Returns:
            ``Accepted.NEW`` if the chain changed; ``Accepted.KNOWN`` if it is already held or
            loses to the held document of its version; ``Accepted.NEED_PREDECESSOR`` if it is
            signed by an admin and the previous version is not held yet (ask for it).

        Raises:
            RemoteProtocolError: it is for another channel, or signed by a node that is not an
                admin in the previous version.
        """
        doc = signed.doc
        if doc.channel_id != self.channel_id:
            raise RemoteProtocolError("membership document is for another channel")
        existing = self._by_version.get(doc.version)
        if existing is not None and existing.signature == signed.signature:
            return Accepted.KNOWN
        if signed.signer != self.channel_id:
            previous = self._by_version.get(doc.version - 1)
            if previous is None:
                return Accepted.NEED_PREDECESSOR
            if Role.ADMIN not in previous.doc.roles_of(signed.signer):
                raise RemoteProtocolError(
                    f"membership document version {doc.version} is signed by a node that is not"
                    f" an admin in version {doc.version - 1}"
                )
        if existing is not None and (
            (signed.signer != self.channel_id and self._revoked(signed.signer, doc.version))
            or not _wins(signed, existing, self._by_version.get(doc.version - 1))
        ):
            return Accepted.KNOWN
        self._by_version[doc.version] = signed
        if existing is not None:  # the losing branch's successors fall with it
            for v in [v for v in self._by_version if v > doc.version]:
                del self._by_version[v]
        return Accepted.NEW

    def _revoked(self, signer: str, since: int) -> bool:
        """Whether a held version ``>= since`` took admin from ``signer``."""
        for version in sorted(v for v in self._by_version if v >= since):
            previous = self._by_version.get(version - 1)
            if previous is not None and _revokes(self._by_version[version], signer, previous):
                return True
        return False


def _revokes(signed: SignedDoc, node_id: str, previous: SignedDoc) -> bool:
    """``signed`` takes admin from ``node_id``, an admin in ``previous``."""
    return Role.ADMIN in previous.doc.roles_of(node_id) and Role.ADMIN not in signed.doc.roles_of(
        node_id
    )


class Accepted(StrEnum):
    """What ``ChannelHistory.accept`` did with a document."""

    NEW = "new"
    KNOWN = "known"
    NEED_PREDECESSOR = "need-predecessor"


def _wins(candidate: SignedDoc, incumbent: SignedDoc, previous: SignedDoc | None) -> bool:
    """Between two valid documents of one version: the owner's; then the one that takes admin
    from the other's signer while the other does not take it from its own; then the lower
    signature. The same on every node, whichever arrived first."""
    cand_owner = candidate.signer == candidate.doc.channel_id
    inc_owner = incumbent.signer == incumbent.doc.channel_id
    if cand_owner != inc_owner:
        return cand_owner
    if previous is not None and not cand_owner:
        cand_revokes = _revokes(candidate, incumbent.signer, previous)
        inc_revokes = _revokes(incumbent, candidate.signer, previous)
        if cand_revokes != inc_revokes:
            return cand_revokes
    return candidate.signature < incumbent.signature


@dataclass(frozen=True, slots=True)
class Invite:
    """An invitation to a channel, as encoded in the token a user copies.

    Attributes:
        channel_id, label: the channel.
        name: the short local name the issuing node uses for it (the joiner's default).
        admin_id: the admin node that issued it and will admit the joiner.
        bootstrap: addresses where that admin (or the channel) can be reached.
        roles: roles the joiner gets.
        expires_at: milliseconds since the epoch (0: never).
        invite_id: 16 random bytes naming the invite in the admin's records.
        secret: 32 random bytes the joiner proves it holds.
    """

    channel_id: str
    label: str
    name: str
    admin_id: str
    bootstrap: tuple[str, ...]
    roles: frozenset[Role]
    expires_at: int
    invite_id: bytes
    secret: bytes

    def body(self) -> dict[str, Any]:
        """The signed body: IDs as raw bytes, so the token stays short."""
        return {
            "v": INVITE_VERSION,
            "channel": bytes.fromhex(self.channel_id),
            "label": self.label,
            "name": self.name,
            "admin": bytes.fromhex(self.admin_id),
            "bootstrap": list(self.bootstrap),
            "roles": _sorted_roles(self.roles),
            "expires": self.expires_at,
            "id": self.invite_id,
            "secret": self.secret,
        }

    def to_token(self, admin_key: KeyPair) -> str:
        """The copy-pasteable token, signed by the issuing admin."""
        if admin_key.id != self.admin_id:
            raise InvalidInput("an invite is signed by the admin it names")
        data = encode([self.body(), admin_key.sign_body(self.body())])
        return INVITE_PREFIX + base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> Invite:
        """Parse a token and check the issuing admin's signature.

        Raises:
            InvalidInput: not an invite token, or forged/tampered (the message says which).
        """
        token = "".join(token.split())  # tolerate line breaks from copying out of a terminal
        if not token.startswith(INVITE_PREFIX):
            raise InvalidInput(f"an invite token starts with {INVITE_PREFIX!r}")
        text = token[len(INVITE_PREFIX) :]
        try:
            data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            body, signature = decode(data)
            if body.get("v") != INVITE_VERSION:
                raise InvalidInput(f"invite version {body.get('v')!r} is not {INVITE_VERSION}")
            invite = cls(
                channel_id=_check_id(_check_bytes(body["channel"], "channel").hex(), "channel ID"),
                label=_check_label(body["label"], "label"),
                name=_check_label(body["name"], "name"),
                admin_id=_check_id(_check_bytes(body["admin"], "admin").hex(), "admin"),
                bootstrap=_check_addresses(body["bootstrap"], "bootstrap"),
                roles=parse_roles(body["roles"]),
                expires_at=_check_int(body["expires"], "expires"),
                invite_id=_check_bytes(body["id"], "invite ID"),
                secret=_check_bytes(body["secret"], "secret"),
            )
        except InvalidInput as exc:
            raise InvalidInput(f"the invite token is damaged: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError, RemoteProtocolError) as exc:
            raise InvalidInput(f"the invite token is damaged or truncated ({exc})") from None
        if not isinstance(signature, bytes) or not verify(
            public_key_from_id(invite.admin_id), encode(invite.body()), signature
        ):
            raise InvalidInput("the invite token was tampered with: its signature does not verify")
        return invite

    def proof(self, transcript_hash: bytes) -> bytes:
        """The MAC a joiner sends: proves it holds the secret, bound to this handshake."""
        return invite_proof(self.secret, transcript_hash)


def invite_proof(secret: bytes, transcript_hash: bytes) -> bytes:
    """BLAKE2b-256 keyed with the invite secret over the handshake transcript hash."""
    data = b"kachery/1 invite proof" + transcript_hash
    return hashlib.blake2b(data, key=secret, digest_size=32).digest()


def check_invite_proof(secret: bytes, transcript_hash: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(invite_proof(secret, transcript_hash), proof)


@dataclass(frozen=True, slots=True)
class Announcement:
    """A node's signed statement of where it can be reached (gossiped for peer exchange)."""

    node_id: str
    addresses: tuple[str, ...]
    timestamp: int
    signature: bytes = field(repr=False, default=b"")

    def body(self) -> dict[str, Any]:
        return {
            "format": ANNOUNCE_FORMAT,
            "nodeId": self.node_id,
            "addresses": list(self.addresses),
            "timestamp": self.timestamp,
        }

    @classmethod
    def create(cls, key: KeyPair, addresses: Sequence[str], timestamp: int) -> Announcement:
        a = cls(node_id=key.id, addresses=tuple(addresses), timestamp=timestamp)
        return cls(a.node_id, a.addresses, a.timestamp, key.sign_body(a.body()))

    def to_wire(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> Announcement:
        try:
            a = cls(
                node_id=_check_id(value["nodeId"], "node ID"),
                addresses=_check_addresses(value["addresses"], "addresses"),
                timestamp=_check_int(value["timestamp"], "timestamp"),
                signature=_check_bytes(value["signature"], "signature"),
            )
            if value.get("format") != ANNOUNCE_FORMAT:
                raise InvalidInput("not an announcement")
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed announcement: {exc}") from None
        if not verify(public_key_from_id(a.node_id), encode(a.body()), a.signature):
            raise RemoteProtocolError("announcement signature does not verify")
        return a
