"""Metrics: one health report per component, exported whole, served by a real node_exporter.

The BPF tests build the daemon's parts as run() does, drive a real fork storm through real
ticks, and check every health counter of every component in the exposition text, then in
what a real prometheus-node-exporter (started here on 127.0.0.1) serves from the textfile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nodeexporter import NODE_EXPORTER, scrape_textfiles
from prometheus_client.parser import text_string_to_metric_families

from linnixd.config import load_policy
from linnixd.health import Health, collect
from linnixd.metrics import FILE_NAME, StallTotals, TextfileWriter, TopK, owner_label, render
from linnixd.model import CgroupRunqueue, Owner, StallEdge, StallSnapshot

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, through prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in parsed, f"{name}{labels} not exported"
    return parsed[key]


# ---- pure parts -----------------------------------------------------------------------------


def test_topk_series_only_grow_and_stay_bounded() -> None:
    top = TopK(2)
    top.add(("a.service",), 5.0)
    top.add(("b.service",), 1.0)
    top.add(("c.service",), 3.0)
    top.promote()
    assert set(top.own) == {("a.service",), ("c.service",)}
    assert top.own == {("a.service",): 0.0, ("c.service",): 0.0}
    assert top.other == 9.0  # what they had before their series existed stays in "other"
    before = top.other
    top.add(("a.service",), 2.0)
    for i in range(100):
        top.add((f"x{i}.scope",), 1.0)
    top.promote()
    assert len(top.own) == 2  # no slot frees up: the rest keeps going to "other"
    assert top.own[("a.service",)] == 2.0
    assert top.other == before + 100.0


def test_owner_labels_never_carry_a_pid() -> None:
    assert owner_label(Owner("unit", "cron.service", unit="cron.service")) == "cron.service"
    pod = Owner(
        "container", "cri-containerd-ab.scope", unit="cri-containerd-ab.scope", pod_uid="1-2"
    )
    assert owner_label(pod) == "pod1-2"
    totals = StallTotals(k=5)
    totals.add(
        StallSnapshot(
            runqueue={
                "/system.slice/db.service": CgroupRunqueue(
                    "/system.slice/db.service", wait_us=250_000, waits=10, hist_log2_us=()
                )
            },
            edges=(
                StallEdge(
                    victim="/system.slice/db.service",
                    culprit="/user.slice/user-0.slice/session-4.scope",
                    stall_us=200_000,
                    preemptions=3,
                ),
            ),
        )
    )
    totals.wait.promote()
    totals.caused.promote()
    totals.add(
        StallSnapshot(
            edges=(
                StallEdge(
                    victim="/system.slice/db.service",
                    culprit="/user.slice/user-0.slice/session-4.scope",
                    stall_us=100_000,
                    preemptions=1,
                ),
            )
        )
    )
    assert totals.caused.own == {("db.service", "session-4.scope"): 0.1}
    assert totals.caused.other == pytest.approx(0.2)
    assert totals.wait.other == pytest.approx(0.25)


def test_textfile_is_replaced_atomically_with_mode_0644(tmp_path: Path) -> None:
    logged: list[str] = []
    writer = TextfileWriter(str(tmp_path), logged.append)
    old = os.umask(0o077)  # the unit's UMask
    try:
        assert writer.write(b"linnixd_x 1\n")
        assert writer.write(b"linnixd_x 2\n")
    finally:
        os.umask(old)
    path = tmp_path / FILE_NAME
    assert path.read_bytes() == b"linnixd_x 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]  # no temp file left behind
    assert (writer.writes, writer.write_errors) == (2, 0)
    assert logged == []


def test_missing_or_read_only_directory_is_counted_and_said_once(tmp_path: Path) -> None:
    logged: list[str] = []
    writer = TextfileWriter(str(tmp_path / "absent"), logged.append)
    assert not writer.write(b"x 1\n")
    assert not writer.write(b"x 1\n")
    assert writer.health().counters == {"writes": 0, "write_errors": 2}
    assert len(logged) == 1 and f"{tmp_path}/absent/{FILE_NAME}" in logged[0]
    assert "No such file or directory" in logged[0]
    (tmp_path / "absent").mkdir()
    assert writer.write(b"x 1\n")
    assert logged[-1].endswith("again")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a read-only tmpfs: needs root")
def test_read_only_directory_is_counted_and_said(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        logged: list[str] = []
        writer = TextfileWriter(str(ro), logged.append)
        assert not writer.write(b"x 1\n")
        assert writer.health().counters == {"writes": 0, "write_errors": 1}
        assert logged == [f"cannot write metrics to {ro}/{FILE_NAME}: Read-only file system"]
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_failing_component_is_reported_not_raised() -> None:
    class Broken:
        def health(self) -> Health:
            raise RuntimeError("map gone")

    class Fine:
        def health(self) -> Health:
            return Health(counters={"n": 1})

    report = collect({"broken": Broken(), "fine": Fine(), "absent": None})
    assert report["fine"].counters == {"n": 1}
    assert report["health"].gauges == {"broken_unavailable": 1}


# ---- the real daemon parts ------------------------------------------------------------------

# Attributes of a component that are settings or handles, not counters (everything else that
# is an int must be in its health report under the same name).
SETTINGS = {
    "lifecycle": {
        "buffer_pages",
        "parent_entries",
        "cgroup_entries",
        "task_entries",
        "prune_after_ticks",
        "short_lived_s",
    },
    "sched": {"task_entries", "agg_entries", "ran_entries"},
    "model": {"max_processes", "max_cgroups", "pressure_gate_pct", "reconcile_s"},
    "process_table": {"sample_s"},
    "cgroups": {"max_cgroups", "min_rewalk_s"},
    "task_cpu": {"task_entries", "BATCH"},
    "history": {"max_age_days", "max_count", "prune_every_s", "snapshots_kept"},
    "incidents": {"resolve_after_s", "max_entries"},
    "enforcer": {"usage_window_s"},
    "metrics": set(),
    "daemon": {"version", "ticks_total"},
}


def counter_names(part: Any) -> set[str]:
    """Public numeric attributes and the fields of a `counters` dataclass: what a component counts."""
    names = {
        k
        for k, v in vars(part).items()
        if not k.startswith("_") and isinstance(v, int | float) and not isinstance(v, bool)
    }
    counters = getattr(part, "counters", None)
    if dataclasses.is_dataclass(counters):
        names |= {f.name for f in dataclasses.fields(counters)}
    return names


@pytest.fixture(scope="module")
def storm_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Daemon wired like run() (lifecycle + scheduler BPF, model, history, enforcer, sink) after a fork storm."""
    from conftest import bpf_unavailable

    problem = bpf_unavailable()
    if problem is not None:
        pytest.skip(problem)
    from linnixd.collector.attach import Attachments
    from linnixd.collector.lifecycle import LifecycleCollector
    from linnixd.collector.sched import SchedCollector
    from linnixd.daemon import Daemon
    from linnixd.enforcement import Enforcer
    from linnixd.history import AlertHistory
    from linnixd.hostmodel import HostModel
    from linnixd.sinks import QueuedSink

    class Collect:
        name = "memory"

        def __init__(self) -> None:
            self.alerts: list[Any] = []

        def write(self, alert: Any) -> None:
            self.alerts.append(alert)

    state = tmp_path_factory.mktemp("state")
    policy = load_policy(str(ROOT / "policy" / "rules.yaml"))
    lifecycle = LifecycleCollector(policy.daemon.short_lived_s)
    lifecycle.start()
    attachments = Attachments(make_sched=SchedCollector, make_triggers=None)
    attachments.sync(policy)
    assert attachments.sched is not None
    model = HostModel(
        max_processes=policy.daemon.max_processes,
        max_cgroups=policy.daemon.max_cgroups,
        cpu=attachments.sched.task_cpu(),
    )
    model.seed()
    history = AlertHistory(str(state / "history.db"))
    daemon = Daemon(
        "rules.yaml",
        policy,
        lifecycle=lifecycle,
        attachments=attachments,
        model=model,
        history=history,
    )
    daemon.enforcer = Enforcer(str(state), units=None, policy=lambda: daemon.policy)
    daemon.sinks.append(QueuedSink(Collect()))
    writer = TextfileWriter(str(tmp_path_factory.mktemp("textfile")), print)
    daemon.register_health("metrics", writer)
    daemon.tick()
    forks_before = _proc_forks()
    storm = subprocess.Popen(["stress-ng", "--fork", "1", "--timeout", "4s", "--quiet"])
    deadline = time.monotonic() + 30
    while storm.poll() is None and time.monotonic() < deadline:
        daemon.tick()
        time.sleep(daemon.policy.daemon.tick_s)
    storm.wait(timeout=30)
    daemon.tick()
    daemon.forks_during_storm = _proc_forks() - forks_before  # type: ignore[attr-defined]
    daemon.writer = writer  # type: ignore[attr-defined]
    try:
        yield daemon
    finally:
        daemon.close()


