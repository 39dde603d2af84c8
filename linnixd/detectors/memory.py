"""memory_leak: steady memory growth of a process or cgroup, fast or slow, with a time to its limit.

Two views of the same growth, both least-squares fits judged by the growth they actually
observed (never extrapolated) and their R^2:
- fast: every snapshot of the last `window_s`, from `min_span_s` on (a leak of 10 MB/s is
  named seconds after it crossed `min_growth_mb`); only processes and cgroups whose memory
  moved enough in the window are fitted (processes from the samples the window holds, cgroups
  from the levels `_CgroupLevels` keeps across ticks, so a tick costs what changed);
- slow: a downsampled series per process and cgroup kept by the detector across ticks, one
  point per `slow_window_s / SLOW_POINTS` seconds over `slow_window_s` (tens of MB per hour
  are seen once `slow_min_span_s` of steady growth has passed). Each series takes its points
  at its own phase of that step, so a tick takes only the points due. Bounded: SLOW_POINTS per
  series, series only for tracked processes and cgroups, at most SLOW_MAX_SERIES (the
  flattest are dropped first, down to 90% of it, counted in `health()`).
Every finding projects when the culprit reaches the nearest limit: its cgroup's memory.high or
memory.max (the lowest on its path), else the host's MemAvailable.
Sizes in evidence and summaries use MB = MiB = 2^20 bytes.
"""

from __future__ import annotations

import heapq
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..health import Health
from ..model import CgroupSample, Culprit, Finding, ProcessSample, Snapshot
from ..settings import Field, RuleSettings, cooldown, seconds
from .base import (
    MIB,
    TIME_EPS,
    Exclusions,
    cgroup_unit,
    is_ancestor_cgroup,
    process_culprit,
    process_key,
    same_process,
    severity,
)

END_SAMPLES = 5  # samples whose median stands for each end of the series in the pre-filter
PREFILTER_SHARE = 0.5  # ends must be this share of min_growth apart before a full fit is worth it
MIN_POINTS = 8  # fast fit: at least this many samples
SLOW_POINTS = 120  # slow series: points kept per series (its step is slow_window_s / SLOW_POINTS)
SLOW_MIN_POINTS = 10
SLOW_MAX_SERIES = 4096

Reader = Callable[[Snapshot], int | None]


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (y per unit of x) and R^2 of `points`; R^2 is 0 for a flat series."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sxy = syy = 0.0
    for x, y in points:
        dx, dy = x - mx, y - my
        sxx += dx * dx
        sxy += dx * dy
        syy += dy * dy
    if sxx <= 0:
        return 0.0, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 0.0
    return slope, r2


def _rss_reader(p: ProcessSample) -> Reader:
    """The RSS of process `p` in a snapshot (None where absent or the pid is another process)."""

    def read(s: Snapshot) -> int | None:
        q = same_process(s, p)
        return q.rss_bytes if q else None

    return read


def _cgroup_memory_reader(path: str) -> Reader:
    """The memory use of cgroup `path` in a snapshot (None where absent or unreadable)."""

    def read(s: Snapshot) -> int | None:
        c = s.cgroups.get(path)
        return c.memory_bytes if c else None

    return read


def _first_values(snaps: Sequence[Snapshot], read: Reader) -> list[int]:
    """Up to END_SAMPLES values read from `snaps` in order, stopping as soon as there are enough."""
    out: list[int] = []
    for s in snaps:
        v = read(s)
        if v is not None:
            out.append(v)
            if len(out) == END_SAMPLES:
                break
    return out


