"""The command line, ``kachery-node`` (main.py; feeds.py and tasks.py for their command groups,
groups.py for what they share). It talks to the daemon through node/client/ only."""

from kachery.node.cli.main import main

__all__ = ["main"]
