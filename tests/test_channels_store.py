"""The channel store under concurrent writers (worker threads share one database)."""

from __future__ import annotations

import os
import threading

from kachery.node.home import NodeHome
from kachery.protocol.channel import Announcement
from kachery.protocol.identity import KeyPair


def test_a_session_and_an_announcement_for_a_new_peer_at_once_never_collide(
    home: NodeHome,
) -> None:
    """mark_connected and save_announcement both create a peer's row: racing, one used to fail
    with IntegrityError (UNIQUE peers.node_id) and the announcement was dropped."""
    channels = home.channels
    errors: list[BaseException] = []
    peers = [KeyPair(os.urandom(32)) for _ in range(30)]

    def run(fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = []
    for peer in peers:
        announcement = Announcement.create(peer, ["ws://10.0.0.1:20432"], 1000)
        threads.append(
            threading.Thread(target=run, args=(lambda p=peer: channels.mark_connected(p.id),))
        )
        threads.append(
            threading.Thread(
                target=run, args=(lambda a=announcement: channels.save_announcement(a),)
            )
        )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    held = {a.node_id: a for a in channels.announcements()}
    assert set(held) == {p.id for p in peers}