def _median(values: Sequence[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return float(values[mid]) if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _grown_in(snaps: Sequence[Snapshot], newest: Snapshot, min_rise: float) -> list[ProcessSample]:
    """Live processes whose RSS now is at least `min_rise` bytes above their lowest in `snaps`.

    One pass over the samples the window holds (older snapshots keep only what changed), so
    the per-process series is read only for the few that could be leaking.
    """
    lowest: dict[tuple[int, float], int] = {}
    changed: set[int] | None = set()
    for s in snaps[:-1]:
        if s.changed is None:
            changed = None
        elif changed is not None:
            changed |= s.changed
        for p in s.processes.values():
            key = (p.pid, p.start_time)
            low = lowest.get(key)
            if low is None or p.rss_bytes < low:
                lowest[key] = p.rss_bytes
    if newest.changed is None:
        changed = None
    elif changed is not None:
        changed |= newest.changed
    procs = newest.processes
    live = procs.values() if changed is None else [procs[p] for p in changed if p in procs]
    out = []
    for p in live:
        low = lowest.get((p.pid, p.start_time))
        if low is not None and p.rss_bytes - low >= min_rise:
            out.append(p)
    return out


def _judge(
    points: Sequence[tuple[float, float]], cfg: MemoryLeak, min_span: float
) -> dict[str, Any] | None:
    """The fit of a series when it shows a leak (observed growth, R^2, span), else None."""
    span = points[-1][0] - points[0][0]
    if span < min_span - TIME_EPS:
        return None
    slope, r2 = fit(points)
    growth = slope * span
    if growth < float(cfg.min_growth_mb) * MIB or r2 < float(cfg.min_r2):
        return None
    return {
        "slope": slope,
        "slope_mb_per_min": round(slope * 60 / MIB, 2),
        "growth_mb": round(growth / MIB, 1),
        "r2": round(r2, 3),
        "start_mb": round(points[0][1] / MIB, 1),
        "now_mb": round(points[-1][1] / MIB, 1),
        "samples": len(points),
        "span_s": round(span, 1),
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _rate(slope: float) -> str:
    per_min = slope * 60 / MIB
    return f"{per_min:.1f} MiB/min" if per_min >= 1 else f"{per_min * 60:.1f} MiB/h"


def projection(
    newest: Snapshot, cgroup: str | None, level_bytes: float, slope: float
) -> dict[str, Any]:
    """When the culprit reaches its nearest limit at `slope` bytes/s.

    `level_bytes` is the culprit's own size (RSS, or the cgroup's memory). A cgroup limit is
    reached by the cgroup's usage, so the headroom is the limit less that usage. The host's
    MemAvailable is the headroom when it is nearer (or no cgroup limit is set).
    """
    cands: list[tuple[float, str, float]] = []  # (headroom, kind, limit)
    cg = newest.cgroups.get(cgroup) if cgroup is not None else None
    if cg is not None:
        usage = float(cg.memory_bytes) if cg.memory_bytes is not None else level_bytes
        for kind, limit in (
            ("memory.high", cg.memory_high_bytes),
            ("memory.max", cg.memory_max_bytes),
        ):
            if limit is not None:
                cands.append((limit - usage, kind, float(limit)))
    if newest.mem_available_bytes > 0:
        avail = float(newest.mem_available_bytes)
        cands.append((avail, "MemAvailable", avail))
    if not cands:
        return {"limit_kind": None, "limit_mb": None, "headroom_mb": None, "eta_s": None}
    room, kind, level = min(cands)
    headroom = max(0.0, room)
    eta = headroom / slope if slope > 0 else None
    return {
        "limit_kind": kind,
        "limit_mb": round(level / MIB, 1),
        "headroom_mb": round(headroom / MIB, 1),
        "eta_s": round(eta, 1) if eta is not None else None,
    }


@dataclass
class _Series:
    """One downsampled series: seconds since t0 and MiB, as float32 (8 bytes a point)."""

    t0: float
    ts: array = field(default_factory=lambda: array("f"))
    mb: array = field(default_factory=lambda: array("f"))

    def add(self, ts: float, value: float, keep_s: float) -> None:
        self.ts.append(ts - self.t0)
        self.mb.append(value / MIB)
        cut = 0
        horizon = ts - self.t0 - keep_s
        while cut < len(self.ts) - 1 and self.ts[cut] < horizon - TIME_EPS:
            cut += 1
        if cut:
            del self.ts[:cut]
            del self.mb[:cut]
        while len(self.ts) > SLOW_POINTS:
            del self.ts[0]
            del self.mb[0]

    def points(self) -> list[tuple[float, float]]:
        return [(self.t0 + t, v * MIB) for t, v in zip(self.ts, self.mb, strict=True)]

    def rise_mb(self) -> float:
        return float(self.mb[-1] - min(self.mb)) if self.mb else 0.0


class _CgroupLevels:
    """The memory levels each cgroup held over the fast window, kept across ticks.

    Per cgroup, the points where its memory changed (ts, bytes, or None while absent or
    unreadable), the first being the level in effect at the window's first snapshot. A tick
    folds in only the newest snapshot's samples that are not the previous snapshot's objects
    (the host model carries a cgroup it did not re-read as the same object, or as a quiet
    copy with the same level) and drops the points that left the window. A window holding a
    snapshot that was not folded in (another host model, a reload, a gap) is folded in whole.
    `wide` is the cgroups whose levels span at least `min_rise`: the fit's pre-filter compares
    medians of levels in the window, which lie between its lowest and its highest, so no other
    cgroup can pass it.
    """

    def __init__(self, min_rise: float) -> None:
        self.min_rise = min_rise
        self._clear()

    def _clear(self) -> None:
        self.points: dict[str, list[tuple[float, int | None]]] = {}
        self.wide: set[str] = set()
        self._log: deque[tuple[float, str]] = deque()  # every point, oldest first
        self._folded: dict[float, Mapping[str, CgroupSample]] = {}  # snapshots in, by ts
        self._last: Mapping[str, CgroupSample] = {}
        self._last_ts: float | None = None
        self._dirty: set[str] = set()

    def update(self, snaps: Sequence[Snapshot]) -> set[str]:
        """Fold `snaps` (the fast window, oldest first) in; the cgroups that can pass the pre-filter."""
        newest = snaps[-1]
        if not self._follows(snaps):
            self._clear()
            for s in snaps:
                self._fold(s)
        elif newest.ts != self._last_ts:
            self._fold(newest)
        self._prune(snaps[0].ts)
        for path in self._dirty:
            levels = [v for _, v in self.points.get(path, ()) if v is not None]
            if levels and max(levels) - min(levels) >= self.min_rise:
                self.wide.add(path)
            else:
                self.wide.discard(path)
        self._dirty.clear()
        return self.wide

    def _follows(self, snaps: Sequence[Snapshot]) -> bool:
        """True when every snapshot of `snaps` but the newest was folded in, and the newest is
        newer than the last (or is the last)."""
        newest = snaps[-1]
        if self._last_ts is None or newest.ts < self._last_ts:
            return False
        if newest.ts == self._last_ts and newest.cgroups is not self._last:
            return False
        folded = self._folded
        return all(folded.get(s.ts) is s.cgroups for s in snaps[:-1])

    def _fold(self, snap: Snapshot) -> None:
        before, now, ts = self._last, snap.cgroups, snap.ts
        if now is not before:
            for path in [p for p, cg in now.items() if before.get(p) is not cg]:
                self._level(path, ts, now[path].memory_bytes)
            for path in before.keys() - now.keys():
                self._level(path, ts, None)
        self._folded[ts] = now
        self._last, self._last_ts = now, ts

    def _level(self, path: str, ts: float, value: int | None) -> None:
        points = self.points.get(path)
        if points is None:
            if value is None:
                return
            points = self.points[path] = []
        elif points[-1][1] == value:
            return
        points.append((ts, value))
        self._log.append((ts, path))
        self._dirty.add(path)

    def _prune(self, start: float) -> None:
        """Drop the points superseded by one in effect at `start`, the window's first snapshot."""
        log = self._log
        while log and log[0][0] <= start:
            _, path = log.popleft()
            points = self.points.get(path)
            if points is None:
                continue
            cut = 0
            while cut + 1 < len(points) and points[cut + 1][0] <= start:
                cut += 1
            if cut:
                del points[:cut]
                self._dirty.add(path)
            if len(points) == 1 and points[0][1] is None:
                del self.points[path]  # gone since before the window
        for ts in [t for t in self._folded if t < start]:
            del self._folded[ts]


class MemoryLeak(RuleSettings):
    """memory_leak: growth of at least `min_growth_mb` observed along a fit with R^2 >= `min_r2`.

    Fast leaks over the last `window_s` once the series spans `min_span_s`; slow leaks over a
    downsampled series of `slow_window_s` once it spans `slow_min_span_s`.
    """

    cooldown_s: float = cooldown(600.0)
    min_growth_mb: float = Field(50.0, gt=0, le=1 << 30)
    min_r2: float = Field(0.8, gt=0, le=1)
    window_s: float = seconds(60.0)
    min_span_s: float = seconds(10.0)
    slow_window_s: float = Field(21600.0, gt=0, le=7 * 86400)
    slow_min_span_s: float = Field(1800.0, gt=0, le=7 * 86400)
    scope: tuple[Literal["process", "cgroup"], ...] = ("process", "cgroup")


class MemoryLeakDetector:
    """Memory growing by >= min_growth_mb along a good straight line, over seconds or hours."""

    rule = "memory_leak"
    settings = MemoryLeak
    needs: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self._series: dict[str, _Series] = {}  # slow series by culprit key
        self._last_point: float | None = None  # ts of the newest snapshot the slow view saw
        self._slow: dict[str, Finding] = {}  # slow findings as of each series' last point
        # Each process and cgroup takes its slow points at its own phase of the step: a heap
        # of (due, culprit key) and the due time each key holds (a heap entry whose due
        # differs is stale). A tick takes only the points due, so the cost per tick is what is
        # due, not every process at once every step.
        self._due: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        self._last_scan: float | None = None  # when every process and cgroup was last looked at
        self._cgroup_levels: _CgroupLevels | None = None  # fast window: cgroup levels
        self.evicted_series = 0

    def health(self) -> Health:
        """Slow-series bookkeeping (evictions, monotonic; the current size) and the fast
        window's cgroup levels (points kept, cgroups whose levels moved enough to be fitted)."""
        levels = self._cgroup_levels or _CgroupLevels(0.0)
        return Health(
            counters={"evicted_series": self.evicted_series},
            gauges={
                "slow_series": len(self._series),
                "slow_points": sum(len(s.ts) for s in self._series.values()),
                "fast_cgroup_points": sum(len(p) for p in levels.points.values()),
                "fast_cgroups_moving": len(levels.wide),
            },
        )

    def evaluate(self, window: Sequence[Snapshot], cfg: MemoryLeak) -> list[Finding]:
        if not window:
            return []
        newest = window[-1]
        fast = self._fast(window, cfg)
        slow = self._slow_findings(newest, cfg)
        keys = {f.key for f in fast}
        return self._most_specific(fast + [f for f in slow if f.key not in keys], cfg)

    # ---- fast: the snapshots of the window -------------------------------------------------

    def _fast(self, window: Sequence[Snapshot], cfg: MemoryLeak) -> list[Finding]:
        newest = window[-1]
        window_s = float(cfg.window_s)
        start = 0
        while start < len(window) and window[start].ts < newest.ts - window_s - TIME_EPS:
            start += 1
        snaps = window[start:]
        scope = set(cfg.scope)
        found: list[Finding] = []
        if "process" in scope:
            min_rise = PREFILTER_SHARE * float(cfg.min_growth_mb) * MIB
            for p in _grown_in(snaps, newest, min_rise):
                result = self._series_fit(snaps, _rss_reader(p), cfg)
                if result is not None:
                    culprit = process_culprit(p, newest.processes)
                    found.append(
                        self._finding(newest, process_key(p), culprit, "rss", result, "fast", cfg)
                    )
        if "cgroup" not in scope:
            self._cgroup_levels = None
        else:
            min_rise = PREFILTER_SHARE * (float(cfg.min_growth_mb) * MIB)  # as _series_fit's
            levels = self._cgroup_levels
            if levels is None or levels.min_rise != min_rise:
                levels = self._cgroup_levels = _CgroupLevels(min_rise)
            # the root cgroup is the whole host, not a culprit; a cgroup not in `moving` cannot
            # pass _series_fit's pre-filter. Looked at in newest.cgroups' order, as all were.
            moving = levels.update(snaps) - {"/"}
            for path in [p for p in newest.cgroups if p in moving] if moving else ():
                cg = newest.cgroups[path]
                if cg.memory_bytes is None:
                    continue
                result = self._series_fit(snaps, _cgroup_memory_reader(path), cfg)
                if result is not None:
                    culprit = Culprit(kind="cgroup", cgroup=path, unit=cgroup_unit(newest, path))
                    found.append(
                        self._finding(
                            newest, f"cgroup:{path}", culprit, "memory", result, "fast", cfg
                        )
                    )
        return found

    def _series_fit(
        self, snaps: Sequence[Snapshot], read: Reader, cfg: MemoryLeak
    ) -> dict[str, Any] | None:
        """The fit of one series when it is a leak, else None (cheap end-median pre-filter first)."""
        growth_bytes = float(cfg.min_growth_mb) * MIB
        first = next((i for i, s in enumerate(snaps) if read(s) is not None), None)
        if first is None:
            return None
        early = _first_values(snaps[first : first + 3 * END_SAMPLES], read)
        late = _first_values(snaps[: -3 * END_SAMPLES - 1 : -1], read)
        if not early or not late or _median(late) - _median(early) < PREFILTER_SHARE * growth_bytes:
            return None
        points = [(s.ts, float(v)) for s in snaps[first:] if (v := read(s)) is not None]
        if len(points) < MIN_POINTS:
            return None
        return _judge(points, cfg, float(cfg.min_span_s))

    # ---- slow: the downsampled series ------------------------------------------------------

    def _slow_findings(self, newest: Snapshot, cfg: MemoryLeak) -> list[Finding]:
        keep_s = float(cfg.slow_window_s)
        step = keep_s / SLOW_POINTS
        ts = newest.ts
        if self._last_point is not None and ts < self._last_point:
            # time went backwards: another host model, start over
            self._series.clear()
            self._slow.clear()
            self._due.clear()
            self._due_at.clear()
            self._last_scan = None
        self._last_point = ts
        scope: set[str] = set(cfg.scope)
        self._schedule_new(newest, scope, step)
        taken: list[str] = []
        while self._due and self._due[0][0] <= ts + TIME_EPS:
            due, key = heapq.heappop(self._due)
            if self._due_at.get(key) != due:
                continue  # rescheduled or dropped since: a stale heap entry
            value = self._level(newest, key, scope)
            if value is None:  # exited, vanished or out of scope
                del self._due_at[key]
                self._series.pop(key, None)
                self._slow.pop(key, None)
                continue
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(ts)
            series.add(ts, value, keep_s)
            taken.append(key)
            nxt = due + step if due + step > ts else ts + step
            self._due_at[key] = nxt
            heapq.heappush(self._due, (nxt, key))
        if len(self._series) > SLOW_MAX_SERIES:
            # the flattest go first, down to a margin below the cap so the sort is rare
            flattest = sorted(self._series, key=lambda k: self._series[k].rise_mb())
            for key in flattest[: len(self._series) - SLOW_MAX_SERIES * 9 // 10]:
                del self._series[key]
                self._slow.pop(key, None)
                self.evicted_series += 1
        growth_mb = float(cfg.min_growth_mb)
        for key in taken:
            series = self._series.get(key)
            self._slow.pop(key, None)
            if series is None or len(series.ts) < SLOW_MIN_POINTS or series.rise_mb() < growth_mb:
                continue
            result = _judge(series.points(), cfg, float(cfg.slow_min_span_s))
            if result is None:
                continue
            if key.startswith("cgroup:"):
                path = key[len("cgroup:") :]
                culprit = Culprit(kind="cgroup", cgroup=path, unit=cgroup_unit(newest, path))
                self._slow[key] = self._finding(newest, key, culprit, "memory", result, "slow", cfg)
            else:
                p = self._process(newest, key)
                assert p is not None  # its level was just read
                culprit = process_culprit(p, newest.processes)
                self._slow[key] = self._finding(newest, key, culprit, "rss", result, "slow", cfg)
        return list(self._slow.values())

    def _schedule_new(self, newest: Snapshot, scope: set[str], step: float) -> None:
        """Give each process and cgroup not yet scheduled its first slow point, at a phase of
        the step of its own (from its key), so the points of a whole host spread over the step.
        New processes are in the snapshot's `changed`; every process and cgroup is looked at
        once a step (and when a snapshot has no `changed`), which finds what that missed."""
        ts = newest.ts
        full = newest.changed is None or self._last_scan is None or ts - self._last_scan >= step
        if full:
            self._last_scan = ts
        due_at = self._due_at
        if "process" in scope:
            procs = newest.processes
            for pid in procs.keys() if full or newest.changed is None else newest.changed:
                p = procs.get(pid)
                if p is None:
                    continue
                key = process_key(p)
                if key not in due_at:
                    self._schedule(key, ts, step)
        if "cgroup" in scope and full:
            for path, cg in newest.cgroups.items():
                if path != "/" and cg.memory_bytes is not None:
                    key = "cgroup:" + path
                    if key not in due_at:
                        self._schedule(key, ts, step)

    def _schedule(self, key: str, ts: float, step: float) -> None:
        due = ts + step * (zlib.crc32(key.encode()) % 1024) / 1024
        self._due_at[key] = due
        heapq.heappush(self._due, (due, key))

    @staticmethod
    def _process(newest: Snapshot, key: str) -> ProcessSample | None:
        """The live process a "pid:PID:START" key names in the newest snapshot, else None."""
        pid = key.split(":", 2)[1]
        p = newest.processes.get(int(pid))
        return p if p is not None and process_key(p) == key else None

    def _level(self, newest: Snapshot, key: str, scope: set[str]) -> float | None:
        """A culprit key's memory now: a process's RSS or a cgroup's memory (None: gone)."""
        if key.startswith("cgroup:"):
            if "cgroup" not in scope:
                return None
            cg = newest.cgroups.get(key[len("cgroup:") :])
            return (
                float(cg.memory_bytes) if cg is not None and cg.memory_bytes is not None else None
            )
        if "process" not in scope:
            return None
        p = self._process(newest, key)
        return float(p.rss_bytes) if p is not None else None

    # ---- shared ------------------------------------------------------------------------------

    @staticmethod
    def _most_specific(found: list[Finding], cfg: MemoryLeak) -> list[Finding]:
        """A leaking process over its cgroup, a child cgroup over its parent; exclusions last."""
        ex = Exclusions(cfg)
        procs = [f for f in found if f.culprit.kind != "cgroup"]
        groups = [f for f in found if f.culprit.kind == "cgroup"]
        out = list(procs)
        for f in groups:
            path = f.culprit.cgroup or "/"
            inner = [g.culprit.cgroup or "/" for g in found if g is not f]
            if any(c == path or is_ancestor_cgroup(path, c) for c in inner):
                continue
            out.append(f)
        return [f for f in out if not ex.culprit(f.culprit)]

    def _finding(
        self,
        newest: Snapshot,
        key: str,
        culprit: Culprit,
        what: str,
        r: dict[str, Any],
        mode: str,
        cfg: MemoryLeak,
    ) -> Finding:
        level = r["now_mb"] * MIB
        proj = projection(newest, culprit.cgroup, level, r["slope"])
        evidence = {
            "mode": mode,
            "slope_mb_per_min": r["slope_mb_per_min"],
            "rate_mb_per_h": round(r["slope"] * 3600 / MIB, 1),
            "growth_mb": r["growth_mb"],
            "r2": r["r2"],
            f"{what}_start_mb": r["start_mb"],
            f"{what}_now_mb": r["now_mb"],
            "samples": r["samples"],
            "span_s": r["span_s"],
            "window_s": float(cfg.slow_window_s if mode == "slow" else cfg.window_s),
            "min_growth_mb": float(cfg.min_growth_mb),
            **proj,
        }
        if proj["eta_s"] is not None:
            if proj["limit_kind"] == "MemAvailable":
                where = f"exhausts MemAvailable ({proj['limit_mb']:.0f} MiB left)"
            else:
                where = f"hits {proj['limit_kind']} ({proj['limit_mb']:.0f} MiB)"
            eta = f"; {where} in about {_duration(proj['eta_s'])}"
        else:
            eta = "; no memory limit known to project against"
        return Finding(
            rule=self.rule,
            key=key,
            severity=severity(cfg),
            summary=(
                f"memory leak: {culprit.label()} {what} grows {_rate(r['slope'])} "
                f"(+{r['growth_mb']:.0f} MiB in {_duration(r['span_s'])}, R^2 {r['r2']:.2f}), "
                f"now {r['now_mb']:.0f} MiB{eta}"
            ),
            culprit=culprit,
            evidence=evidence,
        )
