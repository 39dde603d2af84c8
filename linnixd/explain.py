"""What happened, in words and numbers: a deterministic explanation built only from a triage snapshot.

explain(snapshot, resolution) is pure: the same snapshot always gives the same text. Facts
are numbered in a fixed order (alert evidence, culprit, tree, lifecycle, unit, pressure,
stall, series, resolution) and each carries its figure and its source (the kernel counter,
file or rule it came from), so a reader, or a later language model, can cite them by number.
"""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import Mapping
from typing import Any

MIB = float(1 << 20)
LIFECYCLE_SRC = "bpf/lifecycle.c (tracepoints task_newtask, sched_process_exec, sched_process_exit)"
SCHED_SRC = "bpf/sched.c run-queue wait (sched_wakeup -> sched_switch)"
STAT_SRC = "/proc/PID/stat"

RULE_TITLES = {
    "fork_storm": "Fork storm",
    "short_lived_jobs": "Short-lived jobs",
    "cpu_spike": "CPU spike",
    "runaway_tree": "Runaway process tree",
    "memory_leak": "Memory leak",
    "fd_exhaustion": "File descriptor exhaustion",
    "psi_saturation": "Pressure saturation",
    "noisy_neighbour": "Noisy neighbour",
    "circuit_breaker": "CPU circuit breaker",
}

# Evidence figures worth a fact: key -> (what it is, unit, source). Order is the fact order.
EVIDENCE: dict[str, tuple[str, str, str]] = {
    "rate_per_s": ("process creations per second", "/s", LIFECYCLE_SRC),
    "forks": ("process creations in the window", "", LIFECYCLE_SRC),
    "count": ("short-lived processes in the window", "", LIFECYCLE_SRC),
    "cpu_pct": ("mean CPU over the sustain time", "% of one CPU", STAT_SRC + " utime+stime"),
    "max_cpu_pct": ("highest CPU sample", "% of one CPU", STAT_SRC + " utime+stime"),
    "subtree_cpu_pct": ("CPU of the whole tree", "% of one CPU", STAT_SRC + " utime+stime"),
    "processes": ("processes in the tree", "", "/proc PPid links"),
    "slope_mb_per_min": ("memory growth", "MiB/min", "least squares over the window"),
    "growth_mb": ("memory grown in the window", "MiB", STAT_SRC + " rss / memory.current"),
    "r2": ("fit of a straight line (R^2)", "", "least squares over the window"),
    "span_s": ("time the fitted series spans", "s", "the samples of the fit"),
    "eta_s": ("time left at this rate to the nearest limit", "s", "growth rate and headroom"),
    "headroom_mb": ("headroom to that limit", "MiB", "memory.high/memory.max or MemAvailable"),
    "fd_count": ("open file descriptors", "", "/proc/PID/fd or /proc/sys/fs/file-nr"),
    "fd_limit": ("their limit", "", "/proc/PID/limits or /proc/sys/fs/file-max"),
    "some_pct": ("share of time some task stalled", "%", "PSI some (pressure files)"),
    "full_pct": ("share of time all tasks stalled", "%", "PSI full (pressure files)"),
    "wait_ms": ("victim's run-queue wait in the window", "ms", SCHED_SRC),
    "victim_run_ms": ("victim's own CPU time in the window", "ms", "cpu.stat usage_usec"),
    "wait_share": ("victim's wait as a share of its demand (wait + run)", "", SCHED_SRC),
    "runq_p99_us": ("victim's run-queue latency, 99th percentile", "us", SCHED_SRC),
    "culprit_cpu_pct": ("culprit's CPU in the window", "% of one CPU", "cpu.stat usage_usec"),
    "culprit_share": ("share of that wait caused by other cgroups", "", SCHED_SRC),
    "throttled_ms": ("time throttled by its own CPU quota", "ms", "cpu.stat throttled_usec"),
    "cpu_some_pct": ("host CPU pressure (some)", "%", "/proc/pressure/cpu"),
    "cpu_util_pct": ("host CPU busy", "%", "/proc/stat"),
    "stall_caused_ms": ("stall caused to other cgroups", "ms", SCHED_SRC),
    "tree_cpu_pct": ("CPU of the culprit's tree", "% of one CPU", STAT_SRC + " utime+stime"),
    "cgroup_cpu_pct": ("culprit cgroup's own CPU", "% of one CPU", "cpu.stat usage_usec"),
    "cgroup_cpu_share": ("its share of the busy CPU", "", "cpu.stat and /proc/stat"),
    "rss_now_mb": ("resident memory now", "MiB", STAT_SRC + " rss"),
    "memory_now_mb": ("cgroup memory now", "MiB", "memory.current"),
    "pct": ("share of the limit in use", "%", "/proc/PID/fd and limits, or file-nr/file-max"),
    "longest_lifetime_s": ("longest lifetime among them", "s", LIFECYCLE_SRC),
    "stall_ms": ("stall time in the sustain window", "ms", "PSI total= (pressure files)"),
    "cpu_pressure_some_pct": ("victim's CPU pressure (some)", "%", "the victim's cpu.pressure"),
    "threshold_pct": ("the rule's threshold", "%", "the policy (linnixd-policy(5))"),
    "threshold_per_s": ("the rule's threshold", "/s", "the policy (linnixd-policy(5))"),
}


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n if n is not None else '?'} {noun}s"


