"""The network collector: bpf/net.c loaded, its changed counters read each tick, port use measured.

The kernel counts TCP opens, closes, short-lived connections and retransmits per process,
cgroup and remote endpoint (attribution rules in bpf/net.c). User space reads only the keys
the kernel marked as changed. Two levels come from /proc, and only when the kernel counts
point at them: the ports in use in a network namespace (/proc/PID/net/tcp and tcp6, read when
the kernel's open + TIME_WAIT counts of its processes approach the namespace's
ip_local_port_range) and segments sent per namespace (/proc/PID/net/snmp, read for the
namespaces of processes that retransmitted).
"""

from __future__ import annotations

import collections
import ctypes as ct
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..health import Health
from ..model import NetCounts, NetnsSegments, NetTick, PortHolder, PortUsage
from ..paths import bpf_dir
from .bpfload import ShortLivedThreshold, compile_program, preflight, source_text
from .keyed import KeyedCounters, PerCpuSlots

TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_retransmit_skb")

# Slots of bpf/net.c's health array.
H_OVERFLOW, H_UNTRACKED_CLOSE, H_UNOWNED_CLOSE, H_UNATTR_RETRANS, H_OTHER_PROTO = range(5)
NHEALTH = 5
NCOUNTS = 8
C_CONNECTS, C_RETRANS, C_ACTIVE_CLOSED, C_TIME_WAIT = 0, 5, 6, 7

AF_INET, AF_INET6 = 2, 10
TIME_WAIT_S = 60.0  # TCP_TIMEWAIT_LEN: how long a closed-first connection holds its port
RANGE_REFRESH_S = 30.0  # ip_local_port_range of a namespace is re-read at most this often
MEASURE_EVERY_S = 2.0  # /proc/PID/net/tcp of a namespace near its limit is read this often
MEASURE_CALM_S = 10.0  # ... and of one whose last measurement was under the gate, this often
MIN_HOLDING = 8  # processes holding fewer ports than this are not looked at for exhaustion
MAX_SEGMENT_READS = 8  # /proc/PID/net/snmp reads per tick (processes that retransmitted)
HOT_NETNS_S = 30.0  # a namespace that retransmitted is read each tick for this long
CLONE_NEWNET = 0x40000000
HOST_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
TCP_LISTEN = 0x0A
TCP_TIME_WAIT = 0x06
_REMOTE_KEY = struct.Struct("<QIHH16s")  # struct remote_key of bpf/net.c


def format_endpoint(family: int, addr: bytes, port: int) -> str:
    """ "10.0.0.7:5432" or "[2001:db8::1]:443"; IPv4-mapped IPv6 is shown as IPv4."""
    import ipaddress

    if family == AF_INET6:
        ip6 = ipaddress.IPv6Address(addr[:16])
        mapped = ip6.ipv4_mapped
        if mapped is not None:
            return f"{mapped}:{port}"
        return f"[{ip6}]:{port}"
    return f"{ipaddress.IPv4Address(addr[:4])}:{port}"


def _netns_of(pid: int) -> int | None:
    """An id of pid's network namespace: the namespace's inode, or, where reading it needs
    ptrace rights the daemon lacks (another user's process), the inode of its /proc/PID/net/tcp
    (one per namespace, readable by anyone); None when the process is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        return os.stat(f"/proc/{pid}/net/tcp").st_ino
    except OSError:
        return None


def _same_netns_as_ours(pid: int) -> bool:
    """True when pid shares the daemon's network namespace (compared without ptrace rights)."""
    try:
        return os.stat("/proc/self/net/tcp").st_ino == os.stat(f"/proc/{pid}/net/tcp").st_ino
    except OSError:
        return False


def _read_range(path: str) -> tuple[int, int]:
    with open(path) as fh:
        lo, hi = fh.read().split()[:2]
    return int(lo), int(hi)


