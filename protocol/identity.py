"""Ed25519 identities: nodes, feeds and channels are key pairs; their IDs are 64-hex public keys.

One signing rule everywhere: sign the canonical CBOR of a body that carries its own version field
(``sign_body``/``verify_body``). Sans-I/O: key generation takes the 32-byte seed as an argument;
node/ draws it from ``os.urandom``. Keys are never written anywhere by this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nacl.bindings
import nacl.exceptions

from ._hex import is_public_key_hex
from .codec import encode
from .errors import InvalidInput

SEED_BYTES = 32
SIGNATURE_BYTES = 64


class KeyPair:
    """An Ed25519 key pair.

    Attributes:
        public_key: the 32-byte public key.
        id: the public key as 64 lowercase hex digits (a node, feed or channel ID).
    """

    __slots__ = ("_secret", "id", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise InvalidInput(f"an Ed25519 seed is {SEED_BYTES} bytes, not {len(seed)}")
        self.public_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)
        self.id = self.public_key.hex()

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Keep it secret: it is the identity."""
        return bytes(nacl.bindings.crypto_sign_ed25519_sk_to_seed(self._secret))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return bytes(nacl.bindings.crypto_sign(data, self._secret)[:SIGNATURE_BYTES])

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
