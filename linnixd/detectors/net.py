"""Network rules: connection_churn, tcp_retransmits and port_exhaustion over bpf/net.c's counts."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..model import Culprit, Finding, NetCounts, PortUsage, ProcessSample, Snapshot
from ..settings import Field, RuleSettings, Severity, percent, seconds, top_n
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

NET = frozenset({"net"})  # bpf/net.c: attached only while one of these rules is enabled
UNKNOWN_COMM = "unknown"  # a process that exited before the host model saw it
PORT_LOOKBACK_S = 5.0  # port use near the limit is measured every 2 s: the newest this recent


def _find_process(snaps: Sequence[Snapshot], pid: int) -> ProcessSample | None:
    for snap in reversed(snaps):
        p = snap.processes.get(pid)
        if p is not None:
            return p
    return None


def _culprit(snaps: Sequence[Snapshot], pid: int, cgroup: str | None = None) -> Culprit:
    """The process `pid` as the newest snapshot that has it knows it, else what the kernel said."""
    p = _find_process(snaps, pid)
    if p is not None:
        return process_culprit(p, snaps[-1].processes)
    unit = cgroup_unit(snaps[-1], cgroup) if cgroup is not None else None
    return Culprit(kind="process", pid=pid, comm=UNKNOWN_COMM, cgroup=cgroup, unit=unit)


def _key(snaps: Sequence[Snapshot], pid: int) -> str:
    p = _find_process(snaps, pid)
    return process_key(p) if p is not None else f"pid:{pid}"


def _sustained(
    tail: Sequence[Snapshot],
    series: str,
    key: Any,
    field: str,
    rate: float,
) -> NetCounts | None:
    """The sum of the key's counts over the tail, or None when one interval is at or under `rate`."""
    total = NetCounts()
    for snap in tail:
        counts = getattr(snap, series).get(key)
        if counts is None or snap.interval_s <= 0:
            return None
        if getattr(counts, field) / snap.interval_s <= rate:
            return None
        total = total + counts
    return total


def _top_remotes(
    tail: Sequence[Snapshot],
    field: str,
    top: int,
    pid: int | None = None,
    cgroup: str | None = None,
) -> list[dict[str, Any]]:
    """Remote endpoints by `field` (connects or retransmits) over the tail, for a pid or a cgroup."""
    counts: collections.Counter[str] = collections.Counter()
    for snap in tail:
        for r in snap.net_remotes:
            if (pid is not None and r.pid != pid) or (cgroup is not None and r.cgroup != cgroup):
                continue
            n = getattr(r, field)
            if n:
                counts[r.remote] += n
    return [{"remote": remote, field: n} for remote, n in counts.most_common(top)]


class ConnectionChurn(RuleSettings):
    """connection_churn: more than `rate_per_s` TCP connections opened per second for `sustain_s`,
    at least `short_share` of those closed younger than daemon.short_lived_s."""

    rate_per_s: float = Field(200.0, gt=0, le=10_000_000)
    short_share: float = Field(0.5, ge=0, le=1)
    sustain_s: float = seconds(5.0)
    scope: tuple[Literal["process", "cgroup"], ...] = ("process", "cgroup")


class TcpRetransmits(RuleSettings):
    """tcp_retransmits: a cgroup retransmitting more than `rate_per_s` segments per second over
    `sustain_s`, at least `min_share` of the segments its network namespace sent."""

    rate_per_s: float = Field(20.0, gt=0, le=10_000_000)
    min_share: float = Field(0.02, ge=0, le=1)
    sustain_s: float = seconds(5.0)
    top: int = top_n(3)


class PortExhaustion(RuleSettings):
    """port_exhaustion: `pct` of a network namespace's ip_local_port_range held by TCP sockets."""

    severity: Severity = "critical"
    pct: float = percent(90.0)
    top: int = top_n(3)


