"""Stall-attribution rules: noisy_neighbour (who stalls whom) and circuit_breaker (host-wide)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..model import Culprit, Finding, ProcessSample, PsiSample, Snapshot
from .base import (
    Exclusions,
    cgroup_unit,
    covered_s,
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


def _who(path: str, unit: str | None) -> str:
    return unit or path


def _stall_by_pair(snaps: Sequence[Snapshot]) -> dict[str, dict[str, tuple[int, int]]]:
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


class NoisyNeighbourDetector:
    """A cgroup waiting for CPU mostly behind other cgroups, while its cpu pressure rises."""

    rule = "noisy_neighbour"

    def evaluate(self, window: Sequence[Snapshot], cfg: Any) -> list[Finding]:
        snaps = [s for s in recent(window, float(cfg.window_s)) if s.stall is not None]
        if not snaps:
            return []
        excl = Exclusions(cfg)
        newest = snaps[-1]
        waits: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
        for s in snaps:
            assert s.stall is not None
            for path, rq in s.stall.runqueue.items():
                us, n = waits[path]
                waits[path] = (us + rq.wait_us, n + rq.waits)
        pairs = _stall_by_pair(snaps)
        findings = []
        for victim, (wait_us, nwaits) in sorted(waits.items()):
            if wait_us < float(cfg.min_wait_ms) * 1000 or wait_us <= 0:
                continue
            psi = _pressure(snaps, victim)
            if not psi:
                continue  # no pressure evidence for this cgroup: the rule cannot confirm a stall
            mean_some = sum(p.some_pct for p in psi) / len(psi)
            if not (psi[-1].some_avg10 > psi[0].some_avg10 or mean_some >= PRESSURE_FLOOR_PCT):
                continue
            victim_unit = cgroup_unit(newest, victim)
            evidence: dict[str, Any] = {
                "victim": victim,
                "victim_unit": victim_unit,
                "wait_ms": round(wait_us / 1000, 1),
                "waits": nwaits,
                "window_s": round(covered_s(snaps), 2),
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
                            f"{float(cfg.window_s):g} s: the stall is its quota, not a neighbour"
                        ),
                        culprit=culprit,
                        evidence=evidence,
                    )
                )
                continue
            others = {c: v for c, v in pairs.get(victim, {}).items() if c != victim}
            other_us = sum(us for us, _ in others.values())
            share = other_us / wait_us
            if share < float(cfg.min_culprit_share):
                continue
            ranked = sorted(others.items(), key=lambda kv: -kv[1][0])
            top = []
            for path, (us, pre) in ranked:
                unit = cgroup_unit(newest, path)
                if excl.matches(unit=unit, cgroup=path):
                    continue
                top.append(
                    {
                        "cgroup": path,
                        "unit": unit,
                        "stall_ms": round(us / 1000, 1),
                        "share": round(us / wait_us, 3),
                        "preemptions": pre,
                    }
                )
            if not top:
                continue
            top = top[: int(getattr(cfg, "top", 3))]
            first = top[0]
            evidence.update(
                explained_by="neighbours",
                culprit_share=round(share, 3),
                self_stall_ms=round(pairs.get(victim, {}).get(victim, (0, 0))[0] / 1000, 1),
                top_culprits=top,
                throttling_explains=False,
            )
            findings.append(
                Finding(
                    rule=self.rule,
                    key=f"cgroup:{first['cgroup']}->cgroup:{victim}",
                    severity=severity(cfg),
                    summary=(
                        f"{_who(first['cgroup'], first['unit'])} caused {first['stall_ms']:.0f} ms "
                        f"of stall to {_who(victim, victim_unit)} in the last {float(cfg.window_s):g} s"
                    ),
                    culprit=Culprit(kind="cgroup", cgroup=first["cgroup"], unit=first["unit"]),
                    evidence=evidence,
                )
            )
        return findings

    @staticmethod
    def _throttling(snaps: Sequence[Snapshot], path: str) -> tuple[int, int]:
        us = n = 0
        for s in snaps:
            cg = s.cgroups.get(path)
            if cg is not None:
                us += cg.throttled_us or 0
                n += cg.nr_throttled or 0
        return us, n


class CircuitBreakerDetector:
    """Sustained host CPU saturation with pressure: names the process tree that drives it."""

    rule = "circuit_breaker"

    def evaluate(self, window: Sequence[Snapshot], cfg: Any) -> list[Finding]:
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
        caused: dict[str, int] = defaultdict(int)  # culprit cgroup -> stall caused to others
        victims: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for victim, row in _stall_by_pair(tail).items():
            for culprit, (us, _) in row.items():
                if culprit != victim:
                    caused[culprit] += us
                    victims[culprit][victim] += us
        cpu_by_cgroup: dict[str, float] = defaultdict(float)
        for p in newest.processes.values():
            cpu_by_cgroup[p.cgroup] += p.cpu_pct
        basis = "stall_matrix" if caused else "cpu"
        ranking = caused if caused else cpu_by_cgroup
        path = next(
            (
                c
                for c, _ in sorted(ranking.items(), key=lambda kv: -kv[1])
                if not excl.matches(unit=cgroup_unit(newest, c), cgroup=c)
            ),
            None,
        )
        if path is None:
            return []
        unit = cgroup_unit(newest, path)
        root, tree_cpu, tree_pids = self._top_tree(tail, path, excl)
        if root is not None:
            culprit = process_culprit(root, newest.processes, kind="tree")
            key = process_key(root)
        else:
            culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
            key = f"cgroup:{path}"
        n = len(tail)
        some = sum(s.system_pressure["cpu"].some_pct for s in tail) / n
        util = sum(s.cpu_util_pct for s in tail) / n
        stall_ms = caused.get(path, 0) / 1000
        top_victims = sorted(victims[path].items(), key=lambda kv: -kv[1])[:3]
        evidence = {
            "basis": basis,
            "cgroup": path,
            "unit": unit,
            "cpu_some_pct": round(some, 1),
            "cpu_util_pct": round(util, 1),
            "sustained_s": round(covered_s(tail), 2),
            "tree_cpu_pct": round(tree_cpu, 1),
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
                    f"{culprit.label()} held the CPU at {util:.0f}% with {some:.0f}% cpu "
                    f"pressure for {float(cfg.sustain_s):g} s and stalled others for {stall_ms:.0f} ms"
                ),
                culprit=culprit,
                evidence=evidence,
            )
        ]

    @staticmethod
    def _top_tree(
        tail: Sequence[Snapshot], path: str, excl: Exclusions
    ) -> tuple[ProcessSample | None, float, int]:
        """Root of the process tree in cgroup `path` using the most CPU over the tail."""
        procs = tail[-1].processes
        members = {pid: p for pid, p in procs.items() if p.cgroup == path}
        cpu: dict[tuple[int, float], float] = defaultdict(float)
        for s in tail:
            for p in s.processes.values():
                cpu[(p.pid, p.start_time)] += p.cpu_pct / len(tail)
        trees: dict[int, list[int]] = defaultdict(list)
        for pid, p in members.items():
            root = p
            seen = {pid}
            while root.ppid in members and root.ppid not in seen:  # climb within the cgroup
                seen.add(root.ppid)
                root = members[root.ppid]
            trees[root.pid].append(pid)
        best: ProcessSample | None = None
        best_cpu = 0.0
        best_n = 0
        for root_pid, pids in trees.items():
            root = members[root_pid]
            if excl.matches(comm=root.comm):
                continue
            total = sum(cpu[(q, members[q].start_time)] for q in pids)
            if best is None or total > best_cpu:
                best, best_cpu, best_n = root, total, len(pids)
        return best, best_cpu, best_n
