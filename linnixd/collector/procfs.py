"""/proc reader: per-process memory, threads, fds and cgroup (and CPU when no kernel source); host CPU.

Two ways to keep the process table: scan() reads every process (the fallback when the
scheduler program is not loaded, and the start-up seed); update() reads only the processes
the kernel saw run, rate-limited per process, with reconcile() as the slow background walk
that catches what the kernel stream could not say (a lost exit note, a process that never ran)
and refresh_stale() re-reading, a few per tick in turn, processes that never run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..health import Health

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SLOW_REFRESH_S = 10.0  # limits and cgroup membership are re-read this often per process
YOUNG_S = 5.0  # a process this new has its cgroup re-read each sample_s: runtimes move it now
SAMPLE_S = 1.0  # kernel mode: uid and fd-table size of a running process at most this often
RESAMPLE_S = (
    300.0  # refresh_stale(): a process that never runs is re-read this often (RSS drifts down)
)
STALE_READS = 8  # refresh_stale(): re-reads per tick at most (no tick carries a burst) ...
STALE_LOOKS = 64  # ... and table entries looked at per tick at most
RECONCILE_CHUNK = 1024  # reconcile_step(): /proc entries listed per tick
FD_PREFILTER = 0.5  # count fds only when FDSize reaches this share of the soft limit
CMDLINE_MAX = 4096


@dataclass(slots=True)
class ProcEntry:
    """One live process as the scanner tracks it between ticks (mutable, internal to the model)."""

    pid: int
    start_ticks: int  # field 22 of stat: identifies the process across pid reuse
    ppid: int
    comm: str
    cpu_ticks: int  # utime + stime
    rss_pages: int
    threads: int
    uid: int = -1
    cmdline: str | None = None  # None: read it on the next scan
    cgroup: str = "/"
    v1_memory: str | None = None  # path in the v1 memory hierarchy, on hybrid hosts
    fd_size: int = 0
    fd_count: int | None = None
    fd_soft_limit: int | None = None  # None = unlimited or unknown
    slow_read_at: float = -1e18  # monotonic time of the last limits/cgroup read
    first_seen: float = 0.0
    cpu_pct: float = 0.0
    sampled_at: float = 0.0  # monotonic time of the last stat/status read

    @property
    def start_time(self) -> float:
        return self.start_ticks / CLK_TCK

    @property
    def rss_bytes(self) -> int:
        return self.rss_pages * PAGE_SIZE


@dataclass(frozen=True)
class SystemStat:
    """Host-wide figures from one scan."""

    ncpu: int
    cpu_util_pct: float  # busy share of all CPUs over the interval, 0-100
    forks_total: int  # `processes` line of /proc/stat: forks since boot
    file_nr: int
    file_max: int
    mem_available_bytes: int = 0  # MemAvailable of /proc/meminfo, 0 when unreadable


@dataclass
class ScanCounters:
    """Monotonic counts of what a scan could not read."""

    permission_errors: int = 0  # files of a process we were not allowed to read
    fd_denied: int = 0  # fd counts refused (no ptrace read access to /proc/PID/fd)
    fd_counted: int = 0  # fd directories listed (past the FDSize pre-filter)
    scans: int = 0
    reads: int = 0  # processes whose stat was read (every scan, or on update/reconcile)
    reconciles: int = 0
    stale_dropped: int = 0  # table entries reconcile() found gone (their exit was not seen)
    missed_found: int = 0  # processes reconcile() found that the kernel stream had not named


@dataclass
class Scan:
    """Result of one scan: live processes by pid and the host figures."""

    processes: dict[int, ProcEntry]
    system: SystemStat
    interval_s: float
    new: list[int] = field(default_factory=list)  # pids first seen in this scan


class ProcScanner:
    """Reads /proc once per tick; remembers each process between ticks for CPU deltas."""

    def __init__(
        self,
        proc: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
        sample_s: float = 0.0,
    ) -> None:
        """`sample_s`: status, cmdline, limits and fds of a known process at most this often (0: every read)."""
        self.proc = proc
        self.sample_s = sample_s
        self._clock = clock
        self.procs: dict[int, ProcEntry] = {}
        self.counters = ScanCounters()
        self._last_mono: float | None = None
        self._last_boot: float | None = None
        self._last_cpu: tuple[int, int] | None = None  # (busy, total) jiffies of /proc/stat
        self._ncpu = os.cpu_count() or 1
        self._running: set[int] = set()  # update(): pids given CPU time in the last interval
        # pid -> when a read held back by sample_s (status, fds) or by the slow refresh (cgroup,
        # limits) falls due for a process that ran meanwhile: made then even if it sleeps from
        # then on (a process that opens fds or moves to a cgroup, then waits, is seen)
        self._walk: Any = None  # reconcile_step(): the os.scandir() of the walk under way
        self._walk_seen: set[int] = set()
        self._walk_known: set[int] = set()
        self._stale_turn: list[int] = []  # refresh_stale(): the pids still to look at this round
        self._owed: dict[int, float] = {}

    def health(self) -> Health:
        c = self.counters
        return Health(
            counters={
                "reads": c.reads,
                "scans": c.scans,
                "permission_errors": c.permission_errors,
                "fd_denied": c.fd_denied,
                "fd_counted": c.fd_counted,
                "reconciles": c.reconciles,
                "stale_dropped": c.stale_dropped,
                "missed_found": c.missed_found,
            },
            gauges={"tracked": len(self.procs)},
        )

    def now(self) -> float:
        """The scanner's monotonic clock."""
        return self._clock()

    def invalidate(self, pid: int) -> None:
        """The process exec'd: re-read its cmdline (and cgroup, limits) on the next scan."""
        entry = self.procs.get(pid)
        if entry is not None:
            entry.cmdline = None
            entry.slow_read_at = -1e18

    def forget(self, pid: int) -> None:
        self.procs.pop(pid, None)
        self._owed.pop(pid, None)

    def update(self, cpu_ns: dict[int, int], exited: frozenset[int]) -> set[int]:
        """Read only the processes the kernel saw run (their stat: CPU, memory, threads); drop exited ones.

        Returns the pids whose entry changed (ran, stopped running, re-read, appeared, left).
        """
        now = self._clock()
        changed: set[int] = set()
        procs = self.procs
        for pid in exited:
            if procs.pop(pid, None) is not None:
                changed.add(pid)
        for pid in self._running - cpu_ns.keys():
            e = procs.get(pid)
            if e is not None:
                e.cpu_pct = 0.0
                changed.add(pid)
        self._running = set(cpu_ns)
        base_dir = self.proc
        interval = 0.0 if self._last_mono is None else now - self._last_mono
        prev_boot = self._last_boot
        for pid in cpu_ns:
            if pid in exited:
                continue
            entry = procs.get(pid)
            try:
                fresh = self._read(pid, f"{base_dir}/{pid}", entry, now, interval, prev_boot)
            except (FileNotFoundError, ProcessLookupError):
                if procs.pop(pid, None) is not None:
                    changed.add(pid)
                continue
            except PermissionError:
                self.counters.permission_errors += 1
                continue
            if fresh is None:
                continue
            procs[pid] = fresh
            changed.add(pid)
        for pid in [p for p, due in self._owed.items() if due <= now and p not in cpu_ns]:
            entry = procs.get(pid)
            del self._owed[pid]
            if entry is None:
                continue
            try:
                if self._read(pid, f"{base_dir}/{pid}", entry, now, interval, prev_boot):
                    changed.add(pid)
            except (FileNotFoundError, ProcessLookupError):
                procs.pop(pid, None)
                changed.add(pid)
            except PermissionError:
                self.counters.permission_errors += 1
        self._last_mono = now
        self._last_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return changed

    def system(self) -> SystemStat:
        """Host-wide figures (CPU busy share since the previous call, forks, file handles)."""
        return self._system()

    def refresh_stale(self, reads: int = STALE_READS, looks: int = STALE_LOOKS) -> set[int]:
        """Re-read processes not sampled for RESAMPLE_S: every entry is looked at in turn, at
        most `looks` per call and `reads` of them re-read, so a host of sleepers costs a few
        reads per tick and never a burst (10,000 sleepers: each looked at every ~80 ticks)."""
        now = self._clock()
        changed: set[int] = set()
        turn = self._stale_turn
        for _ in range(looks):
            if not turn:
                turn.extend(self.procs)  # a new round: O(processes) once per round
                turn.reverse()  # pop() from the end takes them in table order
                if not turn:
                    break
            pid = turn.pop()
            old = self.procs.get(pid)
            if old is None or now - old.sampled_at < RESAMPLE_S:
                continue
            try:
                entry = self._read(pid, f"{self.proc}/{pid}", old, now, 0.0, None)
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone: its exit, or the next reconcile(), takes it out
            except PermissionError:
                self.counters.permission_errors += 1
                continue
            if entry is not None:
                self.procs[pid] = entry
                changed.add(pid)
            if len(changed) >= reads:
                break
        return changed

    def reconcile(self) -> set[int]:
        """The whole slow walk at once: drop entries whose process is gone, read unseen ones."""
        changed: set[int] = set()
        done = False
        while not done:
            step, done = self.reconcile_step(chunk=1 << 30)
            changed |= step
        return changed

    @property
    def walking(self) -> bool:
        """A reconcile walk is under way (reconcile_step() goes on with it)."""
        return self._walk is not None

    def reconcile_step(self, chunk: int = RECONCILE_CHUNK) -> tuple[set[int], bool]:
        """The slow walk, `chunk` /proc entries per call (no tick lists 10,000 at once): reads
        the processes the table does not know; at the end drops the entries of processes the
        walk did not see and that are gone. Returns (changed pids, walk finished)."""
        if self._walk is None:
            self.counters.reconciles += 1
            self._walk = os.scandir(self.proc)
            self._walk_seen = set()
            self._walk_known = set(self.procs)  # a process born during the walk is not dropped
        now = self._clock()
        changed: set[int] = set()
        procs = self.procs
        for listed, d in enumerate(self._walk, 1):
            name = d.name
            if name.isdigit():
                pid = int(name)
                self._walk_seen.add(pid)
                if pid not in procs:
                    try:
                        entry = self._read(pid, f"{self.proc}/{pid}", None, now, 0.0, None)
                    except (FileNotFoundError, ProcessLookupError):
                        entry = None
                    except PermissionError:
                        self.counters.permission_errors += 1
                        entry = None
                    if entry is not None:
                        self.counters.missed_found += 1
                        procs[pid] = entry
                        changed.add(pid)
            if listed >= chunk:
                return changed, False
        self._walk.close()
        self._walk = None
        for pid in self._walk_known - self._walk_seen:
            if pid in procs and not os.path.exists(f"{self.proc}/{pid}"):
                del procs[pid]
                self.counters.stale_dropped += 1
                changed.add(pid)
        self._walk_seen = set()
        self._walk_known = set()
        return changed, True

    def scan(self) -> Scan:
        now = self._clock()
        boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
        interval = 0.0 if self._last_mono is None else now - self._last_mono
        prev_boot = self._last_boot
        old = self.procs
        fresh: dict[int, ProcEntry] = {}
        new: list[int] = []
        proc = self.proc
        with os.scandir(proc) as it:
            for d in it:
                name = d.name
                if not name.isdigit():
                    continue
                pid = int(name)
                base = f"{proc}/{name}"
                try:
                    entry = self._read(pid, base, old.get(pid), now, interval, prev_boot)
                except (FileNotFoundError, ProcessLookupError):
                    continue  # exited while we read it: normal
                except PermissionError:
                    self.counters.permission_errors += 1
                    continue
                if entry is None:
                    continue
                if entry.first_seen == now:
                    new.append(pid)
                fresh[pid] = entry
        self.procs = fresh
        self._last_mono = now
        self._last_boot = boot_now
        self.counters.scans += 1
        return Scan(fresh, self._system(), interval, new)

    def _read(
        self,
        pid: int,
        base: str,
        prev: ProcEntry | None,
        now: float,
        interval: float,
        prev_boot: float | None,
    ) -> ProcEntry | None:
        self.counters.reads += 1
        with open(base + "/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
        # comm may contain spaces and ')': it ends at the LAST ')'
        lp = raw.find("(")
        rp = raw.rfind(")")
        if lp < 0 or rp < 0:
            return None
        comm = raw[lp + 1 : rp]
        fields = raw[rp + 2 :].split()
        # fields[0] is field 3 (state) of proc(5)
        ppid = int(fields[1])
        cpu_ticks = int(fields[11]) + int(fields[12])
        threads = int(fields[17])
        start_ticks = int(fields[19])
        rss_pages = int(fields[21])
        if prev is not None and prev.start_ticks == start_ticks:
            entry = prev
            delta = cpu_ticks - entry.cpu_ticks
            entry.cpu_pct = 100.0 * delta / CLK_TCK / interval if interval > 0 else 0.0
            entry.ppid, entry.comm, entry.cpu_ticks = ppid, comm, cpu_ticks
            entry.rss_pages, entry.threads = rss_pages, threads
        else:
            entry = ProcEntry(
                pid, start_ticks, ppid, comm, cpu_ticks, rss_pages, threads, first_seen=now
            )
            # start times are truncated to clock ticks: one tick of slack, or a process started
            # just after the previous scan began would look older than it and lose its first interval
            started_inside = prev_boot is not None and (start_ticks + 1) / CLK_TCK >= prev_boot
            if started_inside and interval > 0:
                entry.cpu_pct = 100.0 * cpu_ticks / CLK_TCK / interval
        if entry is prev and now - entry.sampled_at < self.sample_s:
            due = entry.sampled_at + self.sample_s
            self._owed[pid] = min(due, self._owed.get(pid, due))
            return entry  # stat only: memory and threads are fresh, the rest is recent enough
        self._owed.pop(pid, None)
        slow_every = self.sample_s if now - entry.first_seen < YOUNG_S else SLOW_REFRESH_S
        try:
            if entry.cmdline is None:
                entry.cmdline = _read_cmdline(base, comm)
            self._read_status(base, entry)
            if now - entry.slow_read_at >= slow_every:
                entry.slow_read_at = now
                entry.fd_soft_limit = _read_fd_limit(base)
                self._read_cgroup(base, entry)
            elif self.sample_s > 0:
                # it ran: its cgroup or limits may have changed, read them once due
                self._owed[pid] = entry.slow_read_at + slow_every
        except PermissionError:
            # stat was readable, so the process is kept with what could be read
            self.counters.permission_errors += 1
        self._count_fds(base, entry)
        entry.sampled_at = now
        return entry

    def _read_status(self, base: str, entry: ProcEntry) -> None:
        with open(base + "/status", "rb") as f:
            status = f.read()
        i = status.find(b"\nUid:")
        if i >= 0:
            entry.uid = int(status[i + 5 : status.index(b"\n", i + 1)].split()[0])
        i = status.find(b"\nFDSize:")
        # kernel threads and zombies have no fd table
        entry.fd_size = int(status[i + 8 : status.index(b"\n", i + 1)]) if i >= 0 else 0

    def _read_cgroup(self, base: str, entry: ProcEntry) -> None:
        with open(base + "/cgroup", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        for line in lines:
            hid, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hid == "0" and controllers == "":
                entry.cgroup = path or "/"
            elif "memory" in controllers.split(","):
                entry.v1_memory = path or "/"

    def _count_fds(self, base: str, entry: ProcEntry) -> None:
        # FDSize is the fd table's capacity, which the kernel grows in powers of two
        # (BITS_PER_LONG, then doubling), so it is always >= the open fd count and at most
        # about twice it: a world-readable, cheap upper bound that spares most listdir calls
        limit = entry.fd_soft_limit
        if limit is None or entry.fd_size < FD_PREFILTER * limit:
            entry.fd_count = None
            return
        try:
            entry.fd_count = len(os.listdir(base + "/fd"))
            self.counters.fd_counted += 1
        except PermissionError:
            entry.fd_count = None
            self.counters.fd_denied += 1

    def _system(self) -> SystemStat:
        util = 0.0
        forks = 0
        with open(self.proc + "/stat", "rb") as f:
            for line in f.read().decode().splitlines():
                if line.startswith("cpu "):
                    v = [int(x) for x in line.split()[1:]]
                    # user nice system idle iowait irq softirq steal (guest is inside user)
                    total = sum(v[:8])
                    busy = total - v[3] - (v[4] if len(v) > 4 else 0)
                    if self._last_cpu is not None and total > self._last_cpu[1]:
                        util = 100.0 * (busy - self._last_cpu[0]) / (total - self._last_cpu[1])
                    self._last_cpu = (busy, total)
                elif line.startswith("processes "):
                    forks = int(line.split()[1])
        file_nr = file_max = 0
        try:
            with open(self.proc + "/sys/fs/file-nr", "rb") as f:
                file_nr = int(f.read().split()[0])
            with open(self.proc + "/sys/fs/file-max", "rb") as f:
                file_max = int(f.read())
        except (OSError, ValueError):
            pass  # /proc/sys not mounted in some containers: reported as 0
        available = 0
        try:
            with open(self.proc + "/meminfo", "rb") as f:
                for row in f.read(4096).splitlines():
                    if row.startswith(b"MemAvailable:"):
                        available = int(row.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass  # reported as 0: memory_leak then projects against no host limit
        return SystemStat(
            self._ncpu, max(0.0, min(100.0, util)), forks, file_nr, file_max, available
        )


def _read_cmdline(base: str, comm: str) -> str:
    with open(base + "/cmdline", "rb") as f:
        raw = f.read(CMDLINE_MAX)
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text or f"[{comm}]"  # kernel threads have an empty cmdline


def _read_fd_limit(base: str) -> int | None:
    with open(base + "/limits", "rb") as f:
        for line in f.read().decode().splitlines():
            if line.startswith("Max open files"):
                soft = line[len("Max open files") :].split()[0]
                return None if soft == "unlimited" else int(soft)
    return None
