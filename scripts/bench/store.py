"""Benchmark: storing a 1 GiB file, beside a plain hashlib SHA-1 pass and sha1sum of the same file.

Goal (issue 2): store >= 0.8x the hashlib pass, i.e. storing costs little beyond hashing.
All runs read a warm page cache; a warm-up store first touches the memory the store will use.
Usage: scripts/bench/store [--size BYTES] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import GIB, report, timed, write_random_file

from kachery.node.home import NodeHome


def hashlib_pass(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=GIB)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kachery-bench-", dir=Path.home()) as tmp:
        base = Path(tmp)
        src = base / "data.bin"
        print(f"writing a {args.size / GIB:.2f} GiB test file in {base} ...", flush=True)
        write_random_file(src, args.size)
        expected = hashlib_pass(src)  # also warms the page cache

        home, _ = NodeHome.init(base / "home")
        files = home.files

        def store() -> None:
            assert files.store_path(src).sha1 == expected

        def unstore() -> None:  # so that the next run stores from scratch
            for entry in files.entries():
                files.remove(entry.sha1)

        store()  # warm-up: first touch of page-cache memory is slow on this kind of VM
        unstore()
        rows = [
            (
                "hashlib sha1 pass (reference)",
                args.size,
                timed(lambda: hashlib_pass(src), args.repeat),
            ),
        ]
        if shutil.which("sha1sum"):
            cmd = ["sha1sum", str(src)]
            rows.append(
                (
                    "sha1sum",
                    args.size,
                    timed(
                        lambda: subprocess.run(cmd, check=True, capture_output=True), args.repeat
                    ),
                )
            )
        rows.append(
            (
                "kachery-node store (copy+hash+fsync)",
                args.size,
                timed(store, args.repeat, after=unstore),
            )
        )
        link_path = base / "linked.bin"
        shutil.copyfile(src, link_path)

        def link() -> None:
            entry = files.store_path(link_path, link=True)
            files.remove(entry.sha1)

        rows.append(
            ("kachery-node store --link (hash in place)", args.size, timed(link, args.repeat))
        )
        print()
        report(rows, "hashlib sha1 pass (reference)")
        home.close()


if __name__ == "__main__":
    main()
