"""A real prometheus-node-exporter on 127.0.0.1 serving a textfile directory, scraped once."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

NODE_EXPORTER = shutil.which("prometheus-node-exporter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def scrape_textfiles(directory: str | Path, *collectors: str) -> tuple[str, str]:
    """(the /metrics body, node_exporter's stderr) with the textfile collector on `directory`."""
    assert NODE_EXPORTER is not None, "prometheus-node-exporter is not installed"
    port = free_port()
    proc = subprocess.Popen(
        [
            NODE_EXPORTER,
            f"--web.listen-address=127.0.0.1:{port}",
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={directory}",
            *(f"--collector.{c}" for c in collectors),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = _get(f"http://127.0.0.1:{port}/metrics", proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    return body, err