def _proc_forks() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    raise AssertionError("no processes line in /proc/stat")


@pytest.mark.bpf
def test_every_component_counter_is_in_health_and_in_the_metrics(storm_daemon: Any) -> None:
    daemon = storm_daemon
    parts = {
        "lifecycle": daemon.lifecycle,
        "sched": daemon.sched,
        "model": daemon.model,
        **daemon.model.parts(),
        "history": daemon.history,
        "incidents": daemon.tracker,
        "enforcer": daemon.enforcer,
        "metrics": daemon.writer,
    }
    report = daemon.health()
    assert set(parts) | {"daemon", "sink_memory"} <= set(report)
    missing = {
        name: sorted(counter_names(part) - SETTINGS[name] - set(report[name].flat()))
        for name, part in parts.items()
    }
    assert not any(missing.values()), f"counters kept but not reported: {missing}"
    parsed = samples(render(daemon).decode())
    for component, h in report.items():
        for name in h.counters:
            assert (f"linnixd_{component}_{name}_total", ()) in parsed, (component, name)
        for name in h.gauges:
            assert (f"linnixd_{component}_{name}", ()) in parsed, (component, name)


@pytest.mark.bpf
def test_fork_storm_figures_in_the_textfile(storm_daemon: Any) -> None:
    daemon = storm_daemon
    forks = daemon.forks_during_storm
    assert forks > 200, f"stress-ng made only {forks} processes"
    text = render(daemon).decode()
    parsed = samples(text)
    report = daemon.health()
    events = value(parsed, "linnixd_events_total")
    assert events == report["lifecycle"].counters["events"]
    assert events >= forks  # every creation is an event (exits and execs come on top)
    assert (
        value(parsed, "linnixd_dropped_events_total")
        == report["lifecycle"].counters["dropped_events"]
    )
    assert value(parsed, "linnixd_alerts_total", rule="fork_storm", severity="warning") >= 1
    assert value(parsed, "linnixd_build_info", version=daemon.version) == 1
    # every tick but the baseline read, which is start-up work with a gauge of its own
    assert value(parsed, "linnixd_tick_duration_seconds_count") == daemon.ticks - 1
    baseline = value(parsed, "linnixd_daemon_baseline_tick_seconds")
    assert baseline == round(daemon.baseline_tick_s, 3) > 0
    assert value(parsed, "linnixd_daemon_ticks_total") == daemon.ticks
    assert value(parsed, "linnixd_incidents_open", rule="fork_storm") in (0.0, 1.0)
    assert value(parsed, "linnixd_cgroup_runqueue_wait_seconds_total", owner="other") >= 0
    for (name, labels), _ in parsed.items():
        assert not any(k in ("pid", "tgid") for k, _ in labels), name


