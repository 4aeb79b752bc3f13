"""Checks for the hexadecimal identifiers that kachery uses everywhere."""

from __future__ import annotations

import re

_HEX = re.compile(r"[0-9a-f]*")

SHA1_HEX_LENGTH = 40
"""A SHA-1 digest written as lowercase hexadecimal."""

PUBLIC_KEY_HEX_LENGTH = 64
"""An Ed25519 public key (node, feed and channel IDs) written as lowercase hexadecimal."""


def is_hex(text: str, length: int) -> bool:
    """True if ``text`` is exactly ``length`` lowercase hexadecimal digits."""
    return len(text) == length and _HEX.fullmatch(text) is not None


def is_sha1_hex(text: str) -> bool:
    """True if ``text`` is a lowercase 40-digit SHA-1."""
    return is_hex(text, SHA1_HEX_LENGTH)


def is_public_key_hex(text: str) -> bool:
    """True if ``text`` is a lowercase 64-digit Ed25519 public key."""
    return is_hex(text, PUBLIC_KEY_HEX_LENGTH)
