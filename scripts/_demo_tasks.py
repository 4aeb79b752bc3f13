"""The tasks part of the demo: alice serves task functions; bob asks the channel for them.

Called from scripts/demo.py with the running daemons of the lab channel, after the feeds part
(the action appends to alice's lab notebook). alice's worker is a separate process running a
user's script (``kn.taskfunction`` + ``kn.run_task_backend``), as a lab would run it; every
request is the real ``kachery-node task request`` command. ``offline_tasks_demo`` runs once
alice has gone offline: the owner still gets the result, from bob's cache.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from kachery.node.testing import EXE, Daemon

WORKER = '''
"""alice's task functions: run with `python lab_tasks.py`; serves until Ctrl-C."""
import sys
import time

import kachery.node as kn

NOTEBOOK = sys.argv[1]  # the lab notebook's entries: feed://<feed id>/entries


@kn.taskfunction("firing_rates.v1")
def firing_rates(spikes, duration_s):
    """Spikes per second of each unit, from a JSON file of spike times."""
    times = kn.load_json(spikes)
    time.sleep(0.5)  # stands in for real work
    return {unit: round(len(t) / duration_s, 2) for unit, t in sorted(times.items())}


@kn.taskfunction("notebook.note.v1", type="action")
def note(text):
    """Append an entry to the lab notebook (an action: it runs at most once per request)."""
    kn.load_subfeed(NOTEBOOK).append_message({"session": 3, "note": text})


kn.run_task_backend(on_ready=lambda event: print("ready", flush=True))
'''


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def request(node: Daemon, *args: str) -> tuple[str, float]:
    """Run ``kachery-node task request ...`` as ``node``; print its result and summary line."""
    print(f"$ kachery-node task request {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [EXE, "task", "request", *args], capture_output=True, text=True, env=node.env()
    )
    elapsed = time.perf_counter() - start
    for text in (proc.stdout, proc.stderr):
        if text.strip():
            print(text.rstrip("\n"), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed with exit code {proc.returncode}")
    return proc.stdout.strip(), elapsed


def start_worker(node: Daemon, base: Path, notebook: str) -> subprocess.Popen[str]:
    script = base / "lab_tasks.py"
    script.write_text(WORKER)
    print(f"$ python lab_tasks.py {notebook} &", flush=True)
    log = open(base / "worker.log", "w")  # noqa: SIM115 (the worker keeps it open)
    proc = subprocess.Popen(
        [sys.executable, str(script), notebook],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=node.env(),
    )
    log.close()
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"demo step failed: the worker did not start (see {base}/worker.log)")
    return proc


def tasks_demo(nodes: dict[str, Daemon], base: Path, notebook: str) -> dict[str, object]:
    """Part: tasks. Returns the kwargs of the calculation bob asked for."""
    alice, bob = nodes["alice"], nodes["bob"]
    say("Tasks: alice serves two functions from a worker process (a crash never stops her node).")
    spikes = base / "spike_times.json"
    spikes.write_text(json.dumps({"unit-1": [0.1, 0.5, 1.2, 2.9], "unit-2": [0.7, 1.9]}))
    spikes_uri = alice.cli("store", str(spikes)).strip()
    print(f"$ kachery-node store spike_times.json\n{spikes_uri}")
    worker = start_worker(alice, base, notebook)
    try:
        print(alice.cli("task", "providers").rstrip("\n"))
        say("bob asks the channel for a pure calculation: alice's worker runs it.")
        kwargs: dict[str, object] = {"spikes": spikes_uri, "duration_s": 3}
        args = ("firing_rates.v1", "--kwargs", json.dumps(kwargs))
        first, first_s = request(bob, *args)
        say("Asked again, it is answered from the cache: the task ID names the result.")
        again, again_s = request(bob, *args)
        print(f"(computed: {first_s * 1000:.0f} ms; cached: {again_s * 1000:.0f} ms,")
        print(" both including the command's start-up; same result: " + str(first == again) + ")")

        say("An action changes state: it runs at most once per request ID, even if retried.")
        note = ("notebook.note.v1", "--type", "action", "--request-id", "sorting-session-3")
        text = json.dumps({"text": "firing rates computed for units 1-2"})
        request(bob, *note, "--kwargs", text)
        print("(a retry, as after a lost reply: the same request ID runs nothing again; alice's")
        print(" node records every action request durably before it runs)")
        request(bob, *note, "--kwargs", text)
        entries = alice.cli("feed", "read", notebook).splitlines()
        print(f"$ kachery-node feed read {notebook}  (on alice's node)")
        print("\n".join(entries[-2:]))
        print(f"(the note appears once: {sum('firing rates' in e for e in entries)} entry)")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        if worker.stdout is not None:
            worker.stdout.close()
    return kwargs


def offline_tasks_demo(nodes: dict[str, Daemon], kwargs: dict[str, object]) -> None:
    """The owner asks for bob's calculation while alice (its only provider) is offline."""
    say("alice is offline, yet the owner gets the firing rates: bob's node holds the result.")
    request(nodes["owner"], "firing_rates.v1", "--kwargs", json.dumps(kwargs))
