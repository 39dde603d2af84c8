"""The state directory is not trusted blindly: links, foreign files and forged state are refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from linnixd.constants import ACTION_LEDGER, ENFORCEMENT_STATE, HISTORY_DB
from linnixd.daemon import open_history
from linnixd.enforcement import UINT64_MAX, Caller
from linnixd.history import AlertHistory
from linnixd.statedir import StateDir, StateError
from tests.test_enforcement import THROTTLE, RecordingUnits, alert, make, policy_file

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
WHO = Caller(bus_name=":1.42", uid=0, pid=4242)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the state directory that a planted link points at."""
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_text("precious\n")
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o750)
    return path


# ---- the directory --------------------------------------------------------------------------


def test_directory_owned_by_another_user_is_refused(state: Path) -> None:
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(StateError, match=f"owned by uid {NOBODY}, not the daemon's uid 0"):
        StateDir(state)


def test_directory_writable_by_others_is_refused(state: Path) -> None:
    state.chmod(0o777)
    with pytest.raises(StateError, match="mode 0777 lets group or others write to it"):
        StateDir(state)


def test_directory_that_is_a_symlink_is_refused(state: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(state)
    with pytest.raises(StateError, match="it is a symlink or not a directory"):
        StateDir(link)


def test_missing_directory_is_created_private(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "new")
    assert oct((tmp_path / "new").stat().st_mode & 0o777) == "0o750"
    sd.write_json("x.json", {"a": 1})
    assert json.loads((tmp_path / "new" / "x.json").read_text()) == {"a": 1}


# ---- the history database (real SQLite) -------------------------------------------------------


def test_symlink_at_history_path_is_refused_and_its_target_untouched(
    state: Path, victim: Path
) -> None:
    (state / HISTORY_DB).symlink_to(victim)
    sd = StateDir(state)
    pol = policy_file(state.parent, THROTTLE)
    history, why = open_history(sd, pol)
    assert history is None
    assert why == f"{state / HISTORY_DB} refused: it is a symlink"
    assert victim.read_text() == "precious\n"
    assert sd.status()["refused"] == 1


@pytest.mark.parametrize("side", ["-wal", "-shm", "-journal"])
def test_symlink_at_a_sqlite_side_file_is_refused(state: Path, victim: Path, side: str) -> None:
    (state / (HISTORY_DB + side)).symlink_to(victim)
    sd = StateDir(state)
    with pytest.raises(StateError, match=f"{HISTORY_DB}{side} refused: it is a symlink"):
        sd.sqlite_path(HISTORY_DB)
    assert victim.read_text() == "precious\n"


def test_history_created_through_the_directory_fd_is_private_and_works(state: Path) -> None:
    sd = StateDir(state)
    h = AlertHistory(sd.sqlite_path(HISTORY_DB))
    h.store(alert(1))
    h.close()
    assert oct((state / HISTORY_DB).stat().st_mode & 0o777) == "0o600"
    db = sqlite3.connect(state / HISTORY_DB)
    assert db.execute("SELECT id, rule FROM alerts").fetchall() == [("a1-firing", "cpu_spike")]
    db.close()


def test_history_file_of_another_user_is_refused(state: Path) -> None:
    (state / HISTORY_DB).write_bytes(b"")
    os.chown(state / HISTORY_DB, NOBODY, NOBODY)
    sd = StateDir(state)
    history, why = open_history(sd, policy_file(state.parent, THROTTLE))
    assert history is None and why.endswith(f"owned by uid {NOBODY}, not the daemon's uid 0")


def test_hard_link_is_refused(state: Path) -> None:
    (state / HISTORY_DB).write_bytes(b"")
    os.link(state / HISTORY_DB, state.parent / "second-name")
    with pytest.raises(StateError, match="it has 2 hard links"):
        StateDir(state).sqlite_path(HISTORY_DB)


# ---- enforcement.json ------------------------------------------------------------------------


def test_symlink_at_the_temporary_file_is_not_followed(state: Path, victim: Path) -> None:
    (state / f".{ENFORCEMENT_STATE}.tmp").symlink_to(victim)
    enf, _, _ = make(state)
    run(enf.set_enabled(True, False, WHO))
    assert victim.read_text() == "precious\n"  # neither written nor truncated
    assert json.loads((state / ENFORCEMENT_STATE).read_text())["enabled"] is True
    assert sorted(p.name for p in state.iterdir() if p.name.startswith(".")) == []


def test_genuine_enforcement_state_survives_a_restart(state: Path) -> None:
    enf, _, _ = make(state)
    run(enf.set_enabled(True, True, WHO))
    again, _, _ = make(state)
    assert again.enabled and again.dry_run and again.counters.state_rejected == 0
    assert again.state.by == {"bus_name": ":1.42", "uid": 0, "pid": 4242}


FORGED = {"enabled": True, "dry_run": False, "changed_at": 1.7e9}


@pytest.mark.parametrize(
    "content, mode, owner, why",
    [
        (
            dict(FORGED, by={"bus_name": ":1.9", "uid": 0, "pid": 1}),
            0o644,
            0,
            "mode 0644 is not 0600",
        ),
        (
            dict(FORGED, by={"bus_name": ":1.9", "uid": 0, "pid": 1}),
            0o600,
            NOBODY,
            f"owned by uid {NOBODY}, not the daemon's uid 0",
        ),
        (
            FORGED,
            0o600,
            0,
            "not an enforcement state record; enforcement starts disabled",
        ),
        (
            dict(FORGED, by={}),
            0o600,
            0,
            "no authorised caller on record (by: uid, pid, bus_name); enforcement starts disabled",
        ),
        (
            dict(FORGED, enabled="yes", by={"bus_name": ":1.9", "uid": 0, "pid": 1}),
            0o600,
            0,
            "enabled and dry_run must be true or false; enforcement starts disabled",
        ),
    ],
)
def test_forged_enforcement_state_starts_disabled(
    state: Path, content: dict[str, Any], mode: int, owner: int, why: str
) -> None:
    path = state / ENFORCEMENT_STATE
    path.write_text(json.dumps(content))
    path.chmod(mode)
    os.chown(path, owner, owner)
    enf, units, _ = make(state)
    assert not enf.enabled
    assert enf.counters.state_rejected == 1
    assert enf.state_dir.problems == [f"{path} refused: {why}"]
    run(enf.handle(alert()))
    assert units.changes() == []  # monitor only


def test_symlink_at_enforcement_state_is_refused(state: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text(json.dumps(dict(FORGED, by={"bus_name": ":1.9", "uid": 0, "pid": 1})))
    real.chmod(0o600)
    (state / ENFORCEMENT_STATE).symlink_to(real)
    enf, _, _ = make(state)
    assert not enf.enabled and enf.counters.state_rejected == 1


# ---- actions.json and the start-up revert ----------------------------------------------------------


def ledger_entry(**kw: Any) -> dict[str, Any]:
    entry = dict(
        id="e1",
        unit="batch.service",
        action="throttle_cpu",
        prop="CPUQuotaPerSecUSec",
        before=UINT64_MAX,
        after=200_000,
        rule="cpu_spike",
        incident="i1",
        applied_at=1.7e9,
        expires_at=1.7e9 + 60,
        state="applied",
        revert_failures=0,
        retry_at=0.0,
    )
    entry.update(kw)
    return entry


def test_forged_ledger_never_touches_protected_or_malformed_entries(state: Path) -> None:
    units = RecordingUnits()
    units.props["dbus.service"] = {"MemoryHigh": UINT64_MAX}
    units.props["batch.service"]["CPUQuotaPerSecUSec"] = 200_000
    (state / ACTION_LEDGER).write_text(
        json.dumps(
            [
                ledger_entry(
                    id="f1",
                    unit="dbus.service",
                    action="limit_memory",
                    prop="MemoryHigh",
                    before=1 << 20,
                ),
                ledger_entry(id="f2", action="throttle_cpu", prop="MemoryHigh"),
                ledger_entry(id="f3", before=-1),
                ledger_entry(id="f4", unit="../../etc/passwd"),
                ledger_entry(id="f5", surprise=1),
                "not even a record",
                ledger_entry(id="ok"),
            ]
        )
    )
    enf, _, _ = make(state, units=units)
    assert [r.id for r in enf.records] == ["ok"]
    assert enf.counters.ledger_rejected == 6
    problems = "\n".join(enf.state_dir.problems)  # the newest five
    assert "entry 0 dropped" not in problems and "entry 6" not in problems
    assert (
        "entry 1 dropped, never reverted: action 'throttle_cpu' does not change 'MemoryHigh'"
        in problems
    )
    assert "entry 2 dropped, never reverted: CPUQuotaPerSecUSec values must be integers" in problems
    assert "entry 3 dropped, never reverted: '../../etc/passwd' is not a unit name" in problems
    assert "entry 5 dropped, never reverted: not an object" in problems
    assert enf.state_dir.refused == 6
    assert run(enf.recover()) == 1
    assert units.changes() == [("set", "batch.service", "CPUQuotaPerSecUSec", UINT64_MAX)]
    assert units.props["dbus.service"]["MemoryHigh"] == UINT64_MAX


def test_revert_goes_through_the_guard_too(state: Path) -> None:
    """A unit protected since its action (policy reload) is never touched again, not even to revert."""
    units = RecordingUnits()
    enf, _, _ = make(state, units=units)
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert()))
    assert [r.unit for r in enf.records] == ["batch.service"]
    protected = policy_file(state.parent, THROTTLE, "  protected_units: [batch.service]\n")
    enf.policy = lambda: protected
    units.calls.clear()
    assert run(enf.revert(enf.records[0], "duration over"))
    assert units.changes() == [] and enf.records == []
    assert enf.counters.revert_refused == 1
    assert json.loads((state / ACTION_LEDGER).read_text()) == []


