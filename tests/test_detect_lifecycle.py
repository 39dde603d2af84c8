"""fork_storm and short_lived_jobs on synthetic snapshots: thresholds, culprits, exclusions."""

from __future__ import annotations

import dataclasses

from snapshots import cgroup, exit_record, proc, rule_cfg, series, snap

from linnixd.detectors.forks import ForkStormDetector, ShortLivedJobsDetector
from linnixd.incidents import IncidentTracker
from linnixd.model import LifecycleCounts as LC

FOO = "/system.slice/foo.service"
BAR = "/system.slice/bar.service"
STORM = ForkStormDetector()
JOBS = ShortLivedJobsDetector()


def storm_window(forks_per_tick: list[int], *, dead_parent: bool = False, extra_comm: str = "sh"):
    """Parent 4242 (stress-ng-fork, under 4000) does 80% of FOO's forks, 4300 the rest."""
    parent = proc(4000, 1, "stress-ng", cgroup=FOO, unit="foo.service")
    forker = proc(4242, 4000, "stress-ng-fork", cgroup=FOO, unit="foo.service")
    helper = proc(4300, 4000, extra_comm, cgroup=FOO, unit="foo.service")
    other = proc(5000, 1, "quiet", cgroup=BAR, unit="bar.service")

    def make(i: int):
        n = forks_per_tick[i]
        procs = [parent, helper, other] + ([] if dead_parent else [forker])
        return snap(
            i,
            procs,
            by_parent={
                4242: LC(forks=n * 4 // 5, threads=500),
                4300: LC(forks=n - n * 4 // 5),
                5000: LC(forks=1),
            },
            by_cgroup={FOO: LC(forks=n, threads=500), BAR: LC(forks=1)},
            cgroups=[cgroup(FOO), cgroup(BAR)],
        )

    return series(len(forks_per_tick), make)


def test_fork_storm_names_the_cgroup_and_its_top_parent() -> None:
    window = storm_window([0, 0] + [10] * 4)  # 10 forks per 0.5 s = 20/s for the last 2 s
    [f] = STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=19))
    assert f.rule == "fork_storm" and f.key == f"cgroup:{FOO}"
    c = f.culprit
    assert (c.pid, c.comm, c.cgroup, c.unit, c.parent_pid, c.parent_comm) == (
        4242,
        "stress-ng-fork",
        FOO,
        "foo.service",
        4000,
        "stress-ng",
    )
    ev = f.evidence
    assert ev["rate_per_s"] == 20.0 and ev["forks"] == 40 and ev["window_s"] == 2.0
    assert ev["top_parents"] == [
        {"pid": 4242, "comm": "stress-ng-fork", "forks": 32, "share": 0.8},
        {"pid": 4300, "comm": "sh", "forks": 8, "share": 0.2},
    ]
    assert f.summary == (
        "fork storm: 20 process creations/s for 2.0 s, top parent stress-ng-fork[4242] (80%) in foo.service"
    )


def test_fork_storm_rate_threshold_both_sides() -> None:
    window = storm_window([10] * 6)  # exactly 20/s
    assert STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=20)) == []  # must exceed
    assert len(STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=19.9))) == 1


def test_fork_storm_sustain_both_sides() -> None:
    # the storm covers the last 4 ticks = 2.0 s; one quiet tick inside 2.5 s breaks it
    window = storm_window([0, 0, 10, 10, 10, 10])
    assert len(STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=10, sustain_s=2.0))) == 1
    assert STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=10, sustain_s=2.1)) == []
    # a window too short to cover sustain_s never fires
    assert STORM.evaluate(window[-3:], rule_cfg("fork_storm", rate_per_s=10, sustain_s=2.0)) == []


