"""The daemon as a lab member runs it: real ``kachery-node start`` processes, driven by the CLI."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from kachery.node.testing import EXE, Daemon


def test_a_lab_swarm_from_the_command_line(daemons: dict[str, Daemon]) -> None:
    owner, a, b = daemons["owner"], daemons["a"], daemons["b"]
    for d in (owner, a, b):
        d.start()
    channel_id = owner.cli("channel", "create", "lab").strip()
    assert len(channel_id) == 64
    for d in (a, b):
        token = owner.cli(
            "channel", "invite", "lab", "--roles", "requestFiles,provideFiles"
        ).strip()
        assert token.startswith("kachery-invite:")
        assert d.cli("join", token).strip() == "lab"
    members = {m["nodeId"]: m for m in owner.json("channel", "members", "lab")["members"]}
    assert set(members) == {owner.node_id, a.node_id, b.node_id}
    assert members[a.node_id]["roles"] == ["provideFiles", "requestFiles"]
    for d in (a, b):
        assert {m["nodeId"] for m in d.json("channel", "members", "lab")["members"]} == set(members)
    # a and b were only given the owner's address; they find each other by peer exchange.
    peers = a.json("peers", "--wait-for", owner.node_id, b.node_id, "--timeout", "30")
    assert {p["nodeId"] for p in peers} == {owner.node_id, b.node_id}
    nowhere = "sha1://" + "0" * 40
    missing = subprocess.run(
        [EXE, "find", nowhere], capture_output=True, text=True, env=a.env(), timeout=60
    )
    assert (missing.returncode, missing.stderr) == (
        1,
        f"kachery-node: error: no connected member provides {nowhere}\n",
    )
    status = a.json("status")
    assert status["nodeId"] == a.node_id
    assert status["peers"] == 2
    text = a.cli("status")  # for people: labels in words, no JSON
    lines = dict(line.split(":", 1) for line in text.splitlines() if not line.startswith(" "))
    assert lines["node ID"].strip() == a.node_id
    assert lines["uptime"].strip().endswith("s")  # "12s", "2m05s": never "0:12"
    assert lines["channels"].strip() == "lab"
    assert lines["files"].strip().startswith("uploaded ")
    assert "{" not in text
    assert all(len(line) <= 100 for line in text.splitlines())
    # A removed member's own list says so (its node learns it from the signed removal).
    owner.cli("channel", "remove", "lab", b.node_id)
    deadline = time.monotonic() + 30
    while "(removed)" not in b.cli("channel", "list") and time.monotonic() < deadline:
        time.sleep(0.2)  # polling from outside: the daemon takes the removal asynchronously
    [row] = b.cli("channel", "list").splitlines()[1:]
    assert row.split()[0] == "lab"
    assert "(removed)" in row
    for d in (owner, a, b):
        assert d.stop() == 0
        assert "Traceback" not in "".join(d.log)


def test_a_second_daemon_on_one_home_is_refused_and_ctrl_c_stops_cleanly(
    daemons: dict[str, Daemon],
) -> None:
    node = daemons["n"]
    node.start()
    out = node.cli("start", "--listen", "127.0.0.1:0", "--api-port", "0", check=False)
    assert "already running" in out
    assert "Traceback" not in out
    assert node.stop() == 0
    assert "daemon stopped" in "".join(node.log)
    assert not (node.home / "daemon.json").exists()
    out = node.cli("status", check=False)
    assert "no kachery-node daemon is running" in out


def test_a_member_restarted_from_the_command_line_rejoins(daemons: dict[str, Daemon]) -> None:
    owner, a = daemons["owner"], daemons["a"]
    owner.start()
    a.start()
    owner.cli("channel", "create", "lab")
    a.cli("join", owner.cli("channel", "invite", "lab", "--roles", "all").strip())
    assert a.stop() == 0
    a.start()
    peers = a.json("peers", "--wait-for", owner.node_id, "--timeout", "30")
    assert [p["nodeId"] for p in peers] == [owner.node_id]
    assert owner.stop() == 0
    assert a.stop() == 0


def test_ctrl_c_after_a_burst_of_api_calls_and_sigterm_both_stop_cleanly(
    daemons: dict[str, Daemon],
) -> None:
    node = daemons["n"]
    node.start()
    for _ in range(30):
        node.cli("status")
    assert node.stop() == 0  # SIGINT
    assert "SIGINT received: stopping" in "".join(node.log)
    node.start()
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=30) == 0
    node.kill()
    assert not (node.home / "daemon.json").exists()


def test_a_listen_port_in_use_is_a_one_line_error_naming_it(daemons: dict[str, Daemon]) -> None:
    node = daemons["n"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = node.cli("start", "--listen", f"127.0.0.1:{port}", "--api-port", "0", check=False)
    assert out.startswith(f"kachery-node: error: cannot listen for peers on 127.0.0.1:{port}")
    assert "Address already in use" in out
    assert "--listen" in out
    assert out.count("\n") == 1, out


def test_peers_wait_says_how_many_of_how_many_connected_and_its_default(
    daemons: dict[str, Daemon],
) -> None:
    node = daemons["n"]
    node.start()
    out = node.cli("peers", "--wait", "5", "--timeout", "0.5", check=False)
    assert out == "kachery-node: error: only 0 of 5 peers connected within 0.5 s\n"
    assert "(default 30)" in " ".join(node.cli("peers", "--help").split())
    assert node.stop() == 0
