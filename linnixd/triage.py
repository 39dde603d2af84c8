"""Incident triage: one bounded snapshot of the host when an incident fires, and what its resolve measured.

The snapshot is taken once, in the tick that opens the incident, from the in-memory window
(everything the detectors saw) plus a /proc read of the culprit's own process tree only
(at most TREE_READ processes), so its cost does not grow with the number of processes on
the host. The culprit unit's systemd state is asked for afterwards, off the tick, with a
short timeout ("unknown" when systemd does not answer). While the incident is open, each
tick adds its figures to the incident's peaks; the resolve stores duration, peaks and the
effect of any action taken (pressure and the victims' run-queue wait before and after).

Snapshot layout (format 1; JSON, at most MAX_SNAPSHOT_BYTES):
    incident, rule, alert, captured_at, capture_ms, window: {...}, host: {...},
    culprit: {...}, tree: {root_pid, members: [...], total, read, gone, truncated},
    top_processes: {cpu: [...], memory: [...]},
    cgroups: {PATH: {unit, owner, cpu_pct, memory_bytes, pressure, stall_caused_ms,
                     stall_suffered_ms, runq_wait_ms, extra: {...}}},
    top_cgroups: {cpu, memory, pressure, stall_caused, stall_suffered: [PATH, ...]},
    stall: {edges: [...], unattributed_ms, unresolved_ms, migrated_waits, lost_waits, ...},
    pressure: {system: {RES: {...}}, culprit_cgroup: {RES: {...}}},
    lifecycle: {...}, unit: {...}, series: {...}, victims: [PATH, ...], omitted: [...]
A cgroup row's `extra` is where other collectors add per-cgroup fields (pod and container
names, connection rates): register a CgroupFields function with Triage.add_cgroup_fields().
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .health import Health
from .model import Alert, ProcessSample, Snapshot

SNAPSHOT_FORMAT = 1
MAX_SNAPSHOT_BYTES = 64 * 1024
TREE_READ = 64  # processes of the culprit's tree read from /proc (breadth first from the root)
TOP_N = 5  # rows per ranking
CMDLINE_KEEP = 512  # characters of a command line kept
SERIES_S = 60.0  # the culprit's series covers at most this much of the window
STALL_WINDOW_S = 10.0  # stall caused/suffered are summed over this much of the window
EXITS_KEPT = 20
EDGES_KEPT = 20
OPEN_TRACKED = 64  # open incidents whose peaks are followed; more are counted, not tracked
EFFECT_SAMPLES = 1200  # per-tick figures kept per open incident for the before/after of an action
KEPT_IN_MEMORY = 32  # recent snapshots kept in memory (explain works without a history too)
UNIT_TIMEOUT_S = 5.0
TICK_BUDGET_MS = 50.0  # capture time per tick after which trees come from the model, not /proc
FD_COUNT_MAX = 65536  # fd tables larger than this are reported by size, not listed
PROC_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk sleep",
    "Z": "zombie",
    "T": "stopped",
    "t": "tracing stop",
    "X": "dead",
    "I": "idle",
}

CgroupFields = Callable[[Snapshot, str], Mapping[str, Any]]


def _r(value: float, digits: int = 1) -> float:
    return round(float(value), digits)


# ---- the culprit's tree from /proc -------------------------------------------------------


def subtree(procs: Mapping[int, ProcessSample], root: int, limit: int) -> tuple[list[int], int]:
    """(pids of root's tree breadth first, at most `limit`; how many the model knows in all)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for p in procs.values():
        if p.pid != root:
            children[p.ppid].append(p.pid)
    order: list[int] = []
    total = 0
    queue = collections.deque([root])
    seen = {root}
    while queue:
        pid = queue.popleft()
        total += 1
        if len(order) < limit:
            order.append(pid)
        for child in sorted(children.get(pid, ())):
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return order, total


def read_process(pid: int, proc_root: str = "/proc") -> dict[str, Any] | None:
    """State, ppid, comm, threads, RSS, cmdline and open fds of one process; None when it is gone."""
    base = f"{proc_root}/{pid}"
    try:
        with open(base + "/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
        lp, rp = raw.find("("), raw.rfind(")")
        fields = raw[rp + 2 :].split()
        row: dict[str, Any] = {
            "pid": pid,
            "comm": raw[lp + 1 : rp],
            "state": PROC_STATES.get(fields[0], fields[0]),
            "ppid": int(fields[1]),
            "threads": int(fields[17]),
            "rss_bytes": int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
            "start_ticks": int(fields[19]),
        }
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(base + "/cmdline", "rb") as f:
            cmd = f.read(CMDLINE_KEEP + 1)
        text = cmd.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        row["cmdline"] = (text[:CMDLINE_KEEP] + "...") if len(text) > CMDLINE_KEEP else text
    except OSError:
        row["cmdline"] = None
    row["fds"] = _fd_count(base)
    return row


def _fd_count(base: str) -> int | None:
    """Open fds (listed only when the table is not huge; else its size, an upper bound)."""
    try:
        with open(base + "/status", "rb") as f:
            status = f.read()
        i = status.find(b"\nFDSize:")
        size = int(status[i + 8 : status.index(b"\n", i + 1)]) if i >= 0 else 0
        if size > FD_COUNT_MAX:
            return size
        return len(os.listdir(base + "/fd"))
    except (OSError, ValueError):
        return None


def read_tree(
    newest: Snapshot,
    root: int,
    proc_root: str = "/proc",
    limit: int = TREE_READ,
    from_proc: bool = True,
) -> dict[str, Any]:
    """The culprit's tree: the model gives who belongs, /proc gives each member's state now.

    from_proc=False (the tick's capture budget is spent): the model's last samples only.
    """
    pids, total = subtree(newest.processes, root, limit)
    members = []
    gone = 0
    for pid in pids:
        row = read_process(pid, proc_root) if from_proc else None
        sample = newest.processes.get(pid)
        if row is None:
            gone += from_proc
            if sample is None:
                continue
            row = {
                "pid": pid,
                "comm": sample.comm,
                "state": "gone" if from_proc else "not read",
                "ppid": sample.ppid,
                "threads": sample.threads,
                "rss_bytes": sample.rss_bytes,
                "cmdline": sample.cmdline[:CMDLINE_KEEP],
                "fds": sample.fd_count,
            }
        row.pop("start_ticks", None)
        row["cpu_pct"] = _r(sample.cpu_pct) if sample is not None else None
        members.append(row)
    return {
        "root_pid": root,
        "members": members,
        "total": total,
        "read": len(pids) if from_proc else 0,
        "from_proc": from_proc,
        "gone": gone,
        "truncated": max(0, total - len(pids)),
    }


# ---- the rest of the snapshot, from the window (pure) ------------------------------------


def _recent(window: Sequence[Snapshot], seconds: float) -> list[Snapshot]:
    if not window:
        return []
    newest = window[-1].ts
    return [s for s in window if newest - s.ts < seconds]


def _psi(sample: Any) -> dict[str, float]:
    return {
        "some_avg10": _r(sample.some_avg10, 2),
        "full_avg10": _r(sample.full_avg10, 2),
        "some_pct": _r(sample.some_pct, 2),
        "full_pct": _r(sample.full_pct, 2),
    }


def _process_row(p: ProcessSample) -> dict[str, Any]:
    return {
        "pid": p.pid,
        "comm": p.comm,
        "cgroup": p.cgroup,
        "unit": p.unit,
        "cpu_pct": _r(p.cpu_pct),
        "rss_bytes": p.rss_bytes,
        "threads": p.threads,
    }


def culprit_cgroup(alert: Alert, newest: Snapshot) -> str | None:
    c = alert.culprit
    if c.cgroup:
        return c.cgroup
    pid = c.root_pid if c.root_pid is not None else c.pid
    p = newest.processes.get(pid) if pid is not None else None
    return p.cgroup if p is not None else None


def victims_of(
    alert: Alert, caused: Mapping[tuple[str, str], int], cgroup: str | None
) -> list[str]:
    """Who suffered: the alert's own victims first, then whom the culprit's cgroup stalled most."""
    ev = alert.evidence
    out: list[str] = []
    if isinstance(ev.get("victim"), str):
        out.append(ev["victim"])
    for v in ev.get("victims") or ():
        if isinstance(v, dict) and isinstance(v.get("cgroup"), str):
            out.append(v["cgroup"])
    if cgroup is not None:
        ranked = sorted(
            ((us, victim) for (victim, culprit), us in caused.items() if culprit == cgroup),
            key=lambda t: (-t[0], t[1]),
        )
        out.extend(victim for _, victim in ranked if victim != cgroup)
    return list(dict.fromkeys(out))[:TOP_N]  # first mention wins, order kept


def build_snapshot(
    alert: Alert,
    window: Sequence[Snapshot],
    tree: Mapping[str, Any] | None,
    cgroup_fields: Sequence[CgroupFields] = (),
) -> dict[str, Any]:
    """Everything but the /proc tree read and systemd: pure over the alert and the window."""
    newest = window[-1]
    c = alert.culprit
    cgroup = culprit_cgroup(alert, newest)
    root = c.root_pid if c.root_pid is not None else c.pid
    series_snaps = _recent(window, SERIES_S)
    stall_snaps = _recent(window, STALL_WINDOW_S)

    # stall caused and suffered per cgroup over the stall window
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    waits: collections.Counter[str] = collections.Counter()
    for s in stall_snaps:
        if s.stall is None:
            continue
        for e in s.stall.edges:
            pairs[(e.victim, e.culprit)] += e.stall_us
        for path, rq in s.stall.runqueue.items():
            waits[path] += rq.wait_us
    caused: collections.Counter[str] = collections.Counter()
    suffered: collections.Counter[str] = collections.Counter()
    for (victim, culprit), us in pairs.items():
        if victim != culprit:
            caused[culprit] += us
            suffered[victim] += us

    def cpu_pct(path: str) -> float | None:
        cg = newest.cgroups.get(path)
        if cg is None or cg.cpu_usage_us is None or newest.interval_s <= 0:
            return None
        return _r(cg.cpu_usage_us / newest.interval_s / 1e4)

    def pressure_max(path: str) -> float:
        cg = newest.cgroups.get(path)
        return max((ps.some_avg10 for ps in cg.pressure.values()), default=0.0) if cg else 0.0

    def top(key: Callable[[str], float], paths: Any) -> list[str]:
        ranked = heapq.nsmallest(TOP_N, ((-key(p), p) for p in paths))
        return [p for score, p in ranked if score < 0]

    paths = list(newest.cgroups)
    top_cgroups = {
        "cpu": top(lambda p: cpu_pct(p) or 0.0, paths),
        "memory": top(lambda p: float(newest.cgroups[p].memory_bytes or 0), paths),
        "pressure": top(pressure_max, paths),
        "stall_caused": top(lambda p: float(caused[p]), caused),
        "stall_suffered": top(lambda p: float(suffered[p]), suffered),
    }
    victims = victims_of(alert, pairs, cgroup)
    named = sorted(
        {p for rows in top_cgroups.values() for p in rows}
        | set(victims)
        | ({cgroup} if cgroup else set())
    )
    cgroups: dict[str, Any] = {}
    for path in named:
        cg = newest.cgroups.get(path)
        queued = newest.stall.runqueue.get(path) if newest.stall is not None else None
        extra: dict[str, Any] = {}
        for fn in cgroup_fields:
            try:
                extra.update(fn(newest, path))
            except Exception as exc:  # an extra field must never cost the snapshot
                extra.setdefault("errors", []).append(f"{getattr(fn, '__name__', fn)}: {exc}")
        cgroups[path] = {
            "unit": cg.owner.unit if cg is not None else None,
            "owner": f"{cg.owner.kind}:{cg.owner.name}" if cg is not None else "unresolved",
            "cpu_pct": cpu_pct(path),
            "memory_bytes": cg.memory_bytes if cg is not None else None,
            "pressure": {res: _psi(ps) for res, ps in sorted(cg.pressure.items())}
            if cg is not None
            else {},
            "throttled_ms": _r(cg.throttled_us / 1000) if cg and cg.throttled_us else 0.0,
            "stall_caused_ms": _r(caused[path] / 1000),
            "stall_suffered_ms": _r(suffered[path] / 1000),
            "runq_wait_ms": _r(waits[path] / 1000),
            "runq_wait_last_tick_ms": _r(queued.wait_us / 1000) if queued is not None else 0.0,
            "extra": extra,
        }

    procs = newest.processes.values()
    top_processes = {
        "cpu": [
            _process_row(p) for p in heapq.nlargest(TOP_N, procs, key=lambda p: (p.cpu_pct, -p.pid))
        ],
        "memory": [
            _process_row(p)
            for p in heapq.nlargest(TOP_N, procs, key=lambda p: (p.rss_bytes, -p.pid))
        ],
    }

    edges = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:EDGES_KEPT]
    st = newest.stall
    stall = {
        "window_s": _r(_span(stall_snaps), 2),
        "edges": [
            {
                "victim": v,
                "culprit": cu,
                "stall_ms": _r(us / 1000),
                "share_of_victim_wait": _r(us / waits[v], 3) if waits.get(v) else None,
            }
            for (v, cu), us in edges
        ],
        "edges_total": len(pairs),
        "unattributed_ms": _r(sum(s.stall.unattributed_us for s in stall_snaps if s.stall) / 1000),
        "unresolved_ms": _r(sum(s.stall.unresolved_us for s in stall_snaps if s.stall) / 1000),
        "migrated_waits": st.migrated_waits if st else None,
        "lost_waits": st.lost_waits if st else None,
        "no_enqueue": st.no_enqueue if st else None,
        "available": st is not None,
    }

    culprit_pressure = {}
    cg_sample = newest.cgroups.get(cgroup) if cgroup else None
    if cg_sample is not None:
        culprit_pressure = {res: _psi(ps) for res, ps in sorted(cg_sample.pressure.items())}

    sample = newest.processes.get(root) if root is not None else None
    tree_pids = {m["pid"] for m in (tree or {}).get("members", ())} | (
        {root} if root is not None else set()
    )
    return {
        "format": SNAPSHOT_FORMAT,
        "incident": alert.incident,
        "rule": alert.rule,
        "alert": alert.to_dict(),
        "captured_at": _r(newest.wall, 3),
        "window": {
            "snapshots": len(window),
            "span_s": _r(_span(window), 2),
            "interval_s": _r(newest.interval_s, 3),
        },
        "host": {
            "ncpu": newest.ncpu,
            "cpu_util_pct": _r(newest.cpu_util_pct),
            "processes": len(newest.processes),
            "cgroups": len(newest.cgroups),
            "file_nr": newest.file_nr,
            "file_max": newest.file_max,
        },
        "culprit": {
            "kind": c.kind,
            "label": c.label(),
            "pid": root,
            "comm": (sample.comm if sample is not None else c.comm),
            "cgroup": cgroup,
            "unit": c.unit or (sample.unit if sample is not None else None),
            "cgroup_resolved": cgroup is not None and cg_sample is not None,
            "in_model": sample is not None,
        },
        "tree": dict(tree) if tree is not None else None,
        "top_processes": top_processes,
        "cgroups": cgroups,
        "top_cgroups": top_cgroups,
        "victims": victims,
        "stall": stall,
        "pressure": {
            "system": {res: _psi(ps) for res, ps in sorted(newest.system_pressure.items())},
            "culprit_cgroup": culprit_pressure,
        },
        "lifecycle": lifecycle(series_snaps, root, cgroup, tree_pids),
        "series": series(series_snaps, root, cgroup),
        "omitted": [],
    }


def _span(snaps: Sequence[Snapshot]) -> float:
    """Seconds the snapshots cover (each covers its own interval)."""
    if not snaps:
        return 0.0
    return snaps[-1].ts - snaps[0].ts + snaps[0].interval_s


def lifecycle(
    snaps: Sequence[Snapshot], root: int | None, cgroup: str | None, tree_pids: set[int]
) -> dict[str, Any]:
    """The culprit's forks, execs, exits and short exits per second, and its recent children's exits."""
    span = _span(snaps)
    by_parent = [0, 0, 0, 0, 0]
    by_cgroup = [0, 0, 0, 0, 0]
    exits = []
    statuses: collections.Counter[str] = collections.Counter()
    for s in snaps:
        if root is not None and root in s.by_parent:
            lc = s.by_parent[root]
            for i, v in enumerate((lc.forks, lc.threads, lc.execs, lc.exits, lc.short_exits)):
                by_parent[i] += v
        if cgroup is not None and cgroup in s.by_cgroup:
            lc = s.by_cgroup[cgroup]
            for i, v in enumerate((lc.forks, lc.threads, lc.execs, lc.exits, lc.short_exits)):
                by_cgroup[i] += v
        for e in s.exits:
            if e.pid in tree_pids or e.ppid in tree_pids:
                status = (
                    f"signal {e.signal}"
                    if e.signal is not None
                    else (f"exit {e.exit_code}" if e.exit_code is not None else "unknown")
                )
                statuses[status] += 1
                exits.append(
                    {
                        "pid": e.pid,
                        "ppid": e.ppid,
                        "comm": e.comm,
                        "status": status,
                        "lifetime_s": _r(e.lifetime_s, 3) if e.lifetime_s is not None else None,
                    }
                )
    names = ("forks", "threads", "execs", "exits", "short_exits")

    def rates(counts: list[int]) -> dict[str, Any]:
        return {
            **{n: c for n, c in zip(names, counts, strict=True)},
            **{
                f"{n}_per_s": _r(c / span, 2) if span > 0 else 0.0
                for n, c in zip(names, counts, strict=True)
            },
        }

    return {
        "window_s": _r(span, 2),
        "by_parent": rates(by_parent) if root is not None else None,
        "by_cgroup": rates(by_cgroup) if cgroup is not None else None,
        "exit_statuses": [{"status": k, "count": n} for k, n in sorted(statuses.items())],
        "recent_exits": exits[-EXITS_KEPT:],
        "exits_seen": len(exits),
    }


def series(snaps: Sequence[Snapshot], root: int | None, cgroup: str | None) -> dict[str, Any]:
    """The culprit's CPU, RSS and its cgroup's run-queue wait per tick, newest last.

    Older snapshots in the window are slim: a process missing from one used no CPU in that
    interval and had the memory of its next newer sample, so RSS is carried back from newer.
    """
    t: list[float] = []
    cpu: list[float | None] = []
    rss: list[int | None] = []
    wait: list[float | None] = []
    newer_rss: int | None = None
    newest_ts = snaps[-1].ts if snaps else 0.0
    for s in reversed(snaps):
        t.append(_r(s.ts - newest_ts, 2))
        if root is not None:
            p = s.processes.get(root)
            if p is not None:
                newer_rss = p.rss_bytes
                cpu.append(_r(p.cpu_pct))
            else:
                cpu.append(0.0 if newer_rss is not None else None)
            rss.append(newer_rss)
        elif cgroup is not None:
            cg = s.cgroups.get(cgroup)
            usage = cg.cpu_usage_us if cg is not None else None
            cpu.append(
                _r(usage / s.interval_s / 1e4) if usage is not None and s.interval_s else None
            )
            rss.append(cg.memory_bytes if cg is not None else None)
        rq = s.stall.runqueue.get(cgroup) if s.stall is not None and cgroup else None
        wait.append(_r(rq.wait_us / 1000, 2) if rq is not None else (0.0 if s.stall else None))
    out: dict[str, Any] = {
        "of": "process" if root is not None else ("cgroup" if cgroup else None),
        "t_s": t[::-1],
        "wait_ms": wait[::-1],
    }
    if root is not None or cgroup is not None:
        out["cpu_pct"] = cpu[::-1]
        out["rss_bytes" if root is not None else "memory_bytes"] = rss[::-1]
    return out


# ---- size bound -------------------------------------------------------------------------


def encode(snapshot: Mapping[str, Any]) -> str:
    return json.dumps(snapshot, sort_keys=True, separators=(",", ":"), default=str)


def bound(snapshot: dict[str, Any], limit: int = MAX_SNAPSHOT_BYTES) -> tuple[dict[str, Any], str]:
    """Shrink a snapshot until its JSON fits in `limit` bytes; what was cut is named in `omitted`."""
    text = encode(snapshot)
    steps: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("series thinned to every 4th tick", _thin_series),
        ("tree cmdlines cut to 80 characters", lambda s: _cut_cmdlines(s, 80)),
        ("tree cut to 16 members", lambda s: _cut_tree(s, 16)),
        ("recent exits cut to 5", lambda s: _cut(s, ("lifecycle", "recent_exits"), 5)),
        ("stall edges cut to 5", lambda s: _cut(s, ("stall", "edges"), 5)),
        ("alert evidence dropped", lambda s: s["alert"].__setitem__("evidence", "omitted")),
        ("cgroup extras dropped", _drop_extras),
        ("series dropped", lambda s: s.__setitem__("series", None)),
        ("tree cut to its root", lambda s: _cut_tree(s, 1)),
        ("cgroups cut to the culprit's and victims'", _cut_cgroups),
    ]
    for what, step in steps:
        if len(text.encode()) <= limit:
            break
        step(snapshot)
        snapshot["omitted"].append(what)
        text = encode(snapshot)
    if len(text.encode()) > limit:  # cannot happen with sane inputs; still never over the bound
        snapshot = {
            k: snapshot.get(k)
            for k in ("format", "incident", "rule", "captured_at", "culprit", "omitted")
        }
        snapshot["omitted"].append("everything but the culprit")
        text = encode(snapshot)
    return snapshot, text


