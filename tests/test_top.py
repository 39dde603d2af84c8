"""linnixctl top: the rendering (pure) and the live view in a real terminal (tmux) over a real bus.

The live test runs linnixctl in a tmux pane against linnixd's real bus layer (BusService on a
private dbus-daemon) serving a core whose rows change on every call, so a refresh shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_bus import PYTHON, CoreDouble, PrivateBus, private_bus  # noqa: F401  (fixture)

from linnixd.bus import serve
from linnixd.top import COLUMNS, FETCH_ROWS, View, fit_label, render, select_rows

ROOT = Path(__file__).resolve().parent.parent
POD_SCOPE = "cri-containerd-" + "0123456789abcdef" * 4 + ".scope"
POD_PATH = (
    "/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod0f3a9c1e_7d4b_4c2e_9a51_1b2c3d4e5f60.slice/" + POD_SCOPE
)


def rows(calls: int = 1) -> list[dict[str, Any]]:
    """Three cgroups, each first by a different key; `calls` shows up in batch's CPU%."""
    return [
        {
            "path": POD_PATH,
            "unit": POD_SCOPE,
            "cpu_some_pct": 12.5,
            "io_some_pct": 0.0,
            "memory_some_pct": 1.0,
            "cpu_pct": 95.0,
            "memory_bytes": 200 << 20,
            "stall_caused_ms": 420.0,
            "stall_suffered_ms": 0.0,
            "runq_wait_ms": 3.0,
        },
        {
            "path": "/system.slice/batch.service",
            "unit": "batch.service",
            "cpu_some_pct": 40.0,
            "io_some_pct": 0.0,
            "memory_some_pct": 0.0,
            "cpu_pct": float(calls),
            "memory_bytes": 5 << 20,
            "stall_caused_ms": 1.0,
            "stall_suffered_ms": 300.0,
            "runq_wait_ms": 30.0,
        },
        {
            "path": "/user.slice/user-1000.slice/session-3.scope/build/a/very/deep/child",
            "unit": "session-3.scope",
            "cpu_some_pct": 1.0,
            "io_some_pct": 55.0,
            "memory_some_pct": 0.0,
            "cpu_pct": 2.0,
            "memory_bytes": 900 << 20,
            "stall_caused_ms": 0.0,
            "stall_suffered_ms": 2.0,
            "runq_wait_ms": 0.0,
        },
    ]


def order(sort: str, unit_filter: str = "") -> list[str]:
    return [r["unit"] for r in select_rows(rows(), sort, unit_filter)]


def test_each_key_sorts_by_its_own_number() -> None:
    batch, pod, session = "batch.service", POD_SCOPE, "session-3.scope"
    assert order("pressure") == [session, batch, pod]  # io 55 > cpu 40 > cpu 12.5
    assert order("caused") == [pod, batch, session]
    assert order("suffered") == [batch, session, pod]
    assert order("cpu") == [pod, session, batch]
    assert order("memory") == [session, pod, batch]
    assert order("cpu", "BATCH") == [batch]  # the unit filter ignores case
    assert order("cpu", "nothing") == []


def test_screen_fits_80_and_200_columns_and_keeps_names_whole() -> None:
    for width in (80, 200):
        screen = render(rows(), View(sort="pressure"), width, 12, "12:00:00")
        assert len(screen) == 12 and all(len(line) <= width for line in screen)
        assert screen[0].startswith("linnixd top  12:00:00  sort: pressure  all units  3/3")
        assert screen[-1].startswith("p pressure  c caused  s suffered  u CPU  m memory")
    narrow = render(rows(), View(sort="caused"), 80, 12, "12:00:00")
    # 80 columns: the numbers of the sort stay, lower-priority columns give way
    assert narrow[1].split() == [
        "CPU_PSI%",
        "CPU%",
        "MEM_MB",
        "CAUSED_MS",
        "SUFFERED_MS",
        "CGROUP",
        "(UNIT)",
    ]
    assert narrow[2].split()[:5] == ["12.5", "95.0", "200.0", "420.0", "0.0"]
    wide = render(rows(), View(sort="caused"), 200, 12, "12:00:00")
    assert wide[1].split()[: len(COLUMNS)] == [c.header for c in COLUMNS]
    # 200 columns: the pod's path loses its middle, the unit (last component) stays whole
    label = wide[2].split("  ")[-1]
    assert label.startswith("/kubepods.slice/kubep") and label.endswith("/" + POD_SCOPE)
    assert "..." in label and len(wide[2]) == 200
    # a unit that is not the path's last component follows the path, whole
    session = next(line for line in narrow if "session-3.scope" in line)
    assert session.endswith("... (session-3.scope)")


