"""The host model: process tree and cgroups kept current between ticks, one Snapshot per tick."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from .collector.cgroups import UNRESOLVED, CgroupResolver
from .collector.procfs import ProcEntry, ProcScanner
from .collector.psi import PsiReader
from .model import (
    RESOURCES,
    CgroupSample,
    LifecycleCounts,
    LifecycleTick,
    ProcessSample,
    Snapshot,
    StallSnapshot,
)


def _interest(e: ProcEntry) -> tuple[float, int, int]:
    """Sort key: busier, bigger, older-seen processes are kept first when over the cap."""
    return (e.cpu_pct, e.rss_pages, -int(e.first_seen * 1000))


class HostModel:
    """Keeps the process tree and cgroups; builds bounded Snapshots for the detectors."""

    def __init__(
        self,
        max_processes: int,
        max_cgroups: int,
        resolver: Optional[CgroupResolver] = None,
        scanner: Optional[ProcScanner] = None,
        psi: Optional[PsiReader] = None,
    ) -> None:
        self.max_processes = max_processes
        self.max_cgroups = max_cgroups
        self.resolver = resolver if resolver is not None else CgroupResolver(max_cgroups)
        self.scanner = scanner if scanner is not None else ProcScanner()
        self.psi = psi if psi is not None else PsiReader()
        self.last: Optional[Snapshot] = None
        self._children: dict[int, list[int]] = {}
        self._evicted_procs: set[tuple[int, int]] = set()  # (pid, start) left out by the cap
        self._evicted_cgroups: set[str] = set()  # paths left out by the cap
        self.evicted_processes = 0
        self.evicted_cgroups = 0
        self._last_ts: Optional[float] = None

    def seed(self) -> None:
        """Read /proc and the cgroup tree once, so the first snapshot has CPU deltas."""
        self.resolver.refresh()
        scan = self.scanner.scan()
        self._rebuild_tree()
        self.psi.system()
        self._sample_cgroups(list(scan.processes.values()), {})

    def apply(self, tick: LifecycleTick) -> None:
        """Bring the process tree up to date with the kernel's exec/exit records of a tick."""
        procs = self.scanner.procs
        for ex in tick.execs:
            entry = procs.get(ex.pid)
            if entry is not None:
                entry.comm = ex.comm
                self.scanner.invalidate(ex.pid)
        for rec in tick.exits:
            entry = procs.get(rec.pid)
            if entry is not None:
                self.scanner.forget(rec.pid)
                siblings = self._children.get(entry.ppid)
                if siblings is not None and rec.pid in siblings:
                    siblings.remove(rec.pid)
                self._children.pop(rec.pid, None)

    def snapshot(
        self,
        tick: Optional[LifecycleTick],
        ts: float,
        wall: float,
        stall: Optional[StallSnapshot] = None,
    ) -> Snapshot:
        """Scan /proc and the cgroups, resolve the tick's cgroup ids, and build a Snapshot."""
        scan = self.scanner.scan()
        self._rebuild_tree()
        entries = list(scan.processes.values())
        if len(entries) > self.max_processes:
            entries.sort(key=_interest, reverse=True)
            dropped = entries[self.max_processes :]
            entries = entries[: self.max_processes]
            dropped_keys = {(e.pid, e.start_ticks) for e in dropped}
            self.evicted_processes += len(dropped_keys - self._evicted_procs)
            self._evicted_procs |= dropped_keys
        # each process is counted once while it lives, even if it drifts across the cut
        live = scan.processes
        self._evicted_procs = {
            k for k in self._evicted_procs if k[0] in live and live[k[0]].start_ticks == k[1]
        }

        by_cgroup: dict[str, LifecycleCounts] = defaultdict(LifecycleCounts)
        if tick is not None:
            for cid, counts in tick.by_cgroup_id.items():
                path = self.resolver.resolve(cid)
                by_cgroup[path if path is not None else UNRESOLVED] += counts

        cgroups = self._sample_cgroups(entries, by_cgroup)

        processes: dict[int, ProcessSample] = {}
        for e in entries:
            owner = self.resolver.owner(e.cgroup)
            processes[e.pid] = ProcessSample(
                pid=e.pid,
                ppid=e.ppid,
                comm=e.comm,
                cmdline=e.cmdline or "",
                start_time=e.start_time,
                uid=e.uid,
                cgroup=e.cgroup,
                unit=owner.unit,
                cpu_pct=e.cpu_pct,
                rss_bytes=e.rss_bytes,
                threads=e.threads,
                fd_count=e.fd_count,
                fd_soft_limit=e.fd_soft_limit,
            )

        interval = scan.interval_s if self._last_ts is None else ts - self._last_ts
        self._last_ts = ts
        system = scan.system
        snap = Snapshot(
            ts=ts,
            wall=wall,
            interval_s=interval,
            ncpu=system.ncpu,
            processes=processes,
            total=tick.total if tick is not None else LifecycleCounts(),
            by_parent=dict(tick.by_parent) if tick is not None else {},
            by_cgroup=dict(by_cgroup),
            cgroups=cgroups,
            system_pressure=self.psi.system(),
            cpu_util_pct=system.cpu_util_pct,
            file_nr=system.file_nr,
            file_max=system.file_max,
            exits=tuple(tick.exits) if tick is not None else (),
            stall=stall,
        )
        self.last = snap
        return snap

    def _sample_cgroups(
        self, entries: list[ProcEntry], by_cgroup: dict[str, LifecycleCounts]
    ) -> dict[str, CgroupSample]:
        """Samples of the cgroups worth one: those with a process or with lifecycle counts."""
        members: dict[str, int] = defaultdict(int)
        v1_paths: dict[str, set[Optional[str]]] = defaultdict(set)
        for e in entries:
            members[e.cgroup] += 1
            v1_paths[e.cgroup].add(e.v1_memory)
        wanted = {p: members.get(p, 0) for p in set(members) | set(by_cgroup)}
        wanted.pop(UNRESOLVED, None)
        paths = sorted(wanted, key=lambda p: (-wanted[p], p))
        if len(paths) > self.max_cgroups:
            over = set(paths[self.max_cgroups :])
            self.evicted_cgroups += len(over - self._evicted_cgroups)
            self._evicted_cgroups |= over
            paths = paths[: self.max_cgroups]
        self._evicted_cgroups &= set(wanted)
        cgroups: dict[str, CgroupSample] = {}
        for path in paths:
            pressure = self.psi.cgroup(path, self.resolver.directory(path))
            v1 = v1_paths.get(path, set())
            # a v1 memory group stands for this cgroup only when all its processes share it
            v1_memory = next(iter(v1)) if len(v1) == 1 else None
            sample = self.resolver.sample(path, pressure, v1_memory)
            if sample is not None:
                cgroups[path] = sample
        self.psi.forget(cgroups)
        return cgroups

    def _rebuild_tree(self) -> None:
        children: dict[int, list[int]] = defaultdict(list)
        for pid, e in self.scanner.procs.items():
            children[e.ppid].append(pid)
        self._children = dict(children)

    # ---- helpers for the daemon and the bus -----------------------------------------------

    def children(self, pid: int) -> list[int]:
        return sorted(self._children.get(pid, ()))

    def descendants(self, pid: int) -> list[int]:
        """Every process below `pid` in the tree (breadth first), without `pid` itself."""
        out: list[int] = []
        seen = {pid}
        queue = [pid]
        while queue:
            for child in self._children.get(queue.pop(0), ()):
                if child not in seen:  # pid reuse can briefly form a loop
                    seen.add(child)
                    out.append(child)
                    queue.append(child)
        return out

    def counters(self) -> dict[str, int]:
        return {
            "evicted_processes": self.evicted_processes,
            "evicted_cgroups": self.evicted_cgroups + self.resolver.evicted,
            "unresolved_cgroups": self.resolver.unresolved,
        }

    def top_cgroups(self, limit: int = 10) -> list[dict[str, Any]]:
        """Cgroups of the last snapshot, most pressured first (then by memory)."""
        if self.last is None:
            return []
        rows = []
        for path, cg in self.last.cgroups.items():
            row: dict[str, Any] = {"path": path, "unit": cg.owner.unit or cg.owner.name}
            for res in RESOURCES:
                ps = cg.pressure.get(res)
                row[f"{res}_some_pct"] = round(ps.some_pct, 2) if ps is not None else 0.0
            row["memory_bytes"] = cg.memory_bytes if cg.memory_bytes is not None else 0
            rows.append(row)
        rows.sort(
            key=lambda r: (max(r[f"{res}_some_pct"] for res in RESOURCES), r["memory_bytes"]),
            reverse=True,
        )
        return rows[:limit]

    def resolve_cgroup(self, cgroup_id: int) -> Optional[str]:
        return self.resolver.resolve(cgroup_id)
