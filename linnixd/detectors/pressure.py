"""psi_saturation: sustained "some" pressure per resource, for the host and for each cgroup."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..health import Health
from ..model import RESOURCES, CgroupSample, Culprit, Finding, PsiSample, Snapshot
from ..settings import RuleSettings, Severity, percent, seconds, top_n
from .base import Exclusions, cgroup_unit, is_ancestor_cgroup, severity, sustained_tail


def _sustained(tail: Sequence[Snapshot], limit: float, sample: Any) -> list[PsiSample] | None:
    """The samples of one pressure source over `tail` when every one is above `limit`, else None."""
    out = []
    for snap in tail:
        s = sample(snap)
        if s is None or s.some_pct <= limit:
            return None
        out.append(s)
    return out


class PsiSaturation(RuleSettings):
    """psi_saturation: system "some" pressure above `some_pct` for `sustain_s`, per resource."""

    severity: Severity = "critical"
    resources: tuple[Literal["cpu", "io", "memory"], ...] = ("cpu", "io", "memory")
    some_pct: float = percent(40.0)
    sustain_s: float = seconds(5.0)
    top: int = top_n(3)


class PsiSaturationDetector:
    """Some-pressure above some_pct in every interval of the last sustain_s."""

    rule = "psi_saturation"
    settings = PsiSaturation
    needs = frozenset({"psi_triggers"})

    def __init__(self) -> None:
        # the cgroups above the limit per resource in the newest snapshot evaluated, and that
        # snapshot's samples: the next tick re-judges only the samples that are not the same
        # objects (re-read, gone quiet, new or gone); an unchanged sample has unchanged figures
        self._over: dict[str, set[str]] = {}
        self._over_of: dict[str, CgroupSample] = {}
        self._over_limit: float | None = None

    def health(self) -> Health:
        """The per-tick state: the cgroups of the last snapshot judged and those above the limit."""
        return Health(
            gauges={
                "judged_cgroups": len(self._over_of),
                "cgroups_above": sum(len(paths) for paths in self._over.values()),
            }
        )

    def _above(self, cgroups: Mapping[str, CgroupSample], limit: float) -> dict[str, set[str]]:
        """Per resource, the cgroups (the root aside) whose newest "some" share is above `limit`."""
        before = self._over_of
        if limit != self._over_limit:
            self._over = {}
            before = {}
        over = self._over
        gone = before.keys() - cgroups.keys()
        changed = [p for p, cg in cgroups.items() if before.get(p) is not cg]
        for res in RESOURCES:
            paths = over.setdefault(res, set())
            paths -= gone
            for path in changed:
                now = cgroups[path].pressure.get(res)
                if path != "/" and now is not None and now.some_pct > limit:
                    paths.add(path)
                else:
                    paths.discard(path)
        self._over_of = dict(cgroups)
        self._over_limit = limit
        return over

    def evaluate(self, window: Sequence[Snapshot], cfg: PsiSaturation) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        newest = window[-1]
        limit = float(cfg.some_pct)
        ex = Exclusions(cfg)
        findings = []
        above = self._above(newest.cgroups, limit)
        for res in cfg.resources:
            system = _sustained(tail, limit, lambda s, res=res: s.system_pressure.get(res))
            if system is not None:
                findings.append(self._system(tail, res, system, cfg, ex))
            hot: dict[str, list[PsiSample]] = {}
            # root cgroup pressure is the host's, reported above; no other cgroup is sustained
            # above the limit unless its newest sample is
            for path in above.get(res, ()):
                samples = _sustained(
                    tail, limit, lambda s, path=path, res=res: _cgroup_psi(s, path, res)
                )
                if samples is not None:
                    hot[path] = samples
            for path, samples in sorted(hot.items()):
                # name the most specific saturated cgroup, not every slice above it
                if any(is_ancestor_cgroup(path, other) for other in hot):
                    continue
                unit = cgroup_unit(newest, path)
                culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
                if ex.culprit(culprit):
                    continue
                mean = sum(s.some_pct for s in samples) / len(samples)
                findings.append(
                    Finding(
                        rule=self.rule,
                        key=f"cgroup:{path}:{res}",
                        severity=severity(cfg),
                        summary=(
                            f"{res} pressure: {unit or path} stalled {mean:.0f}% of the time "
                            f"for {float(cfg.sustain_s):g} s"
                        ),
                        culprit=culprit,
                        evidence=_evidence(res, samples, cfg),
                    )
                )
        return findings

    def _system(
        self,
        tail: Sequence[Snapshot],
        res: str,
        samples: list[PsiSample],
        cfg: PsiSaturation,
        ex: Exclusions,
    ) -> Finding:
        newest = tail[-1]
        paths = [p for p in newest.cgroups if p != "/"]
        # leaves only: a slice's stall time already contains its children's
        inner = {a for p in paths for a in _ancestors(p)}
        leaves = [p for p in paths if p not in inner]
        stall: collections.Counter[str] = collections.Counter()
        for snap in tail:
            for path in leaves:
                s = _cgroup_psi(snap, path, res)
                if s is not None and s.some_stall_us:
                    stall[path] += s.some_stall_us
        system_us = sum(s.some_stall_us for s in samples)
        top = []
        for path, us in stall.most_common():
            unit = cgroup_unit(newest, path)
            if ex.matches(unit=unit, cgroup=path):
                continue
            top.append(
                {
                    "cgroup": path,
                    "unit": unit,
                    "stall_ms": round(us / 1000, 1),
                    "share": round(min(1.0, us / system_us), 3) if system_us else 0.0,
                }
            )
            if len(top) >= cfg.top:
                break
        mean = sum(s.some_pct for s in samples) / len(samples)
        named = ", ".join(f"{t['unit'] or t['cgroup']} ({t['share']:.0%})" for t in top)
        return Finding(
            rule=self.rule,
            key=f"system:{res}",
            severity=severity(cfg),
            summary=(
                f"{res} pressure: host stalled {mean:.0f}% of the time for "
                f"{float(cfg.sustain_s):g} s" + (f", most stalled: {named}" if named else "")
            ),
            culprit=Culprit(kind="system"),
            evidence={**_evidence(res, samples, cfg), "top_cgroups": top},
        )


def _ancestors(path: str) -> list[str]:
    """Every strict ancestor of a cgroup path, the root included."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(len(parts))]


def _cgroup_psi(snap: Snapshot, path: str, res: str) -> PsiSample | None:
    cg = snap.cgroups.get(path)
    return cg.pressure.get(res) if cg is not None else None


def _evidence(res: str, samples: list[PsiSample], cfg: PsiSaturation) -> dict[str, Any]:
    return {
        "resource": res,
        "some_pct": round(sum(s.some_pct for s in samples) / len(samples), 1),
        "min_some_pct": round(min(s.some_pct for s in samples), 1),
        "some_avg10": samples[-1].some_avg10,
        "full_pct": round(sum(s.full_pct for s in samples) / len(samples), 1),
        "threshold_pct": float(cfg.some_pct),
        "sustain_s": float(cfg.sustain_s),
        "stall_ms": round(sum(s.some_stall_us for s in samples) / 1000, 1),
    }