def netns_port_range(pid: int) -> tuple[int, int, str]:
    """ip_local_port_range of pid's network namespace: (lo, hi, "netns"), or the host's (lo, hi, "host").

    /proc/sys/net shows the namespace of the thread that opens it, so a throwaway thread
    enters pid's namespace (setns needs CAP_SYS_ADMIN) and reads it there; the daemon's other
    threads never change namespace. Without the privilege the host's range stands in.
    """
    if _same_netns_as_ours(pid):
        lo, hi = _read_range(HOST_RANGE)
        return lo, hi, "netns"
    result: list[tuple[int, int]] = []

    def enter_and_read() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        except OSError:
            return
        try:
            libc = ct.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                return
            result.append(_read_range(HOST_RANGE))
        except (OSError, ValueError):
            return
        finally:
            os.close(fd)

    worker = threading.Thread(target=enter_and_read, name="linnixd-netns", daemon=True)
    worker.start()
    worker.join(timeout=2.0)
    if result:
        return result[0][0], result[0][1], "netns"
    lo, hi = _read_range(HOST_RANGE)
    return lo, hi, "host"


def _hex_endpoint(text: str, v6: bool) -> tuple[bytes, int]:
    """Address bytes and port of a /proc/net/tcp{,6} "ADDR:PORT" field (words in host order)."""
    addr_hex, port_hex = text.split(":")
    raw = bytes.fromhex(addr_hex)
    # each 32-bit word is printed as a host-order integer: swap back to network order
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    if struct.pack("=I", 1) == b"\x01\x00\x00\x00":
        words = [w[::-1] for w in words]
    return b"".join(words), int(port_hex, 16)


def measure_ports(pid: int, lo: int, hi: int) -> tuple[int, int, str, int]:
    """Ports of pid's namespace in [lo, hi] held by TCP sockets (TIME_WAIT included).

    Returns (distinct local ports, sockets in TIME_WAIT, busiest remote, its local ports).
    Tens of thousands of lines on a churning host: only the fields needed are split off, and
    only the busiest remote address is decoded.
    """
    ports: set[int] = set()
    time_wait = 0
    per_remote: dict[tuple[bool, str], set[int]] = collections.defaultdict(set)
    listen, tw_state = f"{TCP_LISTEN:02X}", f"{TCP_TIME_WAIT:02X}"
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"/proc/{pid}/net/{name}") as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split(None, 4)
                    if len(fields) < 4 or fields[3] == listen:
                        continue
                    lport = int(fields[1][-4:], 16)
                    if not lo <= lport <= hi:
                        continue
                    ports.add(lport)
                    if fields[3] == tw_state:
                        time_wait += 1
                    per_remote[(v6, fields[2])].add(lport)
        except OSError:
            continue  # the process (or IPv6) is gone: what was read stands
    if not per_remote:
        return len(ports), time_wait, "", 0
    (v6, remote), lports = max(per_remote.items(), key=lambda kv: len(kv[1]))
    raddr, rport = _hex_endpoint(remote, v6)
    family = AF_INET6 if v6 else AF_INET
    return len(ports), time_wait, format_endpoint(family, raddr, rport), len(lports)


def read_tcp_segments(pid: int) -> tuple[int, int] | None:
    """(OutSegs, RetransSegs) of pid's network namespace from /proc/PID/net/snmp."""
    try:
        with open(f"/proc/{pid}/net/snmp") as fh:
            tcp = [line.split() for line in fh if line.startswith("Tcp:")]
    except OSError:
        return None
    if len(tcp) < 2:
        return None
    row = dict(zip(tcp[0][1:], tcp[1][1:], strict=False))
    try:
        return int(row["OutSegs"]), int(row["RetransSegs"])
    except (KeyError, ValueError):
        return None


def _counts(values: tuple[int, ...]) -> NetCounts:
    return NetCounts(*values)


@dataclass
class _Namespace:
    range_lo: int = 0
    range_hi: int = 0
    source: str = "host"
    range_read_at: float = -1e18
    measure_due: float = -1e18
    segments: tuple[int, int] | None = None  # (OutSegs, RetransSegs) at the last read
    hot_until: float = -1e18


