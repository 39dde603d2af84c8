"""linnixd-forward end to end: the real daemon core signals on a private dbus-daemon, the forwarder
(a subprocess, as installed) delivers to receivers on 127.0.0.1: a local HTTP server for the
webhook and Slack payloads, and a real prometheus-alertmanager started here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from nodeexporter import scrape_textfiles
from prometheus_client.parser import text_string_to_metric_families

from linnixd.forward import (
    ConfigError,
    ForwardConfig,
    Spool,
    Target,
    TargetWorker,
    am_alert,
    parse_config,
    signature,
    slack_payload,
)
from linnixd.model import Alert, Culprit

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
BUS_CONFIG = Path(__file__).parent / "dbus" / "system-bus.conf"
ALERTMANAGER = shutil.which("prometheus-alertmanager")
HOST = "testhost"


def make_alert(n: int, state: str = "firing", incident: str | None = None) -> Alert:
    return Alert(
        id=f"alert-{n}-{state}",
        incident=incident or f"inc-{n}",
        rule="fork_storm",
        severity="warning",
        state=state,
        ts=time.time(),
        summary=f"fork storm: {800 + n} process creations/s",
        culprit=Culprit(
            kind="process",
            pid=4200 + n,
            comm="lx-forkstorm",
            cgroup="/system.slice/batch.service",
            unit="batch.service",
        ),
        evidence={"rate_per_s": 800 + n, "forks": 1600 + n},
    )


# ---- pure parts ---------------------------------------------------------------------------------


def test_config_problems_name_the_file_and_key() -> None:
    text = """
