"""Demo workloads for `linnixctl demo NAME`: bounded, self-cleaning processes that trip each rule.

Shape: the caller's process is a supervisor that forks one workload leader into a new session
(so a new process group), waits for it with a time limit and, on exit, Ctrl-C or SIGTERM,
kills that whole group and reaps it. The leader prints the line naming the culprit (its pid,
comm and cgroup) and runs the workload; every process in the group dies with the supervisor
(PR_SET_PDEATHSIG).
Exit codes: 0 done, 64 bad command line, 77 cannot join the cgroup (permission), 71 other
cgroup error, 1 the workload failed, 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .collector.cgroups import cgroup2_mount
from .constants import EXIT_FAILURE, EXIT_NOPERM, EXIT_OK, EXIT_OSERR, EXIT_USAGE

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

FORK_RATE_PER_S = 200  # well above the rule's 10/s, yet cheap on a shared 2-core host
MAX_UNREAPED = 100  # fork-storm children allowed to be pending (running or zombie) at once
SHORT_JOB_RATE_PER_S = 8  # below fork_storm's 10/s so only short_lived_jobs fires
RUNAWAY_CHILDREN = 4
RUNAWAY_SHARE = 0.30  # each child's share of one CPU: 4 x 30% > 90%, each < 50%
MEMLEAK_RATE_MB_S = 2.0
MEMLEAK_FAST_RATE_MB_S = 5.0
PRESSURE_EXTRA = 1  # cpu-pressure: spinners beyond two per CPU (more runnable tasks than CPUs)
BREAKER_EXTRA = 2  # circuit-breaker: the same, held past circuit_breaker's 15 s
MEMPRESSURE_HEADROOM_MB = 32  # memory-pressure: memory.high is set this far above the start
MEMPRESSURE_OVER_MB = 64  # ... and the demo holds this much more than that
MEMPRESSURE_CHUNK_MB = 4
FD_SOFT_LIMIT = 1024
FD_TARGET = 900  # open fds to reach: 88% of the soft limit, over the rule's 80%
FD_RAMP_S = 3.0  # time taken to open them, the rest of --duration holds them
EXIT_GRACE_S = 5.0  # how long past --duration the supervisor waits before killing the group
MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)


class _Stopped(Exception):
    """Raised in the supervisor by SIGINT/SIGTERM/SIGHUP so cleanup runs in `finally`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class Demo:
    """One workload: its name, the rule it trips, its comm, default duration and body."""

    name: str
    rule: str
    comm: str
    duration_s: float
    description: str
    run: Callable[[argparse.Namespace], int]
    nofile: int | None = None  # soft RLIMIT_NOFILE the leader is born with
    in_all: bool = True  # False: needs set-up `demo all` cannot assume (run it by name)


def _prctl(option: int, arg: int | bytes) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _set_comm(comm: str) -> None:
    _prctl(PR_SET_NAME, comm.encode()[:15])


def _die_with_parent(parent: int) -> None:
    """Ask for SIGKILL when the parent dies; if it already has, go now."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(EXIT_FAILURE)


def own_cgroup() -> str:
    """This process's cgroup v2 path (the `0::` line of /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "?"


def _say(text: str) -> None:
    print(text, flush=True)


# ---- workloads (run in the leader, after the start line) -----------------------------


def _fork_storm(args: argparse.Namespace) -> int:
    interval = 1.0 / FORK_RATE_PER_S
    start = time.monotonic()
    count = 0
    unreaped = 0
    last = start
    longest_pause = 0.0  # the longest time between two forks: a starved demo shows it here
    while time.monotonic() - start < args.duration:
        if os.fork() == 0:
            os._exit(0)
        now = time.monotonic()
        longest_pause = max(longest_pause, now - last)
        last = now
        count += 1
        unreaped += 1
        # Reap without waiting for each child to run: on a busy host that wait caps the rate.
        while unreaped and os.waitpid(-1, 0 if unreaped > MAX_UNREAPED else os.WNOHANG)[0]:
            unreaped -= 1
        # Pace against the schedule, not the last fork, so the rate holds under load.
        ahead = start + count * interval - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.monotonic() - start
    for _ in range(unreaped):
        os.waitpid(-1, 0)
    _say(
        f"demo fork-storm: done, {count} processes created in {elapsed:.1f} s "
        f"(longest pause between two {longest_pause:.2f} s)"
    )
    return EXIT_OK


