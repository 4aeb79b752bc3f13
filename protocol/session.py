"""A peer session: the kachery/1 handshake, then encrypted, authenticated frames.

Sans-I/O, in the manner of h11: ``receive(bytes)`` turns one websocket message into one event,
and ``send_*`` methods turn what the node wants to say into the bytes of one websocket message.
Randomness (ephemeral key, nonce) is passed in; nothing here touches a socket or a clock.

The handshake (1.5 round trips, then the responder's verdict)::

    M1 initiator -> responder   {protocol, e_i, n_i}                     cleartext
    M2 responder -> initiator   {e_r, n_r, box: AEAD(id_R, sig_R, observed)}
    M3 initiator -> responder   AEAD(id_I, sig_I, channels, join proof, docs, addresses)
    M4 responder -> initiator   AEAD(welcome {channels, docs, addresses} | refusal {code, reason})

``h2 = BLAKE2b(prologue || M1 || e_r || n_r)`` is the transcript; both directions' keys come from
BLAKE2b keyed with X25519(e_i, e_r) over it. The responder signs ``"responder" || h2``, the
initiator ``"initiator" || h2 || id_R``, so each signature binds the fresh ephemerals and nonces of
both sides (no replay), the signer's role, and (for the initiator) whom it meant to talk to.
Identities travel encrypted: a passive observer learns neither node ID.

Every frame after M1 is AEGIS-256 with a per-direction key and an implicit per-direction counter
as nonce, so a tampered, replayed, dropped or reordered frame fails authentication and ends the
session. A frame's plaintext starts with its kind: a CBOR message, or a bulk data block.

All legal transitions are in ``TRANSITIONS``; anything else is a ``LocalProtocolError`` (our
misuse) or ``RemoteProtocolError`` (the peer's).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import nacl.bindings
import nacl.exceptions

from ._hex import is_public_key_hex
from ._sodium import libsodium
from .codec import decode, encode
from .errors import CloseCode, LocalProtocolError, RemoteProtocolError
from .identity import KeyPair, verify
from .messages import Message, UnknownMessage, decode_message, encode_message

PROTOCOL = "kachery/1"
"""The websocket subprotocol, and the version carried in M1."""

PROLOGUE = b"kachery/1 handshake"
MAX_FRAME_BYTES = 4 * 1024 * 1024 + 64
"""Largest websocket message accepted: a 4 MiB plaintext (membership documents, feed batches)
plus the frame header and tag. Bulk data blocks are far smaller (256 KiB)."""

MAX_HANDSHAKE_BYTES = 4 * 1024 * 1024
"""Largest M3 or M4: they carry the membership documents a node claims or hands out."""
MAX_HELLO_BYTES = 128
"""Largest M1: its shape is fixed ({protocol, e, n}: 94 bytes today), so anything bigger is
refused before it is decoded; an unauthenticated dialer costs the responder next to nothing."""
MAX_ACK_BYTES = 1024
"""Largest M2: two 32-byte values and a sealed box of an ID, a signature and the observed
address (at most MAX_OBSERVED_CHARS)."""
MAX_OBSERVED_CHARS = 256
KEY_BYTES = 32
NONCE_BYTES = 32
TAG_BYTES = 32  # AEGIS-256 tag

KIND_MESSAGE = 0
KIND_DATA = 1
_DATA_HEADER = struct.Struct(">BIQ")  # kind, stream id, offset

PAYLOAD_ALIGN = 4096
"""A received frame of at least ALIGNED_FROM bytes is decrypted so that a data frame's payload
starts on a PAYLOAD_ALIGN boundary in memory: a downloader can then write it to disk with
O_DIRECT (which needs aligned buffers) without copying it first."""
ALIGNED_FROM = 64 * 1024
_COUNTER = struct.Struct("<Q")  # the nonce's first 8 bytes


class Side(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(Enum):
    START = "start"
    SENT_HELLO = "sent-hello"
    GOT_HELLO = "got-hello"
    SENT_ACK = "sent-ack"
    GOT_ACK = "got-ack"
    SENT_IDENTITY = "sent-identity"
    GOT_IDENTITY = "got-identity"
    ESTABLISHED = "established"
    CLOSED = "closed"


_I, _R = Side.INITIATOR, Side.RESPONDER

TRANSITIONS: dict[tuple[Side, State, str], State] = {
    (_I, State.START, "send_hello"): State.SENT_HELLO,
    (_I, State.SENT_HELLO, "recv_ack"): State.GOT_ACK,
    (_I, State.GOT_ACK, "send_identity"): State.SENT_IDENTITY,
    (_I, State.SENT_IDENTITY, "recv_welcome"): State.ESTABLISHED,
    (_I, State.SENT_IDENTITY, "recv_refusal"): State.CLOSED,
    (_R, State.START, "recv_hello"): State.GOT_HELLO,
    (_R, State.GOT_HELLO, "send_ack"): State.SENT_ACK,
    (_R, State.SENT_ACK, "recv_identity"): State.GOT_IDENTITY,
    (_R, State.GOT_IDENTITY, "send_welcome"): State.ESTABLISHED,
    (_R, State.GOT_IDENTITY, "send_refusal"): State.CLOSED,
    (_I, State.ESTABLISHED, "send_frame"): State.ESTABLISHED,
    (_I, State.ESTABLISHED, "recv_frame"): State.ESTABLISHED,
    (_R, State.ESTABLISHED, "send_frame"): State.ESTABLISHED,
    (_R, State.ESTABLISHED, "recv_frame"): State.ESTABLISHED,
}
"""Every legal (side, state, step) and the state it leads to. Nothing else is allowed."""


# -- handshake contents ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinProof:
    """An invite being redeemed: its ID and the MAC proving the secret is held."""

    invite_id: bytes
    proof: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """What the initiator says of itself in M3 (besides its signed identity).

    Attributes:
        channels: channel IDs it wants this session to serve.
        join: an invite it redeems (to become a member), if any.
        docs: membership documents (wire form) the responder may lack.
        addresses: where the initiator can be reached, if anywhere.
    """

    channels: tuple[str, ...] = ()
    join: JoinProof | None = None
    docs: tuple[dict[str, Any], ...] = ()
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """The responder's welcome in M4: channels this session serves, documents, addresses."""

    channels: tuple[str, ...] = ()
    docs: tuple[dict[str, Any], ...] = ()
    addresses: tuple[str, ...] = ()


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """(Responder) M1 arrived: answer with ``send_ack``."""