@pytest.fixture(scope="module")
def node_exporter_scrape(storm_daemon: Any) -> tuple[bytes, dict[Any, float], str]:
    """The textfile written, then scraped through a real prometheus-node-exporter on 127.0.0.1."""
    if NODE_EXPORTER is None:
        pytest.skip("prometheus-node-exporter is not installed")
    writer = storm_daemon.writer
    data = render(storm_daemon)
    assert writer.write(data)
    body, err = scrape_textfiles(writer.directory, "pressure")
    return data, samples(body), err


@pytest.mark.bpf
def test_real_node_exporter_serves_the_textfile(
    storm_daemon: Any, node_exporter_scrape: tuple[bytes, dict[Any, float], str]
) -> None:
    data, served, err = node_exporter_scrape
    assert value(served, "node_textfile_scrape_error") == 0, err  # no HELP/TYPE or name conflict
    mine = samples(data.decode())
    linnixd_served = {k: v for k, v in served.items() if k[0].startswith("linnixd_")}
    differ = {k: (v, linnixd_served.get(k)) for k, v in mine.items() if linnixd_served.get(k) != v}
    assert not differ and set(linnixd_served) == set(mine), differ
    assert value(served, "linnixd_events_total") >= storm_daemon.forks_during_storm
    assert value(served, "linnixd_alerts_total", rule="fork_storm", severity="warning") >= 1
    assert any(k[0] == "node_pressure_cpu_waiting_seconds_total" for k in served)


