"""The one health interface: each component reports its counters through health(); the daemon merges them.

Status, the D-Bus properties and the Prometheus metrics are all built from the merged
report, so a counter a component keeps is exported by construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

Number = int | float

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Health:
    """One component's report: monotonic counters (never reset while running) and current levels."""

    counters: Mapping[str, Number] = field(default_factory=dict)
    gauges: Mapping[str, Number] = field(default_factory=dict)

    def flat(self) -> dict[str, Number]:
        return {**self.counters, **self.gauges}


class Reporter(Protocol):
    def health(self) -> Health: ...


def check_names(report: Mapping[str, Health]) -> None:
    """Component and counter names become metric names: lower_snake_case, counters and gauges apart."""
    for component, h in report.items():
        names = [component, *h.counters, *h.gauges]
        bad = [n for n in names if not _NAME.match(n)]
        if bad:
            raise ValueError(f"health of {component}: names not lower_snake_case: {bad}")
        both = set(h.counters) & set(h.gauges)
        if both:
            raise ValueError(f"health of {component}: both counter and gauge: {sorted(both)}")


def collect(parts: Mapping[str, Reporter | None]) -> dict[str, Health]:
    """Every present component's report by name; a component whose report fails says so as a counter."""
    out: dict[str, Health] = {}
    failed: dict[str, Number] = {}
    for name, part in parts.items():
        if part is None:
            continue
        try:
            out[name] = part.health()
        except Exception:  # a vanished map or closed handle must not break Status or metrics
            failed[name] = 1
    if failed:
        out["health"] = Health(gauges={f"{n}_unavailable": v for n, v in failed.items()})
    return out


def to_status(report: Mapping[str, Health]) -> dict[str, dict[str, Number]]:
    """The report as Status JSON: {component: {name: value}}."""
    return {name: h.flat() for name, h in report.items()}
