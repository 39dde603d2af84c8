"""Calm ticks: while nothing happens the daemon ticks calm_tick_s apart; any activity brings tick_s back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from snapshots import proc, psi, snap

from linnixd.config import load_policy
from linnixd.daemon import CALM_CPU_PCT, CALM_MEM_FALL_BPS, Daemon
from linnixd.model import Culprit, Finding, LifecycleCounts, NetCounts, Snapshot

ROOT = Path(__file__).resolve().parent.parent
POLICY = str(ROOT / "policy" / "rules.yaml")
QUIET = [proc(100, cpu=0.4), proc(200, cpu=1.0)]


def daemon_with(*snaps: Snapshot, policy_path: str = POLICY) -> Daemon:
    daemon = Daemon(policy_path, load_policy(policy_path))
    daemon.window.extend(snaps)
    return daemon


def with_(s: Snapshot, **changes: Any) -> Snapshot:
    from dataclasses import replace

    return replace(s, **changes)


def test_a_calm_host_ticks_calm_tick_s_apart_and_counts_it() -> None:
    daemon = daemon_with(snap(0, QUIET), snap(1, QUIET))
    policy = daemon.policy.daemon
    assert (policy.tick_s, policy.calm_tick_s) == (0.5, 1.0)  # the shipped defaults
    assert daemon.next_tick_s() == 1.0
    assert daemon.next_tick_s() == 1.0
    assert daemon.own_health().counters["calm_ticks"] == 2
    assert daemon.longest_tick_s() == 1.0


@pytest.mark.parametrize(
    "what, newest",
    [
        ("a process using CPU", snap(1, [proc(100, cpu=CALM_CPU_PCT + 0.5)])),
        (
            "processes using CPU together",
            snap(1, [proc(p, cpu=CALM_CPU_PCT / 2) for p in (100, 200, 300)]),
        ),
        ("the host's CPU", with_(snap(1, QUIET), cpu_util_pct=CALM_CPU_PCT)),
        ("one fork", snap(1, QUIET, by_parent={1: LifecycleCounts(forks=1)})),
        ("one thread", snap(1, QUIET, by_parent={1: LifecycleCounts(threads=1)})),
        ("one exit", snap(1, QUIET, by_parent={1: LifecycleCounts(exits=1)})),
        ("one connection", with_(snap(1, QUIET), net_total=NetCounts(connects=1))),
        ("one retransmit", with_(snap(1, QUIET), net_total=NetCounts(retransmits=1))),
        ("cpu pressure in the interval", snap(1, QUIET, system_pressure={"cpu": psi(5.0)})),
        (
            "io pressure in the last 10 s",
            snap(1, QUIET, system_pressure={"io": psi(0.0, avg10=6.0)}),
        ),
    ],
)
def test_any_activity_brings_tick_s_back(what: str, newest: Snapshot) -> None:
    daemon = daemon_with(snap(0, QUIET), newest)
    assert daemon.next_tick_s() == 0.5, what
    assert daemon.calm_ticks == 0


def test_kernel_threads_do_not_break_calm_but_a_user_process_beside_them_does() -> None:
    """kdamond at 30% of one CPU (15% of a 2-CPU host, all of it the kthread's) is housekeeping:
    still calm. The same host CPU from a user process is not."""
    kdamond = proc(79, 2, "kdamond.0", cpu=30.0)
    kthreadd = proc(2, 0, "kthreadd", cpu=CALM_CPU_PCT)
    busy_kernel = with_(snap(1, [*QUIET, kdamond, kthreadd]), cpu_util_pct=17.4, ncpu=2)
    assert daemon_with(snap(0, QUIET), busy_kernel).next_tick_s() == 1.0
    user = proc(300, 1, "worker", cpu=CALM_CPU_PCT)
    beside = with_(snap(1, [*QUIET, kdamond, user]), cpu_util_pct=17.4, ncpu=2)
    assert daemon_with(snap(0, QUIET), beside).next_tick_s() == 0.5
    # host CPU the processes do not explain (softirq, a process not read): counted as user
    unexplained = with_(snap(1, [*QUIET, kdamond]), cpu_util_pct=15.0 + CALM_CPU_PCT, ncpu=2)
    assert daemon_with(snap(0, QUIET), unexplained).next_tick_s() == 0.5


def test_memory_falling_fast_is_not_calm_and_slowly_is() -> None:
    gib = 1 << 30
    before = with_(snap(0, QUIET), mem_available_bytes=4 * gib)
    fast = with_(snap(1, QUIET), mem_available_bytes=4 * gib - int(CALM_MEM_FALL_BPS * 0.5) - 4096)
    slow = with_(snap(1, QUIET), mem_available_bytes=4 * gib - int(CALM_MEM_FALL_BPS * 0.5) + 4096)
    assert daemon_with(before, fast).next_tick_s() == 0.5
    assert daemon_with(before, slow).next_tick_s() == 1.0


class Always:
    rule = "cpu_spike"

    def evaluate(self, window: Any, cfg: Any) -> list[Finding]:
        c = Culprit("process", pid=os.getpid() + 100000, comm="hog", cgroup="/hog.scope")
        return [Finding(self.rule, "k", "warning", "hog", c, {})]


def test_an_open_incident_keeps_tick_s() -> None:
    daemon = daemon_with(snap(0, QUIET), snap(1, QUIET))
    daemon.detectors = {"cpu_spike": Always()}  # type: ignore[dict-item]
    assert daemon.evaluate() and daemon.tracker.open_incidents()
    assert daemon.next_tick_s() == 0.5


def test_calm_tick_s_not_above_tick_s_turns_calm_ticks_off(tmp_path: Path) -> None:
    text = Path(POLICY).read_text().replace("calm_tick_s: 1.0", "calm_tick_s: 0.5")
    assert "calm_tick_s: 0.5" in text
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    daemon = daemon_with(snap(0, QUIET), snap(1, QUIET), policy_path=str(path))
    assert daemon.next_tick_s() == 0.5
    assert daemon.calm_ticks == 0


def test_one_snapshot_is_not_enough_to_call_the_host_calm() -> None:
    assert daemon_with(snap(0, QUIET)).next_tick_s() == 0.5
