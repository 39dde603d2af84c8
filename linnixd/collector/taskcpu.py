"""Which processes ran, from bpf/sched.c's task table: read only the threads that ran.

The host model uses it to know whom to read (the processes that ran, and the leaders that
exited), so its cost follows activity. The nanoseconds themselves are the sum of
[switch-in, switch-out] tracepoint segments: exact for a burst that exits between two reads
and for CPU-bound work (tests/test_taskcpu.py), but measured at half the kernel's own count
for a task that sleeps and wakes ~10,000 times a second (demos' _burn_share: 0.46 s against
0.94 s of rusage); until that is understood, CPU percentages come from /proc/PID/stat.
"""

from __future__ import annotations

import ctypes as ct
import time
from dataclasses import dataclass, field
from typing import Any

from ..health import Health
from .keyed import PerCpuSlots

SLOT_MULT = 2654435761  # task_slot() in bpf/sched.c: pid times this, modulo the table size


@dataclass(frozen=True)
class CpuTick:
    """CPU time of the processes that ran during one interval, from the kernel."""

    ns_by_tgid: dict[int, int]  # thread group -> CPU nanoseconds over the interval (> 0 only)
    exited: frozenset[int]  # thread groups whose leader made its last switch-out
    interval_s: float  # monotonic time between this read and the previous one


@dataclass
class TaskCpuCounters:
    """Monotonic counts of what could not be read exactly."""

    reads: int = 0  # slot reads (bpf lookups) in all
    foreign_slots: int = 0  # slot held by another pid when read (collision or pid reuse)
    drained: int = 0  # `ran` notes taken
    threads_tracked: int = 0  # threads with a running total in user space (a level, not a count)


@dataclass
class _Thread:
    tgid: int
    total_ns: int  # run_ns plus the open segment at the last read


@dataclass
class _Buffers:
    keys: Any
    values: Any
    in_batch: ct.c_uint32 = field(default_factory=ct.c_uint32)
    out_batch: ct.c_uint32 = field(default_factory=ct.c_uint32)
    count: ct.c_uint32 = field(default_factory=ct.c_uint32)


