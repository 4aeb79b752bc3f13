"""The kachery-node runtime and client."""