def _thin_series(s: dict[str, Any]) -> None:
    if s.get("series"):
        s["series"] = {
            k: (v[::-4][::-1] if isinstance(v, list) else v) for k, v in s["series"].items()
        }


def _cut_cmdlines(s: dict[str, Any], n: int) -> None:
    for m in (s.get("tree") or {}).get("members", ()):
        if m.get("cmdline") and len(m["cmdline"]) > n:
            m["cmdline"] = m["cmdline"][:n] + "..."


def _cut_tree(s: dict[str, Any], n: int) -> None:
    tree = s.get("tree")
    if tree and len(tree["members"]) > n:
        tree["truncated"] += len(tree["members"]) - n
        tree["members"] = tree["members"][:n]


def _cut(s: dict[str, Any], path: tuple[str, str], n: int) -> None:
    part = s.get(path[0]) or {}
    if isinstance(part.get(path[1]), list):
        part[path[1]] = part[path[1]][:n]


def _drop_extras(s: dict[str, Any]) -> None:
    for row in s["cgroups"].values():
        row["extra"] = {}


def _cut_cgroups(s: dict[str, Any]) -> None:
    keep = set(s.get("victims") or ()) | {s["culprit"].get("cgroup")}
    s["cgroups"] = {p: r for p, r in s["cgroups"].items() if p in keep}


