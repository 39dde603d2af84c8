"""Sandbox probe: bcc compiles, attaches a tracepoint and counts 20 forks; prints one JSON line."""

from __future__ import annotations

import json
import os

from bcc import BPF

# Helpers only (no kernel struct reads): count forks whose parent is this process.
PROGRAM = """
BPF_ARRAY(forks, u64, 1);
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != TARGET_TGID)
        return 0;
    int zero = 0;
    u64 *n = forks.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""
FORKS = 20


def main() -> None:
    bpf = BPF(text=PROGRAM, cflags=[f"-DTARGET_TGID={os.getpid()}"])
    for _ in range(FORKS):
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
    counted = int(bpf["forks"][0].value)
    try:
        pid1_fds = len(os.listdir("/proc/1/fd"))
    except OSError as exc:
        pid1_fds = -exc.errno
    with open("/proc/self/status") as fh:
        status = dict(line.split(":\t", 1) for line in fh.read().splitlines() if ":\t" in line)
    print(
        json.dumps(
            {
                "forks_made": FORKS,
                "forks_counted": counted,
                "pid1_fds": pid1_fds,
                "uid": os.getuid(),
                "cap_eff": status["CapEff"].strip(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
