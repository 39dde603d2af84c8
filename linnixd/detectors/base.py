"""What every detector shares: the Detector protocol, exclusion matching and window helpers."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ..model import Culprit, Finding, ProcessSample, Snapshot
from ..settings import RuleSettings

# Float slack when comparing covered time against a sustain/window length (ticks jitter by ns).
TIME_EPS = 1e-6
MIB = float(1 << 20)  # "MB" in linnixd evidence is a mebibyte: 2^20 bytes


S = TypeVar("S", bound=RuleSettings, contravariant=True)

# What a rule can ask the daemon to attach (linnixd/registry.py derives the set from the rules):
# "lifecycle" bpf/lifecycle.c (forks, execs, exits), "sched" bpf/sched.c (who ran, who waited
# behind whom), "psi_triggers" kernel PSI triggers that wake the tick, "net" bpf/net.c (TCP
# connections, retransmits, port use). /proc and cgroup files are always read.
COLLECTORS = ("lifecycle", "sched", "psi_triggers", "net")


class Detector(Protocol[S]):
    """A pure rule: a window of snapshots (oldest first) and the rule's settings in, findings out.

    `rule` is its policy key, `settings` its section's model (a RuleSettings subclass) and
    `needs` the COLLECTORS it is served by.
    """

    @property
    def rule(self) -> str: ...

    @property
    def settings(self) -> type[RuleSettings]: ...

    @property
    def needs(self) -> frozenset[str]: ...

    def evaluate(self, window: Sequence[Snapshot], cfg: S) -> list[Finding]: ...


class Exclusions:
    """The rule's `exclude` section (fnmatch globs on unit, cgroup path and comm)."""

    def __init__(self, cfg: RuleSettings) -> None:
        self.units: tuple[str, ...] = tuple(cfg.exclude.units)
        self.cgroups: tuple[str, ...] = tuple(cfg.exclude.cgroups)
        self.comms: tuple[str, ...] = tuple(cfg.exclude.comms)

    def matches(
        self, unit: str | None = None, cgroup: str | None = None, comm: str | None = None
    ) -> bool:
        """True when any given name matches its exclude list."""
        return (
            _any_match(unit, self.units)
            or _any_match(cgroup, self.cgroups)
            or _any_match(comm, self.comms)
        )

    def culprit(self, c: Culprit) -> bool:
        """True when the culprit (its unit, cgroup or comm) is excluded."""
        return self.matches(c.unit, c.cgroup, c.comm)


def _any_match(name: str | None, patterns: Iterable[str]) -> bool:
    if name is None:
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def sustained_tail(window: Sequence[Snapshot], sustain_s: float) -> Sequence[Snapshot] | None:
    """The newest snapshots whose intervals together cover the last `sustain_s` seconds.

    None when the window does not reach that far back yet (a rule cannot be sustained on
    history it has not seen).
    """
    if not window:
        return None
    newest_ts = window[-1].ts
    for i in range(len(window) - 1, -1, -1):
        snap = window[i]
        if newest_ts - (snap.ts - snap.interval_s) >= sustain_s - TIME_EPS:
            return window[i:]
    return None


def recent(window: Sequence[Snapshot], window_s: float) -> Sequence[Snapshot]:
    """The snapshots whose intervals lie within the last `window_s` seconds (may cover less)."""
    if not window:
        return window
    start = window[-1].ts - window_s
    for i, snap in enumerate(window):
        if snap.ts - snap.interval_s >= start - TIME_EPS:
            return window[i:]
    return window[len(window) :]


def covered_s(snaps: Sequence[Snapshot]) -> float:
    """Seconds covered by consecutive snapshots (newest ts minus the oldest interval's start)."""
    if not snaps:
        return 0.0
    return snaps[-1].ts - (snaps[0].ts - snaps[0].interval_s)


def process_key(p: ProcessSample) -> str:
    """Culprit key of a process: pid plus start time, so a reused pid is a new culprit."""
    return f"pid:{p.pid}:{p.start_time:g}"


def same_process(snap: Snapshot, p: ProcessSample) -> ProcessSample | None:
    """The sample of process `p` in `snap`, or None when absent or the pid now names another process."""
    q = snap.processes.get(p.pid)
    if q is None or q.start_time != p.start_time:
        return None
    return q


def process_culprit(
    p: ProcessSample, processes: Mapping[int, ProcessSample], kind: str = "process"
) -> Culprit:
    """A culprit naming process `p` and, when known, its parent."""
    parent = processes.get(p.ppid)
    return Culprit(
        kind=kind,
        pid=p.pid,
        comm=p.comm,
        cgroup=p.cgroup,
        unit=p.unit,
        parent_pid=p.ppid,
        parent_comm=parent.comm if parent is not None else None,
        root_pid=p.pid if kind == "tree" else None,
    )


