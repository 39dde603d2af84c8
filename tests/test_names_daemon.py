"""The real daemon names pods and containers in real alerts, and filters by them over a real bus.

Kubelet's two cgroup drivers are laid out as real cgroups in the real cgroup2 tree (systemd:
kubepods.slice/.../cri-containerd-<id>.scope; cgroupfs: kubepods/<qos>/pod<uid>/crio-<id>),
containerd's and CRI-O's files as they write them in a temporary node root (--host-root), and
a real CPU hog runs in each container cgroup until a rule blames it (cpu_spike, or on a
loaded machine psi_saturation or noisy_neighbour). Needs root (BPF).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from linnixd.collector.cgroups import cgroup2_mount
from linnixd.names import AlertNamer, NameResolver
from tests.test_bus import PrivateBus, private_bus  # noqa: F401  (fixture)
from tests.test_names import (
    CGROUPFS_CRIO,
    CID,
    CRIO_CID,
    SYSTEMD_CONTAINER,
    containerd_container,
    crio_container,
)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
READY_TIMEOUT_S = 180.0
ALERT_TIMEOUT_S = 90.0

pytestmark = [pytest.mark.bpf]


class Lines:
    """A subprocess whose stdout JSON lines (and stderr lines) are collected by threads."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.records: list[dict[str, Any]] = []
        self.log: list[str] = []
        self.changed = threading.Condition()
        for target in (self._stdout, self._stderr):
            threading.Thread(target=target, daemon=True).start()

    def _stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    self.log.append(line.rstrip())
                self.changed.notify_all()

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.log.append(line.rstrip())
                self.changed.notify_all()

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                got = pred()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no {what} within {timeout:g} s; seen {[(r.get('rule'), r.get('cgroup')) for r in self.records]}; "
                        f"log tail {self.log[-6:]}"
                    )
                self.changed.wait(min(left, 0.5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def bus(private_bus: PrivateBus) -> str:
    return private_bus.address


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("node")
    containerd_container(root)
    crio_container(root)
    (root / "var/lib").mkdir(parents=True)  # linnixd makes its state directory in there
    return root


@pytest.fixture(scope="module")
def cgroups() -> Iterator[dict[str, str]]:
    """Kubelet's systemd-driver and cgroupfs-driver container cgroups, under one test directory."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount")
    top = f"/linnixd-names-{uuid.uuid4().hex[:8]}"
    paths = {"systemd": top + SYSTEMD_CONTAINER, "cgroupfs": top + CGROUPFS_CRIO}
    for rel in paths.values():
        os.makedirs(mount + rel)
    try:
        yield {k: mount + v for k, v in paths.items()} | {f"{k}_rel": v for k, v in paths.items()}
    finally:
        for dirpath, _, _ in sorted(os.walk(mount + top), key=lambda t: -len(t[0])):
            os.rmdir(dirpath)


@pytest.fixture(scope="module")
def daemon(bus: str, node: Path) -> Iterator[Lines]:
    d = Lines(
        [
            PYTHON,
            "-m",
            "linnixd",
            "--foreground",
            "--output",
            "json",
            "--bus",
            bus,
            "--host-root",
            str(node),
            "--state-dir",
            str(node / "var/lib/linnixd"),
            "--policy",
            str(ROOT / "policy" / "rules.yaml"),
        ]
    )
    try:
        d.wait(
            lambda: any(line.startswith("linnixd: ready") for line in d.log),
            READY_TIMEOUT_S,
            "ready line",
        )
        yield d
    finally:
        d.stop()


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def ctl(bus: str, *argv: str, user: list[str] | None = None) -> Any:
    """linnixctl against the test bus; user=NOBODY runs it unprivileged (the bus policy decides)."""
    cp = subprocess.run(
        [*(user or []), PYTHON, "-m", "linnixd.ctl", "--bus", bus, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


class Hog:
    """linnixctl's cpu-spike demo moved into a container cgroup (a real process burning a CPU)."""

    def __init__(self, cgroup_dir: str) -> None:
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "linnixd.demos",
                "cpu-spike",
                "--cgroup",
                cgroup_dir,
                "--duration",
                "60",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.start_line = self.proc.stdout.readline()
        self.pid = int(self.start_line.split("pid ")[1].split()[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=15)


def blaming(daemon: Lines, cgroup: str) -> Callable[[], dict[str, Any] | None]:
    """The first firing alert whose culprit is in `cgroup`.

    Usually cpu_spike; on a loaded machine the hog may stay under its 50% and the same cgroup
    is blamed by psi_saturation or noisy_neighbour instead: any rule naming it will do.
    """
    return lambda: next(
        (a for a in daemon.records if a.get("state") == "firing" and a.get("cgroup") == cgroup),
        None,
    )


def assert_summary_names(alert: dict[str, Any], label: str, hog: Hog) -> None:
    """The summary says the pod's label where the detector wrote the cgroup or its scope."""
    summary = alert["summary"]
    assert label in summary, summary
    assert alert["cgroup"] not in summary and "cri-containerd-" not in summary, summary
    if alert["rule"] == "cpu_spike":
        assert alert["pid"] == hog.pid and f"[{hog.pid}] in {label} at" in summary, summary


def test_alerts_name_pods_in_both_drivers_and_queries_filter_by_them(
    daemon: Lines, bus: str, cgroups: dict[str, str]
) -> None:
    watch = Lines([PYTHON, "-m", "linnixd.ctl", "--bus", bus, "watch", "--json"])
    try:
        watch.wait(lambda: any("watching" in line for line in watch.log), 30, "watch ready")
        # kubelet systemd driver + containerd
        hog = Hog(cgroups["systemd"])
        try:
            alert = daemon.wait(
                blaming(daemon, cgroups["systemd_rel"]),
                ALERT_TIMEOUT_S,
                "alert blaming the containerd pod",
            )
            assert alert["cgroup"] == cgroups["systemd_rel"]
            assert alert["unit"] == f"cri-containerd-{CID}.scope"
            assert (alert["pod"], alert["namespace"], alert["container"]) == (
                "api-7d9f8c6b5-x2x9z",
                "payments",
                "api",
            )
            assert alert["container_id"] == CID
            assert alert["image"] == "registry.example/payments/api:1.4.2"
            assert_summary_names(alert, "pod payments/api-7d9f8c6b5-x2x9z (container api)", hog)
            # the D-Bus Alert signal carries the same names
            signalled = watch.wait(
                lambda: next((a for a in watch.records if a.get("id") == alert["id"]), None),
                30,
                "Alert signal",
            )
            assert (signalled["pod"], signalled["namespace"], signalled["container"]) == (
                "api-7d9f8c6b5-x2x9z",
                "payments",
                "api",
            )
            # top, filtered by namespace on the daemon's side, names the pod's row
            top = json.loads(ctl(bus, "top", "--namespace", "payments", "--json", user=NOBODY))
            assert [r["path"] for r in top["cgroups"]] == [cgroups["systemd_rel"]]
            assert top["cgroups"][0]["pod"] == "api-7d9f8c6b5-x2x9z"
            assert json.loads(ctl(bus, "top", "--namespace", "nowhere", "--json"))["cgroups"] == []
            # the incident's snapshot (linnixctl explain) carries the names in its cgroup row
            explained = json.loads(ctl(bus, "explain", alert["incident"], "--json"))
            row = explained["snapshot"]["cgroups"][cgroups["systemd_rel"]]
            assert (row["extra"]["pod"], row["extra"]["container"]) == (
                "api-7d9f8c6b5-x2x9z",
                "api",
            )
        finally:
            hog.stop()

        # kubelet cgroupfs driver + CRI-O
        hog = Hog(cgroups["cgroupfs"])
        try:
            alert = daemon.wait(
                blaming(daemon, cgroups["cgroupfs_rel"]),
                ALERT_TIMEOUT_S,
                "alert blaming the CRI-O pod",
            )
            assert alert["cgroup"] == cgroups["cgroupfs_rel"]
            assert (
                alert["pod"],
                alert["namespace"],
                alert["container"],
                alert["container_id"],
            ) == (
                "checkout-6c8d",
                "shop",
                "checkout",
                CRIO_CID,
            )
            assert_summary_names(alert, "pod shop/checkout-6c8d (container checkout)", hog)
        finally:
            hog.stop()
    finally:
        watch.stop()

    # the history, filtered by the daemon: each namespace gets its own alert only
    payments = json.loads(ctl(bus, "alerts", "--namespace", "payments", "--json"))
    shop = json.loads(ctl(bus, "alerts", "--pod", "checkout-*", "--json"))
    # culprit or victim in the namespace (a pod that suffered a neighbour's stall counts too)
    assert payments and all(
        "payments" in (a["namespace"], a["evidence"].get("victim_namespace")) for a in payments
    ), (payments, daemon.log[-8:])
    assert shop and all(
        "checkout-6c8d" in (a["pod"], a["evidence"].get("victim_pod")) for a in shop
    ), shop
    assert any(a["cgroup"] == cgroups["systemd_rel"] for a in payments)
    # a filter the daemon refuses: one line naming it, exit 64, no traceback
    bad = subprocess.run(
        [PYTHON, "-m", "linnixd.ctl", "--bus", bus, "stalls", "--pod", "a\nb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 64, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "linnixctl: filter pod must be a name of at most 253 characters"
    ]
    status = json.loads(ctl(bus, "status", "--json"))
    assert status["health"]["names"]["named"] >= 2
    assert status["health"]["names"]["malformed"] == 0


@pytest.fixture(scope="module")
def sched() -> Iterator[Any]:
    from linnixd.collector.sched import SchedCollector

    collector = SchedCollector()
    collector.start()
    try:
        yield collector
    finally:
        collector.close()


def test_noisy_neighbour_between_two_pods_is_said_with_their_names(sched: Any, node: Path) -> None:
    """A spinner in one pod (systemd driver) keeps a periodic worker in another (cgroupfs driver)
    from the CPU they share: the real pipeline's alert says it pod to pod, by name."""
    from tests.test_sched_bpf import SPIN, alerts_of, foreign_excluded, run_experiment

    mount = cgroup2_mount()
    assert mount is not None
    top = f"/linnixd-names-nn-{uuid.uuid4().hex[:8]}"
    paths = {
        "culprit": top + SYSTEMD_CONTAINER,
        "victim": top + CGROUPFS_CRIO,
        "bystander": top + "/system.slice/idle.service",
    }
    groups = {k: mount + v for k, v in paths.items()} | {"mount": mount, "base": mount + top}
    for d in paths.values():
        os.makedirs(mount + d)
    try:
        fired: list[Any] = []
        for _attempt in range(2):  # once more if the loaded host kept both from running at all
            snaps, _ = run_experiment(sched, groups, SPIN)
            fired = alerts_of(snaps, foreign_excluded(groups, snaps), set(paths.values()))
            if any(a.culprit.cgroup == paths["culprit"] for a in fired):
                break
    finally:
        for dirpath, _, _ in sorted(os.walk(mount + top), key=lambda t: -len(t[0])):
            for _ in range(50):
                try:
                    os.rmdir(dirpath)
                    break
                except OSError:
                    time.sleep(0.05)  # tasks still exiting
    namer = AlertNamer(NameResolver(str(node)))
    named = [namer.name(a) for a in fired]
    api = "pod payments/api-7d9f8c6b5-x2x9z (container api)"
    checkout = "pod shop/checkout-6c8d (container checkout)"
    # about the worker: the spinner is blamed, never the sleeper; on a loaded host where the
    # spinner got no more than its share the pair is reported once as contention, no culprit
    about = [
        a
        for a in named
        if paths["victim"] in (a.evidence.get("victim"), a.evidence.get("contender"))
    ]
    blamed = [a for a in about if a.culprit.cgroup is not None]
    contended = [a for a in about if a.evidence.get("explained_by") == "contention"]
    assert {(a.culprit.cgroup, a.evidence["victim"]) for a in blamed} <= {
        (paths["culprit"], paths["victim"])
    }, [a.summary for a in fired]
    assert blamed or contended, [a.summary for a in fired]
    for alert in about:
        print(alert.summary)
        assert top not in alert.summary and "cri-containerd-" not in alert.summary
    for alert in blamed:
        assert re.match(
            rf"{re.escape(api)} took \d+% of a CPU and caused \d+ ms of stall to "
            rf"{re.escape(checkout)} ",
            alert.summary,
        ), alert.summary
        assert (alert.culprit.pod, alert.culprit.namespace, alert.culprit.container) == (
            "api-7d9f8c6b5-x2x9z",
            "payments",
            "api",
        )
        ev = alert.evidence
        assert (ev["victim_pod"], ev["victim_namespace"], ev["victim_container"]) == (
            "checkout-6c8d",
            "shop",
            "checkout",
        )
        assert ev["top_culprits"][0]["pod"] == "api-7d9f8c6b5-x2x9z"
    for alert in contended:
        # either order: "A and B contend for CPU"
        assert re.match(
            rf"({re.escape(api)}|{re.escape(checkout)}) and ({re.escape(api)}|{re.escape(checkout)}) "
            r"contend for CPU",
            alert.summary,
        ), alert.summary
        ev = alert.evidence
        assert {ev["victim_pod"], ev["contender_pod"]} == {"api-7d9f8c6b5-x2x9z", "checkout-6c8d"}