class ConnectionChurnDetector:
    """A process or cgroup opening more than rate_per_s TCP connections in every interval of
    the last sustain_s, at least short_share of them closed young."""

    rule = "connection_churn"
    settings = ConnectionChurn
    needs = NET

    def evaluate(self, window: Sequence[Snapshot], cfg: ConnectionChurn) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        newest = window[-1]
        rate = float(cfg.rate_per_s)
        ex = Exclusions(cfg)
        scope = tuple(cfg.scope)
        findings: list[Finding] = []
        blamed_cgroups: set[str] = set()
        if "process" in scope:
            for pid, now in newest.net_by_pid.items():
                if newest.interval_s <= 0 or now.connects / newest.interval_s <= rate:
                    continue
                total = _sustained(tail, "net_by_pid", pid, "connects", rate)
                if total is None or not self._short_enough(total, cfg):
                    continue
                culprit = _culprit(tail, pid)
                if ex.culprit(culprit):
                    continue
                if culprit.cgroup is not None:
                    blamed_cgroups.add(culprit.cgroup)
                remotes = _top_remotes(tail, "connects", 3, pid=pid)
                findings.append(
                    self._finding(
                        _key(tail, pid), culprit, culprit.label(), tail, total, cfg, remotes
                    )
                )
        if "cgroup" in scope:
            for path, now in newest.net_by_cgroup.items():
                if path in blamed_cgroups:
                    continue  # its process was named already
                if newest.interval_s <= 0 or now.connects / newest.interval_s <= rate:
                    continue
                total = _sustained(tail, "net_by_cgroup", path, "connects", rate)
                if total is None or not self._short_enough(total, cfg):
                    continue
                unit = cgroup_unit(newest, path)
                if ex.matches(unit=unit, cgroup=path):
                    continue
                culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
                remotes = _top_remotes(tail, "connects", 3, cgroup=path)
                findings.append(
                    self._finding(
                        f"cgroup:{path}", culprit, unit or path, tail, total, cfg, remotes
                    )
                )
        return findings

    @staticmethod
    def _short_enough(total: NetCounts, cfg: Any) -> bool:
        want = float(cfg.short_share)
        if want <= 0:
            return True
        return total.closed > 0 and total.short / total.closed >= want

    def _finding(
        self,
        key: str,
        culprit: Culprit,
        who: str,
        tail: Sequence[Snapshot],
        total: NetCounts,
        cfg: Any,
        remotes: list[dict[str, Any]],
    ) -> Finding:
        seconds = covered_s(tail)
        rate = total.connects / seconds if seconds > 0 else 0.0
        share = total.short / total.closed if total.closed else 0.0
        to = f", mostly to {remotes[0]['remote']}" if remotes else ""
        return Finding(
            rule=self.rule,
            key=key,
            severity=severity(cfg),
            summary=(
                f"connection churn: {who} opens {rate:.0f} TCP connections/s for {seconds:.1f} s, "
                f"{share:.0%} of those closed lived under the short-lived limit{to}"
            ),
            culprit=culprit,
            evidence={
                "connects": total.connects,
                "connects_per_s": round(rate, 1),
                "closed": total.closed,
                "short_lived": total.short,
                "short_share": round(share, 3),
                "failed": total.failed,
                "window_s": round(seconds, 2),
                "threshold_per_s": float(cfg.rate_per_s),
                "top_remotes": remotes,
            },
        )


