"""Cost of bpf/net.c: loopback TCP connection throughput with and without it, paired and interleaved.

Each run starts a server (accept, close) and CLIENTS processes that connect and close as fast
as they can for SECONDS (tests/netload.py). "with" runs attach bpf/net.c through NetCollector
and read it every 0.5 s as the daemon's tick does; "without" runs attach nothing. Pairs
alternate their order (A B, B A, ...). Printed: connections/s per run, the with/without ratio
per pair and its median, the kernel's count against what the clients did (must match), and,
from a last run with kernel.bpf_stats_enabled, the programs' ns per run and per connection.
Run as root. Figures only: it never passes or fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from linnixd.collector.net import NetCollector  # noqa: E402  (after the path insert)

NETLOAD = str(ROOT / "tests" / "netload.py")
PYTHON = "/usr/bin/python3"
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
TICK_S = 0.5
PROGS = {
    "inet_sock_set_state": b"tracepoint__sock__inet_sock_set_state",
    "tcp_retransmit_skb": b"tcp_retransmit_skb",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_load(clients: int, seconds: float, pids: list[int] | None = None) -> int:
    """Connections the clients made in `seconds` (all of them opened and closed); their pids
    are added to `pids`."""
    port = free_port()
    server = subprocess.Popen(
        [PYTHON, NETLOAD, "serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        procs = [
            subprocess.Popen(
                [PYTHON, NETLOAD, "churn", str(port), "0", str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(clients)
        ]
        if pids is not None:
            pids.extend(p.pid for p in procs)
        total = 0
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 60)
            total += int(out.split()[1])
        return total
    finally:
        server.kill()
        server.wait()


class Ticker:
    """Reads the collector every TICK_S on a thread, as the daemon's tick would; sums connects."""

    def __init__(self, col: NetCollector) -> None:
        self.col = col
        self.by_tgid: dict[int, int] = {}
        self.read_s = 0.0
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(TICK_S):
            self._read()

    def _read(self) -> None:
        t0 = time.thread_time()
        tick = self.col.read()
        self.read_s += time.thread_time() - t0
        self.reads += 1
        for tgid, counts in tick.by_tgid.items():
            self.by_tgid[tgid] = self.by_tgid.get(tgid, 0) + counts.connects

    def __enter__(self) -> Ticker:
        self.col.read()  # baseline: everything since attach
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()
        time.sleep(0.2)  # the last closes' softirq work
        self._read()


def with_net(clients: int, seconds: float) -> tuple[int, int, Ticker, NetCollector]:
    """(connections the clients made, connections the kernel counted for them, ...)."""
    col = NetCollector()
    col.start()
    pids: list[int] = []
    try:
        with Ticker(col) as ticker:
            done = run_load(clients, seconds, pids)
    except BaseException:
        col.close()
        raise
    return done, sum(ticker.by_tgid.get(p, 0) for p in pids), ticker, col


def prog_stats(col: NetCollector, prog: bytes) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of one program from its fdinfo (needs bpf_stats)."""
    funcs = col._bpf.funcs
    name = next((n for n in funcs if n.endswith(prog)), None)
    if name is None:
        return 0, 0
    fields = {}
    for line in Path(f"/proc/self/fdinfo/{funcs[name].fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("net_bench: needs root (loads BPF)", file=sys.stderr)
        return 77
    ratios = []
    mismatches = 0
    read_ms = []
    for i in range(args.pairs):
        order = ("with", "without") if i % 2 == 0 else ("without", "with")
        rates: dict[str, float] = {}
        for mode in order:
            if mode == "with":
                done, counted_n, ticker, col = with_net(args.clients, args.seconds)
                col.close()
                if counted_n != done:
                    mismatches += 1
                read_ms.append(1000 * ticker.read_s / max(1, ticker.reads))
                counted = f"(made {done}, kernel counted {counted_n} for the clients)"
            else:
                done = run_load(args.clients, args.seconds)
                counted = ""
            rates[mode] = done / args.seconds
            print(f"pair {i + 1} {mode:>7}: {rates[mode]:8.0f} connections/s {counted}", flush=True)
        ratios.append(rates["with"] / rates["without"])
        print(f"pair {i + 1} ratio with/without: {ratios[-1]:.3f}", flush=True)
    print(f"median ratio with/without: {statistics.median(ratios):.3f} (goal >= 0.97)")
    print(f"pairs: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"runs where the kernel's connect count differed from the clients': {mismatches}")
    print(
        f"collector read per tick, CPU ms (median of runs' means): {statistics.median(read_ms):.2f}"
    )

    # kernel cost per program run, from a separate run with bpf_stats on
    old = Path(STATS_SYSCTL).read_text().strip()
    Path(STATS_SYSCTL).write_text("1")
    try:
        done, _counted, _ticker, col = with_net(args.clients, args.seconds)
        total_ns = 0
        for label, prog in PROGS.items():
            ns, cnt = prog_stats(col, prog)
            total_ns += ns
            per = ns / cnt if cnt else 0.0
            print(f"{label}: {cnt} runs, {per:.0f} ns per run")
        col.close()
        print(f"kernel time per connection (both ends): {total_ns / max(1, done):.0f} ns")
    finally:
        Path(STATS_SYSCTL).write_text(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
