"""The database schema and its migrations.

Tables are SQLAlchemy Core ``Table`` objects on one ``metadata``. The schema is versioned: the
``schema_version`` table holds the number of migrations applied, and ``MIGRATIONS[i]`` takes the
database from version ``i`` to ``i + 1``. A migration, once released, never changes; a new one is
appended. A migration that introduces a table creates it from its ``Table`` below; when a later
migration alters that table, the earlier one must be given a frozen copy of the original shape.
Non-goal: downgrades (a database newer than the code is refused, not rewritten).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

_frozen = MetaData()
"""Tables as an earlier migration created them, before a later migration changed them."""

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("sha1", String(40), primary_key=True),
    Column("size", BigInteger, nullable=False),
    # SHA-1 of the manifest's JSON bytes, for files over 20,000,000 bytes.
    Column("manifest_sha1", String(40), nullable=True),
    # NULL: the bytes are in the blob store. Otherwise an absolute path indexed where it lies
    # (``link``), valid only while its size and mtime are unchanged.
    Column("linked_path", Text, nullable=True),
    Column("linked_mtime_ns", BigInteger, nullable=True),
    Column("stored_at", Float, nullable=False),
    Index("files_by_manifest", "manifest_sha1"),
)

mutables = Table(
    "mutables",
    metadata,
    # Canonical JSON of the key (sorted keys, compact), so equal JSON keys are one row.
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)


channels = Table(
    "channels",
    metadata,
    Column("channel_id", String(64), primary_key=True),
    # The local name a user types (``kachery-node channel members lab``); unique on this node.
    Column("name", String(200), nullable=False, unique=True),
    Column("joined_at", Float, nullable=False),
)

channel_docs = Table(
    "channel_docs",
    metadata,
    Column("channel_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("signer", String(64), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
)

invites = Table(
    "invites",
    metadata,
    Column("invite_id", String(32), primary_key=True),
    Column("channel_id", String(64), nullable=False),
    Column("secret", LargeBinary, nullable=False),
    Column("roles", Text, nullable=False),  # comma-separated role names
    Column("expires_at", BigInteger, nullable=False),  # ms since the epoch; 0 = never
    Column("uses_left", Integer, nullable=True),  # NULL = unlimited
    Column("created_at", Float, nullable=False),
)

peers = Table(
    "peers",
    metadata,
    Column("node_id", String(64), primary_key=True),
    # The newest signed announcement (canonical CBOR of its wire form): addresses, timestamp.
    Column("announcement", LargeBinary, nullable=True),
    Column("announced_at", BigInteger, nullable=False),  # the announcement's timestamp, ms
    Column("last_connected", Float, nullable=True),
)


downloads = Table(
    "downloads",
    metadata,
    # A file being fetched from peers into <home>/partial/<sha1>.part.
    Column("sha1", String(40), primary_key=True),
    Column("manifest_sha1", String(40), nullable=True),
    Column("size", BigInteger, nullable=False),
    # One bit per manifest piece (piece i is bit i % 8 of byte i // 8): verified and written.
    Column("verified", LargeBinary, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)


# -- feeds (schema version 4) ---------------------------------------------------------------------

feeds = Table(
    "feeds",
    metadata,
    Column("feed_id", String(64), primary_key=True),
    # The local name kachery's get_feed_id(name) finds it by; unique on this node.
    Column("name", String(200), nullable=True, unique=True),
    # True if this node holds the feed's private key (keys/feed-<id> in the node home).
    Column("owned", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
)

subfeeds = Table(
    "subfeeds",
    metadata,
    # A small integer for the (feed, subfeed) pair, so message rows do not repeat 104 hex digits.
    Column("sf", Integer, primary_key=True, autoincrement=True),
    Column("feed_id", String(64), nullable=False),
    Column("subfeed_hash", String(40), nullable=False),
    Column("subfeed_name", Text, nullable=True),  # when known (a hash has no name)
    Column("created_at", Float, nullable=False),
    UniqueConstraint("feed_id", "subfeed_hash", name="subfeeds_by_hash"),
)

MESSAGE_NUMBER_BITS = 40
"""A message row's key is ``sf << MESSAGE_NUMBER_BITS | n`` (``feed_messages.c.msg_key``): room
for 2**40 messages per subfeed and 2**23 subfeeds in a signed 64-bit integer."""

feed_messages = Table(
    "feed_messages",
    metadata,
    # One integer for (subfeed, message number), SQLite's rowid: an append adds a row at the end
    # of the table's b-tree, which SQLite splits without rewriting the neighbouring leaves. With
    # the (sf, n) primary key of schema version 4 (an index b-tree: WITHOUT ROWID) a one-row
    # commit wrote 10.2 KiB of WAL and took 30-35 us here; with this key 5.2 KiB and 20-26 us.
    Column(
        "msg_key",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("body", LargeBinary, nullable=False),  # canonical CBOR, exactly as signed
    Column("signature", LargeBinary, nullable=False),
    Column("chain", LargeBinary, nullable=False),  # the chain hash after this message
)

_feed_messages_v4 = Table(  # schema version 4's shape (see _v6_feed_message_keys)
    "feed_messages",
    _frozen,
    Column("sf", Integer, primary_key=True),
    Column("n", BigInteger, primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("chain", LargeBinary, nullable=False),
    sqlite_with_rowid=False,
)

feed_checkpoints = Table(
    "feed_checkpoints",
    metadata,
    Column("sf", Integer, primary_key=True),
    Column("count", BigInteger, primary_key=True),
    Column("chain_hash", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
)

feed_forks = Table(
    "feed_forks",
    metadata,
    # Evidence: two different messages with one number, both signed by the feed key.
    Column("fork_id", Integer, primary_key=True, autoincrement=True),
    Column("feed_id", String(64), nullable=False),
    Column("subfeed_hash", String(40), nullable=False),
    Column("message_number", BigInteger, nullable=False),
    Column("body_kept", LargeBinary, nullable=False),
    Column("signature_kept", LargeBinary, nullable=False),
    Column("body_other", LargeBinary, nullable=False),
    Column("signature_other", LargeBinary, nullable=False),
    Column("reported_by", String(64), nullable=True),  # the peer that sent the other message
    Column("detected_at", Float, nullable=False),
    UniqueConstraint("feed_id", "subfeed_hash", "message_number", "signature_other"),
)

feed_grants = Table(
    "feed_grants",
    metadata,
    # On the owner's node: nodes that may submit messages to a subfeed.
    Column("feed_id", String(64), primary_key=True),
    Column("subfeed_hash", String(40), primary_key=True),
    Column("node_id", String(64), primary_key=True),
    Column("granted_at", Float, nullable=False),
)

feed_subscriptions = Table(
    "feed_subscriptions",
    metadata,
    # Subfeeds this node follows live, and in which channel.
    Column("feed_id", String(64), primary_key=True),
    Column("subfeed_hash", String(40), primary_key=True),
    Column("channel_id", String(64), primary_key=True),
    Column("subscribed_at", Float, nullable=False),
)


# -- tasks (schema version 5) ---------------------------------------------------------------------

task_results = Table(
    "task_results",
    metadata,
    # A result held here: a pure calculation's (shared with the channel), or a query's last one.
    Column("task_id", String(40), primary_key=True),  # kachery's task hash
    Column("kwargs_digest", String(40), primary_key=True),  # exact arguments (floats kept)
    Column("task_type", String(20), primary_key=True),  # pure-calculation | query
    Column("function_id", String(200), nullable=False),
    Column("result_uri", Text, nullable=False),
    Column("result_kind", String(10), nullable=False),  # json | bytes | file
    # Where it came from: the provider that ran it, or the member whose cache held it.
    Column("source", String(64), nullable=False),
    Column("finished_at", Float, nullable=False),
    # (schema version 7) A result of at most INLINE_RESULT_BYTES: its bytes, kept here instead
    # of a file in the blob store; checked against result_uri's SHA-1 whenever it is read.
    Column("result_data", LargeBinary, nullable=True),
    # (schema version 7) So `load` of a result's URI finds bytes kept here (TaskStore.kept_bytes).
    Index("task_results_by_uri", "result_uri"),
)

_task_results_v5 = Table(  # schema version 5's shape (version 7 adds result_data)
    "task_results",
    _frozen,
    Column("task_id", String(40), primary_key=True),
    Column("kwargs_digest", String(40), primary_key=True),
    Column("task_type", String(20), primary_key=True),
    Column("function_id", String(200), nullable=False),
    Column("result_uri", Text, nullable=False),
    Column("result_kind", String(10), nullable=False),
    Column("source", String(64), nullable=False),
    Column("finished_at", Float, nullable=False),
)

task_actions = Table(
    "task_actions",
    metadata,
    # On a provider: every action request it accepted, recorded before it runs (at most once).
    Column("requester", String(64), primary_key=True),
    Column("request_id", String(64), primary_key=True),
    Column("function_id", String(200), nullable=False),
    Column("kwargs_digest", String(40), nullable=False),
    Column("status", String(10), nullable=False),  # queued | running | finished | error
    Column("error", Text, nullable=True),
    Column("accepted_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
)


task_requests = Table(
    "task_requests",
    metadata,
    # (schema version 8) On a requester: each request made through this node that has ended,
    # as the local API showed it then (its JSON), so `task status` and `task list` still know
    # it after the daemon restarts. The newest KEPT_ENDED_REQUESTS are kept.
    Column("request_id", String(64), primary_key=True),
    Column("task_id", String(40), nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("state", Text, nullable=False),
    Index("task_requests_by_end", "ended_at"),
)


def _v1_files_and_mutables(conn: Connection) -> None:
    files.create(conn)
    mutables.create(conn)


def _v2_channels_and_peers(conn: Connection) -> None:
    for table in (channels, channel_docs, invites, peers):
        table.create(conn)


def _v3_downloads(conn: Connection) -> None:
    downloads.create(conn)


def _v4_feeds(conn: Connection) -> None:
    for table in (
        feeds,
        subfeeds,
        _feed_messages_v4,
        feed_checkpoints,
        feed_forks,
        feed_grants,
        feed_subscriptions,
    ):
        table.create(conn)


def _v5_tasks(conn: Connection) -> None:
    _task_results_v5.create(conn)
    task_actions.create(conn)


def _v6_feed_message_keys(conn: Connection) -> None:
    """Re-key feed messages by ``msg_key`` (one integer, the rowid) instead of (sf, n)."""
    conn.exec_driver_sql("ALTER TABLE feed_messages RENAME TO feed_messages_v4")
    feed_messages.create(conn)
    conn.exec_driver_sql(
        "INSERT INTO feed_messages (msg_key, body, signature, chain)"
        f" SELECT sf * {1 << MESSAGE_NUMBER_BITS} + n, body, signature, chain"
        " FROM feed_messages_v4"
    )
    conn.exec_driver_sql("DROP TABLE feed_messages_v4")


def _v7_inline_task_results(conn: Connection) -> None:
    """Small task results keep their bytes in their record (``task_results.result_data``)."""
    blob = LargeBinary().compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE task_results ADD COLUMN result_data {blob}"))
    for index in task_results.indexes:
        index.create(conn)


def _v8_task_requests(conn: Connection) -> None:
    """Ended task requests outlive a restart of the requester (``task_requests``)."""
    task_requests.create(conn)


MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_files_and_mutables,
    _v2_channels_and_peers,
    _v3_downloads,
    _v4_feeds,
    _v5_tasks,
    _v6_feed_message_keys,
    _v7_inline_task_results,
    _v8_task_requests,
]
"""``MIGRATIONS[i]`` moves the schema from version ``i`` to ``i + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
