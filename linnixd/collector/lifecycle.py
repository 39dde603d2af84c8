"""The process-lifecycle collector: bpf/lifecycle.c loaded, its maps and records read as ticks."""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..health import Health
from ..model import ExecRecord, ExitRecord, LifecycleCounts, LifecycleTick
from ..paths import bpf_dir
from .bpfload import (
    KernelFeatureError,
    ShortLivedThreshold,
    compile_program,
    preflight,
    ringbuf_supported,
    source_text,
)
from .cgroups import cgroup2_mount
from .keyed import KeyedCounters, PerCpuSlots

TRACEPOINTS = (
    "task/task_newtask",
    "sched/sched_process_exec",
    "sched/sched_process_exit",
    "syscalls/sys_enter_exit_group",
    "signal/signal_deliver",
)

# Slots of bpf/lifecycle.c's health array.
H_DROP_EXEC, H_DROP_EXIT, H_OVERFLOW, H_UNTRACKED = range(4)
NHEALTH = 4
REC_EXEC, REC_EXIT = 1, 2
F_LIFETIME, F_CODE, F_SIGNAL = 1, 2, 4

RECORD_BYTES = 64 + 8  # struct record plus the ring buffer's per-record header
RINGBUF_BYTES = 10_000 * RECORD_BYTES  # one second of 10k records/s
PERF_MIN_PAGES = 8

Counts = tuple[int, int, int, int, int]
ZERO: Counts = (0, 0, 0, 0, 0)


