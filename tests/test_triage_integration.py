"""End to end: real workloads fire incidents in the real daemon; `linnixctl explain` over a real dbus-daemon.

One daemon (real BPF, default policy, a state directory, serving on a private dbus-daemon
configured like the system bus with the shipped policy) for the module. Each demo workload,
and a foreign hog (stress-ng), runs in its own cgroup2 directory; linnixctl is run as a
program, as an operator would. Needs root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from foreground import PYTHON, ROOT
from foreground import ForegroundDaemon as Daemon
from test_bus import PrivateBus
from test_integration import Demo, cgroup2_mount, wait_cpu_alert

from linnixd.constants import EXIT_NOINPUT, EXIT_USAGE
from linnixd.triage import MAX_SNAPSHOT_BYTES

HOG_RULES = ("cpu_spike", "runaway_tree", "psi_saturation", "noisy_neighbour")

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root"),
]


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    b = PrivateBus()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(bus: PrivateBus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    state = tmp_path_factory.mktemp("state")
    d = Daemon("--bus", bus.address, "--state-dir", str(state))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def ctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "linnixd.ctl", "--bus", bus.address, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def explain_json(bus: PrivateBus, incident: str) -> dict[str, Any]:
    done = ctl(bus, "explain", incident, "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def check_names_culprit(bus: PrivateBus, alert: dict[str, Any]) -> dict[str, Any]:
    """explain of the alert's incident names its culprit with the alert's own figures."""
    e = explain_json(bus, alert["incident"])
    s = e["snapshot"]
    assert e["incident"] == alert["incident"] and e["rule"] == alert["rule"]
    assert s["alert"]["evidence"] == alert["evidence"]
    assert s["culprit"]["cgroup"] == alert["cgroup"]
    if alert["pid"] is None:  # a cgroup culprit: no process tree, named by its cgroup
        assert s["culprit"]["pid"] is None and s["tree"] is None
        assert (alert["unit"] or alert["cgroup"]) in e["headline"]
    else:
        assert s["culprit"]["pid"] == alert["pid"] and s["culprit"]["comm"] == alert["comm"]
        assert f"{alert['comm']}[{alert['pid']}]" in e["headline"]
        members = {m["pid"]: m for m in s["tree"]["members"]}
        assert alert["pid"] in members and members[alert["pid"]]["comm"] == alert["comm"]
    facts = {f["id"]: f for f in e["facts"]}
    for key, value in alert["evidence"].items():
        if f"evidence.{key}" in facts:
            assert facts[f"evidence.{key}"]["figure"] == value, key
    assert [f["n"] for f in e["facts"]] == list(range(1, len(e["facts"]) + 1))
    assert all(f["source"] for f in e["facts"])
    assert len(json.dumps(s, separators=(",", ":")).encode()) <= MAX_SNAPSHOT_BYTES + 512
    assert s["cgroups"][alert["cgroup"]]["extra"] == {}
    # the readable form says the same
    text = ctl(bus, "explain", alert["incident"])
    # the incident may resolve between the two reads: its headline then says so
    later = explain_json(bus, alert["incident"])["headline"]
    assert text.returncode == 0 and text.stdout.splitlines()[0] in (e["headline"], later)
    assert "Facts:" in text.stdout and f"incident {alert['incident']}" in text.stdout
    return e


def test_fork_storm_explained_over_the_bus(daemon: Daemon, bus: PrivateBus) -> None:
    with Demo("fork-storm", "--duration", "5") as demo:
        alert = daemon.wait_alert(demo.ours, 15, "fork_storm")
        # `latest` is the newest incident: compare with the newest firing alert at that moment
        for _ in range(5):
            before = [a["incident"] for a in daemon.alerts if a["state"] == "firing"]
            latest = explain_json(bus, "latest")
            after = [a["incident"] for a in daemon.alerts if a["state"] == "firing"]
            if before == after:
                break
        assert latest["incident"] == after[-1]
    e = check_names_culprit(bus, alert)
    assert alert["comm"] == "lx-forkstorm" and alert["pid"] == demo.pid
    lc = e["snapshot"]["lifecycle"]["by_parent"]
    assert lc["forks"] > 0 and lc["forks_per_s"] > 10  # the storm's parent forked
    assert e["facts"][1]["id"] == "evidence.rate_per_s"


def test_cpu_spike_explained_with_its_series(daemon: Daemon, bus: PrivateBus) -> None:
    with Demo("cpu-spike") as demo:
        alert = wait_cpu_alert(daemon, demo, 20, 60)
        e = check_names_culprit(bus, alert)
    s = e["snapshot"]
    root = next(m for m in s["tree"]["members"] if m["pid"] == demo.pid)
    assert root["state"] in ("running", "sleeping") and root["threads"] >= 1
    assert "linnixd.demos" in root["cmdline"] or "lx-cpuspike" in root["cmdline"]
    cpu = [v for v in s["series"]["cpu_pct"] if v is not None]
    assert len(cpu) >= alert["evidence"]["samples"] and max(cpu) > 50
    assert s["top_processes"]["cpu"][0]["cpu_pct"] >= alert["evidence"]["min_cpu_pct"] - 1


def test_runaway_tree_snapshot_holds_the_tree(daemon: Daemon, bus: PrivateBus) -> None:
    with Demo("runaway-tree") as demo:
        alert = wait_cpu_alert(daemon, demo, 25, 95)
        e = check_names_culprit(bus, alert)
    tree = e["snapshot"]["tree"]
    assert tree["root_pid"] == demo.pid and tree["total"] == alert["evidence"]["processes"] == 5
    assert {m["ppid"] for m in tree["members"][1:]} <= {m["pid"] for m in tree["members"]}
    assert e["facts"][1]["id"] == "evidence.subtree_cpu_pct"


def test_fd_leak_and_short_jobs_explained(daemon: Daemon, bus: PrivateBus) -> None:
    with Demo("fd-leak") as demo:
        alert = daemon.wait_alert(demo.ours, 20, "fd_exhaustion")
        e = check_names_culprit(bus, alert)
    root = next(m for m in e["snapshot"]["tree"]["members"] if m["pid"] == demo.pid)
    assert root["fds"] >= alert["evidence"]["fd_count"]  # it kept opening after the alert
    assert any(a["command"] == f"ls -l /proc/{demo.pid}/fd | head -50" for a in e["actions"])

    with Demo("short-jobs") as demo:
        alert = daemon.wait_alert(demo.ours, 20, "short_lived_jobs")
        e = check_names_culprit(bus, alert)
    lc = e["snapshot"]["lifecycle"]
    assert lc["by_parent"]["short_exits"] > 0
    assert any(x["status"] == "exit 1" for x in lc["exit_statuses"])  # the demo runs `false`


@pytest.mark.slow
def test_memory_leak_explained(daemon: Daemon, bus: PrivateBus) -> None:
    with Demo("memory-leak", "--fast") as demo:
        alert = daemon.wait_alert(
            lambda a: demo.ours(a) and a.get("pid") is not None, 90, "memory_leak"
        )
        e = check_names_culprit(bus, alert)
    mem = [v for v in e["snapshot"]["series"]["rss_bytes"] if v is not None]
    assert mem[-1] - mem[0] >= 20 << 20  # a minute of the window at 5 MB/s
    assert any(f["id"] == "series.memory" for f in e["facts"])


def test_foreign_hog_explained(daemon: Daemon, bus: PrivateBus) -> None:
    if shutil.which("stress-ng") is None:
        pytest.skip("stress-ng is not installed (.ci/setup-host installs it)")
    cg = cgroup2_mount() / f"lx-it-{os.getpid()}-hog"
    cg.mkdir()
    # the shell joins the cgroup before exec, so stress-ng's workers are born in it
    hog = subprocess.Popen(
        [
            "/bin/sh",
            "-c",
            f'echo $$ > "{cg}/cgroup.procs" && exec stress-ng --cpu 1 --timeout 40 --quiet',
        ],
        start_new_session=True,
    )
    try:
        path = "/" + cg.name

        # on a busy shared host the hog may get too little CPU for a cpu_spike; its pressure
        # or its neighbours' stall still name its cgroup
        def ours(a: dict[str, Any]) -> bool:
            return a["state"] == "firing" and a["cgroup"] == path and a["rule"] in HOG_RULES

        alert = daemon.wait_alert(ours, 30, "an alert naming the stress-ng cgroup")
        e = check_names_culprit(bus, alert)
    finally:
        os.killpg(hog.pid, signal.SIGKILL)
        hog.wait()
        deadline = time.monotonic() + 5
        while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        cg.rmdir()
    if alert["pid"] is not None:
        assert alert["comm"].startswith("stress-ng")
    assert e["snapshot"]["culprit"]["cgroup"] == path
    assert path in e["snapshot"]["cgroups"]


def test_unknown_and_malformed_incidents_get_one_line_and_an_exit_code(
    daemon: Daemon, bus: PrivateBus
) -> None:
    done = ctl(bus, "explain", "0123456789abcdef0123456789abcdef")
    assert done.returncode == EXIT_NOINPUT == 66
    assert done.stderr.strip() == (
        "linnixctl: no incident 0123456789abcdef0123456789abcdef in the history"
    )
    done = ctl(bus, "explain", "../etc/passwd")
    assert done.returncode == EXIT_USAGE and len(done.stderr.strip().splitlines()) == 1
    assert "incident must be an incident id" in done.stderr


def test_incidents_all_lists_past_incidents_and_capture_cost(
    daemon: Daemon, bus: PrivateBus
) -> None:
    fired = {a["incident"] for a in daemon.alerts if a["state"] == "firing"}
    assert fired, "the tests before this one fired incidents"
    done = ctl(bus, "incidents", "--all", "--json", "--limit", "1000")
    assert done.returncode == 0, done.stderr
    listed = {r["incident"]: r for r in json.loads(done.stdout)}
    assert fired <= set(listed)
    assert all(listed[i]["has_snapshot"] for i in fired)
    resolved = {a["incident"] for a in daemon.alerts if a["state"] == "resolved"}
    assert all(listed[i]["state"] == "resolved" for i in resolved)
    text = ctl(bus, "incidents", "--all")
    assert text.returncode == 0 and text.stdout.splitlines()[0].startswith("OPENED")
    status = json.loads(ctl(bus, "status", "--json").stdout)
    triage = status["health"]["triage"]
    assert triage["captures"] >= len(fired) and triage["capture_errors"] == 0
    assert triage["store_errors"] == 0
    print(
        f"capture cost: max {triage['max_capture_seconds'] * 1000:.1f} ms "
        f"over {triage['captures']} captures"
    )
