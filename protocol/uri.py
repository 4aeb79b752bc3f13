"""kachery URIs: ``sha1://`` for files and chunks of files, ``feed://`` for feeds and subfeeds.

The forms are kachery's, so URIs a lab already wrote down keep working::

    sha1://<sha1>[/<label>][?manifest=<sha1 of the manifest JSON>]
    sha1://<sha1 of the chunk>?chunkOf=<sha1 of the whole file>~<start>~<end>
    feed://<feed id>[/<subfeed name>]

Hex digits are read in either case and always written lowercase. Parsing is strict: anything
else raises ``InvalidURI`` naming what is wrong and showing the expected form. Non-goal: the
``sha1dir://`` directory URIs of kachery-p2p.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ._hex import is_public_key_hex, is_sha1_hex
from .errors import InvalidURI

FILE_URI_FORM = "sha1://<40 hex digits>[/<label>][?manifest=<40 hex digits>]"
CHUNK_URI_FORM = "sha1://<40 hex digits>?chunkOf=<40 hex digits>~<start>~<end>"
FEED_URI_FORM = "feed://<64 hex digits>[/<subfeed name>]"

MAX_URI_LENGTH = 4096
"""Longer text is not a URI anyone meant; refusing it early keeps error messages short."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkOf:
    """A byte range ``[start, end)`` of the file whose SHA-1 is ``file_sha1``."""

    file_sha1: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if not is_sha1_hex(self.file_sha1):
            raise InvalidURI(f"chunkOf file hash {self.file_sha1!r} is not 40 lowercase hex digits")
        if not 0 <= self.start <= self.end:
            raise InvalidURI(f"chunkOf range {self.start}~{self.end} is not 0 <= start <= end")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileURI:
    """A file (or a chunk of one) named by its content.

    Attributes:
        sha1: SHA-1 of the bytes this URI names (the chunk's own bytes for a chunk URI).
        label: a human-readable name, not part of the identity (``/rec.nwb``).
        manifest_sha1: for files over 20,000,000 bytes, the SHA-1 of the manifest's JSON bytes.
        chunk_of: for a chunk URI, which file and byte range the chunk is.
    """

    sha1: str
    label: str = ""
    manifest_sha1: str | None = None
    chunk_of: ChunkOf | None = None

    def __post_init__(self) -> None:
        if not is_sha1_hex(self.sha1):
            raise InvalidURI(f"file hash {self.sha1!r} is not 40 lowercase hex digits")
        if self.manifest_sha1 is not None and not is_sha1_hex(self.manifest_sha1):
            raise InvalidURI(f"manifest hash {self.manifest_sha1!r} is not 40 lowercase hex digits")
        if self.manifest_sha1 is not None and self.chunk_of is not None:
            raise InvalidURI("a URI cannot carry both ?manifest= and ?chunkOf=")
        bad = [c for c in self.label if c in "?#" or ord(c) < 0x20 or ord(c) == 0x7F]
        if bad:
            raise InvalidURI(f"label {self.label!r} contains {bad[0]!r}")

    @property
    def size_if_chunk(self) -> int | None:
        """The number of bytes a chunk URI names, or None for a whole-file URI."""
        return None if self.chunk_of is None else self.chunk_of.end - self.chunk_of.start

    def with_label(self, label: str) -> FileURI:
        """The same content under another label."""
        return FileURI(
            sha1=self.sha1, label=label, manifest_sha1=self.manifest_sha1, chunk_of=self.chunk_of
        )

    def __str__(self) -> str:
        text = f"sha1://{self.sha1}"
        if self.label:
            text += f"/{self.label}"
        if self.manifest_sha1 is not None:
            text += f"?manifest={self.manifest_sha1}"
        elif self.chunk_of is not None:
            c = self.chunk_of
            text += f"?chunkOf={c.file_sha1}~{c.start}~{c.end}"
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedURI:
    """A feed, or one subfeed of it.

    Attributes:
        feed_id: the feed's Ed25519 public key, 64 hex digits.
        subfeed_name: the subfeed's name as written in the URI (``~<sha1>`` names a hash directly),
            or None for the feed as a whole.
    """

    feed_id: str
    subfeed_name: str | None = None

    def __post_init__(self) -> None:
        if not is_public_key_hex(self.feed_id):
            raise InvalidURI(f"feed id {self.feed_id!r} is not 64 lowercase hex digits")
        if self.subfeed_name == "":
            raise InvalidURI("the subfeed name after 'feed://<feed id>/' is empty")

    @property
    def subfeed_hash(self) -> str | None:
        """The subfeed's hash (kachery's rule), or None if the URI names the whole feed."""
        return None if self.subfeed_name is None else subfeed_hash(self.subfeed_name)

    def __str__(self) -> str:
        if self.subfeed_name is None:
            return f"feed://{self.feed_id}"
        return f"feed://{self.feed_id}/{quote(self.subfeed_name, safe='~')}"


