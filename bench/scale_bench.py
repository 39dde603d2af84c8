"""Daemon cost against the number of processes and cgroups: kernel CPU source vs the /proc scan.

For each scenario (idle with 0, 2,000 and 10,000 extra sleeping processes; 2,000 extra cgroups
each holding one sleeping process; `stress-ng --fork 2`) the daemon runs with the default
policy twice per round, interleaved: "kernel" (per-process CPU from bpf/sched.c, only what ran
is read) and "scan" (--no-sched: every process read from /proc every tick, the old way and
today's fallback). Prints per mode the median over rounds of: the daemon's CPU (utime+stime of
its own process over the measured seconds, % of one CPU), VmRSS, tick cost p50/p99, and under
the fork load its CPU seconds per million process creations. Figures, never pass/fail.

Run as root: /usr/bin/python3 bench/scale_bench.py [--rounds 3] [--seconds 30] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOALS = {"idle": 0.3, "idle-2000": 0.5, "idle-10000": 1.5}
SLEEPER = "import signal\nwhile True: signal.pause()\n"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def forks() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    raise RuntimeError("/proc/stat has no processes line")


@contextmanager
def sleepers(n: int, cgroups: bool = False) -> Iterator[None]:
    """n sleeping processes (forked from one parent); with cgroups, each in its own cgroup."""
    if n == 0:
        yield
        return
    mount = None
    if cgroups:
        sys.path.insert(0, str(ROOT))
        from linnixd.collector.cgroups import cgroup2_mount

        mount = cgroup2_mount()
        if mount is None:
            raise RuntimeError("no cgroup2 mount for the cgroup scenario")
    base = f"{mount}/linnixd-bench-{os.getpid()}" if mount else None
    if base:
        os.mkdir(base)
    pids: list[int] = []
    try:
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    while True:
                        signal.pause()
                finally:
                    os._exit(0)
            pids.append(pid)
            if base:
                d = f"{base}/c{i}"
                os.mkdir(d)
                with open(f"{d}/cgroup.procs", "w") as f:
                    f.write(str(pid))
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
        if base:
            for i in range(len(pids)):
                try:
                    os.rmdir(f"{base}/c{i}")
                except OSError:
                    pass
            os.rmdir(base)


def run_daemon(mode: str, seconds: float, load: list[str] | None) -> dict[str, Any]:
    """One measured run: start, wait for ready and 5 s of settling, measure, stop with stats."""
    args = [
        PYTHON,
        "-m",
        "linnixd",
        "--foreground",
        "--bus",
        "none",
        "--no-journal",
        "--stats-on-exit",
    ]
    if mode == "scan":
        args.append("--no-sched")
    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read back after the daemon exits)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            err.seek(0)
            if "ready:" in err.read():
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                err.seek(0)
                raise RuntimeError(f"linnixd did not become ready: {err.read()[-500:]}")
            time.sleep(0.2)
        time.sleep(5)
        loader = (
            subprocess.Popen(load, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if load
            else None
        )
        time.sleep(1 if loader else 0)
        c0, t0, f0 = cpu_s(proc.pid), time.monotonic(), forks()
        time.sleep(seconds)
        c1, t1, f1 = cpu_s(proc.pid), time.monotonic(), forks()
        if loader is not None:
            loader.send_signal(signal.SIGINT)
            loader.wait()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.seek(0)
    stats: dict[str, Any] = {}
    for line in err.read().splitlines():
        if line.startswith('{"stats"'):
            stats = json.loads(line)["stats"]
    cpu = c1 - c0
    out = {
        "cpu_pct": 100.0 * cpu / (t1 - t0),
        "rss_mb": stats.get("rss_kb", 0) / 1024,
        "p50_ms": stats.get("tick_p50_ms", 0.0),
        "p99_ms": stats.get("tick_p99_ms", 0.0),
        "processes": stats.get("processes", 0),
    }
    if load:
        out["cpu_s_per_m"] = cpu / max(1, f1 - f0) * 1e6
        out["forks_per_s"] = (f1 - f0) / (t1 - t0)
    return out


SCENARIOS = {
    "idle": (0, False, None),
    "idle-2000": (2000, False, None),
    "idle-10000": (10000, False, None),
    "cgroups-2000": (2000, True, None),
    "fork-storm": (0, False, ["stress-ng", "--fork", "2", "-t", "3600"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("scale_bench: run as root (BPF, cgroups)", file=sys.stderr)
        return 77
    names = args.only or list(SCENARIOS)
    print(
        f"{args.rounds} rounds x {args.seconds:g} s per mode, interleaved (kernel, scan, kernel, ...); medians"
    )
    print(
        "| scenario | mode | daemon CPU % | goal | RSS MB | tick p50 ms | tick p99 ms | CPU s per M forks | processes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        n, cg, load = SCENARIOS[name]
        runs: dict[str, list[dict[str, Any]]] = {"kernel": [], "scan": []}
        with sleepers(n, cg):
            for _ in range(args.rounds):
                for mode in ("kernel", "scan"):
                    runs[mode].append(run_daemon(mode, args.seconds, load))
        for mode, rs in runs.items():

            def med(key: str, rs: list[dict[str, float]] = rs) -> float:
                return statistics.median(r.get(key, 0.0) for r in rs)

            per_m = f"{med('cpu_s_per_m'):.2f}" if load else ""
            each = ", ".join(f"{r['cpu_pct']:.2f}" for r in rs)
            goal = f"<= {GOALS[name]}" if name in GOALS and mode == "kernel" else ""
            print(
                f"| {name} | {mode} | {med('cpu_pct'):.2f} ({each}) | {goal} "
                f"| {med('rss_mb'):.0f} | {med('p50_ms'):.1f} | {med('p99_ms'):.1f} | {per_m} | {med('processes'):.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
