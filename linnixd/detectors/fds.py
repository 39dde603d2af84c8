"""fd_exhaustion: a process near its RLIMIT_NOFILE soft limit, or the host near fs.file-max."""

from __future__ import annotations

from collections.abc import Sequence

from ..model import Culprit, Finding, ProcessSample, Snapshot
from ..settings import RuleSettings, percent
from .base import Exclusions, process_culprit, process_key, severity

TOP_HOLDERS = 3  # fd holders named in a system-wide finding


class FdExhaustion(RuleSettings):
    """fd_exhaustion: a process near its fd limit, or the host near fs.file-max."""

    process_pct: float = percent(80.0)
    system_pct: float = percent(90.0)


class FdExhaustionDetector:
    """Newest snapshot only: fd use is a level, and the collector counts fds only near the limit."""

    rule = "fd_exhaustion"
    settings = FdExhaustion
    needs: frozenset[str] = frozenset()

    def __init__(self) -> None:
        # pids whose sample in the snapshot at _counted_ts carries an fd count (the collector
        # counts only past its FDSize prefilter): kept across ticks from each snapshot's
        # `changed`, so a tick looks at the few counted processes, not at every process
        self._counted: set[int] = set()
        self._counted_ts: float | None = None

    def _with_counts(self, window: Sequence[Snapshot]) -> list[ProcessSample]:
        newest = window[-1]
        procs = newest.processes
        follows = len(window) > 1 and window[-2].ts == self._counted_ts
        if newest.changed is None or not follows:
            self._counted = {pid for pid, p in procs.items() if p.fd_count is not None}
        else:
            for pid in newest.changed:
                q = procs.get(pid)
                if q is not None and q.fd_count is not None:
                    self._counted.add(pid)
                else:
                    self._counted.discard(pid)
            self._counted = {pid for pid in self._counted if pid in procs}
        self._counted_ts = newest.ts
        return [procs[pid] for pid in sorted(self._counted)]

    def evaluate(self, window: Sequence[Snapshot], cfg: FdExhaustion) -> list[Finding]:
        if not window:
            return []
        newest = window[-1]
        ex = Exclusions(cfg)
        process_pct = float(cfg.process_pct)
        findings = []
        for p in self._with_counts(window):
            if p.fd_count is None or not p.fd_soft_limit:
                continue
            pct = 100.0 * p.fd_count / p.fd_soft_limit
            if pct < process_pct:
                continue
            culprit = process_culprit(p, newest.processes)
            if ex.culprit(culprit):
                continue
            findings.append(
                Finding(
                    rule=self.rule,
                    key=process_key(p),
                    severity=severity(cfg),
                    summary=(
                        f"fd exhaustion: {culprit.label()} holds {p.fd_count} of "
                        f"{p.fd_soft_limit} fds ({pct:.0f}% of its soft limit)"
                    ),
                    culprit=culprit,
                    evidence={
                        "fd_count": p.fd_count,
                        "fd_limit": p.fd_soft_limit,
                        "pct": round(pct, 1),
                        "threshold_pct": process_pct,
                    },
                )
            )
        if newest.file_max > 0:
            pct = 100.0 * newest.file_nr / newest.file_max
            if pct >= float(cfg.system_pct):
                findings.append(self._system(newest, pct, cfg, ex))
        return findings

    def _system(self, newest: Snapshot, pct: float, cfg: FdExhaustion, ex: Exclusions) -> Finding:
        holders = sorted(
            (
                p
                for p in newest.processes.values()
                if p.fd_count is not None and not ex.matches(p.unit, p.cgroup, p.comm)
            ),
            key=lambda p: (-(p.fd_count or 0), p.pid),
        )[:TOP_HOLDERS]
        named = ", ".join(f"{p.comm}[{p.pid}] {p.fd_count}" for p in holders) or "no fd counts"
        return Finding(
            rule=self.rule,
            key="system:fds",
            severity=severity(cfg),
            summary=(
                f"fd exhaustion: host has {newest.file_nr} of {newest.file_max} file handles "
                f"({pct:.0f}%), top holders {named}"
            ),
            culprit=Culprit(kind="system"),
            evidence={
                "fd_count": newest.file_nr,
                "fd_limit": newest.file_max,
                "pct": round(pct, 1),
                "threshold_pct": float(cfg.system_pct),
                "top_holders": [
                    {"pid": p.pid, "comm": p.comm, "fd_count": p.fd_count, "unit": p.unit}
                    for p in holders
                ],
            },
        )
