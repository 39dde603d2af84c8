"""noisy_neighbour and circuit_breaker on synthetic snapshots carrying scheduler evidence."""

from __future__ import annotations

import dataclasses

from linnixd.detectors import all_detectors
from linnixd.detectors.stall import (
    CircuitBreakerDetector,
    NoisyNeighbourDetector,
    fair_shortfall_us,
)
from linnixd.model import CgroupRunqueue, PsiSample, Snapshot, StallEdge, StallSnapshot
from tests.snapshots import TICK, cgroup, proc, psi, rule_cfg, snap

WEB = "/system.slice/web.service"
BATCH = "/system.slice/batch.service"
OTHER = "/system.slice/other.service"


def stall(
    victim: str, wait_us: int, edges: dict[str, int], waits: int = 10, hist: tuple[int, ...] = ()
) -> StallSnapshot:
    return StallSnapshot(
        runqueue={victim: CgroupRunqueue(victim, wait_us, waits, hist)},
        edges=tuple(StallEdge(victim, c, us, preemptions=1) for c, us in edges.items()),
    )


# CPU microseconds each cgroup's own tasks ran per 0.5 s tick (cpu.stat usage deltas)
RUN_US = {WEB: 5_000, BATCH: 400_000, OTHER: 20_000}


def nn_snap(
    i: int,
    wait_us: int = 20_000,
    edges: dict[str, int] | None = None,
    avg10: float = 0.0,
    some_pct: float = 0.0,
    throttled_us: int | None = None,
    run_us: dict[str, int] | None = None,
    hist: tuple[int, ...] = (),
) -> Snapshot:
    edges = {BATCH: 15_000, OTHER: 3_000, WEB: 2_000} if edges is None else edges
    run_us = RUN_US if run_us is None else run_us
    web = dataclasses.replace(
        cgroup(WEB, pressure={"cpu": PsiSample(avg10, 0.0, int(some_pct * TICK * 1e4), 0, TICK)}),
        throttled_us=throttled_us,
        nr_throttled=3 if throttled_us else 0,
    )
    groups = [
        dataclasses.replace(c, cpu_usage_us=run_us.get(c.path))
        for c in (web, cgroup(BATCH), cgroup(OTHER))
    ]
    s = snap(i, cgroups=groups)
    return dataclasses.replace(s, stall=stall(WEB, wait_us, edges, hist=hist))


def rising(n: int = 20, **kw: object) -> list[Snapshot]:
    return [nn_snap(i, avg10=5.0 + i, **kw) for i in range(n)]  # type: ignore[arg-type]


def test_noisy_neighbour_names_top_culprit_with_shares() -> None:
    hist = (0,) * 6 + (6, 2, 1, 0, 1)  # 6 waits in [64, 128) us ... 1 in [1024, 2048) us
    (f,) = NoisyNeighbourDetector().evaluate(rising(hist=hist), rule_cfg("noisy_neighbour"))
    assert f.rule == "noisy_neighbour"
    assert f.key == f"cgroup:{BATCH}->cgroup:{WEB}"
    assert (f.culprit.kind, f.culprit.cgroup, f.culprit.unit) == ("cgroup", BATCH, "batch.service")
    assert f.summary == (
        "batch.service took 80% of a CPU and caused 300 ms of stall to web.service "
        "(which ran 100 ms and waited 80% of its demand) in the last 10.0 s"
    )
    assert f.severity == "warning"
    ev = f.evidence
    assert ev["window_s"] == 10.0
    assert ev["wait_ms"] == 400.0 and ev["waits"] == 200
    assert ev["victim_run_ms"] == 100.0 and ev["wait_share"] == 0.8
    assert (ev["runq_p50_us"], ev["runq_p99_us"]) == (128, 2048)
    assert (
        ev["culprit_share"] == 0.9
    )  # (15 + 3) of 20 ms per tick; the 2 ms self-stall is not a neighbour
    assert ev["self_stall_ms"] == 40.0
    assert (ev["culprit_run_ms"], ev["culprit_cpu_pct"], ev["culprit_preemptions"]) == (
        8000.0,
        80.0,
        20,
    )
    # web asked for 500 ms (100 run + 400 waited), under half of the 8100 ms the two used:
    # its fair share was all of it, so batch took 400 ms beyond its own share (7600 ms)
    assert [
        (
            c["cgroup"],
            c["stall_ms"],
            c["share"],
            c["preemptions"],
            c["fair_share_ms"],
            c["victim_shortfall_ms"],
        )
        for c in ev["top_culprits"]
    ] == [
        (BATCH, 300.0, 0.75, 20, 7600.0, 400.0),
        (OTHER, 60.0, 0.15, 20, 250.0, 150.0),
    ]
    assert ev["explained_by"] == "neighbours" and ev["throttling_explains"] is False
    assert (ev["cpu_pressure_avg10_start"], ev["cpu_pressure_avg10_end"]) == (5.0, 24.0)


