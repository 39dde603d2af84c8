"""What an incident snapshot costs the tick, on a host with ~2,000 extra processes.

Builds the daemon's own host model on the real /proc (the /proc-scan mode: no BPF needed),
with N extra processes: one launcher `sh` with N sleeping children (the worst tree for the
snapshot: it walks the model for the subtree and reads at most TREE_READ of them from
/proc). Ticks the model to fill a window like the daemon's, then times Triage's capture for
(a) the launcher of N children, (b) one sleeping child (a tree of one), against the tick
itself (model.snapshot). Prints medians and maxima over --repeat captures; never pass/fail.

Run: /usr/bin/python3 bench/triage_bench.py [--processes 2000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from linnixd.hostmodel import HostModel  # noqa: E402
from linnixd.model import Alert, Culprit  # noqa: E402
from linnixd.triage import Triage, encode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--ticks", type=int, default=20, help="snapshots in the window (0.5 s apart)")
    args = ap.parse_args()

    launcher = subprocess.Popen(
        ["/bin/sh", "-c", f"for i in $(seq {args.processes}); do sleep 3600 & done; echo up; wait"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert launcher.stdout is not None and launcher.stdout.readline().strip() == "up"
        model = HostModel(max_processes=50_000, max_cgroups=10_000)
        model.seed()
        window = []
        tick_ms = []
        for _ in range(args.ticks):
            time.sleep(0.5)
            t0 = time.perf_counter()
            window.append(model.snapshot(None, time.monotonic(), time.time(), None))
            tick_ms.append((time.perf_counter() - t0) * 1000)
        newest = window[-1]
        children = sorted(p.pid for p in newest.processes.values() if p.ppid == launcher.pid)
        print(
            f"processes in the model: {len(newest.processes)}; launcher children: {len(children)}"
        )
        for name, pid in (("launcher of all", launcher.pid), ("one sleeper", children[0])):
            costs, sizes = [], []
            for n in range(args.repeat):
                triage = Triage()
                p = newest.processes[pid]
                alert = Alert(
                    id=f"a{n}",
                    incident=f"i{n}",
                    rule="runaway_tree",
                    severity="warning",
                    state="firing",
                    ts=time.time(),
                    summary="bench",
                    culprit=Culprit(
                        kind="tree", pid=pid, comm=p.comm, cgroup=p.cgroup, root_pid=pid
                    ),
                    evidence={"subtree_cpu_pct": 1.0},
                )
                t0 = time.perf_counter()
                triage.on_alert(alert, window)
                costs.append((time.perf_counter() - t0) * 1000)
                snap, _ = triage.lookup(alert.incident)  # type: ignore[misc]
                sizes.append(len(encode(snap).encode()))
            print(
                f"capture, culprit = {name}: median {statistics.median(costs):.1f} ms, "
                f"max {max(costs):.1f} ms; snapshot {statistics.median(sizes) / 1024:.1f} KiB; "
                f"tree total {snap['tree']['total']}, read {snap['tree']['read']}"
            )
        print(
            f"tick (model.snapshot, /proc scan mode): median {statistics.median(tick_ms):.1f} ms, "
            f"max {max(tick_ms):.1f} ms"
        )
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # its own session: the launcher and its sleepers
        launcher.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
