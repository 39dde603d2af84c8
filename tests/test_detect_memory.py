"""memory_leak on synthetic RSS and cgroup memory series: slope, R^2, span, specificity."""

from __future__ import annotations

from collections.abc import Callable

from snapshots import cgroup, proc, rule_cfg, series, snap

from linnixd.detectors.memory import MemoryLeakDetector, fit

MIB = 1 << 20
LEAK = MemoryLeakDetector()
APP = "/system.slice/app.service"
N = 121  # 60 s of 0.5 s ticks, both ends included


def rss_window(
    rss: Callable[[int], float], n: int = N, *, cg_memory: Callable[[int], float] | None = None
):
    def make(i: int):
        procs = [
            proc(1, 0, "init", cgroup="/", unit=None),
            proc(4321, 1, "leaky", rss=int(rss(i)), start=50.0),
        ]
        cgs = [cgroup(APP, memory=int(cg_memory(i)))] if cg_memory else []
        return snap(i, procs, cgroups=cgs)

    return series(n, make)


def ramp(i: int) -> float:
    return 200 * MIB + i * 0.5 * MIB  # 1 MiB/s


def test_memory_leak_fires_on_a_linear_ramp() -> None:
    [f] = LEAK.evaluate(rss_window(ramp), rule_cfg("memory_leak"))
    assert f.key == "pid:4321:50" and f.culprit.kind == "process"
    assert (f.culprit.pid, f.culprit.comm, f.culprit.unit, f.culprit.parent_pid) == (
        4321,
        "leaky",
        "app.service",
        1,
    )
    ev = f.evidence
    assert ev["slope_mb_per_min"] == 60.0 and ev["growth_mb"] == 60.0 and ev["r2"] == 1.0
    assert ev["rss_start_mb"] == 200.0 and ev["rss_now_mb"] == 260.0 and ev["samples"] == N
    assert "60.0 MiB/min" in f.summary and "leaky[4321]" in f.summary


def test_memory_leak_growth_threshold_both_sides() -> None:
    window = rss_window(ramp)
    assert len(LEAK.evaluate(window, rule_cfg("memory_leak", min_growth_mb=59.9))) == 1
    assert LEAK.evaluate(window, rule_cfg("memory_leak", min_growth_mb=60.1)) == []


def test_memory_leak_needs_samples_spanning_most_of_the_window() -> None:
    # 54 s of history is 0.9 x 60 s: enough; 53.5 s is not
    assert len(LEAK.evaluate(rss_window(ramp, n=109), rule_cfg("memory_leak"))) == 1
    assert LEAK.evaluate(rss_window(ramp, n=108), rule_cfg("memory_leak")) == []


def test_flat_high_rss_never_fires() -> None:
    assert (
        LEAK.evaluate(
            rss_window(lambda i: 2048 * MIB), rule_cfg("memory_leak", min_growth_mb=0.001)
        )
        == []
    )


def test_sawtooth_with_low_r2_never_fires() -> None:
    # 1 MiB/s underneath, but a garbage collector drops 80 MiB every 20 s
    def saw(i: int) -> float:
        return 500 * MIB + i * 0.5 * MIB + (i % 40) * 2 * MIB

    points = [(i * 0.5, saw(i)) for i in range(N)]
    slope, r2 = fit(points)
    assert r2 < 0.8 and slope * 60 >= 50 * MIB  # growth alone would fire: R^2 is what stops it
    assert LEAK.evaluate(rss_window(saw), rule_cfg("memory_leak")) == []
    assert len(LEAK.evaluate(rss_window(saw), rule_cfg("memory_leak", min_r2=r2 - 0.01))) == 1


def test_r2_threshold_both_sides() -> None:
    # the ramp plus +/-6 MiB alternating noise
    def noisy(i: int) -> float:
        return ramp(i) + (6 if i % 2 else -6) * MIB

    r2 = fit([(i * 0.5, noisy(i)) for i in range(N)])[1]
    assert 0.8 < r2 < 0.99
    assert len(LEAK.evaluate(rss_window(noisy), rule_cfg("memory_leak", min_r2=r2 - 0.001))) == 1
    assert LEAK.evaluate(rss_window(noisy), rule_cfg("memory_leak", min_r2=r2 + 0.001)) == []


def test_cgroup_leak_and_the_process_wins_when_it_explains_it() -> None:
    # the cgroup grows with the process: only the process is named
    window = rss_window(ramp, cg_memory=lambda i: 300 * MIB + ramp(i))
    assert [f.key for f in LEAK.evaluate(window, rule_cfg("memory_leak"))] == ["pid:4321:50"]
    # a cgroup growing without any single process growing (page cache, many workers): the cgroup
    window = rss_window(lambda i: 100 * MIB, cg_memory=lambda i: 300 * MIB + i * MIB)
    [f] = LEAK.evaluate(window, rule_cfg("memory_leak"))
    assert (
        f.key == f"cgroup:{APP}" and f.culprit.kind == "cgroup" and f.culprit.unit == "app.service"
    )
    assert f.evidence["growth_mb"] == 120.0 and f.evidence["memory_now_mb"] == 420.0
    assert LEAK.evaluate(window, rule_cfg("memory_leak", scope=["process"])) == []
    assert LEAK.evaluate(window, rule_cfg("memory_leak", exclude={"units": ["app.service"]})) == []


def test_memory_leak_exclusion_by_comm() -> None:
    assert (
        LEAK.evaluate(rss_window(ramp), rule_cfg("memory_leak", exclude={"comms": ["leak*"]})) == []
    )
