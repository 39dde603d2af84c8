"""Real-kernel tests of bpf/lifecycle.c and LifecycleCollector with real fork/exec/exit loads."""

from __future__ import annotations

import collections
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from linnixd.collector.bpfload import KernelFeatureError
from linnixd.collector.cgroups import cgroup2_mount
from linnixd.collector.lifecycle import LifecycleCollector
from linnixd.model import ExecRecord, ExitRecord, LifecycleCounts, LifecycleTick

pytestmark = pytest.mark.bpf

PY = "/usr/bin/python3"

FORKER = """
import os, sys
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""

THREADS_AND_FORKS = """
import os, threading
threads = [threading.Thread(target=lambda: None) for _ in range(7)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""

SHORT_JOBS = """
import subprocess
for _ in range(25):
    subprocess.run(["/bin/true"])
subprocess.run(["sh", "-c", "exit 3"])
subprocess.run(["sh", "-c", "ulimit -c 0; kill -SEGV $$"])
subprocess.run(["sh", "-c", "kill -TERM $$"])
subprocess.run(["sleep", "1"])
"""

# Waits for a line on stdin (sent once it is in the test cgroup), then forks 50 children.
CGROUP_FORKER = """
import os, sys
sys.stdin.readline()
for _ in range(50):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


class Seen:
    """Everything a run of reads returned, added up."""

    def __init__(self) -> None:
        self.total = LifecycleCounts()
        self.by_parent: dict[int, LifecycleCounts] = collections.defaultdict(LifecycleCounts)
        self.by_cgroup: dict[int, LifecycleCounts] = collections.defaultdict(LifecycleCounts)
        self.execs: list[ExecRecord] = []
        self.exits: list[ExitRecord] = []
        self.last: LifecycleTick | None = None

    def add(self, tick: LifecycleTick) -> None:
        self.total = self.total + tick.total
        for k, v in tick.by_parent.items():
            self.by_parent[k] = self.by_parent[k] + v
        for k, v in tick.by_cgroup_id.items():
            self.by_cgroup[k] = self.by_cgroup[k] + v
        self.execs.extend(tick.execs)
        self.exits.extend(tick.exits)
        self.last = tick


def proc_stat_processes() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("processes "):
                return int(line.split()[1])
    raise AssertionError("/proc/stat has no processes line")


def quiet_read(col: LifecycleCollector, seen: Seen) -> int:
    """Read the collector between two equal /proc/stat fork counts; returns that count."""
    for _ in range(2000):
        before = proc_stat_processes()
        # copy_process() bumps /proc/stat's count a little before task_newtask fires: let a
        # fork counted in `before` reach the tracepoint before the collector is read
        time.sleep(0.005)
        seen.add(col.read())
        if proc_stat_processes() == before:
            return before
        time.sleep(0.002)
    pytest.fail("the host never stopped forking long enough for an exact comparison")


@pytest.fixture(scope="module")
def collector() -> Iterator[LifecycleCollector]:
    col = LifecycleCollector(1.0)
    col.start()
    try:
        yield col
    finally:
        col.close()


def run_and_read(col: LifecycleCollector, argv: list[str]) -> tuple[int, Seen]:
    """Run argv to completion between two reads; returns its pid and what the reads saw."""
    col.read()
    child = subprocess.Popen(argv)
    assert child.wait(timeout=60) == 0
    seen = Seen()
    seen.add(col.read())  # exits are counted before wait() returns, records emitted with them
    return child.pid, seen


def test_forks_match_proc_stat_exactly(collector: LifecycleCollector) -> None:
    start = quiet_read(collector, Seen())  # what came before is not compared
    seen = Seen()
    forker = subprocess.Popen([PY, "-c", FORKER, "300"])
    assert forker.wait(timeout=60) == 0
    subprocess.run(
        ["stress-ng", "--fork", "1", "--fork-ops", "2000", "-t", "60", "-q"],
        check=True,
        timeout=120,  # the op count ends it; -t only bounds a starved run
        stdout=subprocess.DEVNULL,
    )
    end = quiet_read(collector, seen)
    assert seen.total.forks + seen.total.threads == end - start
    assert seen.total.forks >= 300 + 2000
    assert seen.by_parent[forker.pid] == LifecycleCounts(forks=300, exits=300)


def test_threads_and_processes_are_told_apart(collector: LifecycleCollector) -> None:
    pid, seen = run_and_read(collector, [PY, "-c", THREADS_AND_FORKS])
    assert seen.by_parent[pid] == LifecycleCounts(forks=5, threads=7, exits=5)
    assert not [r for r in seen.exits if r.ppid == pid]  # never exec'd, short: counted only


def test_short_lived_jobs_counts_and_records(collector: LifecycleCollector) -> None:
    collector.set_short_lived(0.5)
    try:
        t0 = time.monotonic()
        pid, seen = run_and_read(collector, [PY, "-c", SHORT_JOBS])
        t1 = time.monotonic()
    finally:
        collector.set_short_lived(1.0)
    # 29 exec'd children; all but `sleep 1` lived under 0.5 s.
    expected = LifecycleCounts(forks=29, threads=0, execs=29, exits=29, short_exits=28)
    assert seen.by_parent[pid] == expected

    execs = [r for r in seen.execs if r.ppid == pid]
    assert collections.Counter(r.comm for r in execs) == {"true": 25, "sh": 3, "sleep": 1}
    exits = {r.pid: r for r in seen.exits if r.ppid == pid}
    assert {r.pid for r in execs} == set(exits)
    by_comm = collections.defaultdict(list)
    for r in exits.values():
        by_comm[r.comm].append(r)
        assert t0 <= r.ts <= t1
        assert r.lifetime_s is not None
    assert len(by_comm["true"]) == 25
    for r in by_comm["true"]:
        assert (r.exit_code, r.signal) == (0, None)
        assert 0 < r.lifetime_s < 0.5  # type: ignore[operator]
    sh = sorted(((r.exit_code, r.signal) for r in by_comm["sh"]), key=str)
    # exit 3; SIGSEGV (a crash signal, delivered as itself); SIGTERM from kill() reaches the
    # kernel's exit path as a group SIGKILL, so its cause is reported as unknown.
    assert sh == sorted([(3, None), (None, 11), (None, None)], key=str)
    [sleep] = by_comm["sleep"]
    assert sleep.exit_code == 0 and sleep.lifetime_s is not None and 1.0 <= sleep.lifetime_s < 5.0
    parent_exit = [r for r in seen.exits if r.pid == pid]
    assert parent_exit and parent_exit[0].comm == "python3" and parent_exit[0].ppid == os.getpid()


def test_cgroup_attribution(collector: LifecycleCollector) -> None:
    mount = cgroup2_mount()
    assert mount is not None, "no cgroup2 mount in /proc/self/mountinfo"
    group = Path(mount) / f"linnixd-test-lifecycle-{os.getpid()}"
    group.mkdir()
    try:
        cid = os.stat(group).st_ino
        collector.read()
        child = subprocess.Popen([PY, "-c", CGROUP_FORKER], stdin=subprocess.PIPE, text=True)
        (group / "cgroup.procs").write_text(str(child.pid))
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0
        seen = Seen()
        seen.add(collector.read())
        # The 50 children and the forker itself exit inside the group; the forker was exec'd
        # (before it moved), so it is short-lived exactly when its exit record says so.
        [forker] = [r for r in seen.exits if r.pid == child.pid]
        assert forker.cgroup_id == cid and forker.lifetime_s is not None
        short = 1 if forker.lifetime_s < 1.0 else 0
        assert seen.by_cgroup[cid] == LifecycleCounts(forks=50, exits=51, short_exits=short)
        assert seen.by_parent[child.pid].forks == 50
    finally:
        group.rmdir()


@pytest.mark.parametrize("ringbuf", [True, False], ids=["ringbuf", "perfbuf"])
def test_tiny_buffer_drops_are_counted_not_lost(ringbuf: bool) -> None:
    col = LifecycleCollector(1.0, use_ringbuf=ringbuf, buffer_pages=1)
    col.start()
    try:
        seen = Seen()
        seen.add(col.read())
        # Nothing reads the one-page buffer(s) while 300 execs (and their exits) go through.
        burst = "for i in $(seq 300); do /bin/true; done"
        subprocess.run(["sh", "-c", burst], check=True, timeout=60)
        for _ in range(500):
            seen.add(col.read())
            drops = col.dropped_records()
            if len(seen.execs) + drops["exec"] == seen.total.execs:
                break
            time.sleep(0.002)  # an exec landed between the counter read and the buffer drain
        assert seen.last is not None
        assert drops["exec"] > 0
        assert seen.last.dropped_events == drops["exec"] + drops["exit"]
        assert len(seen.execs) + drops["exec"] == seen.total.execs
        assert seen.total.execs >= 300
    finally:
        col.close()


def test_perf_buffer_transport() -> None:
    col = LifecycleCollector(1.0, use_ringbuf=False)
    col.start()
    try:
        assert col.transport == "perfbuf"
        script = "import subprocess\nfor _ in range(5): subprocess.run(['/bin/true'])\n"
        pid, seen = run_and_read(col, [PY, "-c", script])
        assert [r.comm for r in seen.execs if r.ppid == pid] == ["true"] * 5
        assert [(r.comm, r.exit_code) for r in seen.exits if r.ppid == pid] == [("true", 0)] * 5
        assert seen.by_parent[pid] == LifecycleCounts(forks=5, execs=5, exits=5, short_exits=5)
    finally:
        col.close()


def test_idle_keys_of_dead_parents_are_pruned() -> None:
    col = LifecycleCollector(1.0, prune_after_ticks=2)
    col.start()
    try:
        pid, seen = run_and_read(col, [PY, "-c", FORKER, "3"])
        assert seen.by_parent[pid] == LifecycleCounts(forks=3, exits=3)
        pruned = col.pruned_keys
        for _ in range(3):
            col.read()
        keys = {int(k.value) for k in col._bpf[b"by_parent"]}  # the kernel map itself
        assert pid not in keys
        assert os.getpid() in keys  # idle too, but alive: kept
        assert col.pruned_keys > pruned
    finally:
        col.close()


def test_missing_source_is_a_kernel_feature_error() -> None:
    col = LifecycleCollector(1.0, src=Path("/nonexistent/lifecycle.c"))
    with pytest.raises(KernelFeatureError, match=r"lifecycle\.c"):
        col.start()
    col.close()


def test_keyed_maps_are_walked_only_while_totals_move_and_lose_nothing() -> None:
    col = LifecycleCollector(1.0)
    col.start()
    try:
        col.read()
        parents = col._parents
        assert parents is not None
        child = subprocess.Popen([PY, "-c", FORKER, "4"])
        assert child.wait(timeout=60) == 0
        walks = parents.walks
        # told the totals stood still, the map is not walked and nothing is reported yet...
        assert parents.read(False) == {} and parents.read(False) == {}
        assert parents.walks == walks
        # ...and the next walk reports everything the skipped reads left: deltas are exact
        later = parents.read(True)
        assert later[child.pid] == LifecycleCounts(forks=4, exits=4)
        assert parents.walks == walks + 1
        assert parents.idle(child.pid) == 0
        assert col.health().counters["map_walks"] >= 1
    finally:
        col.close()
