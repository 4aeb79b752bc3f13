"""Tasks between real nodes on loopback (in one Trio loop): caching, routing, leases, and every
fault the issue names.

Workers here are Trio tasks that use the same stream API a worker process uses
(``task_backend_listen`` / ``task_backend_report``); stopping one is closing its stream, which is
what the daemon sees when a worker process dies. Nothing sleeps: tests wait for events (request
state changes, ``Node.wait_until``) under a generous ``fail_after``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast
from unittest.mock import ANY

import pytest
import trio

from kachery.node.client.tasks import describe_exception, store_result
from kachery.node.daemon.node import Node
from kachery.node.daemon.peer import PeerConnection, RequestFailed
from kachery.node.errors import NotPermitted
from kachery.node.localapi.methods import StreamResult
from kachery.node.services.files.service import FileService
from kachery.node.services.tasks import requester as tasks_module
from kachery.node.services.tasks.directory import ProviderDirectory
from kachery.node.services.tasks.requests import Request
from kachery.node.services.tasks.service import TaskService
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput
from kachery.protocol.kachery_json import task_hash
from kachery.protocol.task_jobs import JobBook
from kachery.protocol.tasks import (
    INLINE_RESULT_BYTES,
    TaskProviders,
    TaskRequest,
    TaskSpec,
    TaskStatus,
    TaskStatusBatch,
    rank_providers,
)
from kachery.protocol.uri import parse_file_uri
from kachery.storage import schema
from kachery.storage.errors import NotFound
from kachery.storage.tasks import TaskStore

from .swarm import WAIT, channel_of, swarm, until, wait

TaskFn = Callable[..., Awaitable[Any]]


def tasks_of(node: Node) -> TaskService:
    return node.services.tasks


def files_of(node: Node) -> FileService:
    return node.services.files


def direct(
    conn: PeerConnection,
    request_id: str,
    function_id: str,
    kwargs: dict[str, Any],
    *,
    task_type: str = "pure-calculation",
    task_id: str | None = None,
) -> TaskRequest:
    """A TaskRequest as a requester's node would send it on ``conn`` (``task_id`` to forge)."""
    return TaskRequest(
        id=0,
        channel=next(iter(conn.channels)),
        request_id=request_id,
        function_id=function_id,
        task_type=task_type,
        task_id=task_hash(function_id, kwargs) if task_id is None else task_id,
        kwargs=kwargs,
    )


class Worker:
    """A worker for ``node``: runs async task functions, counting runs per function ID."""

    def __init__(
        self, node: Node, functions: dict[str, tuple[str, TaskFn]], *, slots: int = 4
    ) -> None:
        self.node = node
        self.functions = functions
        self.slots = slots
        self.runs: Counter[str] = Counter()
        self.started: dict[str, trio.Event] = {f: trio.Event() for f in functions}
        self.scope = trio.CancelScope()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        service = tasks_of(self.node)
        listed = [{"functionId": f, "type": t} for f, (t, _) in self.functions.items()]
        with self.scope:
            events = service.workers.task_backend_listen(functions=listed, slots=self.slots)
            async with contextlib.aclosing(events), trio.open_nursery() as nursery:
                backend_id = ""
                async for event in events:
                    assert isinstance(event, dict)
                    if event["event"] == "registered":
                        backend_id = event["backendId"]
                        task_status.started()
                    else:
                        nursery.start_soon(self._job, service, backend_id, event)

    async def _job(self, service: TaskService, backend_id: str, job: dict[str, Any]) -> None:
        function_id = job["functionId"]
        task_type, fn = self.functions[function_id]
        self.runs[function_id] += 1
        self.started[function_id].set()
        report: dict[str, Any]
        try:
            value = await fn(**job["kwargs"])
        except Exception as exc:
            report = {"status": "error", "error": describe_exception(exc)}
        else:
            report = {"status": "finished"}
            if task_type != "action":
                uri, kind = await trio.to_thread.run_sync(store_result, self.node.home, value)
                report.update(result_uri=uri, result_kind=str(kind))
        await service.workers.task_backend_report(
            backend_id=backend_id, job_id=job["jobId"], **report
        )

    def stop(self) -> None:
        """The worker dies: its stream closes."""
        self.scope.cancel()


async def start_worker(
    nursery: trio.Nursery, node: Node, functions: dict[str, tuple[str, TaskFn]], **options: Any
) -> Worker:
    worker = Worker(node, functions, **options)
    await nursery.start(worker.run)
    return worker


async def announced(requester: Node, provider: Node, function_id: str) -> None:
    """Wait until ``requester`` knows that ``provider`` serves ``function_id``."""
    service = tasks_of(requester)

    def known() -> bool:
        channels = requester.membership.active_channels()
        return any(
            c.node_id == provider.node_id
            for c in service.directory.candidates(function_id, channels)
        )

    with trio.fail_after(WAIT):
        while not known():
            event = service.directory.changed
            await event.wait()


