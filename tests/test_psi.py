"""PsiReader deltas and kernel PSI triggers firing under real CPU pressure."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linnixd.collector.psi import PsiReader, PsiTriggers, parse_pressure

CPU_OLD = "some avg10=1.50 avg60=0.80 avg300=0.20 total=123456\n"
MEM = (
    "some avg10=12.25 avg60=3.00 avg300=1.00 total=5000000\n"
    "full avg10=4.00 avg60=1.00 avg300=0.50 total=2000000\n"
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_parse_without_full_line_gives_zero_full() -> None:
    assert parse_pressure(CPU_OLD) == (1.5, 0.0, 123456, 0)
    assert parse_pressure(MEM) == (12.25, 4.0, 5000000, 2000000)


def test_reader_turns_totals_into_interval_deltas(tmp_path: Path) -> None:
    clock = FakeClock()
    (tmp_path / "cpu").write_text(CPU_OLD)
    (tmp_path / "memory").write_text(MEM)
    r = PsiReader(root=str(tmp_path), clock=clock)
    first = r.system()
    assert set(first) == {"cpu", "memory"}  # io missing -> skipped
    assert first["memory"].some_stall_us == 0 and first["memory"].interval_s == 0.0
    clock.t += 0.5
    (tmp_path / "memory").write_text(
        MEM.replace("total=5000000", "total=5200000").replace("total=2000000", "total=2050000")
    )
    second = r.system()
    m = second["memory"]
    assert (m.some_stall_us, m.full_stall_us, m.interval_s) == (200000, 50000, 0.5)
    assert m.some_pct == pytest.approx(40.0)
    assert m.full_pct == pytest.approx(10.0)
    assert second["cpu"].full_stall_us == 0 and second["cpu"].some_stall_us == 0


def test_cgroup_files_that_vanish_are_skipped(tmp_path: Path) -> None:
    clock = FakeClock()
    cg = tmp_path / "foo.service"
    cg.mkdir()
    (cg / "cpu.pressure").write_text(CPU_OLD)
    (cg / "io.pressure").write_text(MEM)
    r = PsiReader(clock=clock)
    assert set(r.cgroup("/foo.service", str(cg))) == {"cpu", "io"}
    (cg / "io.pressure").unlink()
    clock.t += 1
    assert set(r.cgroup("/foo.service", str(cg))) == {"cpu"}
    r.forget([])
    assert r._prev == {}


def test_real_system_pressure_interval() -> None:
    r = PsiReader()
    r.system()
    time.sleep(0.3)
    s = r.system()
    assert set(s) == {"cpu", "io", "memory"}
    assert 0.28 <= s["cpu"].interval_s <= 1.0
    assert 0 <= s["cpu"].some_stall_us <= s["cpu"].interval_s * 1e6 * 1.05


def test_fallback_to_polling_when_open_fails() -> None:
    lines: list[str] = []
    t = PsiTriggers(["cpu", "io"], 40, 2.0, root="/nonexistent/pressure", log=lines.append)
    try:
        assert t.mode == "polling"
        assert "/nonexistent/pressure/cpu" in t.reason and "No such file" in t.reason
        assert len(lines) == 1 and "polling" in lines[0]
        assert t.drain() == []
    finally:
        t.close()


def test_threshold_and_window_follow_some_pct() -> None:
    t = PsiTriggers(["cpu"], 40, 2.0)
    try:
        assert t.mode == "triggers"
        assert (t.threshold_us, t.window_us) == (800_000, 2_000_000)
    finally:
        t.close()


BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_trigger_fires_under_real_cpu_pressure() -> None:
    # 5% of the window: 0.5 s is asked for; where the kernel only takes 2 s windows it is rounded
    t = PsiTriggers(["cpu"], 5, 0.5)
    assert t.mode == "triggers", t.reason
    assert t.window_us in (500_000, 2_000_000)
    t.drain()
    n = 2 * (os.cpu_count() or 1) + 2
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUSY.format(s=3.0)],
            preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        )
        for _ in range(n)
    ]
    try:
        deadline = time.monotonic() + 6.0
        fired: list[str] = []
        while not fired and time.monotonic() < deadline:
            ready, _, _ = select.select([t.fileno()], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                fired = t.drain()
        assert fired == ["cpu"]
        assert t.fired == 1
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        t.close()


def test_trigger_wakes_an_asyncio_reader_like_the_daemon() -> None:
    # the daemon's pattern: loop.add_reader(triggers.fileno(), ...) then drain()
    t = PsiTriggers(["cpu"], 5, 2.0)
    assert t.mode == "triggers", t.reason
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUSY.format(s=3.0)],
            preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        )
        for _ in range(2 * (os.cpu_count() or 1) + 2)
    ]

    async def wait_for_trigger() -> list[str]:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[list[str]] = loop.create_future()

        def on_readable() -> None:
            fired = t.drain()
            if fired and not got.done():
                got.set_result(fired)

        loop.add_reader(t.fileno(), on_readable)
        try:
            return await asyncio.wait_for(got, 6.0)
        finally:
            loop.remove_reader(t.fileno())

    try:
        assert asyncio.run(wait_for_trigger()) == ["cpu"]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        t.close()