def cgroup_unit(snap: Snapshot, path: str) -> str | None:
    """The systemd unit that holds a cgroup, when the snapshot knows it."""
    cg = snap.cgroups.get(path)
    if cg is None:
        return None
    return cg.owner.unit or (cg.owner.name if cg.owner.kind == "unit" else None)


def severity(cfg: RuleSettings) -> str:
    return str(cfg.severity)


def is_ancestor_cgroup(ancestor: str, path: str) -> bool:
    """True when `ancestor` strictly contains cgroup `path`."""
    if ancestor == path:
        return False
    if ancestor == "/":
        return True
    return path.startswith(ancestor.rstrip("/") + "/")


def _nearest_sampled_ancestor(path: str, sampled: Mapping[str, Any]) -> str | None:
    """The closest strict ancestor of `path` present in `sampled`, or None."""
    while path.startswith("/") and path != "/":  # anything else (an unresolved marker) has none
        path = path.rsplit("/", 1)[0] or "/"
        if path in sampled:
            return path
    return None


def fresh_processes(snap: Snapshot) -> list[ProcessSample]:
    """Samples rebuilt in the snapshot's interval: only they carry CPU figures for it."""
    procs = snap.processes
    if snap.changed is None:
        return list(procs.values())
    return [p for pid in snap.changed if (p := procs.get(pid)) is not None]


OwnCpuCache = dict[tuple[int, float], dict[str, float]]


def _own_cpu_one(s: Snapshot) -> dict[str, float]:
    """Own CPU microseconds of every cgroup in one snapshot's interval."""
    usage = {p: cg.cpu_usage_us for p, cg in s.cgroups.items() if cg.cpu_usage_us is not None}
    # a cgroup that used nothing takes nothing from its parent: only the others look up theirs
    # (most cgroups of a big host are quiet, carried with a zero delta)
    own: dict[str, float] = {}  # the parents, less their nearest sampled children's usage
    for p, used in usage.items():
        if not used:
            continue
        parent = _nearest_sampled_ancestor(p, usage)
        if parent is not None:
            own[parent] = own.get(parent, float(usage[parent])) - used
    out = {p: float(u) if u >= 0 else 0.0 for p, u in usage.items()}
    out.update({p: max(0.0, v) for p, v in own.items()})
    # cgroups without a cpu.stat delta here (first sample, synthetic): their processes' CPU
    for proc in fresh_processes(s):
        if proc.cgroup not in usage and proc.cpu_pct > 0:
            out[proc.cgroup] = out.get(proc.cgroup, 0.0) + proc.cpu_pct * s.interval_s * 1e4
    return out


def own_cpu_us(
    snaps: Sequence[Snapshot],
    paths: Iterable[str] | None = None,
    cache: OwnCpuCache | None = None,
) -> dict[str, float]:
    """CPU microseconds each cgroup's own tasks used over `snaps` (children's time taken out).

    cpu.stat's usage is hierarchical (the root's is the whole host), so a cgroup's own time is
    its usage less that of the sampled cgroups nearest below it. A snapshot without cpu.stat
    figures (synthetic, or a host that lacks them) falls back to the cgroup's processes' CPU.
    `paths` limits the result (None: every cgroup seen). `cache` (kept by the caller across
    ticks) holds each snapshot's figures, so a tick computes only its newest snapshot; entries
    of snapshots no longer in `snaps` are dropped.
    """
    wanted = set(paths) if paths is not None else None
    out: dict[str, float] = defaultdict(float)
    keys = []
    for s in snaps:
        key = (id(s.cgroups), s.ts)  # a slimmed snapshot shares its cgroups with the full one
        keys.append(key)
        one = cache.get(key) if cache is not None else None
        if one is None:
            one = _own_cpu_one(s)
            if cache is not None:
                cache[key] = one
        if wanted is None:
            for p, us in one.items():
                out[p] += us
        else:  # the few wanted of many cgroups: looked up, not filtered from all
            for p in wanted:
                if p in one:
                    out[p] += one[p]
    if cache is not None:
        live = set(keys)
        for key in [k for k in cache if k not in live]:
            del cache[key]
    return dict(out)


def log2_percentile_us(hist: Sequence[int], q: float) -> int | None:
    """Upper bound (us) of the log2 bucket holding quantile `q` of a wait histogram; None if empty."""
    total = sum(hist)
    if total <= 0:
        return None
    need = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need:
            return 1 << (i + 1)
    return 1 << len(hist)
