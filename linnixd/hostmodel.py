"""The host model: process table and cgroups kept current between ticks, one Snapshot per tick.

Collection (I/O: /proc, cgroup files, PSI) is apart from the pure build step (assemble()).
With a kernel CPU source (bpf/sched.c's task table) the per-tick cost follows what happened:
only the processes that ran are re-read, only the cgroups with activity are re-sampled, and
samples that did not change are the same objects from one snapshot to the next. Without one,
every process is read every tick (the --no-sched fallback).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .collector.cgroups import UNRESOLVED, CgroupResolver
from .collector.procfs import SAMPLE_S, ProcEntry, ProcScanner, SystemStat
from .collector.psi import PsiReader, parse_pressure
from .collector.taskcpu import TaskCpuReader
from .constants import PRESSURE_GATE_PCT
from .health import Health, Reporter
from .model import (
    RESOURCES,
    CgroupSample,
    LifecycleCounts,
    LifecycleTick,
    NetCounts,
    NetTick,
    ProcessSample,
    PsiSample,
    RemoteSample,
    Snapshot,
    StallSnapshot,
)

RECONCILE_S = 30.0  # the background /proc walk, with a kernel CPU source
CGROUP_RESAMPLE_S = 10.0  # a quiet cgroup is still re-sampled this often (a few per tick)
CGROUP_RESAMPLE_BUDGET = 16  # quiet cgroups re-sampled per tick at most


@dataclass(frozen=True)
class Collected:
    """What one tick read from the host, before the snapshot is put together."""

    ts: float
    wall: float
    interval_s: float
    system: SystemStat
    system_pressure: Mapping[str, PsiSample]
    processes: Mapping[int, ProcessSample]
    changed: frozenset[int]
    cgroups: Mapping[str, CgroupSample]
    by_cgroup: Mapping[str, LifecycleCounts]
    tick: LifecycleTick | None
    stall: StallSnapshot | None
    net: NetTick | None = None
    net_by_cgroup: Mapping[str, NetCounts] | None = None  # net.by_cgroup_id with paths
    net_remotes: tuple[RemoteSample, ...] = ()


def assemble(c: Collected) -> Snapshot:
    """The pure build step: one Snapshot from what a tick collected."""
    tick = c.tick
    net = c.net
    return Snapshot(
        ts=c.ts,
        wall=c.wall,
        interval_s=c.interval_s,
        ncpu=c.system.ncpu,
        processes=c.processes,
        total=tick.total if tick is not None else LifecycleCounts(),
        by_parent=dict(tick.by_parent) if tick is not None else {},
        by_cgroup=dict(c.by_cgroup),
        cgroups=c.cgroups,
        system_pressure=c.system_pressure,
        cpu_util_pct=c.system.cpu_util_pct,
        file_nr=c.system.file_nr,
        file_max=c.system.file_max,
        mem_available_bytes=c.system.mem_available_bytes,
        exits=tuple(tick.exits) if tick is not None else (),
        stall=c.stall,
        changed=c.changed,
        net_total=net.total if net is not None else None,
        net_by_pid=dict(net.by_tgid) if net is not None else {},
        net_by_cgroup=dict(c.net_by_cgroup or {}),
        net_remotes=c.net_remotes,
        net_ports=tuple(net.ports) if net is not None else (),
        net_segments=dict(net.segments) if net is not None else {},
    )


def quiet(sample: CgroupSample) -> CgroupSample:
    """A cgroup not re-read this tick: same levels, no stall, CPU or throttling in the interval."""
    pressure = {
        res: replace(ps, some_stall_us=0, full_stall_us=0) for res, ps in sample.pressure.items()
    }
    return replace(
        sample,
        pressure=pressure,
        cpu_usage_us=0 if sample.cpu_usage_us is not None else None,
        nr_throttled=0 if sample.nr_throttled is not None else None,
        throttled_us=0 if sample.throttled_us is not None else None,
    )


def _tree_index(paths: frozenset[str]) -> dict[str, list[str]]:
    """Parent -> children over the given cgroup paths and their ancestors (root "/")."""
    index: dict[str, list[str]] = defaultdict(list)
    linked: set[str] = set()
    for path in paths:
        node = path
        while node != "/" and node not in linked:
            linked.add(node)
            parent = node.rsplit("/", 1)[0] or "/"
            index[parent].append(node)
            node = parent
    return dict(index)


def _interest(p: ProcessSample) -> tuple[float, int, float]:
    """Sort key: busier, bigger, older processes are kept first when over the cap."""
    return (p.cpu_pct, p.rss_bytes, -p.start_time)


class HostModel:
    """Keeps the process table and cgroups; builds bounded Snapshots for the detectors."""

    def __init__(
        self,
        max_processes: int,
        max_cgroups: int,
        resolver: CgroupResolver | None = None,
        scanner: ProcScanner | None = None,
        psi: PsiReader | None = None,
        cpu: TaskCpuReader | None = None,
        reconcile_s: float = RECONCILE_S,
        pressure_gate_pct: float = PRESSURE_GATE_PCT,
    ) -> None:
        self.max_processes = max_processes
        self.max_cgroups = max_cgroups
        self.resolver = resolver if resolver is not None else CgroupResolver(max_cgroups)
        self.scanner = (
            scanner
            if scanner is not None
            else ProcScanner(sample_s=SAMPLE_S if cpu is not None else 0.0)
        )
        self.psi = psi if psi is not None else PsiReader()
        self.cpu = cpu
        self.reconcile_s = reconcile_s
        self.pressure_gate_pct = pressure_gate_pct
        self.last: Snapshot | None = None
        self._samples: dict[int, ProcessSample] = {}  # every tracked process, as last built
        self._cgroup_of: dict[int, tuple[str, str | None]] = {}  # pid -> (cgroup, v1 memory path)
        self._members: Counter[str] = Counter()  # cgroup -> tracked processes in it
        self._v1_members: dict[str, Counter[str | None]] = defaultdict(Counter)
        self._cg_samples: dict[str, CgroupSample] = {}
        self._cg_sampled_at: dict[str, float] = {}
        self._cg_hot: set[str] = set()  # cgroups re-read at the previous tick
        self._pending: set[int] = set()  # pids changed by apply() since the last snapshot
        self._evicted_procs: set[tuple[int, float]] = set()  # (pid, start) left out by the cap
        self._evicted_cgroups: set[str] = set()  # paths left out by the cap
        self.evicted_processes = 0
        self.evicted_cgroups = 0
        self._last_ts: float | None = None
        self._last_reconcile = 0.0
        self._tree_keys: frozenset[str] = frozenset()
        self._tree: dict[str, list[str]] = {}  # cgroup -> child nodes toward tracked cgroups
        self.descent_reads = 0  # cgroup pressure files read by the descent (monotonic)
        self.descent_pruned = 0  # subtrees left out because their top was calm (monotonic)

    @property
    def incremental(self) -> bool:
        """True when per-process CPU comes from the kernel and only what ran is read."""
        return self.cpu is not None

    def use_cpu(self, cpu: TaskCpuReader | None) -> None:
        """Switch the per-process CPU source (bpf/sched.c attached or detached by a reload).

        Both sources start from a fresh baseline: the kernel reader's first read covers the
        time since attach, and one full /proc scan resets every process's CPU counter, so the
        next tick's figures cover one interval. Every sample is rebuilt at the next snapshot.
        """
        self.cpu = cpu
        self.scanner.sample_s = SAMPLE_S if cpu is not None else 0.0
        if cpu is not None:
            cpu.read()
        self.scanner.scan()
        self._pending |= set(self._samples) | set(self.scanner.procs)

    def seed(self) -> None:
        """Read /proc and the cgroup tree once, so the first snapshot has CPU deltas."""
        self.resolver.refresh()
        if self.cpu is not None:
            self.cpu.read()  # everything since attach: a baseline, not an interval
        self.scanner.scan()
        self._pending = set(self.scanner.procs)
        self.psi.system()
        self._refresh_membership(self._pending)
        self._sample_cgroups(set(self._members), set(), 0.0)
        self._last_reconcile = self.scanner.now()

    def apply(self, tick: LifecycleTick) -> None:
        """Bring the process table up to date with the kernel's exec/exit records of a tick."""
        procs = self.scanner.procs
        for ex in tick.execs:
            entry = procs.get(ex.pid)
            if entry is not None:
                entry.comm = ex.comm
                self.scanner.invalidate(ex.pid)
                self._pending.add(ex.pid)
        for rec in tick.exits:
            entry = procs.get(rec.pid)
            if entry is not None:
                self.scanner.forget(rec.pid)
                self._pending.add(rec.pid)

    # ---- collection (I/O) ---------------------------------------------------------------

    def _collect_processes(self) -> tuple[set[int], SystemStat, float]:
        """Read what changed (or everything, without a kernel CPU source): changed pids, host figures."""
        changed = set(self._pending)
        self._pending = set()
        if self.cpu is None:
            scan = self.scanner.scan()
            changed |= set(scan.processes) | (set(self._samples) - set(scan.processes))
            return changed, scan.system, scan.interval_s
        tick = self.cpu.read()
        # the kernel says who ran; their CPU time is the kernel's own count in /proc/PID/stat
        changed |= self.scanner.update(tick.ns_by_tgid, tick.exited)
        changed |= self.scanner.refresh_stale()
        now = self.scanner.now()
        walking = self.scanner.walking
        if walking or now - self._last_reconcile >= self.reconcile_s:
            if not walking:
                self._last_reconcile = now
            step, done = self.scanner.reconcile_step()  # a chunk of /proc per tick
            changed |= step
            if done:
                self.cpu.forget_groups(set(self.scanner.procs))
        return changed, self.scanner.system(), tick.interval_s

    def snapshot(
        self,
        tick: LifecycleTick | None,
        ts: float,
        wall: float,
        stall: StallSnapshot | None = None,
        net: NetTick | None = None,
    ) -> Snapshot:
        """Read what changed, resolve the tick's cgroup ids, and build a Snapshot."""
        changed, system, scan_interval = self._collect_processes()
        procs = self.scanner.procs
        self._refresh_membership(changed)
        for pid in changed:
            e = procs.get(pid)
            if e is None:
                self._samples.pop(pid, None)
            else:
                self._samples[pid] = self._sample(e)
        processes = self._capped(self._samples)

        by_cgroup: dict[str, LifecycleCounts] = defaultdict(LifecycleCounts)
        if tick is not None:
            for cid, counts in tick.by_cgroup_id.items():
                path = self.resolver.resolve(cid)
                by_cgroup[path if path is not None else UNRESOLVED] += counts
        net_by_cgroup: dict[str, NetCounts] = defaultdict(NetCounts)
        remotes: list[RemoteSample] = []
        if net is not None:
            for cid, nc in net.by_cgroup_id.items():
                path = self.resolver.resolve(cid)
                net_by_cgroup[path if path is not None else UNRESOLVED] += nc
            for tgid, cid, remote, connects, retrans in net.remotes:
                path = self.resolver.resolve(cid)
                remotes.append(
                    RemoteSample(
                        tgid, path if path is not None else UNRESOLVED, remote, connects, retrans
                    )
                )

        system_pressure = self.psi.system()
        if self.cpu is None:
            active = set(self._members)
        else:
            active = {procs[pid].cgroup for pid in changed if pid in procs}
            active |= set(by_cgroup) | set(net_by_cgroup)
            if stall is not None:
                active |= set(stall.runqueue)
            if any(ps.some_pct >= self.pressure_gate_pct for ps in system_pressure.values()):
                active |= self._pressured(set(self._members))
        cgroups = self._sample_cgroups(active, set(by_cgroup) | set(net_by_cgroup), ts)

        interval = scan_interval if self._last_ts is None else ts - self._last_ts
        self._last_ts = ts
        snap = assemble(
            Collected(
                ts=ts,
                wall=wall,
                interval_s=interval,
                system=system,
                system_pressure=system_pressure,
                processes=processes,
                changed=frozenset(changed & processes.keys()),
                cgroups=cgroups,
                by_cgroup=by_cgroup,
                tick=tick,
                stall=stall,
                net=net,
                net_by_cgroup=net_by_cgroup,
                net_remotes=tuple(remotes),
            )
        )
        self.last = snap
        return snap

    def _pressured(self, tracked: set[str]) -> set[str]:
        """The tracked cgroups whose subtree is under pressure, found from the top down.

        A cgroup's "some" stall covers every task below it, so its avg10 is at least that of
        any cgroup it contains: a calm cgroup rules out its whole subtree and is not descended.
        The cost follows the pressured branches, not the number of cgroups.
        """
        keys = frozenset(tracked)
        if keys != self._tree_keys:
            self._tree_keys = keys
            self._tree = _tree_index(keys)
        out: set[str] = set()
        if "/" in keys:
            out.add("/")  # the root's pressure is the system's, already over the gate
        frontier = list(self._tree.get("/", ()))
        while frontier:
            node = frontier.pop()
            if self._node_some_pct(node) < self.pressure_gate_pct:
                self.descent_pruned += 1
                continue
            if node in keys:
                out.add(node)
            frontier.extend(self._tree.get(node, ()))
        return out

    def _node_some_pct(self, path: str) -> float:
        """The highest "some" avg10 of a cgroup's pressure files (0 when it has none)."""
        directory = self.resolver.directory(path)
        worst = 0.0
        for res in self.psi.resources:
            self.descent_reads += 1
            try:
                with open(f"{directory}/{res}.pressure", "rb") as f:
                    worst = max(worst, parse_pressure(f.read().decode())[0])
            except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
                continue
        return worst

    def _sample(self, e: ProcEntry) -> ProcessSample:
        return ProcessSample(
            pid=e.pid,
            ppid=e.ppid,
            comm=e.comm,
            cmdline=e.cmdline or "",
            start_time=e.start_time,
            uid=e.uid,
            cgroup=e.cgroup,
            unit=self.resolver.owner(e.cgroup).unit,
            cpu_pct=e.cpu_pct,
            rss_bytes=e.rss_bytes,
            threads=e.threads,
            fd_count=e.fd_count,
            fd_soft_limit=e.fd_soft_limit,
        )

    def _capped(self, samples: dict[int, ProcessSample]) -> dict[int, ProcessSample]:
        """A copy of the samples, the least interesting left out (and counted) past max_processes."""
        if len(samples) <= self.max_processes:
            self._evicted_procs.clear()
            return dict(samples)
        entries = sorted(samples.values(), key=_interest, reverse=True)
        kept = {p.pid: p for p in entries[: self.max_processes]}
        dropped_keys = {(p.pid, p.start_time) for p in entries[self.max_processes :]}
        self.evicted_processes += len(dropped_keys - self._evicted_procs)
        # each process is counted once while it lives, even if it drifts across the cut
        self._evicted_procs = (self._evicted_procs | dropped_keys) & {
            (p.pid, p.start_time) for p in samples.values()
        }
        return kept

    def _refresh_membership(self, pids: set[int]) -> None:
        """Keep the per-cgroup member counts current for the pids that changed."""
        procs = self.scanner.procs
        for pid in pids:
            old = self._cgroup_of.get(pid)
            e = procs.get(pid)
            new = (e.cgroup, e.v1_memory) if e is not None else None
            if old == new:
                continue
            if old is not None:
                self._members[old[0]] -= 1
                self._v1_members[old[0]][old[1]] -= 1
                if self._members[old[0]] <= 0:
                    del self._members[old[0]]
                    self._v1_members.pop(old[0], None)
                elif self._v1_members[old[0]][old[1]] <= 0:
                    del self._v1_members[old[0]][old[1]]
            if new is None:
                self._cgroup_of.pop(pid, None)
            else:
                self._cgroup_of[pid] = new
                self._members[new[0]] += 1
                self._v1_members[new[0]][new[1]] += 1

    def _sample_cgroups(
        self, active: set[str], counted: set[str], now: float
    ) -> dict[str, CgroupSample]:
        """Samples of the cgroups worth one (a process or kernel counts); only `active` ones re-read."""
        members = self._members
        wanted = {p: members.get(p, 0) for p in set(members) | counted}
        wanted.pop(UNRESOLVED, None)
        if len(wanted) > self.max_cgroups:
            paths = sorted(wanted, key=lambda p: (-wanted[p], p))
            over = set(paths[self.max_cgroups :])
            self.evicted_cgroups += len(over - self._evicted_cgroups)
            self._evicted_cgroups |= over
            keep = set(paths[: self.max_cgroups])
        else:
            keep = set(wanted)
        self._evicted_cgroups &= set(wanted)
        for gone in [p for p in self._cg_samples if p not in keep]:
            del self._cg_samples[gone]
            self._cg_sampled_at.pop(gone, None)
        quiet_due = sorted(
            (t, p)
            for p in keep
            if p not in active
            and now - (t := self._cg_sampled_at.get(p, -1e18)) >= CGROUP_RESAMPLE_S
        )
        reread = (
            (active & keep)
            | {p for _, p in quiet_due[:CGROUP_RESAMPLE_BUDGET]}
            | (keep - set(self._cg_samples))
        )
        for path in reread:
            pressure = self.psi.cgroup(path, self.resolver.directory(path))
            v1 = self._v1_members.get(path)
            # a v1 memory group stands for this cgroup only when all its processes share it
            v1_memory = next(iter(v1)) if v1 is not None and len(v1) == 1 else None
            sample = self.resolver.sample(path, pressure, v1_memory)
            if sample is None:
                self._cg_samples.pop(path, None)
                continue
            self._cg_samples[path] = sample
            self._cg_sampled_at[path] = now
        for path in self._cg_hot - reread:
            sample = self._cg_samples.get(path)
            if sample is not None:
                self._cg_samples[path] = quiet(sample)
        self._cg_hot = reread
        self.psi.forget(self._cg_samples)
        return dict(self._cg_samples)

    # ---- helpers for the daemon and the bus -----------------------------------------------

    def _children_map(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = defaultdict(list)
        for pid, e in self.scanner.procs.items():
            children[e.ppid].append(pid)
        return children

    def children(self, pid: int) -> list[int]:
        return sorted(self._children_map().get(pid, ()))

    def descendants(self, pid: int) -> list[int]:
        """Every process below `pid` in the tree (breadth first), without `pid` itself."""
        tree = self._children_map()
        out: list[int] = []
        seen = {pid}
        queue = [pid]
        while queue:
            for child in tree.get(queue.pop(0), ()):
                if child not in seen:  # pid reuse can briefly form a loop
                    seen.add(child)
                    out.append(child)
                    queue.append(child)
        return out

    def health(self) -> Health:
        """What the model's own caps left out (the scanner, resolver and task table report apart)."""
        return Health(
            counters={
                "evicted_processes": self.evicted_processes,
                "evicted_cgroups": self.evicted_cgroups,
                "descent_reads": self.descent_reads,
                "descent_pruned": self.descent_pruned,
            },
            gauges={
                "processes": len(self.scanner.procs),
                "cgroups": len(self._cg_samples),
                "kernel_driven": int(self.cpu is not None),
            },
        )

    def parts(self) -> dict[str, Reporter | None]:
        """The collectors the model reads, by the name their health is reported under."""
        return {"process_table": self.scanner, "cgroups": self.resolver, "task_cpu": self.cpu}

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

    def start_time_of(self, pid: int) -> float | None:
        """The start time (s since boot) the newest snapshot saw for pid: what a kill must match."""
        proc = self.last.processes.get(pid) if self.last is not None else None
        return proc.start_time if proc is not None else None

    def resolve_cgroup(self, cgroup_id: int) -> str | None:
        return self.resolver.resolve(cgroup_id)
