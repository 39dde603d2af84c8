"""daemon.stall_attribution: bpf/sched.c attributes stalls while the host shows CPU pressure."""

from __future__ import annotations

from pathlib import Path

from snapshots import proc, psi, snap

from linnixd.config import load_policy
from linnixd.daemon import Daemon
from linnixd.detectors.stall import PRESSURE_FLOOR_PCT
from linnixd.model import PsiSample

ROOT = Path(__file__).resolve().parent.parent
POLICY = str(ROOT / "policy" / "rules.yaml")
QUIET = [proc(100, cpu=0.4)]


def daemon(tmp_path: Path, mode: str | None = None) -> Daemon:
    path = POLICY
    if mode is not None:
        path = str(tmp_path / "rules.yaml")
        Path(path).write_text(f"daemon:\n  stall_attribution: {mode}\n")
    return Daemon(path, load_policy(path))


def cpu(some_pct: float, avg10: float = 0.0) -> dict[str, PsiSample]:
    return {"cpu": psi(some_pct, avg10=avg10)}


def test_shipped_default_is_pressure(tmp_path: Path) -> None:
    assert daemon(tmp_path).policy.daemon.stall_attribution == "pressure"


def test_off_until_cpu_pressure_then_held_for_noisy_neighbours_window(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    window = d.policy.rules.noisy_neighbour.window_s
    assert window == 10.0
    calm = cpu(PRESSURE_FLOOR_PCT / 2)
    assert not d.wants_attribution(snap(0, QUIET, system_pressure=calm))
    assert d.wants_attribution(snap(1, QUIET, system_pressure=cpu(PRESSURE_FLOOR_PCT)))
    seen = snap(1, QUIET).ts
    # held while the rule's window still holds pressured ticks, off once it has passed
    held = snap(0, QUIET, ts=seen + window, system_pressure=calm)
    assert d.wants_attribution(held)
    gone = snap(0, QUIET, ts=seen + window + 0.5, system_pressure=calm)
    assert not d.wants_attribution(gone)


def test_the_ten_second_average_alone_switches_it_on(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    assert d.wants_attribution(snap(0, QUIET, system_pressure=cpu(0.0, avg10=PRESSURE_FLOOR_PCT)))


def test_always_and_no_cpu_psi_attribute_every_tick(tmp_path: Path) -> None:
    always = daemon(tmp_path, "always")
    assert always.wants_attribution(snap(0, QUIET, system_pressure=cpu(0.0)))
    # a kernel without PSI (psi=0): nothing to gate on, so the rule keeps its evidence
    assert daemon(tmp_path).wants_attribution(snap(0, QUIET, system_pressure={}))


def test_a_bad_mode_is_refused_with_its_line(tmp_path: Path) -> None:
    import pytest

    from linnixd.config import PolicyError

    path = tmp_path / "rules.yaml"
    path.write_text("daemon:\n  stall_attribution: sometimes\n")
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert "rules.yaml:2" in str(err.value) and "stall_attribution" in str(err.value)
