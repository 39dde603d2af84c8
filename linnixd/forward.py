"""linnixd-forward: delivers linnixd's alerts to Alertmanager, Slack and webhooks named in its config.

A separate process (its own unit and user, network allowed; the daemon keeps
PrivateNetwork=yes). It subscribes to the daemon's Alert signal, catches up from RecentAlerts
after a restart, and puts each alert into a bounded on-disk spool per target before sending,
so a receiver outage or a kill -9 loses nothing that fit the spool. Each target has its own
worker: retries with exponential backoff, a rate limit, counters. With no targets configured
nothing leaves the host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .constants import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from .daemonlog import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING, stream_is_journal
from .metrics import TextfileWriter, render_families

DEFAULT_CONFIG = "/etc/linnixd/forward.yaml"
DEFAULT_STATE_DIR = "/var/lib/linnixd-forward"
TARGET_TYPES = ("alertmanager", "slack", "webhook")
SIGNATURE_HEADER = "X-Linnix-Signature"
SEEN_FILE = "seen.json"
METRICS_FILE = "linnixd_forward.prom"
COUNTERS_FILE = "counters.json"
SEEN_KEPT = 5000  # alert ids remembered so a catch-up never sends one twice
CATCH_UP_LIMIT = 1000  # RecentAlerts asks for at most this many (the daemon's own cap)
CALL_TIMEOUT_S = 10.0
USER_AGENT = f"linnixd-forward/{__version__}"


def log(message: str, priority: int = LOG_INFO) -> None:
    line = " ".join(str(message).splitlines())
    prefix = f"<{priority}>" if stream_is_journal(sys.stderr) else ""
    print(f"{prefix}linnixd-forward: {line}", file=sys.stderr, flush=True)


# ---- configuration --------------------------------------------------------------------------


class ConfigError(Exception):
    """Problems in the forward config, one line each, naming the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Target:
    name: str
    type: str
    url: str = ""  # or url_file: a file holding the URL (a Slack webhook URL is a secret)
    url_file: str = ""
    secret_file: str = ""  # webhook: HMAC-SHA256 key, surrounding whitespace stripped
    rate_per_min: float = 60.0
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ForwardConfig:
    targets: tuple[Target, ...]
    spool_max: int = 10_000  # alerts kept per target while its receiver is away
    resend_s: float = 60.0  # Alertmanager: firing alerts are re-sent this often
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    host: str = field(default_factory=socket.gethostname)
    # node_exporter's textfile directory: linnixd_forward.prom, when it exists ("" = off)
    metrics_dir: str = "/var/lib/prometheus/node-exporter"
    metrics_interval_s: float = 15.0


_TARGET_KEYS = {f.name for f in Target.__dataclass_fields__.values()}
_TOP_KEYS = {
    "targets",
    "spool_max",
    "resend_s",
    "backoff_initial_s",
    "backoff_max_s",
    "host",
    "metrics_dir",
    "metrics_interval_s",
}


def _check_url(url: str, where: str) -> str | None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return f"{where}: {url!r} is not an http:// or https:// URL"
    return None


def _number(raw: Any, where: str, lo: float, hi: float, problems: list[str]) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not lo <= raw <= hi:
        problems.append(f"{where}: must be a number from {lo:g} to {hi:g}, got {raw!r}")
        return None
    return float(raw)