def test_ledger_writable_by_others_is_refused_whole(state: Path) -> None:
    (state / ACTION_LEDGER).write_text(json.dumps([ledger_entry()]))
    (state / ACTION_LEDGER).chmod(0o666)
    enf, units, _ = make(state)
    assert enf.records == [] and enf.counters.ledger_rejected == 1
    assert run(enf.recover()) == 0 and units.changes() == []


# ---- the real daemon --------------------------------------------------------------------------


def test_daemon_starts_monitoring_with_forged_state_and_says_what_it_refused(
    state: Path, victim: Path, tmp_path: Path
) -> None:
    """Planted link at the history, forged enforcement.json and actions.json: refused, counted, running."""
    (state / HISTORY_DB).symlink_to(victim)
    (state / ENFORCEMENT_STATE).write_text(json.dumps(dict(FORGED, by={})))
    (state / ENFORCEMENT_STATE).chmod(0o600)
    (state / ACTION_LEDGER).write_text(
        json.dumps([ledger_entry(unit="dbus.service", action="limit_memory", prop="MemoryHigh")])
    )
    proc = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-m",
            "linnixd",
            "--bus",
            "none",
            "--no-journal",
            "--no-sched",
            "--state-dir",
            str(state),
            "--stats-on-exit",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        lines: list[str] = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "ready: pid" in line:
                break
        assert any("ready: pid" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + err
    assert proc.returncode == 0, text
    assert "Traceback" not in text
    assert victim.read_text() == "precious\n"
    stats = json.loads([ln for ln in err.splitlines() if ln.startswith('{"stats"')][-1])["stats"]
    assert stats["enforcement_enabled"] is False
    st = stats["state"]
    assert st["history"] == f"unavailable: {state / HISTORY_DB} refused: it is a symlink"
    assert st["refused"] == 3
    counters = stats["enforcement"]["counters"]
    assert counters["state_rejected"] == 1 and counters["ledger_rejected"] == 1
    assert counters["reverted"] == 0 and counters["revert_failures"] == 0
    refusals = [ln for ln in text.splitlines() if " refused: " in ln and "linnixd: " in ln[:12]]
    assert len(refusals) == 3, refusals
    assert any("dbus.service is protected" in ln for ln in refusals)