def test_fair_shortfall() -> None:
    assert fair_shortfall_us(run_v=100, wait_v=400, run_c=8000) == 400  # all of its demand
    assert fair_shortfall_us(run_v=100, wait_v=400, run_c=500) == 200  # half of the 600 used
    assert fair_shortfall_us(run_v=500, wait_v=500, run_c=500) == 0  # equals: no shortfall
    assert fair_shortfall_us(run_v=800, wait_v=300, run_c=200) == 0  # the bigger one waited


HOG, TICKER = "/hog", "/ticker"


def pair_snap(i: int, run: dict[str, int], stall_us: dict[str, int]) -> Snapshot:
    """Two cgroups that each waited `stall_us[victim]` behind the other in one tick."""
    groups = [
        dataclasses.replace(
            cgroup(p, pressure={"cpu": psi(20.0, avg10=10.0 + i)}), cpu_usage_us=run[p]
        )
        for p in (HOG, TICKER)
    ]
    other = {HOG: TICKER, TICKER: HOG}
    st = StallSnapshot(
        runqueue={p: CgroupRunqueue(p, us, 40) for p, us in stall_us.items()},
        edges=tuple(StallEdge(v, other[v], us, 5) for v, us in stall_us.items()),
    )
    return dataclasses.replace(snap(i, cgroups=groups), stall=st)


def test_noisy_neighbour_blames_the_hog_never_the_light_one() -> None:
    # the hog spins 480 ms per tick; the ticker runs 100 ms and waits 70 ms; each waits behind the other
    window = [
        pair_snap(i, {HOG: 480_000, TICKER: 100_000}, {TICKER: 70_000, HOG: 67_000})
        for i in range(20)
    ]
    findings = NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour"))
    assert [(f.culprit.cgroup, f.evidence["victim"]) for f in findings] == [(HOG, TICKER)]
    (f,) = findings
    assert f.evidence["victim_run_ms"] == 2000.0 and f.evidence["wait_ms"] == 1400.0
    assert f.evidence["top_culprits"][0]["cpu_pct"] == 96.0


def test_noisy_neighbour_two_equal_hogs_are_contention() -> None:
    window = [
        pair_snap(i, {HOG: 250_000, TICKER: 245_000}, {TICKER: 240_000, HOG: 235_000})
        for i in range(20)
    ]
    findings = NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour"))
    assert len(findings) == 1  # once, not once per direction
    (f,) = findings
    assert f.key == f"contention:cgroup:{HOG}+cgroup:{TICKER}"
    assert (f.culprit.kind, f.culprit.cgroup, f.culprit.unit) == ("system", None, None)
    assert f.severity == "info" and f.evidence["explained_by"] == "contention"
    assert "neither took more than its share" in f.summary


def test_noisy_neighbour_window_is_what_the_evidence_covers() -> None:
    window = [nn_snap(i, avg10=5.0 + i, wait_us=60_000, edges={BATCH: 60_000}) for i in range(4)]
    (f,) = NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour"))
    assert f.evidence["window_s"] == 2.0
    assert f.summary.endswith("in the last 2.0 s")


def test_noisy_neighbour_without_run_times_blames_no_one() -> None:
    window = rising(run_us={})  # no cpu.stat and no processes: who took more is unknown
    (f,) = NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour"))
    assert f.culprit.kind == "system" and f.evidence["explained_by"] == "contention"


