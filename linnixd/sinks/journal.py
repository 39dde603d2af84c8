"""The journald sink: one structured entry per alert (MESSAGE_ID per rule, LINNIX_* fields)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..constants import MESSAGE_IDS, SEVERITY_PRIORITY
from ..daemonlog import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING, log
from ..model import Alert

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def journald_present() -> bool:
    return os.path.exists(JOURNAL_SOCKET)


def journal_fields(alert: Alert) -> dict[str, Any]:
    """The journal entry for an alert: `journalctl LINNIX_RULE=fork_storm` selects it."""
    c = alert.culprit
    message_id = MESSAGE_IDS["resolved"] if alert.state == "resolved" else MESSAGE_IDS[alert.rule]
    fields: dict[str, Any] = {
        "MESSAGE": f"{alert.rule} {alert.state}: {alert.summary}",
        "MESSAGE_ID": message_id,
        "PRIORITY": str(
            SEVERITY_PRIORITY["info"]
            if alert.state == "resolved"
            else SEVERITY_PRIORITY[alert.severity]
        ),
        "SYSLOG_IDENTIFIER": "linnixd",
        "LINNIX_RULE": alert.rule,
        "LINNIX_STATE": alert.state,
        "LINNIX_SEVERITY": alert.severity,
        "LINNIX_ALERT_ID": alert.id,
        "LINNIX_INCIDENT": alert.incident,
        "LINNIX_CULPRIT_KIND": c.kind,
        "LINNIX_EVIDENCE": json.dumps(dict(alert.evidence), sort_keys=True, default=str),
    }
    optional = {
        "LINNIX_PID": c.pid,
        "LINNIX_COMM": c.comm,
        "LINNIX_UNIT": c.unit,
        "LINNIX_CGROUP": c.cgroup,
        "LINNIX_PARENT_PID": c.parent_pid,
        "LINNIX_PARENT_COMM": c.parent_comm,
        "LINNIX_ROOT_PID": c.root_pid,
        "LINNIX_POD": c.pod,
        "LINNIX_NAMESPACE": c.namespace,
        "LINNIX_CONTAINER": c.container,
        "LINNIX_CONTAINER_ID": c.container_id,
        "LINNIX_IMAGE": c.image,
    }
    for key, value in optional.items():
        if value is not None:
            fields[key] = str(value)
    return fields


class JournalSink:
    """Sends alerts to journald through systemd-python (python3-systemd)."""

    name = "journald"

    def __init__(self) -> None:
        from systemd import journal  # imported here: only needed where journald runs

        self._send = journal.send

    def write(self, alert: Alert) -> None:
        fields = journal_fields(alert)
        message = fields.pop("MESSAGE")
        self._send(message, **fields)


EventWriter = Callable[[str, str, Mapping[str, str]], None]  # (MESSAGE_IDS key, message, fields)
EVENT_PRIORITY = 5  # notice: the daemon started, changed policy or acted; nothing to do


def event_writer(
    *, use_journal: bool = True, also_log: bool = False, what: str = "events"
) -> EventWriter:
    """Daemon events (daemon_started, policy_reloaded, action_taken, ...): a journald entry with
    their MESSAGE_ID when journald runs, else one log line.

    `also_log`: the log line is written even when the entry is journaled (enforcement: every
    action is on stderr too). `what` names the events in the line saying python3-systemd is missing.
    """
    send: Callable[..., Any] | None = None
    if use_journal and journald_present():
        try:
            from systemd import journal  # python3-systemd

            send = journal.send
        except ImportError:
            log(
                f"journald is running but python3-systemd is missing: {what} are only logged",
                LOG_WARNING,
            )
    line_priority = LOG_NOTICE if also_log else LOG_INFO

    def write(kind: str, message: str, fields: Mapping[str, str]) -> None:
        if also_log:
            log(message, line_priority)
        if send is not None:
            try:
                send(
                    message,
                    MESSAGE_ID=MESSAGE_IDS[kind],
                    PRIORITY=str(EVENT_PRIORITY),
                    SYSLOG_IDENTIFIER="linnixd",
                    **fields,
                )
                return
            except Exception as exc:  # the log line (written above, or below) carries it
                log(f"journald refused the {kind} entry: {exc}", LOG_ERR)
        if not also_log:
            log(message, line_priority)

    return write
