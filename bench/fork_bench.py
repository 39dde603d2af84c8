"""Fork-storm benchmark: what linnixd costs and how well it counts under `stress-ng --fork 2`.

Paired, interleaved runs (without, with, without, with, ...) of the same stress-ng load; the
daemon is started and ready before each "with" run. Prints, per pair and in summary: the
throughput ratio (median of with/without bogo ops/s), the daemon's CPU seconds per million
process creations, its fork count against /proc/stat's `processes` delta, the seconds from
storm start to the fork_storm alert, and its RSS (VmRSS, VmHWM). Figures, not pass/fail.
Run as root: /usr/bin/python3 bench/fork_bench.py [--pairs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from foreground import (  # noqa: E402  (tests/foreground.py, shared with the tests)
    ForegroundDaemon,
    proc_stat_processes,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
METRIC_RE = re.compile(r"metrc: \[\d+\] fork\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
GOALS = "goals: ratio >= 0.97, zero lost counts, alert <= 2.5 s after storm start, RSS <= 150 MB"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def stress(seconds: int) -> tuple[float, float]:
    """One stress-ng fork run: (epoch start, bogo ops/s over real time)."""
    start = time.time()
    res = subprocess.run(
        ["stress-ng", "--fork", "2", "-t", str(seconds), "--metrics-brief"],
        capture_output=True,
        text=True,
        check=False,
    )
    m = METRIC_RE.search(res.stdout + res.stderr)
    if res.returncode != 0 or m is None:
        tail = (res.stderr or res.stdout).strip()[-300:]
        raise RuntimeError(f"stress-ng failed (exit {res.returncode}): {tail}")
    return start, float(m[5])


def counted(stats: dict[str, Any]) -> int:
    """Every task creation the daemon counted: processes plus threads (what /proc/stat counts)."""
    totals = stats["totals"]
    return int(totals["forks"]) + int(totals["threads"])


@dataclass
class WithRun:
    ops_s: float
    cpu_s: float
    processes: int  # /proc/stat delta over the stress run
    count_error: int  # how far the daemon's count lies outside what /proc/stat allows (0 = agrees)
    count_slack: int  # width of that allowed range: forks elsewhere while the tick was unknown
    lost: int  # dropped_events + aggregation_overflows reported by the daemon
    alert_s: float | None
    rss_kb: int
    hwm_kb: int


def run_with(seconds: int, settle_s: float) -> WithRun:
    d = ForegroundDaemon()
    try:
        d.wait_ready()
        low0, s0, high0 = d.bracket(settle_s)
        p0 = proc_stat_processes()
        c0 = cpu_seconds(d.proc.pid)
        start, ops = stress(seconds)
        c1 = cpu_seconds(d.proc.pid)
        p1 = proc_stat_processes()
        low1, s1, high1 = d.bracket(settle_s)
        rss, hwm = status_kb(d.proc.pid, "VmRSS"), status_kb(d.proc.pid, "VmHWM")
        storm = [
            a
            for a in d.alerts
            if a.get("rule") == "fork_storm"
            and a.get("state") == "firing"
            and float(a["ts"]) >= start
        ]
        alert_s = min(float(a["ts"]) for a in storm) - start if storm else None
        counted_delta = counted(s1) - counted(s0)
        least, most = low1 - high0, high1 - low0
        error = counted_delta - most if counted_delta > most else min(0, counted_delta - least)
        counters = s1["counters"]
        return WithRun(
            ops_s=ops,
            cpu_s=c1 - c0,
            processes=p1 - p0,
            count_error=error,
            count_slack=most - least,
            lost=int(counters["dropped_events"]) + int(counters["aggregation_overflows"]),
            alert_s=alert_s,
            rss_kb=rss,
            hwm_kb=hwm,
        )
    finally:
        d.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5, help="with/without pairs (default 5)")
    p.add_argument("--seconds", type=int, default=10, help="stress-ng run length (default 10)")
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds bracketing each counter read (>= a tick)"
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("fork_bench: must run as root (linnixd loads BPF)", file=sys.stderr)
        return 77
    if args.pairs < 1 or args.seconds < 2:
        print("fork_bench: need --pairs >= 1 and --seconds >= 2", file=sys.stderr)
        return 64
    ratios: list[float] = []
    runs: list[WithRun] = []
    print(
        "pair  without_ops/s  with_ops/s  ratio  daemon_cpu_s  processes  count_err(slack)  "
        "lost  alert_s  rss_MB  hwm_MB"
    )
    for i in range(args.pairs):
        _, base = stress(args.seconds)
        w = run_with(args.seconds, args.settle)
        ratios.append(w.ops_s / base)
        runs.append(w)
        alert = f"{w.alert_s:7.2f}" if w.alert_s is not None else "   none"
        print(
            f"{i + 1:4d}  {base:13.0f}  {w.ops_s:10.0f}  {ratios[-1]:5.3f}  {w.cpu_s:12.2f}  "
            f"{w.processes:9d}  {w.count_error:9d}({w.count_slack:5d})  {w.lost:4d}  {alert}  "
            f"{w.rss_kb / 1024:6.1f}  {w.hwm_kb / 1024:6.1f}",
            flush=True,
        )
    events = sum(r.processes for r in runs)
    alerts = [r.alert_s for r in runs if r.alert_s is not None]
    print()
    print(
        f"throughput ratio (median with/without): {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    per_million = sum(r.cpu_s for r in runs) / events * 1e6
    print(f"daemon CPU per million process creations: {per_million:.2f} s")
    print(
        f"fork count error vs /proc/stat: {sum(abs(r.count_error) for r in runs)} of {events} "
        f"outside the bracket (per run {[r.count_error for r in runs]}, bracket widths "
        f"{[r.count_slack for r in runs]}); daemon-reported lost: {sum(r.lost for r in runs)}"
    )
    print(
        f"storm start to fork_storm alert: median {statistics.median(alerts):.2f} s, "
        f"max {max(alerts):.2f} s"
        if alerts
        else "storm start to fork_storm alert: NO ALERT"
    )
    print(
        f"daemon RSS after the storm: max {max(r.rss_kb for r in runs) / 1024:.1f} MB, "
        f"peak VmHWM {max(r.hwm_kb for r in runs) / 1024:.1f} MB"
    )
    print(GOALS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
