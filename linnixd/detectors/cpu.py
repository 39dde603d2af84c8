"""CPU rules: cpu_spike (one hot process) and runaway_tree (the smallest busy process subtree)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model import Finding, ProcessSample, Snapshot
from ..settings import MAX_CPU_PCT, Field, RuleSettings, seconds
from .base import Exclusions, process_culprit, process_key, same_process, severity, sustained_tail

NEVER_ROOTS = frozenset(
    {0, 1, 2}
)  # the idle task, init and kthreadd own everything: never a culprit
TOP_MEMBERS = 5


# A child whose subtree holds this share of its parent's subtree CPU is where the work is.
DOMINANT_SHARE = 0.9


class CpuSpike(RuleSettings):
    """cpu_spike: one process above `cpu_pct` of a CPU for `sustain_s`."""

    cpu_pct: float = Field(50.0, gt=0, le=MAX_CPU_PCT)
    sustain_s: float = seconds(5.0)


# A spike may dip in a tick (another task got the CPU) but not below this share of cpu_pct.
SPIKE_FLOOR = 0.5


class CpuSpikeDetector:
    """One process above cpu_pct on average over the last sustain_s, never below half of it.

    Every tick above the threshold was the rule once; on a busy host a process that holds
    ~70% of a CPU still loses a tick now and then to its neighbours, and was never named.
    """

    rule = "cpu_spike"
    settings = CpuSpike
    needs = frozenset({"sched"})

    def evaluate(self, window: Sequence[Snapshot], cfg: CpuSpike) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        newest = window[-1]
        limit = float(cfg.cpu_pct)
        ex = Exclusions(cfg)
        findings = []
        for p in busy(newest):
            if p.cpu_pct <= limit:
                continue
            values = []
            for snap in tail:
                q = same_process(snap, p)
                if q is None or q.cpu_pct <= limit * SPIKE_FLOOR:
                    break
                values.append(q.cpu_pct)
            else:
                if sum(values) / len(values) <= limit:
                    continue
                culprit = process_culprit(p, newest.processes)
                if ex.culprit(culprit):
                    continue
                mean = sum(values) / len(values)
                findings.append(
                    Finding(
                        rule=self.rule,
                        key=process_key(p),
                        severity=severity(cfg),
                        summary=(
                            f"cpu spike: {culprit.label()} at {mean:.0f}% CPU "
                            f"(min {min(values):.0f}%) for {float(cfg.sustain_s):g} s"
                        ),
                        culprit=culprit,
                        evidence={
                            "cpu_pct": round(mean, 1),
                            "min_cpu_pct": round(min(values), 1),
                            "max_cpu_pct": round(max(values), 1),
                            "threshold_pct": limit,
                            "sustain_s": float(cfg.sustain_s),
                            "samples": len(values),
                            "threads": p.threads,
                        },
                    )
                )
        return findings


class RunawayTree(RuleSettings):
    """runaway_tree: a process and its descendants above `cpu_pct` together for `sustain_s`."""

    cpu_pct: float = Field(90.0, gt=0, le=MAX_CPU_PCT)
    sustain_s: float = seconds(5.0)


class RunawayTreeDetector:
    """A process and all its descendants above cpu_pct together, blamed on the smallest such subtree."""

    rule = "runaway_tree"
    settings = RunawayTree
    needs = frozenset({"sched"})

    def evaluate(self, window: Sequence[Snapshot], cfg: RunawayTree) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        newest = window[-1]
        procs = newest.processes
        limit = float(cfg.cpu_pct)
        # subtree sums from the busy processes up: O(busy x depth), not O(processes)
        now: dict[int, float] = {}
        for p in busy(newest):
            node: ProcessSample | None = p
            seen: set[int] = set()
            while node is not None and node.pid not in seen:  # pid reuse can form a ppid loop
                seen.add(node.pid)
                now[node.pid] = now.get(node.pid, 0.0) + p.cpu_pct
                node = procs.get(node.ppid) if node.ppid != node.pid else None
        candidates = {pid for pid, v in now.items() if v > limit and pid not in NEVER_ROOTS}
        if not candidates:
            return []
        # the tree restricted to processes with busy descendants (the others add nothing)
        children: dict[int, list[int]] = {}
        for pid in now:
            ppid = procs[pid].ppid
            if ppid != pid and ppid in now:
                children.setdefault(ppid, []).append(pid)
        # only the subtrees under the topmost candidates are re-summed for the older snapshots
        tops = [pid for pid in candidates if procs[pid].ppid not in candidates]
        scope = _postorder(procs, children, tops)
        subtree_min = {pid: now[pid] for pid in scope}
        subtree_total = {pid: 0.0 for pid in scope}
        own_min = {pid: procs[pid].cpu_pct for pid in scope}
        own_total = {pid: 0.0 for pid in scope}
        for snap in tail:
            own = {}
            for pid in scope:
                q = same_process(snap, procs[pid])
                own[pid] = q.cpu_pct if q is not None else 0.0
            sums = _subtree_sums(scope, children, own)
            for pid in scope:
                subtree_min[pid] = min(subtree_min[pid], sums[pid])
                subtree_total[pid] += sums[pid]
                own_min[pid] = min(own_min[pid], own[pid])
                own_total[pid] += own[pid]
        qualifying = {pid for pid in candidates if subtree_min[pid] > limit}
        ex = Exclusions(cfg)
        findings = []
        for minimal in sorted(qualifying):
            if any(child in qualifying for child in children.get(minimal, ())):
                continue  # a smaller subtree explains it
            root = _dominant_descendant(minimal, children, subtree_total)
            if own_min[root] > limit or own_total[root] >= DOMINANT_SHARE * subtree_total[root]:
                continue  # one hot process: cpu_spike names it
            culprit = process_culprit(procs[root], procs, kind="tree")
            if ex.culprit(culprit):
                continue
            members = _postorder(procs, _full_children(procs), [root])
            top = sorted(members, key=lambda pid: (-procs[pid].cpu_pct, pid))[:TOP_MEMBERS]
            mean = subtree_total[root] / len(tail)
            first = procs[top[0]]
            findings.append(
                Finding(
                    rule=self.rule,
                    key=process_key(procs[root]),
                    severity=severity(cfg),
                    summary=(
                        f"runaway tree: {culprit.label()} and {len(members) - 1} descendants at "
                        f"{mean:.0f}% CPU for {float(cfg.sustain_s):g} s, busiest "
                        f"{first.comm}[{first.pid}] {first.cpu_pct:.0f}%"
                    ),
                    culprit=culprit,
                    evidence={
                        "subtree_cpu_pct": round(mean, 1),
                        "min_subtree_cpu_pct": round(subtree_min[root], 1),
                        "threshold_pct": limit,
                        "sustain_s": float(cfg.sustain_s),
                        "processes": len(members),
                        "root_pid": root,
                        "root_comm": procs[root].comm,
                        "top_members": [
                            {
                                "pid": pid,
                                "comm": procs[pid].comm,
                                "cpu_pct": round(procs[pid].cpu_pct, 1),
                            }
                            for pid in top
                        ],
                    },
                )
            )
        return findings


def busy(snap: Snapshot) -> list[ProcessSample]:
    """Processes that used CPU in the snapshot's interval (only changed ones can have)."""
    procs = snap.processes
    pids = snap.changed if snap.changed is not None else procs.keys()
    return [p for pid in pids if (p := procs.get(pid)) is not None and p.cpu_pct > 0]