class TcpRetransmitsDetector:
    """A cgroup retransmitting more than rate_per_s segments on average over the last sustain_s
    (in at least half of its intervals: not one burst), at least min_share of the segments its
    network namespace sent."""

    rule = "tcp_retransmits"
    settings = TcpRetransmits
    needs = NET

    def evaluate(self, window: Sequence[Snapshot], cfg: TcpRetransmits) -> list[Finding]:
        tail = sustained_tail(window, float(cfg.sustain_s))
        if tail is None:
            return []
        newest = window[-1]
        if not newest.net_by_cgroup:
            return []  # nothing retransmitted in the newest interval: not ongoing
        rate = float(cfg.rate_per_s)
        seconds = covered_s(tail)
        ex = Exclusions(cfg)
        sums: dict[str, NetCounts] = {}
        active: collections.Counter[str] = collections.Counter()
        for snap in tail:
            for path, c in snap.net_by_cgroup.items():
                if c.retransmits:
                    sums[path] = sums[path] + c if path in sums else c
                    active[path] += 1
        findings = []
        for path, total in sums.items():
            if seconds <= 0 or total.retransmits / seconds <= rate:
                continue
            if 2 * active[path] < len(tail):
                continue
            unit = cgroup_unit(newest, path)
            if ex.matches(unit=unit, cgroup=path):
                continue
            finding = self._finding(tail, path, unit, total, cfg, ex)
            if finding is not None:
                findings.append(finding)
        return findings

    def _finding(
        self,
        tail: Sequence[Snapshot],
        path: str,
        unit: str | None,
        total: NetCounts,
        cfg: Any,
        ex: Exclusions,
    ) -> Finding | None:
        per_pid: collections.Counter[int] = collections.Counter()
        for snap in tail:
            for r in snap.net_remotes:
                if r.cgroup == path and r.retransmits:
                    per_pid[r.pid] += r.retransmits
        culprit: Culprit | None = None
        pid: int | None = None
        for candidate, _ in per_pid.most_common():
            c = _culprit(tail, candidate, path)
            if not ex.culprit(c):
                culprit, pid = c, candidate
                break
        if culprit is None:
            if per_pid:
                return None  # every retransmitting process here is excluded
            culprit = Culprit(kind="cgroup", cgroup=path, unit=unit)
        out_segs, retrans_segs = _segments(tail, set(per_pid))
        share = retrans_segs / out_segs if out_segs > 0 else None
        min_share = float(cfg.min_share)
        if min_share > 0 and (share is None or share < min_share):
            return None  # no share measured yet, or the retransmits are a small part of the traffic
        remotes = _top_remotes(tail, "retransmits", int(cfg.top), cgroup=path)
        seconds = covered_s(tail)
        rate = total.retransmits / seconds if seconds > 0 else 0.0
        who = culprit.label() if pid is not None else (unit or path)
        to = f" to {remotes[0]['remote']}" if remotes else ""
        share_text = (
            f" ({share:.1%} of the segments sent in its network namespace)" if share else ""
        )
        return Finding(
            rule=self.rule,
            key=f"cgroup:{path}",
            severity=severity(cfg),
            summary=(
                f"tcp retransmits: {who} retransmits {rate:.0f} segments/s{to} "
                f"for {seconds:.1f} s{share_text}"
            ),
            culprit=culprit,
            evidence={
                "retransmits": total.retransmits,
                "retransmits_per_s": round(rate, 1),
                "netns_out_segs": out_segs,
                "netns_retrans_segs": retrans_segs,
                "share": round(share, 4) if share is not None else None,
                "window_s": round(seconds, 2),
                "threshold_per_s": float(cfg.rate_per_s),
                "top_remotes": remotes,
                "top_remote": remotes[0]["remote"] if remotes else None,
            },
        )


def _segments(tail: Sequence[Snapshot], pids: set[int]) -> tuple[int, int]:
    """Segments sent and retransmitted over the tail in the namespaces of `pids` (each counted once)."""
    out = retrans = 0
    for snap in tail:
        seen: set[int] = set()
        for pid in pids:
            seg = snap.net_segments.get(pid)
            if seg is None or seg.netns in seen:
                continue
            seen.add(seg.netns)
            out += seg.out_segs
            retrans += seg.retrans_segs
    return out, retrans


