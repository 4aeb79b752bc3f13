"""The task service: requesting tasks across a channel, and providing them through local workers.

``TaskService`` builds its parts and serves the user's side of the local API (``task_request``,
``task_wait``, ``task_outcome``, ``task_status``, ``task_list``, ``task_providers``):

- provider.py (``TaskProvider``): the jobs this node runs for requesters, and their news;
- backends.py (``Workers``): the worker processes that run them, and their reports;
- directory.py (``ProviderDirectory``): who serves which function, announced and heard;
- requester.py (``TaskRequester``): requests made here, followed until they end;
- results.py (``ResultCache``): the results this node holds; requests.py and common.py: shared.

Non-goals: the wire format and the decisions (kachery.protocol.tasks), SQL
(kachery.storage.tasks), running the functions (kachery.node.client.tasks, in the worker).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.services.files.service import FileService
from kachery.node.services.tasks.backends import Workers
from kachery.node.services.tasks.common import LEASE_SECONDS, MIN_ID_PREFIX, TaskStats, has_role
from kachery.node.services.tasks.directory import ProviderDirectory
from kachery.node.services.tasks.provider import TaskProvider
from kachery.node.services.tasks.requester import TaskRequester
from kachery.node.services.tasks.results import ResultCache
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput
from kachery.protocol.tasks import TaskStatus, TaskType
from kachery.storage.errors import NotFound
from kachery.storage.tasks import TaskStore

if TYPE_CHECKING:
    from kachery.node.services.host import Host


class TaskService:
    """Tasks for one node: the requester and the provider sides (see the module docstring).

    Args:
        node: the node.
        files: the node's file service (results travel as files).
        lease_seconds: the lease this node holds on tasks it takes (tests shorten it).
    """

    name = "tasks"

    def __init__(
        self, node: Host, files: FileService, *, lease_seconds: float = LEASE_SECONDS
    ) -> None:
        self.node = node
        self.files = files
        self.store = TaskStore(node.home.database)
        self.stats = TaskStats()
        self.results = ResultCache(node, self.store)
        self.provider = TaskProvider(
            node,
            self.store,
            self.results,
            self.stats,
            lambda *update: self.requester.apply_update(*update),
            lease_seconds=lease_seconds,
        )
        self.directory = ProviderDirectory(
            node, self.provider.book, lambda: self.requester.wake_followers()
        )
        self.workers = Workers(
            node, self.store, self.provider, self.results, self.directory.updated
        )
        self.requester = TaskRequester(
            node, self.store, self.results, self.provider, self.directory, files, self.stats
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce, flush status updates and renew leases until cancelled."""
        await self.results.load()
        self.files.kept_elsewhere.append(self.results.kept_bytes)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.directory.watch)
                nursery.start_soon(self.provider.flush_updates)
                nursery.start_soon(self.provider.renew_leases)
                task_status.started()
        finally:
            self.requester.keep_last_ended()

    async def _ended_or_not_found(self, request_id: str) -> dict[str, Any]:
        """The kept final state of a request no longer in memory.

        Raises:
            NotFound: no request with that ID ended here (among the newest KEPT_ENDED_REQUESTS),
                and none is running.
        """
        state = await self.requester.ended_state(request_id)
        if state is None:
            raise NotFound(f"no task request {request_id} on this node")
        return state

    def _deadline(self, within_seconds: float | None) -> float:
        return math.inf if within_seconds is None else trio.current_time() + within_seconds

    async def _full_id(self, ident: str) -> str:
        """The request or task ID that ``ident`` names: itself, or the one ID (among requests
        made here, in memory or kept since they ended, and results held here) that it is a
        prefix of, if at least MIN_ID_PREFIX characters long (``task list`` shows prefixes).
        Unmatched, ``ident`` is returned as is.

        Raises:
            InvalidInput: ``ident`` is a prefix of several IDs.
        """
        if len(ident) < MIN_ID_PREFIX:
            return ident
        found = {
            i
            for r in self.requester.requests.values()
            for i in (r.spec.request_id, r.spec.task_id)
            if i.startswith(ident)
        }
        found.update(await self.node.run_sync(self.store.ids_starting, ident))
        if ident in found:
            return ident
        if len(found) == 1:
            return found.pop()
        if found:
            shown = ", ".join(sorted(found)[:5]) + (", ..." if len(found) > 5 else "")
            raise InvalidInput(
                f"{ident} is the start of several request or task IDs ({shown}):"
                " give more of the ID"
            )
        return ident

    @exposed
    async def task_request(
        self,
        function_id: str,
        kwargs: dict[str, Any] | None = None,
        task_type: str = TaskType.PURE,
        channel: str | None = None,
        timeout_seconds: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Start a task request (answered at once if its result is cached here); returns its
        state. Follow it with ``task_wait``."""
        req = await self.requester.request(
            function_id,
            kwargs,
            task_type,
            channel=channel,
            timeout_seconds=timeout_seconds,
            request_id=request_id,
        )
        return req.snapshot(self.requester.names(), data=True)

    @exposed
    async def task_wait(
        self, request_id: str, within_seconds: float | None = None, changes: bool = True
    ) -> AsyncIterator[dict[str, Any] | StreamResult]:
        """Stream a request's state each time it changes (unless ``changes`` is false), until it
        ends (or ``within_seconds`` pass); the result is its last state."""
        req = self.requester.requests.get(request_id)
        if req is None:
            yield StreamResult(await self._ended_or_not_found(request_id))
            return
        names = self.requester.names()
        deadline = self._deadline(within_seconds)
        shown: tuple[Any, ...] | None = None
        while True:
            state = (req.status, req.provider, req.note)
            if state != shown and changes:
                shown = state
                yield req.snapshot(names, kwargs=False)
            if req.terminal or trio.current_time() >= deadline:
                break
            await req.wait_until(deadline)
        yield StreamResult(req.snapshot(names, data=True))

    @exposed
    async def task_outcome(
        self, request_id: str, within_seconds: float | None = None
    ) -> dict[str, Any]:
        """A request's state once it ends (or once ``within_seconds`` pass): ``task_wait``
        without its events, answered as one plain reply."""
        req = self.requester.requests.get(request_id)
        if req is None:
            return await self._ended_or_not_found(request_id)
        deadline = self._deadline(within_seconds)
        while not req.terminal and trio.current_time() < deadline:
            await req.wait_until(deadline)
        return req.snapshot(self.requester.names(), data=True)

    @exposed
    async def task_status(self, task: str) -> dict[str, Any]:
        """The state of a request (by request ID, or the newest with a task ID), else the results
        this node holds for a task ID; a unique prefix of either ID will do."""
        task = await self._full_id(task)
        req = self.requester.find(task)
        if req is not None:
            return req.snapshot(self.requester.names(), data=True)
        ended = await self.requester.ended_state(task)
        if ended is not None:
            return ended
        held = await self.node.run_sync(self.store.results_for, task)
        if held:
            newest = held[0]
            return {
                "taskId": newest.task_id,
                "functionId": newest.function_id,
                "taskType": newest.task_type,
                "status": str(TaskStatus.FINISHED),
                "cached": True,
                "fallback": False,
                "error": None,
                "resultUri": newest.result_uri,
                "resultKind": newest.result_kind,
                "provider": newest.source,
                "finishedAt": newest.finished_at,
                "results": len(held),
            }
        raise NotFound(f"no task or request {task} known on this node")

    @exposed
    async def task_list(self, limit: int = 50) -> dict[str, Any]:
        """Recent requests made here (newest first), and the jobs this node runs for others."""
        names = self.requester.names()
        limit = max(0, limit)
        requests = [
            r.snapshot(names, kwargs=False) for r in reversed(self.requester.requests.values())
        ]
        if len(requests) < limit:  # then those that ended before the daemon last started
            shown = {r["requestId"] for r in requests}
            for text in await self.node.run_sync(self.store.ended_requests, limit):
                state = json.loads(text)
                if state["requestId"] not in shown:
                    state.pop("kwargs", None)
                    state.pop("resultData", None)
                    requests.append(state)
            requests.sort(key=lambda r: -float(r["createdAt"]))
        jobs = [
            {
                "jobId": job.job_id,
                "functionId": job.spec.function_id,
                "taskType": str(job.spec.task_type),
                "taskId": job.spec.task_id,
                "status": str(job.status),
                "waiters": len(job.waiters),
                "requesters": sorted({w.node_id for w in job.waiters.values()}),
            }
            for job in self.provider.book.jobs.values()
        ]
        return {"requests": requests[:limit], "jobs": jobs}

    @exposed
    async def task_providers(self) -> list[dict[str, Any]]:
        """Members that serve task functions (this node included), per channel."""
        me = self.node.node_id
        out = []
        for channel in self.node.membership.active_channels():
            if has_role(self.node, channel, me, Role.PROVIDE_TASKS):
                functions = self.provider.book.functions_in(channel)
                if functions:
                    out.append(
                        {
                            "nodeId": me,
                            "self": True,
                            "channel": self.node.membership.name_of(channel),
                            "functions": {f: str(t) for f, t in functions.items()},
                        }
                    )
        for (node_id, channel), announced in sorted(self.directory.remote.items()):
            if announced.functions and self.node.connections.get(node_id) is announced.conn:
                out.append(
                    {
                        "nodeId": node_id,
                        "self": False,
                        "channel": self.node.membership.name_of(channel),
                        "functions": {f: str(t) for f, t in announced.functions.items()},
                    }
                )
        return out

    def statistics(self) -> dict[str, Any]:
        """Counters for ``kachery-node status``."""
        active = sum(1 for r in self.requester.requests.values() if not r.terminal)
        return {
            "requests": self.stats.requests,
            "activeRequests": active,
            "cacheHits": self.stats.cache_hits,
            "lookupHits": self.stats.lookup_hits,
            "providerCacheHits": self.stats.provider_cache_hits,
            "computed": self.stats.computed,
            "fallbacks": self.stats.fallbacks,
            "errors": self.stats.errors,
            "jobsRun": self.stats.jobs_run,
            "jobsAnsweredFromCache": self.stats.jobs_answered_from_cache,
            "lookupsAnswered": self.stats.lookups_answered,
            "resultsInline": self.stats.results_inline,
            "resultsFetched": self.stats.results_fetched,
            **self.provider.book.statistics(),
            "leaseSeconds": self.provider.lease_seconds,
        }
