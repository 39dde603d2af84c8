"""The scheduler collector: loads bpf/sched.c and turns its monotonic maps into StallSnapshots."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..health import Health
from ..model import CgroupRunqueue, StallEdge, StallSnapshot
from ..paths import bpf_dir
from .bpfload import KernelFeatureError, compile_program, preflight, source_text, tracefs_root
from .keyed import PerCpuSlots
from .taskcpu import TaskCpuReader

TRACEPOINTS = ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_wakeup_new")
NSLOTS = 32  # log2 histogram slots, as in bpf/sched.c

# Index of each counter in the per-CPU `cpus` value's stats (enum stat in bpf/sched.c).
STAT_TASK_INSERTS, STAT_NO_ENQUEUE, STAT_MIGRATED, STAT_UNATTRIBUTED_NS = 0, 1, 2, 3
STAT_LOST_WAITS, STAT_LOST_NS, STAT_OVERFLOWS, STAT_RECOVERED = 4, 5, 6, 7
STAT_TASK_COLLISIONS, STAT_RAN_OVERFLOWS, STAT_UNTIMED_RUNS = 8, 9, 10
NSTATS = 11
CONFIG_ATTRIBUTING = 1  # config[1]: attribution on since this CLOCK_MONOTONIC ns (0 = off)

# Ids unresolvable for this many reads in a row with no new activity are dropped from the maps.
FORGET_AFTER_READS = 2

_FLAG = re.compile(r"\{\s*(0x[0-9a-fA-F]+|\d+)\s*,\s*\"([A-Za-z])\"\s*\}")


def switch_state_flags(format_path: str | None = None) -> dict[str, int]:
    """prev_state letters -> bits as this kernel reports them, plus "+" (preempted: one bit above)."""
    if format_path is None:
        format_path = f"{tracefs_root() or '/sys/kernel/tracing'}/events/sched/sched_switch/format"
    try:
        text = Path(format_path).read_text()
    except OSError as exc:
        raise KernelFeatureError(
            f"cannot read {format_path}: {exc.strerror} (is tracefs mounted?)"
        ) from None
    flags = {letter: int(v, 0) for v, letter in _FLAG.findall(text.partition("print fmt:")[2])}
    if "prev_state" not in text or "X" not in flags or "Z" not in flags:
        raise KernelFeatureError(f"{format_path} has no prev_state flags (X, Z) to decode")
    flags["+"] = max(flags.values()) << 1
    return flags


@dataclass
class _IdState:
    path: str | None  # path at the previous read (None = unresolved then)
    unresolved_reads: int = 0


@dataclass
class _Deltas:
    runq: dict[int, tuple[int, int, list[int]]] = field(default_factory=dict)
    edges: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


class SchedCollector:
    """Run-queue wait, preemptions and who-stalls-whom per cgroup, as per-interval deltas."""

    def __init__(
        self,
        task_entries: int = 65536,
        agg_entries: int = 8192,
        ran_entries: int = 65536,
        src: Path | None = None,
    ) -> None:
        if task_entries <= 0 or task_entries & (task_entries - 1):
            raise ValueError(
                f"task_entries must be a power of two (the task slot is pid modulo it), not {task_entries}"
            )
        self.task_entries = task_entries
        self.agg_entries = agg_entries
        self.ran_entries = ran_entries
        self.src = src or bpf_dir() / "sched.c"
        self._bpf: Any = None
        self._cpu: TaskCpuReader | None = None
        self._stats: PerCpuSlots | None = None  # the `cpus` slot the kernel counters are in
        self._prev_runq: dict[int, tuple[int, int, list[int]]] = {}
        self._prev_edges: dict[tuple[int, int], tuple[int, int]] = {}
        self._edge_keys: set[tuple[int, int]] = (
            set()
        )  # keys in the kernel's edges map at the last read
        self._prev_unattributed_ns = 0
        self._ids: dict[int, _IdState] = {}
        self.forgotten_ids = 0  # ids dropped from the kernel maps after their cgroup vanished
        self.unresolved_stall_seconds = 0.0  # stall whose cgroup ids had no path, since attach
        self.unattributed_wait_seconds = 0.0  # wait no culprit could be named for, since attach
        self.unresolved_preemptions = 0
        self.attributing = False  # the kernel attributes stalls now (config[1] != 0)
        self.attribution_switches = 0  # times it was switched on or off after start
        self._attributed = True  # attribution ran at some point since the previous read

    def cflags(self) -> list[str]:
        flags = switch_state_flags()
        return [
            f"-DTASK_ENTRIES={self.task_entries}",
            f"-DAGG_ENTRIES={self.agg_entries}",
            f"-DRAN_ENTRIES={self.ran_entries}",
            f"-DTASK_REPORT_MAX={flags['+']:#x}",
            f"-DTASK_STATE_X={flags['X']:#x}",
            f"-DTASK_STATE_Z={flags['Z']:#x}",
        ]

    def dump_source(self) -> str:
        """The C source exactly as start() would compile it, -D values first."""
        return source_text(Path(self.src), self.cflags())

    def start(self) -> None:
        """Compile and attach bpf/sched.c; KernelFeatureError names anything missing."""
        preflight(TRACEPOINTS)
        self._bpf = compile_program(Path(self.src), self.cflags())
        self._cpu = None
        self._stats = PerCpuSlots(self._bpf[b"cpus"])
        self._write_attribution(time.monotonic_ns())  # on until the daemon decides otherwise
        self.attributing = True

    def set_attribution(self, on: bool) -> None:
        """Switch the kernel's stall attribution on or off (CPU time per thread is always kept).

        Switched on, waits that began before now are counted (no_enqueue), not measured.
        """
        if self._bpf is None:
            raise RuntimeError("SchedCollector.set_attribution() before start()")
        if on == self.attributing:
            return
        self._write_attribution(time.monotonic_ns() if on else 0)
        self.attributing = on
        self._attributed = True
        self.attribution_switches += 1

    def _write_attribution(self, since_ns: int) -> None:
        table = self._bpf[b"config"]
        table[table.Key(CONFIG_ATTRIBUTING)] = table.Leaf(since_ns)

    def task_cpu(self) -> TaskCpuReader:
        """The reader of per-process CPU time kept by the same program (one per start())."""
        if self._bpf is None:
            raise RuntimeError("SchedCollector.task_cpu() before start()")
        if self._cpu is None:
            self._cpu = TaskCpuReader(self._bpf, self.task_entries)
        return self._cpu

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
            self._cpu = None
            self._stats = None

    def stats(self) -> list[int]:
        """Monotonic kernel counters (see the STAT_* indexes), summed over CPUs."""
        assert self._stats is not None, "SchedCollector.stats() before start()"
        per_cpu = self._stats.read(0)
        return [sum(int(c.stats[i]) for c in per_cpu) for i in range(NSTATS)]

    def health(self) -> Health:
        """Monotonic counters of the program since attach, and what user space could not attribute."""
        stats = self.stats()
        return Health(
            counters={
                "task_collisions": stats[STAT_TASK_COLLISIONS],
                "ran_overflows": stats[STAT_RAN_OVERFLOWS],
                "untimed_runs": stats[STAT_UNTIMED_RUNS],
                "no_enqueue": stats[STAT_NO_ENQUEUE],
                "migrated_waits": stats[STAT_MIGRATED],
                "lost_waits": stats[STAT_LOST_WAITS],
                "recovered_waits": stats[STAT_RECOVERED],
                "aggregation_overflows": stats[STAT_OVERFLOWS],
                "forgotten_ids": self.forgotten_ids,
                "unresolved_stall_seconds": self.unresolved_stall_seconds,
                "unattributed_wait_seconds": self.unattributed_wait_seconds,
                "unresolved_preemptions": self.unresolved_preemptions,
                "attribution_switches": self.attribution_switches,
            },
            gauges={"tracked_cgroup_ids": len(self._ids), "attributing": int(self.attributing)},
        )

    def read(self, resolve: Callable[[int], str | None]) -> StallSnapshot:
        """Deltas since the previous read, cgroup ids resolved to paths with `resolve`.

        While attribution is off and was off since the previous read the maps cannot have
        moved: they are not walked.
        """
        if not self._attributed:
            cache0: dict[int, str | None] = {}
            return self.attribute(_Deltas(), resolve, self.stats(), cache0)
        self._attributed = self.attributing
        runq_now: dict[int, tuple[int, int, list[int]]] = {}
        self_stall: dict[int, int] = {}  # the (cg, cg) edge, kept in the kernel's runq value
        prev_runq = self._prev_runq
        for k, per_cpu in self._bpf[b"runq"].items():
            cid = int(k.value)
            waits = sum(int(c.waits) for c in per_cpu)
            old = prev_runq.get(cid)
            if old is not None and old[1] == waits:
                runq_now[cid] = old  # no wait ended here since: the 32-slot sums are skipped
            else:
                runq_now[cid] = (
                    sum(int(c.wait_ns) for c in per_cpu),
                    waits,
                    [sum(int(c.hist[i]) for c in per_cpu) for i in range(NSLOTS)],
                )
            self_stall[cid] = sum(int(c.self_ns) for c in per_cpu)
        edges_now: dict[tuple[int, int], tuple[int, int]] = {}
        for k, per_cpu in self._bpf[b"edges"].items():
            edges_now[(int(k.victim), int(k.culprit))] = (
                sum(int(c.stall_ns) for c in per_cpu),
                sum(int(c.preemptions) for c in per_cpu),
            )
        self._edge_keys = set(edges_now)
        for cid, ns in self_stall.items():
            if ns:
                stall, pre = edges_now.get((cid, cid), (0, 0))
                edges_now[(cid, cid)] = (stall + ns, pre)
        stats = self.stats()
        deltas = self._deltas(runq_now, edges_now)
        cache: dict[int, str | None] = {}
        snapshot = self.attribute(deltas, resolve, stats, cache)
        self._forget_vanished(deltas, resolve, cache)
        return snapshot

    def _deltas(
        self,
        runq_now: dict[int, tuple[int, int, list[int]]],
        edges_now: dict[tuple[int, int], tuple[int, int]],
    ) -> _Deltas:
        out = _Deltas()
        for cid, (wait, waits, hist) in runq_now.items():
            pw, pn, ph = self._prev_runq.get(cid, (0, 0, [0] * NSLOTS))
            if waits != pn:
                out.runq[cid] = (
                    wait - pw,
                    waits - pn,
                    [a - b for a, b in zip(hist, ph, strict=True)],
                )
        for key, (stall, pre) in edges_now.items():
            ps, pp = self._prev_edges.get(key, (0, 0))
            if stall != ps or pre != pp:
                out.edges[key] = (stall - ps, pre - pp)
        self._prev_runq = runq_now
        self._prev_edges = edges_now
        return out

    def _path(
        self, cid: int, resolve: Callable[[int], str | None], cache: dict[int, str | None]
    ) -> str | None:
        """Path for this window, or None when unresolvable or ambiguous (id reused mid-window)."""
        if cid in cache:
            return cache[cid]
        now = resolve(cid)
        state = self._ids.get(cid)
        path = now
        if state is not None and state.path is not None and now is not None and state.path != now:
            path = None  # same id, another cgroup: part of this window may belong to the old one
        if state is None:
            self._ids[cid] = state = _IdState(now)
        state.path = now
        state.unresolved_reads = state.unresolved_reads + 1 if now is None else 0
        cache[cid] = path
        return path

    def attribute(
        self,
        deltas: _Deltas,
        resolve: Callable[[int], str | None],
        stats: list[int],
        cache: dict[int, str | None],
    ) -> StallSnapshot:
        """Turn id-keyed deltas into a path-keyed StallSnapshot; unresolved stall is counted."""
        unresolved_ns = 0
        unresolved_preemptions = 0
        runq: dict[str, tuple[int, int, list[int]]] = {}
        for cid, (wait, waits, hist) in deltas.runq.items():
            path = self._path(cid, resolve, cache)
            if path is None:
                unresolved_ns += wait
                continue
            w0, n0, h0 = runq.get(path, (0, 0, [0] * NSLOTS))
            runq[path] = (w0 + wait, n0 + waits, [a + b for a, b in zip(h0, hist, strict=True)])
        edges: dict[tuple[str, str], tuple[int, int]] = {}
        for (vid, cid), (stall, pre) in deltas.edges.items():
            victim = self._path(vid, resolve, cache)
            culprit = self._path(cid, resolve, cache)
            if victim is None or culprit is None:
                # an unresolved victim's whole wait is already counted from its run queue
                unresolved_ns += stall if victim is not None else 0
                unresolved_preemptions += pre
                continue
            s0, p0 = edges.get((victim, culprit), (0, 0))
            edges[(victim, culprit)] = (s0 + stall, p0 + pre)
        unattributed_ns = stats[STAT_UNATTRIBUTED_NS] - self._prev_unattributed_ns
        self._prev_unattributed_ns = stats[STAT_UNATTRIBUTED_NS]
        self.unresolved_stall_seconds += unresolved_ns / 1e9
        self.unattributed_wait_seconds += unattributed_ns / 1e9
        self.unresolved_preemptions += unresolved_preemptions
        return StallSnapshot(
            runqueue={
                p: CgroupRunqueue(p, wait_us=w // 1000, waits=n, hist_log2_us=tuple(h))
                for p, (w, n, h) in runq.items()
            },
            edges=tuple(
                StallEdge(victim=v, culprit=c, stall_us=s // 1000, preemptions=n)
                for (v, c), (s, n) in sorted(edges.items(), key=lambda kv: -kv[1][0])
            ),
            unresolved_us=unresolved_ns // 1000,
            unattributed_us=unattributed_ns // 1000,
            unresolved_preemptions=unresolved_preemptions,
            no_enqueue=stats[STAT_NO_ENQUEUE],
            migrated_waits=stats[STAT_MIGRATED],
            lost_waits=stats[STAT_LOST_WAITS],
            recovered_waits=stats[STAT_RECOVERED],
            aggregation_overflows=stats[STAT_OVERFLOWS],
        )

    def _forget_vanished(
        self,
        deltas: _Deltas,
        resolve: Callable[[int], str | None],
        cache: dict[int, str | None],
    ) -> None:
        """Drop map keys of cgroups gone for a while; they had no activity, so nothing is lost."""
        for cid in list(self._ids):
            self._path(cid, resolve, cache)  # ids idle this window: is their cgroup still there?
        active = set(deltas.runq) | {i for key in deltas.edges for i in key}
        gone = {
            cid
            for cid, st in self._ids.items()
            if st.unresolved_reads >= FORGET_AFTER_READS and cid not in active
        }
        if not gone:
            return
        runq, edges = self._bpf[b"runq"], self._bpf[b"edges"]
        for cid in gone:
            if cid in self._prev_runq:
                del runq[runq.Key(cid)]
                del self._prev_runq[cid]
            del self._ids[cid]
        for key in [k for k in self._prev_edges if k[0] in gone or k[1] in gone]:
            if key in self._edge_keys:  # a self edge (cg, cg) may live in runq only
                del edges[edges.Key(*key)]
            del self._prev_edges[key]
        self.forgotten_ids += len(gone)
