"""Files over the network (the chunk exchange): service.py serves and loads files, finding.py
finds providers, fetching.py fetches a piece from one, download.py runs one download from many,
disk.py reads and writes pieces. The node builds ``FileService`` (service.py)."""
