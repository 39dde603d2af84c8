"""fd_exhaustion and psi_saturation on synthetic snapshots: thresholds, culprits, top contributors."""

from __future__ import annotations

from snapshots import cgroup, proc, psi, rule_cfg, series, snap

from linnixd.detectors.fds import FdExhaustionDetector
from linnixd.detectors.pressure import PsiSaturationDetector

FDS = FdExhaustionDetector()
PSI = PsiSaturationDetector()
DB = "/system.slice/db.service"
WEB = "/system.slice/web.service"


def fd_snap(fds: int, file_nr: int = 1000):
    return [
        snap(
            0,
            [
                proc(1, 0, "init", fds=20, fd_limit=None),
                proc(300, 1, "postgres", fds=fds, fd_limit=1024, cgroup=DB, unit="db.service"),
                proc(301, 1, "nginx", fds=500, fd_limit=65536),
            ],
            file_nr=file_nr,
            file_max=10_000,
        )
    ]


def test_fd_exhaustion_process_both_sides() -> None:
    [f] = FDS.evaluate(fd_snap(820), rule_cfg("fd_exhaustion"))  # 80.08% of 1024
    assert f.key == "pid:300:3" and (f.culprit.pid, f.culprit.comm, f.culprit.unit) == (
        300,
        "postgres",
        "db.service",
    )
    assert f.evidence == {"fd_count": 820, "fd_limit": 1024, "pct": 80.1, "threshold_pct": 80.0}
    assert FDS.evaluate(fd_snap(819), rule_cfg("fd_exhaustion")) == []  # 79.98%
    assert (
        FDS.evaluate(
            fd_snap(820), rule_cfg("fd_exhaustion", exclude={"cgroups": ["/system.slice/db*"]})
        )
        == []
    )


def test_fd_exhaustion_system_names_top_holders() -> None:
    [f] = FDS.evaluate(fd_snap(100, file_nr=9000), rule_cfg("fd_exhaustion"))
    assert f.key == "system:fds" and f.culprit.kind == "system"
    assert (
        f.evidence["fd_count"] == 9000
        and f.evidence["fd_limit"] == 10_000
        and f.evidence["pct"] == 90.0
    )
    assert [h["pid"] for h in f.evidence["top_holders"]] == [301, 300, 1]
    assert "nginx[301] 500" in f.summary
    assert FDS.evaluate(fd_snap(100, file_nr=8999), rule_cfg("fd_exhaustion")) == []


def psi_window(
    system_pct: list[float], db_pct: float = 30.0, web_pct: float = 10.0, slice_pct: float = 35.0
):
    def make(i: int):
        cgs = [
            cgroup("/system.slice", pressure={"cpu": psi(slice_pct)}),
            cgroup(DB, pressure={"cpu": psi(db_pct)}),
            cgroup(WEB, pressure={"cpu": psi(web_pct)}),
        ]
        return snap(i, cgroups=cgs, system_pressure={"cpu": psi(system_pct[i]), "io": psi(1.0)})

    return series(len(system_pct), make)


def test_psi_saturation_system_names_top_cgroups() -> None:
    window = psi_window([0.0] * 2 + [41.0] * 10)  # last 5 s above 40%
    [f] = PSI.evaluate(window, rule_cfg("psi_saturation"))
    assert f.key == "system:cpu" and f.culprit.kind == "system" and f.severity == "critical"
    ev = f.evidence
    assert ev["resource"] == "cpu" and ev["some_pct"] == 41.0 and ev["sustain_s"] == 5.0
    # leaves only (system.slice contains both); share of the host's stall time
    assert ev["top_cgroups"] == [
        {"cgroup": DB, "unit": "db.service", "stall_ms": 1500.0, "share": 0.732},
        {"cgroup": WEB, "unit": "web.service", "stall_ms": 500.0, "share": 0.244},
    ]
    assert "db.service (73%)" in f.summary
    assert PSI.evaluate(psi_window([40.0] * 12), rule_cfg("psi_saturation")) == []  # must exceed
    assert (
        PSI.evaluate(psi_window([0.0] * 3 + [90.0] * 9), rule_cfg("psi_saturation")) == []
    )  # 4.5 s


def test_psi_saturation_per_cgroup_names_the_most_specific() -> None:
    window = psi_window([45.0] * 12, db_pct=50.0, slice_pct=45.0)
    findings = {f.key: f for f in PSI.evaluate(window, rule_cfg("psi_saturation"))}
    # system.slice is at 45% too, but db.service inside it is the specific one
    assert set(findings) == {"system:cpu", f"cgroup:{DB}:cpu"}
    f = findings[f"cgroup:{DB}:cpu"]
    assert (f.culprit.kind, f.culprit.cgroup, f.culprit.unit) == ("cgroup", DB, "db.service")
    assert f.evidence["some_pct"] == 50.0
    cfg = rule_cfg("psi_saturation", exclude={"units": ["db.service"]})
    assert {f.key for f in PSI.evaluate(window, cfg)} == {"system:cpu"}
    assert PSI.evaluate(window, rule_cfg("psi_saturation", resources=["io", "memory"])) == []


