"""End to end: the real daemon (real BPF) names each demo workload as the culprit of its rule.

One daemon per module (default policy, JSON on stdout, read by a thread); each demo runs in
its own cgroup2 directory via --cgroup, one after the other, and is stopped once its alert
has been checked. Needs root.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from foreground import PYTHON, ROOT
from foreground import ForegroundDaemon as Daemon

from linnixd.collector.cgroups import cgroup2_mount as find_cgroup2_mount
from linnixd.demos import DEMOS

START_RE = re.compile(
    r"^demo (?P<name>[a-z-]+): pid (?P<pid>\d+) \((?P<comm>[^)]+)\) in cgroup (?P<cgroup>\S+), "
    r"expecting rule (?P<rule>\w+)$"
)

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root"),
]


def cgroup2_mount() -> Path:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount in /proc/self/mountinfo"
    return Path(mount)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


class Demo:
    """A demo in a fresh cgroup2 directory, its start line parsed; stopped and removed on exit."""

    def __init__(self, name: str, *extra: str) -> None:
        given = [float(v) for k, v in itertools.pairwise(extra) if k == "--duration"]
        self.duration = given[0] if given else DEMOS[name].duration_s
        self.cgroup_dir = cgroup2_mount() / f"lx-it-{os.getpid()}-{name}"
        self.cgroup_dir.mkdir()
        self.t0, self.usage0 = time.monotonic(), self.usage_s()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "linnixd.demos", name, "--cgroup", str(self.cgroup_dir), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().rstrip("\n")
        m = START_RE.match(line)
        if m is None:
            self.__exit__()
            raise AssertionError(f"unexpected start line {line!r}")
        self.pid = int(m["pid"])
        self.comm = m["comm"]
        self.cgroup = m["cgroup"]
        self.rule = m["rule"]
        self.out = ""  # what the demo printed after its start line (read when it ends)
        assert self.cgroup == "/" + self.cgroup_dir.name

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the demo kills its whole process group
        self.out, _ = self.proc.communicate(timeout=15)
        deadline = time.monotonic() + 5
        procs = self.cgroup_dir / "cgroup.procs"
        while procs.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.cgroup_dir.rmdir()

    def usage_s(self) -> float:
        """CPU seconds used in this demo's cgroup so far (cpu.stat: exited tasks included)."""
        for line in (self.cgroup_dir / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
        raise AssertionError(f"no usage_usec in {self.cgroup_dir}/cpu.stat")

    def cpu_pct(self) -> float:
        """Average CPU of the demo's cgroup over its run so far, in percent of one CPU."""
        return 100 * (self.usage_s() - self.usage0) / min(time.monotonic() - self.t0, self.duration)

    def ours(self, alert: dict[str, Any]) -> bool:
        return (
            alert.get("rule") == self.rule
            and alert.get("state") == "firing"
            and alert.get("cgroup") == self.cgroup
        )


def wait_cpu_alert(daemon: Daemon, demo: Demo, timeout: float, need_pct: float) -> dict[str, Any]:
    """The demo's alert; a skip, not a failure, when the shared host never gave it the CPU."""
    try:
        return daemon.wait_alert(demo.ours, timeout, demo.rule)
    except AssertionError:
        got = demo.cpu_pct()
        if got < need_pct:
            pytest.skip(
                f"host too busy: {demo.rule} demo got {got:.0f}% of a CPU on average, "
                f"needs {need_pct:g}%"
            )
        raise


@pytest.mark.slow
def test_idle_host_gives_no_alert(daemon: Daemon) -> None:
    """30 s with no demo: nothing blames the daemon or this test, and a quiet host gets no alert.

    Other engineers' workloads on the shared host are real culprits, not false positives:
    when they are alerted on, the no-alert half is skipped (after the self-blame check).
    """
    before = len(daemon.alerts)
    time.sleep(30)
    new = daemon.alerts[before:]
    ours = {daemon.proc.pid, os.getpid()}
    blamed = [a["summary"] for a in new if {a.get("pid"), a.get("root_pid")} & ours]
    assert blamed == []
    others = [a["summary"] for a in new]
    if others:
        pytest.skip(
            f"host not idle: {len(others)} alerts about other workloads, first: {others[0]}"
        )


def test_fork_storm_names_the_forking_parent(daemon: Daemon) -> None:
    missed: AssertionError | None = None
    with Demo("fork-storm", "--duration", "5") as demo:
        assert demo.rule == "fork_storm"
        try:
            alert = daemon.wait_alert(demo.ours, 15, "fork_storm")
        except AssertionError as exc:
            missed = exc
    if missed is not None:
        # fork_storm needs every tick interval of 2 s above 10/s: a demo the host starved for
        # most of a tick (it says so) cannot show the rule; one that was not starved and got
        # no alert is a failure
        m = re.search(r"between two ([\d.]+) s", demo.out)
        if m is not None and float(m[1]) > 0.3:
            pytest.skip(f"host too busy: the fork-storm demo was starved ({demo.out.strip()})")
        raise AssertionError(f"{missed}; demo: {demo.out.strip()[-200:]}")
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-forkstorm"
    assert alert["kind"] == "process"
    ev = alert["evidence"]
    assert ev["rate_per_s"] > 10 and ev["cgroup"] == demo.cgroup
    assert ev["top_parents"][0]["pid"] == demo.pid and ev["top_parents"][0]["share"] >= 0.9


def test_short_jobs_names_the_parent(daemon: Daemon) -> None:
    with Demo("short-jobs") as demo:
        assert demo.rule == "short_lived_jobs"
        alert = daemon.wait_alert(demo.ours, 20, "short_lived_jobs")
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-shortjobs"
    ev = alert["evidence"]
    assert ev["count"] >= 20
    assert ev["comms"][0]["comm"] == "false"
    assert ev["longest_lifetime_s"] is None or ev["longest_lifetime_s"] < 1.0
    # no fork storm from 8 jobs/s
    storms = [a for a in daemon.alerts if a["rule"] == "fork_storm"]
    assert not any(a.get("cgroup") == demo.cgroup for a in storms)


def test_cpu_spike_names_the_busy_process(daemon: Daemon) -> None:
    with Demo("cpu-spike") as demo:
        assert demo.rule == "cpu_spike"
        alert = wait_cpu_alert(daemon, demo, 20, 60)
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-cpuspike"
    assert alert["evidence"]["cpu_pct"] > 50 and alert["evidence"]["samples"] >= 2


def test_runaway_tree_names_the_parent_of_the_tree(daemon: Daemon) -> None:
    with Demo("runaway-tree") as demo:
        assert demo.rule == "runaway_tree"
        alert = wait_cpu_alert(daemon, demo, 25, 95)
        spikes = [a for a in daemon.alerts if a["rule"] == "cpu_spike"]
        spiked = [a for a in spikes if a.get("cgroup") == demo.cgroup]
    ev = alert["evidence"]
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-runaway"
    assert ev["root_pid"] == demo.pid and ev["processes"] == 5
    assert ev["subtree_cpu_pct"] > 90
    # no single member is a cpu spike (a member's one-tick figure may jump past 50% on a
    # loaded host as it catches up on starved time; the cpu_spike rule looks at 5 s)
    assert spiked == []
    assert sum(m["cpu_pct"] for m in ev["top_members"]) / len(ev["top_members"]) < 50


def test_memory_leak_names_the_growing_process(daemon: Daemon) -> None:
    with Demo("memory-leak", "--fast") as demo:
        assert demo.rule == "memory_leak"
        alert = daemon.wait_alert(
            lambda a: demo.ours(a) and a.get("pid") is not None, 90, "memory_leak"
        )
    ev = alert["evidence"]
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-memleak"
    assert ev["r2"] >= 0.8 and ev["growth_mb"] >= 50
    # --fast grows 5 MB/s = 300 MB/min; allow for the shared host
    assert 200 <= ev["slope_mb_per_min"] <= 360, ev


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_fast_leak_named_within_seconds_with_time_to_limit(daemon: Daemon) -> None:
    """10 MB/s for 40 s: named seconds after 50 MB were crossed (not after a 54 s series)."""
    with Demo("memory-leak", "--rate", "10", "--duration", "40") as demo:
        # the cgroup's name is the earlier leak test's: this demo's own pid tells them apart
        alert = daemon.wait_alert(
            lambda a: demo.ours(a) and a.get("pid") == demo.pid, 40, "memory_leak"
        )
        after_s = time.monotonic() - demo.t0
        rss_at_alert = rss_mb(demo.pid)
    ev = alert["evidence"]
    print(f"alert {after_s:.1f} s after the start: {alert['summary']}")
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-memleak"
    assert ev["mode"] == "fast" and ev["r2"] >= 0.8
    # 50 MB are crossed 5 s in; the fit needs min_span_s (10 s); the rest is a loaded host's slack
    assert after_s <= 25, after_s
    assert ev["growth_mb"] >= 50 and ev["span_s"] >= 10
    assert ev["rss_now_mb"] <= rss_at_alert + 1 and ev["rss_now_mb"] >= 50
    # 10 MB/s = 600 MB/min, less what a busy host delays
    assert 400 <= ev["slope_mb_per_min"] <= 700, ev
    # the projection: no cgroup limit here (v1 memory on the CI host), so the host's MemAvailable
    assert ev["limit_kind"] in ("MemAvailable", "memory.high", "memory.max")
    assert ev["eta_s"] is not None and ev["eta_s"] > 0
    rate_mb_s = ev["slope_mb_per_min"] / 60
    assert abs(ev["eta_s"] - ev["headroom_mb"] / rate_mb_s) <= 0.02 * ev["eta_s"] + 1


def test_fd_leak_names_the_process_near_its_limit(daemon: Daemon) -> None:
    with Demo("fd-leak") as demo:
        assert demo.rule == "fd_exhaustion"
        alert = daemon.wait_alert(demo.ours, 20, "fd_exhaustion")
    ev = alert["evidence"]
    assert alert["pid"] == demo.pid and alert["comm"] == "lx-fdleak"
    assert ev["fd_limit"] == 1024 and ev["fd_count"] >= 0.8 * 1024


def cgroup_pressure_total_us(cgroup_dir: Path, resource: str = "cpu") -> int:
    """The `some total=` of a cgroup's pressure file: stall microseconds since it was made."""
    first = (cgroup_dir / f"{resource}.pressure").read_text().splitlines()[0]
    return int(first.rsplit("total=", 1)[1])


def test_cpu_pressure_names_the_demo_cgroup(daemon: Daemon) -> None:
    with Demo("cpu-pressure") as demo:
        assert demo.rule == "psi_saturation"
        stall0 = cgroup_pressure_total_us(demo.cgroup_dir)
        alert = daemon.wait_alert(demo.ours, 20, "psi_saturation")
        measured_pct = (
            100
            * (cgroup_pressure_total_us(demo.cgroup_dir) - stall0)
            / 1e6
            / (time.monotonic() - demo.t0)
        )
    ev = alert["evidence"]
    print(alert["summary"], f"(measured over the run: {measured_pct:.0f}%)")
    assert alert["kind"] == "cgroup" and alert["pid"] is None and alert["cgroup"] == demo.cgroup
    assert ev["resource"] == "cpu" and ev["sustain_s"] == 5.0
    # more runnable spinners than CPUs: some task of the cgroup waits nearly all the time
    assert ev["min_some_pct"] > 40 and ev["some_pct"] >= 60
    assert measured_pct >= 60 and abs(ev["some_pct"] - measured_pct) <= 30


def host_busy_s() -> float:
    """CPU seconds the host spent busy since boot (all CPUs; /proc/stat less idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """(wall time, cgroup CPU s, host busy CPU s) every 0.25 s in a thread, to measure a window."""

    def __init__(self, cgroup_dir: Path) -> None:
        self.cgroup_dir = cgroup_dir
        self.samples: list[tuple[float, float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                used = cpu_usage_s(self.cgroup_dir) if self.cgroup_dir.exists() else 0.0
                self.samples.append((time.time(), used, host_busy_s()))
            except (OSError, AssertionError):
                pass  # the cgroup is being removed
            self.stop.wait(0.25)

    def window(self, start: float, end: float) -> tuple[float, float]:
        """The cgroup's CPU (% of one CPU) and its share of the busy CPU over [start, end]."""
        self.stop.set()
        self.thread.join()
        a = min(self.samples, key=lambda x: abs(x[0] - start))
        b = min(self.samples, key=lambda x: abs(x[0] - end))
        used, seconds = b[1] - a[1], b[0] - a[0]
        busy = b[2] - a[2]
        if start < a[0] and a[1] == 0.0:
            # the window began before the first sample, when the cgroup did not exist yet
            # (it used nothing then); the host's busy time is scaled to the whole window
            busy *= (end - start) / seconds
            seconds = end - start
        return 100 * used / seconds, used / max(1e-6, busy)


def test_circuit_breaker_names_the_demo_tree(daemon: Daemon) -> None:
    ncpu = len(os.sched_getaffinity(0))
    busy0 = host_busy_s()
    # from before the demo: the host may have been saturated (the window begun) before it started
    sampler = CpuSampler(cgroup2_mount() / f"lx-it-{os.getpid()}-circuit-breaker")
    time.sleep(1.0)
    with Demo("circuit-breaker") as demo:
        assert demo.rule == "circuit_breaker"
        try:
            alert = daemon.wait_alert(demo.ours, 35, "circuit_breaker")
        except AssertionError:
            sampler.stop.set()
            share = (demo.usage_s() - demo.usage0) / max(1e-6, host_busy_s() - busy0)
            if share < 0.5:
                pytest.skip(f"host too busy: the demo held only {share:.0%} of the busy CPU")
            raise
        ev = alert["evidence"]
        # measured over the very window the evidence covers (it may start before the demo)
        cpu_pct, share = sampler.window(alert["ts"] - ev["sustained_s"], alert["ts"])
    print(alert["summary"], f"(measured: {cpu_pct:.0f}% of a CPU, {share:.0%} of the busy CPU)")
    assert alert["kind"] == "tree" and alert["pid"] == demo.pid and alert["comm"] == "lx-breaker"
    assert alert["root_pid"] == demo.pid and ev["cgroup"] == demo.cgroup
    assert ev["tree_pids"] == 2 * ncpu + 2 + 1  # the leader and its spinners
    assert ev["cpu_util_pct"] > 90 and ev["cpu_some_pct"] > 40 and ev["sustained_s"] >= 15
    # the figures are the measured ones: the cgroup's CPU and its share of the busy CPU
    assert 0.75 * cpu_pct <= ev["cgroup_cpu_pct"] <= 1.25 * cpu_pct, (ev, cpu_pct)
    assert ev["cgroup_cpu_share"] >= 0.3 and abs(ev["cgroup_cpu_share"] - share) <= 0.15
    assert ev["tree_cpu_pct"] >= 0.5 * ev["cgroup_cpu_pct"]


def stop_and_remove(proc: subprocess.Popen[bytes], cgroup_dir: Path) -> None:
    """Kill a workload still running, then remove its cgroup (retried while its tasks exit)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for _ in range(50):
        try:
            cgroup_dir.rmdir()
            break
        except OSError:
            time.sleep(0.1)


def test_fork_storm_never_makes_pid1_a_circuit_breaker_culprit(daemon: Daemon) -> None:
    """stress-ng --fork 4 in its own cgroup: circuit_breaker, if it fires, names the storm's
    cgroup (or a tree that really held more of the CPU), never PID 1 for the storm's own wait."""
    # earlier tests' load (the circuit-breaker demo) must have left circuit_breaker's window
    last = max((a["ts"] for a in daemon.alerts if a.get("rule") == "circuit_breaker"), default=0.0)
    time.sleep(max(0.0, last + 17 - time.time()))
    storm = cgroup2_mount() / f"lx-it-{os.getpid()}-storm"
    storm.mkdir()
    path = "/" + storm.name
    seen = len(daemon.alerts)
    busy0 = host_busy_s()
    usage0 = cpu_usage_s(storm)

    def enter() -> None:
        (storm / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.Popen(
        ["stress-ng", "--fork", "4", "--timeout", "22s", "--quiet"], preexec_fn=enter
    )
    try:
        proc.wait(timeout=60)
        time.sleep(1.5)  # the last ticks
        share = (cpu_usage_s(storm) - usage0) / (host_busy_s() - busy0)
    finally:
        stop_and_remove(proc, storm)
    fired = [a for a in daemon.alerts[seen:] if a.get("rule") == "circuit_breaker"]
    for a in fired:
        print(a["summary"])
    print(f"storm: {share:.0%} of the busy CPU, {len(fired)} circuit_breaker alerts")
    for a in fired:
        ev = a["evidence"]
        assert a.get("pid") != 1 and a.get("root_pid") != 1, a["summary"]
        if a["state"] != "firing" or ev["cgroup"] == path:
            continue
        # someone else was named: only if it really held more of the CPU than the storm
        assert ev["cgroup_cpu_share"] >= share, (a["summary"], share)
    storm_alerts = [a for a in fired if a["evidence"]["cgroup"] == path and a["state"] == "firing"]
    for a in storm_alerts:
        ev = a["evidence"]
        assert ev["cgroup_cpu_share"] >= 0.3 and ev["stall_caused_ms"] >= 0
        assert all(
            v["cgroup"] != path for v in ev["victims"]
        )  # its own wait is not stall it caused


def test_exec_churn_is_one_incident_per_parent(daemon: Daemon) -> None:
    """stress-ng --exec 4 in its own cgroup: each parent's churn is one short_lived_jobs
    incident, also once the parent has exited (no second "unknown[PID]" incident)."""
    cg = cgroup2_mount() / f"lx-it-{os.getpid()}-exec"
    cg.mkdir()
    path = "/" + cg.name
    seen = len(daemon.alerts)

    def enter() -> None:
        (cg / "cgroup.procs").write_text(str(os.getpid()))
        os.setgid(65534)  # stress-ng's exec stressor refuses to run as root
        os.setuid(65534)

    proc = subprocess.Popen(
        ["stress-ng", "--exec", "4", "--timeout", "12s", "--quiet"], preexec_fn=enter, cwd="/tmp"
    )
    try:
        proc.wait(timeout=60)
        time.sleep(5)  # the parents are gone: their incidents must not come back as new ones
    finally:
        stop_and_remove(proc, cg)
    fired = [
        a
        for a in daemon.alerts[seen:]
        if a.get("rule") == "short_lived_jobs" and a["state"] == "firing" and a["cgroup"] == path
    ]
    for a in fired:
        print(a["summary"])
    if not fired:
        pytest.skip("host too busy: stress-ng's exec'd processes did not churn fast enough")
    parents = [a["pid"] for a in fired if a["kind"] == "process"]
    assert len(parents) == len(set(parents)), [a["summary"] for a in fired]
    assert all(a["evidence"]["count"] >= 20 for a in fired)


def cpu_usage_s(cgroup_dir: Path) -> float:
    for line in (cgroup_dir / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    raise AssertionError(f"no usage_usec in {cgroup_dir}/cpu.stat")


def test_fork_counts_agree_with_proc_stat(daemon: Daemon) -> None:
    """The daemon's forks+threads over a storm lie within what /proc/stat says could have happened.

    Its counters are read each tick (0.5 s), so each end is bracketed by /proc/stat reads one
    second apart around the SIGUSR1 snapshot.
    """
    low0, s0, high0 = daemon.bracket()
    with Demo("fork-storm", "--duration", "3") as demo:
        assert demo.proc.wait(timeout=15) == 0
    time.sleep(1.0)
    low1, s1, high1 = daemon.bracket()
    counted = sum(s1["totals"][k] - s0["totals"][k] for k in ("forks", "threads"))
    assert low1 - high0 <= counted <= high1 - low0, (counted, low1 - high0, high1 - low0)
    assert counted >= 600  # 3 s at 200/s from the demo alone
    assert s1["counters"]["dropped_events"] == 0 and s1["counters"]["aggregation_overflows"] == 0


def test_daemon_stops_cleanly_with_exit_stats(daemon: Daemon) -> None:
    daemon.stats = queue.Queue()  # only what the exit prints
    assert daemon.stop() == 0
    final = daemon.stats.get(timeout=5)
    assert final["ticks"] > 0
    failures = [line for line in daemon.log if "failed" in line]
    assert final["detector_errors"] == 0 and final["tick_errors"] == 0, failures
    assert final["counters"]["dropped_events"] == 0
    assert final["totals"]["forks"] >= 600