def _short_jobs(args: argparse.Namespace) -> int:
    interval = 1.0 / SHORT_JOB_RATE_PER_S
    start = time.monotonic()
    running: list[subprocess.Popen[bytes]] = []
    statuses: list[int] = []
    count = 0
    while time.monotonic() - start < args.duration:
        # Launch on schedule, collect later: waiting for each job slows the rate on a busy host.
        running.append(subprocess.Popen(["/bin/false"]))
        count += 1
        statuses += [job.returncode for job in running if job.poll() is not None]
        running = [job for job in running if job.returncode is None]
        ahead = start + count * interval - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.monotonic() - start
    statuses += [job.wait() for job in running]
    failed_as_expected = statuses.count(1)
    _say(
        f"demo short-jobs: done, {count} jobs run ({failed_as_expected} exited 1) "
        f"in {elapsed:.1f} s"
    )
    return EXIT_OK


def _cpu_spike(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        pass
    _say(f"demo cpu-spike: done, {time.process_time():.1f} s of CPU")
    return EXIT_OK


def _burn_share(share: float, duration: float) -> float:
    """Hold `share` of one CPU for `duration` s, measured with process_time; returns CPU s used."""
    start_wall = time.monotonic()
    start_cpu = time.process_time()
    max_debt = 0.1  # after starvation catch up at most this much, never run flat out for long
    while (elapsed := time.monotonic() - start_wall) < duration:
        debt = share * elapsed - (time.process_time() - start_cpu)
        if debt > max_debt:
            start_cpu += debt - max_debt
            debt = max_debt
        if debt > 0:
            stop = time.process_time() + min(debt, 0.005)
            while time.process_time() < stop:
                pass
        else:
            time.sleep(min(-debt / share, 0.02))
    return time.process_time() - start_cpu


def _runaway_tree(args: argparse.Namespace) -> int:
    leader = os.getpid()
    kids = []
    for _ in range(RUNAWAY_CHILDREN):
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILURE
            try:
                _die_with_parent(leader)
                _set_comm("lx-runaway-kid")
                _burn_share(RUNAWAY_SHARE, args.duration)
                code = EXIT_OK
            finally:
                os._exit(code)
        kids.append(pid)
    listed = " ".join(map(str, kids))
    _say(f"demo runaway-tree: children {listed}, each ~{RUNAWAY_SHARE:.0%} of a CPU")
    bad = 0
    for pid in kids:
        _, status = os.waitpid(pid, 0)
        bad += os.waitstatus_to_exitcode(status) != 0
    _say(f"demo runaway-tree: done, {RUNAWAY_CHILDREN - bad}/{RUNAWAY_CHILDREN} children finished")
    return EXIT_OK if bad == 0 else EXIT_FAILURE


def _ncpu() -> int:
    return len(os.sched_getaffinity(0))


def _spin_children(n: int, comm: str, duration: float) -> list[int]:
    """Fork n children that busy-loop for `duration` s; their pids.

    Each child opens a session of its own, as independent jobs would: its own scheduler
    autogroup, so the tree loads the host as n tasks, not as one. They still die with the
    leader (PR_SET_PDEATHSIG), which dies with the supervisor.
    """
    leader = os.getpid()
    kids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILURE
            try:
                _die_with_parent(leader)
                os.setsid()
                _set_comm(comm)
                deadline = time.monotonic() + duration
                while time.monotonic() < deadline:
                    pass
                code = EXIT_OK
            finally:
                os._exit(code)
        kids.append(pid)
    return kids


def _wait_children(kids: list[int]) -> int:
    """Wait for every child (the leader uses no CPU meanwhile); the number that failed."""
    bad = 0
    for pid in kids:
        _, status = os.waitpid(pid, 0)
        bad += os.waitstatus_to_exitcode(status) != 0
    return bad


def _cpu_pressure(args: argparse.Namespace) -> int:
    n = 2 * _ncpu() + PRESSURE_EXTRA
    kids = _spin_children(n, "lx-pressure-kid", args.duration)
    _say(f"demo cpu-pressure: {n} spinners on {_ncpu()} CPUs: {' '.join(map(str, kids))}")
    bad = _wait_children(kids)
    _say(f"demo cpu-pressure: done, {n - bad}/{n} spinners finished")
    return EXIT_OK if bad == 0 else EXIT_FAILURE


def _memory_pressure(args: argparse.Namespace) -> int:
    """Hold its cgroup just above a memory.high set for the run: every new page is reclaimed
    against or throttled, which the kernel counts as memory pressure of the cgroup."""
    mount = cgroup2_mount()
    path = own_cgroup()
    directory = Path(mount or "/nonexistent") / path.lstrip("/")
    high = directory / "memory.high"
    if mount is None or path == "/" or not high.is_file():
        print(
            f"demo memory-pressure: cgroup {path} has no memory.high (no cgroup2 memory "
            "controller there): run it with --cgroup DIR of a cgroup2 group with memory enabled",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_OSERR
    before = high.read_text().strip()
    limit = int((directory / "memory.current").read_text()) + MEMPRESSURE_HEADROOM_MB * MB
    high.write_text(f"{limit}\n")
    chunk = MEMPRESSURE_CHUNK_MB * MB
    chunks: collections.deque[bytearray] = collections.deque()
    recharged = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < args.duration:
            block = bytearray(chunk)
            block[::PAGE] = b"\x01" * len(range(0, chunk, PAGE))  # resident, not just reserved
            chunks.append(block)
            if len(chunks) * chunk > (MEMPRESSURE_HEADROOM_MB + MEMPRESSURE_OVER_MB) * MB:
                chunks.popleft()  # freed and charged again by the next block: over memory.high
                recharged += 1
    finally:
        chunks.clear()
        high.write_text(f"{before}\n")
    _say(
        f"demo memory-pressure: done, memory.high {limit / MB:.0f} MiB for "
        f"{time.monotonic() - start:.1f} s, {recharged} blocks of {MEMPRESSURE_CHUNK_MB} MiB "
        "charged above it"
    )
    return EXIT_OK


def _circuit_breaker(args: argparse.Namespace) -> int:
    n = 2 * _ncpu() + BREAKER_EXTRA
    kids = _spin_children(n, "lx-breaker-kid", args.duration)
    _say(f"demo circuit-breaker: {n} spinners on {_ncpu()} CPUs: {' '.join(map(str, kids))}")
    bad = _wait_children(kids)
    _say(f"demo circuit-breaker: done, {n - bad}/{n} spinners finished")
    return EXIT_OK if bad == 0 else EXIT_FAILURE


def _memory_leak(args: argparse.Namespace) -> int:
    if args.rate is not None:
        rate = args.rate * MB
    else:
        rate = (MEMLEAK_FAST_RATE_MB_S if args.fast else MEMLEAK_RATE_MB_S) * MB
    step_s = 0.25
    chunks: list[bytearray] = []
    held = 0
    start = time.monotonic()
    steps = 0
    while (elapsed := time.monotonic() - start) < args.duration:
        want = int(rate * elapsed)
        if want > held:
            chunk = bytearray(want - held)
            # Write one byte per page so every page is really resident, not just reserved.
            chunk[::PAGE] = b"\x01" * len(range(0, len(chunk), PAGE))
            chunks.append(chunk)
            held = want
        steps += 1
        ahead = start + steps * step_s - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    _say(f"demo memory-leak: done, {held / MB:.0f} MB held after {time.monotonic() - start:.1f} s")
    return EXIT_OK


def _fd_leak(args: argparse.Namespace) -> int:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    target = limit * FD_TARGET // FD_SOFT_LIMIT
    ramp = min(FD_RAMP_S, args.duration / 2)
    start = time.monotonic()
    fds: list[int] = []
    have = len(os.listdir("/proc/self/fd")) - 1  # less the fd listdir itself used
    need = max(0, target - have)
    while len(fds) < need:
        fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        ahead = start + len(fds) * ramp / need - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    _say(f"demo fd-leak: {have + len(fds)} fds open of a soft limit of {limit}, holding")
    time.sleep(max(0.0, args.duration - (time.monotonic() - start)))
    for fd in fds:
        os.close(fd)
    _say(f"demo fd-leak: done, {len(fds)} fds opened and closed")
    return EXIT_OK


DEMOS: dict[str, Demo] = {
    d.name: d
    for d in (
        Demo(
            "fork-storm",
            "fork_storm",
            "lx-forkstorm",
            6.0,
            f"one parent forks {FORK_RATE_PER_S} children/s that exit at once (no exec)",
            _fork_storm,
        ),
        Demo(
            "short-jobs",
            "short_lived_jobs",
            "lx-shortjobs",
            6.0,
            f"one parent runs /bin/false {SHORT_JOB_RATE_PER_S} times/s (exec'd, short-lived)",
            _short_jobs,
        ),
        Demo(
            "cpu-spike",
            "cpu_spike",
            "lx-cpuspike",
            9.0,
            "one process busy-loops on a whole CPU",
            _cpu_spike,
        ),
        Demo(
            "runaway-tree",
            "runaway_tree",
            "lx-runaway",
            10.0,
            f"{RUNAWAY_CHILDREN} children each use ~{RUNAWAY_SHARE:.0%} of a CPU: "
            "no single hog, a hungry tree",
            _runaway_tree,
        ),
        Demo(
            "memory-leak",
            "memory_leak",
            "lx-memleak",
            70.0,
            f"one process grows its RSS by {MEMLEAK_RATE_MB_S:g} MB/s "
            f"({MEMLEAK_FAST_RATE_MB_S:g} with --fast)",
            _memory_leak,
        ),
        Demo(
            "fd-leak",
            "fd_exhaustion",
            "lx-fdleak",
            FD_RAMP_S + 5.0,
            f"one process opens {FD_TARGET} fds against a soft limit of {FD_SOFT_LIMIT}, "
            "holds them",
            _fd_leak,
            nofile=FD_SOFT_LIMIT,
        ),
        Demo(
            "cpu-pressure",
            "psi_saturation",
            "lx-cpupressure",
            12.0,
            f"2 x CPUs + {PRESSURE_EXTRA} busy children: more runnable tasks than CPUs, "
            "so the demo's cgroup waits (cpu pressure)",
            _cpu_pressure,
        ),
        Demo(
            "memory-pressure",
            "psi_saturation",
            "lx-mempressure",
            12.0,
            f"sets its cgroup's memory.high {MEMPRESSURE_HEADROOM_MB} MiB above its use and "
            f"keeps {MEMPRESSURE_OVER_MB} MiB more in use (needs --cgroup DIR with the memory "
            "controller; not in 'all')",
            _memory_pressure,
            in_all=False,
        ),
        Demo(
            "circuit-breaker",
            "circuit_breaker",
            "lx-breaker",
            25.0,
            f"2 x CPUs + {BREAKER_EXTRA} busy children for 25 s: the host saturated with "
            "cpu pressure, by one tree",
            _circuit_breaker,
        ),
    )
}


# ---- supervisor ----------------------------------------------------------------------


def _leader(demo: Demo, args: argparse.Namespace, supervisor: int) -> int:
    """Runs in the forked leader: own process group, comm, start line, workload."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # A session of its own: its own process group to kill, and its own scheduler autogroup,
    # so it competes for CPU as itself rather than inside its caller's share.
    os.setsid()
    _die_with_parent(supervisor)
    _set_comm(demo.comm)
    comm = Path("/proc/self/comm").read_text().strip()
    _say(
        f"demo {demo.name}: pid {os.getpid()} ({comm}) in cgroup {own_cgroup()}, "
        f"expecting rule {demo.rule}"
    )
    return demo.run(args)


def _reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def run_one(demo: Demo, args: argparse.Namespace) -> int:
    """Run one demo under supervision; its whole process group is gone when this returns."""
    supervisor = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    # Held back until the supervisor is inside its try: a stop can never orphan the leader.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    saved_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    if demo.nofile is not None:
        # Set before fork so no observer ever sees the leader with the old limit.
        hard = saved_nofile[1]
        soft = demo.nofile if hard == resource.RLIM_INFINITY else min(demo.nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # a workload that changes its cgroup's memory.high gets it put back by the supervisor too:
    # a leader throttled past its grace time is killed before its own `finally` runs
    high = _memory_high_file() if demo.name == "memory-pressure" else None
    saved_high = _read_text(high) if high is not None else None
    pid = os.fork()
    if pid == 0:
        code = EXIT_FAILURE
        try:
            code = _leader(demo, args, supervisor)
        except BaseException as exc:  # the leader must never return into the supervisor's stack
            print(f"demo {demo.name}: failed: {exc}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            os._exit(code)
    resource.setrlimit(resource.RLIMIT_NOFILE, saved_nofile)
    deadline = time.monotonic() + args.duration + EXIT_GRACE_S
    code = EXIT_FAILURE
    reaped = False
    # A pidfd turns readable when the leader exits: the supervisor waits without using any CPU,
    # so it never adds to the CPU of the tree it heads (runaway_tree must name the leader).
    pidfd = -1
    try:
        pidfd = os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            _, status = os.waitpid(pid, 0)
            reaped = True
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                code = 128 - code  # killed by signal -code
        else:
            print(
                f"demo {demo.name}: still running {EXIT_GRACE_S:g} s past its duration, killed",
                file=sys.stderr,
                flush=True,
            )
    finally:
        # Reap completely first; a stop that arrives meanwhile is taken afterwards.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        if pidfd >= 0:
            os.close(pidfd)
        if not reaped:
            os.kill(pid, signal.SIGKILL)  # the leader itself, in case it had not made its group yet
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap_all()
        if high is not None and saved_high is not None and _read_text(high) != saved_high:
            try:
                high.write_text(saved_high + "\n")
            except OSError as exc:
                print(f"demo {demo.name}: cannot put memory.high back: {exc}", file=sys.stderr)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    return code


def _memory_high_file() -> Path | None:
    mount = cgroup2_mount()
    path = own_cgroup()
    if mount is None or path == "/":
        return None
    high = Path(mount) / path.lstrip("/") / "memory.high"
    return high if high.is_file() else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _join_cgroup(path: str) -> int | None:
    """Move this process into an existing cgroup2 directory; an exit code on failure."""
    procs = Path(path) / "cgroup.procs"
    if not procs.is_file():
        print(
            f"linnixctl demo: --cgroup {path}: not a cgroup directory (no cgroup.procs)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        procs.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        code = EXIT_NOPERM if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_OSERR
        print(f"linnixctl demo: cannot join cgroup {path}: {exc.strerror}", file=sys.stderr)
        return code
    return None


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and the documented exit code."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="linnixctl demo",
        description="Run a bounded workload that trips one linnixd rule under the default policy.",
        epilog="Exit codes: 0 done, 64 bad usage, 71/77 cannot join the cgroup, 1 workload failed, "
        "128+N stopped by signal N.",
    )
    p.add_argument(
        "name", nargs="?", choices=[*DEMOS, "all"], help="which demo ('all' runs each in turn)"
    )
    p.add_argument("--list", action="store_true", help="list the demos with one-line descriptions")
    p.add_argument(
        "--duration", type=float, metavar="S", help="seconds of workload (default: per demo)"
    )
    p.add_argument("--cgroup", metavar="PATH", help="existing cgroup2 directory to move into first")
    p.add_argument(
        "--fast",
        action="store_true",
        help=f"memory-leak: grow {MEMLEAK_FAST_RATE_MB_S:g} MB/s, not {MEMLEAK_RATE_MB_S:g}",
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="MB_S",
        help="memory-leak: grow this many MB/s (0 < MB_S <= 100)",
    )
    return p


def main(argv: Sequence[str]) -> int:
    """Entry point of `linnixctl demo`."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error already printed as one line
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.list:
        for d in DEMOS.values():
            print(f"{d.name:<15} {d.description} ({d.duration_s:g} s, rule {d.rule})")
        return EXIT_OK
    if args.name is None:
        print("linnixctl demo: name a demo, or use --list", file=sys.stderr)
        return EXIT_USAGE
    if args.duration is not None and not 0 < args.duration <= 3600:
        print(
            f"linnixctl demo: --duration {args.duration:g}: must be within (0, 3600] seconds",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.rate is not None and not 0 < args.rate <= 100:
        print(
            f"linnixctl demo: --rate {args.rate:g}: must be within (0, 100] MB/s", file=sys.stderr
        )
        return EXIT_USAGE
    if args.cgroup is not None and (code := _join_cgroup(args.cgroup)) is not None:
        return code
    # Orphaned grandchildren come back to us, so the group can be reaped completely.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    chosen = [d for d in DEMOS.values() if d.in_all] if args.name == "all" else [DEMOS[args.name]]
    handlers = {sig: signal.signal(sig, _raise_stopped) for sig in _STOP_SIGNALS}
    try:
        for demo in chosen:
            one = argparse.Namespace(**vars(args))
            if args.duration is None:
                one.duration = demo.duration_s
            code = run_one(demo, one)
            if code != EXIT_OK:
                return code
        return EXIT_OK
    except _Stopped as stop:
        name = signal.Signals(stop.signum).name
        print(f"linnixctl demo: stopped by {name}, workload killed", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        _prctl(PR_SET_CHILD_SUBREAPER, 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