def test_fork_storm_uses_the_real_interval_not_a_fixed_tick() -> None:
    # 10 forks per 1.0 s interval is 10/s, not 20/s
    window = [
        snap(i, by_cgroup={FOO: LC(forks=10)}, interval=1.0, cgroups=[cgroup(FOO)])
        for i in range(4)
    ]
    assert STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=12)) == []
    [f] = STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=9))
    assert f.evidence["rate_per_s"] == 10.0
    assert f.culprit.kind == "cgroup" and f.culprit.pid is None  # no parent information at all


def test_fork_storm_dead_parent_keeps_its_pid() -> None:
    [f] = STORM.evaluate(
        storm_window([10] * 6, dead_parent=True), rule_cfg("fork_storm", rate_per_s=10)
    )
    assert (f.culprit.pid, f.culprit.comm, f.culprit.cgroup) == (4242, "unknown", FOO)
    assert f.evidence["top_parents"][0] == {
        "pid": 4242,
        "comm": "unknown",
        "forks": 32,
        "share": 0.8,
    }


def test_fork_storm_exclusions() -> None:
    window = storm_window([10] * 6)
    assert (
        STORM.evaluate(window, rule_cfg("fork_storm", rate_per_s=10, exclude={"units": ["foo.*"]}))
        == []
    )
    assert (
        STORM.evaluate(
            window, rule_cfg("fork_storm", rate_per_s=10, exclude={"cgroups": ["/system.slice/*"]})
        )
        == []
    )
    # an excluded parent is skipped: the next parent is named
    [f] = STORM.evaluate(
        window, rule_cfg("fork_storm", rate_per_s=10, exclude={"comms": ["stress-ng*"]})
    )
    assert (f.culprit.pid, f.culprit.comm) == (4300, "sh")
    # every parent excluded: nothing left to blame
    assert (
        STORM.evaluate(
            window, rule_cfg("fork_storm", rate_per_s=10, exclude={"comms": ["stress-ng*", "sh"]})
        )
        == []
    )


def jobs_window(per_tick: int, ticks: int = 20, *, two_parents: bool = False):
    """Cron-like parent 700 in FOO spawning short jobs (lifetime 0.05 s) that exit 1 or die of signal 9."""
    foo = cgroup(FOO, 11)
    parent = proc(700, 1, "crond", cgroup=FOO, unit="foo.service")
    other = proc(701, 1, "runner", cgroup=FOO, unit="foo.service")

    def make(i: int):
        ts = 1000.0 + i * 0.5
        exits = [
            exit_record(
                10_000 + i * 100 + j,
                701 if two_parents and j % 2 else 700,
                "job.sh",
                11,
                code=None if j == 0 else 1,
                signal=9 if j == 0 else None,
                ts=ts,
            )
            for j in range(per_tick)
        ]
        if two_parents:
            counts = {
                700: LC(short_exits=per_tick - per_tick // 2),
                701: LC(short_exits=per_tick // 2),
            }
        else:
            counts = {700: LC(short_exits=per_tick)}
        return snap(
            i,
            [parent, other],
            by_parent=counts,
            by_cgroup={FOO: LC(short_exits=per_tick)},
            cgroups=[foo],
            exits=exits,
        )

    return series(ticks, make)


def test_short_lived_jobs_prefers_the_parent() -> None:
    # window_s 10 = 20 ticks of 0.5 s; 1 short exit per tick = 20 exits
    window = jobs_window(1, ticks=24)
    [f] = JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=20))
    assert f.key == "parent:700" and f.culprit.kind == "process"
    assert (f.culprit.pid, f.culprit.comm, f.culprit.cgroup, f.culprit.unit) == (
        700,
        "crond",
        FOO,
        "foo.service",
    )
    ev = f.evidence
    assert ev["count"] == 20 and ev["window_s"] == 10.0 and ev["max_lifetime_s"] == 1.0
    assert ev["exit_statuses"] == [{"status": "signal 9", "count": 20}]
    assert ev["comms"] == [{"comm": "job.sh", "count": 20}]
    assert "20 processes" in f.summary and "crond[700]" in f.summary
    assert JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=21)) == []


