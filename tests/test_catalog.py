"""The journald message catalog: one well-formed entry per MESSAGE_ID, accepted by journalctl."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from linnixd.constants import MESSAGE_IDS

CATALOG = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "linnixd.catalog"


def parse_catalog(text: str) -> dict[str, dict[str, object]]:
    """Entries by id: their header fields and body, following systemd's catalog format."""
    entries: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    for line in text.splitlines():
        m = re.fullmatch(r"-- ([0-9a-f]{32})", line)
        if m:
            assert m.group(1) not in entries, f"duplicate entry {m.group(1)}"
            current = entries[m.group(1)] = {"headers": {}, "body": [], "in_body": False}
            continue
        if current is None:
            assert line == "" or line.startswith("#"), f"text before the first entry: {line!r}"
            continue
        if not current["in_body"]:
            if line == "":
                current["in_body"] = True
                continue
            key, sep, value = line.partition(": ")
            assert sep and value, f"bad header line {line!r}"
            current["headers"].setdefault(key, []).append(value)  # type: ignore[union-attr]
        else:
            current["body"].append(line)  # type: ignore[union-attr]
    return entries


def test_every_message_id_has_a_complete_entry() -> None:
    entries = parse_catalog(CATALOG.read_text())
    assert set(entries) == set(MESSAGE_IDS.values())
    for msg_id, entry in entries.items():
        headers = entry["headers"]
        assert headers["Defined-By"] == ["linnixd"], msg_id  # type: ignore[index]
        assert "man:linnixd(8)" in headers["Documentation"], msg_id  # type: ignore[index]
        assert len(headers["Subject"]) == 1 and headers["Subject"][0], msg_id  # type: ignore[index]
        body = " ".join(entry["body"]).strip()  # type: ignore[arg-type]
        assert len(body) > 80, f"{msg_id}: the body must explain and say what to do"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="journalctl is not installed")
def test_journalctl_builds_a_catalog_database_from_it(tmp_path: Path) -> None:
    catdir = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catdir.mkdir(parents=True)
    shutil.copy(CATALOG, catdir / "linnixd.catalog")
    update = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--update-catalog"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert update.returncode == 0, update.stderr
    assert update.stderr == ""  # journalctl warns about every line it cannot parse
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ids = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert ids == set(MESSAGE_IDS.values())
    fork = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--dump-catalog", MESSAGE_IDS["fork_storm"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Subject: Fork storm" in fork.stdout and "TasksMax=" in fork.stdout
