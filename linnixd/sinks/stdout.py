"""The stdout sink: one readable line or one JSON object per alert, for --foreground."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ..model import Alert


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return (
            "["
            + ", ".join(_fmt_value(v) for v in value[:5])
            + (", ..." if len(value) > 5 else "")
            + "]"
        )
    if isinstance(value, dict):
        return "{" + " ".join(f"{k}={_fmt_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_evidence(evidence: Mapping[str, Any]) -> str:
    """`k=v` pairs of the evidence, nested values compacted, for one-line output."""
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in evidence.items())


def format_text(alert: Alert) -> str:
    """One line: time, severity, rule, state, summary, culprit fields, evidence."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(alert.ts))
    c = alert.culprit
    who = []
    pod = f"{c.namespace}/{c.pod}" if c.pod and c.namespace else c.pod
    for key, val in (
        ("pid", c.pid),
        ("comm", c.comm),
        ("pod", pod),
        ("container", c.container),
        ("unit", c.unit),
        ("cgroup", c.cgroup),
    ):
        if val is not None:
            who.append(f"{key}={val}")
    return (
        f"{stamp} {alert.severity.upper():8} {alert.rule} {alert.state}: {alert.summary}"
        f" [{' '.join(who)}] {format_evidence(alert.evidence)}"
    )


def format_json(alert: Alert) -> str:
    return json.dumps(alert.to_dict(), sort_keys=True, default=str)


class StdoutSink:
    """Writes alerts to a text stream, flushed per alert so pipes see them at once."""

    def __init__(self, output: str = "text", stream: TextIO | None = None):
        self.name = f"stdout-{output}"
        self._format = format_json if output == "json" else format_text
        self._stream = stream if stream is not None else sys.stdout

    def write(self, alert: Alert) -> None:
        self._stream.write(self._format(alert) + "\n")
        self._stream.flush()
