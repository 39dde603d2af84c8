"""Prometheus metrics for node_exporter's textfile collector: what is exported, under which names, and the file.

The daemon keeps PrivateNetwork=yes: it serves nothing, it writes DIR/linnixd.prom
atomically (temp file + rename, mode 0644) and node_exporter serves it. PSI is
node_exporter's own (node_pressure_*) and is not repeated here.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .collector.cgroups import owner_of
from .health import Health, check_names
from .model import Owner, StallSnapshot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

FILE_NAME = "linnixd.prom"
DEFAULT_DIR = "/var/lib/prometheus/node-exporter"  # Debian's prometheus-node-exporter textfile dir
OTHER = "other"  # the label value the series beyond the top K are summed under
MAX_CANDIDATES = 2000  # keys ranked for a series of their own; beyond it straight into "other"
TICK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_OWNER_CACHE = 4096


def owner_label(owner: Owner) -> str:
    """A bounded, pid-free label for a cgroup: its pod, else its systemd unit, else its path."""
    if owner.pod_uid:
        return f"pod{owner.pod_uid}"
    if owner.unit:
        return owner.unit
    return owner.name


class TopK:
    """Monotonic totals by label with bounded cardinality: the top K keys get a series, the rest is "other".

    A key gets its own series once it ranks among the K largest (and a slot is free) and keeps
    it; what it accrued before stays in "other", so every exported series only ever grows.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.own: dict[tuple[str, ...], float] = {}
        self.other = 0.0
        self._rank: dict[tuple[str, ...], float] = {}  # keys without a series: total so far

    def add(self, key: tuple[str, ...], value: float) -> None:
        if key in self.own:
            self.own[key] += value
            return
        self.other += value
        if key in self._rank or len(self._rank) < MAX_CANDIDATES:
            self._rank[key] = self._rank.get(key, 0.0) + value

    def promote(self) -> None:
        """Give the largest keys without a series one, while slots are free (called at export)."""
        free = self.k - len(self.own)
        if free <= 0 or not self._rank:
            return
        for key in sorted(self._rank, key=self._rank.__getitem__, reverse=True)[:free]:
            del self._rank[key]
            self.own[key] = 0.0


@dataclass
class StallTotals:
    """Run-queue wait per owner and stall caused per (victim, culprit) owner, since start (seconds)."""

    k: int = 20
    wait: TopK = field(init=False)
    caused: TopK = field(init=False)
    _owners: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.wait = TopK(self.k)
        self.caused = TopK(self.k)

    def _label(self, path: str) -> str:
        label = self._owners.get(path)
        if label is None:
            if len(self._owners) >= _OWNER_CACHE:
                self._owners.clear()
            label = self._owners[path] = owner_label(owner_of(path))
        return label

    def add(self, stall: StallSnapshot) -> None:
        for path, rq in stall.runqueue.items():
            if rq.wait_us:
                self.wait.add((self._label(path),), rq.wait_us / 1e6)
        for edge in stall.edges:
            if edge.stall_us:
                key = (self._label(edge.victim), self._label(edge.culprit))
                self.caused.add(key, edge.stall_us / 1e6)