# ---- the daemon's part: capture, follow, resolve -----------------------------------------


@dataclass
class TriageCounters:
    captures: int = 0
    capture_errors: int = 0  # snapshots that could not be built (the alert still went out)
    store_errors: int = 0  # snapshots or resolutions the history refused
    shrunk: int = 0  # snapshots cut to fit MAX_SNAPSHOT_BYTES
    untracked: int = 0  # incidents over OPEN_TRACKED: no peaks or resolve figures
    unit_unknown: int = 0  # systemd did not tell the unit's state
    processes_gone: int = 0  # tree members that exited before /proc was read
    budget_skips: int = 0  # captures that took the tree from the model: the tick's budget was spent


@dataclass
class _Open:
    """What is followed while an incident is open."""

    snapshot: dict[str, Any]
    opened_wall: float
    pid: int | None
    cgroup: str | None
    victims: tuple[str, ...]
    peak: dict[str, float]
    samples: collections.deque[tuple[float, float, float]]  # (wall, cpu some %, victims wait ms/s)
    actions: list[dict[str, Any]]


class Triage:
    """Captures a snapshot when an incident fires, follows it while open, records its resolve."""

    def __init__(
        self,
        history: Any = None,
        units: Any = None,
        *,
        proc_root: str = "/proc",
        unit_timeout_s: float = UNIT_TIMEOUT_S,
        tick_budget_ms: float = TICK_BUDGET_MS,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.history = history
        self.units = units
        self.proc_root = proc_root
        self.unit_timeout_s = unit_timeout_s
        self.tick_budget_ms = tick_budget_ms
        self._spent_ms = 0.0  # capture time used in the current tick
        self.log = log
        self.counters = TriageCounters()
        self.capture_ms: collections.deque[float] = collections.deque(maxlen=100)
        self._cgroup_fields: list[CgroupFields] = []
        self._open: dict[str, _Open] = {}
        self._recent: collections.OrderedDict[str, tuple[dict[str, Any], dict[str, Any] | None]] = (
            collections.OrderedDict()
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    def add_cgroup_fields(self, fn: CgroupFields) -> None:
        """Add per-cgroup fields to every snapshot's cgroup rows (under `extra`)."""
        self._cgroup_fields.append(fn)

    # ---- alerts and ticks ---------------------------------------------------------------

    def on_alert(self, alert: Alert, window: Sequence[Snapshot]) -> None:
        """A firing alert gets its snapshot; a resolved one its resolution. Never raises."""
        try:
            if alert.state == "firing":
                self._capture(alert, window)
            elif alert.state == "resolved":
                self._resolve(alert)
        except Exception as exc:
            self.counters.capture_errors += 1
            self.log(f"triage of incident {alert.incident} failed: {exc!r}")

    def _capture(self, alert: Alert, window: Sequence[Snapshot]) -> None:
        if not window:
            return
        started = time.monotonic()
        newest = window[-1]
        c = alert.culprit
        root = c.root_pid if c.root_pid is not None else c.pid
        from_proc = self._spent_ms < self.tick_budget_ms
        tree = None
        if root is not None:
            tree = read_tree(newest, root, self.proc_root, from_proc=from_proc)
        if tree is not None:
            self.counters.processes_gone += tree["gone"]
            self.counters.budget_skips += not from_proc
        snap = build_snapshot(alert, window, tree, self._cgroup_fields)
        unit = snap["culprit"]["unit"]
        snap["unit"] = {"name": unit, "state": "pending" if unit and self.units else "unknown"}
        if unit and not self.units:
            snap["unit"]["error"] = "no systemd client"
        snap["capture_ms"] = _r((time.monotonic() - started) * 1000, 2)
        self._spent_ms += snap["capture_ms"]
        snap, text = bound(snap)
        self.capture_ms.append(snap.get("capture_ms", 0.0))
        self.counters.captures += 1
        if snap["omitted"]:
            self.counters.shrunk += 1
        self._remember(alert.incident, snap, None)
        self._store("store_snapshot", alert.incident, text)
        if len(self._open) < OPEN_TRACKED:
            self._open[alert.incident] = _Open(
                snapshot=snap,
                opened_wall=alert.ts,
                pid=root,
                cgroup=snap["culprit"].get("cgroup"),
                victims=tuple(snap.get("victims") or ()),
                peak={},
                samples=collections.deque(maxlen=EFFECT_SAMPLES),
                actions=[],
            )
            self.observe(newest, only=alert.incident)
        else:
            self.counters.untracked += 1
        if unit and self.units is not None:
            self._ask_systemd(alert.incident, unit, snap)

    def observe(self, snap: Snapshot, only: str | None = None) -> None:
        """Add one tick's figures to each open incident's peaks (O(open incidents))."""
        if only is None:
            self._spent_ms = 0.0  # a new tick: a new capture budget
        for incident, o in self._open.items():
            if only is not None and incident != only:
                continue
            peak = o.peak
            figures: dict[str, float] = {}
            if o.pid is not None and o.pid in snap.processes:
                p = snap.processes[o.pid]
                figures["cpu_pct"] = p.cpu_pct
                figures["rss_bytes"] = float(p.rss_bytes)
            cg = snap.cgroups.get(o.cgroup) if o.cgroup else None
            if cg is not None:
                if cg.cpu_usage_us is not None and snap.interval_s > 0:
                    figures["cgroup_cpu_pct"] = cg.cpu_usage_us / snap.interval_s / 1e4
                if cg.memory_bytes is not None:
                    figures["cgroup_memory_bytes"] = float(cg.memory_bytes)
            for res, ps in snap.system_pressure.items():
                figures[f"system_{res}_some_pct"] = ps.some_pct
            victims_wait = 0.0
            if snap.stall is not None and snap.interval_s > 0:
                caused = sum(e.stall_us for e in snap.stall.edges if e.culprit == o.cgroup)
                figures["stall_caused_ms_per_s"] = caused / 1000 / snap.interval_s
                victims_wait = (
                    sum(
                        snap.stall.runqueue[v].wait_us
                        for v in o.victims
                        if v in snap.stall.runqueue
                    )
                    / 1000
                    / snap.interval_s
                )
                figures["victims_wait_ms_per_s"] = victims_wait
            for k, v in figures.items():
                if v > peak.get(k, float("-inf")):
                    peak[k] = v
            cpu = snap.system_pressure.get("cpu")
            o.samples.append((snap.wall, cpu.some_pct if cpu else 0.0, victims_wait))

    def on_action(self, signal: str, event: Mapping[str, str]) -> None:
        """An enforcement action (ActionTaken/ActionReverted) for an open incident is noted."""
        o = self._open.get(event.get("incident") or "")
        if o is None:
            return
        o.actions.append(
            {
                "signal": signal,
                "action": event.get("action"),
                "unit": event.get("unit"),
                "before": event.get("before"),
                "after": event.get("after"),
                "at": _r(time.time(), 3),
            }
        )

    def _resolve(self, alert: Alert) -> None:
        o = self._open.pop(alert.incident, None)
        if o is None:
            return
        resolution = resolution_of(o, alert.ts)
        self._remember(alert.incident, o.snapshot, resolution)
        self._store("store_resolution", alert.incident, encode(resolution))

    # ---- systemd, off the tick ----------------------------------------------------------

    def _ask_systemd(self, incident: str, unit: str, snap: dict[str, Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            snap["unit"] = {"name": unit, "state": "unknown", "error": "no event loop"}
            self.counters.unit_unknown += 1
            return
        task = loop.create_task(self._unit_state(incident, unit, snap))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unit_state(self, incident: str, unit: str, snap: dict[str, Any]) -> None:
        try:
            state = await asyncio.wait_for(unit_state(self.units, unit), self.unit_timeout_s)
        except Exception as exc:
            reason = (
                f"systemd did not answer within {self.unit_timeout_s:g} s"
                if isinstance(exc, asyncio.TimeoutError)
                else " ".join(str(exc).splitlines()) or type(exc).__name__
            )
            state = {"name": unit, "state": "unknown", "error": reason[:200]}
            self.counters.unit_unknown += 1
        snap["unit"] = state
        snap, text = bound(snap)
        self._store("store_snapshot", incident, text)

    # ---- lookups ------------------------------------------------------------------------

    def _remember(
        self, incident: str, snap: dict[str, Any], resolution: dict[str, Any] | None
    ) -> None:
        self._recent.pop(incident, None)
        self._recent[incident] = (snap, resolution)
        while len(self._recent) > KEPT_IN_MEMORY:
            self._recent.popitem(last=False)

    def _store(self, method: str, incident: str, text: str) -> None:
        if self.history is None:
            return
        try:
            stored = getattr(self.history, method)(incident, text)
        except Exception as exc:
            stored, why = False, str(exc)
        else:
            why = "the history has no such incident (its alert was not stored)"
        if not stored:
            self.counters.store_errors += 1
            self.log(f"triage: {method} for incident {incident} failed: {why}")

    def latest(self) -> str | None:
        """The newest incident with a snapshot (history first: it outlives restarts)."""
        if self.history is not None:
            found = self.history.latest_incident()
            if found is not None:
                return str(found)
        return next(reversed(self._recent), None)

    def lookup(self, incident: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None] | None:
        """(snapshot, resolution) of an incident; None when no such incident is known."""
        if incident in self._recent:
            return self._recent[incident]
        if self.history is not None:
            found = self.history.triage(incident)
            return tuple(found) if found is not None else None  # type: ignore[return-value]
        return None

    def health(self) -> Health:
        costs = sorted(self.capture_ms)
        return Health(
            counters=asdict(self.counters),
            gauges={
                "open_tracked": len(self._open),
                "last_capture_seconds": self.capture_ms[-1] / 1000 if costs else 0.0,
                "max_capture_seconds": costs[-1] / 1000 if costs else 0.0,
            },
        )

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.units is not None and hasattr(self.units, "close"):
            self.units.close()


async def unit_state(units: Any, unit: str) -> dict[str, Any]:
    """ActiveState, NRestarts (services), CPUQuota and MemoryHigh of a unit from systemd."""
    out: dict[str, Any] = {"name": unit, "state": "known", "source": "systemd over D-Bus"}
    out["ActiveState"] = str(await units.get_property(unit, "ActiveState"))
    if unit.endswith(".service"):
        out["NRestarts"] = int(await units.get_property(unit, "NRestarts"))
    quota = int(await units.get_property(unit, "CPUQuotaPerSecUSec"))
    out["CPUQuota"] = "infinity" if quota >= 2**64 - 1 else f"{quota / 10_000:g}%"
    high = int(await units.get_property(unit, "MemoryHigh"))
    out["MemoryHigh"] = "infinity" if high >= 2**64 - 1 else high
    return out


def resolution_of(o: _Open, resolved_wall: float) -> dict[str, Any]:
    """Duration, peaks and, when an action was taken, pressure and victims' wait before and after."""
    out: dict[str, Any] = {
        "resolved_at": _r(resolved_wall, 3),
        "duration_s": _r(max(0.0, resolved_wall - o.opened_wall), 2),
        "ticks": len(o.samples),
        "peak": {k: _r(v, 2) for k, v in sorted(o.peak.items())},
        "actions": o.actions,
        "effect": None,
    }
    taken = [a for a in o.actions if a["signal"] == "ActionTaken"]
    if taken:
        at = taken[0]["at"]
        before = [s for s in o.samples if s[0] < at]
        after = [s for s in o.samples if s[0] >= at]

        def mean(rows: list[tuple[float, float, float]], i: int) -> float | None:
            return _r(sum(r[i] for r in rows) / len(rows), 2) if rows else None

        out["effect"] = {
            "action": taken[0]["action"],
            "unit": taken[0]["unit"],
            "before": {
                "samples": len(before),
                "cpu_some_pct": mean(before, 1),
                "victims_wait_ms_per_s": mean(before, 2),
            },
            "after": {
                "samples": len(after),
                "cpu_some_pct": mean(after, 1),
                "victims_wait_ms_per_s": mean(after, 2),
            },
        }
    return out