def test_noisy_neighbour_needs_enough_wait() -> None:
    window = rising(wait_us=4_000, edges={BATCH: 4_000})  # 80 ms per 10 s < min_wait_ms 100
    assert NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour")) == []
    window = rising(wait_us=6_000, edges={BATCH: 6_000})  # 120 ms: fires
    (f,) = NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour"))
    assert f.evidence["wait_ms"] == 120.0 and f.evidence["culprit_share"] == 1.0


def test_noisy_neighbour_needs_other_cgroups_share() -> None:
    # mostly queued behind its own tasks: 8 of 20 ms from others is 0.4 < 0.5
    window = rising(edges={WEB: 12_000, BATCH: 8_000})
    assert NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour")) == []


def test_noisy_neighbour_needs_rising_pressure() -> None:
    falling = [nn_snap(i, avg10=30.0 - i, some_pct=0.5) for i in range(20)]
    assert NoisyNeighbourDetector().evaluate(falling, rule_cfg("noisy_neighbour")) == []
    # falling 10 s average, but stalled above the floor in the window itself: still pressure
    steady = [nn_snap(i, avg10=30.0 - i, some_pct=2.0) for i in range(20)]
    (f,) = NoisyNeighbourDetector().evaluate(steady, rule_cfg("noisy_neighbour"))
    assert f.evidence["cpu_pressure_some_pct"] == 2.0


def test_noisy_neighbour_blames_own_quota_when_throttled() -> None:
    window = rising(throttled_us=15_000)
    (f,) = NoisyNeighbourDetector().evaluate(window, rule_cfg("noisy_neighbour"))
    assert f.key == f"quota:cgroup:{WEB}"
    assert (f.culprit.kind, f.culprit.cgroup, f.culprit.unit) == ("cgroup", WEB, "web.service")
    assert f.evidence["explained_by"] == "own_cpu_quota"
    assert (f.evidence["throttled_ms"], f.evidence["nr_throttled"]) == (300.0, 60)
    assert f.summary.startswith("web.service's own CPU quota throttled it 60 times (300 ms)")


def test_noisy_neighbour_skips_excluded_culprit() -> None:
    cfg = rule_cfg("noisy_neighbour", exclude={"units": ["batch.service"]})
    (f,) = NoisyNeighbourDetector().evaluate(rising(), cfg)
    assert f.culprit.cgroup == OTHER
    assert f.summary == (
        "other.service took 4% of a CPU and caused 60 ms of stall to web.service "
        "(which ran 100 ms and waited 80% of its demand) in the last 10.0 s"
    )


def test_noisy_neighbour_ignores_stall_older_than_window() -> None:
    old = [nn_snap(i, avg10=5.0 + i) for i in range(20)]
    quiet = [nn_snap(i, wait_us=0, edges={}, avg10=25.0 + i) for i in range(20, 41)]
    assert NoisyNeighbourDetector().evaluate(old + quiet, rule_cfg("noisy_neighbour")) == []


def cb_snap(i: int, some: float = 60.0, util: float = 95.0, with_stall: bool = True) -> Snapshot:
    procs = [
        proc(100, 1, "make", cpu=10.0, cgroup=BATCH, unit="batch.service"),
        proc(101, 100, "cc1", cpu=80.0, cgroup=BATCH, unit="batch.service"),
        proc(102, 100, "cc1", cpu=70.0, cgroup=BATCH, unit="batch.service"),
        proc(200, 1, "indexer", cpu=30.0, cgroup=BATCH, unit="batch.service"),
        proc(300, 1, "web", cpu=95.0, cgroup=WEB, unit="web.service"),  # the single top-CPU pid
    ]
    s = snap(i, procs, cgroups=[cgroup(WEB), cgroup(BATCH)], system_pressure={"cpu": psi(some)})
    st = StallSnapshot(
        runqueue={WEB: CgroupRunqueue(WEB, 60_000, 30)},
        edges=(
            StallEdge(WEB, BATCH, 50_000, 4),
            StallEdge(BATCH, WEB, 5_000, 1),
            StallEdge(WEB, WEB, 7_000),
        ),
    )
    return dataclasses.replace(
        s, cpu_util_pct=util, ncpu=3, stall=st if with_stall else None
    )  # 95% of 3 CPUs busy = 285% = batch 190 + web 95