def test_label_shortens_the_middle_only() -> None:
    row = {"path": "/a.slice/b.slice/c.slice/d.service", "unit": "d.service"}
    assert fit_label(row, 40) == "/a.slice/b.slice/c.slice/d.service"
    assert fit_label(row, 25) == "/a.slice/b.s.../d.service"
    assert fit_label(row, 12) == "...d.service"
    assert fit_label(row, 9) == "d.service"
    assert fit_label(row, 8) == "d.ser..."
    deep = {"path": "/x.slice/y/z/deep", "unit": "x.slice"}
    assert fit_label(deep, 80) == "/x.slice/y/z/deep (x.slice)"
    assert fit_label({"path": "/", "unit": "/"}, 80) == "/"
    # pod and container names replace the runtime's scope name, and stay whole
    pod = {"path": POD_PATH, "unit": POD_SCOPE, "pod": "api-7d9f", "namespace": "shop"}
    pod["container"] = "api"
    assert fit_label(pod, 300) == POD_PATH + " (pod shop/api-7d9f, container api)"
    assert fit_label(pod, 60) == "/kubepods.slice/kubepo... (pod shop/api-7d9f, container api)"


def test_filter_keys_and_quit() -> None:
    view = View()
    for ch in b"c/bat":
        assert view.key(ch)
    assert view.sort == "caused" and view.editing == "bat" and view.unit_filter == ""
    assert view.key(10) and view.unit_filter == "bat" and view.editing is None
    assert view.key(ord("/")) and view.key(127) and view.key(27) and view.unit_filter == "bat"
    assert not view.key(ord("q"))


# ---- live, in tmux ------------------------------------------------------------------------


class ChangingCore(CoreDouble):
    """The bus test core, with top rows whose batch.service CPU% counts the calls."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.top_calls = 0
        self.limits: list[int] = []

    def top_cgroups(self, limit: int = 10) -> list[dict[str, Any]]:
        self.top_calls += 1
        self.limits.append(limit)
        return rows(self.top_calls)[:limit]


class Served:
    """BusService for a core on the private bus, on its own event loop thread."""

    def __init__(self, core: Any, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = asyncio.run_coroutine_threadsafe(serve(core, address), self.loop).result(30)

    def close(self) -> None:
        async def shutdown() -> None:
            self.service.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Pane:
    """linnixctl in a detached tmux session of a given size, on its own tmux server socket."""

    def __init__(
        self, socket: Path, argv: list[str], width: int, height: int, term: str = "xterm-256color"
    ) -> None:
        self.base = ["tmux", "-S", str(socket)]
        self.status = socket.with_name("exit-status")
        env = f"PYTHONPATH={ROOT} TERM={term}"
        # the shell records linnixctl's exit status, then waits so the screen can be read
        command = f"cd {ROOT} && env {env} {' '.join(argv)}; echo $? > {self.status}; sleep 30"
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "top", command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "top").splitlines()

    def wait(self, what: str, pred: Any, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if pred(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {what} within {timeout:g} s; screen:\n" + "\n".join(lines)
                )
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def dead(self) -> str | None:
        """linnixctl's exit status once it has exited, else None."""
        return self.status.read_text().strip() if self.status.exists() else None

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def cpu_of_batch(lines: list[str]) -> float | None:
    column = lines[1].split().index("CPU%") if len(lines) > 1 and "CPU%" in lines[1] else None
    for line in lines:
        if column is not None and line.rstrip().endswith("/system.slice/batch.service"):
            return float(line.split()[column])
    return None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/setup-host installs it)")
