"""linnixctl against a real private bus: output, exit codes, polkit denial, the real daemon end to end."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_bus import (  # noqa: F401  (fixtures are found by name)
    PYTHON,
    CoreDouble,
    PolkitMock,
    PrivateBus,
    make_alert,
    polkit,
    private_bus,
    reset_polkit,
    run,
    run_tool,
)

from linnixd.bus import serve
from linnixd.constants import POLKIT_RELOAD
from linnixd.ctl import exit_code_for, main, parse_since

REPO = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def ctl(address: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "linnixd.ctl", "--bus", address, *args]


def ctl_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")


def test_parse_since() -> None:
    assert parse_since("10m", now=10_000.0) == 9_400.0
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("1.5d", now=200_000.0) == 200_000.0 - 129_600
    assert parse_since("2025-11-21T14:00:00+00:00") == 1_763_733_600.0
    with pytest.raises(Exception, match="expected a duration like 10m"):
        parse_since("yesterday")


def test_exit_codes_for_bus_errors() -> None:
    assert exit_code_for("org.freedesktop.DBus.Error.ServiceUnknown") == 69
    assert exit_code_for("org.freedesktop.DBus.Error.AccessDenied") == 77
    assert exit_code_for("org.linnix.linnixd1.Error.NotAuthorized") == 77
    assert exit_code_for("org.linnix.linnixd1.Error.PolicyInvalid") == 78
    assert exit_code_for("org.linnix.linnixd1.Error.InvalidArgs") == 64
    assert exit_code_for("org.linnix.linnixd1.Error.Failed") == 1


def test_usage_error_is_64(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["alerts", "--limit", "0"])
    assert exc.value.code == 64
    assert "must be 1 or more, got 0" in capsys.readouterr().err


def test_unreachable_bus_and_missing_daemon_exit_69(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    gone = subprocess.run(
        ctl(f"unix:path={tmp_path}/no-bus", "status"),
        capture_output=True,
        text=True,
        env=ctl_env(),
        timeout=60,
    )
    assert gone.returncode == 69
    assert gone.stderr.startswith(
        f"linnixctl: cannot reach the bus at unix:path={tmp_path}/no-bus:"
    )
    assert gone.stderr.count("\n") == 1  # one line, no traceback
    for command in (["status"], ["watch"]):
        absent = subprocess.run(
            ctl(private_bus.address, *command),
            capture_output=True,
            text=True,
            env=ctl_env(),
            timeout=60,
        )
        assert absent.returncode == 69, absent.stderr
        assert (
            "linnixctl: linnixd is not running (nobody owns org.linnix.linnixd1 on the bus at"
            in absent.stderr
        )


def test_status_alerts_incidents_top_as_json_and_text(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    now = time.time()
    core.emit(make_alert(1, ts=now - 7200))
    core.emit(make_alert(2, ts=now - 60))
    core.emit(make_alert(3, rule="cpu_spike", ts=now - 30))
    addr = private_bus.address

    async def body() -> None:
        service = await serve(core, addr)
        try:
            rc, out = await run_tool(*ctl(addr, "status", "--json"), env=ctl_env())
            assert rc == 0 and json.loads(out)["policy_path"] == core.policy_path
            rc, out = await run_tool(*ctl(addr, "status"), env=ctl_env())
            assert (
                rc == 0
                and f"policy:       {core.policy_path}" in out
                and "incidents:    3 open" in out
            )
            rc, out = await run_tool(
                *ctl(addr, "alerts", "--json", "--since", "10m"), env=ctl_env()
            )
            assert rc == 0, out
            assert len(out.splitlines()) == 1  # one JSON document, not a stream
            assert [row["id"] for row in json.loads(out)] == ["a2", "a3"]  # oldest first
            rc, out = await run_tool(*ctl(addr, "alerts", "--rule", "fork_storm"), env=ctl_env())
            lines = out.splitlines()
            assert rc == 0 and len(lines) == 2 and "fork_storm firing: fork storm: 801" in lines[0]
            assert "pid=4201 comm=lx-forkstorm unit=foo.service" in lines[0]
            rc, out = await run_tool(*ctl(addr, "incidents", "--json"), env=ctl_env())
            assert rc == 0 and sorted(row["incident"] for row in json.loads(out)) == [
                "i1",
                "i2",
                "i3",
            ]
            rc, out = await run_tool(*ctl(addr, "top", "--limit", "2", "--json"), env=ctl_env())
            top = json.loads(out)
            assert [r["path"] for r in top["cgroups"]] == [
                "/system.slice/s0.service",
                "/system.slice/s1.service",
            ]
            assert top["stalls"][0]["stall_ms"] == 420.0
            rc, out = await run_tool(*ctl(addr, "top"), env=ctl_env())
            assert rc == 0 and "/system.slice/s4.service" in out  # the unit is the path's end
            assert "420.0    80%  /system.slice/a.service <- /system.slice/b.service" in out
        finally:
            service.close()

    run(body)


def test_watch_prints_signalled_alerts(private_bus: PrivateBus, tmp_path: Path) -> None:
    core = CoreDouble(tmp_path)
    addr = private_bus.address

    async def body() -> None:
        service = await serve(core, addr)
        try:
            proc = await asyncio.create_subprocess_exec(
                *ctl(addr, "watch", "--json", "--count", "2"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=ctl_env(),
            )
            n = 0
            deadline = time.monotonic() + 30
            # the watcher subscribes at some point after start: keep alerting until it has seen two
            while proc.returncode is None and time.monotonic() < deadline:
                n += 1
                core.emit(make_alert(n))
                try:
                    await asyncio.wait_for(proc.wait(), 0.2)
                except TimeoutError:
                    pass
            out, err = await proc.communicate()
            assert proc.returncode == 0, err
            rows = [json.loads(line) for line in out.decode().splitlines()]
            assert len(rows) == 2
            first = int(rows[0]["id"][1:])
            assert [r["id"] for r in rows] == [f"a{first}", f"a{first + 1}"]
            assert rows[0]["pid"] == 4200 + first and rows[0]["evidence"] == {
                "rate_per_s": 812.5,
                "forks": 1625,
                "window": {"s": 2},
            }
            assert (
                rows[0]["state"] == "firing"
                and rows[0]["rule"] == "fork_storm"
                and rows[0]["parent_comm"] == "systemd"
            )
        finally:
            service.close()

    run(body)


def test_reload_allowed_denied_and_reads_open_to_nobody(
    private_bus: PrivateBus, reset_polkit: PolkitMock, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    addr = private_bus.address

    async def body() -> None:
        service = await serve(core, addr)
        try:
            rc, out = await run_tool(*ctl(addr, "reload"), env=ctl_env())
            assert (
                rc == 77 and "linnixctl: permission denied: ReloadPolicy needs polkit action" in out
            )
            assert core.reloads == 0
            reset_polkit.control("SetAllowed", "as", "1", POLKIT_RELOAD)
            rc, out = await run_tool(*ctl(addr, "reload"), env=ctl_env())
            assert rc == 0 and out.strip() == f"policy {core.policy_path} reloaded"
            assert core.reloads == 1
            rc, out = await run_tool(*NOBODY, *ctl(addr, "status", "--json"), env=ctl_env())
            assert rc == 0, out
            assert json.loads(out)["version"] == core.version
            rc, out = await run_tool(*NOBODY, *ctl(addr, "incidents"), env=ctl_env())
            assert rc == 0 and "no open incidents" in out
        finally:
            service.close()

    run(body)


def _daemon_runnable() -> bool:
    return all(
        importlib.util.find_spec(m) is not None
        for m in (
            "linnixd.config",
            "linnixd.incidents",
            "linnixd.collector.lifecycle",
            "linnixd.hostmodel",
        )
    )


@pytest.mark.bpf
@pytest.mark.skipif(
    not _daemon_runnable(), reason="the daemon's pipeline modules are not in the tree yet"
)
def test_real_daemon_end_to_end(
    private_bus: PrivateBus, reset_polkit: PolkitMock, tmp_path: Path
) -> None:
    addr = private_bus.address
    policy = tmp_path / "rules.yaml"
    policy.write_text((REPO / "policy" / "rules.yaml").read_text())
    daemon = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "linnixd",
            "--foreground",
            "--bus",
            addr,
            "--state-dir",
            str(tmp_path / "state"),
            "--policy",
            str(policy),
            "--no-journal",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ctl_env(),
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            st = subprocess.run(
                ctl(addr, "status", "--json"),
                capture_output=True,
                text=True,
                env=ctl_env(),
                timeout=60,
            )
            if st.returncode == 0:
                break
            assert daemon.poll() is None, f"linnixd exited {daemon.returncode}"
            assert time.monotonic() < deadline, "linnixd did not come up on the bus"
            time.sleep(0.5)
        status = json.loads(st.stdout)
        assert status["policy_path"] == str(policy) and "fork_storm" in status["enabled_rules"]
        denied = subprocess.run(
            ctl(addr, "reload"), capture_output=True, text=True, env=ctl_env(), timeout=60
        )
        assert denied.returncode == 77
        reset_polkit.control("SetAllowed", "as", "1", POLKIT_RELOAD)
        policy.write_text(policy.read_text().replace("version: 1", "version: 1\nbogus_key: 1"))
        bad = subprocess.run(
            ctl(addr, "reload"), capture_output=True, text=True, env=ctl_env(), timeout=60
        )
        assert bad.returncode == 78 and bad.stderr.startswith("linnixctl: ")
        alerts = subprocess.run(
            ctl(addr, "alerts", "--json"), capture_output=True, text=True, env=ctl_env(), timeout=60
        )
        assert alerts.returncode == 0
    finally:
        daemon.terminate()
        daemon.wait(30)


def test_action_signals_print_as_one_line_each() -> None:
    from linnixd.ctl import format_action_event

    taken = {
        "signal": "ActionTaken",
        "unit": "batch.service",
        "action": "throttle_cpu",
        "before": "infinity",
        "after": "200000",
        "rule": "cpu_spike",
        "incident": "i7",
    }
    assert (
        format_action_event(taken)
        == "action taken: throttle_cpu batch.service (infinity -> 200000) rule cpu_spike incident i7"
    )
    reverted = {**taken, "signal": "ActionReverted", "incident": ""}
    assert (
        format_action_event(reverted)
        == "action reverted: throttle_cpu batch.service (back to infinity) rule cpu_spike incident -"
    )
