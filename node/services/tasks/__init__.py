"""Tasks on a node: service.py builds the parts (provider.py, backends.py, directory.py,
requester.py, results.py) and serves the user's local-API methods; its docstring says which
part does what."""