def test_live_view_refreshes_sorts_filters_fits_and_quits(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    core = ChangingCore(tmp_path)
    served = Served(core, private_bus.address)
    pane = Pane(
        tmp_path / "tmux.sock",
        [PYTHON, "-m", "linnixd.ctl", "--bus", private_bus.address, "top"],
        80,
        24,
    )
    try:
        first = pane.wait("the rows", lambda s: any("batch.service" in line for line in s))
        # sorted by pressure: all three PSI columns stay, the stall columns give way at 80
        assert first[1].split() == [
            "CPU_PSI%",
            "IO_PSI%",
            "MEM_PSI%",
            "CPU%",
            "MEM_MB",
            "CGROUP",
            "(UNIT)",
        ]
        assert all(len(line) <= 80 for line in first)
        session, batch, pod = first[2:5]
        assert session.split()[:3] == ["1.0", "55.0", "0.0"]
        assert session.endswith("... (session-3.scope)")
        assert session.split()[5].startswith("/user.slice/")
        assert batch.split()[:3] == ["40.0", "0.0", "0.0"]
        assert batch.split()[4:] == ["5.0", "/system.slice/batch.service"]
        assert pod.split()[5].startswith("cri-containerd-0123456789abcdef") and pod.endswith("...")

        # refresh: batch.service's CPU% is the number of TopCgroups calls, once a second
        seen = cpu_of_batch(first)
        assert seen is not None
        later = pane.wait("a refresh", lambda s: (cpu_of_batch(s) or 0) >= seen + 2)
        assert core.limits and set(core.limits) == {FETCH_ROWS}

        pane.keys("c")  # stall caused: the pod first, with its 420 ms
        caused = pane.wait("sort by stall caused", lambda s: "sort: stall caused" in s[0])
        assert caused[2].split()[3] == "420.0" and caused[2].rstrip().endswith("...")
        pane.keys("s")
        suffered = pane.wait("sort by stall suffered", lambda s: "sort: stall suffered" in s[0])
        assert suffered[2].rstrip().endswith("/system.slice/batch.service")
        assert suffered[2].split()[4] == "300.0"

        pane.keys("/", "session", "Enter")
        only = pane.wait("the unit filter", lambda s: "unit ~ 'session'" in s[0])
        assert "1/3 cgroups" in only[0]
        assert [
            line for line in only[2:] if line.strip() and not line.startswith("p pressure")
        ] == [only[2]] and only[2].endswith("(session-3.scope)")
        pane.keys(
            "/", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "Enter"
        )
        pane.wait("the filter cleared", lambda s: "all units  3/3 cgroups" in s[0])

        pane.tmux("resize-window", "-t", "top", "-x", "200", "-y", "30")
        wide = pane.wait("200 columns", lambda s: any("RUNQ_MS" in line for line in s))
        assert wide[1].split()[: len(COLUMNS)] == [c.header for c in COLUMNS]
        assert all(len(line) <= 200 for line in wide)
        pod_line = next(line for line in wide if POD_SCOPE in line)
        assert "/kubepods.slice/kubep" in pod_line and "..." in pod_line
        assert len(pod_line.rstrip()) == 200 or len(pod_line.rstrip()) == 199
        after_resize = core.top_calls

        pane.keys("q")
        deadline = time.monotonic() + 15
        while pane.dead() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pane.dead() == "0", pane.screen()
        assert core.top_calls >= after_resize
        del later
    finally:
        pane.kill()
        served.close()


def test_not_a_terminal_prints_once(private_bus: PrivateBus, tmp_path: Path) -> None:
    core = ChangingCore(tmp_path)
    served = Served(core, private_bus.address)
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [
                PYTHON,
                "-m",
                "linnixd.ctl",
                "--bus",
                private_bus.address,
                "top",
                "--sort",
                "memory",
                "--limit",
                "2",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        served.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[: len(COLUMNS)] == [c.header for c in COLUMNS]
    # whole paths when printed once, memory order, two rows, then the stall table
    assert lines[1].endswith(
        "/user.slice/user-1000.slice/session-3.scope/build/a/very/deep/child (session-3.scope)"
    )
    assert lines[2].endswith(POD_PATH)
    assert lines[3] == "" and lines[4].split()[:2] == ["STALL_MS", "SHARE"]
    assert core.top_calls == 1


def test_network_columns_sort_and_show_a_dash_without_bpf_net() -> None:
    busy = {"path": "/system.slice/api.service", "connects_per_s": 950.0, "retransmits_per_s": 3.5}
    lossy = {"path": "/system.slice/db.service", "connects_per_s": 2.0, "retransmits_per_s": 41.0}
    plain = {"path": "/system.slice/cron.service"}  # bpf/net.c not attached: no figures
    assert select_rows([plain, lossy, busy], "connections", "")[0] is busy
    assert select_rows([plain, busy, lossy], "retransmits", "")[0] is lossy
    screen = render([busy, plain], View(sort="connections"), 200, 8, "12:00:00")
    header = screen[1].split()
    at = header.index("CONN/S")
    assert header[at + 1] == "RETX/S"
    cells = {line.split()[-1]: line.split() for line in screen[2:4]}
    assert cells["/system.slice/api.service"][at : at + 2] == ["950.0", "3.5"]
    assert cells["/system.slice/cron.service"][at : at + 2] == ["-", "-"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/setup-host installs it)")
def test_a_terminal_curses_does_not_know_gets_the_tables_once(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    core = ChangingCore(tmp_path)
    served = Served(core, private_bus.address)
    pane = Pane(
        tmp_path / "tmux.sock",
        [PYTHON, "-m", "linnixd.ctl", "--bus", private_bus.address, "top"],
        120,
        30,
        term="no-such-terminal",
    )
    try:
        deadline = time.monotonic() + 60
        while pane.dead() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pane.dead() == "0", pane.screen()
        screen = pane.screen()
        assert any(line.startswith("linnixctl: no live view (") for line in screen), screen
        assert any(line.endswith("/system.slice/batch.service") for line in screen), screen
        assert not any("Traceback" in line for line in screen)
    finally:
        pane.kill()
        served.close()


@pytest.mark.bpf
@pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root")
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/setup-host installs it)")
def test_live_view_of_the_real_daemon_shows_a_busy_cgroup_first_by_cpu(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    """The real daemon (BPF) on the private bus; a spinner born in its own cgroup2 directory is
    the first row when sorted by CPU (key u), with about one CPU in CPU%."""
    from test_integration import cgroup2_mount

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log_path = tmp_path / "daemon.log"
    argv = [PYTHON, "-m", "linnixd", "--bus", private_bus.address, "--no-journal"]
    argv += ["--policy", str(ROOT / "policy" / "rules.yaml"), "--state-dir", str(tmp_path / "st")]
    with log_path.open("w") as log:
        daemon = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=log)
    cgroup = cgroup2_mount() / f"lx-top-{os.getpid()}"
    cgroup.mkdir()
    spinner: subprocess.Popen[bytes] | None = None
    pane = None
    try:
        deadline = time.monotonic() + 120
        while "ready" not in log_path.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        # moves itself into the cgroup, then execs: the daemon first sees it there
        spinner = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec {PYTHON} -c "while True: pass"']
        )
        pane = Pane(
            tmp_path / "tmux.sock",
            [PYTHON, "-m", "linnixd.ctl", "--bus", private_bus.address, "top"],
            120,
            24,
        )
        pane.wait("the live view", lambda s: "CGROUP (UNIT)" in "\n".join(s))
        pane.keys("u")

        def cpu_column(lines: list[str]) -> list[tuple[str, float]]:
            """(cgroup, CPU%) of each row on the screen, top to bottom."""
            if len(lines) < 2 or "CPU%" not in lines[1].split():
                return []
            index = lines[1].split().index("CPU%")
            rows = [line.split() for line in lines[2:] if line.strip() and line[:1] == " "]
            return [(r[-1], float(r[index])) for r in rows if len(r) > index]

        def spinner_cpu(lines: list[str]) -> float | None:
            found = [cpu for path, cpu in cpu_column(lines) if path == "/" + cgroup.name]
            return found[0] if found else None

        screen = pane.wait(
            "the spinner's cgroup sorted by CPU",
            lambda s: "sort: CPU" in s[0] and bool(spinner_cpu(s)),
        )
        # sorted by CPU: the column never increases down the screen
        shown = [cpu for _path, cpu in cpu_column(screen)]
        assert shown == sorted(shown, reverse=True), screen

        # CPU% is what the kernel accounted to the cgroup: compare a few seconds of the view
        # with cpu.stat over the same seconds (on a loaded host the spinner gets what it gets)
        def usage_s() -> float:
            for line in (cgroup / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            raise AssertionError("no usage_usec")

        t0, u0 = time.monotonic(), usage_s()
        seen: list[float] = []
        while time.monotonic() - t0 < 4.0:
            value = spinner_cpu(pane.screen())
            if value is not None:
                seen.append(value)
            time.sleep(0.25)
        accounted = 100 * (usage_s() - u0) / (time.monotonic() - t0)
        viewed = sum(seen) / len(seen)
        assert 0 < viewed <= 110, seen
        assert abs(viewed - accounted) <= max(15.0, 0.5 * accounted), (viewed, accounted, seen)
        pane.keys("q")
        deadline = time.monotonic() + 15
        while pane.dead() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pane.dead() == "0", pane.screen()
    finally:
        if pane is not None:
            pane.kill()
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        daemon.terminate()
        daemon.wait(30)
        deadline = time.monotonic() + 5
        while (cgroup / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        cgroup.rmdir()
