"""Benchmark: task round trips across a channel, and throughput with two providers.

Four daemons on loopback, all members of one channel: two providers (each with a worker process
running ``kn.run_task_backend``), a requester, and a third member. A trivial pure calculation
(``bench.add.v1``: a + b) is requested through the Python client (``kn.request_task(...).wait()``,
the way a lab's script would), and timed from the call to the value in hand:
- first run: distinct arguments each time (cache lookup in the channel, the provider's worker
  runs it and stores the result, the requester fetches it with the chunk exchange);
- cached, same member: the same arguments again (answered from the requester's own cache);
- cached, another member: the third member asks for the same arguments (found in a member's
  cache, fetched with the chunk exchange; nothing runs);
beside the reference measured in the same run: one local-API call (``peers``), the floor under
every request. Then throughput: N distinct tasks submitted at once, until the last is finished.
Goal (issue 6): cached p50 <= 5 ms; 1000 tasks in <= 10 s.
Usage: scripts/bench/tasks [--latency N] [--tasks N] [--slots N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import timed

import kachery.node as kn
from kachery.node.client import DaemonClient
from kachery.node.home import HOME_ENV
from kachery.node.testing import Daemon

FUNCTION = "bench.add.v1"

WORKER = """
import sys
import kachery.node as kn

@kn.taskfunction("bench.add.v1")
def add(a, b):
    return a + b

kn.run_task_backend(slots=int(sys.argv[1]), on_ready=lambda e: print("ready", flush=True))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, seconds: list[float]) -> None:
    p50, p99 = percentile(seconds, 0.5) * 1000, percentile(seconds, 0.99) * 1000
    print(f"{name:48} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   (n={len(seconds)})", flush=True)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process has used so far (this one by default; Linux /proc,
    else 0)."""
    if pid is None:
        return sum(os.times()[:2])
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def use(node: Daemon) -> None:
    os.environ[HOME_ENV] = str(node.home)


def start_worker(node: Daemon, script: Path, slots: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(script), str(slots)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=node.env(),
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("a worker did not start")
    return proc


def request(a: int, b: int) -> object:
    return kn.request_task(FUNCTION, {"a": a, "b": b}).wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=int, default=300, help="requests per latency row")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the throughput run")
    parser.add_argument("--slots", type=int, default=8, help="jobs each worker runs at once")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kachery-bench-tasks-") as tmp:
        base = Path(tmp)
        names = ("p1", "p2", "requester", "third")
        nodes = {name: Daemon(base / name) for name in names}
        workers: list[subprocess.Popen[str]] = []
        try:
            for node in nodes.values():
                node.start()
            p1, p2, requester, third = (nodes[n] for n in names)
            p1.cli("channel", "create", "lab")
            for node in (p2, requester, third):
                node.cli("join", p1.cli("channel", "invite", "lab", "--roles", "all").strip())
            for node in nodes.values():
                node.cli("peers", "--wait-for", *(n.node_id for n in nodes.values() if n != node))
            script = base / "bench_tasks.py"
            script.write_text(WORKER)
            workers = [start_worker(p, script, args.slots) for p in (p1, p2)]
            print(f"4 daemons on loopback, 2 providers x {args.slots} worker slots", flush=True)

            use(requester)
            request(-1, -1)  # warm up: providers announced, sessions and caches hot
            client = DaemonClient(requester.home)
            n = args.latency
            row("reference: one local API call (peers)", timed(lambda: client.call("peers"), n))
            fresh = itertools.count()
            first = timed(lambda: request(next(fresh), 0), n)
            row("first run (lookup, run, fetch the result)", first)
            again = itertools.count()
            cached = timed(lambda: request(next(again), 0), n)
            row("cached, same member", cached)
            use(third)
            request(-1, -1)
            elsewhere = itertools.count()
            other = timed(lambda: request(next(elsewhere), 0), n)
            row("cached, another member (lookup + fetch)", other)

            use(requester)
            before = {p.node_id: p.json("status")["tasks"]["jobsRun"] for p in (p1, p2)}
            roles: dict[str, list[int | None]] = {
                "requester daemon": [requester.proc.pid if requester.proc else None],
                "provider daemons": [p.proc.pid if p.proc else None for p in (p1, p2)],
                "workers": [w.pid for w in workers],
                "this client": [None],
            }
            cpu_start = {role: sum(map(cpu_seconds, pids)) for role, pids in roles.items()}
            start = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                handles = list(
                    pool.map(
                        lambda i: kn.request_task(FUNCTION, {"a": i, "b": 1_000_000}),
                        range(args.tasks),
                    )
                )
                values = list(pool.map(lambda h: h.wait(), handles))
            elapsed = time.perf_counter() - start
            cpu = {r: sum(map(cpu_seconds, p)) - cpu_start[r] for r, p in roles.items()}
            assert values == [i + 1_000_000 for i in range(args.tasks)]
            runs = [p.json("status")["tasks"]["jobsRun"] - before[p.node_id] for p in (p1, p2)]
            print(
                f"{args.tasks} distinct tasks, 2 providers: {elapsed:.2f} s"
                f" ({args.tasks / elapsed:.0f} tasks/s; runs per provider {runs[0]} + {runs[1]})",
                flush=True,
            )
            total = sum(cpu.values())
            shares = ", ".join(f"{role} {seconds:.2f}" for role, seconds in cpu.items())
            print(
                f"  CPU {total:.2f} s ({total / args.tasks * 1000:.1f} ms per task): {shares}",
                flush=True,
            )
            goal_cached = statistics.median(cached) * 1000
            print(
                f"goal: cached p50 <= 5 ms: {goal_cached:.2f} ms"
                f" ({'met' if goal_cached <= 5 else 'NOT met'});"
                f" 1000 tasks <= 10 s: {elapsed:.2f} s"
                f" ({'met' if elapsed <= 10 * args.tasks / 1000 else 'NOT met'})"
            )
        finally:
            for proc in workers:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            for node in nodes.values():
                if node.proc is not None:
                    node.stop()


if __name__ == "__main__":
    main()
