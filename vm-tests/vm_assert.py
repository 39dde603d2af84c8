"""In-VM assertions for the linnixd package: install, sandbox, alerts, bus, polkit, restarts, purge."""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

SHARE = Path("/mnt/share")
PAYLOAD = SHARE / "payload"
RESULTS = SHARE / "results"
UNIT = "linnixd.service"
UNIT_FILES = ("/lib/systemd/system/linnixd.service", "/usr/lib/systemd/system/linnixd.service")
BUS = "org.linnix.linnixd1"
PATH = "/org/linnix/linnixd1"
IFACE = "org.linnix.linnixd1.Manager"
TESTER = "linnixtester"
POLKIT_RULES = "/usr/share/polkit-1/rules.d/60-linnixd-systemd.rules"
# Capability numbers from linux/capability.h (stable ABI).
CAP_NUMBERS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_PERFMON": 38, "CAP_BPF": 39}
READY_TIMEOUT_S = 180.0  # bcc compiles at start: 4-6 s under TCG, more on a loaded host


class Report:
    """Collects PASS/FAIL lines and figures into the share, flushed after every assertion."""

    def __init__(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.results = (RESULTS / "results.tsv").open("w")
        self.figures = (RESULTS / "figures.tsv").open("w")
        self.failed = 0

    def _row(self, name: str, result: str, detail: str, head: int, tail: int) -> None:
        flat = " ".join(detail.split())
        # long output keeps both ends: the command's start and its final error
        flat = flat if len(flat) <= head + tail + 10 else flat[:head] + " ... " + flat[-tail:]
        line = f"{name}\t{result}\t{flat}"
        print(line, flush=True)
        self.results.write(line + "\n")
        self.results.flush()

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.failed += 0 if ok else 1
        self._row(name, "PASS" if ok else "FAIL", detail, 250, 340)
        return ok

    def known(self, name: str, ok: bool, detail: str) -> bool:
        """A check with a known, documented failure (an open issue): KNOWN instead of FAIL.

        vm-tests/run prints it with its detail but does not fail the run on it; it turns PASS
        the day the gap is fixed, and the detail carries what is needed to find the cause.
        """
        self._row(name, "PASS" if ok else "KNOWN", detail, 300, 590)
        return ok

    def figure(self, name: str, value: str) -> None:
        print(f"figure {name} = {value}", flush=True)
        self.figures.write(f"{name}\t{value}\n")
        self.figures.flush()


def sh(
    *argv: str, user: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Runs a command (as `user` through runuser), never raising: the result is asserted on."""
    if user:
        argv = ("runuser", "-u", user, "--", *argv)
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(
            argv, 124, str(exc.stdout or ""), f"timed out after {timeout} s"
        )


def out(cp: subprocess.CompletedProcess[str]) -> str:
    return f"rc={cp.returncode} {cp.stdout.strip()} {cp.stderr.strip()}"


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def prop(name: str) -> str:
    return sh("systemctl", "show", "-P", name, UNIT).stdout.strip()


def is_active() -> bool:
    return sh("systemctl", "is-active", UNIT).stdout.strip() == "active"


def journal_tail() -> str:
    """The daemon's own lines (not systemd's restart chatter): what it said before dying."""
    text = sh("journalctl", "-u", UNIT, "-n", "80", "--no-pager", "-o", "cat").stdout
    print(text, flush=True)
    own = [
        line
        for line in text.splitlines()
        if line.startswith(("linnixd:", "Traceback")) or "Error" in line
    ]
    return "\n".join(own[-4:])


def unit_caps() -> list[str]:
    """The capability names in the installed unit's AmbientCapabilities= line."""
    for f in UNIT_FILES:
        if os.path.exists(f):
            for line in Path(f).read_text().splitlines():
                if line.startswith("AmbientCapabilities="):
                    return line.split("=", 1)[1].split()
    return []


def cap_mask(names: list[str]) -> int:
    return sum(1 << CAP_NUMBERS[n] for n in names)


def ready_seconds() -> float:
    """Service start (exec) to READY=1, from systemd's own timestamps."""
    start = int(prop("ExecMainStartTimestampMonotonic") or 0)
    active = int(prop("ActiveEnterTimestampMonotonic") or 0)
    return (active - start) / 1e6


def history_rows() -> int:
    """Rows mentioning fork_storm in the SQLite alert history (schema-agnostic)."""
    dbs = glob.glob("/var/lib/linnixd/*.sqlite3")
    if not dbs:
        return -1
    con = sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True)
    try:
        n = 0
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            for row in con.execute(f'SELECT * FROM "{t}"'):
                n += any("fork_storm" in str(v) for v in row)
        return n
    finally:
        con.close()