def parse_config(text: str, path: str) -> ForwardConfig:
    """The config from YAML text; ConfigError lists every problem as `path: key: what is wrong`."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: must be a mapping with a targets list"])
    problems: list[str] = []
    for key in sorted(set(raw) - _TOP_KEYS):
        problems.append(f"{path}: {key}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    top: dict[str, Any] = {}
    for key, lo, hi in (
        ("spool_max", 1, 10_000_000),
        ("resend_s", 5, 86_400),
        ("backoff_initial_s", 0.01, 3600),
        ("backoff_max_s", 0.01, 86_400),
        ("metrics_interval_s", 1, 3600),
    ):
        if key in raw:
            value = _number(raw[key], f"{path}: {key}", lo, hi, problems)
            if value is not None:
                top[key] = int(value) if key == "spool_max" else value
    if "metrics_dir" in raw:
        if isinstance(raw["metrics_dir"], str) and (
            raw["metrics_dir"] == "" or raw["metrics_dir"].startswith("/")
        ):
            top["metrics_dir"] = raw["metrics_dir"]
        else:
            problems.append(f'{path}: metrics_dir: must be an absolute path or "" (off)')
    if "host" in raw:
        if isinstance(raw["host"], str) and raw["host"].strip():
            top["host"] = raw["host"].strip()
        else:
            problems.append(f"{path}: host: must be a non-empty string")
    targets: list[Target] = []
    entries = raw.get("targets", [])
    if not isinstance(entries, list):
        problems.append(f"{path}: targets: must be a list")
        entries = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: targets[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with name, type and url or url_file")
            continue
        for key in sorted(set(entry) - _TARGET_KEYS):
            problems.append(f"{where}: {key}: unknown key")
        name, kind = entry.get("name"), entry.get("type")
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"{where}: name: must be letters, digits, - and _, got {name!r}")
        elif name in names:
            problems.append(f"{where}: name: {name!r} is used twice")
        else:
            names.add(name)
        if kind not in TARGET_TYPES:
            problems.append(
                f"{where}: type: must be one of {', '.join(TARGET_TYPES)}, got {kind!r}"
            )
        url, url_file = entry.get("url", ""), entry.get("url_file", "")
        if bool(url) == bool(url_file):
            problems.append(f"{where}: give exactly one of url and url_file")
        elif url:
            bad = _check_url(str(url), f"{where}: url")
            if bad:
                problems.append(bad)
        for key in ("url_file", "secret_file"):
            path_value: Any = entry.get(key, "")
            if path_value and (not isinstance(path_value, str) or not path_value.startswith("/")):
                problems.append(f"{where}: {key}: must be an absolute path, got {path_value!r}")
        if entry.get("secret_file") and kind != "webhook":
            problems.append(f"{where}: secret_file: only webhook targets are signed")
        extra: dict[str, float] = {}
        for key, lo, hi in (("rate_per_min", 0.1, 100_000), ("timeout_s", 0.1, 300)):
            if key in entry:
                value = _number(entry[key], f"{where}: {key}", lo, hi, problems)
                if value is not None:
                    extra[key] = value
        if not problems:
            targets.append(
                Target(
                    name=str(name),
                    type=str(kind),
                    url=str(url),
                    url_file=str(url_file),
                    secret_file=str(entry.get("secret_file", "")),
                    **extra,
                )
            )
    if problems:
        raise ConfigError(problems)
    return ForwardConfig(targets=tuple(targets), **top)


def load_config(path: str) -> ForwardConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse_config(text, path)


# ---- payloads ---------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _field(alert: Mapping[str, Any], key: str) -> str:
    value = alert.get(key)
    if value in (None, ""):
        value = (alert.get("evidence") or {}).get(key)
    return "" if value is None else str(value)


def am_labels(alert: Mapping[str, Any], host: str) -> dict[str, str]:
    """Alertmanager labels: the same for an incident's firing and resolved records."""
    labels = {
        "alertname": str(alert.get("rule", "")),
        "severity": str(alert.get("severity", "")),
        "host": host,
        "incident": str(alert.get("incident", "")),
        "unit": _field(alert, "unit"),
        "pod": _field(alert, "pod"),
        "namespace": _field(alert, "namespace"),
        "source": "linnixd",
    }
    return {k: v for k, v in labels.items() if v}


