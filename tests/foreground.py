"""linnixd --foreground --output json as a subprocess, for tests/test_integration.py and
bench/fork_bench.py: alerts from stdout, stats (SIGUSR1, exit) and log lines from stderr."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
READY_TIMEOUT_S = 120.0  # bcc compiles at start-up; slow when the shared host is busy


def proc_stat_processes() -> int:
    """Tasks created since boot (/proc/stat `processes`): what the daemon's fork counts answer to."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    raise RuntimeError("no processes line in /proc/stat")


class ForegroundDaemon:
    """linnixd --foreground --output json; alerts and stats collected by threads."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "linnixd",
                "--foreground",
                "--output",
                "json",
                "--stats-on-exit",
                "--policy",
                str(ROOT / "policy" / "rules.yaml"),
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.alerts: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.stats: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[str] = []
        self.ready = threading.Event()
        self.threads = [
            threading.Thread(target=self._stdout, daemon=True),
            threading.Thread(target=self._stderr, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                try:
                    self.alerts.append(json.loads(line))
                except json.JSONDecodeError:
                    self.log.append("stdout: " + line.rstrip())
                self.changed.notify_all()

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip()
            if line.startswith('{"stats"'):
                self.stats.put(json.loads(line)["stats"])
                continue
            self.log.append(line)
            if line.startswith("linnixd: ready"):
                self.ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("linnixd did not become ready:\n" + "\n".join(self.log[-10:]))

    def wait_alert(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for alert in self.alerts:
                    if match(alert):
                        return alert
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    seen = [(a.get("rule"), a.get("pid"), a.get("cgroup")) for a in self.alerts]
                    raise AssertionError(
                        f"no {what} alert within {timeout:g} s; alerts seen: {seen}; "
                        f"daemon log tail: {self.log[-5:]}"
                    )
                self.changed.wait(min(left, 0.5))

    def snapshot(self) -> dict[str, Any]:
        """The daemon's counters now (SIGUSR1 makes it print them)."""
        self.proc.send_signal(signal.SIGUSR1)
        return self.stats.get(timeout=10)

    def bracket(self, settle_s: float = 1.0) -> tuple[int, dict[str, Any], int]:
        """The daemon's counters between two /proc/stat reads: they were read at a tick inside
        that span (`settle_s` at least one tick, 0.5 s)."""
        low = proc_stat_processes()
        time.sleep(settle_s)
        snap = self.snapshot()
        return low, snap, proc_stat_processes()

    def stop(self) -> int:
        """SIGTERM, wait (kill after 20 s); its exit code. The exit stats land in `stats`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self.threads:
            t.join(timeout=5)
        return self.proc.returncode