async def finished(req: Request) -> Request:
    with trio.fail_after(WAIT):
        while not req.terminal:
            await req.wait_until(math.inf)
    return req


async def reached(req: Request, status: TaskStatus) -> None:
    with trio.fail_after(WAIT):
        while req.status is not status:
            await req.wait_until(math.inf)


async def request(node: Node, function_id: str, kwargs: dict[str, Any], **options: Any) -> Request:
    """Request a task and wait until it ends."""
    return await finished(await tasks_of(node).requester.request(function_id, kwargs, **options))


def result_of(node: Node, req: Request) -> bytes:
    assert req.status is TaskStatus.FINISHED, req.error
    assert req.result_uri is not None
    if req.result_data is not None:  # a small result: kept in its record, not in the store
        return req.result_data

    located = node.home.files.locate(parse_file_uri(req.result_uri))
    assert located is not None, f"{req.result_uri} is not stored on {node.node_id[:8]}"
    path, start, end = located
    return path.read_bytes()[start:end]


def spec_of(function_id: str, kwargs: dict[str, Any]) -> TaskSpec:
    return TaskSpec.create(function_id, kwargs, "pure-calculation", request_id="x", requester="")


def held_results(node: Node) -> list[Any]:
    return TaskStore(node.home.database).results()


async def add(a: float, b: float) -> float:
    return a + b


# -- pure calculations -------------------------------------------------------------------------