class TickHistogram:
    """Cumulative histogram of tick durations (Prometheus buckets, seconds)."""

    def __init__(self, buckets: tuple[float, ...] = TICK_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*(f"{b:g}" for b in self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


class MetricsSource(Protocol):
    """What the daemon hands the exporter (Daemon implements it)."""

    version: str
    tick_histogram: TickHistogram
    stall_totals: StallTotals

    def health(self) -> Mapping[str, Health]: ...
    def alerts_by_rule(self) -> Mapping[tuple[str, str], int]: ...
    def open_by_rule(self) -> Mapping[str, int]: ...


def _families(src: MetricsSource) -> Iterator[Metric]:
    # imported here: prometheus_client costs ~14 MB of RSS, paid only when metrics are written
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    report = src.health()
    check_names(report)
    yield InfoMetricFamily("linnixd_build", "linnixd version", value={"version": src.version})
    lifecycle = report.get("lifecycle", Health())
    yield CounterMetricFamily(
        "linnixd_events_total",
        "Process-lifecycle events counted in the kernel",
        value=lifecycle.counters.get("events", 0),
    )
    yield CounterMetricFamily(
        "linnixd_dropped_events_total",
        "Records the kernel could not hand over (ring or perf buffer full)",
        value=lifecycle.counters.get("dropped_events", 0),
    )
    alerts = CounterMetricFamily(
        "linnixd_alerts_total", "Firing alerts (new incidents)", labels=["rule", "severity"]
    )
    for (rule, severity), n in sorted(src.alerts_by_rule().items()):
        alerts.add_metric([rule, severity], n)
    yield alerts
    incidents = GaugeMetricFamily("linnixd_incidents_open", "Open incidents", labels=["rule"])
    for rule, n in sorted(src.open_by_rule().items()):
        incidents.add_metric([rule], n)
    yield incidents
    hist = src.tick_histogram
    yield HistogramMetricFamily(
        "linnixd_tick_duration_seconds",
        "Time one tick took (collectors, model, detectors, alerts)",
        buckets=hist.cumulative(),
        sum_value=hist.sum,
    )
    totals = src.stall_totals
    totals.wait.promote()
    totals.caused.promote()
    wait = CounterMetricFamily(
        "linnixd_cgroup_runqueue_wait_seconds_total",
        f"Run-queue wait by unit or pod (top {totals.k}, the rest as {OTHER})",
        labels=["owner"],
    )
    for (owner,), v in sorted(totals.wait.own.items()):
        wait.add_metric([owner], v)
    wait.add_metric([OTHER], totals.wait.other)
    yield wait
    caused = CounterMetricFamily(
        "linnixd_stall_caused_seconds_total",
        f"Run-queue wait of a victim while a culprit held the CPU, by unit or pod (top {totals.k} pairs, the rest as {OTHER})",
        labels=["victim", "culprit"],
    )
    for (victim, culprit), v in sorted(totals.caused.own.items()):
        caused.add_metric([victim, culprit], v)
    caused.add_metric([OTHER, OTHER], totals.caused.other)
    yield caused
    for component, h in sorted(report.items()):
        for name, v in sorted(h.counters.items()):
            yield CounterMetricFamily(
                f"linnixd_{component}_{name}_total", f"{component} health counter {name}", value=v
            )
        for name, v in sorted(h.gauges.items()):
            yield GaugeMetricFamily(
                f"linnixd_{component}_{name}", f"{component} health level {name}", value=v
            )


class _Collector:
    def __init__(self, src: MetricsSource) -> None:
        self.src = src

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for family in _families(self.src):
            if family.name in seen:
                raise ValueError(f"metric {family.name} exported twice")
            seen.add(family.name)
            yield family


def render(src: MetricsSource) -> bytes:
    """The text exposition of everything the daemon exports (prometheus_client's encoder)."""
    from prometheus_client.exposition import generate_latest

    collector: Any = _Collector(src)
    return bytes(generate_latest(collector))


def render_families(families: Callable[[], Iterator[Metric]]) -> bytes:
    """The text exposition of the families a callable yields (for linnixd-forward's own file)."""
    from prometheus_client.exposition import generate_latest

    class _Families:
        def collect(self) -> Iterator[Metric]:
            return families()

    collector: Any = _Families()
    return bytes(generate_latest(collector))


def metric_names(text: str) -> set[str]:
    """Family names in an exposition text (for the dashboard and rule checks)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name for f in text_string_to_metric_families(text)}


class TextfileWriter:
    """Writes DIR/linnixd.prom atomically; a failed write is counted and journaled, never raised."""

    def __init__(
        self, directory: str, log: Callable[[str], None], file_name: str = FILE_NAME
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, file_name)
        self.writes = 0
        self.write_errors = 0
        self._log = log
        self._last_error = ""

    def health(self) -> Health:
        return Health(counters={"writes": self.writes, "write_errors": self.write_errors})

    def write(self, data: bytes) -> bool:
        tmp = None
        try:
            # not *.prom: node_exporter must never read a half-written file
            fd, tmp = tempfile.mkstemp(prefix=".linnixd.", suffix=".tmp", dir=self.directory)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(
                    fh.fileno(), 0o644
                )  # node_exporter runs as another user; our umask is 077
                fh.write(data)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:
            self.write_errors += 1
            reason = f"cannot write metrics to {self.path}: {exc.strerror or exc}"
            if reason != self._last_error:
                self._log(reason)
                self._last_error = reason
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if self._last_error:
            self._log(f"metrics written to {self.path} again")
            self._last_error = ""
        self.writes += 1
        return True

    def remove(self) -> None:
        """Take the file away at a clean stop: node_exporter must not serve stale figures."""
        try:
            os.unlink(self.path)
        except OSError:
            pass
