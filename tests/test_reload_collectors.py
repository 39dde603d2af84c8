"""A reload attaches the kernel programs the new rules need and detaches the ones no rule needs (real BPF)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from linnixd.collector.attach import Attachments
from linnixd.collector.psi import PsiTriggers
from linnixd.collector.sched import SchedCollector
from linnixd.config import load_policy
from linnixd.daemon import Daemon
from linnixd.hostmodel import HostModel
from linnixd.registry import RULES

pytestmark = pytest.mark.bpf

SCHED_RULES = [r.name for r in RULES if "sched" in r.needs]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def write_policy(path: Path, enabled: set[str]) -> None:
    lines = ["version: 1", "daemon:", "  tick_s: 0.5", "rules:"]
    for rule in RULES:
        lines += [f"  {rule.name}:", f"    enabled: {'true' if rule.name in enabled else 'false'}"]
    path.write_text("\n".join(lines) + "\n")


def bpf_prog_fds() -> int:
    """BPF programs this process holds open (bcc keeps one fd per loaded program)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog":
                count += 1
        except OSError:
            continue
    return count


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    path = tmp_path / "rules.yaml"
    write_policy(path, {"fork_storm", "memory_leak"})  # nothing that needs sched.c or triggers
    policy = load_policy(path)
    attachments = Attachments(
        make_sched=SchedCollector,
        make_triggers=lambda res, pct, win: PsiTriggers(list(res), pct, win),
    )
    assert attachments.sync(policy) == []
    model = HostModel(
        max_processes=policy.daemon.max_processes, max_cgroups=policy.daemon.max_cgroups
    )
    model.seed()
    d = Daemon(str(path), policy, attachments=attachments, model=model)
    yield d
    d.close()


def test_reload_attaches_and_detaches_the_scheduler_program(daemon: Daemon) -> None:
    path = Path(daemon.policy_path)
    before = bpf_prog_fds()
    daemon.tick()
    snap = daemon.tick()
    assert snap.stall is None and daemon.sched is None and not daemon.model.incremental
    assert daemon.status()["scheduler_attribution"] is False
    assert daemon.psi_mode == "polling"

    # enabling noisy_neighbour attaches bpf/sched.c; psi_saturation arms the triggers
    write_policy(path, {"fork_storm", "memory_leak", "noisy_neighbour", "psi_saturation"})
    message = daemon.reload_policy()
    assert "4 rules enabled" in message
    assert daemon.sched is not None and daemon.model.incremental
    assert daemon.status()["scheduler_attribution"] is True
    assert bpf_prog_fds() > before  # the scheduler's programs are loaded in the kernel
    assert daemon.psi_mode == "triggers"
    triggers = daemon.attachments.triggers

    # the kernel now says who ran: a burner that ran between two ticks is in the snapshot
    daemon.tick()
    burner = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.5)])
    try:
        snaps = []
        while burner.poll() is None:
            snaps.append(daemon.tick())
        snaps.append(daemon.tick())
    finally:
        burner.wait(30)
    assert all(s.stall is not None for s in snaps)
    seen = [s.processes[burner.pid] for s in snaps if burner.pid in s.processes]
    assert seen and max(p.cpu_pct for p in seen) > 0, "the kernel-driven model missed the burner"
    assert set(daemon.status()["health"]["sched"]) >= {"task_collisions", "ran_overflows"}

    # a reload that disables every rule needing sched.c detaches it and disarms the triggers
    write_policy(path, {"fork_storm", "memory_leak", "cpu_spike"})
    daemon.reload_policy()
    assert daemon.sched is not None  # cpu_spike still needs it
    write_policy(path, {"fork_storm", "memory_leak"})
    daemon.reload_policy()
    assert daemon.sched is None and not daemon.model.incremental
    assert bpf_prog_fds() == before
    assert daemon.attachments.triggers is None and daemon.psi_mode == "polling"
    assert triggers is not None and triggers._thread is None  # closed: its watcher thread ended
    # the model went back to scanning /proc: ticks go on, with no stall data
    snap = daemon.tick()
    snap = daemon.tick()
    assert snap.stall is None and snap.processes
    assert daemon.status()["scheduler_attribution"] is False
    assert "sched" not in daemon.status()["health"]


def test_psi_trigger_threshold_follows_the_policy(daemon: Daemon) -> None:
    path = Path(daemon.policy_path)
    write_policy(path, {"psi_saturation"})
    daemon.reload_policy()
    first = daemon.attachments.triggers
    assert isinstance(first, PsiTriggers) and first.resources == ("cpu", "io", "memory")
    path.write_text(
        path.read_text().replace(
            "  psi_saturation:\n    enabled: true",
            "  psi_saturation:\n    enabled: true\n    resources: [io]\n    some_pct: 20",
        )
    )
    daemon.reload_policy()
    second = daemon.attachments.triggers
    assert isinstance(second, PsiTriggers) and second is not first
    assert second.resources == ("io",) and second.threshold_us < first.threshold_us
    daemon.reload_policy()  # unchanged settings: the same triggers stay armed
    assert daemon.attachments.triggers is second


def test_reload_attaches_and_detaches_the_network_program(tmp_path: Path) -> None:
    import socket

    from linnixd.collector.net import NetCollector

    path = tmp_path / "rules.yaml"
    write_policy(path, {"fork_storm"})
    policy = load_policy(path)
    attachments = Attachments(make_sched=None, make_triggers=None, make_net=NetCollector)
    assert attachments.sync(policy) == []
    model = HostModel(
        max_processes=policy.daemon.max_processes, max_cgroups=policy.daemon.max_cgroups
    )
    model.seed()
    d = Daemon(str(path), policy, attachments=attachments, model=model)
    try:
        before = bpf_prog_fds()
        d.tick()
        assert d.net is None and d.status()["network_attribution"] is False
        assert d.tick().net_total is None

        write_policy(path, {"fork_storm", "connection_churn"})
        d.reload_policy()
        assert d.net is not None and d.status()["network_attribution"] is True
        assert bpf_prog_fds() == before + 2  # inet_sock_set_state, tcp_retransmit_skb
        d.tick()  # the baseline since attach
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        for _ in range(3):
            socket.create_connection(srv.getsockname()).close()
            srv.accept()[0].close()
        srv.close()
        snap = d.tick()
        assert snap.net_by_pid[os.getpid()].connects == 3
        assert d.health()["net"].counters["connects"] >= 3

        write_policy(path, {"fork_storm"})
        d.reload_policy()
        assert d.net is None and bpf_prog_fds() == before
    finally:
        d.close()
