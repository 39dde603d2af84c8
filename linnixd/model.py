"""The host model's data types: what collectors produce, detectors read and sinks report.

Everything here is a frozen dataclass with no behaviour beyond derived values, so a
snapshot can be built by hand in a test exactly as the daemon builds it from the kernel.
Times: `ts` fields are monotonic seconds (CLOCK_MONOTONIC), `wall` fields are Unix epoch
seconds. Sizes are bytes, CPU is percent of one CPU (100.0 = one core busy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

RESOURCES = ("cpu", "io", "memory")


@dataclass(frozen=True)
class LifecycleCounts:
    """Process-lifecycle events counted in the kernel for one key over one interval."""

    forks: int = 0  # process creations (clone without CLONE_THREAD)
    threads: int = 0  # thread creations (CLONE_THREAD)
    execs: int = 0
    exits: int = 0  # thread-group exits (whole processes)
    short_exits: int = 0  # exec'd processes that exited younger than the short-lived limit

    def __add__(self, other: LifecycleCounts) -> LifecycleCounts:
        return LifecycleCounts(
            self.forks + other.forks,
            self.threads + other.threads,
            self.execs + other.execs,
            self.exits + other.exits,
            self.short_exits + other.short_exits,
        )


@dataclass(frozen=True)
class ExitRecord:
    """One process exit streamed from the kernel (only for exec'd or long-lived processes)."""

    pid: int
    ppid: int  # tgid of the process that created it (0 when it was created before we attached)
    cgroup_id: int
    comm: str
    exit_code: int | None  # exit_group() status; None when killed by a signal or unknown
    signal: int | None  # fatal signal number, when that is how it ended
    lifetime_s: float | None  # None when its creation was not seen
    ts: float


@dataclass(frozen=True)
class ExecRecord:
    """One exec streamed from the kernel."""

    pid: int
    ppid: int
    cgroup_id: int
    comm: str
    ts: float


@dataclass(frozen=True)
class LifecycleTick:
    """What the lifecycle collector hands over each tick: deltas plus monotonic health counters."""

    total: LifecycleCounts  # whole host, this interval
    by_parent: Mapping[int, LifecycleCounts]  # by creator tgid, this interval
    by_cgroup_id: Mapping[int, LifecycleCounts]  # by cgroup v2 id, this interval
    execs: Sequence[ExecRecord]
    exits: Sequence[ExitRecord]
    events: int  # monotonic since attach: lifecycle events counted in the kernel
    dropped_events: int  # monotonic: records lost because the ring/perf buffer was full
    aggregation_overflows: int  # monotonic: map updates refused because a map was full
    untracked_exits: int  # monotonic: exits whose creation was not seen


@dataclass(frozen=True)
class PsiSample:
    """Pressure of one resource (cpu, io, memory) for the system or one cgroup."""

    some_avg10: float  # percent, the kernel's 10 s running average
    full_avg10: float
    some_stall_us: int  # stall microseconds accrued during the last interval (`total=` delta)
    full_stall_us: int
    interval_s: float  # length of the interval the *_stall_us values cover

    @property
    def some_pct(self) -> float:
        """Share of the last interval in which some task stalled, in percent."""
        if self.interval_s <= 0:
            return 0.0
        return min(100.0, self.some_stall_us / (self.interval_s * 1e4))

    @property
    def full_pct(self) -> float:
        if self.interval_s <= 0:
            return 0.0
        return min(100.0, self.full_stall_us / (self.interval_s * 1e4))


@dataclass(frozen=True)
class Owner:
    """Who owns a cgroup: a systemd unit, a container or a Kubernetes pod."""

    kind: str  # "unit", "container", "pod", "root", "unknown"
    name: str  # "foo.service", "session-3.scope", "docker-<id>.scope", "pod<uid>", "/"
    unit: str | None = None  # the systemd unit that holds the cgroup, when there is one
    container_id: str | None = None
    runtime: str | None = None  # "docker", "podman", "containerd", "cri-o"
    pod_uid: str | None = None


@dataclass(frozen=True)
class Names:
    """The names the node's runtimes and kubelet give a cgroup's owner (linnixd/names.py)."""

    pod: str | None = None
    namespace: str | None = None
    pod_uid: str | None = None
    container: str | None = None
    container_id: str | None = None
    image: str | None = None
    runtime: str | None = None

    def label(self) -> str | None:
        """'pod payments/api-7d9f (container api)', 'container web', or None without a name."""
        return owner_label(self.pod, self.namespace, self.container)


def owner_label(pod: str | None, namespace: str | None, container: str | None) -> str | None:
    """How summaries name a pod or container: 'pod NS/POD (container C)', 'container C'."""
    if pod:
        who = f"pod {namespace}/{pod}" if namespace else f"pod {pod}"
        return f"{who} (container {container})" if container else who
    if container:
        return f"container {container}"
    return None


NAME_FIELDS = ("pod", "namespace", "container", "container_id", "image")
# A culprit's fields as they stand flat in an alert record (to_dict, the D-Bus alert details).
CULPRIT_FIELDS = (
    "kind",
    "pid",
    "comm",
    "cgroup",
    "unit",
    "parent_pid",
    "parent_comm",
    "root_pid",
    *NAME_FIELDS,
)


@dataclass(frozen=True)
class ProcessSample:
    """One process as seen at a tick."""

    pid: int
    ppid: int
    comm: str
    cmdline: str
    start_time: float  # seconds since boot (field 22 of /proc/PID/stat / CLK_TCK)
    uid: int
    cgroup: str  # cgroup v2 path relative to the cgroup2 mount, "/" for the root
    unit: str | None
    cpu_pct: float  # over the last interval, percent of one CPU
    rss_bytes: int
    threads: int = 1
    fd_count: int | None = None  # None when not counted this tick (cheap pre-filter said far)
    fd_soft_limit: int | None = None  # None = unlimited or unknown


@dataclass(frozen=True)
class CgroupSample:
    """One cgroup as seen at a tick."""

    id: int  # kernfs inode number == bpf_get_current_cgroup_id()
    path: str  # relative to the cgroup2 mount, "/" for the root
    owner: Owner
    pressure: Mapping[str, PsiSample] = field(default_factory=dict)  # by resource
    memory_bytes: int | None = None  # memory.current (v2) or usage (v1), when readable
    cpu_usage_us: int | None = None  # cpu.stat usage_usec delta over the interval
    nr_throttled: int | None = None  # cpu.stat delta over the interval
    throttled_us: int | None = None  # cpu.stat throttled_usec delta over the interval
    # Effective limits (the lowest on the path from the root), None for "max" or unreadable.
    memory_max_bytes: int | None = None
    memory_high_bytes: int | None = None


@dataclass(frozen=True)
class StallEdge:
    """Run-queue wait a victim cgroup suffered while a culprit cgroup held the CPU."""

    victim: str  # cgroup path
    culprit: str  # cgroup path
    stall_us: int  # over the interval
    preemptions: int = 0


@dataclass(frozen=True)
class CgroupRunqueue:
    """Run-queue wait of one cgroup over one interval."""

    path: str
    wait_us: int
    waits: int
    hist_log2_us: Sequence[int] = ()  # slot i counts waits in [2^i, 2^(i+1)) microseconds


@dataclass(frozen=True)
class StallSnapshot:
    """Scheduler evidence for one interval (filled by the stall-attribution collector)."""

    runqueue: Mapping[str, CgroupRunqueue] = field(default_factory=dict)  # by cgroup path
    edges: Sequence[StallEdge] = ()
    unresolved_us: int = 0  # stall whose cgroup ids could not be resolved to a path
    unattributed_us: int = 0  # wait no culprit could be named for (CPU idle, log too short)
    unresolved_preemptions: int = 0  # preemptions between cgroups not resolvable to a path
    # Monotonic health counters of the scheduler program since attach.
    no_enqueue: int = 0  # switch-ins without a recorded enqueue time (attach, LRU eviction)
    migrated_waits: int = 0  # waits that ended on another CPU than they were queued on
    lost_waits: int = 0  # waits whose task's cgroup was never observed (not attributed)
    recovered_waits: int = 0  # waits settled from the task's last-seen cgroup (missed sched_switch)
    aggregation_overflows: int = 0  # kernel map inserts refused because a map was full


@dataclass(frozen=True)
class NetCounts:
    """TCP connection events counted in the kernel (bpf/net.c) for one key over one interval."""

    connects: int = 0  # active opens: connect() moved a socket to SYN_SENT
    failed: int = 0  # active opens closed before they were established (refused, no port, ...)
    accepts: int = 0  # accepted connections, counted when their holder became known (its close)
    closed: int = 0  # connections that reached CLOSE
    short: int = 0  # ... of which younger than the short-lived threshold
    retransmits: int = 0  # retransmitted segments
    active_closed: int = 0  # active opens that reached CLOSE (connects - active_closed = open)
    time_wait: int = 0  # active opens this side closed first: an ephemeral port in TIME_WAIT

    def __add__(self, other: NetCounts) -> NetCounts:
        return NetCounts(
            *(a + b for a, b in zip(astuple_counts(self), astuple_counts(other), strict=True))
        )


def astuple_counts(c: NetCounts) -> tuple[int, ...]:
    return (
        c.connects,
        c.failed,
        c.accepts,
        c.closed,
        c.short,
        c.retransmits,
        c.active_closed,
        c.time_wait,
    )


@dataclass(frozen=True)
class RemoteSample:
    """Connections and retransmits of one process towards one remote endpoint over one interval."""

    pid: int
    cgroup: str  # cgroup path of the process when it opened the connection
    remote: str  # "10.0.0.7:5432" or "[2001:db8::1]:443" (IPv4-mapped IPv6 shown as IPv4)
    connects: int = 0
    retransmits: int = 0


@dataclass(frozen=True)
class PortHolder:
    """A process holding local ports of a network namespace (kernel counts since attach)."""

    pid: int
    open_connections: int  # its connect()ed sockets not yet closed
    recent_time_wait: int  # its closes into TIME_WAIT within the last TIME_WAIT length (60 s)


@dataclass(frozen=True)
class PortUsage:
    """Local ephemeral ports of one network namespace in use, TIME_WAIT included (/proc/PID/net/tcp*)."""

    netns: int  # inode of the network namespace
    range_lo: int  # net.ipv4.ip_local_port_range of that namespace (or the host's, see source)
    range_hi: int
    range_source: str  # "netns" (read inside it) or "host" (it could not be entered)
    ports_in_use: int  # distinct local ports within the range held by any TCP socket
    time_wait: int  # of the sockets in the range, those in TIME_WAIT
    busiest_remote: str  # the remote endpoint most of them connect to
    busiest_remote_ports: int
    holders: Sequence[PortHolder] = ()

    @property
    def range_size(self) -> int:
        return max(0, self.range_hi - self.range_lo + 1)


@dataclass(frozen=True)
class NetnsSegments:
    """TCP segments sent and retransmitted in one network namespace over one interval (/proc/PID/net/snmp)."""

    netns: int
    out_segs: int
    retrans_segs: int


@dataclass(frozen=True)
class NetTick:
    """What the network collector hands over each tick: deltas plus monotonic health counters."""

    total: NetCounts  # whole host (attributed or not), this interval
    by_tgid: Mapping[int, NetCounts]  # this interval, only keys that changed
    by_cgroup_id: Mapping[int, NetCounts]
    remotes: Sequence[
        tuple[int, int, str, int, int]
    ]  # (tgid, cgroup id, remote, connects, retransmits)
    ports: Sequence[PortUsage] = ()  # namespaces whose port use was measured this tick
    segments: Mapping[int, NetnsSegments] = field(default_factory=dict)  # by tgid with retransmits
    aggregation_overflows: int = 0  # monotonic: map inserts refused (map full)
    untracked_closes: int = 0  # monotonic: closes of sockets opened before attach
    unowned_closes: int = 0  # monotonic: accepted sockets closed before their holder was known
    unattributed_retransmits: int = 0  # monotonic: retransmits on sockets with no known owner
    other_protocols: int = 0  # monotonic: MPTCP/SCTP state changes, not counted


@dataclass(frozen=True)
class Counters:
    """Monotonic daemon-wide counters, exported as-is (never reset while running)."""

    events: int = 0  # process-lifecycle events counted in the kernel
    dropped_events: int = 0  # records the kernel could not hand over (ring/perf buffer full)
    aggregation_overflows: int = 0  # kernel map updates that failed because a map was full
    untracked_exits: int = 0  # exits whose creation was not seen (lifetime unknown)
    evicted_processes: int = 0  # processes dropped from the model by its cap
    evicted_cgroups: int = 0
    unresolved_cgroups: int = 0  # cgroup ids seen that no path could be found for
    alerts: int = 0
    suppressed_alerts: int = 0  # repeat findings held back by a cooldown
    sink_drops: int = 0  # alerts a slow sink could not take (bounded queue full)


@dataclass(frozen=True)
class Snapshot:
    """The whole host at one tick: the only input the detectors get."""

    ts: float  # monotonic
    wall: float  # epoch
    interval_s: float  # time since the previous snapshot
    ncpu: int
    processes: Mapping[int, ProcessSample]
    # Kernel-aggregated lifecycle counts over this interval.
    total: LifecycleCounts
    by_parent: Mapping[int, LifecycleCounts]  # by creator tgid
    by_cgroup: Mapping[str, LifecycleCounts]  # by cgroup path
    cgroups: Mapping[str, CgroupSample]  # by cgroup path
    system_pressure: Mapping[str, PsiSample]  # by resource
    cpu_util_pct: float  # whole-host busy share over the interval, 0-100
    file_nr: int = 0  # allocated file handles (/proc/sys/fs/file-nr first field)
    file_max: int = 0
    mem_available_bytes: int = 0  # /proc/meminfo MemAvailable (0 = unknown)
    exits: Sequence[ExitRecord] = ()  # exit records that arrived during this interval
    stall: StallSnapshot | None = None
    # Pids whose sample was rebuilt this interval (ran, stopped running, re-read, appeared).
    # None: every sample is fresh (the /proc fallback, synthetic snapshots). A process not in
    # `changed` used no CPU in the interval and its sample is the same object as before.
    changed: frozenset[int] | None = None
    # TCP connections (bpf/net.c, only when a network rule is enabled), this interval.
    net_total: NetCounts | None = None
    net_by_pid: Mapping[int, NetCounts] = field(default_factory=dict)  # only pids with events
    net_by_cgroup: Mapping[str, NetCounts] = field(default_factory=dict)
    net_remotes: Sequence[RemoteSample] = ()
    net_ports: Sequence[PortUsage] = ()  # network namespaces whose port use was measured
    net_segments: Mapping[int, NetnsSegments] = field(default_factory=dict)  # by pid

    def slim(self) -> Snapshot:
        """This snapshot as an older member of the window: only the processes it changed.

        A process absent from a slim snapshot used no CPU in that interval and had the
        memory, threads and fds of its next newer sample; the window keeps full maps only for
        the newest snapshot, so memory grows with activity, not with the number of processes.
        """
        if self.changed is None or len(self.changed) == len(self.processes):
            return self
        procs = self.processes
        return replace(self, processes={pid: procs[pid] for pid in self.changed if pid in procs})


@dataclass(frozen=True)
class Culprit:
    """What an alert blames. Fields that do not apply are None."""

    kind: str  # "process", "tree", "cgroup", "system"
    pid: int | None = None
    comm: str | None = None
    cgroup: str | None = None
    unit: str | None = None
    parent_pid: int | None = None
    parent_comm: str | None = None
    root_pid: int | None = None  # subtree root for tree-shaped culprits
    # Names of the cgroup's owner, filled in after detection (names.AlertNamer), when known.
    pod: str | None = None
    namespace: str | None = None
    container: str | None = None
    container_id: str | None = None
    image: str | None = None

    @staticmethod
    def from_fields(d: Mapping[str, Any]) -> Culprit:
        """The culprit in a flat alert record (Alert.to_dict, a D-Bus alert's details)."""
        fields = {k: d.get(k) for k in CULPRIT_FIELDS if k != "kind"}
        return Culprit(kind=str(d.get("kind", "process")), **fields)

    def label(self) -> str:
        """Human-readable name, most specific first: 'stress-ng[1234] in foo.service'."""
        named = owner_label(self.pod, self.namespace, self.container)
        who = (
            f"{self.comm}[{self.pid}]"
            if self.pid is not None
            else (named or self.unit or self.cgroup or "host")
        )
        where = named or self.unit or self.cgroup
        if self.pid is not None and where:
            return f"{who} in {where}"
        return who


@dataclass(frozen=True)
class Finding:
    """A detector's verdict for one culprit at one tick (before cooldown/incident handling)."""

    rule: str
    key: str  # identity of the culprit for cooldown, e.g. "pid:1234:98765" or "cgroup:/foo"
    severity: str  # "info", "notice", "warning", "critical"
    summary: str
    culprit: Culprit
    evidence: Mapping[str, Any]


@dataclass(frozen=True)
class Alert:
    """One alert as every sink sees it: a firing incident or its resolution."""

    id: str  # unique per alert record
    incident: str  # shared by the firing record and its resolved record
    rule: str
    severity: str
    state: str  # "firing" or "resolved"
    ts: float  # epoch seconds
    summary: str
    culprit: Culprit
    evidence: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready form used by the stdout, journald, D-Bus and history sinks."""
        c = self.culprit
        return {
            "id": self.id,
            "incident": self.incident,
            "rule": self.rule,
            "severity": self.severity,
            "state": self.state,
            "ts": self.ts,
            "summary": self.summary,
            **{k: getattr(c, k) for k in CULPRIT_FIELDS},
            "evidence": dict(self.evidence),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Alert:
        return Alert(
            id=d["id"],
            incident=d["incident"],
            rule=d["rule"],
            severity=d["severity"],
            state=d["state"],
            ts=float(d["ts"]),
            summary=d["summary"],
            culprit=Culprit.from_fields(d),
            evidence=dict(d.get("evidence") or {}),
        )