class TaskCpuReader:
    """Turns the scheduler program's per-thread run times into per-process deltas, O(threads that ran).

    Each read: bump the epoch, drain `ran` (atomic lookup-and-delete batches), read the slots of
    the drained threads, of the threads read last time (a segment closed after that read may
    have left no note) and of the threads running now, between two reads of the per-CPU state
    so that an open segment is added only when it stayed open across the slot reads.
    """

    BATCH = 4096

    def __init__(self, bpf: Any, task_entries: int) -> None:
        from bcc.libbcc import lib  # type: ignore[import-not-found]

        self._lib = lib
        self._tasks = bpf[b"tasks"]
        self._ran = bpf[b"ran"]
        self._cpus = PerCpuSlots(bpf[b"cpus"])
        self._config = bpf[b"config"]
        self._config_key = self._config.Key(0)
        self._config_leaf = self._config.Leaf(0)
        self._mask = task_entries - 1
        self._epoch = 0
        self._threads: dict[int, _Thread] = {}
        self._last_read: set[int] = set()
        self._last_mono: float | None = None
        self._key = ct.c_uint32()
        self._leaf = self._tasks.Leaf()
        self._buf = _Buffers(
            keys=(self._ran.Key * self.BATCH)(), values=(self._ran.Leaf * self.BATCH)()
        )
        self.counters = TaskCpuCounters()
        self.next_epoch()

    def health(self) -> Health:
        c = self.counters
        return Health(
            counters={
                "reads": c.reads,
                "foreign_slots": c.foreign_slots,
                "drained": c.drained,
            },
            gauges={"threads_tracked": c.threads_tracked},
        )

    def next_epoch(self) -> None:
        self._epoch = (self._epoch + 1) & 0xFFFFFFFF or 1
        self._config_leaf.value = self._epoch
        if (
            self._lib.bpf_update_elem(
                self._config.map_fd, ct.byref(self._config_key), ct.byref(self._config_leaf), 0
            )
            < 0
        ):
            raise OSError(ct.get_errno(), "the scheduler program's epoch could not be written")

    def _drain(self) -> list[tuple[int, int, int, int]]:
        """(pid, tgid, dead, run_ns) of every note in `ran`, each taken out atomically."""
        out: list[tuple[int, int, int, int]] = []
        b = self._buf
        fd = self._ran.map_fd
        first = True
        while True:
            b.count.value = self.BATCH
            res = self._lib.bpf_lookup_and_delete_batch(
                fd,
                None if first else ct.byref(b.in_batch),
                ct.byref(b.out_batch),
                ct.byref(b.keys),
                ct.byref(b.values),
                ct.byref(b.count),
            )
            n = b.count.value
            for i in range(n):
                v = b.values[i]
                out.append((int(b.keys[i]), int(v.tgid), int(v.dead), int(v.run_ns)))
            if res != 0:  # ENOENT: the whole map has been walked
                break
            if n == 0:
                break
            b.in_batch.value = b.out_batch.value
            first = False
        self.counters.drained += len(out)
        return out

    def _open_segments(self) -> dict[int, int]:
        """Running thread -> switch-in time (ns, CLOCK_MONOTONIC), one per busy CPU."""
        per_cpu = self._cpus.read(0)
        return {int(c.curr_pid): int(c.curr_start) for c in per_cpu if c.curr_pid and c.curr_start}

    def _slot(self, pid: int) -> tuple[int, int] | None:
        """(run_ns, tgid) of the slot when `pid` still owns it, else None."""
        self._key.value = (pid * SLOT_MULT) & self._mask
        self.counters.reads += 1
        if (
            self._lib.bpf_lookup_elem(self._tasks.map_fd, ct.byref(self._key), ct.byref(self._leaf))
            < 0
        ):
            return None
        leaf = self._leaf
        if leaf.pid != pid:
            self.counters.foreign_slots += 1
            return None
        return int(leaf.run_ns), int(leaf.tgid)

    def read(self) -> CpuTick:
        """CPU time per process since the previous read."""
        mono = time.monotonic()
        interval = 0.0 if self._last_mono is None else mono - self._last_mono
        self._last_mono = mono
        self.next_epoch()
        notes = self._drain()
        ns: dict[int, int] = {}
        exited: set[int] = set()
        threads = self._threads
        for pid, tgid, dead, run_ns in notes:
            if not dead:
                continue
            prev = threads.pop(pid, None)
            if prev is None:
                delta = run_ns  # born and gone between two reads
            else:
                # below the last total: its slot was taken from it (counted in the kernel)
                delta = max(0, run_ns - prev.total_ns)
            if delta > 0:
                ns[tgid] = ns.get(tgid, 0) + delta
            if pid == tgid:
                exited.add(tgid)
        live = {pid for pid, _, dead, _ in notes if not dead}
        before = self._open_segments()
        wanted = (live | self._last_read | before.keys()) - {
            pid for pid, _, dead, _ in notes if dead
        }
        slots: dict[int, tuple[int, int]] = {}
        for pid in wanted:
            s = self._slot(pid)
            if s is not None:
                slots[pid] = s
        after = self._open_segments()
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for pid, (run_ns, tgid) in slots.items():
            start = before.get(pid)
            if start is not None and after.get(pid) == start and now_ns > start:
                run_ns += now_ns - start  # open across the slot reads: not in run_ns yet
            prev = threads.get(pid)
            if prev is None or prev.tgid != tgid:
                threads[pid] = _Thread(tgid, run_ns)
                delta = run_ns
            else:
                delta = run_ns - prev.total_ns
                if delta < 0:  # taken over and restarted between reads: count from zero
                    delta = run_ns
                prev.total_ns = run_ns
            if delta > 0 and tgid:
                ns[tgid] = ns.get(tgid, 0) + delta
        self._last_read = set(slots)
        self.counters.threads_tracked = len(threads)
        return CpuTick(ns, frozenset(exited), interval)

    def forget_groups(self, alive: set[int]) -> int:
        """Drop running totals of threads whose process is gone (their exit note was lost)."""
        gone = [pid for pid, t in self._threads.items() if t.tgid not in alive]
        for pid in gone:
            del self._threads[pid]
        return len(gone)
