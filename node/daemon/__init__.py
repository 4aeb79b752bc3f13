"""The daemon: a node's runtime, from sockets to sessions.

node.py (the ``Node``: sessions and routing, admission, membership gossip, control methods),
transport.py (websockets), peer.py (one session: handshake, reader, writer, requests),
boundary.py (what serving one peer may raise ends that peer's session only), membership.py
(channel documents held by this node), peer_manager.py (whom to dial, backoff), wsmask.py
(websocket masking in C). Non-goal: what a request means (node/services/).
"""
