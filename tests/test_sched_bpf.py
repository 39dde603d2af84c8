"""Real-kernel tests of bpf/sched.c + SchedCollector: pinned cgroup2 experiments on one CPU."""

from __future__ import annotations

import os
import re
import subprocess
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from linnixd.collector.cgroups import cgroup2_mount
from linnixd.collector.psi import parse_pressure
from linnixd.collector.sched import NSLOTS, NSTATS, SchedCollector, _Deltas, switch_state_flags
from linnixd.detectors.stall import NoisyNeighbourDetector
from linnixd.hostmodel import HostModel
from linnixd.incidents import IncidentTracker
from linnixd.model import (
    Alert,
    PsiSample,
    Snapshot,
    StallEdge,
    StallSnapshot,
)

REPO = Path(__file__).resolve().parent.parent
PY = "/usr/bin/python3"
RUN_S = 4.0
TICK_S = 0.5

VICTIM = "import time\nend = time.monotonic() + {d}\nwhile time.monotonic() < end:\n    t = time.perf_counter()\n    while time.perf_counter() - t < 0.001: pass\n    time.sleep(0.01)\n"
SPIN = "import time\nend = time.monotonic() + {d}\nwhile time.monotonic() < end: pass\n"
SLEEP = "import time\ntime.sleep({d})\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root")


def _ns(d: Any) -> Any:
    if isinstance(d, dict):
        return types.SimpleNamespace(**{k: _ns(v) for k, v in d.items()})
    return d


def rule_cfg(name: str) -> Any:
    return _ns(yaml.safe_load((REPO / "policy" / "rules.yaml").read_text())["rules"][name])


def foreign_excluded(groups: dict[str, str], snaps: Sequence[Snapshot] = ()) -> Any:
    """noisy_neighbour policy that never blames cgroups outside this test (others load the host)."""
    cfg = rule_cfg("noisy_neighbour")
    mount, ours = groups["mount"], os.path.basename(groups["base"])
    tops = {f"/{d}" for d in os.listdir(mount) if os.path.isdir(f"{mount}/{d}") and d != ours}
    # cgroups that came and went during the run (other tests, other tools) are foreign too
    for snap in snaps:
        for edge in snap.stall.edges if snap.stall is not None else ():
            if not edge.culprit.startswith(f"/{ours}"):
                tops.add(edge.culprit)
    cfg.exclude.cgroups = ["/"] + sorted(tops) + [f"{t}/*" for t in sorted(tops)]
    return cfg


class InodeResolver:
    """cgroup id -> path by stat over the cgroup2 mount (the test's stand-in for CgroupResolver)."""

    def __init__(self, mount: str) -> None:
        self.mount = mount

    def __call__(self, cid: int) -> str | None:
        for directory, _, _ in os.walk(self.mount):
            try:
                if os.stat(directory).st_ino == cid:
                    rel = directory[len(self.mount) :]
                    return rel or "/"
            except FileNotFoundError:
                continue
        return None


@pytest.fixture(scope="module")
def collector() -> Iterator[SchedCollector]:
    c = SchedCollector()
    c.start()
    yield c
    c.close()


@pytest.fixture
def groups() -> Iterator[dict[str, str]]:
    mount = cgroup2_mount()
    assert mount is not None
    base = f"{mount}/linnixd-test-sched-{os.getpid()}"
    os.mkdir(base)
    made = {name: f"{base}/{name}" for name in ("victim", "culprit", "bystander", "gone", "churn")}
    for d in made.values():
        os.mkdir(d)
    made["mount"] = mount
    made["base"] = base
    yield made
    for d in [*list(made.values())[:-2][::-1], base]:
        if os.path.isdir(d):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.05)  # tasks still exiting


def rel(groups: dict[str, str], name: str) -> str:
    return groups[name][len(groups["mount"]) :]


