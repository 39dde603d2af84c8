"""memory_leak: steady linear memory growth of a process or cgroup (least squares, R^2).

Sizes in evidence and summaries use MB = MiB = 2^20 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from ..model import Culprit, Finding, ProcessSample, Snapshot
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

SPAN_SHARE = 0.9  # samples must span this share of window_s
END_SAMPLES = 5  # samples whose median stands for each end of the series in the pre-filter
PREFILTER_SHARE = 0.5  # ends must be this share of min_growth apart before a full fit is worth it

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


def _median(values: list[int]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return float(values[mid]) if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _changed_in(snaps: Sequence[Snapshot], newest: Snapshot) -> list[ProcessSample]:
    """Live processes whose sample changed somewhere in `snaps`: only they can have grown."""
    pids: set[int] = set()
    for s in snaps:
        if s.changed is None:
            return list(newest.processes.values())
        pids |= s.changed
    procs = newest.processes
    return [p for pid in pids if (p := procs.get(pid)) is not None]


class MemoryLeak(RuleSettings):
    """memory_leak: steady growth of at least `min_growth_mb` over `window_s` (fit R^2 >= `min_r2`)."""

    cooldown_s: float = cooldown(600.0)
    min_growth_mb: float = Field(50.0, gt=0, le=1 << 30)
    window_s: float = seconds(60.0)
    min_r2: float = Field(0.8, gt=0, le=1)
    scope: tuple[Literal["process", "cgroup"], ...] = ("process", "cgroup")


class MemoryLeakDetector:
    """RSS (or cgroup memory) growing by >= min_growth_mb per window_s along a good straight line."""

    rule = "memory_leak"
    settings = MemoryLeak
    needs: frozenset[str] = frozenset()

    def evaluate(self, window: Sequence[Snapshot], cfg: MemoryLeak) -> list[Finding]:
        if not window:
            return []
        newest = window[-1]
        window_s = float(cfg.window_s)
        start = 0
        while start < len(window) and window[start].ts < newest.ts - window_s - TIME_EPS:
            start += 1
        snaps = window[start:]
        head = (
            0  # snapshots early enough for a series starting there to span SPAN_SHARE of window_s
        )
        while head < len(snaps) and snaps[head].ts <= newest.ts - SPAN_SHARE * window_s + TIME_EPS:
            head += 1
        if head == 0:
            return []
        ex = Exclusions(cfg)
        scope = set(cfg.scope)
        found: list[Finding] = []
        if "process" in scope:
            for p in _changed_in(snaps, newest):
                read: Reader = lambda s, p=p: q.rss_bytes if (q := same_process(s, p)) else None  # noqa: E731
                result = self._series(snaps, head, read, cfg)
                if result is None:
                    continue
                culprit = process_culprit(p, newest.processes)
                found.append(self._finding(process_key(p), culprit, "rss", result, cfg))
        cgroup_found: list[Finding] = []
        if "cgroup" in scope:
            for path, cg in newest.cgroups.items():
                if path == "/" or cg.memory_bytes is None:
                    continue  # the root cgroup is the whole host, not a culprit
                read = lambda s, path=path: c.memory_bytes if (c := s.cgroups.get(path)) else None  # noqa: E731
                result = self._series(snaps, head, read, cfg)
                if result is None:
                    continue
                culprit = Culprit(kind="cgroup", cgroup=path, unit=cgroup_unit(newest, path))
                cgroup_found.append(self._finding(f"cgroup:{path}", culprit, "memory", result, cfg))
        # the most specific culprit wins: a leaking process over its cgroup, a child cgroup over its parent
        for f in cgroup_found:
            path = f.culprit.cgroup or "/"
            inner = [g.culprit.cgroup or "/" for g in found + cgroup_found if g is not f]
            if any(c == path or is_ancestor_cgroup(path, c) for c in inner):
                continue
            found.append(f)
        return [f for f in found if not ex.culprit(f.culprit)]

    def _series(
        self, snaps: Sequence[Snapshot], head: int, read: Reader, cfg: MemoryLeak
    ) -> dict[str, Any] | None:
        """The fit of one series when it is a leak, else None (cheap end-median pre-filter first)."""
        window_s = float(cfg.window_s)
        growth_bytes = float(cfg.min_growth_mb) * MIB
        first = next((i for i in range(head) if read(snaps[i]) is not None), None)
        if first is None:
            return None  # too young to span the window
        early = _first_values(snaps[first : first + 3 * END_SAMPLES], read)
        late = _first_values(snaps[: -3 * END_SAMPLES - 1 : -1], read)
        if not late or _median(late) - _median(early) < PREFILTER_SHARE * growth_bytes:
            return None
        t0 = snaps[-1].ts
        points = [(s.ts - t0, float(v)) for s in snaps[first:] if (v := read(s)) is not None]
        span = points[-1][0] - points[0][0]
        if len(points) < 3 or span < SPAN_SHARE * window_s - TIME_EPS:
            return None
        slope, r2 = fit(points)
        growth = slope * window_s
        if growth < growth_bytes or r2 < float(cfg.min_r2):
            return None
        return {
            "slope_mb_per_min": round(slope * 60 / MIB, 2),
            "growth_mb": round(growth / MIB, 1),
            "r2": round(r2, 3),
            "start_mb": round(points[0][1] / MIB, 1),
            "now_mb": round(points[-1][1] / MIB, 1),
            "samples": len(points),
            "span_s": round(span, 1),
        }

    def _finding(
        self, key: str, culprit: Culprit, what: str, r: dict[str, Any], cfg: MemoryLeak
    ) -> Finding:
        evidence = {
            "slope_mb_per_min": r["slope_mb_per_min"],
            "growth_mb": r["growth_mb"],
            "r2": r["r2"],
            f"{what}_start_mb": r["start_mb"],
            f"{what}_now_mb": r["now_mb"],
            "samples": r["samples"],
            "span_s": r["span_s"],
            "window_s": float(cfg.window_s),
            "min_growth_mb": float(cfg.min_growth_mb),
        }
        return Finding(
            rule=self.rule,
            key=key,
            severity=severity(cfg),
            summary=(
                f"memory leak: {culprit.label()} {what} grows {r['slope_mb_per_min']:.1f} MiB/min "
                f"({r['growth_mb']:.0f} MiB per {float(cfg.window_s):g} s, R^2 {r['r2']:.2f}), "
                f"now {r['now_mb']:.0f} MiB"
            ),
            culprit=culprit,
            evidence=evidence,
        )
