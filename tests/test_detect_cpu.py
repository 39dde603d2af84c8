"""cpu_spike and runaway_tree on synthetic snapshots: thresholds, sustain, the minimal subtree root."""

from __future__ import annotations

from snapshots import proc, rule_cfg, series, snap

from linnixd.detectors.cpu import CpuSpikeDetector, RunawayTreeDetector
from linnixd.model import Snapshot

SPIKE = CpuSpikeDetector()
TREE = RunawayTreeDetector()
APP = "/system.slice/app.service"


def spike_window(cpu: list[float], *, start: float = 12.0):
    shell = proc(900, 1, "bash")
    return series(
        len(cpu), lambda i: snap(i, [shell, proc(1234, 900, "burner", cpu=cpu[i], start=start)])
    )


def test_cpu_spike_fires_just_above_and_names_the_process() -> None:
    window = spike_window([0.0] * 2 + [51.0, 55.0] * 5)  # last 10 ticks = 5 s above 50
    [f] = SPIKE.evaluate(window, rule_cfg("cpu_spike"))
    assert f.key == "pid:1234:12"
    c = f.culprit
    assert (c.kind, c.pid, c.comm, c.cgroup, c.unit, c.parent_pid, c.parent_comm) == (
        "process",
        1234,
        "burner",
        APP,
        "app.service",
        900,
        "bash",
    )
    assert (
        f.evidence["cpu_pct"] == 53.0
        and f.evidence["min_cpu_pct"] == 51.0
        and f.evidence["sustain_s"] == 5.0
    )
    assert f.summary == "cpu spike: burner[1234] in app.service at 53% CPU (min 51%) for 5 s"


def test_cpu_spike_threshold_and_sustain_both_sides() -> None:
    assert SPIKE.evaluate(spike_window([50.0] * 12), rule_cfg("cpu_spike")) == []  # must exceed 50
    assert (
        SPIKE.evaluate(spike_window([0.0] * 3 + [90.0] * 9), rule_cfg("cpu_spike")) == []
    )  # 4.5 s < 5 s
    assert len(SPIKE.evaluate(spike_window([0.0] * 2 + [90.0] * 10), rule_cfg("cpu_spike"))) == 1
    assert (
        SPIKE.evaluate(
            spike_window([0.0] * 2 + [90.0] * 10),
            rule_cfg("cpu_spike", exclude={"comms": ["burn*"]}),
        )
        == []
    )


def test_cpu_spike_survives_a_dip_but_not_a_pause() -> None:
    # ~70% with a tick lost to a neighbour (35%): still a spike at the 5 s mean
    [f] = SPIKE.evaluate(
        spike_window([0.0] * 2 + [75.0] * 4 + [35.0] + [75.0] * 5), rule_cfg("cpu_spike")
    )
    assert f.evidence["min_cpu_pct"] == 35.0 and f.evidence["cpu_pct"] == 71.0
    # a tick below half the threshold breaks the run; so does a mean at or under it
    assert (
        SPIKE.evaluate(
            spike_window([0.0] * 2 + [90.0] * 4 + [20.0] + [90.0] * 5), rule_cfg("cpu_spike")
        )
        == []
    )
    assert SPIKE.evaluate(spike_window([0.0] * 2 + [60.0, 40.0] * 5), rule_cfg("cpu_spike")) == []


def test_a_reused_pid_is_a_new_culprit() -> None:
    # pid 1234 restarts (new start time) 3 s before the end: the new process is not yet sustained
    old = spike_window([90.0] * 12, start=12.0)
    new = spike_window([90.0] * 12, start=99.0)
    window = old[:6] + new[6:]
    assert SPIKE.evaluate(window, rule_cfg("cpu_spike")) == []
    assert SPIKE.evaluate(window, rule_cfg("cpu_spike", sustain_s=3.0))[0].key == "pid:1234:99"
    assert SPIKE.evaluate(old, rule_cfg("cpu_spike"))[0].key == "pid:1234:12"


