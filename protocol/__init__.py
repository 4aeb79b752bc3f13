"""Sans-I/O core of kachery-node: identifiers, URIs, manifests, the codec, keys and signatures.

Nothing here does I/O, reads a clock or draws randomness: bytes and values in, values out.
"""

from .codec import decode, encode
from .errors import (
    CloseCode,
    InvalidInput,
    InvalidManifest,
    InvalidURI,
    KacheryError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from .identity import KeyPair, public_key_from_id, verify, verify_body
from .kachery_json import exact_kwargs_digest, subfeed_hash_of_object, task_hash
from .manifest import CHUNK_SIZE, HashResult, Manifest, ManifestChunk, PieceHasher, hash_bytes
from .uri import ChunkOf, FeedURI, FileURI, parse_feed_uri, parse_file_uri, parse_uri, subfeed_hash

__all__ = [
    "CHUNK_SIZE",
    "ChunkOf",
    "CloseCode",
    "FeedURI",
    "FileURI",
    "HashResult",
    "InvalidInput",
    "InvalidManifest",
    "InvalidURI",
    "KacheryError",
    "KeyPair",
    "LocalProtocolError",
    "Manifest",
    "ManifestChunk",
    "PieceHasher",
    "ProtocolError",
    "RemoteProtocolError",
    "decode",
    "encode",
    "exact_kwargs_digest",
    "hash_bytes",
    "parse_feed_uri",
    "parse_file_uri",
    "parse_uri",
    "public_key_from_id",
    "subfeed_hash",
    "subfeed_hash_of_object",
    "task_hash",
    "verify",
    "verify_body",
]
