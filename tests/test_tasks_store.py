"""The task tables: results found only for their exact arguments, a query's last result replaced,
and the action ledger that makes an action run at most once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import inspect, select

from kachery.protocol.errors import InvalidInput
from kachery.protocol.kachery_json import exact_kwargs_digest, task_hash
from kachery.storage import Database, schema
from kachery.storage.tasks import TaskResult, TaskStore


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(Database(f"sqlite:///{tmp_path / 'k.db'}"))


def result(kwargs: dict[str, float], uri: str, task_type: str = "pure-calculation") -> TaskResult:
    return TaskResult(
        task_id=task_hash("f.v1", kwargs),
        kwargs_digest=exact_kwargs_digest("f.v1", kwargs),
        task_type=task_type,
        function_id="f.v1",
        result_uri=uri,
        result_kind="json",
        source="a" * 64,
        finished_at=1.0,
    )


def test_a_result_is_found_only_for_its_exact_arguments(store: TaskStore) -> None:
    low, high = result({"t": 5.5}, "sha1://" + "1" * 40), result({"t": 6.5}, "sha1://" + "2" * 40)
    store.save_result(low)
    assert store.result(low.task_id, low.kwargs_digest, "pure-calculation") == low
    assert store.result(high.task_id, high.kwargs_digest, "pure-calculation") is None
    assert store.result(low.task_id, low.kwargs_digest, "query") is None
    store.save_result(high)
    assert {r.result_uri for r in store.results_for(low.task_id)} == {
        low.result_uri,
        high.result_uri,
    }


def test_a_query_keeps_only_its_last_result(store: TaskStore) -> None:
    first = result({"room": 1}, "sha1://" + "1" * 40, "query")
    second = result({"room": 1}, "sha1://" + "2" * 40, "query")
    store.save_result(first)
    store.save_result(second)
    assert store.result(first.task_id, first.kwargs_digest, "query") == second
    assert len(store.results()) == 1
    store.forget_result(first.task_id, first.kwargs_digest, "query")
    assert store.results() == []


def test_task_ids_are_found_by_prefix_once_each(store: TaskStore) -> None:
    low, high = result({"t": 5.5}, "sha1://" + "1" * 40), result({"t": 6.5}, "sha1://" + "2" * 40)
    other = replace(low, task_id="f" * 40, kwargs_digest="e" * 40)
    store.save_results([low, high, replace(low, task_type="query"), other])
    assert low.task_id == high.task_id  # kachery writes both floats as null
    assert store.ids_starting(low.task_id[:8]) == [low.task_id]  # three rows, one ID
    assert store.ids_starting("ffffffff") == ["f" * 40]
    assert store.ids_starting("") == sorted([low.task_id, "f" * 40])
    assert store.ids_starting("", limit=1) == sorted([low.task_id, "f" * 40])[:1]
    assert store.ids_starting("0" * 41) == []
    # an ended request kept here is found by its ID too
    store.record_ended_requests([("f" * 8 + "-request", "f" * 40, 1.0, "{}")], keep=10)
    assert store.ids_starting("ffffffff") == sorted(["f" * 40, "f" * 8 + "-request"])


def test_the_action_ledger_accepts_each_request_once(store: TaskStore) -> None:
    record, created = store.accept_action("r" * 64, "req1", "note.v1", "d" * 40)
    assert created
    assert record.status == "queued"
    again, created_again = store.accept_action("r" * 64, "req1", "note.v1", "d" * 40)
    assert not created_again
    assert again == record
    _, other = store.accept_action("s" * 64, "req1", "note.v1", "d" * 40)
    assert other  # request IDs are per requester
    store.mark_action("r" * 64, "req1", "running")
    store.mark_action("r" * 64, "req1", "error", "outcome unknown")
    done = store.action("r" * 64, "req1")
    assert done is not None
    assert (done.status, done.error) == ("error", "outcome unknown")
    assert done.finished_at is not None
    with pytest.raises(InvalidInput, match="unknown action state 'done'"):
        store.mark_action("r" * 64, "req1", "done")
    store.forget_action("s" * 64, "req1")
    assert store.action("s" * 64, "req1") is None


def test_a_version_4_database_gains_the_task_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        schema.schema_version.create(conn)
        for migrate in schema.MIGRATIONS[:4]:
            migrate(conn)
        conn.execute(schema.schema_version.insert().values(version=4))
    engine.dispose()
    db = Database(url)
    with db.begin() as conn:
        assert (
            conn.execute(select(schema.schema_version.c.version)).scalar() == schema.SCHEMA_VERSION
        )
        tables = set(inspect(conn).get_table_names())
    assert {"task_results", "task_actions", "feeds"} <= tables
    TaskStore(db).save_result(result({"t": 1}, "sha1://" + "1" * 40))


def test_a_small_result_keeps_its_bytes_in_its_row(store: TaskStore) -> None:
    kept = replace(result({"t": 1}, "sha1://" + "1" * 40), result_data=b'{"x":1}')
    store.save_result(kept)
    assert store.result(kept.task_id, kept.kwargs_digest, "pure-calculation") == kept
    assert store.results_for(kept.task_id) == [kept]


def test_a_version_5_database_keeps_its_results_and_gains_inline_bytes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sqlalchemy.create_engine(url)
    old = result({"t": 1}, "sha1://" + "1" * 40)
    with engine.begin() as conn:
        schema.schema_version.create(conn)
        for migrate in schema.MIGRATIONS[:5]:
            migrate(conn)
        conn.execute(schema.schema_version.insert().values(version=5))
        columns = {c["name"] for c in inspect(conn).get_columns("task_results")}
        assert "result_data" not in columns  # version 5's shape, as released
        values = {f: getattr(old, f) for f in columns}
        conn.execute(
            sqlalchemy.table("task_results", *map(sqlalchemy.column, columns)).insert(), values
        )
    engine.dispose()
    db = Database(url)
    with db.begin() as conn:
        indexes = {i["name"] for i in inspect(conn).get_indexes("task_results")}
    assert "task_results_by_uri" in indexes  # for TaskStore.kept_bytes
    store = TaskStore(db)
    assert store.result(old.task_id, old.kwargs_digest, "pure-calculation") == old
    new = replace(result({"t": 2}, "sha1://" + "2" * 40), result_data=b"2")
    store.save_result(new)
    assert store.result(new.task_id, new.kwargs_digest, "pure-calculation") == new