def spawn(cg_dir: str, cpu: int, code: str) -> subprocess.Popen[bytes]:
    def enter() -> None:
        with open(cg_dir + "/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        os.sched_setaffinity(0, {cpu})

    return subprocess.Popen([PY, "-c", code], preexec_fn=enter)


def pressure(
    cg_dir: str, prev: tuple[float, int] | None, dt: float
) -> tuple[PsiSample, tuple[float, int]]:
    some_avg, full_avg, some_total, _full_total = parse_pressure(
        Path(cg_dir + "/cpu.pressure").read_text()
    )
    delta = some_total - prev[1] if prev else 0
    return PsiSample(some_avg, full_avg, delta, 0, dt), (some_avg, some_total)


def run_experiment(
    collector: SchedCollector,
    groups: dict[str, str],
    culprit_code: str,
    victim_code: str = VICTIM,
) -> tuple[list[Snapshot], list[StallSnapshot]]:
    """victim + culprit + bystander pinned to one CPU for RUN_S, through the daemon's own host
    model (cpu.stat, PSI, process table): one snapshot per tick, the older ones slimmed."""
    cpu = max(os.sched_getaffinity(0))
    model = HostModel(max_processes=16384, max_cgroups=4096, cpu=collector.task_cpu())
    resolve = model.resolve_cgroup
    others = [
        spawn(groups["bystander"], cpu, SLEEP.format(d=RUN_S + 1)),
        spawn(groups["culprit"], cpu, culprit_code.format(d=RUN_S + 1)),
    ]
    time.sleep(0.5)  # let their interpreters start: from here on one spins (or sleeps), one sleeps
    model.seed()
    collector.read(resolve)  # start the window here
    procs = [spawn(groups["victim"], cpu, victim_code.format(d=RUN_S))]
    snaps: list[Snapshot] = []
    stalls: list[StallSnapshot] = []
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(TICK_S)
            stall = collector.read(resolve)
            stalls.append(stall)
            if snaps:
                snaps[-1] = snaps[-1].slim()
            snaps.append(model.snapshot(None, time.monotonic(), time.time(), stall))
    finally:
        for p in procs + others:
            p.kill()
            p.wait()
    stalls.append(collector.read(resolve))
    return snaps, stalls


def every_tick(snaps: Sequence[Snapshot], cfg: Any) -> list[Any]:
    """noisy_neighbour findings at every tick, as the daemon evaluates its growing window."""
    out = []
    detector = NoisyNeighbourDetector()
    for i in range(1, len(snaps) + 1):
        out += detector.evaluate(snaps[:i], cfg)
    return out


def alerts_of(snaps: Sequence[Snapshot], cfg: Any, paths: set[str]) -> list[Alert]:
    """The firing alerts the incident tracker makes of those findings (about `paths` only)."""
    detector = NoisyNeighbourDetector()
    tracker = IncidentTracker(resolve_after_s=2.0)
    fired = []
    for i in range(1, len(snaps) + 1):
        found = [f for f in detector.evaluate(snaps[:i], cfg) if f.evidence["victim"] in paths]
        now = snaps[i - 1]
        fired += [
            a
            for a in tracker.update(found, now.ts, now.wall, {"noisy_neighbour": 300.0})
            if a.state == "firing"
        ]
    return fired


def edge_sum(stalls: list[StallSnapshot], victim: str, culprit: str) -> int:
    return sum(
        e.stall_us for s in stalls for e in s.edges if e.victim == victim and e.culprit == culprit
    )


def wait_sum(stalls: list[StallSnapshot], path: str) -> tuple[int, int]:
    rqs = [s.runqueue[path] for s in stalls if path in s.runqueue]
    return sum(r.wait_us for r in rqs), sum(r.waits for r in rqs)


@needs_root
def test_switch_state_flags_from_format() -> None:
    # 6.x kernels report a preempted prev as TASK_REPORT_MAX: one bit above "I" (0x80)
    flags = switch_state_flags()
    assert (flags["+"], flags["X"], flags["Z"], flags["I"]) == (0x100, 0x10, 0x20, 0x80)


def test_switch_state_flags_bad_format(tmp_path: Path) -> None:
    from linnixd.collector.bpfload import KernelFeatureError

    bad = tmp_path / "format"
    bad.write_text('name: sched_switch\nprint fmt: "prev_state=%s"\n')
    with pytest.raises(KernelFeatureError, match=r"has no prev_state flags \(X, Z\) to decode"):
        switch_state_flags(str(bad))
    with pytest.raises(KernelFeatureError, match="is tracefs mounted"):
        switch_state_flags(str(tmp_path / "missing"))


@needs_root
def test_culprit_gets_the_victims_stall(collector: SchedCollector, groups: dict[str, str]) -> None:
    snaps, stalls = run_experiment(collector, groups, SPIN)
    v, c, b = (rel(groups, n) for n in ("victim", "culprit", "bystander"))
    wait_us, waits = wait_sum(stalls, v)
    to_culprit = edge_sum(stalls, v, c)
    to_bystander = edge_sum(stalls, v, b)
    ours = to_culprit + to_bystander + edge_sum(stalls, v, v)
    print(
        f"victim wait {wait_us} us over {waits} waits, culprit {to_culprit} us, bystander {to_bystander} us"
    )
    assert waits >= 100  # ~RUN_S / 11 ms wake-ups, with margin for a loaded host
    assert wait_us >= 100_000
    assert to_culprit >= 0.8 * ours
    assert to_bystander == 0
    # the victim preempted the spinner's slice or was preempted by it: both are counted as edges
    assert (
        sum(e.preemptions for s in stalls for e in s.edges if {e.victim, e.culprit} == {v, c}) > 0
    )
    cfg = foreign_excluded(groups, snaps)
    fired = alerts_of(snaps, cfg, {v, c, b})
    # exactly one alert: culprit -> victim; never victim -> culprit, never the bystander
    assert [(a.culprit.cgroup, a.evidence["victim"]) for a in fired] == [(c, v)], [
        a.summary for a in fired
    ]
    findings = [f for f in every_tick(snaps, cfg) if f.evidence["victim"] in (v, c)]
    for f in findings:
        print(f.summary)
    assert findings, "the victim was kept from its share: the spinner must be named"
    # only the hog is ever a culprit, never the light periodic worker, in every alert
    assert {(f.culprit.cgroup, f.evidence["victim"]) for f in findings} == {(c, v)}
    for f in findings:
        ev = f.evidence
        assert f.key == f"cgroup:{c}->cgroup:{v}"
        assert ev["top_culprits"][0]["cgroup"] == c
        top = ev["top_culprits"][0]
        # measured: the spinner ran far more than the 1 ms-per-11 ms worker, which waited
        assert top["run_ms"] > 2 * ev["victim_run_ms"] > 0
        assert ev["wait_share"] >= 0.1 and top["victim_shortfall_ms"] > 0
        assert ev["runq_p50_us"] is not None and ev["runq_p99_us"] >= ev["runq_p50_us"]
        covered = snaps[-1].ts - snaps[0].ts + snaps[0].interval_s
        assert 0 < ev["window_s"] <= covered + 0.01  # the real span, never the policy's 10 s
        said = re.search(r"in the last (\d+\.\d) s$", f.summary)
        assert f.summary.startswith(f"{c} took ") and said is not None
        assert abs(float(said[1]) - ev["window_s"]) <= 0.051


@needs_root
def test_attribution_switched_off_keeps_cpu_time_and_measures_no_wait(
    collector: SchedCollector, groups: dict[str, str]
) -> None:
    """daemon.stall_attribution: pressure. Off, the spinner's CPU is still measured exactly and
    no wait or edge is recorded (the maps are not even walked); on again, the victim's stall is
    the culprit's, and waits queued before the switch-on are counted as no_enqueue."""
    v, c = rel(groups, "victim"), rel(groups, "culprit")
    collector.set_attribution(False)
    try:
        assert collector.health().gauges["attributing"] == 0
        snaps, stalls = run_experiment(collector, groups, SPIN)
    finally:
        collector.set_attribution(True)
    assert wait_sum(stalls, v) == (0, 0)
    assert sum(len(s.runqueue) + len(s.edges) for s in stalls[1:]) == 0  # nothing, anywhere
    spinner = max(
        (p for s in snaps[2:] for p in s.processes.values() if p.cgroup == c),
        key=lambda p: p.cpu_pct,
    )
    assert spinner.cpu_pct >= 40, spinner  # it shares one CPU with the victim: CPU time is kept
    before = collector.health()
    assert before.gauges["attributing"] == 1
    assert before.counters["attribution_switches"] >= 2
    snaps, stalls = run_experiment(collector, groups, SPIN)
    ours = edge_sum(stalls, v, c) + edge_sum(stalls, v, rel(groups, "bystander"))
    assert wait_sum(stalls, v)[0] >= 100_000
    assert edge_sum(stalls, v, c) >= 0.8 * (ours + edge_sum(stalls, v, v))


@needs_root
def test_two_equal_hogs_blame_neither(collector: SchedCollector, groups: dict[str, str]) -> None:
    snaps, stalls = run_experiment(collector, groups, SPIN, victim_code=SPIN)
    v, c = rel(groups, "victim"), rel(groups, "culprit")
    wait_us, _ = wait_sum(stalls, v)
    print(f"victim wait {wait_us} us, behind the other hog {edge_sum(stalls, v, c)} us")
    assert edge_sum(stalls, v, c) >= 100_000  # they really contended on the CPU
    cfg = foreign_excluded(groups, snaps)
    fired = alerts_of(snaps, cfg, {v, c})
    assert [a for a in fired if a.culprit.cgroup in (v, c)] == []
    assert len(fired) <= 1  # contention, if reported, once for the pair
    findings = every_tick(snaps, cfg)
    ours = [f for f in findings if f.evidence["victim"] in (v, c)]
    for f in ours:
        print(f.summary)
    assert [f for f in ours if f.culprit.cgroup in (v, c)] == []  # neither is blamed
    for f in ours:  # if anything, contention between both, blaming no cgroup
        assert f.culprit.kind == "system" and f.evidence["explained_by"] == "contention"
        assert f.key == f"contention:cgroup:{min(v, c)}+cgroup:{max(v, c)}"


@needs_root
def test_no_contention_no_alert(collector: SchedCollector, groups: dict[str, str]) -> None:
    snaps, stalls = run_experiment(collector, groups, SLEEP)
    v, c = rel(groups, "victim"), rel(groups, "culprit")
    wait_us, waits = wait_sum(stalls, v)
    print(f"victim wait {wait_us} us over {waits} waits without contention")
    assert waits >= 100
    assert edge_sum(stalls, v, c) == 0
    findings = NoisyNeighbourDetector().evaluate(snaps, rule_cfg("noisy_neighbour"))
    print("findings (others' load may stall the victim):", [f.summary for f in findings])
    assert [f for f in findings if f.evidence["victim"] == v and f.culprit.cgroup == c] == []
    # with foreign load out of the picture nothing of ours is blamed
    assert [
        f
        for f in NoisyNeighbourDetector().evaluate(snaps, foreign_excluded(groups, snaps))
        if f.evidence["victim"] == v
    ] == []


@needs_root
def test_vanished_cgroup_is_unresolved_not_misattributed(
    collector: SchedCollector, groups: dict[str, str]
) -> None:
    cpu = max(os.sched_getaffinity(0))
    resolve = InodeResolver(groups["mount"])
    gone_id = os.stat(groups["gone"]).st_ino
    collector.read(resolve)
    victim = spawn(groups["victim"], cpu, VICTIM.format(d=1.5))
    spinner = spawn(groups["gone"], cpu, SPIN.format(d=1.0))
    spinner.wait()
    os.rmdir(groups["gone"])  # gone mid-window: its id can no longer be resolved
    victim.wait()
    stall = collector.read(resolve)
    forgotten = collector.forgotten_ids
    v = rel(groups, "victim")
    named = {e.culprit for e in stall.edges if e.victim == v}
    print(f"unresolved {stall.unresolved_us} us, victim edges {named}")
    assert resolve(gone_id) is None
    assert rel(groups, "gone") not in named
    assert stall.unresolved_us >= 50_000  # the spinner's stall to the victim plus its own wait
    # nothing of it was handed to a path: only cgroups that still exist are named
    for path in named:
        assert os.path.isdir(groups["mount"] + path) or path == "/"
    collector.read(resolve)
    collector.read(resolve)
    assert collector.forgotten_ids >= forgotten + 1  # its map keys are dropped once it is gone


@needs_root
def test_pid_churn_attributed_to_its_cgroup(
    collector: SchedCollector, groups: dict[str, str]
) -> None:
    cpu = max(os.sched_getaffinity(0))
    resolve = InodeResolver(groups["mount"])
    collector.read(resolve)
    n = 100
    script = f"import os\nfor _ in range({n}):\n    pid = os.fork()\n    if pid == 0: os._exit(0)\n    os.waitpid(pid, 0)\n"
    spawn(groups["churn"], cpu, script).wait()
    stall = collector.read(resolve)
    rq = stall.runqueue.get(rel(groups, "churn"))
    assert rq is not None
    print(f"churn waits {rq.waits}, lost {stall.lost_waits}, no_enqueue {stall.no_enqueue}")
    # every new task is enqueued by sched_wakeup_new, so each child's first wait is its own cgroup's
    assert rq.waits >= n
    assert sum(rq.hist_log2_us) == rq.waits


def test_reused_cgroup_id_is_unresolved_for_the_window() -> None:
    c = SchedCollector()
    paths = {7: "/a", 8: "/v"}
    hist = [0] * NSLOTS
    hist[10] = 2
    d = _Deltas(
        runq={7: (2_000_000, 2, hist), 8: (3_000_000, 2, hist)}, edges={(8, 7): (1_500_000, 1)}
    )
    first = c.attribute(d, paths.get, [0] * NSTATS, {})
    assert first.runqueue["/a"].wait_us == 2000 and first.runqueue["/a"].hist_log2_us[10] == 2
    assert list(first.edges) == [StallEdge("/v", "/a", 1500, 1)]
    assert first.unresolved_us == 0
    paths[7] = "/b"  # /a removed, /b created with the same inode number within the window
    reused = c.attribute(d, paths.get, [0] * NSTATS, {})
    assert set(reused.runqueue) == {"/v"} and reused.edges == ()
    assert (reused.unresolved_us, reused.unresolved_preemptions) == (2000 + 1500, 1)
    settled = c.attribute(d, paths.get, [0] * NSTATS, {})  # a whole window of /b: now its own
    assert settled.runqueue["/b"].wait_us == 2000 and list(settled.edges) == [
        StallEdge("/v", "/b", 1500, 1)
    ]
    del paths[8]  # the victim vanished: its wait and the stall it suffered are unresolved once
    gone = c.attribute(d, paths.get, [0] * NSTATS, {})
    assert set(gone.runqueue) == {"/b"} and gone.edges == ()
    assert gone.unresolved_us == 3000