class _Record(ct.Structure):
    """struct record of bpf/lifecycle.c."""

    _fields_ = [
        ("ts", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("lifetime_ns", ct.c_uint64),
        ("kind", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("exit_code", ct.c_int32),
        ("sig", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("comm", ct.c_char * 16),
    ]


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def live_cgroup_ids() -> set[int]:
    """Inode numbers (== cgroup ids) of every directory under the cgroup2 mount."""
    mount = cgroup2_mount()
    if mount is None:
        return set()
    ids = {os.stat(mount).st_ino}
    for directory, subdirs, _ in os.walk(mount):
        for d in subdirs:
            try:
                ids.add(os.stat(os.path.join(directory, d)).st_ino)
            except OSError:
                pass  # removed while walking: it is gone either way
    return ids


def _delta(now: Counts, prev: Counts) -> LifecycleCounts:
    return LifecycleCounts(*(a - b for a, b in zip(now, prev, strict=True)))


def _counts(values: tuple[int, ...]) -> LifecycleCounts:
    return LifecycleCounts(*values)


def _live_tgids(keys: list[int]) -> set[int]:
    return {k for k in keys if os.path.exists(f"/proc/{k}")}


class LifecycleCollector(ShortLivedThreshold):
    """Counts forks, threads, execs and exits in the kernel; streams exec/exit records."""

    def __init__(
        self,
        short_lived_s: float = 1.0,
        *,
        use_ringbuf: bool | None = None,
        buffer_pages: int | None = None,
        parent_entries: int = 16384,
        cgroup_entries: int = 4096,
        task_entries: int = 65536,
        prune_after_ticks: int = 10,
        cgroup_exists: Callable[[int], bool] | None = None,
        src: Path | None = None,
    ) -> None:
        """`buffer_pages`: ring buffer size, or perf buffer pages per CPU (a power of two).

        `cgroup_exists`: tells whether a cgroup id still exists (default: a scan of the cgroup2
        mount, only when some cgroup key has gone idle).
        """
        self.init_short_lived(short_lived_s)
        self.use_ringbuf = use_ringbuf
        self.buffer_pages = buffer_pages
        self.parent_entries = parent_entries
        self.cgroup_entries = cgroup_entries
        self.task_entries = task_entries
        self.prune_after_ticks = prune_after_ticks
        self.cgroup_exists = cgroup_exists
        self.src = src or bpf_dir() / "lifecycle.c"
        self._bpf: Any = None
        self._transport: str | None = None
        self._parents: KeyedCounters[LifecycleCounts] | None = None
        self._cgroups: KeyedCounters[LifecycleCounts] | None = None
        self._totals: PerCpuSlots | None = None
        self._health_slots: PerCpuSlots | None = None
        self._prev_total: Counts = ZERO
        self._moved_last = True
        self._execs: list[ExecRecord] = []
        self._exits: list[ExitRecord] = []
        self._health = [0] * NHEALTH
        self.pruned_keys = 0  # monotonic: idle map entries removed for dead tgids/cgroups

    @property
    def transport(self) -> str | None:
        """Record transport: "ringbuf" or "perfbuf" once started, None before."""
        return self._transport

    def _ringbuf_pages(self) -> int:
        if self.buffer_pages is not None:
            return self.buffer_pages
        return _pow2_at_least(-(-RINGBUF_BYTES // os.sysconf("SC_PAGE_SIZE")))

    def _perf_pages(self) -> int:
        if self.buffer_pages is not None:
            return self.buffer_pages
        per_cpu = -(-RINGBUF_BYTES // (os.cpu_count() or 1) // os.sysconf("SC_PAGE_SIZE"))
        return max(PERF_MIN_PAGES, _pow2_at_least(per_cpu))

    def cflags(self, ringbuf: bool) -> list[str]:
        flags = [
            f"-DPARENT_ENTRIES={self.parent_entries}",
            f"-DCGROUP_ENTRIES={self.cgroup_entries}",
            f"-DTASK_ENTRIES={self.task_entries}",
            self.short_lived_cflag(),
        ]
        if ringbuf:
            flags.append(f"-DRINGBUF_PAGES={self._ringbuf_pages()}")
        else:
            flags.append("-DUSE_PERFBUF")
        return flags

    def _want_ringbuf(self) -> bool:
        return ringbuf_supported() if self.use_ringbuf is None else self.use_ringbuf

    def dump_source(self) -> str:
        """The C source exactly as start() would compile it, -D values first."""
        return source_text(self.src, self.cflags(self._want_ringbuf()))

    def start(self) -> None:
        """Check the kernel, compile and attach; raises KernelFeatureError with the fix."""
        preflight(TRACEPOINTS)
        ringbuf = self._want_ringbuf()
        self._bpf = compile_program(self.src, self.cflags(ringbuf))
        self.write_short_lived()
        table = self._bpf[b"records"]
        try:
            if ringbuf:
                table.open_ring_buffer(self._on_ringbuf)
            else:
                # Losses are counted by the kernel program (failed perf_submit); this only
                # keeps bcc from printing its own "Possibly lost" line for the same events.
                table.open_perf_buffer(
                    self._on_perfbuf, page_cnt=self._perf_pages(), lost_cb=lambda _n: None
                )
        except Exception as exc:  # bcc raises bare Exception (e.g. mmap refused by RLIMIT_MEMLOCK)
            self.close()
            kind = "ring" if ringbuf else "perf"
            raise KernelFeatureError(f"cannot open the BPF {kind} buffer: {exc}") from None
        self._transport = "ringbuf" if ringbuf else "perfbuf"
        self._prev_total = ZERO  # a fresh program counts from zero, also after close() + start()
        self._moved_last = True
        self._health = [0] * NHEALTH
        self._parents = KeyedCounters(self._bpf[b"by_parent"], self.prune_after_ticks, _counts)
        self._cgroups = KeyedCounters(self._bpf[b"by_cgroup"], self.prune_after_ticks, _counts)
        self._totals = PerCpuSlots(self._bpf[b"totals"])
        self._health_slots = PerCpuSlots(self._bpf[b"health"])

    def _record(self, data: Any) -> None:
        r = ct.cast(data, ct.POINTER(_Record)).contents
        comm = r.comm.decode(errors="replace")
        ts = r.ts / 1e9
        if r.kind == REC_EXEC:
            self._execs.append(ExecRecord(r.pid, r.ppid, r.cgroup_id, comm, ts))
            return
        code: int | None = None
        sig: int | None = None
        if r.flags & F_CODE:
            code = r.exit_code  # what the process asked for; a signal seen then hit a sibling
        elif r.flags & F_SIGNAL:
            sig = r.sig
        lifetime = r.lifetime_ns / 1e9 if r.flags & F_LIFETIME else None
        self._exits.append(ExitRecord(r.pid, r.ppid, r.cgroup_id, comm, code, sig, lifetime, ts))

    def _on_ringbuf(self, _ctx: Any, data: Any, _size: int) -> int:
        self._record(data)
        return 0

    def _on_perfbuf(self, _cpu: int, data: Any, _size: int) -> None:
        self._record(data)

    def _health_counters(self) -> list[int]:
        assert self._health_slots is not None
        return [self._health_slots.sum(i) for i in range(NHEALTH)]

    def read(self) -> LifecycleTick:
        """Deltas since the previous read (the first one: since attach) plus the new records."""
        if self._bpf is None or self._parents is None or self._cgroups is None:
            raise RuntimeError("LifecycleCollector.read() before start()")
        assert self._totals is not None
        per_cpu = self._totals.read(0)
        total_now: Counts = tuple(  # type: ignore[assignment]
            sum(cpu.v[i] for cpu in per_cpu) for i in range(5)
        )
        # a keyed bump may land just after its totals bump: walk once more after they stop
        moved = total_now != self._prev_total
        walk = moved or self._moved_last
        self._moved_last = moved
        by_parent: dict[int, LifecycleCounts] = self._parents.read(walk)  # type: ignore[assignment]
        by_cgroup: dict[int, LifecycleCounts] = self._cgroups.read(walk)  # type: ignore[assignment]
        if walk:
            # bpf/lifecycle.c bumps a health slot only in a program run that bumps the totals
            self._health = self._health_counters()
        # Records are consumed after the counters are read: a record may run one tick ahead of
        # its counter, never behind it.
        self._execs, self._exits = [], []
        if self._transport == "ringbuf":
            self._bpf.ring_buffer_consume()
        else:
            self._bpf.perf_buffer_poll(timeout=0)
        total = _delta(total_now, self._prev_total)
        self._prev_total = total_now
        self.pruned_keys += self._parents.prune(_live_tgids)
        self.pruned_keys += self._cgroups.prune(self._live_cgroups)
        h = self._health
        return LifecycleTick(
            total=total,
            by_parent=by_parent,
            by_cgroup_id=by_cgroup,
            execs=self._execs,
            exits=self._exits,
            events=total_now[0] + total_now[1] + total_now[2] + total_now[3],
            dropped_events=h[H_DROP_EXEC] + h[H_DROP_EXIT],
            aggregation_overflows=h[H_OVERFLOW],
            untracked_exits=h[H_UNTRACKED],
        )

    def health(self) -> Health:
        """Monotonic counters since attach, as of the last read."""
        h, t = self._health, self._prev_total
        return Health(
            counters={
                "events": t[0] + t[1] + t[2] + t[3],
                "dropped_events": h[H_DROP_EXEC] + h[H_DROP_EXIT],
                "dropped_exec_records": h[H_DROP_EXEC],
                "dropped_exit_records": h[H_DROP_EXIT],
                "aggregation_overflows": h[H_OVERFLOW],
                "untracked_exits": h[H_UNTRACKED],
                "pruned_keys": self.pruned_keys,
                "map_walks": (self._parents.walks if self._parents else 0)
                + (self._cgroups.walks if self._cgroups else 0),
            }
        )

    def dropped_records(self) -> dict[str, int]:
        """Monotonic drops by record kind as of the last read (their sum is dropped_events)."""
        return {"exec": self._health[H_DROP_EXEC], "exit": self._health[H_DROP_EXIT]}

    def _live_cgroups(self, ids: list[int]) -> set[int]:
        if self.cgroup_exists is not None:
            return {i for i in ids if self.cgroup_exists(i)}
        return live_cgroup_ids() & set(ids)

    def close(self) -> None:
        """Detach and free the kernel side; safe to call twice or before start()."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._transport = None