def test_circuit_breaker_names_tree_that_held_the_cpu() -> None:
    window = [cb_snap(i) for i in range(31)]  # 15.5 s >= sustain_s 15
    (f,) = CircuitBreakerDetector().evaluate(window, rule_cfg("circuit_breaker"))
    assert f.rule == "circuit_breaker" and f.severity == "critical"
    # neither cc1 holds 80% of make's tree: the tree is named at make
    assert (f.culprit.kind, f.culprit.pid, f.culprit.root_pid, f.culprit.comm) == (
        "tree",
        100,
        100,
        "make",
    )
    assert (f.culprit.cgroup, f.culprit.unit) == (BATCH, "batch.service")
    assert f.key == "pid:100:1"
    ev = f.evidence
    assert ev["basis"] == "cpu_time"
    assert ev["cgroup_cpu_pct"] == 190.0 and ev["cgroup_cpu_share"] == 0.667
    assert ev["tree_cpu_pct"] == 160.0 and ev["tree_pids"] == 3
    # what batch caused web; batch's own 5 ms per tick behind web is not stall it caused
    assert ev["stall_caused_ms"] == 30 * 50.0
    assert ev["victims"] == [{"cgroup": WEB, "stall_ms": 30 * 50.0}]
    assert (ev["cpu_some_pct"], ev["cpu_util_pct"], ev["sustained_s"]) == (60.0, 95.0, 15.0)
    assert f.summary == (
        "make[100] in batch.service held 190% of a CPU (67% of the busy CPU) while the host "
        "ran at 95% with 60% cpu pressure for 15.0 s, and stalled others for 1500 ms"
    )


def test_circuit_breaker_needs_sustained_pressure_and_utilisation() -> None:
    cfg = rule_cfg("circuit_breaker")
    assert CircuitBreakerDetector().evaluate([cb_snap(i) for i in range(29)], cfg) == []  # 14.5 s
    dip = [cb_snap(i, some=30.0 if i == 20 else 60.0) for i in range(31)]
    assert CircuitBreakerDetector().evaluate(dip, cfg) == []
    idle = [cb_snap(i, util=80.0) for i in range(31)]
    assert CircuitBreakerDetector().evaluate(idle, cfg) == []


def test_circuit_breaker_without_stall_evidence_uses_cpu() -> None:
    window = [cb_snap(i, with_stall=False) for i in range(31)]
    (f,) = CircuitBreakerDetector().evaluate(window, rule_cfg("circuit_breaker"))
    assert (f.culprit.pid, f.culprit.cgroup) == (100, BATCH)  # batch: 190% beats web's 95%
    assert f.evidence["stall_caused_ms"] == 0.0 and f.evidence["victims"] == []


def test_circuit_breaker_skips_excluded_cgroup() -> None:
    cfg = rule_cfg("circuit_breaker", exclude={"cgroups": ["/system.slice/batch*"]})
    (f,) = CircuitBreakerDetector().evaluate([cb_snap(i) for i in range(31)], cfg)
    assert (f.culprit.pid, f.culprit.cgroup, f.evidence["stall_caused_ms"]) == (300, WEB, 30 * 5.0)


STORM = "/storm"


def storm_snap(i: int, storm_us: int, root_us: int) -> Snapshot:
    """A fork storm in its own cgroup: its CPU is in children that come and go (cpu.stat only)."""
    procs = [
        proc(1, 0, "process_api", cpu=2.0, cgroup="/", unit=None),
        proc(50, 1, "sshd", cpu=1.0, cgroup="/", unit=None),
        proc(51, 1, "cron", cpu=1.0, cgroup="/", unit=None),
        proc(700, 50, "stress-ng", cpu=0.0, cgroup=STORM, unit=None),
    ]
    groups = [
        dataclasses.replace(cgroup("/"), cpu_usage_us=storm_us + root_us),  # hierarchical
        dataclasses.replace(cgroup(STORM), cpu_usage_us=storm_us),
    ]
    s = snap(i, procs, cgroups=groups, system_pressure={"cpu": psi(87.0)})
    st = StallSnapshot(  # the storm waits behind its own children and behind everything in /
        runqueue={STORM: CgroupRunqueue(STORM, 300_000, 900)},
        edges=(StallEdge(STORM, "/", 60_000, 30), StallEdge(STORM, STORM, 240_000)),
    )
    return dataclasses.replace(s, cpu_util_pct=100.0, stall=st)


