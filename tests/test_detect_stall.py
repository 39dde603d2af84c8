"""noisy_neighbour and circuit_breaker on synthetic snapshots carrying scheduler evidence."""

from __future__ import annotations

import dataclasses

from linnixd.detectors import all_detectors
from linnixd.detectors.stall import CircuitBreakerDetector, NoisyNeighbourDetector
from linnixd.model import CgroupRunqueue, PsiSample, Snapshot, StallEdge, StallSnapshot
from tests.snapshots import TICK, cgroup, proc, psi, rule_cfg, snap

WEB = "/system.slice/web.service"
BATCH = "/system.slice/batch.service"
OTHER = "/system.slice/other.service"


def stall(victim: str, wait_us: int, edges: dict[str, int], waits: int = 10) -> StallSnapshot:
    return StallSnapshot(
        runqueue={victim: CgroupRunqueue(victim, wait_us, waits)},
        edges=tuple(StallEdge(victim, c, us, preemptions=1) for c, us in edges.items()),
    )


def nn_snap(
    i: int,
    wait_us: int = 20_000,
    edges: dict[str, int] | None = None,
    avg10: float = 0.0,
    some_pct: float = 0.0,
    throttled_us: int | None = None,
) -> Snapshot:
    edges = {BATCH: 15_000, OTHER: 3_000, WEB: 2_000} if edges is None else edges
    web = dataclasses.replace(
        cgroup(WEB, pressure={"cpu": PsiSample(avg10, 0.0, int(some_pct * TICK * 1e4), 0, TICK)}),
        throttled_us=throttled_us,
        nr_throttled=3 if throttled_us else 0,
    )
    s = snap(i, cgroups=[web, cgroup(BATCH), cgroup(OTHER)])
    return dataclasses.replace(s, stall=stall(WEB, wait_us, edges))


def rising(n: int = 20, **kw: object) -> list[Snapshot]:
    return [nn_snap(i, avg10=5.0 + i, **kw) for i in range(n)]  # type: ignore[arg-type]


def test_noisy_neighbour_names_top_culprit_with_shares() -> None:
    (f,) = NoisyNeighbourDetector().evaluate(rising(), rule_cfg("noisy_neighbour"))
    assert f.rule == "noisy_neighbour"
    assert f.key == f"cgroup:{BATCH}->cgroup:{WEB}"
    assert (f.culprit.kind, f.culprit.cgroup, f.culprit.unit) == ("cgroup", BATCH, "batch.service")
    assert f.summary == "batch.service caused 300 ms of stall to web.service in the last 10 s"
    assert f.severity == "warning"
    ev = f.evidence
    assert ev["wait_ms"] == 400.0 and ev["waits"] == 200
    assert (
        ev["culprit_share"] == 0.9
    )  # (15 + 3) of 20 ms per tick; the 2 ms self-stall is not a neighbour
    assert ev["self_stall_ms"] == 40.0
    assert [
        (c["cgroup"], c["stall_ms"], c["share"], c["preemptions"]) for c in ev["top_culprits"]
    ] == [
        (BATCH, 300.0, 0.75, 20),
        (OTHER, 60.0, 0.15, 20),
    ]
    assert ev["explained_by"] == "neighbours" and ev["throttling_explains"] is False
    assert (ev["cpu_pressure_avg10_start"], ev["cpu_pressure_avg10_end"]) == (5.0, 24.0)


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
    assert f.summary == "other.service caused 60 ms of stall to web.service in the last 10 s"


def test_noisy_neighbour_ignores_stall_older_than_window() -> None:
    old = [nn_snap(i, avg10=5.0 + i) for i in range(20)]
    quiet = [nn_snap(i, wait_us=0, edges={}, avg10=25.0 + i) for i in range(20, 41)]
    assert NoisyNeighbourDetector().evaluate(old + quiet, rule_cfg("noisy_neighbour")) == []


def cb_snap(i: int, some: float = 60.0, util: float = 95.0, with_stall: bool = True) -> Snapshot:
    procs = [
        proc(100, 1, "make", cpu=10.0, cgroup=BATCH, unit="batch.service"),
        proc(101, 100, "cc1", cpu=80.0, cgroup=BATCH, unit="batch.service"),
        proc(102, 101, "cc1", cpu=70.0, cgroup=BATCH, unit="batch.service"),
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
    return dataclasses.replace(s, cpu_util_pct=util, stall=st if with_stall else None)


def test_circuit_breaker_names_tree_of_top_stall_culprit() -> None:
    window = [cb_snap(i) for i in range(31)]  # 15.5 s >= sustain_s 15
    (f,) = CircuitBreakerDetector().evaluate(window, rule_cfg("circuit_breaker"))
    assert f.rule == "circuit_breaker" and f.severity == "critical"
    assert (f.culprit.kind, f.culprit.pid, f.culprit.root_pid, f.culprit.comm) == (
        "tree",
        100,
        100,
        "make",
    )
    assert (f.culprit.cgroup, f.culprit.unit) == (BATCH, "batch.service")
    assert f.key == "pid:100:1"
    ev = f.evidence
    assert ev["basis"] == "stall_matrix"
    assert ev["tree_cpu_pct"] == 160.0 and ev["tree_pids"] == 3
    assert ev["stall_caused_ms"] == 30 * 50.0
    assert ev["victims"] == [{"cgroup": WEB, "stall_ms": 30 * 50.0}]
    assert (ev["cpu_some_pct"], ev["cpu_util_pct"]) == (60.0, 95.0)
    assert (
        f.summary
        == "make[100] in batch.service held the CPU at 95% with 60% cpu pressure for 15 s and stalled others for 1500 ms"
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
    assert f.evidence["basis"] == "cpu"
    assert (f.culprit.pid, f.culprit.cgroup) == (100, BATCH)  # batch: 190% beats web's 95%
    assert f.evidence["stall_caused_ms"] == 0.0


def test_circuit_breaker_skips_excluded_cgroup() -> None:
    cfg = rule_cfg("circuit_breaker", exclude={"cgroups": ["/system.slice/batch*"]})
    (f,) = CircuitBreakerDetector().evaluate([cb_snap(i) for i in range(31)], cfg)
    assert (f.culprit.pid, f.culprit.cgroup, f.evidence["stall_caused_ms"]) == (300, WEB, 30 * 5.0)


def test_stall_detectors_are_registered() -> None:
    rules = [d.rule for d in all_detectors()]
    assert rules.count("noisy_neighbour") == 1 and rules.count("circuit_breaker") == 1
