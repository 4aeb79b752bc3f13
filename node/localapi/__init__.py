"""The local API: the HTTP server on 127.0.0.1 that the command line and the Python client
talk to (server.py). Non-goal: the client side (node/client/)."""
