"""The daemon: a node's runtime, from sockets to sessions.

- node.py: the ``Node``, sessions and admission, routing, membership gossip, dialing;
- routes.py: the one table of peer messages, their handlers and the roles their senders need;
- control.py: the node's own local-API methods (``status``, ``peers``, ``channel_*``);
- process.py: ``kachery-node start`` (lock, signals, the local API beside the node);
- addresses.py: members' signed address announcements;
- membership.py: the channel documents this node holds;
- peer.py: one session (handshake, reader, writer, requests); transport.py: websockets;
- boundary.py: what serving one peer may raise ends that peer's session only;
- peer_manager.py: whom to dial, and backoff; wsmask.py: websocket masking in C.

Non-goal: what a request means (node/services/).
"""