def test_short_lived_jobs_falls_back_to_the_cgroup() -> None:
    window = jobs_window(3, ticks=20, two_parents=True)  # 60 in FOO: 40 from 700, 20 from 701
    [f] = JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=41))
    assert (
        f.key == f"cgroup:{FOO}" and f.culprit.kind == "cgroup" and f.culprit.unit == "foo.service"
    )
    assert f.evidence["count"] == 60
    assert f.evidence["exit_statuses"] == [
        {"status": "exit 1", "count": 40},
        {"status": "signal 9", "count": 20},
    ]
    # with min_count 40 parent 700 accounts for it: the parent is named instead of the cgroup
    [g] = JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=40))
    assert g.culprit.pid == 700 and g.evidence["count"] == 40
    assert JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=61)) == []


def test_short_lived_jobs_window_and_exclusions() -> None:
    window = jobs_window(1, ticks=24)
    assert JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=20, window_s=9.5)) == []
    assert (
        JOBS.evaluate(
            window, rule_cfg("short_lived_jobs", min_count=20, exclude={"comms": ["cron*"]})
        )
        == []
    )
    assert (
        JOBS.evaluate(
            window, rule_cfg("short_lived_jobs", min_count=20, exclude={"units": ["foo.service"]})
        )
        == []
    )


def test_short_lived_jobs_one_incident_when_the_parent_exits() -> None:
    window = jobs_window(1, ticks=24)
    [alive] = JOBS.evaluate(window, rule_cfg("short_lived_jobs", min_count=20))
    # the parent exits: it leaves the process table, its own exit record carries its name
    gone = [
        dataclasses.replace(s, processes={k: v for k, v in s.processes.items() if k != 700})
        for s in window
    ]
    last = gone[-1]
    gone[-1] = dataclasses.replace(
        last, exits=(*last.exits, exit_record(700, 1, "crond", 0, lifetime=None, ts=last.ts))
    )
    [dead] = JOBS.evaluate(gone, rule_cfg("short_lived_jobs", min_count=20))
    assert dead.key == alive.key == "parent:700"
    assert (dead.culprit.pid, dead.culprit.comm, dead.culprit.cgroup) == (700, "crond", FOO)
    tracker = IncidentTracker(resolve_after_s=2.0)
    fired = tracker.update([alive], window[-1].ts, window[-1].wall, {"short_lived_jobs": 300.0})
    again = tracker.update([dead], window[-1].ts + 0.5, window[-1].wall + 0.5, {})
    assert [a.state for a in fired] == ["firing"] and again == []


def test_cgroup_paths_of_exited_jobs_as_the_whole_window_names_them() -> None:
    """An exited parent's jobs are placed by cgroup id: looked up newest snapshot first, only
    until each id is found, with the answer of one map merged over every snapshot (the newest
    holder of a re-used id wins; an id no snapshot holds has no path)."""
    from linnixd.detectors.forks import _cgroup_paths

    many = [cgroup(f"/bench/c{k}", 100 + k) for k in range(50)]
    old = [cgroup(FOO, 7), cgroup("/gone.scope", 8), *many]
    new = [cgroup(BAR, 7), *many]  # FOO is gone and its id 7 now names BAR
    window = [snap(0, cgroups=old), snap(1, cgroups=old), snap(2, cgroups=new)]
    window.insert(2, dataclasses.replace(window[1], ts=window[1].ts + 0.25))  # shared cgroups
    merged = {cg.id: path for s in window for path, cg in s.cgroups.items()}
    for ids in ({7}, {8}, {7, 8, 120}, {9999}, {8, 9999}, set()):
        assert _cgroup_paths(window, ids) == {i: merged[i] for i in ids if i in merged}
    assert _cgroup_paths(window, {7, 8}) == {7: BAR, 8: "/gone.scope"}
