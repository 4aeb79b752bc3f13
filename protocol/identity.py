"""Ed25519 identities: nodes, feeds and channels are key pairs; their IDs are 64-hex public keys.

One signing rule everywhere: sign the canonical CBOR of a body that carries its own version field
(``sign_body``/``verify_body``). Sans-I/O: key generation takes the 32-byte seed as an argument,
a precomputed signing ``Nonce`` its random bytes; node/ draws both from ``os.urandom``. Keys are
never written anywhere by this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import nacl.bindings
import nacl.exceptions

from ._hex import is_public_key_hex
from ._sodium import libsodium
from .codec import encode
from .errors import InvalidInput, LocalProtocolError

SEED_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_RANDOM_BYTES = 64
"""Random bytes a ``Nonce`` is made from (reduced mod L: uniform to within 2^-259)."""

_SODIUM = libsodium(
    "crypto_core_ed25519_scalar_reduce",
    "crypto_core_ed25519_scalar_mul",
    "crypto_core_ed25519_scalar_add",
)
"""Direct calls make ``sign_with`` ~2.5 us instead of ~6 (None: the public bindings are used)."""


class Nonce:
    """A precomputed Ed25519 signing nonce: a secret scalar r and the point R = rB, used once.

    An Ed25519 signature of M is (R, S = r + H(R || A || M) a mod L). RFC 8032 derives r from the
    message, r = H(prefix || M), so the base-point multiplication R = rB (~18 us of the ~20 us a
    signature costs here) cannot start before the message is known. A feed's messages are a
    chain (each body holds the signature before it), so they are signed one after another, and
    that multiplication bounds the append rate. Drawing r at random instead, as Schnorr
    signatures always could, lets R be computed ahead of time on another core; signing is then a
    hash and three scalar operations (``KeyPair.sign_with``). Verifiers cannot tell the
    difference: it is the same equation SB = R + H(R || A || M) A.

    The price is the classic one of random nonces, and the rules that pay it:
    - r must be unpredictable: it is made from ``NONCE_RANDOM_BYTES`` of the OS CSPRNG (the
      caller draws them: this module does no I/O), like every ephemeral key of a session.
    - r must never sign two messages (two signatures with one r give away the key): a Nonce is
      spent by its first use, and using it again raises.
    - r must stay secret: it lives in memory only, beside the key, and is never stored or sent.
    Deterministic RFC 8032 signing (``KeyPair.sign``) remains the default everywhere else.
    """

    __slots__ = ("_point", "_scalar")

    def __init__(self, random: bytes) -> None:
        if len(random) != NONCE_RANDOM_BYTES:
            raise InvalidInput(f"a nonce is made from {NONCE_RANDOM_BYTES} random bytes")
        self._scalar: bytes | None = nacl.bindings.crypto_core_ed25519_scalar_reduce(random)
        # Raises for r = 0 (probability 2^-252): R would be the identity.
        self._point = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(self._scalar)

    @classmethod
    def precomputed(cls, scalar: bytes, point: bytes) -> Nonce:
        """A nonce made by ``Nonce(random)`` elsewhere (the node's nonce maker process) and
        passed on as r and R, which are trusted as given: R is not computed again."""
        if len(scalar) != 32 or len(point) != 32:
            raise InvalidInput("a precomputed nonce is a 32-byte scalar and a 32-byte point")
        nonce = cls.__new__(cls)
        nonce._scalar, nonce._point = scalar, point
        return nonce

    def spend(self) -> tuple[bytes, bytes]:
        """(r, R), once.

        Raises:
            LocalProtocolError: the nonce was already used.
        """
        scalar, self._scalar = self._scalar, None
        if scalar is None:
            raise LocalProtocolError("an Ed25519 nonce was about to sign a second message")
        return scalar, self._point


def _s_value(digest: bytes, secret_scalar: bytes, nonce_scalar: bytes) -> bytes:
    """S = (digest mod L) * a + r mod L, as 32 little-endian bytes."""
    if _SODIUM is None:
        k = nacl.bindings.crypto_core_ed25519_scalar_reduce(digest)
        ka = nacl.bindings.crypto_core_ed25519_scalar_mul(k, secret_scalar)
        return nacl.bindings.crypto_core_ed25519_scalar_add(ka, nonce_scalar)
    lib, out = _SODIUM.lib, _SODIUM.uncleared("unsigned char[]", 64)
    lib.crypto_core_ed25519_scalar_reduce(out, digest)
    lib.crypto_core_ed25519_scalar_mul(out + 32, out, secret_scalar)
    lib.crypto_core_ed25519_scalar_add(out, out + 32, nonce_scalar)
    return _SODIUM.ffi.buffer(out, 32)[:]  # type: ignore[no-any-return]


class KeyPair:
    """An Ed25519 key pair.

    Attributes:
        public_key: the 32-byte public key.
        id: the public key as 64 lowercase hex digits (a node, feed or channel ID).
    """

    __slots__ = ("_scalar", "_secret", "id", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise InvalidInput(f"an Ed25519 seed is {SEED_BYTES} bytes, not {len(seed)}")
        self.public_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)
        self.id = self.public_key.hex()
        # The secret scalar a (RFC 8032 5.1.5: the clamped first half of SHA-512(seed)), mod L.
        a = bytearray(hashlib.sha512(seed).digest()[:32])
        a[0] &= 248
        a[31] = (a[31] & 127) | 64
        self._scalar = nacl.bindings.crypto_core_ed25519_scalar_reduce(bytes(a) + bytes(32))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Keep it secret: it is the identity."""
        return bytes(nacl.bindings.crypto_sign_ed25519_sk_to_seed(self._secret))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return bytes(nacl.bindings.crypto_sign(data, self._secret)[:SIGNATURE_BYTES])

    def sign_with(self, data: bytes, nonce: Nonce) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` made with a precomputed ``nonce`` (see
        ``Nonce``): ~2.5 us instead of ~20, any verifier accepts it, and ``nonce`` is spent.

        Raises:
            LocalProtocolError: ``nonce`` was already used.
        """
        nonce_scalar, point = nonce.spend()
        digest = hashlib.sha512(point + self.public_key + data).digest()
        return point + _s_value(digest, self._scalar, nonce_scalar)

    def sign_body(self, body: Mapping[str, Any]) -> bytes:
        """Sign the canonical CBOR of ``body``."""
        return self.sign(encode(dict(body)))

    def __repr__(self) -> str:
        return f"KeyPair(id={self.id[:16]}...)"


def public_key_from_id(key_id: str) -> bytes:
    """The 32-byte public key named by a 64-hex ID.

    Raises:
        InvalidInput: ``key_id`` is not 64 lowercase hex digits.
    """
    if not is_public_key_hex(key_id):
        raise InvalidInput(f"{key_id!r} is not a 64-hex-digit public key")
    return bytes.fromhex(key_id)


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is the Ed25519 signature of ``data`` by ``public_key``."""
    if len(signature) != SIGNATURE_BYTES or len(public_key) != 32:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + data, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


def verify_body(public_key: bytes, body: Mapping[str, Any], signature: bytes) -> bool:
    """True if ``signature`` signs the canonical CBOR of ``body``."""
    return verify(public_key, encode(dict(body)), signature)