targets:
  - {name: am, type: alertmanager, url: "ftp://x"}
  - {name: am, type: pager, url: http://x}
  - {name: s, type: slack}
  - {name: w, type: webhook, url: http://x, secret_file: relative/path, rate_per_min: 0}
spool_max: -1
colour: blue
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "/etc/linnixd/forward.yaml")
    f = "/etc/linnixd/forward.yaml"
    assert err.value.problems == [
        f"{f}: colour: unknown key (known: backoff_initial_s, backoff_max_s, host, metrics_dir, "
        "metrics_interval_s, resend_s, spool_max, targets)",
        f"{f}: spool_max: must be a number from 1 to 1e+07, got -1",
        f"{f}: targets[0]: url: 'ftp://x' is not an http:// or https:// URL",
        f"{f}: targets[1]: name: 'am' is used twice",
        f"{f}: targets[1]: type: must be one of alertmanager, slack, webhook, got 'pager'",
        f"{f}: targets[2]: give exactly one of url and url_file",
        f"{f}: targets[3]: secret_file: must be an absolute path, got 'relative/path'",
        f"{f}: targets[3]: rate_per_min: must be a number from 0.1 to 100000, got 0",
    ]


def test_bad_config_exits_78_with_one_line_per_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "forward.yaml"
    cfg.write_text("targets:\n  - {name: x, type: webhook, url: 'not a url'}\n")
    out = subprocess.run(
        [PYTHON, "-m", "linnixd.forward", "--config", str(cfg), "--state-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 78
    assert out.stderr == (
        f"linnixd-forward: {cfg}: targets[0]: url: 'not a url' is not an http:// or https:// URL\n"
    )
    empty = tmp_path / "empty.yaml"
    empty.write_text("targets: []\n")
    out = subprocess.run(
        [PYTHON, "-m", "linnixd.forward", "--config", str(empty), "--state-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "nothing is forwarded" in out.stderr


def test_alertmanager_payload_keeps_the_firing_labels_on_resolve() -> None:
    firing = make_alert(1).to_dict()
    resolved = {
        **make_alert(1, "resolved").to_dict(),
        "unit": "other.service",
        "ts": firing["ts"] + 30,
    }
    fired = am_alert(firing, HOST, None)
    assert fired["labels"] == {
        "alertname": "fork_storm",
        "severity": "warning",
        "host": HOST,
        "incident": "inc-1",
        "unit": "batch.service",
        "source": "linnixd",
    }
    assert fired["annotations"] == {"summary": "fork storm: 801 process creations/s"}
    assert "endsAt" not in fired
    done = am_alert(resolved, HOST, firing)
    assert done["labels"] == fired["labels"]
    assert done["startsAt"] == fired["startsAt"]
    assert done["endsAt"] > done["startsAt"]
    text = slack_payload(firing, HOST)["text"]
    assert "*fork_storm* firing on `testhost`" in text and "batch.service" in text


# ---- receivers and the daemon side ---------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST; `plan` scripts answers (status, delay)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.plan: list[tuple[int, float]] = []  # consumed first, then 200
        self.cond = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.cond:
                    status, delay = owner.plan.pop(0) if owner.plan else (200, 0.0)
                if delay:
                    time.sleep(delay)
                with owner.cond:
                    owner.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "status": status,
                        }
                    )
                    owner.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self, path: str = "") -> list[dict[str, Any]]:
        with self.cond:
            return [r for r in self.requests if r["status"] == 200 and r["path"].startswith(path)]

    def wait_for(self, pred: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; received {[r['path'] for r in self.requests]}"
                self.cond.wait(min(left, 0.5))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DaemonSide:
    """A private dbus-daemon and the real Daemon core served on it (bus.serve), on its own thread."""

    def __init__(self, tmp: Path) -> None:
        from linnixd.config import load_policy
        from linnixd.daemon import Daemon
        from linnixd.history import AlertHistory

        self.bus = subprocess.Popen(
            ["dbus-daemon", f"--config-file={BUS_CONFIG}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.bus.stdout is not None
        self.address = self.bus.stdout.readline().strip()
        from linnixd.bus import serve

        policy = load_policy(str(ROOT / "policy" / "rules.yaml"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[Daemon, Any]:
            # on the loop's thread: SQLite objects stay on the thread that made them
            history = AlertHistory(str(tmp / "alerts.sqlite3"))
            daemon = Daemon("rules.yaml", policy, history=history)
            return daemon, await serve(daemon, self.address)

        self.daemon, self.service = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def emit(self, alert: Alert) -> None:
        done = threading.Event()

        def go() -> None:
            self.daemon.emit(alert)
            done.set()

        self.loop.call_soon_threadsafe(go)
        assert done.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.service.close)
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.bus.terminate()
        self.bus.wait(10)


class ForwarderProc:
    """linnixd-forward as a subprocess; stderr collected; ready when it says it is forwarding."""

    def __init__(self, address: str, config: Path, state: Path) -> None:
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "linnixd.forward",
                "--bus",
                address,
                "--config",
                str(config),
                "--state-dir",
                str(state),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.state = state
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(60), f"forwarder not ready: {self.lines}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "forwarding linnixd alerts" in line:
                self.ready.set()

    def counters(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "counters.json").read_text()))

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def daemon_side(tmp_path: Path) -> Iterator[DaemonSide]:
    side = DaemonSide(tmp_path)
    try:
        yield side
    finally:
        side.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


def write_config(path: Path, targets: list[dict[str, Any]], **top: Any) -> Path:
    cfg = {
        "host": HOST,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 1.0,
        "metrics_dir": "",  # not the host's node_exporter directory
        **top,
        "targets": targets,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_until(pred: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---- webhook and Slack -----------------------------------------------------------------------


def test_webhook_is_signed_and_slack_gets_text(
    daemon_side: DaemonSide, receiver: Receiver, tmp_path: Path
) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("  s3cret-key\n")
    url_file = tmp_path / "slack.url"
    url_file.write_text(receiver.url + "/slack\n")
    cfg = write_config(
        tmp_path / "forward.yaml",
        [
            {
                "name": "ops",
                "type": "webhook",
                "url": receiver.url + "/hook",
                "secret_file": str(secret),
            },
            {"name": "chat", "type": "slack", "url_file": str(url_file)},
        ],
        metrics_dir=str(tmp_path),
        metrics_interval_s=1,
    )
    fwd = ForwarderProc(daemon_side.address, cfg, tmp_path / "state")
    try:
        alert = make_alert(1)
        daemon_side.emit(alert)
        receiver.wait_for(
            lambda: len(receiver.accepted("/hook")) == 1 and len(receiver.accepted("/slack")) == 1
        )
        wait_until(
            lambda: (
                fwd.counters()["targets"]["chat"]["delivered"] == 1
                and fwd.counters()["targets"]["ops"]["delivered"] == 1
            ),
            what="delivered counters",
        )
        prom = tmp_path / "linnixd_forward.prom"

        def exported() -> dict[Any, float]:
            text = prom.read_text() if prom.exists() else ""
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }

        def both_delivered() -> bool:
            got = exported()
            return all(
                got.get(("linnixd_forward_delivered_total", (("target", t),))) == 1
                for t in ("ops", "chat")
            )

        # a file written between the two deliveries shows only one of them: wait for both
        wait_until(both_delivered, what="linnixd_forward.prom")
        metrics = exported()
        assert oct(prom.stat().st_mode & 0o777) == "0o644"
        # what a real node_exporter serves from the file: one family per name, nothing refused
        body, err = scrape_textfiles(tmp_path)
        served = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        assert served[("node_textfile_scrape_error", ())] == 0, err
        assert served[("linnixd_forward_delivered_total", (("target", "ops"),))] == 1
        assert served[("linnixd_forward_spooled_total", (("target", "chat"),))] == 1
    finally:
        assert fwd.stop() == 0
    assert not prom.exists()  # removed at a clean stop
    assert metrics[("linnixd_forward_delivered_total", (("target", "chat"),))] == 1
    assert metrics[("linnixd_forward_queued", (("target", "ops"),))] == 0
    assert metrics[("linnixd_forward_received_total", ())] == 1
    assert metrics[("linnixd_forward_spool_full_total", (("target", "ops"),))] == 0
    hook = receiver.accepted("/hook")[0]
    body = hook["body"]
    expected = hmac.new(b"s3cret-key", body, hashlib.sha256).hexdigest()
    assert hook["headers"]["X-Linnix-Signature"] == f"sha256={expected}"
    assert signature(b"s3cret-key", body) == f"sha256={expected}"
    sent = json.loads(body)
    assert sent == {**json.loads(json.dumps(alert.to_dict())), "host": HOST}
    slack = json.loads(receiver.accepted("/slack")[0]["body"])
    assert set(slack) == {"text"}
    assert (
        "*fork_storm* firing on `testhost` (warning): fork storm: 801 process creations/s"
        in slack["text"]
    )
    counters = fwd.counters()
    assert counters["targets"]["ops"]["delivered"] == 1
    assert counters["targets"]["chat"]["delivered"] == 1
    assert counters["received"] == 1


def test_outage_kill9_and_restart_lose_nothing(
    daemon_side: DaemonSide, receiver: Receiver, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "forward.yaml",
        [{"name": "ops", "type": "webhook", "url": receiver.url + "/hook", "timeout_s": 1}],
    )
    state = tmp_path / "state"
    # the receiver answers 500 twice, then is too slow once (2 s against a 1 s timeout)
    receiver.plan = [(500, 0.0), (500, 0.0), (200, 2.0)]
    fwd = ForwarderProc(daemon_side.address, cfg, state)
    daemon_side.emit(make_alert(1))
    receiver.wait_for(lambda: len(receiver.requests) >= 3)  # 500, 500, the slow one
    # the receiver is down: nothing gets through while three more alerts arrive
    receiver.plan = [(503, 0.0)] * 1000
    for n in (2, 3, 4):
        daemon_side.emit(make_alert(n))
    wait_until(lambda: fwd.counters()["targets"]["ops"]["queued"] >= 3, what="spooled alerts")
    failed_before_kill = fwd.counters()["targets"]["ops"]["failed_attempts"]
    assert failed_before_kill >= 3
    fwd.kill9()
    spooled = sorted(p.name for p in (state / "spool" / "ops").glob("*.json"))
    assert len(spooled) >= 3
    (state / "spool" / "ops" / ".cut-short.tmp").write_text('{"alert": ')  # a write a kill cut
    # while the forwarder is dead the daemon emits two more (caught up from RecentAlerts)
    daemon_side.emit(make_alert(5))
    daemon_side.emit(make_alert(5, "resolved", incident="inc-5"))
    with receiver.cond:
        receiver.plan = []
    fwd = ForwarderProc(daemon_side.address, cfg, state)
    try:
        want = {f"alert-{n}-firing" for n in (1, 2, 3, 4, 5)} | {"alert-5-resolved"}
        receiver.wait_for(
            lambda: want <= {json.loads(r["body"])["id"] for r in receiver.accepted("/hook")}
        )
        wait_until(lambda: fwd.counters()["targets"]["ops"]["queued"] == 0, what="empty spool")
        counters = fwd.counters()
    finally:
        assert fwd.stop() == 0
    assert counters["caught_up"] == 2
    # the daemon core here never opened inc-1..4 in its tracker (alerts were emitted directly),
    # so after the restart the forwarder resolves them rather than keep them firing forever
    assert counters["orphans_resolved"] == 4 and counters["open_incidents"] == 0
    resolved = {json.loads(r["body"])["id"] for r in receiver.accepted("/hook")}
    assert {f"alert-{n}-firing-gone" for n in (1, 2, 3, 4)} <= resolved
    assert counters["targets"]["ops"]["spool_full"] == 0
    assert not list((state / "spool" / "ops").glob("*"))  # the cut-short write is gone too
    assert any("delivery failed, retrying" in line for line in fwd.lines) or failed_before_kill


def test_a_broken_target_does_not_hold_up_the_others(
    daemon_side: DaemonSide, receiver: Receiver, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once the socket closes
    cfg = write_config(
        tmp_path / "forward.yaml",
        [
            {"name": "down", "type": "webhook", "url": f"http://127.0.0.1:{closed}/x"},
            {
                "name": "nokey",
                "type": "webhook",
                "url": receiver.url + "/nokey",
                "secret_file": str(tmp_path / "missing.secret"),
            },
            {"name": "ok", "type": "webhook", "url": receiver.url + "/ok"},
        ],
        spool_max=2,
    )
    fwd = ForwarderProc(daemon_side.address, cfg, tmp_path / "state")
    try:
        for n in (1, 2, 3):
            daemon_side.emit(make_alert(n))
        receiver.wait_for(lambda: len(receiver.accepted("/ok")) == 2)
        wait_until(
            lambda: (
                fwd.counters()["targets"]["down"]["failed_attempts"] >= 2
                and fwd.counters()["targets"]["nokey"]["failed_attempts"] >= 2
            ),
            what="failed attempts",
        )
        c = fwd.counters()["targets"]
    finally:
        assert fwd.stop() == 0
    assert receiver.accepted("/nokey") == []  # never sent unsigned
    # spool_max 2: the third alert did not fit the failing targets' spools, counted and said
    assert (c["down"]["queued"], c["down"]["spool_full"]) == (2, 1)
    assert (c["nokey"]["queued"], c["nokey"]["spool_full"]) == (2, 1)
    assert (c["ok"]["delivered"], c["ok"]["spool_full"]) == (2, 1)
    assert any(f"cannot read secret_file {tmp_path}/missing.secret" in line for line in fwd.lines)
    assert any("Connection refused" in line for line in fwd.lines)


# ---- a real Alertmanager --------------------------------------------------------------------------


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: Receiver) -> Iterator[str]:
    if ALERTMANAGER is None:
        pytest.skip("prometheus-alertmanager is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "route": {
                    "receiver": "hook",
                    "group_by": ["incident"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {
                        "name": "hook",
                        "webhook_configs": [
                            {"url": receiver.url + "/from-alertmanager", "send_resolved": True}
                        ],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            str(ALERTMANAGER),
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _get(url + "/-/ready") is not None, what="alertmanager ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read()
            return json.loads(body) if body.startswith((b"[", b"{")) else body
    except OSError:
        return None


def test_real_alertmanager_lists_the_alert_and_resolves_it(
    daemon_side: DaemonSide, receiver: Receiver, alertmanager: str, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "forward.yaml",
        [{"name": "am", "type": "alertmanager", "url": alertmanager}],
        resend_s=5,
    )
    fwd = ForwarderProc(daemon_side.address, cfg, tmp_path / "state")
    try:
        daemon_side.emit(make_alert(7))
        listed: list[dict[str, Any]] = []

        def has_alert() -> bool:
            listed[:] = _get(alertmanager + "/api/v2/alerts") or []
            return any(a["labels"].get("incident") == "inc-7" for a in listed)

        wait_until(has_alert, what="the alert in Alertmanager's v2 API")
        mine = next(a for a in listed if a["labels"].get("incident") == "inc-7")
        assert mine["labels"] == {
            "alertname": "fork_storm",
            "severity": "warning",
            "host": HOST,
            "incident": "inc-7",
            "unit": "batch.service",
            "source": "linnixd",
        }
        assert mine["annotations"] == {"summary": "fork storm: 807 process creations/s"}
        assert mine["status"]["state"] == "active"
        # Alertmanager notifies its own receiver: firing first
        receiver.wait_for(lambda: _am_notified(receiver, "firing"))
        # while it is open the firing alert is said again (Alertmanager would expire it)
        wait_until(lambda: fwd.counters()["targets"]["am"]["resent"] >= 1, what="a re-send")
        daemon_side.emit(make_alert(7, "resolved", incident="inc-7"))
        receiver.wait_for(lambda: _am_notified(receiver, "resolved"))
        wait_until(lambda: not has_alert(), what="the alert to leave the active list")
        wait_until(lambda: fwd.counters()["targets"]["am"]["delivered"] == 2, what="counters")
        counters = fwd.counters()["targets"]["am"]
    finally:
        assert fwd.stop() == 0
    assert counters["delivered"] == 2 and counters["rejected"] == 0


def _am_notified(receiver: Receiver, status: str) -> bool:
    for r in receiver.accepted("/from-alertmanager"):
        note = json.loads(r["body"])
        for a in note.get("alerts", []):
            if a["labels"].get("incident") == "inc-7" and a["status"] == status:
                return True
    return False


def test_man_page_names_every_option_and_exit_code() -> None:
    from linnixd.forward import build_parser

    page = (ROOT / "packaging" / "man" / "linnixd-forward.8").read_text().replace("\\-", "-")
    options = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")]
    missing = [o for o in options if o not in page and o not in ("--help", "--version")]
    assert not missing, missing
    for code in ("0", "69", "70", "78"):
        assert f".B {code}\n" in page, code


def test_shipped_example_config_is_valid() -> None:
    text = (ROOT / "packaging" / "forward.yaml.example").read_text()
    config = parse_config(text, "forward.yaml.example")
    assert [(t.name, t.type) for t in config.targets] == [
        ("am", "alertmanager"),
        ("chat", "slack"),
        ("ops", "webhook"),
    ]
    assert config.targets[2].secret_file == "/etc/linnixd/hook.secret"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs: needs root")
def test_a_full_disk_under_the_spool_is_counted_and_the_rest_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)], check=True)
    logged: list[str] = []
    try:
        target = Target(name="ops", type="webhook", url="http://127.0.0.1:9/x")
        spool = Spool(full / "ops", 1000)
        worker = TargetWorker(target, ForwardConfig(targets=(target,)), spool, {}, lambda: None)
        monkeypatch.setattr(
            "linnixd.forward.log", lambda message, priority=6: logged.append(message)
        )
        big = {**make_alert(1).to_dict(), "summary": "x" * 3000}
        for n in range(12):
            worker.enqueue({**big, "id": f"a{n}"}, None)
        kept = len(spool)
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert 0 < kept < 12
    assert worker.counters.received == kept
    assert worker.counters.spool_errors == 12 - kept
    assert any("cannot write the spool" in m and "No space left on device" in m for m in logged)


def test_rate_limit_holds_sends_back_without_dropping(tmp_path: Path) -> None:
    now = [100.0]
    target = Target(name="ops", type="webhook", url="http://127.0.0.1:9/x", rate_per_min=6)
    worker = TargetWorker(
        target,
        ForwardConfig(targets=(target,)),
        Spool(tmp_path / "ops", 100),
        {},
        lambda: None,
        clock=lambda: now[0],
    )
    # 6 per minute: a burst of ten seconds' worth (1), then one every 10 s
    assert worker._take_token() == 0.0
    assert worker._take_token() == pytest.approx(10.0)
    now[0] += 4.0
    assert worker._take_token() == pytest.approx(6.0)
    now[0] += 6.0
    assert worker._take_token() == 0.0
