"""Requesting tasks: a request made on this node, followed until it ends.

``request`` checks the arguments, answers a pure calculation held here at once, and otherwise
runs the request in the background: ask the members likely to hold the result whether they do
(``TaskLookup``; fetch it with the chunk exchange), else ask the provider that rendezvous hashing
ranks first among those that announced the function, and follow its lease. The likely holders
are the other providers of the function, which computed its results; the first-ranked one answers
from its own cache when asked to run the task, and when no provider is online every member is
asked, since one of them may have fetched the result earlier. A provider that refuses, hands the
task back, goes silent for a lease or loses its session is given up on until it changes
(reconnects, or its workers change), and the next is asked; an action sticks to the provider that
may hold it. A finished result is kept here with its record, so this node answers lookups from
other members later, even when the provider is offline. A query that no provider answers within
its timeout returns its last result, marked as a fallback. Ended requests' final states are kept
in the database (KEPT_ENDED_REQUESTS), written in batches.

Non-goal: the choice of provider (kachery.protocol.tasks.choose_provider).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any, cast

import trio

from kachery.node.daemon.boundary import PerPeerSlots
from kachery.node.daemon.peer import PeerConnection, RequestFailed
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.services.files.service import FileService
from kachery.node.services.host import Host
from kachery.node.services.tasks.common import (
    DEFAULT_TIMEOUTS,
    FETCHES_AT_ONCE,
    KEEP_ENDED_SECONDS,
    KEPT_ENDED_REQUESTS,
    KEPT_REQUESTS,
    LOOKUP_SECONDS,
    MAX_TIMEOUT,
    NO_PROVIDER_SECONDS,
    REQUESTS_PER_PEER,
    RETRY_MAX_SECONDS,
    RETRY_SECONDS,
    TaskStats,
    has_role,
    log,
)
from kachery.node.services.tasks.directory import ProviderDirectory
from kachery.node.services.tasks.provider import TaskProvider
from kachery.node.services.tasks.requests import Attempt, GaveUp, Request
from kachery.node.services.tasks.results import ResultCache
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.files import MAX_GET_BYTES
from kachery.protocol.messages import ErrorCode
from kachery.protocol.task_jobs import Waiter
from kachery.protocol.tasks import (
    Candidate,
    Lease,
    ResultKind,
    StatusUpdate,
    TaskCancel,
    TaskLookup,
    TaskLookupResponse,
    TaskRequest,
    TaskRequestResponse,
    TaskSpec,
    TaskStatus,
    TaskStatusBatch,
    TaskType,
    choose_provider,
    is_inline_result,
)
from kachery.protocol.uri import ChunkOf, FileURI, parse_file_uri
from kachery.storage.errors import NotFound
from kachery.storage.tasks import TaskResult, TaskStore


class TaskRequester:
    """The requests made through this node."""

    def __init__(
        self,
        node: Host,
        store: TaskStore,
        results: ResultCache,
        provider: TaskProvider,
        directory: ProviderDirectory,
        files: FileService,
        stats: TaskStats,
    ) -> None:
        self.node = node
        self.store = store
        self.results = results
        self.provider = provider
        self.directory = directory
        self.files = files
        self.stats = stats
        self.no_provider_seconds = NO_PROVIDER_SECONDS
        self.requests: OrderedDict[str, Request] = OrderedDict()
        self._ended_queue: list[tuple[str, str, float, str]] = []
        self._keeping_ended = False
        self._peer_slots = PerPeerSlots(REQUESTS_PER_PEER)
        self._fetches = trio.Semaphore(FETCHES_AT_ONCE)

    def wake_followers(self) -> None:
        """Wake every request following a provider (sessions or workers changed)."""
        for req in list(self.requests.values()):
            if req.attempt is not None and not req.terminal:
                req.wake()

    def _request_channels(self, channel: str | None) -> list[str]:
        m, me = self.node.membership, self.node.node_id
        if channel is not None:
            channel_id = m.resolve(channel)
            if not has_role(self.node, channel_id, me, Role.REQUEST_TASKS):
                raise NotPermitted(
                    f"not permitted: this node lacks role requestTasks in channel {channel}"
                )
            return [channel_id]
        found = [c for c in m.active_channels() if has_role(self.node, c, me, Role.REQUEST_TASKS)]
        if not found:
            raise NotPermitted(
                "not permitted: this node lacks role requestTasks in every channel it is in"
            )
        return sorted(found)

    async def request(
        self,
        function_id: str,
        kwargs: dict[str, Any] | None = None,
        task_type: str = TaskType.PURE,
        *,
        channel: str | None = None,
        timeout_seconds: float | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Start a request (or find the one ``request_id`` names); returns its state, already
        finished if this node holds the result of a pure calculation.

        Raises:
            InvalidInput: the function ID, type, kwargs, timeout or request ID is malformed, or
                the request ID names another request.
            NotPermitted: this node lacks requestTasks (in ``channel``, or everywhere).
            NotFound: no such channel.
        """
        spec = TaskSpec.create(
            function_id,
            {} if kwargs is None else kwargs,
            task_type,
            request_id=request_id or os.urandom(16).hex(),
            requester=self.node.node_id,
        )
        existing = self.requests.get(spec.request_id)
        if existing is not None:
            old = existing.spec
            if (old.function_id, old.task_type, old.kwargs_digest) != (
                spec.function_id,
                spec.task_type,
                spec.kwargs_digest,
            ):
                raise InvalidInput(
                    f"request ID {spec.request_id} already names a request of"
                    f" {old.function_id}: choose a new one"
                )
            if existing.status is not TaskStatus.ERROR:
                return existing  # still running, or finished: nothing to ask again
            # A failed request asked again is a retry: ask the provider again (an action's
            # provider answers from its durable record, so it still runs at most once).
        seconds = (
            DEFAULT_TIMEOUTS[spec.task_type] if timeout_seconds is None else float(timeout_seconds)
        )
        if not (0 < seconds <= MAX_TIMEOUT and math.isfinite(seconds)):
            raise InvalidInput(f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} s")
        channels = self._request_channels(channel)
        req = Request(
            spec=spec,
            channels=channels,
            timeout=seconds,
            deadline=trio.current_time() + seconds,
            on_end=self._ended,
        )
        self._remember(req)
        self.stats.requests += 1
        if spec.task_type is TaskType.PURE:
            held = await self.results.held(spec.task_id, spec.kwargs_digest, TaskType.PURE)
            if held is not None:
                record, _, data = held
                self.stats.cache_hits += 1
                req.finish(
                    record.result_uri,
                    ResultKind(record.result_kind),
                    provider=record.source,
                    data=data,
                    cached=True,
                    note="cached on this node",
                )
                return req
        self.node.spawn(self._run_request, req)
        return req

    def _remember(self, req: Request) -> None:
        self.requests[req.spec.request_id] = req
        while len(self.requests) > KEPT_REQUESTS:
            oldest = next(iter(self.requests))
            if not self.requests[oldest].terminal:
                break
            del self.requests[oldest]

    def _ended(self, req: Request) -> None:
        """A request ended: keep its final state in the database, in the background and in
        batches (KEEP_ENDED_SECONDS; a failure to keep it costs only its history, never its
        result)."""
        spec = req.spec
        state = json.dumps(req.snapshot(self.names(), data=True))
        self._ended_queue.append((spec.request_id, spec.task_id, req.updated_at, state))
        if not self._keeping_ended:
            try:
                self.node.spawn(self._keep_ended)
            except RuntimeError:  # shutting down: its history is not kept
                return
            self._keeping_ended = True

    async def _keep_ended(self) -> None:
        try:
            await trio.sleep(KEEP_ENDED_SECONDS)  # let the requests ending meanwhile join in
            while self._ended_queue:
                batch, self._ended_queue = self._ended_queue, []
                await self.node.run_sync(self._write_ended, batch)
        finally:
            self._keeping_ended = False

    def keep_last_ended(self) -> None:
        """At exit: keep the final states that ended too late for ``_keep_ended`` (a short
        blocking write; the node is stopping)."""
        batch, self._ended_queue = self._ended_queue, []
        if batch:
            self._write_ended(batch)

    def _write_ended(self, batch: list[tuple[str, str, float, str]]) -> None:
        """Keep final states (blocking); a failure is logged: only their history is lost."""
        try:
            self.store.record_ended_requests(batch, keep=KEPT_ENDED_REQUESTS)
        except KacheryError as exc:
            log.warning("could not keep the final state of %d task requests: %s", len(batch), exc)

    async def ended_state(self, request_id: str) -> dict[str, Any] | None:
        """The kept final state of a request that ended here before (None if none is kept)."""
        state = await self.node.run_sync(self.store.ended_request, request_id)
        if state is None:
            return None
        loaded: dict[str, Any] = json.loads(state)
        return loaded

    async def _run_request(self, req: Request) -> None:
        try:
            with trio.move_on_at(req.deadline):
                await self._drive(req)
            if not req.terminal:
                reason = f"timed out after {req.timeout:g} s"
                if req.attempt is None and not self.directory.candidates(
                    req.spec.function_id, req.channels
                ):
                    reason += ": " + self._no_provider_message(req)
                await self._give_up(req, reason)
        except GaveUp as exc:
            await self._give_up(req, str(exc))
        except KacheryError as exc:
            req.fail(str(exc))
        except Exception:
            log.exception("task request %s failed", req.spec.request_id)
            req.fail("internal error in the requesting node (its log has the details)")
        finally:
            self._withdraw(req)
            if req.status is TaskStatus.ERROR:
                self.stats.errors += 1

    async def _give_up(self, req: Request, reason: str) -> None:
        """No provider answered in time: a query falls back to its last result; else an error."""
        detail = reason + ("; " + "; ".join(req.reasons[-5:]) if req.reasons else "")
        if req.spec.task_type is TaskType.QUERY:
            held = await self.results.held(req.spec.task_id, req.spec.kwargs_digest, TaskType.QUERY)
            if held is not None:
                record, _, data = held
                self.stats.fallbacks += 1
                req.finish(
                    record.result_uri,
                    ResultKind(record.result_kind),
                    provider=record.source,
                    data=data,
                    cached=True,
                    fallback=True,
                    note=f"fallback to the last result ({detail})",
                )
                return
        if req.spec.task_type is TaskType.ACTION and req.sticky is not None:
            if req.did_not_run:
                detail += "; the action did not run"
            else:
                detail += (
                    f"; its outcome is unknown: request it again with request ID"
                    f" {req.spec.request_id} to learn it from {req.sticky[:16]}..."
                )
        req.fail(detail)

    def _withdraw(self, req: Request) -> None:
        """Stop following the current attempt: the provider need not keep us posted."""
        attempt, req.attempt = req.attempt, None
        if attempt is None or (attempt.lease is not None and attempt.lease.released):
            return
        if attempt.status.terminal:
            return
        if attempt.conn is None:
            self.provider.book.leave(self.node.node_id, req.spec.request_id)
            return
        msg = TaskCancel(channel=attempt.candidate.channel, request_id=req.spec.request_id)
        attempt.conn.send_quietly(msg)

    async def _drive(self, req: Request) -> None:
        spec = req.spec
        if spec.task_type is TaskType.PURE:
            req.set(TaskStatus.WAITING, note="looking for a cached result in the channel")
            if await self._lookup(req):
                return
        no_provider_since: float | None = None
        while not req.terminal:
            now = trio.current_time()
            for node_id, (_, retry_at) in list(req.failed.items()):
                if now >= retry_at:
                    del req.failed[node_id]
            candidates = self.directory.candidates(spec.function_id, req.channels)
            failed = {n: marker for n, (marker, _) in req.failed.items()}
            chosen = choose_provider(spec.route_key, candidates, failed, req.sticky)
            if chosen is None:
                wake_at = req.deadline
                if not candidates and req.sticky is None:
                    no_provider_since = now if no_provider_since is None else no_provider_since
                    give_up_at = no_provider_since + self.no_provider_seconds
                    if now >= give_up_at:
                        raise GaveUp(self._no_provider_message(req))
                    wake_at = min(wake_at, give_up_at)
                    note = f"waiting for a member that serves {spec.function_id}"
                else:
                    no_provider_since = None
                    note = "waiting for a provider to become available"
                if req.failed:
                    wake_at = min(wake_at, *(t for _, t in req.failed.values()))
                req.set(TaskStatus.WAITING, note=note, provider=None)
                await self.directory.changed.wait(deadline=wake_at)
                continue
            no_provider_since = None
            if chosen.task_type is not spec.task_type:
                req.fail(
                    f"task function {spec.function_id!r} is served as a {chosen.task_type}, not a"
                    f" {spec.task_type}: request it with type {chosen.task_type}"
                )
                return
            reason = await self._attempt(req, chosen)
            if reason is None:
                return
            self._give_up_on(req, chosen, reason)

    def _give_up_on(self, req: Request, chosen: Candidate, reason: str) -> None:
        node_id = chosen.node_id
        count = req.failures[node_id] = req.failures.get(node_id, 0) + 1
        retry = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** (count - 1))
        req.failed[node_id] = (chosen.marker, trio.current_time() + retry)
        req.reasons.append(f"{node_id[:16]}...: {reason}")
        log.debug("task %s: gave up on %s...: %s", req.spec.request_id, node_id[:16], reason)
        attempt = req.attempt
        if (
            req.spec.task_type is TaskType.ACTION
            and attempt is not None
            and attempt.maybe_delivered
        ):
            req.sticky = node_id
            req.did_not_run = attempt.lease is not None and attempt.lease.released
        self._withdraw(req)

    def _no_provider_message(self, req: Request) -> str:
        spec = req.spec
        names = ", ".join(self.node.membership.name_of(c) for c in req.channels)
        known = self.directory.known_functions(req.channels)
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        return f"no member of channel {names} serves task function {spec.function_id!r}" + (
            f" (members serve: {shown})" if known else " (no member serves any task function)"
        )

    async def _attempt(self, req: Request, chosen: Candidate) -> str | None:
        """Ask one provider and follow it; None when the request ended, else why it did not."""
        spec = req.spec
        me = self.node.node_id
        conn = None if chosen.node_id == me else self.node.connections.get(chosen.node_id)
        if chosen.node_id != me and conn is None:
            return "not connected"
        attempt = req.attempt = Attempt(chosen, conn)
        req.set(TaskStatus.PENDING, provider=chosen.node_id, note="")
        try:
            if conn is None:
                update = await self.provider.submit(
                    spec, Waiter(me, spec.request_id, chosen.channel)
                )
                lease_ms = self.provider.lease_ms
                attempt.maybe_delivered = True
            else:
                attempt.maybe_delivered = True
                request = TaskRequest(
                    id=0,
                    channel=chosen.channel,
                    request_id=spec.request_id,
                    function_id=spec.function_id,
                    task_type=str(spec.task_type),
                    task_id=spec.task_id,
                    kwargs=spec.kwargs,
                )
                async with self._peer_slots.hold(chosen.node_id):
                    reply = await conn.request(request)
                reply = cast(TaskRequestResponse, reply)  # request() checked it
                update, lease_ms = reply.update(spec.request_id), reply.lease_ms
        except (InvalidInput, RequestFailed) as exc:
            if isinstance(exc, InvalidInput) or exc.code == ErrorCode.BAD_REQUEST:
                req.fail(f"refused by {chosen.node_id[:16]}...: {exc}")
                return None
            attempt.maybe_delivered = False
            return f"refused: {exc}"
        except (NotFound, NotPermitted) as exc:
            attempt.maybe_delivered = False
            return f"refused: {exc}"
        except Unavailable as exc:
            return f"no answer: {exc}"
        if req.attempt is not attempt:
            return "superseded"
        if spec.task_type is TaskType.PURE and update.status is TaskStatus.FINISHED:
            attempt.from_cache = True
        if attempt.lease is None:
            self.apply_update(chosen.node_id, update, lease_ms)
        else:  # a status batch overtook the reply: it is the newer news
            attempt.lease.renew(trio.current_time(), lease_ms)
        return await self._follow(req, attempt)

    def apply_update(self, provider: str, update: StatusUpdate, lease_ms: int) -> None:
        """News from ``provider`` about one of our requests (ignored unless it is the one we
        follow for that request)."""
        req = self.requests.get(update.request_id)
        if req is None or req.terminal:
            return
        attempt = req.attempt
        if attempt is None or attempt.candidate.node_id != provider:
            return
        now = trio.current_time()
        if attempt.lease is None:
            attempt.lease = Lease.granted(provider, now, lease_ms)
        else:
            attempt.lease.renew(now, lease_ms)
        if update.status is TaskStatus.PENDING:  # handed back: it will not run there
            attempt.lease.released = True
        attempt.status = update.status
        attempt.error = update.error
        attempt.result_uri = update.result_uri
        attempt.result_kind = update.result_kind
        attempt.result_size = update.result_size
        attempt.result_data = update.result_data
        if update.status in (TaskStatus.QUEUED, TaskStatus.RUNNING) and req.status != update.status:
            req.set(update.status)
        req.wake()

    async def on_status_batch(self, conn: PeerConnection, msg: TaskStatusBatch) -> None:
        for update in msg.parsed():
            self.apply_update(conn.node_id, update, msg.lease_ms)

    async def _follow(self, req: Request, attempt: Attempt) -> str | None:
        """Wait on the provider until the task ends, it hands the task back, or it is lost."""
        while True:
            lease = attempt.lease
            assert lease is not None
            if attempt.status is TaskStatus.FINISHED:
                return await self._take_result(req, attempt)
            if attempt.status is TaskStatus.ERROR:
                req.fail(attempt.error or "the task failed at its provider")
                return None
            if lease.released:
                return "handed back: " + (attempt.error or "it will not run it")
            if attempt.conn is not None and attempt.conn.closed.is_set():
                return "its session closed"
            if lease.expired(trio.current_time()):
                return f"silent for a whole lease ({lease.lease_ms / 1000:g} s): lease expired"
            await req.wait_until(lease.expires_at)

    async def _take_result(self, req: Request, attempt: Attempt) -> str | None:
        spec = req.spec
        provider = attempt.candidate.node_id
        if spec.task_type is TaskType.ACTION:
            req.finish(None, None, provider=provider)
            return None
        uri, kind = attempt.result_uri, attempt.result_kind
        if uri is None or kind is None:
            return "it finished without a result"
        data = attempt.result_data
        if provider != self.node.node_id:
            req.note = "fetching the result"
            record = TaskResult(
                task_id=spec.task_id,
                kwargs_digest=spec.kwargs_digest,
                task_type=str(spec.task_type),
                function_id=spec.function_id,
                result_uri=uri,
                result_kind=str(kind),
                source=provider,
                finished_at=time.time(),
            )
            try:
                await self._fetch_result(record, attempt.result_size, attempt.result_data)
            except NotPermitted as exc:
                req.fail(f"cannot fetch the result: {exc}")
                return None
            except KacheryError as exc:
                return f"its result could not be fetched: {exc}"
        if attempt.from_cache:
            self.stats.provider_cache_hits += 1
            note = f"cached by its provider {provider[:16]}..."
            req.finish(uri, kind, provider=provider, data=data, cached=True, note=note)
        else:
            self.stats.computed += 1
            req.finish(uri, kind, provider=provider, data=data)
        return None

    async def _fetch_result(self, record: TaskResult, size: int | None, data: bytes | None) -> None:
        """Bring a result here, and keep its record.

        A small result came inline (``data``, already checked against the URI when its message
        was decoded): its record keeps its bytes, in one transaction, with no file in the store.
        A result of one piece is fetched as the chunk that is the whole file: one verified range
        from one holder. A larger one takes the resumable, multi-source download of the chunk
        exchange.
        """
        parsed = parse_file_uri(record.result_uri)
        if data is not None:
            if not is_inline_result(data, parsed.sha1):  # the decoder checked: a bug guard
                raise Unavailable(f"the inline result of {parsed} does not match its hash")
            await self.results.save(replace(record, result_data=data))
            self.stats.results_inline += 1
            return
        target = parsed
        if size is not None and size <= MAX_GET_BYTES and parsed.manifest_sha1 is None:
            whole = ChunkOf(file_sha1=parsed.sha1, start=0, end=size)
            target = FileURI(sha1=parsed.sha1, chunk_of=whole)
        async with self._fetches:
            await self.files.download(target)
        await self.results.save(record)
        self.stats.results_fetched += 1

    def _likely_holders(self, req: Request) -> list[tuple[PeerConnection, str]]:
        """The members to ask for a cached result, each with the channel to ask in.

        The providers of the function computed its results: they are asked, except the one the
        request goes to next, which answers from its own cache when asked to run it. When no
        provider is online, every member is asked: one may hold a result it fetched earlier.
        """
        spec = req.spec
        candidates = self.directory.candidates(spec.function_id, req.channels)
        asked: list[tuple[PeerConnection, str]] = []
        if candidates:
            first = choose_provider(spec.route_key, candidates, {})
            for candidate in candidates:
                conn = self.node.connections.get(candidate.node_id)
                if conn is not None and candidate is not first:
                    asked.append((conn, candidate.channel))
            return asked
        for conn in list(self.node.connections.values()):
            shared = [c for c in req.channels if c in conn.channels]
            if shared:
                asked.append((conn, shared[0]))
        return asked

    async def _lookup(self, req: Request) -> bool:
        """Ask the likely holders whether they hold the result; fetch the first found."""
        spec = req.spec
        me = self.node.node_id
        asked = self._likely_holders(req)
        if not asked:
            return False
        found: list[tuple[str, TaskLookupResponse]] = []

        async def ask(conn: PeerConnection, channel: str, done: trio.CancelScope) -> None:
            msg = TaskLookup(
                id=0,
                channel=channel,
                task_id=spec.task_id,
                kwargs_digest=spec.kwargs_digest,
                task_type=str(spec.task_type),
            )
            try:
                async with self._peer_slots.hold(conn.node_id):
                    reply = await conn.request(msg, reply_timeout=LOOKUP_SECONDS)
            except KacheryError as exc:
                log.debug("TaskLookup to %s...: %s", conn.node_id[:16], exc)
                return
            if isinstance(reply, TaskLookupResponse) and reply.found:
                found.append((conn.node_id, reply))
                done.cancel()

        async with trio.open_nursery() as nursery:
            for conn, channel in asked:
                nursery.start_soon(ask, conn, channel, nursery.cancel_scope)
        for holder, reply in found:
            if reply.result_uri is None or reply.result_kind is None:
                continue
            record = TaskResult(
                task_id=spec.task_id,
                kwargs_digest=spec.kwargs_digest,
                task_type=str(spec.task_type),
                function_id=spec.function_id,
                result_uri=reply.result_uri,
                result_kind=reply.result_kind,
                source=holder,
                finished_at=(reply.finished_at or 0) / 1000 or time.time(),
            )
            try:
                await self._fetch_result(record, reply.result_size, reply.result_data)
            except KacheryError as exc:
                log.debug("cached result of %s not fetched: %s", spec.task_id, exc)
                continue
            self.stats.lookup_hits += 1
            req.finish(
                reply.result_uri,
                ResultKind(reply.result_kind),
                provider=holder if holder != me else None,
                data=reply.result_data,
                cached=True,
                note=f"cached by member {holder[:16]}...",
            )
            return True
        return False

    def names(self) -> dict[str, str]:
        return {c: self.node.membership.name_of(c) for c in self.node.membership.channel_ids()}

    def find(self, ident: str) -> Request | None:
        req = self.requests.get(ident)
        if req is not None:
            return req
        for candidate in reversed(self.requests.values()):
            if candidate.spec.task_id == ident:
                return candidate
        return None