@dataclass(frozen=True, slots=True)
class ResponderIdentified:
    """(Initiator) M2 arrived and the responder proved it is ``node_id``: send ``send_identity``.

    ``observed_address`` is the initiator's address as the responder saw it (may be empty).
    """

    node_id: str
    observed_address: str


@dataclass(frozen=True, slots=True)
class InitiatorIdentified:
    """(Responder) M3 arrived and the initiator proved it is ``node_id``: admit or refuse it."""

    node_id: str
    claim: Claim


@dataclass(frozen=True, slots=True)
class Welcomed:
    """(Initiator) the responder admitted this session."""

    admission: Admission


@dataclass(frozen=True, slots=True)
class Refused:
    """(Initiator) the responder refused this session; it will close the websocket."""

    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Message | UnknownMessage


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A bulk data block: ``payload`` is the bytes at ``offset`` of stream ``stream``."""

    stream: int
    offset: int
    payload: memoryview = field(repr=False)
    """Where a large frame's payload starts in memory is a multiple of PAYLOAD_ALIGN (when
    libsodium is called directly; the public bindings give no say in it)."""


class DataBlock:
    """A bulk data payload with room for the frame header in front of it.

    ``send_data`` seals a block where it lies, so file bytes read straight into ``payload``
    (``os.preadv``) reach the cipher without a copy; any other payload is copied into a block
    first. A block may be reused once its frame is sealed.
    """

    __slots__ = ("buffer",)

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(_DATA_HEADER.size + size)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> DataBlock:
        block = cls(len(data))
        block.payload[:] = data
        return block

    @property
    def payload(self) -> memoryview:
        """Where the data goes (everything after the header)."""
        return memoryview(self.buffer)[_DATA_HEADER.size :]

    def __len__(self) -> int:
        return len(self.buffer) - _DATA_HEADER.size


Event = (
    HelloReceived
    | ResponderIdentified
    | InitiatorIdentified
    | Welcomed
    | Refused
    | MessageReceived
    | DataReceived
)


# -- the session -------------------------------------------------------------------------------


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _bad(message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(message, close_code=code)


_SODIUM = libsodium("crypto_aead_aegis256_encrypt", "crypto_aead_aegis256_decrypt")
"""``nacl.bindings.crypto_aead_aegis256_*`` allocate a zero-filled output buffer and copy the
result out of it on every call: 230 us per 256 KiB frame with glibc's default allocator (each
buffer is a fresh mmap) and ~44 us in the tuned daemon, against ~27 us for the cipher itself.
Calling the same libsodium function directly, into a buffer that is not cleared, removes most
of that (None: this PyNaCl does not expose it; the public bindings are used)."""


class _Cipher:
    """One direction of a session: AEGIS-256 with a key and a counter nonce."""

    __slots__ = ("_counter", "_key", "_length", "_nonce_buf")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._counter = 0
        self._nonce_buf = bytearray(NONCE_BYTES)
        self._length = None if _SODIUM is None else _SODIUM.ffi.new("unsigned long long *")

    def _nonce(self) -> bytearray:
        """The next nonce (the counter, little-endian, zero-padded); valid until the next call."""
        _COUNTER.pack_into(self._nonce_buf, 0, self._counter)
        self._counter += 1
        return self._nonce_buf

    def seal(self, plaintext: bytes | bytearray) -> bytes:
        if _SODIUM is None:
            return nacl.bindings.crypto_aead_aegis256_encrypt(
                bytes(plaintext), None, bytes(self._nonce()), self._key
            )
        ffi = _SODIUM.ffi
        size = len(plaintext) + TAG_BYTES
        out = _SODIUM.uncleared("unsigned char[]", size)
        _SODIUM.lib.crypto_aead_aegis256_encrypt(
            out,
            self._length,
            ffi.from_buffer(plaintext),
            len(plaintext),
            ffi.NULL,
            0,
            ffi.NULL,
            ffi.from_buffer(self._nonce()),
            self._key,
        )
        # websockets send bytes: the one copy, from a buffer that was never zero-filled
        return ffi.buffer(out, size)[:]  # type: ignore[no-any-return]

    def open(self, ciphertext: bytes) -> memoryview:
        if len(ciphertext) < TAG_BYTES:
            self._counter += 1
            raise _unauthentic()
        if _SODIUM is None:
            try:
                return memoryview(
                    nacl.bindings.crypto_aead_aegis256_decrypt(
                        ciphertext, None, bytes(self._nonce()), self._key
                    )
                )
            except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError):
                raise _unauthentic() from None
        ffi = _SODIUM.ffi
        size = len(ciphertext) - TAG_BYTES
        if size < ALIGNED_FROM:
            out, shift = _SODIUM.uncleared("unsigned char[]", size), 0
        else:  # room to start a data frame's payload on a PAYLOAD_ALIGN boundary
            out = _SODIUM.uncleared("unsigned char[]", size + PAYLOAD_ALIGN)
            address = int(ffi.cast("uintptr_t", out))
            shift = -(address + _DATA_HEADER.size) % PAYLOAD_ALIGN
        failed = _SODIUM.lib.crypto_aead_aegis256_decrypt(
            out + shift,
            self._length,
            ffi.NULL,
            ciphertext,
            len(ciphertext),
            ffi.NULL,
            0,
            ffi.from_buffer(self._nonce()),
            self._key,
        )
        if failed:  # libsodium has cleared ``out``: nothing unauthenticated is returned
            raise _unauthentic()
        return memoryview(ffi.buffer(out, shift + size))[shift:]


def _unauthentic() -> RemoteProtocolError:
    return _bad(
        "frame failed authentication (tampered, replayed, dropped or out of order)",
        CloseCode.BAD_FRAME,
    )


class Session:
    """One side of a kachery/1 session.

    Args:
        side: who dialed (INITIATOR) and who listened (RESPONDER).
        identity: this node's key pair.
        ephemeral_secret: 32 random bytes (this session's X25519 private key).
        nonce: 32 random bytes.
        expected_peer: (initiator) the node ID it means to reach, if known; any other is refused.
    """

    def __init__(
        self,
        side: Side,
        identity: KeyPair,
        *,
        ephemeral_secret: bytes,
        nonce: bytes,
        expected_peer: str | None = None,
    ) -> None:
        if len(ephemeral_secret) != 32 or len(nonce) != NONCE_BYTES:
            raise LocalProtocolError("ephemeral secret and nonce must be 32 random bytes each")
        self.side = side
        self.state = State.START
        self.identity = identity
        self.expected_peer = expected_peer
        self.peer_id: str | None = None
        self._e_secret = ephemeral_secret
        self._e_public = bytes(nacl.bindings.crypto_scalarmult_base(ephemeral_secret))
        self._nonce = nonce
        self._m1 = b""
        self._h2 = b""
        self._send: _Cipher | None = None
        self._recv: _Cipher | None = None

    # -- state ---------------------------------------------------------------------------------

    def _step(self, step: str) -> None:
        nxt = TRANSITIONS.get((self.side, self.state, step))
        if nxt is None:
            if step.startswith("recv"):
                self.state = State.CLOSED
                raise _bad(f"unexpected {step[5:]} message in state {self.state.value}")
            raise LocalProtocolError(
                f"cannot {step} as {self.side.value} in state {self.state.value}"
            )
        self.state = nxt

    @property
    def transcript_hash(self) -> bytes:
        """The handshake transcript (h2), known after M2; invite proofs are bound to it."""
        if not self._h2:
            raise LocalProtocolError("the transcript hash is known only after M2")
        return self._h2

    def _derive(self, peer_ephemeral: bytes, peer_nonce: bytes, m1: bytes) -> None:
        if len(peer_ephemeral) != 32 or len(peer_nonce) != NONCE_BYTES:
            raise _bad("handshake ephemeral key and nonce must be 32 bytes each")
        try:
            shared = bytes(nacl.bindings.crypto_scalarmult(self._e_secret, peer_ephemeral))
        except (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, RuntimeError):
            shared = bytes(32)  # libsodium refuses low-order points (all-zero results)
        if shared == bytes(32):
            raise _bad(
                "handshake ephemeral key is a low-order point", CloseCode.AUTHENTICATION_FAILED
            )
        e_r, n_r = (
            (peer_ephemeral, peer_nonce)
            if self.side is Side.INITIATOR
            else (self._e_public, self._nonce)
        )
        self._h2 = _hash(PROLOGUE + m1 + e_r + n_r)
        i2r = hashlib.blake2b(b"kachery/1 i2r" + self._h2, key=shared, digest_size=32).digest()
        r2i = hashlib.blake2b(b"kachery/1 r2i" + self._h2, key=shared, digest_size=32).digest()
        if self.side is Side.INITIATOR:
            self._send, self._recv = _Cipher(i2r), _Cipher(r2i)
        else:
            self._send, self._recv = _Cipher(r2i), _Cipher(i2r)

    def _signed_by_initiator(self, responder_id: str) -> bytes:
        return b"kachery/1 initiator" + self._h2 + bytes.fromhex(responder_id)

    def _signed_by_responder(self) -> bytes:
        return b"kachery/1 responder" + self._h2

    # -- initiator -----------------------------------------------------------------------------

    def send_hello(self) -> bytes:
        """(Initiator) M1."""
        self._step("send_hello")
        self._m1 = encode({"protocol": PROTOCOL, "e": self._e_public, "n": self._nonce})
        return self._m1

    def send_identity(self, claim: Claim) -> bytes:
        """(Initiator) M3: prove this node's identity and say what it wants."""
        self._step("send_identity")
        assert self._send is not None
        assert self.peer_id is not None
        body = {
            "id": self.identity.public_key,
            "sig": self.identity.sign(self._signed_by_initiator(self.peer_id)),
            "channels": list(claim.channels),
            "join": None
            if claim.join is None
            else {"inviteId": claim.join.invite_id, "proof": claim.join.proof},
            "docs": list(claim.docs),
            "addresses": list(claim.addresses),
        }
        return self._send.seal(encode(body))

    # -- responder -----------------------------------------------------------------------------

    def send_ack(self, observed_address: str = "") -> bytes:
        """(Responder) M2: prove this node's identity; tell the initiator how it was seen."""
        self._step("send_ack")
        assert self._send is not None
        box = {
            "id": self.identity.public_key,
            "sig": self.identity.sign(self._signed_by_responder()),
            "observed": observed_address if len(observed_address) <= MAX_OBSERVED_CHARS else "",
        }
        return encode({"e": self._e_public, "n": self._nonce, "box": self._send.seal(encode(box))})

    def send_welcome(self, admission: Admission) -> bytes:
        """(Responder) M4: admit the initiator."""
        self._step("send_welcome")
        assert self._send is not None
        body = {
            "welcome": {
                "channels": list(admission.channels),
                "docs": list(admission.docs),
                "addresses": list(admission.addresses),
            }
        }
        return self._send.seal(encode(body))

    def send_refusal(self, code: CloseCode, reason: str) -> bytes:
        """(Responder) M4: refuse the initiator (then close the websocket with ``code``)."""
        self._step("send_refusal")
        assert self._send is not None
        return self._send.seal(encode({"refused": {"code": int(code), "reason": reason}}))

    # -- established ---------------------------------------------------------------------------

    def send_message(self, msg: Message) -> bytes:
        """One encrypted frame carrying ``msg``."""
        return self.send_plaintext(message_plaintext(msg))

    def send_plaintext(self, plaintext: bytes) -> bytes:
        """One encrypted frame carrying a ``message_plaintext`` encoded earlier (a sender that
        queues messages encodes them as it queues them, so that it knows their size)."""
        self._step("send_frame")
        assert self._send is not None
        return self._send.seal(plaintext)

    def send_data(
        self, stream: int, offset: int, payload: DataBlock | bytes | bytearray | memoryview
    ) -> bytes:
        """One encrypted frame carrying a bulk data block (a ``DataBlock`` is not copied)."""
        self._step("send_frame")
        assert self._send is not None
        block = payload if isinstance(payload, DataBlock) else DataBlock.of(payload)
        _DATA_HEADER.pack_into(block.buffer, 0, KIND_DATA, stream, offset)
        return self._send.seal(block.buffer)

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> Event:
        """Turn one websocket message from the peer into one event.

        Raises:
            RemoteProtocolError: the peer broke the protocol; close with ``close_code``.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("the session is closed")
        if len(data) > MAX_FRAME_BYTES:
            self.state = State.CLOSED
            raise _bad(
                f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}", CloseCode.MESSAGE_TOO_BIG
            )
        try:
            return self._receive(bytes(data))
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise

    def _receive(self, data: bytes) -> Event:
        if self.state is State.ESTABLISHED:
            self._step("recv_frame")
            assert self._recv is not None
            plain = self._recv.open(data)
            if not plain:
                raise _bad("empty frame", CloseCode.BAD_FRAME)
            if plain[0] == KIND_MESSAGE:
                return MessageReceived(decode_message(plain[1:]))
            if plain[0] == KIND_DATA and len(plain) >= _DATA_HEADER.size:
                _, stream, offset = _DATA_HEADER.unpack_from(plain)
                return DataReceived(stream, offset, plain[_DATA_HEADER.size :])
            raise _bad(f"unknown frame kind {plain[0]}", CloseCode.BAD_FRAME)
        if self.side is Side.RESPONDER and self.state is State.START:
            return self._receive_hello(data)
        if self.side is Side.INITIATOR and self.state is State.SENT_HELLO:
            return self._receive_ack(data)
        if self.side is Side.RESPONDER and self.state is State.SENT_ACK:
            return self._receive_identity(data)
        if self.side is Side.INITIATOR and self.state is State.SENT_IDENTITY:
            return self._receive_verdict(data)
        raise _bad(f"a message arrived in state {self.state.value}, where the peer must wait")

    def _receive_hello(self, data: bytes) -> Event:
        self._step("recv_hello")
        m1 = _decode_map(data, "M1", MAX_HELLO_BYTES)
        if m1.get("protocol") != PROTOCOL:
            raise _bad(
                f"peer speaks {m1.get('protocol')!r}, this node speaks {PROTOCOL!r}",
                CloseCode.VERSION_MISMATCH,
            )
        self._m1 = data
        self._derive(_bytes(m1, "e"), _bytes(m1, "n"), data)
        return HelloReceived()

    def _receive_ack(self, data: bytes) -> Event:
        self._step("recv_ack")
        m2 = _decode_map(data, "M2", MAX_ACK_BYTES)
        self._derive(_bytes(m2, "e"), _bytes(m2, "n"), self._m1)
        assert self._recv is not None
        box = _decode_map(self._recv.open(_bytes(m2, "box")), "M2 box")
        peer = _bytes(box, "id")
        if len(peer) != 32 or not verify(peer, self._signed_by_responder(), _bytes(box, "sig")):
            raise _bad("the responder's signature does not verify", CloseCode.AUTHENTICATION_FAILED)
        peer_id = peer.hex()
        if self.expected_peer is not None and peer_id != self.expected_peer:
            raise _bad(
                f"dialed node {self.expected_peer[:16]}... but reached {peer_id[:16]}...",
                CloseCode.AUTHENTICATION_FAILED,
            )
        self.peer_id = peer_id
        observed = box.get("observed", "")
        if not isinstance(observed, str) or len(observed) > MAX_OBSERVED_CHARS:
            observed = ""
        return ResponderIdentified(peer_id, observed)

    def _receive_identity(self, data: bytes) -> Event:
        self._step("recv_identity")
        assert self._recv is not None
        body = _decode_map(self._recv.open(data), "M3")
        peer = _bytes(body, "id")
        if len(peer) != 32:
            raise _bad("the initiator's node ID is not 32 bytes", CloseCode.AUTHENTICATION_FAILED)
        if not verify(peer, self._signed_by_initiator(self.identity.id), _bytes(body, "sig")):
            raise _bad("the initiator's signature does not verify", CloseCode.AUTHENTICATION_FAILED)
        self.peer_id = peer.hex()
        join = body.get("join")
        try:
            claim = Claim(
                channels=tuple(_ids(body.get("channels", []))),
                join=None
                if join is None
                else JoinProof(invite_id=bytes(join["inviteId"]), proof=bytes(join["proof"])),
                docs=tuple(_maps(body.get("docs", []))),
                addresses=tuple(_strings(body.get("addresses", []))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(f"malformed M3: {exc}") from None
        return InitiatorIdentified(self.peer_id, claim)

    def _receive_verdict(self, data: bytes) -> Event:
        assert self._recv is not None
        body = _decode_map(self._recv.open(data), "M4")
        if "refused" in body:
            self._step("recv_refusal")
            refused = body["refused"]
            try:
                code = CloseCode(refused["code"])
            except (KeyError, TypeError, ValueError):
                code = CloseCode.PROTOCOL_ERROR
            reason = refused.get("reason", "") if isinstance(refused, dict) else ""
            return Refused(code, reason if isinstance(reason, str) else "")
        welcome = body.get("welcome")
        if not isinstance(welcome, dict):
            raise _bad("M4 is neither a welcome nor a refusal")
        self._step("recv_welcome")
        try:
            admission = Admission(
                channels=tuple(_ids(welcome.get("channels", []))),
                docs=tuple(_maps(welcome.get("docs", []))),
                addresses=tuple(_strings(welcome.get("addresses", []))),
            )
        except (TypeError, ValueError) as exc:
            raise _bad(f"malformed M4: {exc}") from None
        return Welcomed(admission)


def message_plaintext(msg: Message) -> bytes:
    """The plaintext of the frame carrying ``msg``: its kind byte, then the message's CBOR."""
    return bytes([KIND_MESSAGE]) + encode_message(msg)


def _decode_map(
    data: bytes | memoryview, what: str, max_bytes: int = MAX_HANDSHAKE_BYTES
) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise _bad(f"{what} of {len(data)} bytes exceeds {max_bytes}", CloseCode.MESSAGE_TOO_BIG)
    value = decode(data, max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise _bad(f"{what} is not a CBOR map")
    return value


def _bytes(m: dict[str, Any], key: str) -> bytes:
    value = m.get(key)
    if not isinstance(value, bytes):
        raise _bad(f"handshake field {key!r} is missing or not bytes")
    return value


def _ids(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(
        isinstance(v, str) and is_public_key_hex(v) for v in values
    ):
        raise ValueError("channels must be a list of 64-hex-digit IDs")
    return values


def _maps(values: Any) -> list[dict[str, Any]]:
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise ValueError("docs must be a list of maps")
    return values


def _strings(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("addresses must be a list of strings")
    return values
