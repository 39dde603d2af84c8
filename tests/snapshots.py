"""Builders for synthetic Snapshots and rule configs, shared by the detector tests."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from linnixd.model import (
    CgroupSample,
    ExitRecord,
    LifecycleCounts,
    Owner,
    ProcessSample,
    PsiSample,
    Snapshot,
)
from linnixd.registry import BY_NAME

POLICY = Path(__file__).resolve().parent.parent / "policy" / "rules.yaml"
TICK = 0.5
T0 = 1000.0  # monotonic time of the first snapshot
WALL0 = 1_700_000_000.0


def rule_cfg(rule: str, **overrides: Any) -> Any:
    """The shipped policy's section for `rule` as the rule's settings model, with overrides.

    Built by the registry's model, so an override the rule does not have (or out of its
    bounds) fails here as it would in a policy file.
    """
    section = dict(yaml.safe_load(POLICY.read_text())["rules"][rule])
    section.update(overrides)
    return BY_NAME[rule].settings(**section)


def proc(
    pid: int,
    ppid: int = 1,
    comm: str = "",
    *,
    cpu: float = 0.0,
    rss: int = 10 << 20,
    start: float | None = None,
    cgroup: str = "/system.slice/app.service",
    unit: str | None = "app.service",
    fds: int | None = None,
    fd_limit: int | None = None,
    threads: int = 1,
) -> ProcessSample:
    """A process sample; start time defaults to pid/100 so each pid has a stable identity."""
    return ProcessSample(
        pid=pid,
        ppid=ppid,
        comm=comm or f"proc{pid}",
        cmdline=comm or f"proc{pid}",
        start_time=start if start is not None else pid / 100.0,
        uid=0,
        cgroup=cgroup,
        unit=unit,
        cpu_pct=cpu,
        rss_bytes=rss,
        threads=threads,
        fd_count=fds,
        fd_soft_limit=fd_limit,
    )


def psi(some_pct: float, interval: float = TICK, avg10: float = 0.0) -> PsiSample:
    """A pressure sample whose interval-based some_pct is `some_pct`."""
    stall_us = round(some_pct * interval * 1e4)
    return PsiSample(avg10 or some_pct, 0.0, stall_us, 0, interval)


def cgroup(
    path: str,
    cid: int | None = None,
    *,
    unit: str | None = None,
    memory: int | None = None,
    pressure: Mapping[str, PsiSample] | None = None,
) -> CgroupSample:
    """A cgroup sample; a path ending in .service/.scope is owned by that unit unless told."""
    leaf = path.rsplit("/", 1)[-1]
    if unit is None and leaf.endswith((".service", ".scope")):
        unit = leaf
    owner = Owner("unit", unit, unit=unit) if unit else Owner("unknown", path)
    return CgroupSample(
        id=cid if cid is not None else zlib.crc32(path.encode()) % 100_000 + 1,
        path=path,
        owner=owner,
        pressure=dict(pressure or {}),
        memory_bytes=memory,
    )


def snap(
    i: int,
    processes: Iterable[ProcessSample] = (),
    *,
    interval: float = TICK,
    by_parent: Mapping[int, LifecycleCounts] | None = None,
    by_cgroup: Mapping[str, LifecycleCounts] | None = None,
    cgroups: Iterable[CgroupSample] = (),
    system_pressure: Mapping[str, PsiSample] | None = None,
    exits: Sequence[ExitRecord] = (),
    file_nr: int = 0,
    file_max: int = 0,
    ts: float | None = None,
) -> Snapshot:
    """Snapshot number `i` of a series ticking every `interval` seconds from T0."""
    t = ts if ts is not None else T0 + i * interval
    procs = {p.pid: p for p in processes}
    by_parent = dict(by_parent or {})
    total = LifecycleCounts()
    for c in by_parent.values():
        total = total + c
    return Snapshot(
        ts=t,
        wall=WALL0 + (t - T0),
        interval_s=interval,
        ncpu=2,
        processes=procs,
        total=total,
        by_parent=by_parent,
        by_cgroup=dict(by_cgroup or {}),
        cgroups={c.path: c for c in cgroups},
        system_pressure=dict(system_pressure or {}),
        cpu_util_pct=0.0,
        file_nr=file_nr,
        file_max=file_max,
        exits=tuple(exits),
    )


def series(n: int, make: Callable[[int], Snapshot]) -> list[Snapshot]:
    """`n` snapshots built by `make(i)`, oldest first."""
    return [make(i) for i in range(n)]


def exit_record(
    pid: int,
    ppid: int,
    comm: str,
    cgroup_id: int,
    *,
    code: int | None = 0,
    signal: int | None = None,
    lifetime: float | None = 0.05,
    ts: float = T0,
) -> ExitRecord:
    return ExitRecord(pid, ppid, cgroup_id, comm, code, signal, lifetime, ts)