def _mib(n: Any) -> str:
    return f"{float(n) / MIB:.1f} MiB" if isinstance(n, (int, float)) else "?"


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Facts:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, fid: str, text: str, figure: Any, unit: str, source: str) -> None:
        self.rows.append(
            {
                "n": len(self.rows) + 1,
                "id": fid,
                "text": text,
                "figure": figure,
                "unit": unit,
                "source": source,
            }
        )


def explain(
    snapshot: Mapping[str, Any], resolution: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """{headline, facts, suffered, uncertain, actions, snapshot, resolution} from one snapshot."""
    s = snapshot
    alert = s.get("alert") or {}
    rule = str(s.get("rule") or alert.get("rule") or "?")
    culprit = s.get("culprit") or {}
    label = culprit.get("label") or "?"
    raw = alert.get("evidence")
    evidence: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    state = "resolved" if resolution else "open"
    since = _when(alert.get("ts") or s.get("captured_at"))
    headline = f"{RULE_TITLES.get(rule, rule)}: {label}, since {since}"
    if resolution:
        headline += f", resolved after {resolution.get('duration_s', 0):g} s"
    else:
        headline += ", still open when the snapshot was taken"

    facts = _Facts()
    facts.add(
        "alert.summary", str(alert.get("summary", "")), None, "", f"rule {rule} (linnixd-policy(5))"
    )
    for key, (what, unit, source) in EVIDENCE.items():
        value = evidence.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            facts.add(
                f"evidence.{key}",
                f"{what}: {_num(value)}{(' ' + unit) if unit and not unit.startswith('/') else unit}",
                value,
                unit,
                f"{source}; rule {rule}",
            )
    _culprit_facts(facts, s)
    _lifecycle_facts(facts, s)
    _unit_facts(facts, s)
    _pressure_facts(facts, s)
    suffered = _suffered(facts, s)
    _series_facts(facts, s)
    if resolution:
        _resolution_facts(facts, resolution)
    return {
        "incident": s.get("incident"),
        "rule": rule,
        "state": state,
        "headline": headline,
        "facts": facts.rows,
        "suffered": suffered,
        "uncertain": _uncertain(s),
        "actions": _actions(rule, s, evidence),
        "snapshot": dict(s),
        "resolution": dict(resolution) if resolution else None,
    }


def _root(s: Mapping[str, Any]) -> Mapping[str, Any] | None:
    tree = s.get("tree") or {}
    members = tree.get("members") or []
    pid = (s.get("culprit") or {}).get("pid")
    return next((m for m in members if m.get("pid") == pid), None)


def _culprit_facts(facts: _Facts, s: Mapping[str, Any]) -> None:
    c = s.get("culprit") or {}
    root = _root(s)
    if root is not None:
        src = f"/proc/{root['pid']}/stat, /proc/{root['pid']}/cmdline, /proc/{root['pid']}/fd at capture"
        facts.add(
            "culprit.process",
            f"{root.get('comm')}[{root['pid']}] was {root.get('state')} with {_count(root.get('threads'), 'thread')}, "
            f"{_mib(root.get('rss_bytes'))} resident, {root.get('fds') if root.get('fds') is not None else '?'} open fds; "
            f"command: {root.get('cmdline') or '?'}",
            root.get("rss_bytes"),
            "bytes",
            src,
        )
        if root.get("cpu_pct") is not None:
            facts.add(
                "culprit.cpu_pct",
                f"{root.get('comm')}[{root['pid']}] used {_num(root['cpu_pct'])}% of one CPU in the last tick",
                root["cpu_pct"],
                "% of one CPU",
                STAT_SRC + " utime+stime (host model)",
            )
    tree = s.get("tree") or {}
    members = tree.get("members") or []
    if len(members) > 1 or tree.get("total", 0) > 1:
        busiest = max(members, key=lambda m: (m.get("cpu_pct") or 0.0, -m["pid"]), default=None)
        total_cpu = round(sum(m.get("cpu_pct") or 0.0 for m in members), 1)
        text = (
            f"its tree has {tree.get('total')} processes ({len(members)} read) using "
            f"{_num(total_cpu)}% of one CPU together"
        )
        if busiest is not None:
            text += f"; busiest {busiest.get('comm')}[{busiest['pid']}] {_num(busiest.get('cpu_pct') or 0.0)}%"
        facts.add(
            "culprit.tree",
            text,
            tree.get("total"),
            "processes",
            "host model PPid links, /proc/PID/stat",
        )
    cg = c.get("cgroup")
    row = (s.get("cgroups") or {}).get(cg) if cg else None
    if row is not None:
        mem = row.get("memory_bytes")
        facts.add(
            "culprit.cgroup",
            f"its cgroup {cg}{' (' + row['unit'] + ')' if row.get('unit') else ''} used "
            + (
                f"{_num(row['cpu_pct'])}% of one CPU and "
                if row.get("cpu_pct") is not None
                else "an unknown share of CPU (its cpu.stat was not read) and "
            )
            + f"{_mib(mem) if mem is not None else 'an unknown amount'} of memory",
            row.get("cpu_pct"),
            "% of one CPU",
            "cgroup cpu.stat usage_usec, memory.current",
        )


def _lifecycle_facts(facts: _Facts, s: Mapping[str, Any]) -> None:
    lc = s.get("lifecycle") or {}
    for scope in ("by_parent", "by_cgroup"):
        r = lc.get(scope)
        if not r or not any(r.get(k) for k in ("forks", "execs", "exits")):
            continue
        who = "the culprit process" if scope == "by_parent" else "its cgroup"
        facts.add(
            f"lifecycle.{scope}",
            f"{who} created {_num(r['forks_per_s'])} processes/s, exec'd {_num(r['execs_per_s'])}/s, "
            f"saw {_num(r['exits_per_s'])} exits/s ({r.get('short_exits', 0)} short-lived) over "
            f"{_num(lc.get('window_s', 0.0))} s",
            r["forks_per_s"],
            "/s",
            LIFECYCLE_SRC,
        )
    statuses = lc.get("exit_statuses") or []
    if statuses:
        text = ", ".join(f"{x['status']} x{x['count']}" for x in statuses)
        facts.add(
            "lifecycle.exit_statuses",
            f"its children ended with: {text}",
            sum(x["count"] for x in statuses),
            "exits",
            "bpf/lifecycle.c (sys_enter_exit_group, signal_deliver, sched_process_exit)",
        )


def _unit_facts(facts: _Facts, s: Mapping[str, Any]) -> None:
    u = s.get("unit") or {}
    if u.get("state") != "known":
        return
    parts = [f"ActiveState={u.get('ActiveState')}"]
    if "NRestarts" in u:
        parts.append(f"NRestarts={u['NRestarts']}")
    parts.append(f"CPUQuota={u.get('CPUQuota')}")
    parts.append(f"MemoryHigh={u.get('MemoryHigh')}")
    facts.add(
        "unit.state",
        f"systemd unit {u.get('name')}: " + ", ".join(parts),
        u.get("NRestarts"),
        "restarts",
        "systemd over D-Bus (org.freedesktop.systemd1)",
    )


def _pressure_facts(facts: _Facts, s: Mapping[str, Any]) -> None:
    system = (s.get("pressure") or {}).get("system") or {}
    if system:
        text = ", ".join(
            f"{res} {_num(v['some_avg10'])}% (last tick {_num(v['some_pct'])}%)"
            for res, v in sorted(system.items())
        )
        cpu = system.get("cpu", {}).get("some_avg10")
        facts.add(
            "pressure.system",
            f"host pressure (some, avg10): {text}",
            cpu,
            "%",
            "/proc/pressure/{cpu,io,memory}",
        )
    host = s.get("host") or {}
    if host:
        facts.add(
            "host.cpu",
            f"host CPU busy {_num(host.get('cpu_util_pct', 0.0))}% of {host.get('ncpu')} CPUs; "
            f"{host.get('processes')} processes and {host.get('cgroups')} cgroups tracked",
            host.get("cpu_util_pct"),
            "%",
            "/proc/stat",
        )


def _suffered(facts: _Facts, s: Mapping[str, Any]) -> list[dict[str, Any]]:
    c = s.get("culprit") or {}
    cg = c.get("cgroup")
    rows = s.get("cgroups") or {}
    stall = s.get("stall") or {}
    by_victim: dict[str, float] = {}
    for e in stall.get("edges") or []:
        if cg and e.get("culprit") == cg and e.get("victim") != cg:
            by_victim[e["victim"]] = by_victim.get(e["victim"], 0.0) + float(
                e.get("stall_ms") or 0.0
            )
    out = []
    for v in s.get("victims") or []:
        row = rows.get(v) or {}
        out.append(
            {
                "cgroup": v,
                "unit": row.get("unit"),
                "stall_from_culprit_ms": round(by_victim.get(v, 0.0), 1),
                "runq_wait_ms": row.get("runq_wait_ms"),
                "cpu_some_avg10": ((row.get("pressure") or {}).get("cpu") or {}).get("some_avg10"),
            }
        )
    if cg and by_victim:
        total = round(sum(by_victim.values()), 1)
        named = ", ".join(
            f"{v} {by_victim[v]:.1f} ms"
            for v in sorted(by_victim, key=lambda k: (-by_victim[k], k))[:3]
        )
        facts.add(
            "stall.caused",
            f"{cg} made other cgroups wait {total} ms for a CPU in the last {_num(stall.get('window_s', 0.0))} s: {named}",
            total,
            "ms",
            SCHED_SRC,
        )
    return out


def _series_facts(facts: _Facts, s: Mapping[str, Any]) -> None:
    se = s.get("series") or {}
    cpu = [v for v in se.get("cpu_pct") or [] if v is not None]
    t = se.get("t_s") or []
    if cpu and t:
        facts.add(
            "series.cpu",
            f"over the last {_num(-float(t[0]))} s its CPU ranged {_num(min(cpu))}-{_num(max(cpu))}% "
            f"(mean {_num(sum(cpu) / len(cpu))}%) in {len(cpu)} ticks",
            max(cpu),
            "% of one CPU",
            "the daemon's in-memory window",
        )
    mem = [v for v in (se.get("rss_bytes") or se.get("memory_bytes") or []) if v is not None]
    if mem and t and max(mem) > 0:
        facts.add(
            "series.memory",
            f"over the same time its memory went from {_mib(mem[0])} to {_mib(mem[-1])} (peak {_mib(max(mem))})",
            mem[-1],
            "bytes",
            "the daemon's in-memory window",
        )


def _resolution_facts(facts: _Facts, r: Mapping[str, Any]) -> None:
    peak = r.get("peak") or {}
    text = ", ".join(f"{k} {_num(v)}" for k, v in sorted(peak.items()))
    facts.add(
        "resolution.duration",
        f"resolved after {_num(float(r.get('duration_s', 0.0)))} s over {r.get('ticks')} ticks; peaks: {text or 'none'}",
        r.get("duration_s"),
        "s",
        "the daemon's ticks while the incident was open",
    )
    eff = r.get("effect")
    if eff:
        b, a = eff.get("before") or {}, eff.get("after") or {}
        facts.add(
            "resolution.effect",
            f"after {eff.get('action')} on {eff.get('unit')}: host CPU pressure "
            f"{b.get('cpu_some_pct')}% -> {a.get('cpu_some_pct')}%, victims' run-queue wait "
            f"{b.get('victims_wait_ms_per_s')} -> {a.get('victims_wait_ms_per_s')} ms/s",
            a.get("cpu_some_pct"),
            "%",
            "/proc/pressure/cpu; " + SCHED_SRC,
        )


# What the scheduler evidence could not attribute: (stall key, what its figure counts).
_STALL_GAPS = (
    ("unattributed_ms", "ms of run-queue wait could not be attributed to a culprit"),
    ("unresolved_ms", "ms of stall is in cgroups whose path could not be resolved"),
    ("migrated_waits", "waits ended on another CPU than they were queued on (since attach)"),
    ("lost_waits", "waits were lost: the task's cgroup was never seen (since attach)"),
)


def _uncertain(s: Mapping[str, Any]) -> list[str]:
    out = []
    c = s.get("culprit") or {}
    stall = s.get("stall") or {}
    tree = s.get("tree") or {}
    if not stall.get("available"):
        out.append("no scheduler evidence (bpf/sched.c not loaded): nobody is named for CPU waits")
    else:
        out += [f"{stall[key]} {what}" for key, what in _STALL_GAPS if stall.get(key)]
    if c.get("cgroup") and not c.get("cgroup_resolved"):
        out.append(f"the culprit's cgroup {c['cgroup']} was not among the sampled cgroups")
    if c.get("pid") is not None and not c.get("in_model"):
        out.append(f"the culprit pid {c['pid']} was no longer in the process table")
    if tree and tree.get("from_proc") is False:
        out.append(
            "its tree is the model's last sample, not read from /proc: many incidents fired in one tick"
        )
    if tree.get("gone"):
        out.append(f"{tree['gone']} processes of its tree exited before /proc was read")
    if tree.get("truncated"):
        out.append(f"{tree['truncated']} processes of its tree are not in the snapshot (bounded)")
    u = s.get("unit") or {}
    if u.get("name") and u.get("state") != "known":
        out.append(
            f"the state of {u['name']} is {u.get('state')}: {u.get('error', 'no answer yet')}"
        )
    if s.get("omitted"):
        out.append("cut to fit 64 KiB: " + "; ".join(s["omitted"]))
    return out


def _quota_pct(cpu: float | None) -> int:
    """A CPUQuota that halves what the culprit used, in steps of 10 %, at least 10 %."""
    if not cpu:
        return 50
    return max(10, int(cpu / 2 / 10) * 10)


def _actions(rule: str, s: Mapping[str, Any], evidence: Mapping[str, Any]) -> list[dict[str, str]]:
    c = s.get("culprit") or {}
    unit = c.get("unit") or ((s.get("unit") or {}).get("name"))
    pid = c.get("pid")
    root = _root(s) or {}
    out: list[dict[str, str]] = []
    cpu_rules = {
        "cpu_spike",
        "runaway_tree",
        "noisy_neighbour",
        "circuit_breaker",
        "psi_saturation",
    }
    cpu = None
    for key in ("subtree_cpu_pct", "tree_cpu_pct", "cpu_pct"):
        if isinstance(evidence.get(key), (int, float)):
            cpu = float(evidence[key])
            break
    if cpu is None:
        cpu = ((s.get("cgroups") or {}).get(c.get("cgroup")) or {}).get("cpu_pct")
    q = shlex.quote(unit) if unit else None
    if q and rule in cpu_rules:
        pct = _quota_pct(cpu)
        out.append(
            {
                "command": f"linnixctl throttle {q} --cpu {pct} --duration 300",
                "why": f"cap it at {pct}% of one CPU for 5 minutes (reverted by linnixd; polkit org.linnix.linnixd1.act)",
            }
        )
        out.append(
            {
                "command": f"systemctl set-property --runtime {q} CPUQuota={pct}%",
                "why": "the same cap by hand, until reboot or until you set it back",
            }
        )
    if q and rule == "memory_leak":
        now = evidence.get("rss_now_mb") or evidence.get("memory_now_mb")
        high = int((float(now) if isinstance(now, (int, float)) else 512.0) * 1.1)
        out.append(
            {
                "command": f"systemctl set-property --runtime {q} MemoryHigh={high}M",
                "why": "reclaim hard above about 10% more than it holds now, slowing the leak",
            }
        )
    if q and rule in ("fork_storm", "short_lived_jobs"):
        out.append(
            {
                "command": f"systemctl set-property --runtime {q} TasksMax=512",
                "why": "bound how many tasks the unit can have at once",
            }
        )
    if q:
        out.append(
            {"command": f"systemctl status {q}", "why": "its state, main pid and last log lines"}
        )
        since = _when((s.get("alert") or {}).get("ts")).replace(" UTC", "")
        out.append(
            {
                "command": f"journalctl -u {q} --since {shlex.quote(since + ' UTC')}",
                "why": "what it logged since the incident began",
            }
        )
    if pid is not None and root.get("state") not in (None, "gone"):
        out.append(
            {
                "command": f"ps -o pid,ppid,stat,etime,pcpu,rss,cmd --forest -p {int(pid)} --ppid {int(pid)}",
                "why": "its process tree now",
            }
        )
        if not unit:
            out.append(
                {
                    "command": f"kill -TERM {int(pid)}",
                    "why": "no systemd unit to throttle: stopping it is the remaining lever",
                }
            )
    if not q and pid is None:
        out.append(
            {
                "command": "linnixctl stalls",
                "why": "who makes whom wait for a CPU right now",
            }
        )
        out.append(
            {
                "command": "linnixctl top",
                "why": "cgroups by pressure, CPU and stall, live",
            }
        )
    if rule == "fd_exhaustion" and pid is not None:
        out.append(
            {
                "command": f"ls -l /proc/{int(pid)}/fd | head -50",
                "why": "what the open fds point at",
            }
        )
    return out


def render(e: Mapping[str, Any]) -> list[str]:
    """The explanation as text lines for a terminal."""
    lines = [str(e["headline"]), ""]
    lines.append("Facts:")
    for f in e["facts"]:
        lines.append(f"  {f['n']:>2}. {f['text']}  [{f['source']}]")
    if e["suffered"]:
        lines.append("")
        lines.append("Who suffered:")
        for v in e["suffered"]:
            lines.append(
                f"  {v['cgroup']}{' (' + v['unit'] + ')' if v.get('unit') else ''}: "
                f"{v['stall_from_culprit_ms']} ms waiting behind the culprit, "
                f"{v.get('runq_wait_ms') if v.get('runq_wait_ms') is not None else '?'} ms run-queue wait in all, "
                f"cpu pressure {v.get('cpu_some_avg10') if v.get('cpu_some_avg10') is not None else '?'}%"
            )
    if e["uncertain"]:
        lines.append("")
        lines.append("Uncertain:")
        lines.extend(f"  - {u}" for u in e["uncertain"])
    if e["actions"]:
        lines.append("")
        lines.append("What you can do:")
        for a in e["actions"]:
            lines.append(f"  $ {a['command']}")
            lines.append(f"      {a['why']}")
    return lines
