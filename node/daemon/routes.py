"""Every peer message a node serves, in one table: its handler, and the role its sender needs.

A request or one-way message that names a channel is served only if the session serves that
channel and, where the table names a role, the sender holds it there: the node checks both
(``Node.check``, ``Node.handle_message``) before the handler runs, so no handler repeats them. A
request of a type not in the table is answered ``UNSUPPORTED``; such a one-way message is
ignored. The role the serving node itself needs (``provideFiles`` to answer a find, say) is the
handler's business: it answers "not here" rather than refusing.

Non-goal: the wire format of the messages (kachery.protocol).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kachery.protocol.channel import Role
from kachery.protocol.messages import (
    ChannelLeave,
    DocAnnounce,
    DocPush,
    DocRequest,
    DocResponse,
    Message,
    MsgType,
    PeerAnnounce,
    PeerListRequest,
    PeerListResponse,
)
from kachery.protocol.session import DataReceived

if TYPE_CHECKING:
    from kachery.node.daemon.peer import PeerConnection
    from kachery.node.services import Services

RequestHandler = Callable[["PeerConnection", Any], Awaitable[Message]]
MessageHandler = Callable[["PeerConnection", Any], Awaitable[None]]
DataHandler = Callable[["PeerConnection", DataReceived], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """How a node serves one message type.

    Attributes:
        handler: answers the request (returns its reply) or acts on the one-way message.
        role: the role the sender needs in the message's channel (None: membership suffices).

    Whether it is a request (answered with a reply or an ``ErrorReply``) is the message class's
    own: a request names its reply type (``Message.REPLY_TYPE``).
    """

    handler: RequestHandler | MessageHandler
    role: Role | None


class MembershipHandlers(Protocol):
    """The node's own handlers: membership documents, addresses, leaving."""

    async def on_doc_request(self, conn: PeerConnection, msg: DocRequest) -> DocResponse: ...
    async def on_peer_list_request(
        self, conn: PeerConnection, msg: PeerListRequest
    ) -> PeerListResponse: ...
    async def on_doc_push(self, conn: PeerConnection, msg: DocPush) -> None: ...
    async def on_doc_announce(self, conn: PeerConnection, msg: DocAnnounce) -> None: ...
    async def on_peer_announce(self, conn: PeerConnection, msg: PeerAnnounce) -> None: ...
    async def on_channel_leave(self, conn: PeerConnection, msg: ChannelLeave) -> None: ...


def peer_routes(node: MembershipHandlers, services: Services) -> dict[MsgType, Route]:
    """The table: every message type a node serves."""
    files, tasks = services.files, services.tasks
    feeds, gossip = services.feeds, services.feeds.replicator
    return {
        # membership (node/daemon/node.py)
        MsgType.DOC_REQUEST: Route(node.on_doc_request, None),
        MsgType.PEER_LIST_REQUEST: Route(node.on_peer_list_request, None),
        MsgType.DOC_PUSH: Route(node.on_doc_push, None),
        MsgType.DOC_ANNOUNCE: Route(node.on_doc_announce, None),
        MsgType.PEER_ANNOUNCE: Route(node.on_peer_announce, None),
        MsgType.CHANNEL_LEAVE: Route(node.on_channel_leave, None),
        # files (node/services/files/); data frames go to files.fetcher.on_data
        MsgType.FIND_FILE: Route(files.on_find, Role.REQUEST_FILES),
        MsgType.GET_DATA: Route(files.on_get_data, Role.REQUEST_FILES),
        MsgType.CANCEL_DATA: Route(files.on_cancel, None),
        # feeds (node/services/feeds/: gossip.py, and service.py for submissions)
        MsgType.FEED_SUBSCRIBE: Route(gossip.on_subscribe, Role.REQUEST_FEEDS),
        MsgType.FEED_GET: Route(gossip.on_get, Role.REQUEST_FEEDS),
        MsgType.FEED_SUBMIT: Route(feeds.on_submit, Role.REQUEST_FEEDS),
        MsgType.FEED_HAVE: Route(gossip.on_have, Role.PROVIDE_FEEDS),
        MsgType.FEED_PUSH: Route(gossip.on_push, Role.PROVIDE_FEEDS),
        MsgType.FEED_UNSUBSCRIBE: Route(gossip.on_unsubscribe, None),
        MsgType.FEED_PRUNE: Route(gossip.on_prune, Role.REQUEST_FEEDS),
        MsgType.FEED_GRAFT: Route(gossip.on_graft, Role.REQUEST_FEEDS),
        # tasks (node/services/tasks/); an announcement of functions needs provideTasks, an
        # empty one (withdrawing them) does not: that check is the handler's
        MsgType.TASK_REQUEST: Route(tasks.provider.on_task_request, Role.REQUEST_TASKS),
        MsgType.TASK_LOOKUP: Route(tasks.provider.on_lookup, Role.REQUEST_TASKS),
        MsgType.TASK_STATUS: Route(tasks.requester.on_status_batch, None),
        MsgType.TASK_PROVIDERS: Route(tasks.directory.on_providers, None),
        MsgType.TASK_CANCEL: Route(tasks.provider.on_cancel, None),
    }
