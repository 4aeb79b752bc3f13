"""Task rules without sockets: IDs, checks, the choice of provider, leases, the status table, the
provider's book of jobs, and the task messages."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kachery.protocol.errors import InvalidInput, LocalProtocolError, RemoteProtocolError
from kachery.protocol.messages import decode_message, encode_message
from kachery.protocol.task_jobs import JobBook, Waiter
from kachery.protocol.tasks import (
    INLINE_RESULT_BYTES,
    MAX_KWARGS_BYTES,
    TRANSITIONS,
    Candidate,
    Lease,
    ResultKind,
    StatusUpdate,
    TaskCancel,
    TaskLookup,
    TaskLookupResponse,
    TaskProviders,
    TaskRequest,
    TaskRequestResponse,
    TaskSpec,
    TaskStatus,
    TaskStatusBatch,
    TaskType,
    advance,
    choose_provider,
    rank_providers,
)

from .conftest import load_vectors

C = "c" * 64
A, B, R = "a" * 64, "b" * 64, "e" * 64


def spec(
    function_id: str = "f.v1",
    kwargs: dict[str, Any] | None = None,
    task_type: str = "pure-calculation",
    request_id: str = "r1",
    requester: str = R,
) -> TaskSpec:
    return TaskSpec.create(
        function_id, kwargs or {}, task_type, request_id=request_id, requester=requester
    )


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("ascii")).hexdigest()


# -- IDs -----------------------------------------------------------------------------------------

# Written out by hand from kachery-client's rule (sorted keys, compact separators, ASCII escapes,
# integral floats as ints, other floats as null); no kachery-node code builds these strings.
INDEPENDENT = [
    ("spikesort.v1", {"recording": "sha1://ab", "threshold": 5.0}),
    ("f.v1", {}),
    ("f.v1", {"b": [1.0, 2.5, {"z": 3.0, "a": None}], "a": True}),
    ("unicode.v1", {"name": "\u00e9l\u00e8ve \u2603"}),
    ("nested.v1", {"x": {"y": {"z": [[], {}, -0.0, 1e20]}}}),
]
EXPECTED_TEXT = [
    '{"functionId":"spikesort.v1","kwargs":{"recording":"sha1://ab","threshold":5}}',
    '{"functionId":"f.v1","kwargs":{}}',
    '{"functionId":"f.v1","kwargs":{"a":true,"b":[1,null,{"a":null,"z":3}]}}',
    '{"functionId":"unicode.v1","kwargs":{"name":"\\u00e9l\\u00e8ve \\u2603"}}',
    '{"functionId":"nested.v1","kwargs":{"x":{"y":{"z":[[],{},0,100000000000000000000]}}}}',
]


@pytest.mark.parametrize(
    ("call", "text"), list(zip(INDEPENDENT, EXPECTED_TEXT, strict=True)), ids=lambda v: str(v)[:30]
)
def test_task_ids_match_an_independent_derivation(
    call: tuple[str, dict[str, Any]], text: str
) -> None:
    function_id, kwargs = call
    assert spec(function_id, kwargs).task_id == sha1(text)


@pytest.mark.parametrize(
    "vector", load_vectors("kachery-client-1.2.0.json")["taskHash"], ids=lambda v: v["functionId"]
)
def test_task_ids_match_kachery_client(vector: dict[str, Any]) -> None:
    assert spec(vector["functionId"], vector["kwargs"]).task_id == vector["taskHash"]


def test_the_exact_digest_separates_what_the_task_id_collapses() -> None:
    low, high = spec(kwargs={"t": 5.5}), spec(kwargs={"t": 6.5})
    assert low.task_id == high.task_id
    assert low.kwargs_digest != high.kwargs_digest
    assert low.job_key != high.job_key
    assert spec(kwargs={"t": 2.0}).kwargs_digest == spec(kwargs={"t": 2}).kwargs_digest
    assert low.kwargs_digest == sha1('{"functionId":"f.v1","kwargs":{"t":5.5}}')


def test_job_and_route_keys_follow_the_task_type() -> None:
    one = spec(request_id="r1", requester=A)
    other = spec(request_id="r2", requester=B)
    assert one.job_key == other.job_key  # a pure calculation runs once for everyone
    assert one.route_key == other.route_key
    q1, q2 = spec(task_type="query", request_id="r1"), spec(task_type="query", request_id="r2")
    assert q1.job_key != q2.job_key  # a query runs per request...
    assert q1.route_key == q2.route_key  # ...at the same provider
    a1, a2 = spec(task_type="action", request_id="r1"), spec(task_type="action", request_id="r2")
    assert a1.job_key != a2.job_key
    assert a1.route_key != a2.route_key  # an action goes where its request ID leads
    assert spec(task_type="action", requester=A).job_key != spec(task_type="action").job_key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a": {1, 2}}, r"kwargs\['a'\] is a set, which is not a JSON value"),
        ({"a": b"x"}, r"kwargs\['a'\] is a bytes"),
        ({"a": float("inf")}, r"kwargs\['a'\] is inf, which JSON cannot carry"),
        ({"a": {1: 2}}, r"kwargs\['a'\] has a key 1 that is not a string"),
        ([1], "task kwargs must be a JSON object, not list"),
        ({"a": "x" * MAX_KWARGS_BYTES}, "pass large data as a file URI"),
    ],
)
def test_kwargs_that_json_cannot_carry_are_named(kwargs: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        TaskSpec.create("f.v1", kwargs, "query", request_id="r", requester=R)


@pytest.mark.parametrize(
    ("function_id", "task_type", "request_id", "message"),
    [
        ("", "query", "r", "non-empty string"),
        ("has space", "query", "r", "may hold only letters"),
        ("x" * 201, "query", "r", "longer than 200"),
        ("f.v1", "pure", "r", "unknown task type 'pure': use one of pure-calculation, query"),
        ("f.v1", "query", "", "request ID '' is not"),
        ("f.v1", "query", "a/b", "request ID 'a/b' is not"),
    ],
)
def test_malformed_parts_are_refused(
    function_id: str, task_type: str, request_id: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        TaskSpec.create(function_id, {}, task_type, request_id=request_id, requester=R)


# -- choosing a provider -------------------------------------------------------------------------


def test_rendezvous_ranking_is_deterministic_and_order_free() -> None:
    nodes = [f"{i:064x}" for i in range(5)]
    ranked = rank_providers("key", nodes)
    assert ranked == rank_providers("key", list(reversed(nodes)))
    assert sorted(ranked) == sorted(nodes)
    # Removing a provider that is not first leaves the first choice alone.
    assert rank_providers("key", [n for n in nodes if n != ranked[-1]])[0] == ranked[0]


def test_rendezvous_spreads_tasks_over_providers() -> None:
    firsts = Counter(rank_providers(f"task-{i}", [A, B])[0] for i in range(1000))
    assert 400 < firsts[A] < 600


def candidates(*markers: tuple[str, tuple[int, int]]) -> list[Candidate]:
    return [Candidate(n, C, TaskType.PURE, m) for n, m in markers]


def test_choose_skips_providers_given_up_on_until_they_change() -> None:
    order = rank_providers("k", [A, B])
    first, second = order
    now = candidates((A, (1, 1)), (B, (2, 1)))
    assert choose_provider("k", now, {}) == next(c for c in now if c.node_id == first)
    marker = next(c.marker for c in now if c.node_id == first)
    chosen = choose_provider("k", now, {first: marker})
    assert chosen is not None
    assert chosen.node_id == second
    assert choose_provider("k", now, {A: (1, 1), B: (2, 1)}) is None
    # The first reconnected (new session serial): worth asking again.
    changed = [
        Candidate(c.node_id, c.channel, c.task_type, (9, 1)) if c.node_id == first else c
        for c in now
    ]
    again = choose_provider("k", changed, {A: (1, 1), B: (2, 1)})
    assert again is not None
    assert again.node_id == first


def test_an_action_sticks_to_its_provider() -> None:
    now = candidates((A, (1, 1)), (B, (2, 1)))
    stuck = choose_provider("k", now, {}, sticky=B)
    assert stuck is not None
    assert stuck.node_id == B
    assert choose_provider("k", now, {B: (2, 1)}, sticky=B) is None
    assert choose_provider("k", candidates((A, (1, 1))), {}, sticky=B) is None


def test_a_lease_expires_unless_renewed_and_a_hand_back_ends_it() -> None:
    lease = Lease.granted(A, now=100.0, lease_ms=3000)
    assert not lease.expired(102.9)
    assert lease.expired(103.0)
    lease.renew(102.0, 3000)
    assert not lease.expired(104.9)
    lease.renew(101.0, 1000)  # a stale, shorter renewal never shortens it
    assert not lease.expired(104.9)
    assert lease.lease_ms == 1000
    lease.renew(104.0, 0)
    assert lease.released
    assert lease.expired(104.0)


def test_finished_and_failed_are_final_and_nothing_runs_before_it_is_sent() -> None:
    for status in TaskStatus:
        assert status in TRANSITIONS
    for final in (TaskStatus.FINISHED, TaskStatus.ERROR):
        assert TRANSITIONS[final] == frozenset()
        with pytest.raises(LocalProtocolError, match=f"from {final} to waiting"):
            advance(final, TaskStatus.WAITING)
    with pytest.raises(LocalProtocolError):
        advance(TaskStatus.WAITING, TaskStatus.RUNNING)
    assert advance(TaskStatus.RUNNING, TaskStatus.QUEUED) is TaskStatus.QUEUED  # a worker died


# -- the provider's book -------------------------------------------------------------------------


def book_with(*backends: tuple[str, dict[str, TaskType], int]) -> JobBook:
    book = JobBook()
    for backend_id, functions, slots in backends:
        book.add_backend(backend_id, functions, slots=slots)
    return book


def test_ten_requests_for_one_pure_calculation_are_one_job() -> None:
    book = book_with(("w1", {"f.v1": TaskType.PURE}, 2))
    jobs = set()
    for i in range(10):
        job, created = book.join(
            spec(request_id=f"r{i}", requester=A if i % 2 else B), Waiter(A, f"r{i}", C)
        )
        assert created == (i == 0)
        if created:
            book.enqueue(job)
        jobs.add(job.job_id)
    assert len(jobs) == 1
    [(backend, job)] = book.assign()
    assert (backend.backend_id, len(job.waiters), job.status) == ("w1", 10, TaskStatus.RUNNING)
    done = book.complete(job.job_id, TaskStatus.FINISHED, result_uri="sha1://" + "1" * 40)
    assert done.status is TaskStatus.FINISHED
    assert book.jobs == {}
    assert book.by_key == {}


def test_the_book_counts_each_requesters_waiting_requests_until_they_end() -> None:
    book = book_with(("w1", {"f.v1": TaskType.QUERY}, 1))
    for i in range(3):
        job, _ = book.join(
            spec(request_id=f"r{i}", task_type=TaskType.QUERY, kwargs={"i": i}),
            Waiter(A, f"r{i}", C),
        )
        book.enqueue(job)
    book.join(
        spec(request_id="r0", task_type=TaskType.QUERY, kwargs={"i": 0}), Waiter(A, "r0", C)
    )  # again: one request
    book.join(spec(request_id="b0", task_type=TaskType.QUERY, kwargs={"i": 0}), Waiter(B, "b0", C))
    assert book.waiting == {A: 3, B: 1}
    assert book.leave(A, "r2") is not None  # a queued query nobody waits for is dropped
    assert book.waiting == {A: 2, B: 1}
    [(_, running)] = book.assign()
    book.complete(running.job_id, TaskStatus.FINISHED, result_uri="sha1://" + "1" * 40)
    assert book.waiting == {A: 1, B: 1}


def test_jobs_wait_for_a_free_slot_of_a_worker_that_serves_them() -> None:
    book = book_with(("w1", {"f.v1": TaskType.QUERY}, 1), ("w2", {"g.v1": TaskType.QUERY}, 1))
    jobs = []
    for i, fid in enumerate(["f.v1", "f.v1", "g.v1"]):
        job, _ = book.join(spec(fid, task_type="query", request_id=f"r{i}"), Waiter(R, f"r{i}", C))
        book.enqueue(job)
        jobs.append(job)
    assigned = [(b.backend_id, j.job_id) for b, j in book.assign()]
    assert assigned == [("w1", jobs[0].job_id), ("w2", jobs[2].job_id)]
    assert jobs[1].status is TaskStatus.QUEUED
    assert book.assign() == []
    book.complete(jobs[0].job_id, TaskStatus.ERROR, error="boom")
    assert [(b.backend_id, j.job_id) for b, j in book.assign()] == [("w1", jobs[1].job_id)]


def test_a_lost_worker_requeues_hands_back_or_loses_its_jobs() -> None:
    book = book_with(
        ("w1", {"f.v1": TaskType.PURE, "act.v1": TaskType.ACTION}, 4),
        ("w2", {"f.v1": TaskType.PURE}, 1),
    )
    pure, _ = book.join(spec("f.v1", request_id="p"), Waiter(R, "p", C))
    action, _ = book.join(spec("act.v1", task_type="action", request_id="a"), Waiter(R, "a", C))
    queued_action, _ = book.join(
        spec("act.v1", task_type="action", request_id="q"), Waiter(R, "q", C)
    )
    for job in (pure, action):
        book.enqueue(job)
    assert {j.job_id for _, j in book.assign()} == {pure.job_id, action.job_id}
    action.delivered = True
    book.enqueue(queued_action)
    book.backends["w1"].slots = 2  # full: the second action waits in the queue
    generation = book.generation
    loss = book.remove_backend("w1")
    assert book.generation == generation + 1
    assert [j.job_id for j in loss.requeued] == [pure.job_id]  # w2 serves f.v1
    assert [j.job_id for j in loss.lost] == [action.job_id]  # it may have run: unknown
    assert [j.job_id for j in loss.released] == [queued_action.job_id]  # never ran
    assert queued_action.released
    assert queued_action.update_for("q").status is TaskStatus.PENDING
    assert [(b.backend_id, j.job_id) for b, j in book.assign()] == [("w2", pure.job_id)]
    assert book.functions_in(C) == {"f.v1": TaskType.PURE}


def test_a_job_whose_outcome_is_being_recorded_survives_its_worker() -> None:
    book = book_with(("w1", {"f.v1": TaskType.PURE}, 1))
    job, _ = book.join(spec(), Waiter(R, "r1", C))
    book.enqueue(job)
    book.assign()
    job.reporting = True
    loss = book.remove_backend("w1")
    assert (loss.requeued, loss.released, loss.lost) == ([], [], [])
    assert book.complete(job.job_id, TaskStatus.FINISHED).status is TaskStatus.FINISHED


def test_a_query_nobody_waits_for_is_dropped_before_it_runs() -> None:
    book = JobBook()
    job, _ = book.join(spec(task_type="query"), Waiter(R, "r1", C))
    book.enqueue(job)
    assert book.leave(R, "r1") is job
    assert book.jobs == {}
    assert not book.queue
    pure, _ = book.join(spec(), Waiter(R, "r2", C))
    book.enqueue(pure)
    assert book.leave(R, "r2") is None  # a pure result is worth computing: it will be cached
    assert pure.job_id in book.jobs


def test_workers_may_be_limited_to_channels() -> None:
    book = JobBook()
    book.add_backend("w1", {"f.v1": TaskType.PURE}, channels=[C], slots=1)
    assert book.serves("f.v1", C) is TaskType.PURE
    assert book.serves("f.v1", "d" * 64) is None
    job, _ = book.join(spec(), Waiter(R, "r1", "d" * 64))
    book.enqueue(job)
    assert book.assign() == []
    assert book.unservable() == [job]


# -- messages ------------------------------------------------------------------------------------

H = "0123456789abcdef0123456789abcdef01234567"


def test_status_updates_round_trip_and_are_checked() -> None:
    update = StatusUpdate(
        request_id="r1",
        status=TaskStatus.FINISHED,
        result_uri=f"sha1://{H}",
        result_kind=ResultKind.JSON,
        result_size=17,
    )
    assert StatusUpdate.from_wire(update.to_wire()) == update
    batch = TaskStatusBatch(channel=C, lease_ms=30000, updates=[update.to_wire()])
    decoded = decode_message(encode_message(batch))
    assert isinstance(decoded, TaskStatusBatch)
    assert decoded.parsed() == [update]
    for wire, message in [
        ({"requestId": "r1", "status": "done"}, "task status 'done' is not one of"),
        ({"requestId": "r1", "status": "finished", "resultUri": f"sha1://{H}"}, "come together"),
        (
            {
                "requestId": "r1",
                "status": "finished",
                "resultUri": f"sha1://{H}",
                "resultKind": "json",
                "resultSize": -1,
            },
            "resultSize -1 is out of range",
        ),
        ({"requestId": "r1", "status": "error", "error": 5}, "a task error is a string"),
        ({"status": "queued"}, "lacks its requestId"),
        ({"requestId": "r1", "status": "queued", "extra": 1}, "is {requestId, status"),
    ]:
        with pytest.raises(RemoteProtocolError, match=message):
            TaskStatusBatch(channel=C, lease_ms=1, updates=[wire])
    with pytest.raises(RemoteProtocolError, match="over 500 updates"):
        TaskStatusBatch(channel=C, lease_ms=1, updates=[update.to_wire()] * 501)


def test_an_inline_result_must_hash_to_its_uri_and_stay_small() -> None:
    data = b'{"unit-1":1.33}'
    uri = "sha1://" + hashlib.sha1(data).hexdigest()
    inline = StatusUpdate(
        request_id="r1",
        status=TaskStatus.FINISHED,
        result_uri=uri,
        result_kind=ResultKind.JSON,
        result_size=len(data),
        result_data=data,
    )
    assert StatusUpdate.from_wire(inline.to_wire()) == inline
    forged = {**inline.to_wire(), "resultData": b'{"unit-1":9.99}'}
    big = b"x" * (INLINE_RESULT_BYTES + 1)
    oversized = {
        **inline.to_wire(),
        "resultUri": "sha1://" + hashlib.sha1(big).hexdigest(),
        "resultSize": len(big),
        "resultData": big,
    }
    for wire, message in [
        (forged, "does not hash to its resultUri"),
        ({**inline.to_wire(), "resultSize": len(data) + 1}, "resultSize of them"),
        (oversized, f"over {INLINE_RESULT_BYTES} bytes"),
        ({"requestId": "r1", "status": "finished", "resultData": data}, "resultSize of them"),
    ]:
        with pytest.raises(RemoteProtocolError, match=message):
            TaskStatusBatch(channel=C, lease_ms=1, updates=[wire])
    with pytest.raises(RemoteProtocolError, match="does not hash"):
        TaskLookupResponse(
            id=1,
            found=True,
            result_uri=f"sha1://{H}",
            result_kind="json",
            result_size=len(data),
            result_data=data,
        )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TaskRequest(**{**REQUEST, "task_id": "xyz"}), "taskId is not 40"),
        (lambda: TaskRequest(**{**REQUEST, "task_type": "pure"}), "'pure' is not a task type"),
        (lambda: TaskRequest(**{**REQUEST, "function_id": "a b"}), "may hold only"),
        (lambda: TaskRequestResponse(id=1, status="done", lease_ms=1), "is not a task status"),
        (lambda: TaskRequestResponse(id=1, status="queued", lease_ms=-1), "leaseMs -1"),
        (lambda: TaskProviders(channel=C, generation=1, functions={"f": "x"}), "not a task type"),
        (lambda: TaskLookup(**{**LOOKUP, "task_type": "action"}), "actions have no cached"),
        (lambda: TaskCancel(channel=C, request_id="?"), "request ID '\\?' is not"),
    ],
)
def test_malformed_task_messages_are_refused(build: Any, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        build()


REQUEST: dict[str, Any] = {
    "id": 1,
    "channel": C,
    "request_id": "r1",
    "function_id": "f.v1",
    "task_type": "pure-calculation",
    "task_id": H,
    "kwargs": {"a": 1},
}
LOOKUP: dict[str, Any] = {
    "id": 2,
    "channel": C,
    "task_id": H,
    "kwargs_digest": H,
    "task_type": "pure-calculation",
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(kwargs=st.dictionaries(st.text(max_size=8), json_values, max_size=4))
def test_task_requests_round_trip_through_the_codec(kwargs: dict[str, Any]) -> None:
    msg = TaskRequest(**{**REQUEST, "kwargs": kwargs})
    assert decode_message(encode_message(msg)) == msg
