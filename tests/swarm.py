"""Swarms of real nodes in one Trio loop, for tests: real websockets on 127.0.0.1, separate homes.

Tests wait on ``Node.wait_until`` (woken by state changes), with a generous ``fail_after`` so a
broken build fails instead of hanging; ``until`` polls only what wakes no node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from kachery.node.daemon.control import NodeControl
from kachery.node.daemon.node import Node
from kachery.node.home import NodeHome

WAIT = 20  # seconds: a safety net, never a pacing device


class Swarm:
    def __init__(self, nursery: trio.Nursery, base: Path) -> None:
        self.nursery = nursery
        self.base = base
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str, **options: Any) -> Node:
        home, _ = NodeHome.init(self.base / name)
        node = Node(home, listen_host="127.0.0.1", listen_port=0, **options)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(run)
        self.scopes[name] = scope
        return node

    def stop(self, name: str) -> None:
        self.scopes.pop(name).cancel()


@asynccontextmanager
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    async with trio.open_nursery() as nursery:
        yield Swarm(nursery, tmp_path)
        nursery.cancel_scope.cancel()


async def wait(node: Node, predicate: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        await node.wait_until(predicate)


async def until(holds: Callable[[], bool], seconds: float = WAIT) -> None:
    """Poll ``holds`` every 10 ms until it does: only for state that wakes no node (another
    process's progress, a row written in the background)."""
    with trio.fail_after(seconds):
        while not holds():  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.01)


async def lab(s: Swarm, roles: str = "all") -> tuple[Node, Node, Node, str]:
    """An owner and two members who joined by invite."""
    owner = await s.start("owner")
    info = await control(owner).channel_create("lab")
    channel = info["channelId"]
    a = await s.start("a")
    b = await s.start("b")
    for node in (a, b):
        token = (await control(owner).channel_invite("lab", roles.split(",")))["token"]
        await control(node).channel_join(token)
    return owner, a, b, channel


async def channel_of(
    s: Swarm,
    names: list[str],
    roles: dict[str, str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[Node]:
    """The first node creates channel 'lab'; the others join with the given roles (default all)."""
    roles = roles or {}
    options = options or {}
    first = await s.start(names[0], **options.get(names[0], {}))
    await control(first).channel_create("lab")
    nodes = [first]
    for name in names[1:]:
        node = await s.start(name, **options.get(name, {}))
        token = (await control(first).channel_invite("lab", roles.get(name, "all").split(",")))[
            "token"
        ]
        await control(node).channel_join(token)
        nodes.append(node)
    for node in nodes:
        others = {n.node_id for n in nodes if n is not node}
        await wait(node, lambda node=node, others=others: others <= set(node.connections))
    return nodes


def control(node: Node) -> NodeControl:
    """The node's control methods (what the local API serves for it)."""
    return NodeControl(node)
