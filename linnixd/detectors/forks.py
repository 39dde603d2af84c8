"""Process-creation rules: fork_storm (sustained creation rate per cgroup) and short_lived_jobs."""

from __future__ import annotations

import collections
from collections.abc import Sequence

from ..model import Culprit, ExitRecord, Finding, ProcessSample, Snapshot
from ..settings import Field, RuleSettings, seconds, top_n
from .base import (
    Exclusions,
    cgroup_unit,
    covered_s,
    recent,
    severity,
    sustained_tail,
)

UNKNOWN_COMM = "unknown"  # a parent that exited before we saw it: its pid is all we know


def _find_process(snaps: Sequence[Snapshot], pid: int) -> ProcessSample | None:
    """The newest sample of `pid` in `snaps` (a parent may have exited since it forked)."""
    for snap in reversed(snaps):
        p = snap.processes.get(pid)
        if p is not None:
            return p
    return None


def _cgroup_paths(snaps: Sequence[Snapshot], ids: set[int]) -> dict[int, str]:
    """The path of each of `ids`, from the newest snapshot that holds it (a re-used id is the
    newest cgroup's); newest first and only until every id is found, so with many cgroups a
    lookup costs one pass over the newest snapshot, not over every snapshot of the window."""
    out: dict[int, str] = {}
    scanned = None
    for snap in reversed(snaps):
        if len(out) == len(ids):
            break
        if snap.cgroups is scanned:
            continue  # the same cgroups as the snapshot just looked at
        scanned = snap.cgroups
        found = {cg.id: path for path, cg in scanned.items() if cg.id in ids}
        for cid, path in found.items():
            out.setdefault(cid, path)
    return out


def _exited_comm(snaps: Sequence[Snapshot], pid: int) -> str:
    """The comm of an exited process from its own exit record, else UNKNOWN_COMM."""
    for snap in snaps:
        for r in snap.exits:
            if r.pid == pid:
                return r.comm
    return UNKNOWN_COMM


class ForkStorm(RuleSettings):
    """fork_storm: a process creating processes faster than `rate_per_s` for `sustain_s`."""

    rate_per_s: float = Field(10.0, gt=0, le=1_000_000)
    sustain_s: float = seconds(2.0)
    top: int = top_n(3)


class ForkStormDetector:
    """A cgroup creating processes faster than rate_per_s in every interval of the last sustain_s."""

    rule = "fork_storm"
    settings = ForkStorm
    needs = frozenset({"lifecycle"})

    def evaluate(self, window: Sequence[Snapshot], cfg: ForkStorm) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        newest = window[-1]
        rate = float(cfg.rate_per_s)
        ex = Exclusions(cfg)
        findings = []
        for path, now in newest.by_cgroup.items():
            # cheap pre-filter on the newest interval before walking the tail
            if newest.interval_s <= 0 or now.forks / newest.interval_s <= rate:
                continue
            forks = 0
            for snap in tail:
                c = snap.by_cgroup.get(path)
                if c is None or snap.interval_s <= 0 or c.forks / snap.interval_s <= rate:
                    break
                forks += c.forks
            else:
                finding = self._finding(tail, path, forks, cfg, ex)
                if finding is not None:
                    findings.append(finding)
        return findings

    def _finding(
        self, tail: Sequence[Snapshot], path: str, forks: int, cfg: ForkStorm, ex: Exclusions
    ) -> Finding | None:
        newest = tail[-1]
        unit = cgroup_unit(newest, path)
        if ex.matches(unit=unit, cgroup=path):
            return None
        per_parent: collections.Counter[int] = collections.Counter()
        for snap in tail:
            for pid, c in snap.by_parent.items():
                if c.forks:
                    per_parent[pid] += c.forks
        candidates: list[tuple[int, int, ProcessSample | None]] = []
        excluded = 0
        for pid, n in per_parent.most_common():
            p = _find_process(tail, pid)
            if p is not None and p.cgroup != path:
                continue  # forks in another cgroup
            if p is not None and ex.matches(unit=p.unit, comm=p.comm):
                excluded += 1
                continue
            candidates.append((pid, n, p))
        if excluded and not candidates:
            return None  # everything forking in this cgroup is excluded
        seconds = covered_s(tail)
        rate = forks / seconds if seconds > 0 else 0.0
        top = [
            {
                "pid": pid,
                "comm": p.comm if p is not None else UNKNOWN_COMM,
                "forks": n,
                "share": round(min(1.0, n / forks), 3) if forks else 0.0,
            }
            for pid, n, p in candidates[: max(1, cfg.top)]
        ]
        where = unit or path
        if candidates:
            pid, n, p = candidates[0]
            if p is not None:
                parent = newest.processes.get(p.ppid)
                culprit = Culprit(
                    kind="process",
                    pid=pid,
                    comm=p.comm,
                    cgroup=path,
                    unit=unit,
                    parent_pid=p.ppid,
                    parent_comm=parent.comm if parent is not None else None,
                )
            else:
                culprit = Culprit(
                    kind="process", pid=pid, comm=UNKNOWN_COMM, cgroup=path, unit=unit
                )
            who = f", top parent {culprit.comm}[{pid}] ({top[0]['share']:.0%}) in {where}"
        else:
            culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
            who = f" in {where}, parent unknown"
        return Finding(
            rule=self.rule,
            key=f"cgroup:{path}",
            severity=severity(cfg),
            summary=f"fork storm: {rate:.0f} process creations/s for {seconds:.1f} s{who}",
            culprit=culprit,
            evidence={
                "rate_per_s": round(rate, 1),
                "forks": forks,
                "window_s": round(seconds, 3),
                "sustain_s": float(cfg.sustain_s),
                "threshold_per_s": float(cfg.rate_per_s),
                "top_parents": top,
                "cgroup": path,
                "unit": unit,
            },
        )


