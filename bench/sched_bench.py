"""Cost of bpf/sched.c: stress-ng --switch throughput with and without it, paired and interleaved."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linnixd.collector.sched import SchedCollector

METRIC = re.compile(r"\]\s+switch\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
RUNQLAT = "runqlat-bpfcc"  # bcc's run-queue latency tool (package bpfcc-tools)
RUNQLAT_ATTACH_S = 8.0  # it compiles before it attaches
PROGS = {
    "sched_switch": b"tracepoint__sched__sched_switch",
    "sched_wakeup": b"tracepoint__sched__sched_wakeup",
    "sched_wakeup_new": b"tracepoint__sched__sched_wakeup_new",
}


def ctxt() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    raise RuntimeError("/proc/stat has no ctxt line")


def run_stress(seconds: int) -> tuple[float, int, float]:
    """(bogo ops/s, context switches host-wide, stress-ng cpu seconds) of one run."""
    before = ctxt()
    out = subprocess.run(
        ["stress-ng", "--switch", "2", "-t", str(seconds), "--metrics-brief"],
        capture_output=True,
        text=True,
        check=True,
    )
    switches = ctxt() - before
    m = METRIC.search(out.stdout + out.stderr)
    if m is None:
        raise RuntimeError("stress-ng printed no switch metrics line")
    ops, real_s, usr_s, sys_s = (
        int(m.group(1)),
        float(m.group(2)),
        float(m.group(3)),
        float(m.group(4)),
    )
    return ops / real_s, switches, usr_s + sys_s


def prog_cost(collector: SchedCollector, prog: bytes) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of one program from its fdinfo (needs bpf_stats)."""
    fd = collector._bpf.funcs[prog].fd
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
        if ":" in line
    )
    if "run_time_ns" not in fields:
        return None
    return int(fields["run_time_ns"]), int(fields["run_cnt"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument(
        "--tick", type=float, default=0.5, help="map read interval while attached, as the daemon"
    )
    ap.add_argument(
        "--cost-runs", type=int, default=5, help="short runs measured with kernel bpf_stats"
    )
    ap.add_argument("--cost-seconds", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("sched_bench: needs root (loads BPF)", file=sys.stderr)
        return 77
    ratios, added_ns, peer_ratios, off_ratios = [], [], [], []
    for i in range(args.pairs):
        a_ops, a_sw, a_cpu = run_stress(args.seconds)
        b_ops, b_sw, b_cpu = run_attached(args, attribute=True)
        d_ops, _, _ = run_attached(args, attribute=False)
        ratio = b_ops / a_ops
        extra = (b_cpu / b_sw - a_cpu / a_sw) * 1e9
        ratios.append(ratio)
        added_ns.append(extra)
        off_ratios.append(d_ops / a_ops)
        line = (
            f"pair {i + 1}: without {a_ops:,.0f} ops/s ({a_sw / args.seconds:,.0f} switches/s), "
            f"with {b_ops:,.0f} ops/s ({b_sw / args.seconds:,.0f} switches/s), ratio {ratio:.3f}, "
            f"stress-ng cpu per switch {extra:+.0f} ns; attribution off {d_ops:,.0f} ops/s, "
            f"ratio {d_ops / a_ops:.3f}"
        )
        if shutil.which(RUNQLAT):  # a peer on the same tracepoints, in the same interleaving
            peer = subprocess.Popen(
                [RUNQLAT, str(args.seconds + 30), "1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(RUNQLAT_ATTACH_S)
            try:
                c_ops, _, _ = run_stress(args.seconds)
            finally:
                peer.kill()
                peer.wait()
            peer_ratios.append(c_ops / a_ops)
            line += f"; runqlat {c_ops:,.0f} ops/s, ratio {c_ops / a_ops:.3f}"
        print(line, flush=True)
    print(
        f"throughput ratio (median of {len(ratios)} pairs): {statistics.median(ratios):.3f} (goal >= 0.95)"
    )
    print(
        "throughput ratio with stall attribution off (a host without CPU pressure, "
        f"daemon.stall_attribution: pressure; median): {statistics.median(off_ratios):.3f}"
    )
    if peer_ratios:
        print(
            f"peer reference, bcc's {RUNQLAT} (median of {len(peer_ratios)}): {statistics.median(peer_ratios):.3f}"
        )
    else:
        print(f"peer reference skipped: {RUNQLAT} not installed (apt-get install bpfcc-tools)")
    print(f"added stress-ng cpu per context switch (median): {statistics.median(added_ns):+.0f} ns")
    for attribute in (True, False):
        runs = program_run_ns(args.cost_runs, args.cost_seconds, attribute)
        for name, per in runs.items():
            print(
                f"{name} program run time, attribution {'on' if attribute else 'off'} "
                f"(kernel bpf_stats, median of {len(per)} runs): "
                f"{statistics.median(per):.0f} ns per run"
            )
    return 0


def run_attached(args: argparse.Namespace, attribute: bool) -> tuple[float, int, float]:
    """run_stress with bpf/sched.c attached and read every tick as the daemon reads it."""
    collector = SchedCollector()
    collector.start()
    collector.set_attribution(attribute)
    stop = threading.Event()

    def reader(c: SchedCollector = collector, stop: threading.Event = stop) -> None:
        cpu = c.task_cpu()
        while not stop.wait(args.tick):
            c.read(lambda cid: None)
            cpu.read()  # per-process CPU time, as the daemon reads it every tick

    t = threading.Thread(target=reader)
    t.start()
    try:
        return run_stress(args.seconds)
    finally:
        stop.set()
        t.join()
        collector.close()


def program_run_ns(runs: int, seconds: int, attribute: bool = True) -> dict[str, list[float]]:
    """Mean run time of each program per stress-ng run while attached, from kernel bpf_stats."""
    old = Path(STATS_SYSCTL).read_text().strip()
    Path(STATS_SYSCTL).write_text("1")  # host-wide setting: only for these runs, restored below
    collector = SchedCollector()
    out: dict[str, list[float]] = {name: [] for name in PROGS}
    try:
        collector.start()
        collector.set_attribution(attribute)
        for _ in range(runs):
            before = {name: prog_cost(collector, prog) for name, prog in PROGS.items()}
            run_stress(seconds)
            after = {name: prog_cost(collector, prog) for name, prog in PROGS.items()}
            for name in PROGS:
                b, a = before[name], after[name]
                if b is not None and a is not None and a[1] > b[1]:
                    out[name].append((a[0] - b[0]) / (a[1] - b[1]))
    finally:
        collector.close()
        Path(STATS_SYSCTL).write_text(old)
    return {name: per for name, per in out.items() if per}


if __name__ == "__main__":
    sys.exit(main())
