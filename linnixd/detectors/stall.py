"""Stall-attribution rules: noisy_neighbour (who stalls whom) and circuit_breaker (host-wide).

Both blame by what a culprit took, never by what a victim suffered alone: a cgroup is a noisy
neighbour only when, over the window, it used more CPU than its fair share next to the victim
and the victim was kept from its own; circuit_breaker names the cgroup (and the tree in it)
that held the CPU, by CPU time measured over the sustain window.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..model import Culprit, Finding, ProcessSample, PsiSample, Snapshot
from ..settings import Field, RuleSettings, Severity, cooldown, percent, seconds, top_n
from .base import (
    Exclusions,
    OwnCpuCache,
    cgroup_unit,
    covered_s,
    fresh_processes,
    log2_percentile_us,
    own_cpu_us,
    process_culprit,
    process_key,
    recent,
    severity,
    sustained_tail,
)

# cpu "some" pressure (percent of the interval, window mean) that counts as pressure even
# when the 10 s average did not rise: a cgroup stalled steadily is still stalled.
PRESSURE_FLOOR_PCT = 1.0
# Share of the victim's wait that its own quota throttling must reach to be the explanation.
THROTTLE_EXPLAINS_SHARE = 0.5
# circuit_breaker: a tree stands for its cgroup when it used at least this share of the
# cgroup's CPU; below, the cgroup itself is named (its CPU went to processes that came and went).
TREE_EXPLAINS_SHARE = 0.5
# A child subtree holding this share of its parent's subtree CPU is the more specific culprit.
DOMINANT_CHILD_SHARE = 0.8


def _who(path: str, unit: str | None) -> str:
    return unit or path


def stall_by_pair(snaps: Sequence[Snapshot]) -> dict[str, dict[str, tuple[int, int]]]:
    """victim -> culprit -> (stall us, preemptions) summed over the snapshots."""
    out: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for s in snaps:
        if s.stall is None:
            continue
        for e in s.stall.edges:
            us, pre = out[e.victim].get(e.culprit, (0, 0))
            out[e.victim][e.culprit] = (us + e.stall_us, pre + e.preemptions)
    return out


def _pressure(snaps: Sequence[Snapshot], path: str) -> list[PsiSample]:
    out = []
    for s in snaps:
        cg = s.cgroups.get(path)
        if cg is not None and "cpu" in cg.pressure:
            out.append(cg.pressure["cpu"])
    return out


def fair_shortfall_us(run_v: float, wait_v: float, run_c: float) -> float:
    """CPU time the victim was kept from below its fair share next to the culprit (>= 0).

    The two used run_v + run_c between them; max-min fairness gives the victim its demand
    (run_v + wait_v) up to half of that. What it got less is what the culprit took beyond its
    own share. Two equal hogs each get half: no shortfall, whatever either waited.
    """
    fair_v = min(run_v + wait_v, (run_v + run_c) / 2)
    return max(0.0, fair_v - run_v)


class NoisyNeighbour(RuleSettings):
    """noisy_neighbour: a cgroup waiting `min_wait_ms` for CPU over `window_s`, mostly behind one other."""

    min_wait_ms: float = Field(100.0, gt=0, le=3_600_000)
    window_s: float = seconds(10.0)
    min_culprit_share: float = Field(0.5, gt=0, le=1)
    min_wait_share: float = Field(0.1, gt=0, le=1)
    top: int = top_n(3)


class NoisyNeighbourDetector:
    """A cgroup kept from its fair share of CPU by a neighbour that took more than its own."""

    rule = "noisy_neighbour"
    settings = NoisyNeighbour
    needs = frozenset({"sched"})

    def __init__(self) -> None:
        self._own_cpu: OwnCpuCache = {}  # own CPU per snapshot, reused while it is in the window

    def evaluate(self, window: Sequence[Snapshot], cfg: NoisyNeighbour) -> list[Finding]:
        snaps = [s for s in recent(window, float(cfg.window_s)) if s.stall is not None]
        if not snaps:
            return []
        excl = Exclusions(cfg)
        newest = snaps[-1]
        window_s = covered_s(snaps)
        waits: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
        hists: dict[str, list[int]] = {}
        for s in snaps:
            assert s.stall is not None
            for path, rq in s.stall.runqueue.items():
                us, n = waits[path]
                waits[path] = (us + rq.wait_us, n + rq.waits)
                h = hists.setdefault(path, [0] * len(rq.hist_log2_us))
                for i, c in enumerate(rq.hist_log2_us[: len(h)]):
                    h[i] += c
        pairs = stall_by_pair(snaps)
        candidates = []
        for victim, (wait_us, nwaits) in sorted(waits.items()):
            if wait_us < float(cfg.min_wait_ms) * 1000 or wait_us <= 0:
                continue
            psi = _pressure(snaps, victim)
            if not psi:
                continue  # no pressure evidence for this cgroup: the rule cannot confirm a stall
            mean_some = sum(p.some_pct for p in psi) / len(psi)
            if not (psi[-1].some_avg10 > psi[0].some_avg10 or mean_some >= PRESSURE_FLOOR_PCT):
                continue
            candidates.append((victim, wait_us, nwaits, psi, mean_some))
        if not candidates:
            return []
        wanted = {v for v, *_ in candidates}
        for v, *_ in candidates:
            wanted |= set(pairs.get(v, {}))
        run = own_cpu_us(snaps, wanted, self._own_cpu)
        findings: list[Finding] = []
        contended: dict[frozenset[str], Finding] = {}  # reported once per pair, if no one is blamed
        for victim, wait_us, nwaits, psi, mean_some in candidates:
            victim_unit = cgroup_unit(newest, victim)
            run_v = run.get(victim, 0.0)
            demand = run_v + wait_us
            hist = hists.get(victim, [])
            evidence: dict[str, Any] = {
                "victim": victim,
                "victim_unit": victim_unit,
                "window_s": round(window_s, 2),
                "victim_run_ms": round(run_v / 1000, 1),
                "wait_ms": round(wait_us / 1000, 1),
                "waits": nwaits,
                "wait_share": round(wait_us / demand, 3) if demand > 0 else 0.0,
                "runq_p50_us": log2_percentile_us(hist, 0.5),
                "runq_p99_us": log2_percentile_us(hist, 0.99),
                "cpu_pressure_avg10_start": psi[0].some_avg10,
                "cpu_pressure_avg10_end": psi[-1].some_avg10,
                "cpu_pressure_some_pct": round(mean_some, 1),
            }
            throttled_us, nr_throttled = self._throttling(snaps, victim)
            evidence["throttled_ms"] = round(throttled_us / 1000, 1)
            evidence["nr_throttled"] = nr_throttled
            if nr_throttled > 0 and throttled_us >= THROTTLE_EXPLAINS_SHARE * wait_us:
                evidence["explained_by"] = "own_cpu_quota"
                culprit = Culprit(kind="cgroup", cgroup=victim, unit=victim_unit)
                if excl.culprit(culprit):
                    continue
                findings.append(
                    Finding(
                        rule=self.rule,
                        key=f"quota:cgroup:{victim}",
                        severity=severity(cfg),
                        summary=(
                            f"{_who(victim, victim_unit)}'s own CPU quota throttled it "
                            f"{nr_throttled} times ({throttled_us / 1000:.0f} ms) in the last "
                            f"{window_s:.1f} s: the stall is its quota, not a neighbour"
                        ),
                        culprit=culprit,
                        evidence=evidence,
                    )
                )
                continue
            others = {c: v for c, v in pairs.get(victim, {}).items() if c != victim}
            other_us = sum(us for us, _ in others.values())
            share = other_us / wait_us
            if share < float(cfg.min_culprit_share) or demand <= 0:
                continue
            if wait_us / demand < float(cfg.min_wait_share):
                continue  # it waited, but little next to what it ran: not kept from its work
            min_short = float(cfg.min_wait_share) * demand
            ranked = sorted(others.items(), key=lambda kv: -kv[1][0])
            top: list[dict[str, Any]] = []
            contender = None
            for path, (us, pre) in ranked:
                unit = cgroup_unit(newest, path)
                if excl.matches(unit=unit, cgroup=path):
                    continue
                run_c = run.get(path, 0.0)
                short = fair_shortfall_us(run_v, wait_us, run_c)
                if short < min_short:
                    # it did not take more than its share; when it ran at least as much as the
                    # victim, the two contend (a victim that ran more was not held back)
                    if contender is None and run_c >= run_v:
                        contender = (path, unit, us, run_c)
                    continue
                top.append(
                    {
                        "cgroup": path,
                        "unit": unit,
                        "stall_ms": round(us / 1000, 1),
                        "share": round(us / wait_us, 3),
                        "preemptions": pre,
                        "run_ms": round(run_c / 1000, 1),
                        "cpu_pct": round(run_c / window_s / 1e4, 1) if window_s > 0 else 0.0,
                        "fair_share_ms": round((run_c - short) / 1000, 1),
                        "victim_shortfall_ms": round(short / 1000, 1),
                    }
                )
            self_ms = round(pairs.get(victim, {}).get(victim, (0, 0))[0] / 1000, 1)
            if not top:
                if contender is not None:
                    pair = frozenset((victim, contender[0]))
                    if pair not in contended:
                        contended[pair] = self._contention(
                            victim, victim_unit, contender, evidence, cfg
                        )
                continue
            top = top[: cfg.top]
            first = top[0]
            evidence.update(
                explained_by="neighbours",
                culprit_share=round(share, 3),
                self_stall_ms=self_ms,
                top_culprits=top,
                culprit_run_ms=first["run_ms"],
                culprit_cpu_pct=first["cpu_pct"],
                culprit_preemptions=first["preemptions"],
                throttling_explains=False,
            )
            findings.append(
                Finding(
                    rule=self.rule,
                    key=f"cgroup:{first['cgroup']}->cgroup:{victim}",
                    severity=severity(cfg),
                    summary=(
                        f"{_who(first['cgroup'], first['unit'])} took {first['cpu_pct']:.0f}% "
                        f"of a CPU and caused {first['stall_ms']:.0f} ms of stall to "
                        f"{_who(victim, victim_unit)} (which ran {run_v / 1000:.0f} ms and waited "
                        f"{evidence['wait_share']:.0%} of its demand) in the last {window_s:.1f} s"
                    ),
                    culprit=Culprit(kind="cgroup", cgroup=first["cgroup"], unit=first["unit"]),
                    evidence=evidence,
                )
            )
        blamed = {
            frozenset((f.evidence["victim"], f.culprit.cgroup))
            for f in findings
            if f.culprit.cgroup is not None
        }
        findings += [f for pair, f in contended.items() if pair not in blamed]
        return findings

    def _contention(
        self,
        victim: str,
        victim_unit: str | None,
        contender: tuple[str, str | None, int, float],
        evidence: dict[str, Any],
        cfg: NoisyNeighbour,
    ) -> Finding:
        """Two cgroups that each got about their share while waiting on each other: no blame."""
        path, unit, us, run_c = contender
        a, b = sorted((victim, path))
        evidence = dict(
            evidence,
            explained_by="contention",
            contender=path,
            contender_unit=unit,
            contender_run_ms=round(run_c / 1000, 1),
            stall_ms=round(us / 1000, 1),
        )
        return Finding(
            rule=self.rule,
            key=f"contention:cgroup:{a}+cgroup:{b}",
            severity="info",
            summary=(
                f"{_who(victim, victim_unit)} and {_who(path, unit)} contend for CPU "
                f"({evidence['victim_run_ms']:.0f} ms and {run_c / 1000:.0f} ms run, "
                f"{us / 1000:.0f} ms waited behind the other in the last "
                f"{evidence['window_s']:.1f} s): neither took more than its share"
            ),
            culprit=Culprit(kind="system"),
            evidence=evidence,
        )

    @staticmethod
    def _throttling(snaps: Sequence[Snapshot], path: str) -> tuple[int, int]:
        us = n = 0
        for s in snaps:
            cg = s.cgroups.get(path)
            if cg is not None:
                us += cg.throttled_us or 0
                n += cg.nr_throttled or 0
        return us, n


class CircuitBreaker(RuleSettings):
    """circuit_breaker: host CPU above `cpu_util_pct` with pressure above `cpu_some_pct` for `sustain_s`."""

    severity: Severity = "critical"
    cooldown_s: float = cooldown(600.0)
    cpu_some_pct: float = percent(40.0)
    cpu_util_pct: float = percent(90.0)
    sustain_s: float = Field(15.0, gt=0, le=3600)
    min_cpu_share: float = Field(0.3, gt=0, le=1)


class CircuitBreakerDetector:
    """Sustained host CPU saturation with pressure: names the cgroup and tree that held the CPU."""

    rule = "circuit_breaker"
    settings = CircuitBreaker
    needs = frozenset({"sched"})

    def __init__(self) -> None:
        self._own_cpu: OwnCpuCache = {}

    def evaluate(self, window: Sequence[Snapshot], cfg: CircuitBreaker) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        for s in tail:
            cpu = s.system_pressure.get("cpu")
            if (
                cpu is None
                or cpu.some_pct <= float(cfg.cpu_some_pct)
                or s.cpu_util_pct <= float(cfg.cpu_util_pct)
            ):
                return []
        excl = Exclusions(cfg)
        newest = tail[-1]
        seconds = covered_s(tail)
        busy_us = sum(s.cpu_util_pct * s.ncpu * s.interval_s * 1e4 for s in tail)
        by_cgroup = own_cpu_us(tail, cache=self._own_cpu)
        ranked = sorted(by_cgroup.items(), key=lambda kv: -kv[1])
        path, cg_us = next(
            (
                (c, us)
                for c, us in ranked
                if not excl.matches(unit=cgroup_unit(newest, c), cgroup=c)
            ),
            (None, 0.0),
        )
        min_share = float(cfg.min_cpu_share)
        if path is None or busy_us <= 0 or cg_us < min_share * busy_us:
            return []  # nobody held the CPU: the load is spread (or excluded)
        unit = cgroup_unit(newest, path)
        caused = 0
        victims: dict[str, int] = defaultdict(int)
        for victim, row in stall_by_pair(tail).items():
            us = row.get(path, (0, 0))[0]
            if victim != path and us:  # what it caused others; its own tasks' wait is not that
                caused += us
                victims[victim] += us
        root, tree_us, tree_pids = _top_tree(tail, path, excl)
        if root is not None and tree_us >= TREE_EXPLAINS_SHARE * cg_us:
            culprit = process_culprit(root, newest.processes, kind="tree")
            key = process_key(root)
        elif path == "/":
            return []  # the root cgroup is the whole host: without a tree that holds it, no one
        else:
            culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
            key = f"cgroup:{path}"
        n = len(tail)
        some = sum(s.system_pressure["cpu"].some_pct for s in tail) / n
        util = sum(s.cpu_util_pct for s in tail) / n
        cpu_pct = cg_us / seconds / 1e4 if seconds > 0 else 0.0
        stall_ms = caused / 1000
        top_victims = sorted(victims.items(), key=lambda kv: -kv[1])[:3]
        evidence = {
            "basis": "cpu_time",
            "cgroup": path,
            "unit": unit,
            "cpu_some_pct": round(some, 1),
            "cpu_util_pct": round(util, 1),
            "sustained_s": round(seconds, 2),
            "cgroup_cpu_pct": round(cpu_pct, 1),
            "cgroup_cpu_share": round(cg_us / busy_us, 3),
            "tree_cpu_pct": round(tree_us / seconds / 1e4, 1) if seconds > 0 else 0.0,
            "tree_pids": tree_pids,
            "stall_caused_ms": round(stall_ms, 1),
            "victims": [{"cgroup": v, "stall_ms": round(us / 1000, 1)} for v, us in top_victims],
        }
        return [
            Finding(
                rule=self.rule,
                key=key,
                severity=severity(cfg),
                summary=(
                    f"{culprit.label()} held {cpu_pct:.0f}% of a CPU "
                    f"({cg_us / busy_us:.0%} of the busy CPU) while the host ran at {util:.0f}% "
                    f"with {some:.0f}% cpu pressure for {seconds:.1f} s, "
                    f"and stalled others for {stall_ms:.0f} ms"
                ),
                culprit=culprit,
                evidence=evidence,
            )
        ]


def _top_tree(
    tail: Sequence[Snapshot], path: str, excl: Exclusions
) -> tuple[ProcessSample | None, float, int]:
    """The smallest process tree in cgroup `path` holding most of its CPU over the tail.

    Returns its root, its CPU microseconds and its size. Starting from the busiest top-level
    tree, it descends while one child's subtree holds DOMINANT_CHILD_SHARE of the CPU; it
    never names init (pid 1) or kthreadd (pid 2), whose trees are the whole host.
    """
    members = {pid: p for pid, p in tail[-1].processes.items() if p.cgroup == path}
    if not members:
        return None, 0.0, 0
    cpu: dict[tuple[int, float], float] = defaultdict(float)
    for s in tail:
        for p in fresh_processes(s):
            if p.cgroup == path:
                cpu[(p.pid, p.start_time)] += p.cpu_pct * s.interval_s * 1e4
    children: dict[int, list[int]] = defaultdict(list)
    roots = []
    for pid, p in members.items():
        if p.ppid in members and p.ppid != pid:
            children[p.ppid].append(pid)
        else:
            roots.append(pid)
    subtree: dict[int, tuple[float, int]] = {}

    def total(pid: int) -> tuple[float, int]:
        # iterative post-order: trees can be deep
        stack = [(pid, False)]
        seen: set[int] = set()
        while stack:
            node, done = stack.pop()
            if done:
                us = cpu[(node, members[node].start_time)]
                n = 1
                for c in children.get(node, ()):
                    cu, cn = subtree.get(c, (0.0, 0))
                    us, n = us + cu, n + cn
                subtree[node] = (us, n)
            elif node not in seen:
                seen.add(node)
                stack.append((node, True))
                stack.extend((c, False) for c in children.get(node, ()) if c not in seen)
        return subtree[pid]

    for r in roots:
        total(r)
    best = max(roots, key=lambda r: subtree[r][0])
    node = best
    while True:
        us = subtree[node][0]
        kids = children.get(node, ())
        top = max(kids, key=lambda c: subtree[c][0], default=None)
        if top is not None and us > 0 and subtree[top][0] >= DOMINANT_CHILD_SHARE * us:
            node = top
            continue
        if node in (1, 2) and top is not None:
            node = top  # never the whole host: its busiest child stands for it
            continue
        break
    if node in (1, 2) or excl.matches(comm=members[node].comm):
        return None, 0.0, 0
    us, n = subtree[node]
    return members[node], us, n