def tree_snapshot(i: int, grandchild_cpu: float = 24.0, make_cpu: float = 2.0):
    """init -> sshd -> bash(800) -> make(810) -> cc1 x4 (820-823), plus an idle daemon."""
    procs = [
        proc(1, 0, "init", cgroup="/", unit=None),
        proc(2, 0, "kthreadd", cgroup="/", unit=None),
        proc(700, 1, "sshd", cpu=1.0),
        proc(800, 700, "bash", cpu=0.5),
        proc(810, 800, "make", cpu=make_cpu),
        proc(950, 1, "idle-daemon", cpu=0.5),
    ] + [proc(820 + k, 810, "cc1", cpu=grandchild_cpu) for k in range(4)]
    return snap(i, procs)


def test_runaway_tree_blames_the_smallest_subtree_that_explains_it() -> None:
    window = series(12, tree_snapshot)  # make's subtree: 2 + 4 x 24 = 98% > 90
    [f] = TREE.evaluate(window, rule_cfg("runaway_tree"))
    assert f.key == "pid:810:8.1"
    c = f.culprit
    assert (c.kind, c.pid, c.comm, c.root_pid, c.parent_pid, c.parent_comm, c.unit) == (
        "tree",
        810,
        "make",
        810,
        800,
        "bash",
        "app.service",
    )
    ev = f.evidence
    assert ev["subtree_cpu_pct"] == 98.0 and ev["processes"] == 5 and ev["root_pid"] == 810
    assert [m["pid"] for m in ev["top_members"]] == [820, 821, 822, 823, 810]
    assert ev["top_members"][0] == {"pid": 820, "comm": "cc1", "cpu_pct": 24.0}


def test_runaway_tree_threshold_both_sides() -> None:
    # make + cc1s = 2 + 4 x 22 = 90, not above; bash's subtree adds 0.5 (90.5 > 90): the tree
    # fires, and it is named after make, which holds 99% of it (bash only launched it)
    [f] = TREE.evaluate(series(12, lambda i: tree_snapshot(i, 22.0)), rule_cfg("runaway_tree"))
    assert f.culprit.pid == 810 and f.evidence["subtree_cpu_pct"] == 90.0
    assert (
        TREE.evaluate(
            series(12, lambda i: tree_snapshot(i, 22.0)), rule_cfg("runaway_tree", cpu_pct=91.5)
        )
        == []
    )
    # one tick below the threshold inside sustain_s: no finding
    window = series(12, lambda i: tree_snapshot(i, 10.0 if i == 4 else 24.0))
    assert TREE.evaluate(window, rule_cfg("runaway_tree")) == []
    assert len(TREE.evaluate(window, rule_cfg("runaway_tree", sustain_s=3.5))) == 1


def test_runaway_tree_dip_does_not_move_the_blame_to_the_launcher() -> None:
    # supervisor (1.5%) -> leader (1%) -> 4 workers; on one tick the workers dip to 22% so the
    # leader's subtree is 89% there while the supervisor's stays at 90.5%: the leader is named
    def make(i: int) -> Snapshot:
        w = 22.0 if i == 6 else 26.0
        return snap(
            i,
            [
                proc(1, 0, "init"),
                proc(700, 1, "supervisor", cpu=1.5),
                proc(710, 700, "leader", cpu=1.0),
            ]
            + [proc(720 + k, 710, "worker", cpu=w) for k in range(4)],
        )

    [f] = TREE.evaluate(series(12, make), rule_cfg("runaway_tree"))
    assert (f.culprit.pid, f.culprit.comm, f.culprit.parent_pid) == (710, "leader", 700)
    assert f.evidence["processes"] == 5


def test_runaway_tree_is_not_one_hot_process() -> None:
    # one cc1 at 95% alone: that is cpu_spike's finding, and no ancestor is blamed for it
    window = series(
        12,
        lambda i: snap(
            i, [proc(1, 0, "init"), proc(810, 1, "make", cpu=1.0), proc(820, 810, "cc1", cpu=95.0)]
        ),
    )
    assert TREE.evaluate(window, rule_cfg("runaway_tree")) == []


def test_runaway_tree_never_blames_init() -> None:
    # four unrelated services at 30% each: only init's subtree exceeds 90, and init is never a culprit
    window = series(
        12,
        lambda i: snap(
            i, [proc(1, 0, "init")] + [proc(100 + k, 1, f"svc{k}", cpu=30.0) for k in range(4)]
        ),
    )
    assert TREE.evaluate(window, rule_cfg("runaway_tree")) == []
    assert (
        TREE.evaluate(
            series(12, tree_snapshot), rule_cfg("runaway_tree", exclude={"comms": ["make"]})
        )
        == []
    )