def am_alert(
    alert: Mapping[str, Any], host: str, firing: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One element of POST /api/v2/alerts; a resolved record keeps its firing record's labels and start."""
    origin = firing or alert
    out: dict[str, Any] = {
        "labels": am_labels(origin, host),
        "annotations": {"summary": str(alert.get("summary", ""))},
        "startsAt": _iso(float(origin.get("ts", 0.0))),
    }
    if alert.get("state") == "resolved":
        out["endsAt"] = _iso(float(alert.get("ts", 0.0)))
    return out


def slack_payload(alert: Mapping[str, Any], host: str) -> dict[str, Any]:
    state = str(alert.get("state", ""))
    mark = ":white_check_mark:" if state == "resolved" else ":rotating_light:"
    culprit = _field(alert, "unit") or _field(alert, "cgroup") or _field(alert, "comm")
    text = (
        f"{mark} *{alert.get('rule')}* {state} on `{host}` ({alert.get('severity')}): "
        f"{alert.get('summary')}"
    )
    if culprit:
        text += f"\nculprit: `{culprit}`, incident `{alert.get('incident')}`"
    return {"text": text}


def webhook_body(alert: Mapping[str, Any], host: str) -> bytes:
    return json.dumps({**alert, "host": host}, sort_keys=True).encode()


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


# ---- the spool ------------------------------------------------------------------------------


class Spool:
    """Alerts waiting for one target, one JSON file each, oldest first; bounded, counted when full."""

    def __init__(self, directory: Path, max_items: int) -> None:
        self.dir = directory
        self.max_items = max_items
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(
            ".*.tmp"
        ):  # a write cut short by a kill: never renamed, never sent
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._items = sorted(p.name for p in self.dir.glob("*.json"))
        self._seq = int(self._items[-1].split(".")[0]) + 1 if self._items else 1

    def __len__(self) -> int:
        return len(self._items)

    def put(self, alert: Mapping[str, Any]) -> None:
        """Store one alert durably; OSError (full disk, read-only) or SpoolFull when it cannot."""
        if len(self._items) >= self.max_items:
            raise SpoolFull(f"spool {self.dir} holds {self.max_items} alerts (spool_max)")
        name = f"{self._seq:016d}.json"
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(alert, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._seq += 1
        self._items.append(name)

    def peek(self) -> tuple[str, dict[str, Any]] | None:
        """The oldest alert (skipping and removing files that no longer parse)."""
        while self._items:
            name = self._items[0]
            try:
                return name, json.loads((self.dir / name).read_text())
            except (OSError, ValueError):
                self.remove(name)
        return None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / name)
        if self._items and self._items[0] == name:
            self._items.pop(0)
        elif name in self._items:
            self._items.remove(name)


class SpoolFull(Exception):
    pass


# ---- delivery ---------------------------------------------------------------------------------


class DeliveryError(Exception):
    """One failed attempt; `permanent` when retrying the same payload cannot succeed."""

    def __init__(self, detail: str, permanent: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.permanent = permanent


def _read_secret(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes().strip()
    except OSError as exc:
        raise DeliveryError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    """POST body; the status on 2xx, DeliveryError otherwise (4xx but 408/429 are permanent)."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            resp.read(65536)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        permanent = 400 <= exc.code < 500 and exc.code not in (408, 425, 429)
        raise DeliveryError(f"HTTP {exc.code} {exc.reason}", permanent=permanent) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{type(exc).__name__}: {reason}") from None


# A per-target counter exported under another name: one family per name in a textfile
# (node_exporter refuses a file with a second HELP line for linnixd_forward_received_total).
PER_TARGET_SERIES = {"received": "spooled"}


@dataclass
class TargetCounters:
    received: int = 0  # alerts put into this target's spool
    delivered: int = 0  # accepted by the receiver (2xx)
    failed_attempts: int = 0  # attempts that will be retried
    rejected: int = 0  # refused for good (4xx): dropped, journaled
    spool_full: int = 0  # alerts that did not fit the spool: dropped, journaled
    spool_errors: int = 0  # alerts the spool could not store (full disk, read-only): dropped
    rate_limited: int = 0  # sends held back by the target's rate limit
    resent: int = 0  # Alertmanager: firing alerts re-sent while open
    resend_errors: int = 0


class TargetWorker:
    """Sends one target's spool oldest first: rate limit, retries with backoff, counters."""

    def __init__(
        self,
        target: Target,
        config: ForwardConfig,
        spool: Spool,
        open_incidents: Mapping[str, dict[str, Any]],
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.config = config
        self.spool = spool
        self.open = open_incidents
        self.counters = TargetCounters()
        self.on_change = on_change
        self.clock = clock
        self.wake = asyncio.Event()
        self.last_error = ""
        self._tokens = max(1.0, target.rate_per_min / 60.0 * 10)  # burst: ten seconds' worth
        self._burst = self._tokens
        self._refilled = clock()
        self._last_resend = clock()

    def enqueue(self, alert: Mapping[str, Any], firing: Mapping[str, Any] | None) -> None:
        """Spool one alert (with its incident's firing record, whose labels a resolve repeats)."""
        try:
            self.spool.put({"alert": alert, "firing": firing})
        except SpoolFull as exc:
            self.counters.spool_full += 1
            log(f"{self.target.name}: dropped alert {alert.get('id')}: {exc}", LOG_ERR)
        except OSError as exc:
            self.counters.spool_errors += 1
            log(
                f"{self.target.name}: dropped alert {alert.get('id')}: cannot write the spool "
                f"{self.spool.dir}: {exc.strerror or exc}",
                LOG_ERR,
            )
        else:
            self.counters.received += 1
        self.on_change()
        self.wake.set()

    def url(self) -> str:
        if self.target.url:
            return self.target.url
        url = _read_secret(self.target.url_file, "url_file").decode(errors="replace")
        bad = _check_url(url, f"url_file {self.target.url_file}")
        if bad:
            raise DeliveryError(bad)
        return url

    def request(self, item: Mapping[str, Any]) -> tuple[str, bytes, dict[str, str]]:
        """(url, body, headers) for one spooled alert on this target."""
        host = self.config.host
        alert = item["alert"]
        if self.target.type == "alertmanager":
            body = json.dumps([am_alert(alert, host, item.get("firing"))]).encode()
            return self.url().rstrip("/") + "/api/v2/alerts", body, {}
        if self.target.type == "slack":
            return self.url(), json.dumps(slack_payload(alert, host)).encode(), {}
        body = webhook_body(alert, host)
        headers = {}
        if self.target.secret_file:
            headers[SIGNATURE_HEADER] = signature(
                _read_secret(self.target.secret_file, "secret_file"), body
            )
        return self.url(), body, headers

    def _take_token(self) -> float:
        """0 when a send may go now (a token is taken), else seconds until one is there."""
        now = self.clock()
        rate = self.target.rate_per_min / 60.0
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / rate

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, post_json, url, body, headers, self.target.timeout_s)

    def _failed(self, message: str) -> None:
        if message != self.last_error:
            log(f"{self.target.name}: {message}", LOG_WARNING)
            self.last_error = message

    async def run(self) -> None:
        backoff = self.config.backoff_initial_s
        while True:
            head = self.spool.peek()
            if head is None:
                await self._maybe_resend()
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self._resend_wait())
                continue
            wait = self._take_token()
            if wait > 0:
                self.counters.rate_limited += 1
                self.on_change()
                await asyncio.sleep(wait)
                continue
            name, item = head
            alert = item.get("alert") or {}
            try:
                url, body, headers = self.request(item)
                await self._send(url, body, headers)
            except DeliveryError as exc:
                if exc.permanent:
                    self.counters.rejected += 1
                    self.spool.remove(name)
                    log(
                        f"{self.target.name}: alert {alert.get('id')} refused for good, dropped: {exc.detail}",
                        LOG_ERR,
                    )
                    self.on_change()
                    continue
                self.counters.failed_attempts += 1
                self._failed(f"delivery failed, retrying in {backoff:g} s: {exc.detail}")
                self.on_change()
                await asyncio.sleep(backoff)
                backoff = min(self.config.backoff_max_s, backoff * 2)
                continue
            self.spool.remove(name)
            self.counters.delivered += 1
            backoff = self.config.backoff_initial_s
            if self.last_error:
                log(f"{self.target.name}: delivering again", LOG_NOTICE)
                self.last_error = ""
            self.on_change()

    def _resend_wait(self) -> float | None:
        if self.target.type != "alertmanager":
            return None
        return max(0.1, self._last_resend + self.config.resend_s - self.clock())

    async def _maybe_resend(self) -> None:
        """Alertmanager forgets a firing alert after resolve_timeout: say it again while it is open."""
        if self.target.type != "alertmanager" or not self.open:
            return
        if self.clock() - self._last_resend < self.config.resend_s:
            return
        self._last_resend = self.clock()
        batch = [am_alert(a, self.config.host, None) for a in self.open.values()]
        try:
            url = self.url().rstrip("/") + "/api/v2/alerts"
            await self._send(url, json.dumps(batch).encode(), {})
        except DeliveryError as exc:
            self.counters.resend_errors += 1
            self._failed(f"re-sending {len(batch)} firing alerts failed: {exc.detail}")
        else:
            self.counters.resent += len(batch)
        self.on_change()


# ---- the forwarder ------------------------------------------------------------------------------


class Forwarder:
    """Alerts in (signal or catch-up), deduplicated by id, into every target's spool."""

    def __init__(self, config: ForwardConfig, state_dir: str) -> None:
        self.config = config
        self.state = Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.open: dict[str, dict[str, Any]] = {}  # incident -> its firing alert
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.last_ts = 0.0
        self.received = 0
        self.duplicates = 0
        self.caught_up = 0
        self.bad_signals = 0
        self.state_errors = 0
        self.orphans_resolved = 0  # open incidents the daemon forgot (restart), resolved by us
        self.metrics: TextfileWriter | None = None
        if config.metrics_dir and os.path.isdir(config.metrics_dir):
            self.metrics = TextfileWriter(
                config.metrics_dir, lambda m: log(m, LOG_WARNING), METRICS_FILE
            )
        self._load_seen()
        self.workers = [
            TargetWorker(
                t,
                config,
                Spool(self.state / "spool" / t.name, config.spool_max),
                self.open,
                self.save_counters,
            )
            for t in config.targets
        ]

    def _load_seen(self) -> None:
        try:
            raw = json.loads((self.state / SEEN_FILE).read_text())
            self.last_ts = float(raw.get("last_ts", 0.0))
            for alert_id in raw.get("ids", []):
                self.seen[str(alert_id)] = 0.0
            self.open.update(raw.get("open", {}))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log(f"{self.state / SEEN_FILE}: unreadable, starting afresh: {exc}", LOG_WARNING)

    def _write_json(self, name: str, data: Any) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.state)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, sort_keys=True)
            os.replace(tmp, self.state / name)
        except OSError as exc:
            self.state_errors += 1
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log(f"cannot write {self.state / name}: {exc.strerror or exc}", LOG_ERR)

    def take(self, alert: Mapping[str, Any], caught_up: bool = False) -> bool:
        """One alert from the daemon: spooled for every target unless already seen. True when new."""
        alert_id = str(alert.get("id", ""))
        if not alert_id:
            self.bad_signals += 1
            return False
        if alert_id in self.seen:
            self.duplicates += 1
            return False
        alert = dict(alert)
        incident = str(alert.get("incident", ""))
        firing = self.open.get(incident) if alert.get("state") == "resolved" else None
        for worker in self.workers:
            worker.enqueue(alert, firing)
        if alert.get("state") == "firing":
            self.open[incident] = alert
        elif alert.get("state") == "resolved":
            self.open.pop(incident, None)
        self.seen[alert_id] = float(alert.get("ts", 0.0))
        while len(self.seen) > SEEN_KEPT:
            self.seen.popitem(last=False)
        self.last_ts = max(self.last_ts, float(alert.get("ts", 0.0)))
        self.received += 1
        self.caught_up += int(caught_up)
        self.save_seen()
        self.save_counters()
        return True

    def save_seen(self) -> None:
        self._write_json(
            SEEN_FILE, {"last_ts": self.last_ts, "ids": list(self.seen), "open": self.open}
        )

    def counters(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "caught_up": self.caught_up,
            "bad_signals": self.bad_signals,
            "state_errors": self.state_errors,
            "orphans_resolved": self.orphans_resolved,
            "open_incidents": len(self.open),
            "targets": {
                w.target.name: {**asdict(w.counters), "queued": len(w.spool)} for w in self.workers
            },
        }

    def save_counters(self) -> None:
        self._write_json(COUNTERS_FILE, self.counters())

    def metric_families(self) -> Iterator[Any]:
        """The counters as Prometheus families: linnixd_forward_*{target}."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        c = self.counters()
        for name in (
            "received",
            "duplicates",
            "caught_up",
            "bad_signals",
            "state_errors",
            "orphans_resolved",
        ):
            yield CounterMetricFamily(
                f"linnixd_forward_{name}_total", f"linnixd-forward {name}", value=c[name]
            )
        yield GaugeMetricFamily(
            "linnixd_forward_open_incidents", "Incidents firing now", value=c["open_incidents"]
        )
        for name in TargetCounters.__dataclass_fields__:
            exported = PER_TARGET_SERIES.get(name, name)
            family = CounterMetricFamily(
                f"linnixd_forward_{exported}_total", f"Per target: {exported}", labels=["target"]
            )
            for target, counts in sorted(c["targets"].items()):
                family.add_metric([target], counts[name])
            yield family
        queued = GaugeMetricFamily(
            "linnixd_forward_queued", "Alerts in the spool, not yet accepted", labels=["target"]
        )
        for target, counts in sorted(c["targets"].items()):
            queued.add_metric([target], counts["queued"])
        yield queued
        if self.metrics is not None:
            for name, value in self.metrics.health().counters.items():
                yield CounterMetricFamily(
                    f"linnixd_forward_metrics_{name}_total", f"textfile {name}", value=value
                )

    def write_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.write(render_families(self.metric_families))


# ---- the bus side ------------------------------------------------------------------------------


async def _catch_up(bus: Any, fwd: Forwarder) -> int:
    """Alerts the daemon stored while we were away (RecentAlerts since the last one seen)."""
    from . import client
    from .wire import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH

    if not fwd.last_ts:  # a first start forwards from now on, not the daemon's whole history
        fwd.last_ts = time.time()
        fwd.save_seen()
        return 0
    since = max(0.0, fwd.last_ts - 1.0)
    msg = client.method_call(
        BUS_NAME, OBJECT_PATH, MANAGER_INTERFACE, "RecentAlerts", "dsu", [since, "", CATCH_UP_LIMIT]
    )
    reply = await client.call(bus, msg, CALL_TIMEOUT_S)
    alerts = json.loads(reply.body[0])
    new = 0
    for alert in sorted(alerts, key=lambda a: float(a.get("ts", 0.0))):  # oldest first
        new += int(fwd.take(alert, caught_up=True))
    # a restarted daemon forgets its open incidents without resolving them: resolve them here,
    # or Alertmanager would be told they fire forever
    msg = client.method_call(BUS_NAME, OBJECT_PATH, MANAGER_INTERFACE, "OpenIncidents")
    reply = await client.call(bus, msg, CALL_TIMEOUT_S)
    still = {str(a.get("incident")) for a in json.loads(reply.body[0])}
    for incident, firing in list(fwd.open.items()):
        if incident not in still:
            fwd.take(
                {
                    **firing,
                    "id": f"{firing.get('id')}-gone",
                    "state": "resolved",
                    "ts": time.time(),
                    "summary": f"resolved (the daemon no longer has it open): {firing.get('summary')}",
                }
            )
            fwd.orphans_resolved += 1
    return new


async def serve(fwd: Forwarder, bus_spec: str, ready: Callable[[], None] | None = None) -> int:
    from dbus_next import Message, MessageType

    from . import client
    from .wire import (
        ALERT_SIGNAL,
        ALERT_SIGNATURE,
        BUS_NAME,
        MANAGER_INTERFACE,
        decode_alert,
        signal_match,
    )

    try:
        bus = await client.connect(bus_spec, CALL_TIMEOUT_S)
    except client.BusUnreachable as exc:
        log(f"cannot reach {client.bus_label(bus_spec)}: {exc.detail}", LOG_ERR)
        return EXIT_UNAVAILABLE
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()
    pending: set[asyncio.Task[Any]] = set()

    async def catch_up() -> None:
        try:
            new = await _catch_up(bus, fwd)
        except client.BusClientError as exc:
            log(
                f"catch-up from RecentAlerts failed (signals still arrive): {exc.detail}",
                LOG_WARNING,
            )
        except (ValueError, TypeError, IndexError) as exc:
            log(f"catch-up: unexpected RecentAlerts answer: {exc}", LOG_WARNING)
        else:
            if new:
                log(f"caught up {new} alerts from the daemon's history", LOG_NOTICE)

    def on_message(msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == BUS_NAME:
            if msg.body[2]:  # the daemon (re)started: what did it emit meanwhile?
                task = asyncio.ensure_future(catch_up())
                pending.add(task)
                task.add_done_callback(pending.discard)
            return
        if msg.interface != MANAGER_INTERFACE or msg.member != ALERT_SIGNAL:
            return
        if msg.signature != ALERT_SIGNATURE:
            fwd.bad_signals += 1
            return
        try:
            fwd.take(decode_alert(msg.body).to_dict())
        except Exception as exc:  # one bad signal must not stop the forwarder
            fwd.bad_signals += 1
            log(f"ignored an Alert signal that does not decode: {exc!r}", LOG_WARNING)

    bus.add_message_handler(on_message)
    for rule in (
        signal_match(ALERT_SIGNAL),
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
        f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
    ):
        await client.call(
            bus,
            client.method_call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
            ),
            CALL_TIMEOUT_S,
        )
    await catch_up()
    fwd.save_counters()
    workers = [asyncio.ensure_future(w.run()) for w in fwd.workers]

    async def export() -> None:
        while True:
            await loop.run_in_executor(None, fwd.write_metrics)
            await asyncio.sleep(fwd.config.metrics_interval_s)

    if fwd.metrics is not None:
        workers.append(asyncio.ensure_future(export()))

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(EXIT_OK)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log(json.dumps(fwd.counters(), sort_keys=True)))
    names = ", ".join(f"{w.target.name} ({w.target.type})" for w in fwd.workers)
    log(f"forwarding linnixd alerts on {client.bus_label(bus_spec)} to {names}", LOG_NOTICE)
    if ready is not None:
        ready()
    disconnect = asyncio.ensure_future(bus.wait_for_disconnect())
    await asyncio.wait({stop, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    for task in [*workers, *pending]:
        task.cancel()
    fwd.save_counters()
    if fwd.metrics is not None:
        fwd.metrics.remove()
    if not stop.done():
        log(f"lost {client.bus_label(bus_spec)}; the spool keeps what was not sent", LOG_ERR)
        return EXIT_UNAVAILABLE
    disconnect.cancel()
    bus.disconnect()
    return stop.result()


# ---- command line ------------------------------------------------------------------------------

EPILOG = """\
exit status:
  0   clean stop, or no targets configured    69  bus unreachable or lost
  70  internal error                          78  invalid config