def test_circuit_breaker_never_blames_others_for_the_storms_own_wait() -> None:
    window = [storm_snap(i, storm_us=900_000, root_us=100_000) for i in range(31)]
    (f,) = CircuitBreakerDetector().evaluate(window, rule_cfg("circuit_breaker"))
    # stress-ng's own CPU is tiny next to its cgroup's (children that exit): the cgroup is named
    assert (f.culprit.kind, f.culprit.cgroup, f.culprit.pid) == ("cgroup", STORM, None)
    assert f.key == f"cgroup:{STORM}"
    assert f.evidence["cgroup_cpu_share"] == 0.9 and f.evidence["cgroup_cpu_pct"] == 180.0
    assert f.evidence["stall_caused_ms"] == 0.0  # its wait behind / is not stall it caused


def test_circuit_breaker_names_no_one_for_spread_load() -> None:
    # the host's own processes in / hold the CPU, no tree dominates: not PID 1, not the storm
    window = [storm_snap(i, storm_us=200_000, root_us=800_000) for i in range(31)]
    assert CircuitBreakerDetector().evaluate(window, rule_cfg("circuit_breaker")) == []
    # a cgroup whose share of the busy CPU is small is never named
    cfg = rule_cfg("circuit_breaker", exclude={"cgroups": ["/"]})
    assert CircuitBreakerDetector().evaluate(window, cfg) == []


def test_stall_detectors_are_registered() -> None:
    rules = [d.rule for d in all_detectors()]
    assert rules.count("noisy_neighbour") == 1 and rules.count("circuit_breaker") == 1


def _own_cpu_reference(snaps: list[Snapshot], paths: set[str] | None) -> dict[str, float]:
    """own_cpu_us by its definition, every cgroup looked at in every snapshot."""
    out: dict[str, float] = {}
    for s in snaps:
        usage = {p: cg.cpu_usage_us for p, cg in s.cgroups.items() if cg.cpu_usage_us is not None}
        own = {p: float(u) for p, u in usage.items()}
        for p, used in usage.items():
            node = p
            while node != "/":
                node = node.rsplit("/", 1)[0] or "/"
                if node in usage:
                    own[node] -= used
                    break
        for p, v in own.items():
            if paths is None or p in paths:
                out[p] = out.get(p, 0.0) + max(0.0, v)
    return out


def test_own_cpu_us_looks_up_only_busy_cgroups_with_the_same_figures() -> None:
    """Quiet cgroups (a zero delta) skip the ancestor walk and a few wanted paths are looked
    up, not filtered from every cgroup: the figures are those of the full definition, with a
    quiet parent between a busy child and its grandparent, and the cache across ticks."""
    from linnixd.detectors.base import OwnCpuCache, own_cpu_us

    quiet = [f"/q/c{k}" for k in range(40)]

    def tick(i: int) -> Snapshot:
        # cpu.stat is hierarchical: a parent's usage holds its children's
        u = {"/a/b/c": 300 * (i % 3), "/a/d": 700 if i % 4 else 0, "/e": 0 if i % 5 else 900}
        u |= {q: 100 if (i + k) % 7 == 0 else 0 for k, q in enumerate(quiet)}
        u["/a/b"] = 0 if i % 2 else u["/a/b/c"] + 50  # quiet: carried with a zero delta
        u["/a"] = u["/a/b/c"] + u["/a/d"] + 200
        u["/"] = sum(u.values()) + 1000
        return snap(
            i, cgroups=[dataclasses.replace(cgroup(p), cpu_usage_us=v) for p, v in u.items()]
        )

    window = [tick(i) for i in range(12)]
    cache: OwnCpuCache = {}
    for end in range(1, len(window) + 1):
        snaps = window[max(0, end - 6) : end]
        for wanted in (None, {"/", "/a", "/a/b", "/e"}, {"/", "/a", *quiet, "/gone"}):
            got = own_cpu_us(snaps, wanted, cache)
            assert got == _own_cpu_reference(snaps, wanted)