def test_fd_exhaustion_follows_the_counted_processes_across_ticks() -> None:
    """Ticks with a `changed` set: only rebuilt samples are looked at, with the same findings
    as a full look; a window that does not follow the last one is looked at whole."""
    from dataclasses import replace

    det = FdExhaustionDetector()
    cfg = rule_cfg("fd_exhaustion")
    quiet = [proc(p, 1, f"p{p}", fds=None, fd_limit=1024) for p in range(400, 420)]
    leaky = proc(300, 1, "leaky", fds=900, fd_limit=1024)
    other = proc(301, 1, "other", fds=990, fd_limit=1024)

    def tick(i: int, procs: list, changed: set[int] | None):  # type: ignore[type-arg]
        return replace(snap(i, procs), changed=None if changed is None else frozenset(changed))

    t0 = tick(0, [leaky, *quiet], None)
    assert [f.culprit.pid for f in det.evaluate([t0], cfg)] == [300]
    t1 = tick(1, [leaky, *quiet], set())  # nothing rebuilt: the count still stands
    assert [f.culprit.pid for f in det.evaluate([t0, t1], cfg)] == [300]
    fell = replace(leaky, fd_count=None)  # closed its fds: below the collector's prefilter
    t2 = tick(2, [fell, other, *quiet], {300, 301})
    assert [f.culprit.pid for f in det.evaluate([t1, t2], cfg)] == [301]
    t3 = tick(3, [fell, *quiet], set())  # 301 exited: gone from the table, gone from the set
    assert det.evaluate([t2, t3], cfg) == []
    # a window that does not follow the last evaluated snapshot is looked at whole
    far = tick(9, [leaky, *quiet], set())
    assert [f.culprit.pid for f in det.evaluate([tick(8, [leaky], set()), far], cfg)] == [300]


def _psi_host(ticks: int, jump: int = 0) -> list:
    """Snapshots as the host model builds them: a cgroup not re-read keeps its sample object,
    one that goes quiet gets a copy with no stall (hostmodel.quiet), one that is gone is absent."""
    from linnixd.hostmodel import quiet

    calm = {f"/bench/c{k}": cgroup(f"/bench/c{k}", pressure={"cpu": psi(0.0)}) for k in range(40)}
    cur = dict(calm)
    cur["/bench/c9"] = cgroup("/bench/c9", pressure={"cpu": psi(60.0)})  # the same object, hot
    out = []
    for i in range(ticks):
        cur["/"] = cgroup("/", pressure={"cpu": psi(70.0)})  # the host's: never a cgroup finding
        if 5 <= i <= 25:
            cur["/bench/c3"] = cgroup("/bench/c3", pressure={"cpu": psi(50.0 + i % 3)})
        elif i == 26:
            cur["/bench/c3"] = quiet(cur["/bench/c3"])
        if i < 20:
            cur["/bench/c7"] = cgroup("/bench/c7", pressure={"io": psi(45.0), "cpu": psi(1.0)})
        else:
            cur.pop("/bench/c7", None)  # removed
        out.append(snap(i + jump, cgroups=cur.values()))
    return out


def test_psi_saturation_judges_only_changed_samples_with_the_full_result() -> None:
    """Across ticks the detector re-judges only the cgroup samples that changed; its findings
    equal a fresh detector's (the full look) every tick: a cgroup that heats and goes quiet,
    one that vanishes, one hot whose sample object is carried, a window that does not follow
    the last one (another host model, time back), and a limit changed by a reload."""
    det = PsiSaturationDetector()
    cfg = rule_cfg("psi_saturation")
    seen: set[str] = set()

    def same(window: list, c: object) -> None:
        got = det.evaluate(window, c)  # type: ignore[arg-type]
        assert got == PsiSaturationDetector().evaluate(window, c)  # type: ignore[arg-type]
        seen.update(f.key for f in got)

    host = _psi_host(40)
    for i in range(len(host)):
        same(host[max(0, i - 14) : i + 1], cfg)
    assert seen == {"cgroup:/bench/c3:cpu", "cgroup:/bench/c7:io", "cgroup:/bench/c9:cpu"}
    other = _psi_host(30, jump=-20)  # a window that does not follow: new objects, time back
    for i in (12, 13, 29):
        same(other[i - 12 : i + 1], cfg)
    # a reload: the same snapshot judged against another limit
    strict = rule_cfg("psi_saturation", some_pct=55.0)
    same(other[5:18], strict)
    assert [f.key for f in det.evaluate(other[5:18], strict)] == ["cgroup:/bench/c9:cpu"]
    same(other[5:18], cfg)
    assert len(det.evaluate(other[5:18], cfg)) == 3