files:
  /etc/linnixd/forward.yaml        targets (see linnixd-forward(8))
  /var/lib/linnixd-forward/spool   alerts not yet delivered, one directory per target
  /var/lib/linnixd-forward/counters.json   delivered, failed, dropped, queued per target
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linnixd-forward",
        description="Forward linnixd's alerts to Alertmanager, Slack or webhooks (only to the targets in the config).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bus",
        default="system",
        metavar="BUS",
        help="where linnixd is: system, session or a D-Bus address (default: system)",
    )
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"default: {DEFAULT_CONFIG}"
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("STATE_DIRECTORY") or DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"spool and counters (default: $STATE_DIRECTORY or {DEFAULT_STATE_DIR})",
    )
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version=f"linnixd-forward {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            log(problem, LOG_ERR)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config}: {len(config.targets)} targets, valid")
        return EXIT_OK
    from .notify import Notifier

    notifier = Notifier()
    if not config.targets:
        log(f"no targets in {args.config}: nothing is forwarded", LOG_NOTICE)
        notifier.ready()  # a clean "nothing to do" for Type=notify, not a failed start
        return EXIT_OK
    try:
        fwd = Forwarder(config, args.state_dir)
    except OSError as exc:
        log(f"cannot use the state directory {args.state_dir}: {exc.strerror or exc}", LOG_ERR)
        return EXIT_UNAVAILABLE
    try:
        return asyncio.run(serve(fwd, args.bus, ready=notifier.ready))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # the last line of defence: one line, never a traceback
        log(f"internal error: {exc!r}", LOG_ERR)
        return EXIT_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