class PortExhaustionDetector:
    """A network namespace with pct of its ip_local_port_range in use (TIME_WAIT included)."""

    rule = "port_exhaustion"
    settings = PortExhaustion
    needs = NET

    def evaluate(self, window: Sequence[Snapshot], cfg: PortExhaustion) -> list[Finding]:
        if not window:
            return []
        latest: dict[int, tuple[Snapshot, PortUsage]] = {}
        for snap in recent(window, PORT_LOOKBACK_S):
            for usage in snap.net_ports:
                latest[usage.netns] = (snap, usage)  # oldest first: newer ones overwrite
        ex = Exclusions(cfg)
        findings = []
        for _netns, (_snap, usage) in sorted(latest.items()):
            size = usage.range_size
            if size <= 0:
                continue
            pct = 100.0 * usage.ports_in_use / size
            if pct < float(cfg.pct):
                continue
            finding = self._finding(window, usage, pct, cfg, ex)
            if finding is not None:
                findings.append(finding)
        return findings

    def _finding(
        self, window: Sequence[Snapshot], usage: Any, pct: float, cfg: Any, ex: Exclusions
    ) -> Finding | None:
        holders = []
        for h in usage.holders:
            c = _culprit(window, h.pid)
            if ex.culprit(c):
                continue
            holders.append((h, c))
        if usage.holders and not holders:
            return None  # every holder is excluded
        named = holders[: int(cfg.top)]
        culprit = named[0][1] if named else Culprit(kind="system")
        who = ", ".join(
            f"{c.comm}[{h.pid}] {h.open_connections} open + {h.recent_time_wait} TIME_WAIT"
            for h, c in named
        )
        return Finding(
            rule=self.rule,
            key=f"netns:{usage.netns}",
            severity=severity(cfg),
            summary=(
                f"port exhaustion: {usage.ports_in_use} of {usage.range_size} local ports "
                f"({pct:.0f}%, {usage.time_wait} in TIME_WAIT) in use in network namespace "
                f"{usage.netns}, held by {who or 'unknown processes'}"
            ),
            culprit=culprit,
            evidence={
                "netns": usage.netns,
                "port_range": f"{usage.range_lo}-{usage.range_hi}",
                "range_source": usage.range_source,
                "ports_in_use": usage.ports_in_use,
                "range_size": usage.range_size,
                "pct": round(pct, 1),
                "threshold_pct": float(cfg.pct),
                "time_wait": usage.time_wait,
                "busiest_remote": usage.busiest_remote,
                "busiest_remote_ports": usage.busiest_remote_ports,
                "holders": [
                    {
                        "pid": h.pid,
                        "comm": c.comm,
                        "open": h.open_connections,
                        "recent_time_wait": h.recent_time_wait,
                    }
                    for h, c in named
                ],
            },
        )


def net_rates(snaps: Sequence[Snapshot]) -> Mapping[str, dict[str, float]]:
    """Per-cgroup connections/s and retransmits/s averaged over `snaps` (for top and snapshots)."""
    seconds = covered_s(snaps)
    sums: dict[str, NetCounts] = {}
    for snap in snaps:
        for path, c in snap.net_by_cgroup.items():
            sums[path] = sums[path] + c if path in sums else c
    if seconds <= 0:
        return {}
    return {
        path: {
            "connects_per_s": round(c.connects / seconds, 1),
            "retransmits_per_s": round(c.retransmits / seconds, 1),
        }
        for path, c in sums.items()
    }


def cgroup_net_fields(snap: Snapshot, path: str) -> Mapping[str, Any]:
    """A cgroup's TCP figures over the newest interval, for incident snapshots (triage `extra`)."""
    c = snap.net_by_cgroup.get(path)
    if c is None or snap.interval_s <= 0:
        return {}
    per_s = 1.0 / snap.interval_s
    return {
        "tcp_connects_per_s": round(c.connects * per_s, 1),
        "tcp_short_lived_per_s": round(c.short * per_s, 1),
        "tcp_failed_connects_per_s": round(c.failed * per_s, 1),
        "tcp_retransmits_per_s": round(c.retransmits * per_s, 1),
    }
