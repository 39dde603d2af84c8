"""memory_leak on synthetic RSS and cgroup memory series: slope, R^2, span, specificity."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from snapshots import T0, cgroup, proc, rule_cfg, series, snap

from linnixd.detectors.memory import MemoryLeakDetector, fit
from linnixd.model import Snapshot

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


def test_memory_leak_fires_on_growth_actually_observed() -> None:
    # 1 MiB/s: 50 s of history shows 50 MiB (fires), 49.5 s shows 49.5 MiB (does not)
    [f] = MemoryLeakDetector().evaluate(rss_window(ramp, n=101), rule_cfg("memory_leak"))
    assert f.evidence["growth_mb"] == 50.0 and f.evidence["span_s"] == 50.0
    assert MemoryLeakDetector().evaluate(rss_window(ramp, n=100), rule_cfg("memory_leak")) == []


def fast(i: int) -> float:
    return 100 * MIB + i * 5 * MIB  # 10 MiB/s at 0.5 s ticks


def test_fast_leak_fires_within_seconds() -> None:
    # 50 MiB are crossed after 5 s; the fit needs min_span_s 10 s: named at 10 s, not 54 s
    assert MemoryLeakDetector().evaluate(rss_window(fast, n=20), rule_cfg("memory_leak")) == []
    [f] = MemoryLeakDetector().evaluate(rss_window(fast, n=21), rule_cfg("memory_leak"))
    ev = f.evidence
    assert ev["mode"] == "fast" and ev["span_s"] == 10.0 and ev["growth_mb"] == 100.0
    assert ev["slope_mb_per_min"] == 600.0 and ev["samples"] == 21
    assert "grows 600.0 MiB/min (+100 MiB in 10 s, R^2 1.00), now 200 MiB" in f.summary
    # a process born mid-window is judged on its own samples
    late = rss_window(fast, n=40)
    late = [
        s if i >= 19 else dataclasses.replace(s, processes={1: s.processes[1]})
        for i, s in enumerate(late)
    ]
    [g] = MemoryLeakDetector().evaluate(late, rule_cfg("memory_leak"))
    assert g.evidence["samples"] == 21 and g.evidence["rss_start_mb"] == 195.0


def limited(window: list[Snapshot], **limits: Any) -> list[Snapshot]:
    """The window with APP's cgroup limits and the host's MemAvailable set on every snapshot."""
    avail = limits.pop("avail", 0)
    out = []
    for s in window:
        cgs = {p: dataclasses.replace(c, **limits) for p, c in s.cgroups.items()}
        out.append(dataclasses.replace(s, cgroups=cgs, mem_available_bytes=avail))
    return out


def test_projection_to_the_nearest_limit() -> None:
    cfg = rule_cfg("memory_leak")
    # the process grows 10 MiB/s to 200 MiB; its cgroup uses 1048 MiB of a 2048 MiB memory.max
    base = rss_window(fast, n=21, cg_memory=lambda i: 848 * MIB + fast(i))
    [f] = MemoryLeakDetector().evaluate(
        limited(base, memory_max_bytes=2048 * MIB, avail=8192 * MIB), cfg
    )
    ev = f.evidence
    assert (ev["limit_kind"], ev["limit_mb"], ev["headroom_mb"], ev["eta_s"]) == (
        "memory.max",
        2048.0,
        1000.0,
        100.0,
    )
    assert f.summary.endswith("hits memory.max (2048 MiB) in about 2 min")
    # memory.high below memory.max is reached first
    [f] = MemoryLeakDetector().evaluate(
        limited(base, memory_max_bytes=2048 * MIB, memory_high_bytes=1448 * MIB), cfg
    )
    assert (f.evidence["limit_kind"], f.evidence["eta_s"]) == ("memory.high", 40.0)
    # no cgroup limit ("max"): the host's MemAvailable, 6 GiB at 600 MiB/min
    [f] = MemoryLeakDetector().evaluate(limited(base, avail=6144 * MIB), cfg)
    assert (f.evidence["limit_kind"], f.evidence["limit_mb"], f.evidence["eta_s"]) == (
        "MemAvailable",
        6144.0,
        614.4,
    )
    assert f.summary.endswith("exhausts MemAvailable (6144 MiB left) in about 10 min")
    # the host has less left than the cgroup limit allows: the host is the nearer limit
    [f] = MemoryLeakDetector().evaluate(
        limited(base, memory_max_bytes=2048 * MIB, avail=300 * MIB), cfg
    )
    assert (f.evidence["limit_kind"], f.evidence["eta_s"]) == ("MemAvailable", 30.0)
    # nothing known: no projection, said so
    [f] = MemoryLeakDetector().evaluate(base, cfg)
    assert f.evidence["eta_s"] is None and f.evidence["limit_kind"] is None
    assert f.summary.endswith("no memory limit known to project against")
    # already over memory.high: it is there now
    [f] = MemoryLeakDetector().evaluate(limited(base, memory_high_bytes=1000 * MIB), cfg)
    assert (f.evidence["limit_kind"], f.evidence["headroom_mb"], f.evidence["eta_s"]) == (
        "memory.high",
        0.0,
        0.0,
    )


# ---- slow leaks: a synthetic series hours long (time is synthetic: one snapshot a minute) ----

MINUTE = 60.0


def slow_snap(m: int, rss: float, pid: int = 4321, start: float = 50.0) -> Snapshot:
    procs = [
        proc(1, 0, "init", cgroup="/", unit=None, rss=5 * MIB),
        proc(pid, 1, "slowleak", rss=int(rss), start=start),
    ]
    s = snap(0, procs, interval=MINUTE, ts=T0 + m * MINUTE)
    return dataclasses.replace(s, mem_available_bytes=1024 * MIB)


def run_minutes(det: MemoryLeakDetector, rss: Callable[[int], float], minutes: int, **kw: Any):
    """Feed one snapshot a minute (the daemon's window holds only the last 60 s of them)."""
    fired = []
    for m in range(minutes):
        for f in det.evaluate([slow_snap(m, rss(m), **kw)], rule_cfg("memory_leak")):
            fired.append((m, f))
    return fired


def test_slow_leak_found_over_hours() -> None:
    det = MemoryLeakDetector()

    def slow(m: int) -> float:  # 20 MiB/h with +/-2 MiB of noise
        return 300 * MIB + m * MIB / 3 + (2 if m % 2 else -2) * MIB

    fired = run_minutes(det, slow, 4 * 60)
    first, f = fired[0]
    # 50 MiB of fitted growth take 2.5 h at 20 MiB/h; one point per 3 min
    assert 150 <= first <= 160
    ev = f.evidence
    assert ev["mode"] == "slow" and f.key == "pid:4321:50" and f.culprit.comm == "slowleak"
    assert 18.0 <= ev["rate_mb_per_h"] <= 22.0 and ev["r2"] >= 0.95
    assert ev["span_s"] >= 150 * MINUTE and ev["samples"] <= 120
    assert ev["limit_kind"] == "MemAvailable" and 45 * 3600 <= ev["eta_s"] <= 57 * 3600
    assert "MiB/h" in f.summary and "exhausts MemAvailable (1024 MiB left) in about" in f.summary
    # it keeps being found at every tick between points (the incident stays open)
    assert [m for m, _ in fired] == list(range(first, 4 * 60))
    health = det.health().gauges
    assert health["slow_points"] <= 120 * health["slow_series"] and health["slow_series"] == 2


def test_slow_flat_or_noisy_never_fires() -> None:
    def jitter(m: int) -> float:  # a big process breathing +/-30 MiB, not growing
        return 900 * MIB + (30 if (m // 7) % 2 else -30) * MIB

    assert run_minutes(MemoryLeakDetector(), jitter, 6 * 60) == []


def test_slow_series_restarts_for_a_reused_pid_and_after_exit() -> None:
    det = MemoryLeakDetector()
    grow = lambda m: 300 * MIB + m * MIB / 3  # noqa: E731
    assert run_minutes(det, grow, 120) == []  # 40 MiB in 2 h: below 50
    # the pid now names another process (new start time): its history is not the old one's
    fired = [
        f
        for m in range(120, 200)
        for f in det.evaluate([slow_snap(m, grow(m), start=9000.0)], rule_cfg("memory_leak"))
    ]
    assert fired == []


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


def test_bad_input_mid_window() -> None:
    cfg = rule_cfg("memory_leak")
    base = rss_window(fast, n=30, cg_memory=lambda i: 848 * MIB + fast(i))
    # the cgroup vanishes mid-window: no crash, the process is still judged, no cgroup limit used
    gone = [s if i < 20 else dataclasses.replace(s, cgroups={}) for i, s in enumerate(base)]
    [f] = MemoryLeakDetector().evaluate(limited(gone, memory_max_bytes=2048 * MIB), cfg)
    assert f.culprit.pid == 4321 and f.evidence["limit_kind"] is None
    # the limit changes mid-window: the projection uses the limit in force now
    changed = limited(base[:20], memory_max_bytes=4096 * MIB) + limited(
        base[20:], memory_max_bytes=2048 * MIB
    )
    [f] = MemoryLeakDetector().evaluate(changed, cfg)
    assert (f.evidence["limit_kind"], f.evidence["limit_mb"]) == ("memory.max", 2048.0)
    # the process exits mid-window (its pid is then reused by a small process): no finding
    reused = [
        s
        if i < 25
        else dataclasses.replace(
            s, processes={4321: proc(4321, 1, "other", rss=5 * MIB, start=999.0)}
        )
        for i, s in enumerate(base)
    ]
    det = MemoryLeakDetector()
    assert [f for f in det.evaluate(reused, cfg) if f.culprit.kind == "process"] == []


def test_slow_points_of_a_whole_host_spread_over_the_step() -> None:
    """1,200 flat processes and 20 cgroups, a tick every 0.5 s: each takes one slow point per
    step (180 s), at its own phase, so no tick takes the whole host's points at once."""
    n = 1200
    procs = [proc(1000 + i, 1, f"w{i}", rss=(100 + i) * MIB) for i in range(n)]
    groups = [cgroup(f"/system.slice/s{i}.service", memory=(50 + i) * MIB) for i in range(20)]
    first = snap(0, procs, cgroups=groups)
    det = MemoryLeakDetector()
    cfg = rule_cfg("memory_leak")
    step = cfg.slow_window_s / 120
    per_tick = []
    points = 0
    # ticks 0.5 s apart, and one just before each step ends (the last phase is 1023/1024 of it)
    times = [i * 0.5 for i in range(int(step / 0.5))] + [step - 0.1]
    times += [step + t for t in times]
    for i, t in enumerate(times):
        s = dataclasses.replace(first, ts=first.ts + t, changed=None if i == 0 else frozenset())
        det.evaluate([s], cfg)
        now = det.health().gauges["slow_points"]
        per_tick.append(now - points)
        points = now
        if t == step - 0.1:
            assert points == n + 20  # one point each in the first step
    assert points == 2 * (n + 20)  # and one more each in the second
    assert det.health().gauges["slow_series"] == n + 20
    assert max(per_tick) <= (n + 20) / 20, max(per_tick)
    # a process gone is dropped at its next point; one born is scheduled from `changed`
    gone = dataclasses.replace(
        first,
        ts=first.ts + 2 * step,
        processes={p.pid: p for p in procs[1:]} | {9999: proc(9999, 1, "new")},
        changed=frozenset({1000, 9999}),
    )
    for k in range(int(step / 0.5) + 1):
        det.evaluate([dataclasses.replace(gone, ts=gone.ts + k * 0.5)], cfg)
        if k == 0:
            assert "pid:9999:" + f"{gone.processes[9999].start_time:g}" in det._due_at
    assert det.health().gauges["slow_series"] == n + 20  # one gone, one new
    assert "pid:1000:" + f"{procs[0].start_time:g}" not in det._series


def _cgroup_host(ticks: int, jump: float = 0.0) -> list[Snapshot]:
    """Cgroup samples as the host model carries them: the same object while not re-read, a
    re-read with the same or a jittered level, a quiet copy (hostmodel.quiet), a cgroup that
    vanishes and one that comes back lower."""
    from linnixd.hostmodel import quiet

    calm = {f"/bench/c{k}": cgroup(f"/bench/c{k}", memory=(30 + k) * MIB) for k in range(60)}
    cur = dict(calm)
    cur["/"] = cgroup("/", memory=4096 * MIB)
    cur["/bench/none"] = cgroup("/bench/none", memory=None)
    out = []
    for i in range(ticks):
        k = i % 60
        if i % 3 == 0:  # a re-read: a new object, now and then a few KiB off
            cur[f"/bench/c{k}"] = cgroup(f"/bench/c{k}", memory=(30 + k) * MIB + (i % 2) * 4096)
        elif i % 3 == 1:
            cur[f"/bench/c{k}"] = quiet(cur[f"/bench/c{k}"])
        cur["/"] = cgroup("/", memory=4096 * MIB + i * 6 * MIB)  # the host: never a culprit
        cur["/app/leak"] = cgroup("/app/leak", memory=100 * MIB + i * 6 * MIB)  # 12 MiB/s
        # one jump of 40 MiB and back: wide enough to be fitted, never a straight line
        cur["/app/spike"] = cgroup("/app/spike", memory=(240 if 30 <= i < 33 else 200) * MIB)
        if i < 40:
            cur["/app/gone"] = cgroup("/app/gone", memory=100 * MIB + i * 8 * MIB)
        else:
            cur.pop("/app/gone", None)
        if 20 <= i < 26:
            cur.pop("/app/back", None)
        else:
            cur["/app/back"] = cgroup("/app/back", memory=(300 if i < 20 else 100) * MIB)
        out.append(snap(i, cgroups=cur.values(), ts=T0 + jump + i * 0.5))
    return out


def test_fast_cgroup_levels_fit_only_what_moved_with_the_full_result() -> None:
    """The fast view fits only the cgroups whose levels in the window span the pre-filter's
    share (kept across ticks from the samples that changed); every tick its findings equal a
    fit of every cgroup, and the cgroups it fits are exactly those whose levels span it:
    with and without changes, a cgroup that vanishes or comes back, a window that does not
    follow the last one (another host model, time back; a gap) and a reload."""
    from linnixd.detectors.memory import PREFILTER_SHARE, _CgroupLevels

    class _Everything(_CgroupLevels):
        def update(self, snaps: Any) -> set[str]:
            return set(snaps[-1].cgroups)

    def full(cfg: Any) -> MemoryLeakDetector:
        ref = MemoryLeakDetector()
        ref._cgroup_levels = _Everything(PREFILTER_SHARE * (float(cfg.min_growth_mb) * MIB))
        return ref

    def spanning(snaps: list[Snapshot], cfg: Any) -> set[str]:
        out = set()
        for path in {p for s in snaps for p in s.cgroups}:
            levels = [v for s in snaps if (c := s.cgroups.get(path)) and (v := c.memory_bytes)]
            if levels and max(levels) - min(levels) >= PREFILTER_SHARE * cfg.min_growth_mb * MIB:
                out.add(path)
        return out

    det = MemoryLeakDetector()
    cfg = rule_cfg("memory_leak", window_s=10.0, min_span_s=5.0, scope=["cgroup"])
    ref = full(cfg)
    seen: set[str] = set()

    def same(window: list[Snapshot], c: Any, reference: MemoryLeakDetector) -> None:
        got = det.evaluate(window, c)
        assert got == reference.evaluate(window, c)
        fast = [s for s in window if s.ts >= window[-1].ts - c.window_s - 1e-6]
        assert det._cgroup_levels is not None and det._cgroup_levels.wide == spanning(fast, c)
        seen.update(f.key for f in got)

    host = _cgroup_host(80)
    for i in range(len(host)):
        same(host[max(0, i - 30) : i + 1], cfg, ref)
    assert seen == {"cgroup:/app/leak", "cgroup:/app/gone"}
    assert "/app/gone" not in det._cgroup_levels.points  # vanished before the window: dropped
    other = _cgroup_host(60, jump=-100.0)  # another host model: new objects, time back
    ref = full(cfg)
    for i in (25, 26, 27, 45, 59):  # 27 -> 45: a gap, snapshots never folded in
        same(other[i - 25 : i + 1], cfg, ref)
    same(other[34:60], cfg, ref)  # the same newest snapshot again, a shorter window
    strict = rule_cfg(
        "memory_leak", window_s=10.0, min_span_s=5.0, scope=["cgroup"], min_growth_mb=90
    )
    same(other[34:60], strict, full(strict))  # a reload: another pre-filter share
    assert det._cgroup_levels.wide == {"/", "/app/leak"}
