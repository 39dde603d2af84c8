"""Pressure stall information: periodic reads (system and per cgroup) and kernel PSI triggers."""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from ..daemonlog import LOG_WARNING
from ..daemonlog import log as daemon_log
from ..health import Health
from ..model import RESOURCES, PsiSample

SYSTEM = "<system>"


def parse_pressure(text: str) -> tuple[float, float, int, int]:
    """(some avg10, full avg10, some total us, full total us) of one pressure file."""
    some_avg = full_avg = 0.0
    some_total = full_total = 0  # a missing `full` line (cpu before 5.13) means none
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
        if kind == "some":
            some_avg, some_total = float(fields["avg10"]), int(fields["total"])
        elif kind == "full":
            full_avg, full_total = float(fields["avg10"]), int(fields["total"])
    return some_avg, full_avg, some_total, full_total


class PsiReader:
    """Reads pressure files and turns their `total=` counters into per-interval stall deltas."""

    def __init__(
        self,
        root: str = "/proc/pressure",
        resources: Sequence[str] = RESOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.resources = tuple(resources)
        self._clock = clock
        # (key, resource) -> (monotonic time, some total, full total) of the previous read
        self._prev: dict[tuple[str, str], tuple[float, int, int]] = {}

    def system(self) -> dict[str, PsiSample]:
        """Host-wide pressure by resource from /proc/pressure."""
        return self._read(SYSTEM, self.root, "")

    def cgroup(self, key: str, directory: str) -> dict[str, PsiSample]:
        """Pressure of the cgroup at `directory` (its {cpu,io,memory}.pressure files)."""
        return self._read(key, directory, ".pressure")

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the previous totals of cgroups not in `keep` (removed or no longer tracked)."""
        wanted = set(keep) | {SYSTEM}
        for k in [k for k in self._prev if k[0] not in wanted]:
            del self._prev[k]

    def _read(self, key: str, directory: str, suffix: str) -> dict[str, PsiSample]:
        out: dict[str, PsiSample] = {}
        for res in self.resources:
            try:
                with open(f"{directory}/{res}{suffix}", "rb") as f:
                    text = f.read().decode()
            except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
                self._prev.pop((key, res), None)
                continue  # cgroup removed, or a resource this kernel does not report
            now = self._clock()
            some_avg, full_avg, some_total, full_total = parse_pressure(text)
            prev = self._prev.get((key, res))
            self._prev[(key, res)] = (now, some_total, full_total)
            if prev is None:
                out[res] = PsiSample(some_avg, full_avg, 0, 0, 0.0)
            else:
                out[res] = PsiSample(
                    some_avg,
                    full_avg,
                    max(0, some_total - prev[1]),
                    max(0, full_total - prev[2]),
                    now - prev[0],
                )
        return out


WINDOW_MAX_US = 10_000_000
UNPRIV_WINDOW_US = 2_000_000


def _threshold(window_us: int, some_pct: float) -> int:
    # the kernel refuses a threshold of 0 or one longer than the window
    return max(1, min(window_us, int(window_us * some_pct / 100.0)))


class PsiTriggers:
    """Kernel PSI triggers on /proc/pressure/<res>, signalled on one readable fd for asyncio.

    A PSI trigger's poll() consumes the event it reports, so an epoll fd that is itself polled
    by the event loop (nested) loses the event before anyone can ask which resource fired
    (measured: the outer fd turned readable, the inner epoll_wait then returned nothing).
    So one thread blocks in epoll_wait on the trigger fds and passes names over a pipe.
    """

    def __init__(
        self,
        resources: Sequence[str],
        some_pct: float,
        window_s: float,
        root: str = "/proc/pressure",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.resources = tuple(resources)
        self.window_us = round(window_s * 1e6)
        self.threshold_us = _threshold(self.window_us, some_pct)
        self.mode = "triggers"
        self.reason = ""
        self.fired = 0  # trigger events the kernel delivered
        self._epoll = select.epoll()
        self._fds: dict[int, str] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._thread: threading.Thread | None = None
        for res in self.resources:
            try:
                fd = self._arm(f"{root}/{res}", some_pct)
            except OSError as exc:
                if exc.errno not in (
                    errno.EPERM,
                    errno.EACCES,
                    errno.EINVAL,
                    errno.ENOENT,
                    errno.EOPNOTSUPP,
                ):
                    raise
                self._fall_back(f"{root}/{res}: {os.strerror(exc.errno or 0)}", log)
                return
            self._fds[fd] = res
            self._epoll.register(fd, select.EPOLLPRI)
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._watch, name="linnixd-psi", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            events = self._epoll.poll()
            names = []
            for fd, ev in events:
                if fd == self._stop_r:
                    return
                if ev & select.EPOLLPRI:
                    names.append(self._fds[fd])
                elif ev & (select.EPOLLERR | select.EPOLLHUP):
                    self._epoll.unregister(fd)  # the pressure file went away: stop watching it
            if names:
                with self._lock:
                    self._pending.extend(n for n in names if n not in self._pending)
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:
                    pass  # the pipe is full of unread wake-ups already: one more adds nothing

    def _arm(self, path: str, some_pct: float) -> int:
        """Open one pressure file and write the trigger; returns the fd."""
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        try:
            try:
                os.write(fd, self._spec())
            except OSError as exc:
                # unprivileged (no CAP_SYS_RESOURCE on the file's opener, kernel >= 6.5) windows
                # must be multiples of 2 s: round up once; measured here even as root
                rounded = min(
                    WINDOW_MAX_US, -(-self.window_us // UNPRIV_WINDOW_US) * UNPRIV_WINDOW_US
                )
                if exc.errno != errno.EINVAL or rounded == self.window_us:
                    raise
                self.window_us = rounded
                self.threshold_us = _threshold(rounded, some_pct)
                os.write(fd, self._spec())
        except OSError:
            os.close(fd)
            raise
        return fd

    def _spec(self) -> bytes:
        # psi_write() overwrites the last byte written with NUL: send the NUL ourselves
        return f"some {self.threshold_us} {self.window_us}".encode() + b"\0"

    def _fall_back(self, reason: str, log: Callable[[str], None] | None) -> None:
        for fd in list(self._fds):
            self._epoll.unregister(fd)
            os.close(fd)
        self._fds.clear()
        self.mode = "polling"
        self.reason = reason
        line = f"PSI triggers not available ({reason}): polling pressure every tick"
        if log is not None:
            log(line)
        else:
            daemon_log(line, LOG_WARNING)

    def health(self) -> Health:
        return Health(
            counters={"fired": self.fired},
            gauges={"triggers_armed": len(self._fds)},
        )

    def fileno(self) -> int:
        """Readable when a trigger fired (for loop.add_reader); never readable when polling."""
        return self._wake_r

    def drain(self) -> list[str]:
        """Resources whose trigger fired since the last call."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            fired, self._pending = self._pending, []
        self.fired += len(fired)
        return fired

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=2.0)
            self._thread = None
        for fd in list(self._fds):
            os.close(fd)
        self._fds.clear()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            os.close(fd)
