"""Per-process CPU time from bpf/sched.c (real kernel) and the host model that reads only what ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from linnixd.collector.procfs import CLK_TCK
from linnixd.collector.sched import SchedCollector
from linnixd.hostmodel import HostModel
from linnixd.model import LifecycleCounts, Snapshot

pytestmark = pytest.mark.bpf

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
SLEEPERS = (
    "import os, signal, sys\npids = []\n"
    "for _ in range({n}):\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        while True: signal.pause()\n"
    "    pids.append(pid)\n"
    "print(' '.join(map(str, pids)), flush=True)\nsys.stdin.readline()\n"
    "for p in pids: os.kill(p, 9)\n"
)


@pytest.fixture(scope="module")
def sched() -> Iterator[SchedCollector]:
    s = SchedCollector()
    s.start()
    yield s
    s.close()


def stat_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_burst_that_exits_between_two_reads_is_counted_exactly(sched: SchedCollector) -> None:
    reader = sched.task_cpu()
    reader.read()
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.6)])
    _, status, usage = os.wait4(child.pid, 0)
    assert status == 0
    truth_ns = (usage.ru_utime + usage.ru_stime) * 1e9
    tick = reader.read()
    assert child.pid in tick.exited  # its leader's last switch-out was seen
    got = tick.ns_by_tgid.get(child.pid, 0)
    # a /proc scan taken before it started and after it ended would have seen nothing at all
    assert abs(got - truth_ns) <= 0.1 * truth_ns + 20e6, (got, truth_ns)
    assert got >= 0.6e9 * 0.95


def test_busy_process_matches_the_kernels_own_count(sched: SchedCollector) -> None:
    reader = sched.task_cpu()
    busy = subprocess.Popen([sys.executable, "-c", BURN.format(s=30)])
    try:
        time.sleep(0.3)
        reader.read()
        t0 = stat_ticks(busy.pid)
        total = 0
        for _ in range(4):
            time.sleep(0.5)
            total += reader.read().ns_by_tgid.get(busy.pid, 0)
        truth_s = (stat_ticks(busy.pid) - t0) / CLK_TCK
        assert truth_s > 0.2  # it did run (the machine may be loaded)
        # the open segment of a running thread is included: no lag of a whole tick
        assert abs(total / 1e9 - truth_s) <= 0.15 * truth_s + 0.05, (total / 1e9, truth_s)
    finally:
        busy.kill()
        busy.wait()


def test_host_model_reads_only_processes_that_ran(sched: SchedCollector) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", SLEEPERS.format(n=300)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    busy = subprocess.Popen([sys.executable, "-c", BURN.format(s=30)])
    try:
        assert holder.stdout is not None
        sleepers = [int(p) for p in holder.stdout.readline().split()]
        model = HostModel(max_processes=32768, max_cgroups=4096, cpu=sched.task_cpu())
        model.seed()
        assert set(sleepers) <= set(model.scanner.procs)
        seeded = model.scanner.counters.reads
        snaps: list[Snapshot] = []
        for _ in range(4):
            time.sleep(0.5)
            snaps.append(model.snapshot(None, time.monotonic(), time.time()))
        per_tick = (model.scanner.counters.reads - seeded) / len(snaps)
        assert seeded >= 300
        # 300 sleepers and the rest of the host are not re-read: only what ran (a few dozen)
        assert per_tick < 100, per_tick
        last = snaps[-1]
        assert set(sleepers) <= set(last.processes)  # still known, with their last sample
        assert last.changed is not None and not (set(sleepers) & last.changed)
        assert all(last.processes[p].cpu_pct == 0.0 for p in sleepers)
        assert last.processes[busy.pid].cpu_pct >= 15.0  # it ran, so it was read
        # a killed sleeper leaves the table at the next tick through its exit note
        victim = sleepers[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)
        gone = model.snapshot(None, time.monotonic(), time.time())
        assert victim in last.processes and victim not in gone.processes
        # an older snapshot in the window keeps only what changed in its interval
        slim = last.slim()
        assert busy.pid in slim.processes and not (set(sleepers) & set(slim.processes))
        assert slim.processes[busy.pid] is last.processes[busy.pid]
        health = sched.health()
        assert health.counters["ran_overflows"] == 0
    finally:
        busy.kill()
        busy.wait()
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait()


def test_slim_without_changes_is_itself() -> None:
    snap = Snapshot(
        ts=1.0,
        wall=1.0,
        interval_s=0.5,
        ncpu=2,
        processes={},
        total=LifecycleCounts(),
        by_parent={},
        by_cgroup={},
        cgroups={},
        system_pressure={},
        cpu_util_pct=0.0,
    )
    assert snap.slim() is snap  # changed=None: a synthetic or /proc-scan snapshot, all fresh