def _full_children(procs: Any) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        if p.ppid != p.pid and p.ppid in procs:
            children.setdefault(p.ppid, []).append(p.pid)
    return children


def _dominant_descendant(root: int, children: dict[int, list[int]], total: dict[int, float]) -> int:
    """Walk down while one child's subtree holds DOMINANT_SHARE of the CPU: a shell or a
    supervisor that only launched the busy tree is not its root, and a subtree hovering at
    the threshold must not hand the blame to its idle launcher on a tick where it dips."""
    node = root
    while True:
        best = max(children.get(node, ()), key=lambda c: total.get(c, 0.0), default=None)
        if best is None or total.get(best, 0.0) < DOMINANT_SHARE * total.get(node, 0.0):
            return node
        node = best


def _postorder(
    procs: Any, children: dict[int, list[int]], roots: Sequence[int] | None = None
) -> list[int]:
    """Pids in post-order (children before parents) under `roots` (default: every tree root)."""
    if roots is None:
        roots = [pid for pid, p in procs.items() if p.ppid == pid or p.ppid not in procs]
    out: list[int] = []
    seen: set[int] = set()
    for root in roots:
        stack: list[tuple[int, bool]] = [(root, False)]
        while stack:
            pid, expanded = stack.pop()
            if expanded:
                out.append(pid)
                continue
            if pid in seen:
                continue  # a ppid cycle from pid reuse between reads must not loop forever
            seen.add(pid)
            stack.append((pid, True))
            for child in children.get(pid, ()):
                stack.append((child, False))
    return out


def _subtree_sums(
    order: Sequence[int], children: dict[int, list[int]], own: dict[int, float]
) -> dict[int, float]:
    """CPU of each process plus all its descendants; `order` must list children before parents."""
    sums: dict[int, float] = {}
    for pid in order:
        total = own.get(pid, 0.0)
        for child in children.get(pid, ()):
            total += sums.get(child, 0.0)
        sums[pid] = total
    return sums