def subfeed_hash(name: str) -> str:
    """kachery's subfeed hash: a name ``~<40 hex>`` is that hash, any other is SHA-1 of its UTF-8.

    (kachery also allowed a JSON object as a name: see ``kachery.protocol.subfeed_hash_of_object``.)
    """
    if name.startswith("~"):
        literal = name[1:].lower()
        if not is_sha1_hex(literal):
            raise InvalidURI(f"subfeed name {name!r} starts with '~' but is not '~<40 hex digits>'")
        return literal
    try:
        data = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidURI(
            f"subfeed name {name!r} holds a lone surrogate, which UTF-8 cannot carry"
        ) from None
    return hashlib.sha1(data).hexdigest()


def _bad(text: str, what: str, form: str) -> InvalidURI:
    shown = text if len(text) <= 120 else text[:117] + "..."
    return InvalidURI(f"invalid URI {shown!r}: {what}; expected {form}")


def _split_scheme(text: str, form: str) -> tuple[str, str]:
    """``scheme://rest`` -> (scheme, rest), after the checks every URI gets."""
    if not isinstance(text, str):
        raise InvalidURI(f"a URI must be a string, not {type(text).__name__}")
    if len(text) > MAX_URI_LENGTH:
        raise _bad(text, f"longer than {MAX_URI_LENGTH} characters", form)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(text, "it holds a lone surrogate, which UTF-8 cannot carry", form) from None
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _bad(text, "no '://' after the scheme", form)
    return scheme, rest


def parse_file_uri(text: str) -> FileURI:
    """Parse a ``sha1://`` URI.

    Raises:
        InvalidURI: with what is wrong and the expected form.
    """
    scheme, rest = _split_scheme(text, FILE_URI_FORM)
    if scheme == "sha1dir":
        raise _bad(text, "sha1dir:// directory URIs are not supported", FILE_URI_FORM)
    if scheme != "sha1":
        raise _bad(text, f"scheme {scheme!r} is not 'sha1'", FILE_URI_FORM)
    path, _, query = rest.partition("?")
    digest, _, label = path.partition("/")
    digest = digest.lower()
    if not is_sha1_hex(digest):
        raise _bad(text, f"{digest!r} is not 40 hex digits", FILE_URI_FORM)
    manifest_sha1: str | None = None
    chunk_of: ChunkOf | None = None
    if query:
        for part in query.split("&"):
            key, eq, value = part.partition("=")
            if not eq:
                raise _bad(text, f"query part {part!r} has no '='", FILE_URI_FORM)
            if key == "manifest":
                if manifest_sha1 is not None:
                    raise _bad(text, "manifest= given twice", FILE_URI_FORM)
                if not is_sha1_hex(value.lower()):
                    raise _bad(text, f"manifest={value!r} is not 40 hex digits", FILE_URI_FORM)
                manifest_sha1 = value.lower()
            elif key == "chunkOf":
                chunk_of = _parse_chunk_of(text, value)
            else:
                raise _bad(
                    text,
                    f"unknown query parameter {key!r} (known: manifest, chunkOf)",
                    FILE_URI_FORM,
                )
    try:
        return FileURI(sha1=digest, label=label, manifest_sha1=manifest_sha1, chunk_of=chunk_of)
    except InvalidURI as exc:
        raise _bad(text, str(exc), FILE_URI_FORM) from None


def _parse_chunk_of(text: str, value: str) -> ChunkOf:
    parts = value.split("~")
    if len(parts) != 3:
        raise _bad(text, f"chunkOf={value!r} is not <sha1>~<start>~<end>", CHUNK_URI_FORM)
    file_sha1, start, end = parts
    if not (start.isascii() and start.isdigit() and end.isascii() and end.isdigit()):
        raise _bad(text, f"chunkOf range {start!r}~{end!r} is not two integers", CHUNK_URI_FORM)
    try:
        return ChunkOf(file_sha1=file_sha1.lower(), start=int(start), end=int(end))
    except InvalidURI as exc:
        raise _bad(text, str(exc), CHUNK_URI_FORM) from None


def parse_feed_uri(text: str) -> FeedURI:
    """Parse a ``feed://`` URI (the subfeed name is percent-decoded, as kachery-client quoted it).

    Raises:
        InvalidURI: with what is wrong and the expected form.
    """
    scheme, rest = _split_scheme(text, FEED_URI_FORM)
    if scheme != "feed":
        raise _bad(text, "it does not start with 'feed://'", FEED_URI_FORM)
    feed_id, slash, name = rest.partition("/")
    feed_id = feed_id.lower()
    if not is_public_key_hex(feed_id):
        raise _bad(text, f"{feed_id!r} is not 64 hex digits", FEED_URI_FORM)
    subfeed_name = unquote(name) if slash else None
    try:
        uri = FeedURI(feed_id=feed_id, subfeed_name=subfeed_name)
        _ = uri.subfeed_hash  # a malformed '~<hash>' name is an error now, not later
    except InvalidURI as exc:
        raise _bad(text, str(exc), FEED_URI_FORM) from None
    return uri


def parse_uri(text: str) -> FileURI | FeedURI:
    """Parse either kind of URI, by its scheme."""
    if isinstance(text, str) and text.startswith("feed://"):
        return parse_feed_uri(text)
    return parse_file_uri(text)
