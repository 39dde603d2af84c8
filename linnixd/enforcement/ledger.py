"""The action ledger's record and the atomic JSON files under the state directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..daemonlog import LOG_WARNING, log
from .base import UINT64_MAX


@dataclass
class ActionRecord:
    """One action in the ledger: enough to revert it exactly, even from another process."""

    id: str
    unit: str
    action: str  # throttle_cpu, limit_memory, freeze
    prop: str  # the systemd property changed
    before: Any  # its value before we changed it (restored on revert)
    after: Any
    rule: str
    incident: str
    applied_at: float  # epoch
    expires_at: float  # epoch
    state: str = "pending"  # pending (systemd asked) -> applied (systemd answered)
    revert_failures: int = 0
    retry_at: float = 0.0

    def event(self) -> dict[str, str]:
        """The ActionTaken / ActionReverted payload."""
        return {
            "unit": self.unit,
            "action": self.action,
            "before": show(self.before),
            "after": show(self.after),
            "rule": self.rule,
            "incident": self.incident,
        }


def show(value: Any) -> str:
    return "infinity" if value == UINT64_MAX else str(value)


def write_json_atomic(path: Path, data: Any) -> None:
    """tmp + fsync + rename + fsync(dir): a reader (or a crash) sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data, sort_keys=True, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> Any:
    """The file's JSON, None when absent; a corrupt file is set aside (.corrupt) and None."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        aside = path.with_name(f"{path.name}.corrupt")
        log(f"{path} is unreadable ({exc}); moved to {aside}", LOG_WARNING)
        try:
            os.replace(path, aside)
        except OSError:
            pass
        return None