# PromQL words that are not metric names (functions are followed by "(" and skipped anyway).
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers that are not functions, keywords or labels."""
    import re

    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ($__rate_interval, 5m)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = m.group(0), text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names


def test_promql_name_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, instance) (rate(linnixd_tick_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval]))) > 0.5'
    assert promql_metric_names(expr) == {"linnixd_tick_duration_seconds_bucket"}
    assert promql_metric_names(
        'time() - node_textfile_mtime_seconds{file=~".*linnixd.prom"} > 120'
    ) == {"node_textfile_mtime_seconds"}


@pytest.mark.bpf
def test_dashboard_and_alert_rules_read_only_metrics_that_exist(
    node_exporter_scrape: tuple[bytes, dict[Any, float], str],
) -> None:
    _, served, _ = node_exporter_scrape
    exported = {name for name, _ in served}
    dashboard = json.loads((ROOT / "packaging" / "grafana" / "linnixd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((ROOT / "packaging" / "prometheus" / "linnixd-rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) > 20
    used: set[str] = set()
    for expr in exprs:
        names = promql_metric_names(expr.replace("label_values(", "f(").replace(", instance)", ")"))
        assert names, f"no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"{expr!r} reads metrics nobody exports: {sorted(missing)}"
        used |= names
    # only linnixd's own series and node_exporter's PSI (and its textfile mtime) are used
    assert all(n.startswith(("linnixd_", "node_pressure_", "node_textfile_")) for n in used), used
    assert {
        "linnixd_incidents_open",
        "linnixd_alerts_total",
        "linnixd_stall_caused_seconds_total",
    } <= used


@pytest.mark.bpf
def test_daemon_writes_the_textfile_on_its_interval_and_removes_it_at_stop(tmp_path: Path) -> None:
    policy = yaml.safe_load((ROOT / "policy" / "rules.yaml").read_text())
    policy["daemon"]["metrics_interval_s"] = 1
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(policy))
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "linnixd",
            "--foreground",
            "--no-sched",
            "--policy",
            str(tmp_path / "rules.yaml"),
            "--metrics-dir",
            str(textdir),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = textdir / FILE_NAME
    try:
        deadline = time.monotonic() + 120
        ticks: list[float] = []
        while len(ticks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                t = value(samples(path.read_text()), "linnixd_daemon_ticks_total")
                if not ticks or t > ticks[-1]:
                    ticks.append(t)
            time.sleep(0.3)
        assert len(ticks) == 2, "the textfile was not rewritten"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"metrics for node_exporter in {path}" in err
    assert not path.exists()  # node_exporter must not serve a stopped daemon's figures
