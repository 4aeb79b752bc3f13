from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kachery.protocol import (
    ChunkOf,
    FeedURI,
    FileURI,
    InvalidURI,
    parse_feed_uri,
    parse_file_uri,
    parse_uri,
)

H = "0123456789abcdef0123456789abcdef01234567"
M = "a0d7e88b8b467db6af0a91ce4964514c000f04a5"
FEED = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sha1://{H}", FileURI(sha1=H)),
        (f"sha1://{H}/rec.nwb", FileURI(sha1=H, label="rec.nwb")),
        (f"sha1://{H}/dir/rec.nwb", FileURI(sha1=H, label="dir/rec.nwb")),
        (f"sha1://{H}?manifest={M}", FileURI(sha1=H, manifest_sha1=M)),
        (f"sha1://{H}/big.dat?manifest={M}", FileURI(sha1=H, label="big.dat", manifest_sha1=M)),
        (
            f"sha1://{M}?chunkOf={H}~20000000~40000000",
            FileURI(sha1=M, chunk_of=ChunkOf(file_sha1=H, start=20_000_000, end=40_000_000)),
        ),
    ],
)
def test_file_uris_parse_and_format_back(text: str, expected: FileURI) -> None:
    assert parse_file_uri(text) == expected
    assert str(expected) == text
    assert parse_uri(text) == expected


def test_uppercase_hex_is_read_and_written_lowercase() -> None:
    uri = parse_file_uri(f"sha1://{H.upper()}?manifest={M.upper()}")
    assert str(uri) == f"sha1://{H}?manifest={M}"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no '://'"),
        ("sha1:/" + H, "no '://'"),
        ("http://example.org/x", "scheme 'http'"),
        (f"sha1dir://{H}", "sha1dir:// directory URIs are not supported"),
        ("sha1://0123", "'0123' is not 40 hex digits"),
        ("sha1://" + "g" * 40, "is not 40 hex digits"),
        (f"sha1://{H}?manifest=abc", "manifest='abc' is not 40 hex digits"),
        (f"sha1://{H}?manfest={M}", "unknown query parameter 'manfest'"),
        (f"sha1://{H}?manifest", "has no '='"),
        (f"sha1://{H}?manifest={M}&manifest={M}", "manifest= given twice"),
        (f"sha1://{H}?chunkOf={H}~5", "is not <sha1>~<start>~<end>"),
        (f"sha1://{H}?chunkOf={H}~a~5", "is not two integers"),
        (f"sha1://{H}?chunkOf={H}~9~5", "not 0 <= start <= end"),
        (f"sha1://{H}?chunkOf=xyz~0~5", "is not 40 lowercase hex digits"),
        (f"sha1://{H}?manifest={M}&chunkOf={H}~0~5", "both ?manifest= and ?chunkOf="),
        ("sha1://" + H + "/" + "x" * 5000, "longer than 4096"),
    ],
)
def test_malformed_file_uris_say_what_is_wrong_and_show_the_form(text: str, complaint: str) -> None:
    with pytest.raises(InvalidURI) as info:
        parse_file_uri(text)
    message = str(info.value)
    assert complaint in message
    assert "expected sha1://<40 hex digits>" in message


def test_a_non_string_is_refused() -> None:
    with pytest.raises(InvalidURI, match="must be a string"):
        parse_file_uri(b"sha1://x")  # type: ignore[arg-type]


def test_feed_uris() -> None:
    assert parse_feed_uri(f"feed://{FEED}") == FeedURI(feed_id=FEED)
    uri = parse_feed_uri(f"feed://{FEED}/lab%20notebook%20%E2%9C%93")
    assert uri.subfeed_name == "lab notebook ✓"
    assert str(uri) == f"feed://{FEED}/lab%20notebook%20%E2%9C%93"
    assert uri.subfeed_hash == "2d7a275785162300b49305db65600935f5086dfc"  # kachery's value
    literal = parse_feed_uri(f"feed://{FEED}/~{H}")
    assert literal.subfeed_hash == H
    assert str(literal) == f"feed://{FEED}/~{H}"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("feed://abc", "'abc' is not 64 hex digits"),
        ("feed:abc", "no '://' after the scheme"),
        (f"sha1://{H}", "does not start with 'feed://'"),
        (f"feed://{FEED}/", "subfeed name after 'feed://<feed id>/' is empty"),
        (f"feed://{FEED}/~abc", "is not '~<40 hex digits>'"),
    ],
)
def test_malformed_feed_uris(text: str, complaint: str) -> None:
    with pytest.raises(InvalidURI) as info:
        parse_feed_uri(text)
    assert complaint in str(info.value)
    assert "expected feed://<64 hex digits>" in str(info.value)


hexes = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
labels = st.text(
    alphabet=st.characters(
        blacklist_characters="?#", min_codepoint=0x20, max_codepoint=0x2FFF
    ).filter(lambda c: c != "\x7f"),
    max_size=30,
)


@given(sha1=hexes, label=labels, manifest=st.none() | hexes)
def test_any_file_uri_round_trips(sha1: str, label: str, manifest: str | None) -> None:
    uri = FileURI(sha1=sha1, label=label, manifest_sha1=manifest)
    assert parse_file_uri(str(uri)) == uri


@given(name=st.text(min_size=1, max_size=40).filter(lambda n: not n.startswith("~")))
def test_any_subfeed_name_round_trips(name: str) -> None:
    uri = FeedURI(feed_id=FEED, subfeed_name=name)
    assert parse_feed_uri(str(uri)) == uri
