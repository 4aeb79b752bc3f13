from __future__ import annotations

import hashlib
import os

import pytest

from kachery.protocol import InvalidInput, KeyPair, public_key_from_id, verify, verify_body
from kachery.protocol import identity as identity_module
from kachery.protocol.errors import LocalProtocolError
from kachery.protocol.identity import Nonce

# RFC 8032 section 7.1, test 1.
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
    "d25bf5f0595bbe24655141438e7a100b"
)


def test_rfc8032_known_answer() -> None:
    key = KeyPair(SEED)
    assert key.id == PUBLIC
    assert key.sign(b"").hex() == SIGNATURE
    assert verify(public_key_from_id(PUBLIC), b"", bytes.fromhex(SIGNATURE))
    assert key.seed == SEED


def test_tampering_is_detected() -> None:
    key = KeyPair(bytes(32))
    sig = key.sign(b"hello")
    assert verify(key.public_key, b"hello", sig)
    assert not verify(key.public_key, b"hellp", sig)
    assert not verify(key.public_key, b"hello", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify(KeyPair(bytes(31) + b"\x01").public_key, b"hello", sig)
    assert not verify(key.public_key, b"hello", b"short")


def test_bodies_are_signed_as_canonical_cbor_whatever_the_key_order() -> None:
    key = KeyPair(bytes(32))
    sig = key.sign_body({"version": 1, "a": 1, "b": [1, 2]})
    assert verify_body(key.public_key, {"b": [1, 2], "a": 1, "version": 1}, sig)
    assert not verify_body(key.public_key, {"b": [1, 2], "a": 2, "version": 1}, sig)


def test_bad_keys_are_refused_clearly() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        KeyPair(b"x")
    with pytest.raises(InvalidInput, match="64-hex-digit"):
        public_key_from_id("zz")


def rfc8032_nonce(seed: bytes, message: bytes) -> Nonce:
    """The nonce RFC 8032 derives for ``message``: H(prefix || M), prefix = SHA-512(seed)[32:]."""
    return Nonce(hashlib.sha512(hashlib.sha512(seed).digest()[32:] + message).digest())


@pytest.mark.parametrize("direct", [True, False])
def test_a_precomputed_nonce_makes_the_rfc8032_signature_when_given_the_rfc8032_nonce(
    monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """``sign_with`` is Ed25519 signing with the nonce taken from outside: handed the nonce RFC
    8032 would derive, it reproduces the known answer and libsodium's signatures byte for byte
    (through libsodium called directly and through PyNaCl's public bindings)."""
    if direct:
        assert identity_module._SODIUM is not None, "this PyNaCl should expose libsodium"
    else:
        monkeypatch.setattr(identity_module, "_SODIUM", None)
    key = KeyPair(SEED)
    assert key.sign_with(b"", rfc8032_nonce(SEED, b"")).hex() == SIGNATURE
    for size in (0, 1, 63, 64, 450, 5000):
        seed = os.urandom(32)
        key = KeyPair(seed)
        message = os.urandom(size)
        assert key.sign_with(message, rfc8032_nonce(seed, message)) == key.sign(message)


def test_random_nonces_make_valid_distinct_signatures_and_each_signs_once() -> None:
    key = KeyPair(os.urandom(32))
    nonce = Nonce(os.urandom(64))
    first = key.sign_with(b"hello", nonce)
    second = key.sign_with(b"hello", Nonce(os.urandom(64)))
    assert first != second
    for sig in (first, second):
        assert verify(key.public_key, b"hello", sig)
        assert not verify(key.public_key, b"hellp", sig)
    with pytest.raises(LocalProtocolError, match="second message"):
        key.sign_with(b"other", nonce)  # a second use would give the key away
    with pytest.raises(InvalidInput, match="64 random bytes"):
        Nonce(os.urandom(32))