class NetCollector(ShortLivedThreshold):
    """Counts TCP connections and retransmits in the kernel; measures port use where it matters."""

    def __init__(
        self,
        short_lived_s: float = 1.0,
        *,
        sock_entries: int = 65536,
        tgid_entries: int = 16384,
        cgroup_entries: int = 4096,
        remote_entries: int = 8192,
        prune_after_ticks: int = 20,
        port_gate_pct: float = 45.0,
        clock: Callable[[], float] = time.monotonic,
        src: Path | None = None,
    ) -> None:
        """`port_gate_pct`: share of a namespace's port range its processes must hold (by the
        kernel's counts) before /proc/PID/net/tcp is read to measure it."""
        self.init_short_lived(short_lived_s)
        self.sock_entries = sock_entries
        self.tgid_entries = tgid_entries
        self.cgroup_entries = cgroup_entries
        self.remote_entries = remote_entries
        self.prune_after_ticks = prune_after_ticks
        self.port_gate_pct = port_gate_pct
        self.clock = clock
        self.src = src if src is not None else bpf_dir() / "net.c"
        self._bpf: Any = None
        self._tgids: KeyedCounters[NetCounts] | None = None
        self._cgroups: KeyedCounters[NetCounts] | None = None
        self._remotes: KeyedCounters[tuple[int, ...]] | None = None
        self._totals: PerCpuSlots | None = None
        self._health_slots: PerCpuSlots | None = None
        self._prev_total: tuple[int, ...] = (0,) * NCOUNTS
        self._time_wait: dict[int, collections.deque[tuple[float, int]]] = {}
        self._netns: dict[int, _Namespace] = {}
        self.pruned_keys = 0  # monotonic: idle map entries removed
        self.port_measurements = 0  # monotonic: /proc/PID/net/tcp reads
        self._health = [0] * NHEALTH

    # ---- kernel side -------------------------------------------------------------------

    def cflags(self) -> list[str]:
        return [
            f"-DSOCK_ENTRIES={self.sock_entries}",
            f"-DTGID_ENTRIES={self.tgid_entries}",
            f"-DCGROUP_ENTRIES={self.cgroup_entries}",
            f"-DREMOTE_ENTRIES={self.remote_entries}",
            self.short_lived_cflag(),
        ]

    def dump_source(self) -> str:
        """The C source exactly as start() would compile it, -D values first."""
        return source_text(self.src, self.cflags())

    def start(self) -> None:
        """Check the kernel, compile and attach; raises KernelFeatureError with the fix."""
        preflight(TRACEPOINTS)
        self._bpf = compile_program(self.src, self.cflags())
        self.write_short_lived()
        b = self._bpf
        n = self.prune_after_ticks
        self._tgids = KeyedCounters(b[b"by_tgid"], n, _counts, dirty=b[b"dirty_tgid"])
        self._cgroups = KeyedCounters(b[b"by_cgroup"], n, _counts, dirty=b[b"dirty_cgroup"])
        self._remotes = KeyedCounters(b[b"by_remote"], n, tuple, dirty=b[b"dirty_remote"])
        self._totals = PerCpuSlots(b[b"totals"])
        self._health_slots = PerCpuSlots(b[b"health"])
        self._prev_total = (0,) * NCOUNTS
        self._time_wait.clear()

    @property
    def running(self) -> bool:
        return self._bpf is not None

    def close(self) -> None:
        """Detach and free the kernel side; safe to call twice or before start()."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    # ---- per tick ----------------------------------------------------------------------

    def read(self) -> NetTick:
        """Deltas since the previous read (the first one: since attach), port use where it matters."""
        if self._bpf is None or self._tgids is None or self._cgroups is None:
            raise RuntimeError("NetCollector.read() before start()")
        assert self._remotes is not None
        now = self.clock()
        assert self._totals is not None
        totals = self._totals.read(0)
        total_now = tuple(sum(cpu.v[i] for cpu in totals) for i in range(NCOUNTS))
        total = NetCounts(*(a - b for a, b in zip(total_now, self._prev_total, strict=True)))
        self._prev_total = total_now
        by_tgid: dict[int, NetCounts] = self._tgids.read()  # type: ignore[assignment]
        by_cgroup: dict[int, NetCounts] = self._cgroups.read()  # type: ignore[assignment]
        remotes = []
        for key, (connects, retrans) in self._remotes.read().items():
            assert isinstance(key, bytes)
            cgid, tgid, family, port, addr = _REMOTE_KEY.unpack(key)
            remotes.append((tgid, cgid, format_endpoint(family, addr, port), connects, retrans))
        for tgid, counts in by_tgid.items():
            if counts.time_wait:
                self._time_wait.setdefault(tgid, collections.deque()).append(
                    (now, counts.time_wait)
                )
        self._expire_time_wait(now)
        ports = self._measure_ports(now)
        segments = self._segments(by_tgid, now)
        self.pruned_keys += self._tgids.prune(self._tgids_worth_keeping)
        self.pruned_keys += self._cgroups.prune(lambda _keys: set())
        self.pruned_keys += self._remotes.prune(lambda _keys: set())
        h = self._health = self._health_counters()
        return NetTick(
            total=total,
            by_tgid=by_tgid,
            by_cgroup_id=by_cgroup,
            remotes=remotes,
            ports=ports,
            segments=segments,
            aggregation_overflows=h[H_OVERFLOW],
            untracked_closes=h[H_UNTRACKED_CLOSE],
            unowned_closes=h[H_UNOWNED_CLOSE],
            unattributed_retransmits=h[H_UNATTR_RETRANS],
            other_protocols=h[H_OTHER_PROTO],
        )

    def health(self) -> Health:
        """Monotonic counters since attach, as of the last read: what was not attributed, and why."""
        h = self._health
        lookups = sum(k.lookups for k in (self._tgids, self._cgroups, self._remotes) if k)
        return Health(
            counters={
                "connects": self._prev_total[C_CONNECTS],
                "retransmits": self._prev_total[C_RETRANS],
                "aggregation_overflows": h[H_OVERFLOW],
                "untracked_closes": h[H_UNTRACKED_CLOSE],
                "unowned_closes": h[H_UNOWNED_CLOSE],
                "unattributed_retransmits": h[H_UNATTR_RETRANS],
                "other_protocols": h[H_OTHER_PROTO],
                "pruned_keys": self.pruned_keys,
                "key_lookups": lookups,
                "port_measurements": self.port_measurements,
            },
            gauges={"tracked_namespaces": len(self._netns)},
        )

    def _health_counters(self) -> list[int]:
        assert self._health_slots is not None
        return [self._health_slots.sum(i) for i in range(NHEALTH)]

    def open_connections(self) -> dict[int, int]:
        """connect()ed sockets not yet closed, by tgid (kernel counts since attach; nonzero only)."""
        if self._tgids is None:
            return {}
        out = {}
        for key, v in self._tgids.prev.items():
            n = v[C_CONNECTS] - v[C_ACTIVE_CLOSED]
            if n > 0:
                out[int(key)] = n  # type: ignore[call-overload]
        return out

    def _tgids_worth_keeping(self, keys: list[Any]) -> set[Any]:
        """Idle tgid keys are kept while the process lives with connections open (its gauge)."""
        open_now = self.open_connections()
        return {k for k in keys if open_now.get(k, 0) > 0 and os.path.exists(f"/proc/{k}")}

    def _expire_time_wait(self, now: float) -> None:
        for tgid in list(self._time_wait):
            q = self._time_wait[tgid]
            while q and now - q[0][0] >= TIME_WAIT_S:
                q.popleft()
            if not q:
                del self._time_wait[tgid]

    def _holdings(self) -> dict[int, tuple[int, int]]:
        """(open, recent TIME_WAIT) by tgid, for processes holding at least MIN_HOLDING ports."""
        open_now = self.open_connections()
        out = {}
        for tgid in set(open_now) | set(self._time_wait):
            tw = sum(n for _, n in self._time_wait.get(tgid, ()))
            held = open_now.get(tgid, 0)
            if held + tw >= MIN_HOLDING:
                out[tgid] = (held, tw)
        return out

    def _namespace(self, netns: int, pid: int, now: float) -> _Namespace:
        ns = self._netns.setdefault(netns, _Namespace())
        if now - ns.range_read_at >= RANGE_REFRESH_S:
            try:
                ns.range_lo, ns.range_hi, ns.source = netns_port_range(pid)
                ns.range_read_at = now
            except (OSError, ValueError):
                pass  # keep the previous figures; the next tick tries again
        return ns

    def _measure_ports(self, now: float) -> list[PortUsage]:
        """Port use of the namespaces whose processes hold a large share of their range."""
        holdings = self._holdings()
        if not holdings:
            return []
        by_netns: dict[int, list[int]] = collections.defaultdict(list)
        for tgid in holdings:
            netns = _netns_of(tgid)
            if netns is not None:
                by_netns[netns].append(tgid)
        out = []
        for netns, tgids in by_netns.items():
            ns = self._namespace(netns, tgids[0], now)
            size = ns.range_hi - ns.range_lo + 1
            held = sum(sum(holdings[t]) for t in tgids)
            if size <= 0 or 100.0 * held / size < self.port_gate_pct:
                continue
            if now < ns.measure_due:
                continue
            self.port_measurements += 1
            top = max(tgids, key=lambda t: sum(holdings[t]))
            in_use, tw, remote, remote_ports = measure_ports(top, ns.range_lo, ns.range_hi)
            # the kernel's counts overstate ports held where TIME_WAIT is reused (loopback): a
            # namespace measured well below the gate is looked at again only after a while
            calm = 100.0 * in_use / size < self.port_gate_pct
            ns.measure_due = now + (MEASURE_CALM_S if calm else MEASURE_EVERY_S)
            holders = sorted(
                (PortHolder(t, holdings[t][0], holdings[t][1]) for t in tgids),
                key=lambda h: -(h.open_connections + h.recent_time_wait),
            )
            out.append(
                PortUsage(
                    netns=netns,
                    range_lo=ns.range_lo,
                    range_hi=ns.range_hi,
                    range_source=ns.source,
                    ports_in_use=in_use,
                    time_wait=tw,
                    busiest_remote=remote,
                    busiest_remote_ports=remote_ports,
                    holders=tuple(holders),
                )
            )
        self._forget_namespaces(now, set(by_netns))
        return out

    def _segments(self, by_tgid: Mapping[int, NetCounts], now: float) -> dict[int, NetnsSegments]:
        """Segments sent/retransmitted in the namespaces of the processes that retransmitted."""
        busy = sorted((c.retransmits, t) for t, c in by_tgid.items() if c.retransmits)
        out: dict[int, NetnsSegments] = {}
        seen: dict[int, NetnsSegments | None] = {}
        for _, tgid in reversed(busy[-MAX_SEGMENT_READS:]):
            netns = _netns_of(tgid)
            if netns is None:
                continue
            if netns not in seen:
                seen[netns] = self._segments_of(netns, tgid, now)
            if seen[netns] is not None:
                out[tgid] = seen[netns]  # type: ignore[assignment]
        return out

    def _segments_of(self, netns: int, pid: int, now: float) -> NetnsSegments | None:
        ns = self._netns.setdefault(netns, _Namespace())
        figures = read_tcp_segments(pid)
        if figures is None:
            return None
        prev, ns.segments = ns.segments, figures
        stale = now > ns.hot_until
        ns.hot_until = now + HOT_NETNS_S
        if prev is None or stale:
            return None  # a baseline: the next read gives the interval
        return NetnsSegments(netns, figures[0] - prev[0], figures[1] - prev[1])

    def _forget_namespaces(self, now: float, active: Iterable[int]) -> None:
        keep = set(active)
        for netns in [n for n in self._netns if n not in keep]:
            ns = self._netns[netns]
            if now > ns.hot_until and now - ns.range_read_at >= RANGE_REFRESH_S:
                del self._netns[netns]