def _status(r: ExitRecord) -> str:
    if r.signal is not None:
        return f"signal {r.signal}"
    if r.exit_code is not None:
        return f"exit {r.exit_code}"
    return "unknown"


class ShortLivedJobs(RuleSettings):
    """short_lived_jobs: at least `min_count` processes living under `max_lifetime_s` in `window_s`."""

    max_lifetime_s: float = seconds(1.0)
    min_count: int = Field(20, ge=1, le=1_000_000)
    window_s: float = seconds(10.0)


class ShortLivedJobsDetector:
    """Many short-lived exits within window_s from one parent (preferred) or one cgroup."""

    rule = "short_lived_jobs"
    settings = ShortLivedJobs
    needs = frozenset({"lifecycle"})

    def evaluate(self, window: Sequence[Snapshot], cfg: ShortLivedJobs) -> list[Finding]:
        if not window:
            return []
        window_s = float(cfg.window_s)
        min_count = int(cfg.min_count)
        snaps = recent(window, window_s)
        by_parent: collections.Counter[int] = collections.Counter()
        by_cgroup: collections.Counter[str] = collections.Counter()
        for snap in snaps:
            for pid, c in snap.by_parent.items():
                if c.short_exits:
                    by_parent[pid] += c.short_exits
            for path, c in snap.by_cgroup.items():
                if c.short_exits:
                    by_cgroup[path] += c.short_exits
        parents = [pid for pid, n in by_parent.items() if n >= min_count]
        cgroups = [path for path, n in by_cgroup.items() if n >= min_count]
        if not parents and not cgroups:
            return []

        newest = window[-1]
        max_lifetime = float(cfg.max_lifetime_s)
        records = [
            r
            for snap in snaps
            for r in snap.exits
            if r.lifetime_s is not None and r.lifetime_s <= max_lifetime
        ]
        ex = Exclusions(cfg)
        findings = []
        explained: set[str] = set()
        for pid in sorted(parents):
            mine = [r for r in records if r.ppid == pid]
            p = _find_process(snaps, pid)
            if p is not None:
                parent_cgroup: str | None = p.cgroup
            else:
                paths = _cgroup_paths(snaps, {r.cgroup_id for r in mine})
                seen = collections.Counter(paths.get(r.cgroup_id) for r in mine)
                parent_cgroup = seen.most_common(1)[0][0] if seen else None
            if parent_cgroup is not None:
                explained.add(
                    parent_cgroup
                )  # the parent finding names this cgroup's jobs, even if excluded
            unit = (
                p.unit
                if p is not None
                else (cgroup_unit(newest, parent_cgroup) if parent_cgroup else None)
            )
            # gone: its own exit record, when it was streamed, still has its name
            comm = p.comm if p is not None else _exited_comm(snaps, pid)
            parent = newest.processes.get(p.ppid) if p is not None else None
            culprit = Culprit(
                kind="process",
                pid=pid,
                comm=comm,
                cgroup=parent_cgroup,
                unit=unit,
                parent_pid=p.ppid if p is not None else None,
                parent_comm=parent.comm if parent is not None else None,
            )
            if ex.culprit(culprit):
                continue
            # by pid alone: the same incident whether the parent is still alive or has exited
            # (its start time is gone with it); a reused pid within the cooldown shares it
            key = f"parent:{pid}"
            where = f" in {unit or parent_cgroup}" if (unit or parent_cgroup) else ""
            findings.append(
                self._finding(
                    key, f"parent {comm}[{pid}]{where}", culprit, by_parent[pid], mine, cfg
                )
            )
        for path in sorted(cgroups):
            if path in explained:
                continue
            unit = cgroup_unit(newest, path)
            culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
            if ex.culprit(culprit):
                continue
            cg = newest.cgroups.get(path)
            mine = [r for r in records if cg is not None and r.cgroup_id == cg.id]
            findings.append(
                self._finding(f"cgroup:{path}", unit or path, culprit, by_cgroup[path], mine, cfg)
            )
        return findings

    def _finding(
        self,
        key: str,
        who: str,
        culprit: Culprit,
        count: int,
        mine: Sequence[ExitRecord],
        cfg: ShortLivedJobs,
    ) -> Finding:
        statuses = collections.Counter(_status(r) for r in mine).most_common()
        comms = collections.Counter(r.comm for r in mine).most_common()
        lifetimes = [r.lifetime_s for r in mine if r.lifetime_s is not None]
        common = f"; mostly {comms[0][0]}, {statuses[0][0]}" if comms else ""
        return Finding(
            rule=self.rule,
            key=key,
            severity=severity(cfg),
            summary=(
                f"short-lived jobs: {count} processes lived under {float(cfg.max_lifetime_s):g} s "
                f"in the last {float(cfg.window_s):g} s, {who}{common}"
            ),
            culprit=culprit,
            evidence={
                "count": count,
                "window_s": float(cfg.window_s),
                "max_lifetime_s": float(cfg.max_lifetime_s),
                "longest_lifetime_s": round(max(lifetimes), 3) if lifetimes else None,
                "exit_statuses": [{"status": s, "count": n} for s, n in statuses],
                "comms": [{"comm": c, "count": n} for c, n in comms],
                "records": len(mine),
                "cgroup": culprit.cgroup,
                "unit": culprit.unit,
            },
        )
