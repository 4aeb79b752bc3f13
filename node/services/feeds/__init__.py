"""Feeds on a node: service.py (loading, appending, following), live.py (a subfeed in use),
writer.py (the group commit), receiver.py (what peers send), gossip.py (the replicator and its
peer handlers), api.py (the local API's ``feed_*`` methods). The node builds ``FeedService``
and ``FeedAPI``."""