def dbus_call(member: str, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return sh(
        "dbus-send",
        "--system",
        "--print-reply",
        f"--dest={BUS}",
        PATH,
        f"{IFACE}.{member}",
        *args,
        user=user,
    )


def fork_storm_entries() -> list[dict[str, str]]:
    cp = sh("journalctl", "-u", UNIT, "LINNIX_RULE=fork_storm", "-o", "json", "--no-pager")
    return [json.loads(line) for line in cp.stdout.splitlines() if line.strip()]


def run(r: Report) -> None:
    t_boot = float(Path("/proc/uptime").read_text().split()[0])
    r.figure("vm_boot_to_test_s", f"{t_boot:.1f}")
    r.figure("systemd_version", sh("systemctl", "--version").stdout.split("\n")[0])
    r.figure("kernel", os.uname().release)

    debs = sorted(PAYLOAD.glob("linnixd_*.deb"))
    t0 = time.monotonic()
    cp = sh(
        "apt-get", "install", "-y", str(debs[0]) if debs else "linnixd_missing.deb", timeout=600
    )
    r.figure("install_s", f"{time.monotonic() - t0:.1f}")
    if not r.check("apt install ./linnixd_*.deb (offline)", cp.returncode == 0, out(cp)[-400:]):
        return

    unit_file = next((f for f in UNIT_FILES if os.path.exists(f)), "")
    cp = sh("systemd-analyze", "verify", unit_file or "linnixd.service")
    r.check(
        "systemd-analyze verify linnixd.service",
        cp.returncode == 0 and not cp.stderr.strip(),
        out(cp),
    )
    cp = sh("systemd-analyze", "security", "--no-pager", UNIT)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", cp.stdout)
    exposure = float(m.group(1)) if m else 99.0
    r.figure("exposure", f"{exposure:.1f}")
    r.check("systemd-analyze security exposure <= 4.0", exposure <= 4.0, f"exposure {exposure}")

    pw = pwd.getpwnam("linnix") if sh("getent", "passwd", "linnix").returncode == 0 else None
    r.check(
        "sysusers created user linnix",
        pw is not None and pw.pw_uid < 1000 and pw.pw_shell.endswith("nologin"),
        f"{pw}",
    )
    st = os.stat("/var/lib/linnixd") if os.path.isdir("/var/lib/linnixd") else None
    r.check(
        "state dir /var/lib/linnixd owned by linnix",
        st is not None and pw is not None and st.st_uid == pw.pw_uid,
        f"stat {st}",
    )
    shipped = [
        "/usr/share/dbus-1/system.d/org.linnix.linnixd1.conf",
        "/usr/share/polkit-1/actions/org.linnix.linnixd1.policy",
        POLKIT_RULES,
        "/etc/linnixd/rules.yaml",
    ]
    missing = [f for f in shipped if not os.path.exists(f)]
    r.check(
        "bus policy, polkit actions and rules, policy file in place",
        not missing,
        f"missing {missing}",
    )
    conff = sh("dpkg-query", "-W", "-f=${Conffiles}", "linnixd").stdout
    r.check("/etc/linnixd/rules.yaml is a conffile", "/etc/linnixd/rules.yaml" in conff, conff)
    cp = sh("pkaction", "--action-id", "org.linnix.linnixd1.reload-policy", "--verbose")
    r.check(
        "polkit knows org.linnix.linnixd1.reload-policy (auth_admin_keep)",
        cp.returncode == 0 and "auth_admin_keep" in cp.stdout,
        out(cp)[:300],
    )
    r.check(
        "unit enabled",
        sh("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled",
        sh("systemctl", "is-enabled", UNIT).stdout,
    )

    probe_sandbox(r)

    # a restart means the first start crashed: stop waiting then instead of watching a restart loop
    active = (
        wait_for(
            lambda: (
                is_active() or prop("ActiveState") == "failed" or int(prop("NRestarts") or 0) > 0
            ),
            READY_TIMEOUT_S,
        )
        and is_active()
    )
    if not r.check(
        "systemctl is-active linnixd",
        active,
        f"state {prop('ActiveState')}/{prop('SubState')}; " + journal_tail()[-300:],
    ):
        return
    r.figure("start_to_ready_s", f"{ready_seconds():.1f}")
    r.figure("boot_to_ready_s", f"{int(prop('ActiveEnterTimestampMonotonic')) / 1e6:.1f}")

    pid = int(prop("MainPID"))
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
    capeff = int(re.search(r"^CapEff:\s+(\w+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    want = cap_mask(unit_caps())
    r.check(
        "daemon runs as linnix",
        pw is not None and all(int(u) == pw.pw_uid for u in uids),
        f"Uid: {uids}",
    )
    r.check(
        "CapEff equals the unit's capabilities",
        capeff == want and want != 0,
        f"CapEff {capeff:#x}, unit {unit_caps()} = {want:#x}",
    )

    sh("useradd", "--create-home", TESTER)
    # busctl monitor needs org.freedesktop.DBus.Monitoring.BecomeMonitor, which dbus-daemon grants
    # only to root (or the bus's own uid) by design; an unprivileged listener subscribes to the
    # signal instead, which is what `linnixctl watch` does.
    # both write to files in the results (kept for diagnosis), and both say when they listen
    mon_log, watch_log = RESULTS / "busctl-monitor.txt", RESULTS / "watch-alerts.jsonl"
    monitor = subprocess.Popen(
        ["busctl", "monitor", "--system", BUS],
        stdout=mon_log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    watcher = subprocess.Popen(
        ["runuser", "-u", TESTER, "--", "linnixctl", "watch", "--json"],
        stdout=watch_log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    listening = wait_for(
        lambda: (
            "Monitoring bus message stream" in mon_log.read_text()
            and "linnixctl: watching" in watch_log.read_text()
        ),
        120,
    )

    demo = subprocess.Popen(
        ["linnixctl", "demo", "fork-storm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        demo_out = demo.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        demo.kill()
        demo_out = demo.communicate()[0]
    r.check(
        "linnixctl demo fork-storm runs",
        demo.returncode == 0,
        f"rc={demo.returncode} {demo_out[-300:]}",
    )
    entries: list[dict[str, str]] = []

    def alerted() -> bool:
        entries[:] = fork_storm_entries()
        return bool(entries)

    wait_for(alerted, 30)
    # the demo's leader prints "demo fork-storm: pid N (comm) in cgroup ..." naming the culprit
    m = re.search(r"pid (\d+) \(([^)]+)\)", demo_out)
    pids = {str(demo.pid)} | ({m.group(1)} if m else set())
    demo_comm = m.group(2) if m else ""
    named = [
        e
        for e in entries
        if pids & {e.get("LINNIX_PID"), e.get("LINNIX_PARENT_PID"), e.get("LINNIX_ROOT_PID")}
        or (demo_comm and demo_comm in (e.get("LINNIX_COMM"), e.get("LINNIX_PARENT_COMM")))
    ]
    r.check(
        "journalctl -u linnixd LINNIX_RULE=fork_storm names the demo's process",
        bool(named),
        f"demo pid {demo.pid} comm {demo_comm!r}; {len(entries)} entries; first: "
        + (entries[0].get("MESSAGE", "") if entries else "none")
        # a starved demo says so (its rate and longest pause): the rule needs 2 s above 10/s
        + f"; demo: {demo_out.strip().splitlines()[-1] if demo_out.strip() else ''}",
    )

    def monitored() -> bool:
        text = mon_log.read_text()
        return "Member=Alert" in text and "fork_storm" in text

    seen = wait_for(monitored, 30)
    monitor.terminate()
    monitor.wait(timeout=10)
    r.check(
        "busctl monitor org.linnix.linnixd1 (root) captures the Alert signal",
        seen,
        f"listening {listening}; {mon_log.stat().st_size} bytes in {mon_log.name}",
    )

    def watched_alerts() -> list[dict[str, object]]:
        return [
            json.loads(line) for line in watch_log.read_text().splitlines() if line.startswith("{")
        ]

    got = wait_for(lambda: any(a.get("rule") == "fork_storm" for a in watched_alerts()), 30)
    watcher.terminate()
    watcher.wait(timeout=10)
    r.check(
        "unprivileged user receives the Alert signal (linnixctl watch)",
        got,
        f"{len(watched_alerts())} records; {watch_log.read_text()[-200:]}",
    )

    for member, args in (
        ("Status", ()),
        ("RecentAlerts", ("double:0", "string:", "uint32:10")),
        ("OpenIncidents", ()),
    ):
        cp = dbus_call(member, *args, user=TESTER)
        r.check(f"unprivileged {member} over the bus", cp.returncode == 0, out(cp)[:200])
    cp = sh("linnixctl", "status", user=TESTER)
    r.check("unprivileged linnixctl status", cp.returncode == 0, out(cp)[:200])
    cp = dbus_call("ReloadPolicy", user=TESTER)
    r.check(
        "unprivileged ReloadPolicy refused by polkit",
        cp.returncode != 0 and "NotAuthorized" in cp.stderr,
        out(cp)[:200],
    )
    cp = dbus_call("ReloadPolicy")
    r.check("root ReloadPolicy succeeds", cp.returncode == 0, out(cp)[:200])
    cp = sh("systemctl", "reload", UNIT)
    # RELOADING=1 puts the unit in "reloading" until READY=1 follows: give it time to come back
    r.check(
        "systemctl reload (SIGHUP, RELOADING=1) keeps it active",
        cp.returncode == 0 and wait_for(is_active, 30),
        f"{out(cp)} state {prop('ActiveState')}",
    )
    reload_collectors(r)

    before = history_rows()
    cp = sh("systemctl", "restart", UNIT, timeout=300)
    after = history_rows()
    r.figure("restart_to_ready_s", f"{ready_seconds():.1f}")
    r.check(
        "systemctl restart keeps the alert history",
        cp.returncode == 0 and is_active() and before > 0 and after >= before,
        f"fork_storm rows before {before}, after {after}; {out(cp)}",
    )

    old = int(prop("MainPID"))
    restarts = int(prop("NRestarts") or 0)
    os.kill(old, 9)
    back = wait_for(
        lambda: is_active() and int(prop("MainPID") or 0) not in (0, old), READY_TIMEOUT_S
    )
    r.check(
        "kill -9 of the daemon gets it restarted",
        back and int(prop("NRestarts")) == restarts + 1,
        f"old pid {old}, new pid {prop('MainPID')}, NRestarts {prop('NRestarts')}",
    )

    names(r)
    enforcement(r)
    operator_tools(r)
    lifecycle_events(r)
    fleet(r)
    leak_projection(r)
    memory_pressure(r)
    network(r)
    flood(r)


# ---- hardening: an unprivileged flood of the name on the real system bus ---------------------


def linnix_status() -> dict[str, object]:
    cp = sh("busctl", "--system", "call", BUS, PATH, IFACE, "Status", "--json=short", timeout=10)
    if cp.returncode != 0:
        return {}
    return dict(json.loads(json.loads(cp.stdout)["data"][0]))


def flood(r: Report) -> None:
    """tests/busflood.py as nobody: 100 x 100 KB Properties.Get, then 50 parallel RecentAlerts."""
    script = PAYLOAD / "busflood.py"
    restarts = int(prop("NRestarts") or 0)
    before = linnix_status()
    cp = sh(
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        str(script),
        "unix:path=/run/dbus/system_bus_socket",
        "100",
        str(100 * 1024),
        "50",
        timeout=600,
    )
    try:
        result = json.loads(cp.stdout)
    except ValueError:
        r.check("bus flood ran as nobody", False, out(cp)[-400:])
        return
    r.figure("flood_properties_s", str(result["properties"]["seconds"]))
    r.figure("flood_recent_alerts_s", str(result["recent_alerts"]["seconds"]))
    r.check(
        "100 Properties.Get with a 100 KB name: each answered UnknownProperty, the name not echoed",
        result["properties"]["replies"] == {"org.freedesktop.DBus.Error.UnknownProperty": 100}
        and result["properties"]["largest_reply"] < 200,
        json.dumps(result["properties"]),
    )
    history = result["recent_alerts"]["replies"]
    r.check(
        "50 parallel RecentAlerts as nobody: served or Error.Busy, none lost",
        set(history) <= {"ok", "org.linnix.linnixd1.Error.Busy"}
        and sum(history.values()) == 50
        and history.get("ok", 0) >= 1,
        json.dumps(result["recent_alerts"]),
    )
    started = time.monotonic()
    after = linnix_status()
    answered = time.monotonic() - started
    time.sleep(3)
    later = linnix_status()
    health = dict(after.get("health", {}))  # type: ignore[call-overload]
    bus, daemon = dict(health.get("bus", {})), dict(health.get("daemon", {}))
    gap = float(daemon.get("longest_tick_gap_seconds", -1))
    r.figure("flood_longest_tick_gap_s", f"{gap:.2f}")
    r.check(
        "after the flood: same process owns the name, Status within 2 s, ticks advance",
        bool(after)
        and answered < 2.0
        and int(prop("NRestarts") or 0) == restarts
        and int(str(before.get("ticks", 0)))
        < int(str(after.get("ticks", 0)))
        < int(str(later.get("ticks", 0))),
        f"answered in {answered:.2f} s, ticks {before.get('ticks')} -> {after.get('ticks')} -> "
        f"{later.get('ticks')}, restarts {restarts} -> {prop('NRestarts')}",
    )
    r.check(
        # software emulation runs Python ~10x slower than the host, where the gap stays under 3 s
        # (tests/test_flood.py) and the old loop stalled 34 s; 3.6 to 12.7 s seen here on a
        # loaded host: the bound keeps "tens of seconds" out, the figure keeps the rest
        "bus connection kept through the flood (health.bus), longest tick gap under 20 s (TCG)",
        bus.get("connected") == 1 and bus.get("disconnects") == 0 and 0 <= gap < 20.0,
        json.dumps(bus) + f" gap {gap}",
    )
    mid = sh(
        "busctl",
        "--system",
        "call",
        BUS,
        "/",
        "org.freedesktop.DBus.Peer",
        "GetMachineId",
        user="nobody",
    )
    expected = Path("/etc/machine-id").read_text().strip()
    r.check(
        "Peer.GetMachineId answered as nobody (the host's machine id)",
        mid.returncode == 0 and expected in mid.stdout,
        out(mid)[-300:],
    )


# ---- network rules: bpf/net.c on the VM's kernel, churn and retransmits by real traffic ---

# connect+close to its own listener at RATE/s for SECONDS (comm lx-vmchurn); prints "done port"
NET_CHURN = """
import ctypes, socket, sys, threading, time
ctypes.CDLL(None).prctl(15, b"lx-vmchurn", 0, 0, 0)
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4096)
def serve():
    while True:
        c, _ = srv.accept()
        c.close()
threading.Thread(target=serve, daemon=True).start()
port, done, start = srv.getsockname()[1], 0, time.monotonic()
while (elapsed := time.monotonic() - start) < seconds:
    # catch up to the rate, but never past the run's end (a slow VM falls behind for good)
    while done < int(elapsed * rate) and (elapsed := time.monotonic() - start) < seconds:
        socket.create_connection(("127.0.0.1", port)).close()
        done += 1
    time.sleep(0.001)
print(done, port, flush=True)
"""

# 16 flows to its own listener on port 7000, 1 KiB every 2 ms each, for SECONDS (lx-vmstream)
NET_STREAM = """
import ctypes, socket, sys, threading, time
ctypes.CDLL(None).prctl(15, b"lx-vmstream", 0, 0, 0)
srv = socket.socket()
srv.bind(("127.0.0.1", 7000))
srv.listen(64)
def drain(c):
    while c.recv(65536):
        pass
def serve():
    while True:
        threading.Thread(target=drain, args=(srv.accept()[0],), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
conns = [socket.create_connection(("127.0.0.1", 7000)) for _ in range(16)]
for c in conns:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.setblocking(False)
start = time.monotonic()
while time.monotonic() - start < float(sys.argv[1]):
    for c in conns:
        try:
            c.send(b"x" * 1024)
        except BlockingIOError:
            pass
    time.sleep(0.002)
"""
LOSS_RULES = """table inet lxloss {
 chain in {
  type filter hook input priority 0; policy accept;
  tcp dport 7000 tcp flags & syn == 0 numgen random mod 100 < 8 counter drop
 }
}
"""


SCHED_RULES = ("cpu_spike", "runaway_tree", "noisy_neighbour", "circuit_breaker")


def reload_collectors(r: Report) -> None:
    """A reload detaches bpf/sched.c when no enabled rule needs it and attaches it again, under
    the unit's own capabilities (collector/attach.py)."""
    policy = Path("/etc/linnixd/rules.yaml")
    good = policy.read_text()

    def status() -> dict[str, object]:
        return dict(json.loads(sh("linnixctl", "status", "--json").stdout or "{}"))

    try:
        off = good
        for rule in SCHED_RULES:
            off = re.sub(rf"(\n  {rule}:\n    enabled: )true", r"\1false", off)
        policy.write_text(off)
        cp = sh("linnixctl", "reload", timeout=120)
        st = status()
        r.check(
            "reload without the rules that need bpf/sched.c detaches it",
            cp.returncode == 0
            and st.get("scheduler_attribution") is False
            and "sched" not in dict(st.get("health") or {})
            and not set(SCHED_RULES) & set(list(st.get("enabled_rules") or [])),
            f"{out(cp)[:200]}; scheduler_attribution {st.get('scheduler_attribution')}",
        )
        policy.write_text(good)
        cp = sh("linnixctl", "reload", timeout=120)
        st = status()
        r.check(
            "reload enabling them again attaches bpf/sched.c (unit capabilities suffice)",
            cp.returncode == 0
            and st.get("scheduler_attribution") is True
            and "sched" in dict(st.get("health") or {})
            and is_active(),
            f"{out(cp)[:200]}; scheduler_attribution {st.get('scheduler_attribution')}; "
            + journal_tail()[-300:],
        )
    finally:
        policy.write_text(good)
        sh("linnixctl", "reload", timeout=120)


def net_status() -> dict[str, object]:
    return json.loads(sh("linnixctl", "status", "--json").stdout or "{}")


def network(r: Report) -> None:
    """bpf/net.c passes this kernel's verifier under the unit's capabilities and names culprits."""
    wait_for(is_active, READY_TIMEOUT_S)
    status = net_status()
    health = status.get("health", {})
    net = health.get("net", {}) if isinstance(health, dict) else {}
    if not r.check(
        "bpf/net.c attached by the unit (the kernel's verifier accepts it)",
        status.get("network_attribution") is True and "network_problem" not in status,
        f"network_attribution {status.get('network_attribution')}, "
        f"problem {status.get('network_problem')}",
    ):
        return
    before = int(net.get("connects", 0)) if isinstance(net, dict) else 0
    churn = subprocess.Popen(
        ["python3", "-c", NET_CHURN, "600", "15"], stdout=subprocess.PIPE, text=True
    )
    try:
        churn_out = churn.communicate(timeout=120)[0].split()
    except subprocess.TimeoutExpired:
        churn.kill()
        churn_out = churn.communicate()[0].split()
    done = int(churn_out[0]) if churn_out else 0
    r.figure("vm_churn_connections_per_s", f"{done / 15:.0f}")
    time.sleep(2)  # two ticks: the last closes are read
    after_status = net_status().get("health", {})
    after_net = after_status.get("net", {}) if isinstance(after_status, dict) else {}
    after = int(after_net.get("connects", 0)) if isinstance(after_net, dict) else 0
    r.check(
        "the kernel counted every connection the churn made",
        done > 0 and after - before >= done,
        f"churn made {done}, connects counter {before} -> {after}",
    )
    alerts = [
        e
        for e in journal_entries("LINNIX_RULE=connection_churn", "LINNIX_STATE=firing")
        if e.get("LINNIX_PID") == str(churn.pid)
    ]
    if done / 15 >= 300:  # the rule's 200/s in every tick: only a run that kept above it counts
        r.check(
            "connection_churn names the churning process",
            bool(alerts) and alerts[-1].get("LINNIX_COMM") == "lx-vmchurn",
            f"{len(alerts)} alerts for pid {churn.pid}; {alerts[-1:] if alerts else ''}",
        )

    ns = "lxvmloss"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        loss = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=LOSS_RULES,
            capture_output=True,
            text=True,
        )
        if not r.check(
            "nftables drops a share of one flow in a netns", loss.returncode == 0, loss.stderr
        ):
            return
        stream = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", NET_STREAM, "40"])
        try:
            entry = wait_entry(
                45, "LINNIX_RULE=tcp_retransmits", "LINNIX_STATE=firing", f"LINNIX_PID={stream.pid}"
            )
        finally:
            stream.kill()
            stream.wait()
        evidence = json.loads(entry.get("LINNIX_EVIDENCE", "{}") or "{}")
        r.check(
            "tcp_retransmits names the process and the remote endpoint",
            entry.get("LINNIX_COMM") == "lx-vmstream"
            and evidence.get("top_remote") == "127.0.0.1:7000"
            and float(evidence.get("retransmits_per_s", 0)) > 20,
            f"{entry.get('MESSAGE', entry)}",
        )
    finally:
        sh("ip", "netns", "del", ns)


# ---- memory_leak's projection against a real memory.max ----------------------------------

LEAK_UNIT = "linnix-leak.service"
LEAK_RATE_MB_S = 8.0
LEAK_MAX_MB = 400


def oom_kills(unit: str) -> int:
    m = re.search(r"^oom_kill (\d+)$", unit_file_text(unit, "memory.events"), re.M)
    return int(m.group(1)) if m else 0


def leak_projection(r: Report) -> None:
    """A process leaking 8 MB/s under MemoryMax=400M: the alert comes before the OOM kill and its
    eta_s against memory.max is headroom / rate, within 3x of the time the kernel really took."""
    ok = start_unit(
        LEAK_UNIT.removesuffix(".service"),
        [
            "-p",
            f"MemoryMax={LEAK_MAX_MB}M",
            "-p",
            "MemorySwapMax=0",
            "linnixctl",
            "demo",
            "memory-leak",
            "--rate",
            f"{LEAK_RATE_MB_S:g}",
            "--duration",
            "300",
        ],
    )
    if not r.check("leak demo starts under MemoryMax=400M", ok, LEAK_UNIT):
        return
    entry = wait_entry(90, "LINNIX_RULE=memory_leak", f"LINNIX_UNIT={LEAK_UNIT}")
    oomed = wait_for(lambda: oom_kills(LEAK_UNIT) > 0, 120, step=0.2)
    t_oom = time.time()
    sh("systemctl", "stop", LEAK_UNIT)
    ev = json.loads(entry.get("LINNIX_EVIDENCE", "{}")) if entry else {}
    t_alert = int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6 if entry else 0.0
    real = t_oom - t_alert
    eta = ev.get("eta_s")
    r.figure("leak_eta_s_vs_real_s", f"{eta} vs {real:.1f}")
    r.check(
        "memory_leak projects against the unit's memory.max",
        ev.get("limit_kind") == "memory.max" and ev.get("limit_mb") == float(LEAK_MAX_MB),
        f"entry {bool(entry)}, evidence {ev}",
    )
    r.check(
        "memory_leak warns before the OOM kill, eta_s = headroom / rate, within 3x of the real time",
        # the projection is only as linear as the leak: under emulation on a loaded host the demo
        # grows unevenly (211 MB/min fitted against 480 nominal was seen), so the figure is kept
        # and the check is the arithmetic plus the order of magnitude
        bool(entry)
        and oomed
        and real > 0
        and isinstance(eta, (int, float))
        and abs(eta - 60.0 * ev.get("headroom_mb", 0) / max(ev.get("slope_mb_per_min", 0), 1e-9))
        <= 0.05 * eta + 1.0
        and real / 3 <= eta <= real * 3,
        f"eta_s {eta}, real {real:.1f} s (alert at {t_alert:.1f}, oom_kill seen at {t_oom:.1f}), "
        f"rate {ev.get('slope_mb_per_min')} MB/min, headroom {ev.get('headroom_mb')} MB",
    )


def memory_pressure(r: Report) -> None:
    """`linnixctl demo memory-pressure` in a cgroup with the memory controller: psi_saturation
    names that cgroup for memory pressure."""
    cg = Path("/sys/fs/cgroup/linnix-mempressure")
    controllers = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if "memory" not in controllers.read_text().split():
        controllers.write_text("+memory\n")
    cg.mkdir(exist_ok=True)
    demo = sh(
        "linnixctl", "demo", "memory-pressure", "--cgroup", str(cg), "--duration", "20", timeout=90
    )
    entry = wait_entry(
        30, "LINNIX_RULE=psi_saturation", f"LINNIX_CGROUP=/{cg.name}", "LINNIX_STATE=firing"
    )
    ev = json.loads(entry.get("LINNIX_EVIDENCE", "{}")) if entry else {}
    r.figure("memory_pressure_some_pct", str(ev.get("some_pct")))
    r.check(
        "demo memory-pressure: psi_saturation names its cgroup for memory pressure",
        ev.get("resource") == "memory" and float(ev.get("some_pct", 0)) > 40,
        f"demo rc {demo.returncode} {out(demo)[-200:]}; evidence {ev}",
    )
    r.check(
        "demo memory-pressure puts memory.high back",
        (cg / "memory.high").read_text().strip() == "max",
        (cg / "memory.high").read_text().strip(),
    )
    for _ in range(50):
        try:
            cg.rmdir()
            break
        except OSError:
            time.sleep(0.1)


# ---- operator experience: live top, polkit prompts, completion, versions, man pages --------

ADMIN = "linnixadmin"  # a member of sudo: Debian's polkit admin identity (50-default.rules)
ADMIN_PASSWORD = "Linnix-vm-admin-7"
TMUX = ["tmux", "-S", "/run/linnix-vmtest-tmux.sock"]


def rc_shown(tag: str) -> Callable[[str], bool]:
    """The pane shows `TAG=<number>`: the command ended (the typed line holds only `TAG=$?`)."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(tag)}=\d+")
    return lambda screen: pattern.search(screen) is not None


def tmux_screen(target: str) -> str:
    return sh(*TMUX, "capture-pane", "-p", "-t", target).stdout


def tmux_wait(target: str, pred: Callable[[str], bool], timeout: float = 180.0) -> str:
    # generous: python start-up and a bus round trip take seconds under emulation on a loaded host
    found = [""]

    def seen() -> bool:
        found[0] = tmux_screen(target)
        return pred(found[0])

    wait_for(seen, timeout, step=0.5)
    return found[0]


def operator_tools(r: Report) -> None:
    version = sh("dpkg-query", "-W", "-f", "${Version}", "linnixd").stdout.strip()
    for tool in ("linnixctl", "linnixd"):
        cp = sh(tool, "--version")
        r.check(
            f"{tool} --version names the package version",
            cp.returncode == 0 and cp.stdout.strip() == f"{tool} {version}",
            out(cp),
        )
    for page in ("linnixctl", "linnixd", "linnixd-policy"):
        cp = sh("man", "-w", page)
        r.check(f"man page {page} installed", cp.returncode == 0, out(cp))

    bash_script = "/usr/share/bash-completion/completions/linnixctl"
    cp = sh(
        "bash",
        "--norc",
        "--noprofile",
        "-c",
        f'source {bash_script}; COMP_WORDS=(linnixctl top --sort ""); COMP_CWORD=3; '
        '_shtab_linnixctl; printf "%s\\n" "${COMPREPLY[@]}"; '
        'COMP_WORDS=(linnixctl ""); COMP_CWORD=1; _shtab_linnixctl; printf "%s\\n" "${COMPREPLY[@]}"',
    )
    offered = set(cp.stdout.split())
    r.check(
        "bash completion (as installed) offers subcommands and --sort choices",
        {"status", "top", "reload", "throttle", "enable-enforcement", "pressure", "memory"}
        <= offered,
        out(cp)[:300],
    )
    zsh_script = Path("/usr/share/zsh/vendor-completions/_linnixctl")
    r.check(
        "zsh completion installed",
        zsh_script.exists() and zsh_script.read_text().startswith("#compdef linnixctl"),
        str(zsh_script),
    )

    sh(*TMUX, "kill-server")
    # live top, as an unprivileged user, on an 80-column terminal, against the real daemon
    sh(
        *TMUX,
        "new-session",
        "-d",
        "-x",
        "80",
        "-y",
        "24",
        "-s",
        "top",
        f"runuser -u {TESTER} -- env TERM=xterm linnixctl top --sort memory; echo top-exit=$? > /run/linnix-top-exit; sleep 600",
    )
    screen = tmux_wait("top", lambda s: "CGROUP (UNIT)" in s and "linnixd.service" in s)
    lines = screen.splitlines()
    r.check(
        "linnixctl top is live in a terminal: 80 columns, the daemon's own cgroup listed",
        bool(lines)
        and lines[0].startswith("linnixd top ")
        and all(len(line) <= 80 for line in lines)
        and "CPU_PSI%" in screen,
        screen[:400],
    )
    first_clock = lines[0].split()[2] if lines and len(lines[0].split()) > 2 else ""
    sh(*TMUX, "send-keys", "-t", "top", "p")
    screen = tmux_wait(
        "top",
        lambda s: "sort: pressure" in s and s.split("\n", 1)[0].split()[2:3] != [first_clock],
    )
    r.check(
        "linnixctl top refreshes and sorts by pressure on p",
        "sort: pressure" in screen and "IO_PSI%" in screen,
        screen[:400],
    )
    sh(*TMUX, "send-keys", "-t", "top", "q")
    wait_for(lambda: Path("/run/linnix-top-exit").exists(), 20)
    r.check(
        "q quits linnixctl top with status 0",
        Path("/run/linnix-top-exit").exists()
        and Path("/run/linnix-top-exit").read_text().strip() == "top-exit=0",
        tmux_screen("top")[-300:],
    )

    # polkit text agent: a sudo member with a password is prompted through pkttyagent
    sh("useradd", "--create-home", "--groups", "sudo", ADMIN)
    subprocess.run(["chpasswd"], input=f"{ADMIN}:{ADMIN_PASSWORD}\n", text=True, check=False)
    # su opens a PAM session (pam_systemd): a logind session the agent registers for
    sh(*TMUX, "new-session", "-d", "-x", "150", "-y", "40", "-s", "admin", f"su - {ADMIN}")
    tmux_wait("admin", lambda s: "$" in s, 30)
    sh(
        *TMUX,
        "send-keys",
        "-t",
        "admin",
        "linnixctl --no-ask-password reload; echo no-ask-rc=$?",
        "Enter",
    )
    screen = tmux_wait("admin", rc_shown("no-ask-rc"))
    r.check(
        "--no-ask-password: no prompt, permission denied (77)",
        "no-ask-rc=77" in screen and "Password:" not in screen,
        screen[-400:],
    )
    sh(
        *TMUX,
        "send-keys",
        "-t",
        "admin",
        "clear; linnixctl reload; echo ask-rc=$?",
        "Enter",
    )
    screen = tmux_wait("admin", lambda s: "Password:" in s or rc_shown("ask-rc")(s))
    prompted = "Password:" in screen and "org.linnix.linnixd1.reload-policy" in screen
    if "Password:" in screen:
        sh(*TMUX, "send-keys", "-t", "admin", ADMIN_PASSWORD, "Enter")
    screen = tmux_wait("admin", rc_shown("ask-rc"))
    r.check(
        "a sudo member on a terminal is prompted by pkttyagent and the reload succeeds",
        prompted and "ask-rc=0" in screen and "reloaded" in screen,
        screen[-600:],
    )
    agents = sh("pgrep", "-u", ADMIN, "-x", "pkttyagent").stdout.split()
    r.check("the agent is gone after the command", not agents, f"pkttyagent pids {agents}")

    sh(*TMUX, "new-session", "-d", "-x", "150", "-y", "20", "-s", "root", "bash --norc --noprofile")
    sh(
        *TMUX,
        "send-keys",
        "-t",
        "root",
        "linnixctl reload; echo root-rc=$?",
        "Enter",
    )
    screen = tmux_wait("root", rc_shown("root-rc"))
    r.check(
        "root on a terminal is not prompted",
        "root-rc=0" in screen and "Password:" not in screen and "AUTHENTICATING" not in screen,
        screen[-300:],
    )
    sh(*TMUX, "kill-server")


# ---- operator experience: journal events, no restart loop on a bad policy ------------------

STARTED_ID = "415b0639fff34864813a0862512e654a"
RELOADED_ID = "415287513b5f4d0dabd80cad617de8a7"


# ---- beyond one host: node_exporter textfile metrics, linnixd-forward to Alertmanager -----------

TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")
FORWARD_UNIT = "linnixd-forward.service"
AM_PORT = 19093  # our own Alertmanager; the packaged one (9093) wants a network for its cluster


def http_text(url: str, timeout: float = 10.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode())
    except OSError as exc:
        return f"ERROR {exc}"


def prom_value(text: str, series: str) -> float | None:
    """The value of one exposition line starting with `series ` (exact name and labels)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def fleet(r: Report) -> None:
    """node_exporter serves linnixd_* from the packaged daemon's textfile; the forwarder delivers."""
    acl = sh("getfacl", "-p", str(TEXTFILE_DIR))
    owner = pwd.getpwuid(TEXTFILE_DIR.stat().st_uid).pw_name if TEXTFILE_DIR.exists() else "?"
    r.check(
        "postinst lets linnix write node_exporter's textfile dir (ACL), owner unchanged",
        "user:linnix:rwx" in acl.stdout
        and "user:linnixd-forward:rwx" in acl.stdout
        and owner != "linnix",
        f"owner {owner}; {out(acl)[:300]}",
    )
    r.check(
        "linnixd keeps PrivateNetwork=yes with the textfile dir writable",
        prop("PrivateNetwork") == "yes"
        and "/var/lib/prometheus/node-exporter" in prop("ReadWritePaths"),
        f"PrivateNetwork={prop('PrivateNetwork')} ReadWritePaths={prop('ReadWritePaths')}",
    )
    prom = TEXTFILE_DIR / "linnixd.prom"
    written = wait_for(prom.exists, 40)
    st = prom.stat() if written else None
    r.check(
        "the daemon writes linnixd.prom (mode 0644, owner linnix)",
        st is not None
        and (st.st_mode & 0o777) == 0o644
        and pwd.getpwuid(st.st_uid).pw_name == "linnix",
        f"exists {written}; mode {oct(st.st_mode & 0o777) if st else '-'}; "
        + journal_tail()[-300:],
    )
    if sh("systemctl", "is-active", "prometheus-node-exporter").stdout.strip() != "active":
        sh("systemctl", "start", "prometheus-node-exporter")
    # the counters started again with the last restart: a demo now gives them an alert to count
    demo = sh("linnixctl", "demo", "short-jobs", timeout=120)
    body = ""
    series = 'linnixd_alerts_total{rule="short_lived_jobs",severity="warning"}'

    def scraped() -> bool:
        nonlocal body
        body = http_text("http://127.0.0.1:9100/metrics")
        return (prom_value(body, series) or 0) >= 1

    wait_for(scraped, 60, step=2.0)
    jobs = prom_value(body, series)
    events = prom_value(body, "linnixd_events_total")
    errors = prom_value(body, "node_textfile_scrape_error")
    r.check(
        "node_exporter on localhost:9100 serves linnixd_* after a demo",
        jobs is not None
        and jobs >= 1
        and (events or 0) > 0
        and errors == 0
        and "linnixd_build_info{" in body,
        f"demo rc {demo.returncode}; short_lived_jobs alerts {jobs}, events {events}, "
        f"textfile scrape error {errors}; "
        + " ".join(line for line in body.splitlines() if line.startswith("linnixd_alerts"))[:300],
    )
    if events is not None:
        r.figure(
            "textfile_series", str(sum(1 for x in body.splitlines() if x.startswith("linnixd_")))
        )

    # linnixd-forward: shipped disabled, delivers to a real Alertmanager once configured
    enabled = sh("systemctl", "is-enabled", FORWARD_UNIT).stdout.strip()
    r.check("linnixd-forward.service is shipped disabled", enabled == "disabled", enabled)
    forward_file = next(
        (
            f"{d}/{FORWARD_UNIT}"
            for d in ("/lib/systemd/system", "/usr/lib/systemd/system")
            if os.path.exists(f"{d}/{FORWARD_UNIT}")
        ),
        FORWARD_UNIT,
    )
    cp = sh("systemd-analyze", "verify", forward_file)
    r.check(
        "systemd-analyze verify linnixd-forward.service",
        cp.returncode == 0 and not cp.stderr.strip(),
        out(cp),
    )
    cp = sh("systemd-analyze", "security", "--no-pager", FORWARD_UNIT)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", cp.stdout)
    r.figure("forward_exposure", m.group(1) if m else "unknown")
    data = Path("/run/linnix-vmtest-am")
    data.mkdir(exist_ok=True)
    am_config = data / "alertmanager.yml"
    am_config.write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n")
    am = subprocess.Popen(
        [
            "prometheus-alertmanager",
            f"--config.file={am_config}",
            f"--storage.path={data}",
            f"--web.listen-address=127.0.0.1:{AM_PORT}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    am_url = f"http://127.0.0.1:{AM_PORT}"
    try:
        up = wait_for(lambda: not http_text(am_url + "/-/ready").startswith("ERROR"), 60)
        if not r.check("a local prometheus-alertmanager answers", up, am_url):
            return
        Path("/etc/linnixd/forward.yaml").write_text(
            f"targets:\n  - {{name: am, type: alertmanager, url: {am_url}}}\n"
        )
        os.chmod("/etc/linnixd/forward.yaml", 0o644)
        cp = sh("systemctl", "start", FORWARD_UNIT)
        user = sh("systemctl", "show", FORWARD_UNIT, "-p", "User", "--value").stdout.strip()
        caps = sh(
            "systemctl", "show", FORWARD_UNIT, "-p", "CapabilityBoundingSet", "--value"
        ).stdout.strip()
        r.check(
            "linnixd-forward starts as its own user without capabilities",
            cp.returncode == 0
            and sh("systemctl", "is-active", FORWARD_UNIT).stdout.strip() == "active"
            and user == "linnixd-forward"
            and caps == "",
            f"rc {cp.returncode} user {user!r} caps {caps!r}; "
            + out(sh("journalctl", "-u", FORWARD_UNIT, "--no-pager", "-n", "5"))[-300:],
        )
        demo = sh("linnixctl", "demo", "short-jobs", timeout=120)
        listed: list[dict[str, object]] = []

        def in_alertmanager() -> bool:
            text = http_text(am_url + "/api/v2/alerts")
            listed[:] = json.loads(text) if text.startswith("[") else []
            return any(
                isinstance(a.get("labels"), dict)
                and a["labels"].get("alertname") == "short_lived_jobs"  # type: ignore[index]
                for a in listed
            )

        got = wait_for(in_alertmanager, 60)
        labels = next(
            (a["labels"] for a in listed if a["labels"].get("alertname") == "short_lived_jobs"),  # type: ignore[index,union-attr]
            {},
        )
        r.check(
            "linnixd-forward delivers the alert to Alertmanager (API v2)",
            got and labels.get("source") == "linnixd" and bool(labels.get("host")),  # type: ignore[union-attr]
            f"demo rc {demo.returncode}; labels {labels}; "
            + out(sh("journalctl", "-u", FORWARD_UNIT, "--no-pager", "-n", "5"))[-300:],
        )
        resolved = wait_for(lambda: not in_alertmanager(), 90, step=2.0)
        counters_path = Path("/var/lib/linnixd-forward/counters.json")
        counters = json.loads(counters_path.read_text()) if counters_path.exists() else {}
        am_counts = counters.get("targets", {}).get("am", {})
        r.check(
            "the resolve reaches Alertmanager (the alert leaves its active list)",
            resolved and am_counts.get("delivered", 0) >= 2 and am_counts.get("queued", 1) == 0,
            f"counters {am_counts}",
        )
        delivered: float | None = None

        def forward_exported() -> bool:
            nonlocal delivered
            text = http_text("http://127.0.0.1:9100/metrics")
            delivered = prom_value(text, 'linnixd_forward_delivered_total{target="am"}')
            return delivered is not None and delivered >= 2

        exported = wait_for(forward_exported, 40, step=2.0)
        listing = sh("ls", "-la", str(TEXTFILE_DIR)).stdout
        scrape = [
            line
            for line in http_text("http://127.0.0.1:9100/metrics").splitlines()
            if "textfile" in line and not line.startswith("#")
        ]
        forward_log = sh("journalctl", "-u", FORWARD_UNIT, "-n", "8", "--no-pager").stdout
        r.check(
            "node_exporter serves linnixd-forward's counters (linnixd_forward.prom)",
            exported,
            f"linnixd_forward_delivered_total{{target=am}} = {delivered}; dir {listing}; "
            f"scrape {scrape}; journal {forward_log}",
        )
    finally:
        sh("systemctl", "stop", FORWARD_UNIT)
        Path("/etc/linnixd/forward.yaml").unlink(missing_ok=True)  # the operator's file, not dpkg's
        am.terminate()
        am.wait(timeout=30)


def lifecycle_events(r: Report) -> None:
    started = journal_entries(f"MESSAGE_ID={STARTED_ID}")
    r.check(
        "daemon_started entries in the journal (boot, restart, kill -9 restart)",
        len(started) >= 3
        and all(e.get("LINNIX_POLICY") == "/etc/linnixd/rules.yaml" for e in started)
        and all(e.get("PRIORITY") == "5" for e in started),
        f"{len(started)} entries; last {started[-1] if started else {}}",
    )
    reloaded = journal_entries(f"MESSAGE_ID={RELOADED_ID}")
    r.check(
        "policy_reloaded entries in the journal (bus and SIGHUP reloads)",
        len(reloaded) >= 2 and "fork_storm" in reloaded[-1].get("LINNIX_RULES", "").split(),
        f"{len(reloaded)} entries; last {reloaded[-1] if reloaded else {}}",
    )
    explained = sh("journalctl", "-x", "-u", UNIT, f"MESSAGE_ID={STARTED_ID}", "--no-pager")
    r.check(
        "journalctl -x explains daemon_started from the catalog",
        "linnixd started monitoring" in explained.stdout,
        explained.stdout[-300:],
    )

    policy = Path("/etc/linnixd/rules.yaml")
    good = policy.read_text()
    try:
        policy.write_text(good + "\nnot_a_section: true\n")
        sh("systemctl", "restart", UNIT, timeout=300)
        failed = wait_for(lambda: prop("ActiveState") == "failed", 60)
        time.sleep(8)  # RestartSec=2s: a loop would have restarted at least twice by now
        r.check(
            "a bad policy at start fails the unit once, exit 78, no restart loop",
            failed
            and prop("ActiveState") == "failed"
            and prop("ExecMainStatus") == "78"
            # a manual restart resets systemd's counter; any automatic restart would count here
            and int(prop("NRestarts") or 0) == 0,
            f"state {prop('ActiveState')}, status {prop('ExecMainStatus')}, "
            f"NRestarts {prop('NRestarts')}",
        )
        text = prop("StatusText")
        tail = journal_tail()
        r.check(
            "the unit's status line and the journal say what is wrong in one line",
            text.startswith("invalid policy, not starting: /etc/linnixd/rules.yaml")
            and "not_a_section" in text
            and "not_a_section" in tail,
            f"StatusText {text!r}; journal {tail[-300:]!r}",
        )
        errors = [
            e
            for e in journal_entries("-p", "err")
            if "invalid policy, not starting" in str(e.get("MESSAGE", ""))
        ]
        r.check(
            "daemon log lines carry their syslog priority (journalctl -p err shows the refusal)",
            bool(errors)
            and all(e.get("PRIORITY") == "3" for e in errors)
            and all(str(e.get("MESSAGE", "")).startswith("linnixd: ") for e in errors),
            str([(e.get("PRIORITY"), str(e.get("MESSAGE", ""))[:80]) for e in errors][:3]),
        )
    finally:
        policy.write_text(good)
        sh("systemctl", "reset-failed", UNIT)
        sh("systemctl", "start", UNIT, timeout=300)
    r.check(
        "fixed policy, systemctl start: active again",
        wait_for(is_active, READY_TIMEOUT_S),
        f"state {prop('ActiveState')}/{prop('SubState')}",
    )


# ---- names: Kubernetes pods (both kubelet cgroup drivers) and a Podman container ------------

POD_UID = "3f6d1b2a-8c4e-4b1f-9a7d-2e5c6b7a8d90"
CRIO_UID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
K8S_CID = "4f2c" + "a" * 60
CRIO_CID = "9c0b" + "c" * 60
CONTAINERD_BUNDLE = Path("/run/containerd/io.containerd.runtime.v2.task/k8s.io") / K8S_CID
CRIO_BUNDLE = Path("/run/containers/storage/overlay-containers") / CRIO_CID
CGROUPFS_POD = Path("/sys/fs/cgroup/kubepods/besteffort") / f"pod{CRIO_UID}"
PODMAN_NAME = "linnix-web"
PODMAN_IMAGE = "localhost/linnix-busybox:1"
PODMAN_STATE = Path("/var/lib/containers/storage/overlay-containers/containers.json")


def root_only_json(path: Path, doc: dict[str, object]) -> None:
    """A runtime file as the runtimes leave it: root-owned, 0600, in 0700 directories."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


def oci_config(annotations: dict[str, str]) -> dict[str, object]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["/app"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "annotations": annotations,
    }


def cpu_spike_entry(pid: int) -> dict[str, str]:
    return wait_entry(120, "LINNIX_RULE=cpu_spike", "LINNIX_STATE=firing", f"LINNIX_PID={pid}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def names_diagnosis() -> str:
    """The newest cpu_spike alerts' cgroups and names, and the daemon's name-lookup counters."""
    spikes = journal_entries("LINNIX_RULE=cpu_spike", "LINNIX_STATE=firing")[-3:]
    seen = [(e.get("LINNIX_CGROUP"), e.get("LINNIX_CONTAINER"), e.get("MESSAGE")) for e in spikes]
    status = json.loads(sh("linnixctl", "status", "--json").stdout or "{}")
    return f"last cpu_spike alerts {seen}; names {status.get('health', {}).get('names')}"


def names(r: Report) -> None:
    """Pods of both kubelet drivers and a Podman container named in real alerts and queries."""
    root_only_json(
        CONTAINERD_BUNDLE / "config.json",
        oci_config(
            {
                "io.kubernetes.cri.container-name": "api",
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.image-name": "registry.example/payments/api:1.4.2",
                "io.kubernetes.cri.sandbox-name": "api-7d9f8c6b5-x2x9z",
                "io.kubernetes.cri.sandbox-namespace": "payments",
                "io.kubernetes.cri.sandbox-uid": POD_UID,
            }
        ),
    )
    root_only_json(
        CRIO_BUNDLE / "userdata" / "config.json",
        oci_config(
            {
                "io.kubernetes.container.name": "checkout",
                "io.kubernetes.cri-o.ImageName": "registry.example/shop/checkout:2.0",
                "io.kubernetes.pod.name": "checkout-6c8d",
                "io.kubernetes.pod.namespace": "shop",
                "io.kubernetes.pod.uid": CRIO_UID,
            }
        ),
    )
    # kubelet's systemd driver: the pod slice and the container scope made by systemd itself
    pod_slice = f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice"
    scope = f"cri-containerd-{K8S_CID}.scope"
    hog = subprocess.Popen(
        ["systemd-run", "--scope", "--quiet", f"--unit={scope}", f"--slice={pod_slice}", *HOG],
        text=True,
    )
    try:
        entry = cpu_spike_entry(hog.pid)
        want_cgroup = f"/kubepods.slice/kubepods-burstable.slice/{pod_slice}/{scope}"
        r.check(
            "systemd driver: the cpu_spike alert names pod, namespace, container, image (journald)",
            entry.get("LINNIX_CGROUP") == want_cgroup
            and entry.get("LINNIX_POD") == "api-7d9f8c6b5-x2x9z"
            and entry.get("LINNIX_NAMESPACE") == "payments"
            and entry.get("LINNIX_CONTAINER") == "api"
            and entry.get("LINNIX_CONTAINER_ID") == K8S_CID
            and entry.get("LINNIX_IMAGE") == "registry.example/payments/api:1.4.2"
            and "in pod payments/api-7d9f8c6b5-x2x9z (container api) at"
            in entry.get("MESSAGE", ""),
            f"{ {k: v for k, v in entry.items() if k.startswith(('LINNIX_', 'MESSAGE'))} }"
            if entry
            else names_diagnosis(),
        )
        cp = sh("linnixctl", "top", "--once", "--json", "--namespace", "payments", user=TESTER)
        rows = json.loads(cp.stdout)["cgroups"] if cp.returncode == 0 else []
        r.check(
            "linnixctl top --namespace payments (filtered by the daemon) lists the pod's container",
            [row.get("path") for row in rows] == [want_cgroup]
            and rows[0].get("pod") == "api-7d9f8c6b5-x2x9z",
            out(cp)[:400],
        )
    finally:
        stop(hog)
    # kubelet's cgroupfs driver: kubepods/<qos>/pod<uid>/crio-<id> made by hand, as kubelet does
    container_cg = CGROUPFS_POD / f"crio-{CRIO_CID}"
    container_cg.mkdir(parents=True, exist_ok=True)
    hog = subprocess.Popen(
        ["/bin/sh", "-c", f'echo $$ > {container_cg}/cgroup.procs && exec "$@"', "sh", *HOG],
        text=True,
    )
    try:
        entry = cpu_spike_entry(hog.pid)
        r.check(
            "cgroupfs driver: the cpu_spike alert names the CRI-O pod and container",
            entry.get("LINNIX_CGROUP") == f"/kubepods/besteffort/pod{CRIO_UID}/crio-{CRIO_CID}"
            and entry.get("LINNIX_POD") == "checkout-6c8d"
            and entry.get("LINNIX_NAMESPACE") == "shop"
            and entry.get("LINNIX_CONTAINER") == "checkout"
            and "in pod shop/checkout-6c8d (container checkout) at" in entry.get("MESSAGE", ""),
            f"{ {k: v for k, v in entry.items() if k.startswith(('LINNIX_', 'MESSAGE'))} }"
            if entry
            else names_diagnosis(),
        )
    finally:
        stop(hog)
        wait_for(lambda: not (container_cg / "cgroup.procs").read_text().strip(), 10)
        for d in (container_cg, CGROUPFS_POD, CGROUPFS_POD.parent, CGROUPFS_POD.parent.parent):
            try:
                d.rmdir()
            except OSError:
                pass
    cp = sh("linnixctl", "alerts", "--namespace", "shop", "--json", user=TESTER)
    rows = json.loads(cp.stdout) if cp.stdout.startswith("[") else []  # one JSON array
    r.check(
        "linnixctl alerts --namespace shop: the CRI-O pod's alerts only",
        cp.returncode == 0
        and any(a["rule"] == "cpu_spike" and a["pod"] == "checkout-6c8d" for a in rows)
        and all(
            "shop"
            in (
                a["namespace"],
                a["evidence"].get("victim_namespace"),
                a["evidence"].get("contender_namespace"),
            )
            for a in rows
        ),
        out(cp)[:400],
    )
    status = json.loads(sh("linnixctl", "status", "--json").stdout or "{}")
    counts = status.get("health", {}).get("names", {})
    r.check(
        "Status counts the lookups: named, none failed",
        counts.get("named", 0) >= 2
        and counts.get("unreadable") == 0
        and counts.get("malformed") == 0,
        str(counts),
    )
    # the stand-ins go before Podman sets up its own state next to them
    for bundle in (CONTAINERD_BUNDLE, CRIO_BUNDLE):
        sh("rm", "-rf", str(bundle))
    podman_names(r)


def podman_names(r: Report) -> None:
    """A real Podman container, from an image built offline, named by the alert on its CPU hog."""
    work = Path("/var/tmp/linnix-busybox")
    (work / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    busybox = work / "rootfs" / "bin" / "busybox"
    busybox.write_bytes(Path("/bin/busybox").read_bytes())
    busybox.chmod(0o755)
    tarball = work / "rootfs.tar"
    sh("tar", "-C", str(work / "rootfs"), "-cf", str(tarball), ".")
    cp = sh("podman", "import", str(tarball), PODMAN_IMAGE, timeout=300)
    if not r.check(
        "podman import of a busybox rootfs (offline)", cp.returncode == 0, out(cp)[-300:]
    ):
        return
    try:
        cp = sh(
            "podman", "run", "-d", "--name", PODMAN_NAME, "--network", "none",
            PODMAN_IMAGE, "/bin/busybox", "sh", "-c", "while :; do :; done",
            timeout=300,
        )  # fmt: skip
        cid = cp.stdout.strip().splitlines()[-1] if cp.returncode == 0 and cp.stdout.strip() else ""
        if not r.check(f"podman run --name {PODMAN_NAME}", bool(cid), out(cp)[-300:]):
            return
        try:
            mode = oct(PODMAN_STATE.stat().st_mode & 0o777)
        except OSError as exc:
            mode = f"unreadable: {exc}"
        r.figure("containers/storage containers.json mode", mode)
        entry = wait_entry(
            120, "LINNIX_RULE=cpu_spike", "LINNIX_STATE=firing", f"LINNIX_CONTAINER={PODMAN_NAME}"
        )
        r.check(
            "the cpu_spike alert names the Podman container, its id and image (journald)",
            entry.get("LINNIX_CONTAINER_ID") == cid
            and entry.get("LINNIX_IMAGE") == PODMAN_IMAGE
            and f"in container {PODMAN_NAME} at" in entry.get("MESSAGE", ""),
            f"cid {cid}; { {k: v for k, v in entry.items() if k.startswith(('LINNIX_', 'MESSAGE'))} }"
            if entry
            else f"cid {cid}; no such alert; {names_diagnosis()}",
        )
    finally:
        sh("podman", "rm", "-f", "-t", "0", PODMAN_NAME, timeout=120)
        sh("podman", "rmi", "-f", PODMAN_IMAGE, timeout=120)


# ---- enforcement ---------------------------------------------------------------------------

THROTTLE_PCT = 20
THROTTLE_S = 40
HOG = ["/usr/bin/python3", "-c", "while True: pass"]


def unit_file_text(unit: str, name: str) -> str:
    """A cgroup file of the unit, or "absent": systemd may drop a controller (and its files) at any moment."""
    try:
        return Path(f"/sys/fs/cgroup/system.slice/{unit}/{name}").read_text().strip()
    except OSError:
        return "absent"


def cpu_pct(unit: str, seconds: float = 3.0) -> float:
    """The unit's CPU use in percent of one CPU over `seconds`, from its cgroup's cpu.stat."""

    def usage() -> int:
        text = unit_file_text(unit, "cpu.stat")
        m = re.search(r"^usage_usec (\d+)$", text, re.M)
        return int(m.group(1)) if m else 0

    u0, t0 = usage(), time.monotonic()
    time.sleep(seconds)
    return (usage() - u0) / 1e6 / (time.monotonic() - t0) * 100


def unlimited(unit: str) -> bool:
    """No CPU quota: systemd may also drop the cpu controller (then there is no cpu.max) once none is set."""
    return wait_for(
        lambda: (
            unit_file_text(unit, "cpu.max") in ("absent", "max 100000")
            and unit_prop(unit, "CPUQuotaPerSecUSec") == "infinity"
        ),
        10.0,
    )


def unit_prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-P", name, unit).stdout.strip()


def start_unit(unit: str, argv: list[str]) -> bool:
    return sh("systemd-run", f"--unit={unit}", "--quiet", "--collect", *argv).returncode == 0


def journal_entries(*matches: str) -> list[dict[str, str]]:
    cp = sh("journalctl", "-u", UNIT, *matches, "-o", "json", "--no-pager")
    return [json.loads(line) for line in cp.stdout.splitlines() if line.strip()]


def wait_entry(timeout: float, *matches: str) -> dict[str, str]:
    found: list[dict[str, str]] = []

    def seen() -> bool:
        found[:] = journal_entries(*matches)
        return bool(found)

    wait_for(seen, timeout, step=1.0)
    return found[0] if found else {}


def explain(incident: str, until: Callable[[dict[str, object]], bool] = lambda e: True) -> dict:
    """`linnixctl explain INCIDENT --json` as the unprivileged tester; waits (10 s) until `until` holds."""
    got: dict = {}

    def ready() -> bool:
        cp = sh("linnixctl", "explain", incident, "--json", user=TESTER)
        got.clear()
        if cp.returncode == 0 and cp.stdout.startswith("{"):
            got.update(json.loads(cp.stdout))
            return until(got)
        got["error"] = f"rc={cp.returncode} {out(cp)[:300]}"
        return False

    wait_for(ready, 10)
    return got


def enforcement_enabled() -> str:
    return sh("busctl", "get-property", BUS, PATH, IFACE, "EnforcementEnabled").stdout.strip()


def systemd_call_as_linnix(
    member: str, signature: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return sh(
        "busctl",
        "call",
        "--allow-interactive-authorization=no",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        member,
        signature,
        *args,
        user="linnix",
    )


def enforcement(r: Report) -> None:
    """Monitor-only with an action configured, polkit refusals, dry run, a real throttle and its revert,
    what the polkit .rules grants linnix on systemd, and the ledger's recovery after kill -9."""
    policy = Path("/etc/linnixd/rules.yaml")
    text = policy.read_text()
    action = f"  actions:\n    - {{rule: cpu_spike, type: throttle_cpu, cpu_pct: {THROTTLE_PCT}, duration_s: {THROTTLE_S}}}\n"
    text = re.sub(r"^  actions: \[\].*$\n?", action, text, flags=re.M)
    # the harness itself (demos, linnixctl under emulation) can be a cpu_spike culprit: an
    # operator protects what must never be throttled, and so does the test
    text = re.sub(
        r"^  protected_units: \[\]", "  protected_units: [linnix-vmtest.service]", text, flags=re.M
    )
    policy.write_text(text)
    cp = sh("linnixctl", "check-config", str(policy))
    r.check(
        "policy with a cpu_spike throttle_cpu action is valid",
        cp.returncode == 0
        and "cpu_spike" in policy.read_text()
        and "throttle_cpu" in policy.read_text()
        and "linnix-vmtest.service" in policy.read_text(),
        out(cp)[:300],
    )
    cp = sh("systemctl", "reload", UNIT)
    wait_for(is_active, 60)
    r.check(
        "enforcement is off by default (EnforcementEnabled false)",
        enforcement_enabled() == "b false",
        enforcement_enabled(),
    )

    # monitor only: the rule fires, its action is configured, nothing is done
    start_unit("linnix-hog-mon", HOG)
    alert = wait_entry(
        60, "LINNIX_RULE=cpu_spike", "LINNIX_UNIT=linnix-hog-mon.service", "LINNIX_STATE=firing"
    )
    time.sleep(3)
    r.check(
        "monitor only: cpu_spike fires for a hog, its unit is not throttled",
        bool(alert)
        and unlimited("linnix-hog-mon.service")
        and not journal_entries("LINNIX_ACTION_UNIT=linnix-hog-mon.service"),
        f"alert {alert.get('MESSAGE', 'none')}; CPUQuotaPerSecUSec "
        f"{unit_prop('linnix-hog-mon.service', 'CPUQuotaPerSecUSec')}",
    )
    # triage: the snapshot names the hog and carries its unit's state as systemd reports it
    e = explain(
        alert.get("LINNIX_INCIDENT", "none"),
        lambda e: e["snapshot"]["unit"].get("state") != "pending",  # type: ignore[index]
    )
    snap = e.get("snapshot") or {}
    unit = snap.get("unit") or {}
    r.check(
        "linnixctl explain (unprivileged) names the hog with its systemd state",
        snap.get("culprit", {}).get("unit") == "linnix-hog-mon.service"
        and str(alert.get("LINNIX_COMM")) in str(e.get("headline"))
        and unit.get("state") == "known"
        and unit.get("ActiveState") == "active"
        and unit.get("CPUQuota") == "infinity"
        and unit.get("NRestarts") == 0
        and any(
            a.get("command", "").startswith("linnixctl throttle linnix-hog-mon.service --cpu")
            for a in e.get("actions", [])
        ),
        f"headline {e.get('headline')}; unit {unit}; error {e.get('error', '')}",
    )
    sh("systemctl", "stop", "linnix-hog-mon.service")

    cp = sh("linnixctl", "enable-enforcement", user=TESTER)
    r.check(
        "unprivileged linnixctl enable-enforcement refused by polkit (exit 77)",
        cp.returncode == 77 and enforcement_enabled() == "b false",
        out(cp)[:300],
    )
    cp = sh("linnixctl", "throttle", "linnix-none.service", "--cpu", "10", user=TESTER)
    r.check(
        "unprivileged linnixctl throttle refused by polkit (exit 77)",
        cp.returncode == 77,
        out(cp)[:300],
    )

    # dry run: journals exactly what would be done, changes nothing
    cp = sh("linnixctl", "enable-enforcement", "--dry-run")
    r.check(
        "root linnixctl enable-enforcement --dry-run",
        cp.returncode == 0 and enforcement_enabled() == "b true",
        out(cp)[:300],
    )
    start_unit("linnix-hog-dry", HOG)
    dry = wait_entry(60, "LINNIX_ACTION_UNIT=linnix-hog-dry.service", "LINNIX_DRY_RUN=1")
    time.sleep(2)
    actions = sh("linnixctl", "actions", "--json").stdout.strip()
    r.check(
        "dry run journals the throttle it would apply and changes nothing",
        f"would throttle_cpu linnix-hog-dry.service: CPUQuotaPerSecUSec infinity -> {THROTTLE_PCT * 10000}"
        in dry.get("MESSAGE", "")
        and unlimited("linnix-hog-dry.service")
        and actions == "[]",
        f"entry {dry.get('MESSAGE', 'none')}; cpu.max {unit_file_text('linnix-hog-dry.service', 'cpu.max')}; "
        f"actions {actions}",
    )
    sh("systemctl", "stop", "linnix-hog-dry.service")

    # for real: the hog is throttled when cpu_spike fires, its CPU use falls, the duration reverts it
    cp = sh("linnixctl", "enable-enforcement")
    changed = wait_entry(10, "LINNIX_ENFORCEMENT=enabled", "LINNIX_DRY_RUN=0")
    r.check(
        "root linnixctl enable-enforcement, journaled with the caller's uid, pid and bus name",
        cp.returncode == 0
        and enforcement_enabled() == "b true"
        and changed.get("LINNIX_CALLER_UID") == "0"
        and changed.get("LINNIX_CALLER_PID", "").isdigit()
        and changed.get("LINNIX_CALLER_BUS_NAME", "").startswith(":"),
        f"{out(cp)[:200]}; entry {changed.get('MESSAGE', 'none')}",
    )
    # an unprivileged subscriber (busctl monitor needs root, see above); line-buffered JSON to a file
    watch_log = RESULTS / "watch-actions.jsonl"
    watcher = subprocess.Popen(
        ["runuser", "-u", TESTER, "--", "linnixctl", "watch", "--json"],
        stdout=watch_log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    subscribed = wait_for(lambda: "linnixctl: watching" in watch_log.read_text(), 120)
    hog = "linnix-hog-act.service"
    start_unit("linnix-hog-act", HOG)
    time.sleep(1)
    before_pct = cpu_pct(hog)  # the rule needs 5 s over 50% before it fires
    taken = wait_entry(
        90, f"LINNIX_ACTION_UNIT={hog}", "LINNIX_ACTION_ACTION=throttle_cpu", "LINNIX_DRY_RUN=0"
    )
    time.sleep(1)
    cpu_max = unit_file_text(hog, "cpu.max")
    after_pct = cpu_pct(hog)
    r.figure("throttle_cpu_before_pct", f"{before_pct:.0f}")
    r.figure("throttle_cpu_after_pct", f"{after_pct:.0f}")
    r.check(
        f"cpu_spike throttles a systemd-run hog: cpu.max {THROTTLE_PCT * 1000} 100000, CPU use falls",
        bool(taken)
        and cpu_max == f"{THROTTLE_PCT * 1000} 100000"
        and before_pct >= 60
        and after_pct <= THROTTLE_PCT * 1.5,
        f"entry {taken.get('MESSAGE', 'none')}; cpu.max {cpu_max}; CPU {before_pct:.0f}% -> {after_pct:.0f}%",
    )
    cp = sh("linnixctl", "actions", "--json")
    listed = (
        json.loads(cp.stdout) if cp.returncode == 0 and cp.stdout.strip().startswith("[") else []
    )
    r.check(
        "linnixctl actions lists the throttle with its before and after values",
        any(a.get("unit") == hog and a.get("after") == THROTTLE_PCT * 10000 for a in listed),
        out(cp)[:300],
    )
    reverted = wait_entry(
        THROTTLE_S + 60, f"LINNIX_ACTION_UNIT={hog}", "MESSAGE_ID=1a22f2d188df4eb294c8482edd799a44"
    )
    r.check(
        f"the throttle is reverted after its {THROTTLE_S} s duration (kept while the hog pressed against it)",
        reverted.get("LINNIX_REVERT_REASON") == "duration over" and unlimited(hog),
        f"entry {reverted.get('MESSAGE', 'none')}; cpu.max {unit_file_text(hog, 'cpu.max')}",
    )
    sh("systemctl", "stop", hog)
    # triage: the incident's resolution records the throttle and the pressure before and after
    e = explain(
        taken.get("LINNIX_ACTION_INCIDENT", "none"), lambda e: e.get("resolution") is not None
    )
    res = e.get("resolution") or {}
    effect = res.get("effect") or {}
    r.check(
        "linnixctl explain of the throttled incident: resolved, the action and its effect recorded",
        e.get("state") == "resolved"
        and any(a.get("action") == "throttle_cpu" for a in res.get("actions", []))
        and effect.get("unit") == hog
        and effect.get("before", {}).get("samples", 0) > 0
        and effect.get("after", {}).get("samples", 0) > 0,
        f"state {e.get('state')}; resolution {json.dumps(res)[:400]}; error {e.get('error', '')}",
    )
    cp = sh("linnixctl", "incidents", "--all", "--json", user=TESTER)
    rows = json.loads(cp.stdout) if cp.returncode == 0 and cp.stdout.startswith("[") else []
    r.check(
        "linnixctl incidents --all (unprivileged) lists the throttled incident as resolved",
        any(
            row.get("incident") == taken.get("LINNIX_ACTION_INCIDENT")
            and row.get("state") == "resolved"
            and row.get("has_snapshot")
            for row in rows
        ),
        out(cp)[:300],
    )
    time.sleep(1)
    watcher.terminate()
    watcher.wait(timeout=10)
    events = [
        json.loads(line) for line in watch_log.read_text().splitlines() if line.startswith("{")
    ]
    signalled = {
        (e.get("signal"), e.get("before"), e.get("after")) for e in events if e.get("unit") == hog
    }
    r.check(
        "unprivileged linnixctl watch receives ActionTaken and ActionReverted with before and after values",
        ("ActionTaken", "infinity", str(THROTTLE_PCT * 10000)) in signalled
        and ("ActionReverted", "infinity", str(THROTTLE_PCT * 10000)) in signalled,
        f"subscribed {subscribed}; {sorted(map(str, signalled))}; {watch_log.read_text()[-300:]}",
    )

    # refusals: protected units, and what polkit grants linnix on systemd (only set-property and freeze)
    quota = unit_prop("dbus.service", "CPUQuotaPerSecUSec")
    cp = sh("linnixctl", "throttle", "dbus.service", "--cpu", "10")
    r.check(
        "linnixctl throttle dbus.service refused: protected unit, nothing changed",
        cp.returncode != 0
        and "protected" in cp.stderr
        and unit_prop("dbus.service", "CPUQuotaPerSecUSec") == quota,
        out(cp)[:300],
    )
    idle = "linnix-idle.service"
    start_unit("linnix-idle", ["/bin/sleep", "3600"])
    grants = {
        "SetUnitProperties on an ordinary unit": (
            True,
            (
                "SetUnitProperties",
                "sba(sv)",
                idle,
                "true",
                "1",
                "CPUQuotaPerSecUSec",
                "t",
                "500000",
            ),
        ),
        "FreezeUnit": (True, ("FreezeUnit", "s", idle)),
        "ThawUnit": (True, ("ThawUnit", "s", idle)),
        "SetUnitProperties on dbus.service": (
            False,
            (
                "SetUnitProperties",
                "sba(sv)",
                "dbus.service",
                "true",
                "1",
                "CPUQuotaPerSecUSec",
                "t",
                "500000",
            ),
        ),
        "FreezeUnit on dbus.service": (False, ("FreezeUnit", "s", "dbus.service")),
        "StopUnit": (False, ("StopUnit", "ss", idle, "replace")),
        "RestartUnit": (False, ("RestartUnit", "ss", idle, "replace")),
        "StartUnit": (False, ("StartUnit", "ss", idle, "replace")),
        "KillUnit": (False, ("KillUnit", "ssi", idle, "all", "15")),
    }
    for what, (allowed, call) in grants.items():
        cp = systemd_call_as_linnix(*call)
        denied = (
            "access denied" in cp.stderr.lower()
            or "interactive authentication required" in cp.stderr.lower()
        )
        ok = cp.returncode == 0 if allowed else cp.returncode != 0 and denied
        r.check(f"polkit {'grants' if allowed else 'refuses'} linnix {what}", ok, out(cp)[:300])
    sh("systemctl", "set-property", "--runtime", idle, "CPUQuota=")
    r.check(
        "linnix-idle.service survived the refused stop, restart and kill",
        unit_prop(idle, "ActiveState") == "active" and unit_prop(idle, "FreezerState") == "running",
        unit_prop(idle, "ActiveState"),
    )

    # manual throttle and unthrottle; then kill -9 during a throttle: the restarted daemon reverts it
    cp = sh("linnixctl", "throttle", idle, "--cpu", "40")
    r.check(
        "linnixctl throttle UNIT --cpu 40 sets cpu.max 40000 100000",
        cp.returncode == 0 and unit_file_text(idle, "cpu.max") == "40000 100000",
        out(cp)[:300],
    )
    cp = sh("linnixctl", "unthrottle", idle)
    r.check(
        "linnixctl unthrottle UNIT restores cpu.max",
        cp.returncode == 0 and unlimited(idle),
        f"{out(cp)[:300]} cpu.max {unit_file_text(idle, 'cpu.max')}",
    )
    cp = sh("linnixctl", "throttle", idle, "--cpu", "30", "--duration", "3600")
    throttled = unit_file_text(idle, "cpu.max")
    old = int(prop("MainPID"))
    os.kill(old, 9)
    back = wait_for(
        lambda: is_active() and int(prop("MainPID") or 0) not in (0, old), READY_TIMEOUT_S
    )
    reverted = wait_entry(
        60, f"LINNIX_ACTION_UNIT={idle}", "LINNIX_REVERT_REASON=left behind by a previous run"
    )
    r.check(
        "kill -9 during a throttle: the restarted daemon reverts it from the ledger",
        cp.returncode == 0
        and throttled == "30000 100000"
        and back
        and bool(reverted)
        and unlimited(idle),
        f"throttled {throttled}; back {back}; entry {reverted.get('MESSAGE', 'none')}; "
        f"cpu.max now {unit_file_text(idle, 'cpu.max')}",
    )
    r.check(
        "enforcement state persists across the restart",
        enforcement_enabled() == "b true",
        enforcement_enabled(),
    )
    cp = sh("linnixctl", "disable-enforcement")
    r.check(
        "root linnixctl disable-enforcement",
        cp.returncode == 0 and enforcement_enabled() == "b false",
        out(cp)[:300],
    )
    sh("systemctl", "stop", idle)


def sandbox_argv(unit: str, drop: str = "") -> list[str]:
    """systemd-run with the installed unit's sandbox and capabilities, less the capability `drop`."""
    unit_file = next((f for f in UNIT_FILES if os.path.exists(f)), "")
    service = Path(unit_file).read_text().split("[Service]", 1)[1].split("[Install]", 1)[0]
    skip = (
        "Type=",
        "BusName=",
        "ExecStart=",
        "ExecReload=",
        "WatchdogSec=",
        "TimeoutStartSec=",
        "Restart",
        "AmbientCapabilities=",
        "CapabilityBoundingSet=",
    )
    props = [line for line in service.splitlines() if line and not line.startswith(("#", *skip))]
    caps = " ".join(c for c in unit_caps() if c != drop)
    props += [f"AmbientCapabilities={caps}", f"CapabilityBoundingSet={caps}"]
    return ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", f"--unit={unit}"] + [
        f"--property={p}" for p in props
    ]


def probe_sandbox(r: Report) -> None:
    """bcc under the unit's exact sandbox as linnix, independent of the daemon; each capability needed."""
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    r.check("kernel.perf_event_paranoid is 2 (50-linnixd.conf applied)", paranoid == "2", paranoid)
    probe = "/run/linnix-probe.py"
    Path(probe).write_text((PAYLOAD / "bcc_probe.py").read_text())
    os.chmod(probe, 0o644)
    cp = sh(*sandbox_argv("linnix-probe"), "/usr/bin/python3", "-B", probe, timeout=300)
    lines = [line for line in cp.stdout.splitlines() if line.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    if not lines:
        print(cp.stderr, flush=True)
    full = r.check(
        "bcc compiles and counts 20 of 20 forks under the unit's sandbox as linnix",
        cp.returncode == 0
        and res.get("forks_counted") == res.get("forks_made") == 20
        and res.get("uid") == pwd.getpwnam("linnix").pw_uid,
        f"{res} {cp.stderr.strip()}",
    )
    r.check(
        "fd_exhaustion: sandboxed linnix lists root's /proc/1/fd without CAP_SYS_PTRACE",
        res.get("pid1_fds", -1) > 0
        and not int(res.get("cap_eff", "0"), 16) & (1 << CAP_NUMBERS["CAP_SYS_PTRACE"]),
        f"{res}",
    )
    for cap in unit_caps():
        cp = sh(
            *sandbox_argv("linnix-probe-less", drop=cap),
            "/usr/bin/python3",
            "-B",
            probe,
            timeout=300,
        )
        # only meaningful when the probe passes with every capability
        r.check(
            f"{cap} is necessary: the probe fails without it",
            full and cp.returncode != 0,
            f"rc={cp.returncode} {cp.stdout.strip()} ... {cp.stderr.strip()[-200:]}",
        )


def purge(r: Report) -> None:
    cp = sh("apt-get", "purge", "-y", "linnixd", timeout=300)
    r.check("apt purge linnixd", cp.returncode == 0, out(cp)[-300:])
    left = [
        f
        for f in (
            *UNIT_FILES,
            "/etc/systemd/system/multi-user.target.wants/linnixd.service",
            "/usr/share/dbus-1/system.d/org.linnix.linnixd1.conf",
            "/usr/share/polkit-1/actions/org.linnix.linnixd1.policy",
            POLKIT_RULES,
            "/var/lib/linnixd",
            "/var/lib/linnixd-forward",
            "/etc/linnixd",
            "/lib/systemd/system/linnixd-forward.service",
            "/var/lib/prometheus/node-exporter/linnixd.prom",
        )
        if os.path.lexists(f)
    ]
    r.check(
        "purge leaves no unit, bus policy, polkit action, state or config", not left, f"left {left}"
    )
    user = any(
        sh("getent", db, name).returncode == 0
        for db in ("passwd", "group")
        for name in ("linnix", "linnixd-forward")
    )
    r.check(
        "purge leaves no linnix user or group", not user, sh("getent", "passwd", "linnix").stdout
    )
    cp = sh("systemctl", "cat", UNIT)
    r.check("systemd no longer knows linnixd.service", cp.returncode != 0, out(cp)[:200])
    if TEXTFILE_DIR.exists():
        acl = sh("getfacl", "-pn", str(TEXTFILE_DIR)).stdout
        r.check(
            "purge takes linnix's ACL off node_exporter's textfile dir",
            "user:linnix" not in acl and not re.search(r"^user:\d+:", acl, re.M),
            acl[:300],
        )


def main() -> int:
    r = Report()
    try:
        run(r)
    except Exception as exc:  # an assertion script crash is itself a failure, reported as one line
        r.check("assertion script completed", False, f"{type(exc).__name__}: {exc}")
    if sh("dpkg-query", "-W", "linnixd").returncode == 0:
        purge(r)
    (RESULTS / "done").write_text(f"{r.failed}\n")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