async def test_a_pure_result_is_computed_once_then_served_from_caches_even_offline(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        provider, requester, third = await channel_of(s, ["provider", "requester", "third"])
        worker = await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")

        first = await request(requester, "add.v1", {"a": 2, "b": 3.0})
        assert first.status is TaskStatus.FINISHED, first.error
        assert result_of(requester, first) == b"5.0"
        assert (first.cached, first.provider) == (False, provider.node_id)
        assert first.spec.task_id == task_hash("add.v1", {"a": 2, "b": 3})

        again = await tasks_of(requester).requester.request("add.v1", {"a": 2, "b": 3})
        assert again.status is TaskStatus.FINISHED  # answered in the call: cached here
        assert again.cached
        assert again.result_uri == first.result_uri

        s.stop("provider")
        await wait(third, lambda: provider.node_id not in third.connections)
        from_cache = await request(third, "add.v1", {"a": 2.0, "b": 3})
        assert from_cache.status is TaskStatus.FINISHED, from_cache.error
        assert from_cache.cached
        assert result_of(third, from_cache) == b"5.0"
        assert worker.runs["add.v1"] == 1
        assert [r.source for r in held_results(third)] == [requester.node_id]


async def test_a_small_result_travels_inline_and_a_large_one_is_fetched(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        requester, provider, third = await channel_of(s, ["requester", "provider", "third"])

        async def payload(n: int) -> bytes:
            return bytes(i % 251 for i in range(n))

        await start_worker(s.nursery, provider, {"payload.v1": ("pure-calculation", payload)})
        await announced(requester, provider, "payload.v1")
        small, large = INLINE_RESULT_BYTES, INLINE_RESULT_BYTES + 1
        for n in (small, large):
            done = await request(requester, "payload.v1", {"n": n})
            assert result_of(requester, done) == await payload(n)
        stats = tasks_of(requester).statistics()
        assert (stats["resultsInline"], stats["resultsFetched"]) == (1, 1)
        sent = files_of(provider).statistics()["bytesUploaded"]
        assert large <= sent < large + small  # only the large result went as file data

        # A member's cache answers the same way: inline when small.
        s.stop("provider")
        await wait(third, lambda: provider.node_id not in third.connections)
        for n in (small, large):
            cached = await request(third, "payload.v1", {"n": n})
            assert cached.cached
            assert result_of(third, cached) == await payload(n)
        stats = tasks_of(third).statistics()
        assert (stats["lookupHits"], stats["resultsInline"], stats["resultsFetched"]) == (2, 1, 1)


async def test_ended_requests_are_still_known_after_the_requester_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks_module, "KEPT_ENDED_REQUESTS", 3)
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        done = [await request(requester, "add.v1", {"a": 1, "b": n}) for n in range(4)]
        service = tasks_of(requester)
        before = await service.task_status(done[-1].spec.request_id)
        store = TaskStore(requester.home.database)
        await until(lambda: len(store.ended_requests(10)) == 3)  # kept in the background

        s.stop("requester")
        requester = await s.start("requester")
        service = tasks_of(requester)
        last = done[-1].spec.request_id
        after = await service.task_status(last)
        assert after == before  # status, result, provider, kwargs, small result's bytes
        assert after["status"] == "finished"
        assert base64.b64decode(after["resultData"]) == b"4"
        assert await service.task_status(last[:10]) == before  # a prefix, as `task list` shows
        assert await service.task_outcome(last) == before
        assert [e async for e in service.task_wait(last)] == [StreamResult(before)]
        listed = (await service.task_list())["requests"]
        assert [r["requestId"] for r in listed] == [r.spec.request_id for r in done[:0:-1]]
        assert "kwargs" not in listed[0]
        with pytest.raises(NotFound):  # only the newest KEPT_ENDED_REQUESTS are kept
            await service.task_outcome(done[0].spec.request_id)


async def test_a_small_result_lives_in_its_record_across_a_restart_and_a_corrupt_one_is_not_served(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        worker = await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        first = await request(requester, "add.v1", {"a": 1, "b": 2})
        assert first.result_data == b"3"
        assert first.result_uri is not None
        sha1 = parse_file_uri(first.result_uri).sha1
        assert not requester.home.blobs.has(sha1)  # kept in its record, not as a file
        spec = first.spec
        key = (spec.task_id, spec.kwargs_digest, str(spec.task_type))
        held = TaskStore(requester.home.database).result(*key)
        assert held is not None
        assert held.result_data == b"3"

        s.stop("requester")
        await wait(provider, lambda: requester.node_id not in provider.connections)
        requester = await s.start("requester")
        await announced(requester, provider, "add.v1")
        again = await tasks_of(requester).requester.request("add.v1", {"a": 1, "b": 2})
        assert (again.status, again.cached, again.result_data) == (TaskStatus.FINISHED, True, b"3")
        assert worker.runs["add.v1"] == 1

        # Bytes in a record that no longer match its URI are never served: not to this node's
        # client, nor to a member who asks; the task is found or run again instead.
        for node in (requester, provider):
            t = schema.task_results
            with node.home.database.begin() as conn:
                conn.execute(t.update().values(result_data=b"4"))
        tasks_of(requester).requester.requests.clear()
        repaired = await request(requester, "add.v1", {"a": 1, "b": 2})
        assert (repaired.status, repaired.cached, repaired.result_data) == (
            TaskStatus.FINISHED,
            False,
            b"3",
        )
        assert worker.runs["add.v1"] == 2
        assert TaskStore(requester.home.database).result(*key) == replace(
            held, source=provider.node_id, finished_at=ANY
        )


async def test_the_uri_of_a_small_result_kept_in_its_record_loads_with_its_provider_offline(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        requester, provider, third = await channel_of(s, ["requester", "provider", "third"])
        await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        mine = await request(requester, "add.v1", {"a": 1, "b": 2})
        shared = await request(requester, "add.v1", {"a": 2, "b": 2})
        uris = [parse_file_uri(r.result_uri or "") for r in (mine, shared)]
        assert not any(requester.home.blobs.has(u.sha1) for u in uris)  # kept in records only
        s.stop("provider")
        await wait(third, lambda: provider.node_id not in third.connections)

        # `load` on the requester: from the record, checked, into the store; no channel needed.
        entry = await files_of(requester).download(uris[0])
        assert entry.path.read_bytes() == b"3"
        # A member asks the channel: the requester answers from the record, and serves it.
        entry = await files_of(third).download(uris[1])
        assert entry.path.read_bytes() == b"4"
        assert requester.home.blobs.has(uris[1].sha1)


async def test_with_providers_online_only_they_are_asked_and_the_first_answers_from_its_cache(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        p1, p2, requester, third = await channel_of(s, ["p1", "p2", "requester", "third"])
        workers = [
            await start_worker(s.nursery, p, {"add.v1": ("pure-calculation", add)})
            for p in (p1, p2)
        ]
        for node in (requester, third):
            for p in (p1, p2):
                await announced(node, p, "add.v1")
        first = await request(requester, "add.v1", {"a": 1, "b": 2})
        assert not first.cached

        # The requester holds the result too, but only the providers are asked: the other one
        # by a lookup (it has no result), the first-ranked one by the request itself.
        again = await request(third, "add.v1", {"a": 1, "b": 2})
        assert again.cached
        assert again.provider == first.provider
        assert result_of(third, again) == b"3"
        assert sum(w.runs["add.v1"] for w in workers) == 1
        stats = tasks_of(third).statistics()
        assert (stats["providerCacheHits"], stats["lookupHits"], stats["computed"]) == (1, 0, 0)
        assert tasks_of(requester).statistics()["lookupsAnswered"] == 0


async def test_a_result_held_by_a_provider_ranked_lower_is_found_and_not_run_again(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        p1, p2, requester, third = await channel_of(s, ["p1", "p2", "requester", "third"])
        ranked = [p1.node_id, p2.node_id]
        a = next(
            a
            for a in range(100)
            if rank_providers(spec_of("add.v1", {"a": a, "b": 1}).route_key, ranked)[0]
            == p1.node_id
        )
        late = await start_worker(s.nursery, p2, {"add.v1": ("pure-calculation", add)})
        await announced(requester, p2, "add.v1")
        first = await request(requester, "add.v1", {"a": a, "b": 1})
        assert first.provider == p2.node_id  # the only provider then

        # p1 now serves it too, and ranks first for these arguments: p2 is asked for its result.
        early = await start_worker(s.nursery, p1, {"add.v1": ("pure-calculation", add)})
        for p in (p1, p2):
            await announced(third, p, "add.v1")
        found = await request(third, "add.v1", {"a": a, "b": 1})
        assert found.cached
        assert found.provider == p2.node_id
        assert result_of(third, found) == str(a + 1).encode()
        assert (early.runs["add.v1"], late.runs["add.v1"]) == (0, 1)
        assert tasks_of(third).statistics()["lookupHits"] == 1


async def test_ten_concurrent_requests_from_three_members_run_once_with_two_providers(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        p1, p2, r1, r2, r3 = await channel_of(s, ["p1", "p2", "r1", "r2", "r3"])
        gate = trio.Event()

        async def slow_square(x: int) -> int:
            await gate.wait()
            return x * x

        workers = [
            await start_worker(s.nursery, p, {"square.v1": ("pure-calculation", slow_square)})
            for p in (p1, p2)
        ]
        for r in (r1, r2, r3):
            await announced(r, p1, "square.v1")
            await announced(r, p2, "square.v1")
        requests = [
            await tasks_of(r).requester.request("square.v1", {"x": 12})
            for r in (r1, r1, r1, r1, r2, r2, r2, r3, r3, r3)
        ]
        assert len({r.spec.request_id for r in requests}) == 10
        for req in requests:  # every one of them joins the one job at the chosen provider
            await reached(req, TaskStatus.RUNNING)
        gate.set()
        for req in requests:
            await finished(req)
        assert {r.status for r in requests} == {TaskStatus.FINISHED}
        assert len({r.result_uri for r in requests}) == 1
        assert sum(w.runs["square.v1"] for w in workers) == 1
        assert len({r.provider for r in requests}) == 1


async def test_kachery_float_collisions_never_share_a_result(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, requester = await channel_of(s, ["provider", "requester"])
        worker = await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        low = await request(requester, "add.v1", {"a": 5.5, "b": 0})
        high = await request(requester, "add.v1", {"a": 6.5, "b": 0})
        assert low.spec.task_id == high.spec.task_id  # kachery's ID writes both as null
        assert result_of(requester, low) == b"5.5"
        assert result_of(requester, high) == b"6.5"
        assert worker.runs["add.v1"] == 2
        again = await request(requester, "add.v1", {"a": 6.5, "b": 0})
        assert again.cached
        assert result_of(requester, again) == b"6.5"


# -- bad input -----------------------------------------------------------------------------------


async def test_an_unknown_function_ends_in_an_error_naming_it_and_nothing_is_cached(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        provider, requester = await channel_of(s, ["provider", "requester"])
        await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        tasks_of(requester).requester.no_provider_seconds = 0.2
        req = await request(requester, "ad.v1", {"a": 1, "b": 2})
        assert req.status is TaskStatus.ERROR
        assert req.error == (
            "no member of channel lab serves task function 'ad.v1' (members serve: add.v1)"
        )
        assert held_results(requester) == []
        assert held_results(provider) == []
        # Asked directly anyway, the provider says it does not serve it.
        conn = requester.connections[provider.node_id]
        with pytest.raises(RequestFailed, match=r"does not serve task function 'ad\.v1'"):
            await conn.request(direct(conn, "direct1", "ad.v1", {}))


async def test_kwargs_that_are_not_json_are_refused_clearly_and_the_session_stays(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        provider, requester = await channel_of(s, ["provider", "requester"])
        worker = await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        service = tasks_of(requester)
        with pytest.raises(
            InvalidInput, match=r"kwargs\['a'\] is a set, which is not a JSON value"
        ):
            await service.requester.request("add.v1", {"a": {1, 2}, "b": 1})
        with pytest.raises(InvalidInput, match=r"kwargs\['a'\] is nan, which JSON cannot carry"):
            await service.requester.request("add.v1", {"a": math.nan, "b": 1})
        with pytest.raises(InvalidInput, match="task kwargs must be a JSON object, not list"):
            await service.requester.request("add.v1", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="unknown task type 'pure': use one of"):
            await service.requester.request("add.v1", {}, "pure")
        # A peer that sends bytes (CBOR can carry them, JSON cannot) is told so; the session
        # goes on, since the frame itself was well formed.
        conn = requester.connections[provider.node_id]
        bad = direct(conn, "bytes1", "add.v1", {"a": b"\x00", "b": 1}, task_id="0" * 40)
        with pytest.raises(RequestFailed, match=r"kwargs\['a'\] is a bytes") as refused:
            await conn.request(bad)
        assert refused.value.code == "bad-request"
        wrong_id = direct(conn, "id1", "add.v1", {"a": 1, "b": 1}, task_id="0" * 40)
        with pytest.raises(RequestFailed, match=r"does not match add\.v1 and its kwargs"):
            await conn.request(wrong_id)
        assert not conn.closed.is_set()
        assert worker.runs["add.v1"] == 0
        assert held_results(provider) == []


async def test_a_function_that_raises_reports_its_message_and_nothing_is_cached(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        provider, requester = await channel_of(s, ["provider", "requester"])

        async def sort(threshold: float) -> float:
            if threshold < 0:
                raise ValueError(f"threshold {threshold} is negative")
            return threshold

        worker = await start_worker(s.nursery, provider, {"sort.v1": ("pure-calculation", sort)})
        await announced(requester, provider, "sort.v1")
        first = await request(requester, "sort.v1", {"threshold": -1})
        assert first.status is TaskStatus.ERROR
        assert first.error is not None
        assert first.error.startswith("ValueError: threshold -1 is negative (at test_tasks_swarm")
        assert held_results(provider) == []
        assert held_results(requester) == []
        second = await request(requester, "sort.v1", {"threshold": -1})
        assert second.status is TaskStatus.ERROR
        assert not second.cached
        assert worker.runs["sort.v1"] == 2  # errors are not cached: it ran again


async def test_a_type_mismatch_is_refused_with_the_served_type(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, requester = await channel_of(s, ["provider", "requester"])
        await start_worker(s.nursery, provider, {"add.v1": ("pure-calculation", add)})
        await announced(requester, provider, "add.v1")
        req = await request(requester, "add.v1", {"a": 1, "b": 1}, task_type="query")
        assert req.status is TaskStatus.ERROR
        assert req.error == (
            "task function 'add.v1' is served as a pure-calculation, not a query: request it"
            " with type pure-calculation"
        )


async def test_roles_are_required_to_request_and_to_provide(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, viewer = await channel_of(
            s, ["owner", "viewer"], {"viewer": "requestFiles,provideFiles"}
        )
        await start_worker(s.nursery, owner, {"add.v1": ("pure-calculation", add)})
        with pytest.raises(NotPermitted, match="lacks role requestTasks in every channel"):
            await tasks_of(viewer).requester.request("add.v1", {"a": 1, "b": 1})
        listen = tasks_of(viewer).workers.task_backend_listen(
            functions=[{"functionId": "add.v1", "type": "pure-calculation"}]
        )
        with pytest.raises(NotPermitted, match="lacks role provideTasks in every channel"):
            await listen.__anext__()
        conn = viewer.connections[owner.node_id]
        with pytest.raises(NotPermitted, match="lacks role requestTasks in channel lab"):
            await conn.request(direct(conn, "r1", "add.v1", {}))


# -- faults --------------------------------------------------------------------------------------


def first_stuck_then_quick() -> tuple[TaskFn, trio.Event]:
    """A task function whose first run (anywhere) blocks forever; later runs answer at once."""
    calls = Counter[str]()
    first_started = trio.Event()

    async def fn(x: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            first_started.set()
            await trio.sleep_forever()
        return x + 1

    return fn, first_started


async def test_a_worker_killed_mid_task_hands_it_to_the_other_provider(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        p1, p2, requester = await channel_of(s, ["p1", "p2", "requester"])
        fn, first_started = first_stuck_then_quick()
        workers = {
            p.node_id: await start_worker(s.nursery, p, {"inc.v1": ("pure-calculation", fn)})
            for p in (p1, p2)
        }
        for p in (p1, p2):
            await announced(requester, p, "inc.v1")
        req = await tasks_of(requester).requester.request("inc.v1", {"x": 41})
        with trio.fail_after(WAIT):
            await first_started.wait()
        stuck = next(w for w in workers.values() if w.runs["inc.v1"] == 1)
        stuck.stop()
        await finished(req)
        assert result_of(requester, req) == b"42"
        assert req.provider != stuck.node.node_id
        assert [w.runs["inc.v1"] for w in workers.values()] == [1, 1]
        assert any("handed back: its worker went away" in r for r in req.reasons)


async def test_a_worker_killed_with_no_other_provider_ends_in_an_error(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, requester = await channel_of(s, ["provider", "requester"])
        fn, first_started = first_stuck_then_quick()
        worker = await start_worker(s.nursery, provider, {"inc.v1": ("pure-calculation", fn)})
        await announced(requester, provider, "inc.v1")
        tasks_of(requester).requester.no_provider_seconds = 0.2
        req = await tasks_of(requester).requester.request("inc.v1", {"x": 1})
        with trio.fail_after(WAIT):
            await first_started.wait()
        worker.stop()
        await finished(req)
        assert req.status is TaskStatus.ERROR
        assert req.error is not None
        assert req.error.startswith("no member of channel lab serves task function 'inc.v1'")
        assert "handed back: its worker went away" in req.error
        assert held_results(requester) == []


async def test_a_provider_node_that_stops_mid_task_is_replaced(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        requester, p1, p2 = await channel_of(s, ["requester", "p1", "p2"])
        fn, first_started = first_stuck_then_quick()
        for p in (p1, p2):
            await start_worker(s.nursery, p, {"inc.v1": ("pure-calculation", fn)})
            await announced(requester, p, "inc.v1")
        req = await tasks_of(requester).requester.request("inc.v1", {"x": 9})
        with trio.fail_after(WAIT):
            await first_started.wait()
        assert req.provider is not None
        stuck = "p1" if req.provider == p1.node_id else "p2"
        s.stop(stuck)
        await finished(req)
        assert result_of(requester, req) == b"10"
        assert any("its session closed" in r for r in req.reasons)


async def test_a_silent_provider_loses_its_lease_and_the_next_one_runs_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with swarm(tmp_path) as s:
        requester, p1, p2 = await channel_of(s, ["requester", "p1", "p2"])
        fn, first_started = first_stuck_then_quick()
        for p in (p1, p2):
            await start_worker(s.nursery, p, {"inc.v1": ("pure-calculation", fn)})
            await announced(requester, p, "inc.v1")
        # Arguments for which p1 is every requester's first choice.
        x = next(
            x
            for x in range(100)
            if rank_providers(spec_of("inc.v1", {"x": x}).route_key, [p1.node_id, p2.node_id])[0]
            == p1.node_id
        )
        tasks_of(p1).provider.lease_seconds = 0.3  # granted in its reply: the requester follows it

        send_quietly = PeerConnection.send_quietly

        def lose_status(conn: PeerConnection, msg: Any) -> None:  # p1's news is lost
            if not (isinstance(msg, TaskStatusBatch) and conn in p1.connections.values()):
                send_quietly(conn, msg)

        monkeypatch.setattr(PeerConnection, "send_quietly", lose_status)
        req = await request(requester, "inc.v1", {"x": x})
        assert result_of(requester, req) == str(x + 1).encode()
        assert req.provider == p2.node_id
        assert req.reasons == [
            f"{p1.node_id[:16]}...: silent for a whole lease (0.3 s): lease expired"
        ]
        assert first_started.is_set()


# -- queries -------------------------------------------------------------------------------------


async def test_a_query_reruns_each_time_and_falls_back_to_its_last_result(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        readings = iter(range(1, 100))

        async def temperature(room: str) -> dict[str, Any]:
            return {"room": room, "reading": next(readings)}

        worker = await start_worker(s.nursery, provider, {"temp.v1": ("query", temperature)})
        await announced(requester, provider, "temp.v1")
        one = await request(requester, "temp.v1", {"room": "B"}, task_type="query")
        two = await request(requester, "temp.v1", {"room": "B"}, task_type="query")
        assert result_of(requester, one) == b'{"reading":1,"room":"B"}'
        assert result_of(requester, two) == b'{"reading":2,"room":"B"}'
        assert worker.runs["temp.v1"] == 2
        assert not two.cached
        s.stop("provider")
        await wait(requester, lambda: provider.node_id not in requester.connections)
        tasks_of(requester).requester.no_provider_seconds = 0.2
        fallback = await request(requester, "temp.v1", {"room": "B"}, task_type="query")
        assert fallback.status is TaskStatus.FINISHED
        assert fallback.fallback
        assert result_of(requester, fallback) == b'{"reading":2,"room":"B"}'
        never = await request(requester, "temp.v1", {"room": "C"}, task_type="query")
        assert never.status is TaskStatus.ERROR
        assert not never.fallback
        assert never.error is not None
        assert "serves task function 'temp.v1'" in never.error


async def test_a_query_times_out_on_a_stuck_provider_and_falls_back(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        stuck = trio.Event()

        async def reading(room: str) -> int:
            if stuck.is_set():
                await trio.sleep_forever()
            return 7

        await start_worker(s.nursery, provider, {"temp.v1": ("query", reading)})
        await announced(requester, provider, "temp.v1")
        await request(requester, "temp.v1", {"room": "B"}, task_type="query")
        stuck.set()
        late = await request(
            requester, "temp.v1", {"room": "B"}, task_type="query", timeout_seconds=0.5
        )
        assert late.status is TaskStatus.FINISHED
        assert late.fallback
        assert result_of(requester, late) == b"7"
        assert "timed out after 0.5 s" in late.note


# -- actions -------------------------------------------------------------------------------------


async def test_an_action_runs_once_per_request_id_even_delivered_twice_or_after_a_restart(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        notebook: list[str] = []

        async def note(text: str) -> str:
            notebook.append(text)
            return "ignored: actions only succeed or fail"

        actions = {"note.v1": ("action", note)}
        await start_worker(s.nursery, provider, actions)
        await announced(requester, provider, "note.v1")
        done = await request(
            requester, "note.v1", {"text": "probe B"}, task_type="action", request_id="n1"
        )
        assert done.status is TaskStatus.FINISHED
        assert done.result_uri is None
        assert notebook == ["probe B"]

        # The same request delivered again (a retry after a lost reply), twice at once.
        conn = requester.connections[provider.node_id]
        retry = direct(conn, "n1", "note.v1", {"text": "probe B"}, task_type="action")
        replies: list[Any] = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append(replies, conn.request(retry)))
        assert [r.status for r in replies] == ["finished", "finished"]
        assert notebook == ["probe B"]

        # The requesting node forgets it asked; asking again answers from the provider's ledger.
        tasks_of(requester).requester.requests.clear()
        again = await request(
            requester, "note.v1", {"text": "probe B"}, task_type="action", request_id="n1"
        )
        assert again.status is TaskStatus.FINISHED
        assert notebook == ["probe B"]

        # So does the provider after a restart: the ledger is in its database.
        s.stop("provider")
        await wait(requester, lambda: provider.node_id not in requester.connections)
        restarted = await s.start("provider")
        await start_worker(s.nursery, restarted, actions)
        await announced(requester, restarted, "note.v1")
        tasks_of(requester).requester.requests.clear()
        after = await request(
            requester, "note.v1", {"text": "probe B"}, task_type="action", request_id="n1"
        )
        assert after.status is TaskStatus.FINISHED
        assert notebook == ["probe B"]
        other = await request(
            requester, "note.v1", {"text": "probe B"}, task_type="action", request_id="n2"
        )
        assert other.status is TaskStatus.FINISHED
        assert notebook == ["probe B", "probe B"]
        with pytest.raises(InvalidInput, match="request ID n2 already names a request"):
            await tasks_of(requester).requester.request(
                "note.v1", {"text": "other"}, "action", request_id="n2"
            )


async def _append(into: list[Any], awaitable: Awaitable[Any]) -> None:
    into.append(await awaitable)


async def test_an_action_whose_worker_dies_while_it_runs_is_never_run_again(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        started = trio.Event()
        runs: list[str] = []

        async def launch(target: str) -> None:
            runs.append(target)
            started.set()
            await trio.sleep_forever()

        worker = await start_worker(s.nursery, provider, {"launch.v1": ("action", launch)})
        await announced(requester, provider, "launch.v1")
        req = await tasks_of(requester).requester.request(
            "launch.v1", {"target": "moon"}, "action", request_id="l1"
        )
        with trio.fail_after(WAIT):
            await started.wait()
        worker.stop()
        await finished(req)
        assert req.status is TaskStatus.ERROR
        assert req.error is not None
        assert req.error.startswith("outcome unknown")
        await start_worker(s.nursery, provider, {"launch.v1": ("action", launch)})
        await announced(requester, provider, "launch.v1")
        # Asking again after the error is a retry: it goes to the provider, whose ledger answers.
        retry = await request(
            requester, "launch.v1", {"target": "moon"}, task_type="action", request_id="l1"
        )
        assert retry is not req
        assert retry.status is TaskStatus.ERROR
        assert retry.error == req.error
        assert runs == ["moon"]


# -- status and local workers --------------------------------------------------------------------


async def test_status_goes_waiting_pending_queued_running_finished(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        requester, provider = await channel_of(s, ["requester", "provider"])
        gates = {1: trio.Event(), 2: trio.Event(), 3: trio.Event()}

        async def held(n: int) -> int:
            await gates[n].wait()
            return n

        await start_worker(s.nursery, provider, {"held.v1": ("query", held)}, slots=1)
        await announced(requester, provider, "held.v1")
        service = tasks_of(requester)
        first = await service.requester.request("held.v1", {"n": 1}, "query")
        await reached(first, TaskStatus.RUNNING)  # it holds the provider's only slot
        second = await service.requester.request("held.v1", {"n": 2}, "query")
        seen: list[str] = []

        async def watch() -> None:
            async for event in service.task_wait(second.spec.request_id):
                if isinstance(event, dict) and (not seen or seen[-1] != event["status"]):
                    seen.append(event["status"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await reached(second, TaskStatus.QUEUED)
            gates[1].set()
            await reached(second, TaskStatus.RUNNING)
            gates[2].set()
        assert (await finished(first)).status is TaskStatus.FINISHED
        assert seen[-3:] == ["queued", "running", "finished"]
        assert seen[0] in ("waiting", "pending")
        # task_outcome: the end state in one plain answer, with a small result's bytes.
        third = await service.requester.request("held.v1", {"n": 3}, "query")
        early = await service.task_outcome(third.spec.request_id, within_seconds=0)
        assert early["status"] in ("waiting", "pending", "queued", "running")
        assert "resultData" not in early
        gates[3].set()
        done = await service.task_outcome(third.spec.request_id)
        assert (done["status"], done["resultData"]) == ("finished", "Mw==")  # base64 of b"3"


async def test_a_node_serves_its_own_requests_through_its_local_worker(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        (node,) = await channel_of(s, ["solo"])
        worker = await start_worker(s.nursery, node, {"add.v1": ("pure-calculation", add)})
        req = await request(node, "add.v1", {"a": 1, "b": 2})
        assert result_of(node, req) == b"3"
        assert req.provider == node.node_id
        assert worker.runs["add.v1"] == 1
        listing = await tasks_of(node).task_list()
        assert listing["requests"][0]["requestId"] == req.spec.request_id
        status = await tasks_of(node).task_status(req.spec.task_id)
        assert status["status"] == "finished"
        providers = await tasks_of(node).task_providers()
        assert providers == [
            {
                "nodeId": node.node_id,
                "self": True,
                "channel": "lab",
                "functions": {"add.v1": "pure-calculation"},
            }
        ]


async def test_task_status_takes_the_prefix_task_list_shows_and_names_an_ambiguous_one(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        (node,) = await channel_of(s, ["solo"])
        await start_worker(s.nursery, node, {"add.v1": ("pure-calculation", add)})
        service = tasks_of(node)
        one = await request(node, "add.v1", {"a": 1, "b": 2}, request_id="deadbeef" + "0" * 24)
        two = await request(node, "add.v1", {"a": 2, "b": 2}, request_id="deadbeef" + "1" * 24)
        shown = (await service.task_list())["requests"][0]["requestId"][:12]  # as the CLI does
        assert (await service.task_status(shown))["requestId"] == two.spec.request_id
        assert (await service.task_status("deadbeef0"))["requestId"] == one.spec.request_id
        by_task = await service.task_status(one.spec.task_id[:8])
        assert (by_task["taskId"], by_task["requestId"]) == (one.spec.task_id, one.spec.request_id)
        with pytest.raises(
            InvalidInput,
            match=r"deadbeef is the start of several request or task IDs \(deadbeef0+, deadbeef1+\)"
            ": give more of the ID",
        ):
            await service.task_status("deadbeef")
        with pytest.raises(NotFound, match="no task or request deadbee known"):
            await service.task_status("deadbee")  # too short to stand for an ID
        # Once the requests are forgotten, a prefix finds the results held for a task ID.
        service.requester.requests.clear()
        held = await service.task_status(two.spec.task_id[:12])
        assert (held["taskId"], held["cached"]) == (two.spec.task_id, True)


async def test_a_worker_reports_several_jobs_in_one_call_each_checked(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        (node,) = await channel_of(s, ["solo"])
        service = tasks_of(node)
        listed = [{"functionId": "add.v1", "type": "pure-calculation"}]
        events = service.workers.task_backend_listen(functions=listed, slots=2)
        async with contextlib.aclosing(events):
            registered = await anext(events)
            assert isinstance(registered, dict)
            backend_id = registered["backendId"]
            one = await service.requester.request("add.v1", {"a": 1, "b": 2})
            two = await service.requester.request("add.v1", {"a": 2, "b": 2})
            jobs: list[Any] = [await anext(events), await anext(events)]
            jobs.sort(key=lambda job: job["kwargs"]["a"])  # the job of `one` first
            reports = []
            for job in jobs:
                data = str(job["kwargs"]["a"] + job["kwargs"]["b"]).encode()
                uri, _ = store_result(node.home, json.loads(data))
                reports.append(
                    {
                        "job_id": job["jobId"],
                        "status": "finished",
                        "result_uri": uri,
                        "result_kind": "json",
                        "result_data": base64.b64encode(data).decode(),
                    }
                )
            forged = dict(reports[1], result_data=base64.b64encode(b"5").decode())
            answers = await service.workers.task_backend_reports(
                backend_id, [reports[0], forged, {"job_id": "j-none", "status": "finished"}]
            )
            assert answers[0] == {"jobId": jobs[0]["jobId"], "status": "finished"}
            assert answers[1]["error"]["type"] == "InvalidInput"
            assert answers[2]["error"]["type"] == "NotFound"
            assert (await finished(one)).result_data == b"3"
            (answer,) = await service.workers.task_backend_reports(backend_id, [reports[1]])
            assert answer == {"jobId": jobs[1]["jobId"], "status": "finished"}
            assert (await finished(two)).result_data == b"4"


async def test_an_announcement_on_a_duplicate_session_does_not_replace_the_current_ones() -> None:
    """Two sessions with one peer for a moment (both dialed): what the one on its way out
    announces is ignored, so closing it cannot take the peer's functions with it."""

    class Membership:
        def roles_of(self, channel: str, node_id: str) -> frozenset[Role]:
            return frozenset({Role.PROVIDE_TASKS})

    class Conn:
        def __init__(self) -> None:
            self.node_id, self.channels, self.closed = "b" * 64, {"c" * 64}, trio.Event()

    class Host:
        node_id, membership = "a" * 64, Membership()

        def __init__(self) -> None:
            self.connections: dict[str, Any] = {}

        def notify(self) -> None:
            pass

    host, staying, leaving = Host(), Conn(), Conn()
    host.connections[staying.node_id] = staying
    directory = ProviderDirectory(cast(Any, host), JobBook(), lambda: None)
    announce = TaskProviders(channel="c" * 64, generation=1, functions={"f.v1": "pure-calculation"})
    await directory.on_providers(cast(Any, staying), announce)
    await directory.on_providers(cast(Any, leaving), replace(announce, functions={}))
    assert [c.node_id for c in directory.candidates("f.v1", ["c" * 64])] == [staying.node_id]
