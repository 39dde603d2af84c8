"""cgroup v2 ids -> paths, owners (unit, container, pod) from paths, and per-cgroup counters."""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..health import Health
from ..model import CgroupSample, Owner, PsiSample

UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
UNRESOLVED = "<unresolved>"

# Container scopes of the systemd cgroup driver: (pattern, runtime).
_SCOPE_CONTAINERS = (
    (re.compile(r"^docker-([0-9a-f]{12,64})\.scope$"), "docker"),
    (re.compile(r"^libpod-(?!conmon-)([0-9a-f]{12,64})\.scope$"), "podman"),
    (re.compile(r"^cri-containerd-([0-9a-f]{12,64})\.scope$"), "containerd"),
    (re.compile(r"^crio-(?!conmon-)([0-9a-f]{12,64})\.scope$"), "cri-o"),
)
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
# CRI-O under kubelet's cgroupfs driver: kubepods/<qos>/pod<uid>/crio-<id> (no .scope).
_CRIO_CGROUPFS = re.compile(r"^crio-(?!conmon-)([0-9a-f]{64})$")
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
_POD_SYSTEMD = re.compile(
    r"^kubepods(?:-burstable|-besteffort|-guaranteed)?-pod"
    r"([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice$"
)


def owner_of(path: str) -> Owner:
    """Who owns the cgroup at `path` (relative to the cgroup2 mount), from its name alone."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return Owner(kind="root", name="/")
    unit = next((p for p in reversed(parts) if p.endswith(UNIT_SUFFIXES)), None)
    pod_uid: str | None = None
    in_kubepods = False
    container: tuple[str, str, str | None] | None = None  # (name, id, runtime)
    for i, part in enumerate(parts):
        if part.startswith("kubepods"):
            in_kubepods = True
        m = _POD_SYSTEMD.match(part) or _POD_CGROUPFS.match(part)
        if m:
            # the systemd driver escapes '-' as '_' in slice names: turn them back
            pod_uid = m.group(1).replace("_", "-")
            continue
        for pattern, runtime in _SCOPE_CONTAINERS:
            sm = pattern.match(part)
            if sm:
                container = (part, sm.group(1), runtime)
                break
        else:
            cm = _CRIO_CGROUPFS.match(part)
            if cm and (pod_uid is not None or in_kubepods):
                container = (part, cm.group(1), "cri-o")
            elif _HEX_ID.match(part):
                prev = parts[i - 1] if i > 0 else ""
                if prev == "docker":
                    container = (part, part, "docker")
                elif pod_uid is not None or in_kubepods:
                    # cgroupfs driver: the runtime is not in the path
                    container = (part, part, None)
            elif part.startswith("libpod-") and i > 0 and parts[i - 1] == "libpod_parent":
                container = (part, part[len("libpod-") :], "podman")
    if container is not None:
        name, cid, container_runtime = container
        return Owner(
            "container",
            name,
            unit=unit,
            container_id=cid,
            runtime=container_runtime,
            pod_uid=pod_uid,
        )
    if pod_uid is not None:
        return Owner("pod", f"pod{pod_uid}", unit=unit, pod_uid=pod_uid)
    if unit is not None:
        return Owner("unit", unit, unit=unit)
    return Owner("unknown", path)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Mount point of the cgroup2 hierarchy (unified or hybrid), or None."""
    return _find_mount(mountinfo, lambda fstype, opts: fstype == "cgroup2")


def v1_memory_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Mount point of the cgroup v1 memory hierarchy, or None on a pure cgroup2 host."""
    return _find_mount(mountinfo, lambda fstype, opts: fstype == "cgroup" and "memory" in opts)


def _find_mount(mountinfo: str, want: Callable[[str, list[str]], bool]) -> str | None:
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            if fields[3] == "/" and want(rfields[0], rfields[2].split(",")):
                return fields[4].replace("\\040", " ")
    return None


LIMITS_REFRESH_S = 5.0  # memory.max/memory.high of a cgroup are re-read at most this often


@dataclass
class _CpuPrev:
    usage_us: int
    nr_throttled: int | None
    throttled_us: int | None


class CgroupResolver:
    """Maps cgroup ids (kernfs inode == bpf_get_current_cgroup_id()) to paths, bounded and lazy."""

    def __init__(
        self,
        max_cgroups: int = 4096,
        mount: str | None = None,
        min_rewalk_s: float = 1.0,
        v1_memory: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        found = mount or cgroup2_mount()
        if found is None:
            raise FileNotFoundError("no cgroup2 hierarchy mounted (see /proc/self/mountinfo)")
        self.mount: str = found.rstrip("/") or "/"
        self.v1_memory = v1_memory if v1_memory is not None else v1_memory_mount()
        self.max_cgroups = max_cgroups
        self.min_rewalk_s = min_rewalk_s
        self._clock = clock
        self._by_id: OrderedDict[int, str] = OrderedDict()  # LRU order: least recently used first
        self._by_path: dict[str, int] = {}
        self._pending: dict[int, float] = {}  # unknown id -> when it was first asked for
        self._unresolvable: OrderedDict[int, None] = OrderedDict()  # negative cache
        self._owners: dict[str, Owner] = {}
        self._cpu_prev: dict[str, _CpuPrev] = {}
        self._limits: dict[
            str, tuple[float, int | None, int | None]
        ] = {}  # path -> (read at, max, high)
        self._last_walk = -1e18
        self.walks = 0
        self.evicted = 0
        self.unresolved = 0

    def health(self) -> Health:
        return Health(
            counters={"walks": self.walks, "evicted": self.evicted, "unresolved": self.unresolved},
            gauges={"known": len(self._by_id)},
        )

    # ---- ids and paths ------------------------------------------------------------------

    def refresh(self) -> None:
        """Walk the cgroup2 tree now: learn new cgroups, forget removed ones."""
        started = self._clock()
        found: dict[int, str] = {}
        root_ino = os.stat(self.mount).st_ino
        found[root_ino] = "/"
        stack = [(self.mount, "")]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while walking
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    child = f"{rel}/{e.name}"
                    # kernfs reports the node id as d_ino, so no stat() per directory
                    found[e.inode()] = child
                    stack.append((e.path, child))
        self._last_walk = started
        self.walks += 1
        for cid in [c for c in self._by_id if c not in found]:
            self._forget(cid)
        for cid, path in found.items():
            if cid in self._by_id:
                if self._by_id[cid] != path:  # cgroup2 allows rename(2) within a parent
                    self._by_path.pop(self._by_id[cid], None)
                    self._by_id[cid] = path
                    self._by_path[path] = cid
            elif len(self._by_id) < self.max_cgroups or cid in self._pending:
                # past the cap only ids someone asked for are held; the rest stay on disk
                self._admit(cid, path)
        for cid, asked in list(self._pending.items()):
            if cid in self._by_id:
                del self._pending[cid]
            elif asked <= started:
                del self._pending[cid]
                self.unresolved += 1
                self._unresolvable[cid] = None
                while len(self._unresolvable) > self.max_cgroups:
                    self._unresolvable.popitem(last=False)

    def _admit(self, cid: int, path: str) -> None:
        self._by_id[cid] = path
        self._by_path[path] = cid
        while len(self._by_id) > self.max_cgroups:
            # least recently used first; the root is always held
            old = next((k for k, v in self._by_id.items() if v != "/"), cid)
            old_path = self._by_id.pop(old)
            self._by_path.pop(old_path, None)
            self._owners.pop(old_path, None)
            self._cpu_prev.pop(old_path, None)
            self._limits.pop(old_path, None)
            self.evicted += 1

    def _forget(self, cid: int) -> None:
        path = self._by_id.pop(cid)
        self._by_path.pop(path, None)
        self._owners.pop(path, None)
        self._cpu_prev.pop(path, None)
        self._limits.pop(path, None)

    def resolve(self, cgroup_id: int) -> str | None:
        """Path of a cgroup id; unknown ids trigger a (rate-limited) re-walk of the tree."""
        path = self._by_id.get(cgroup_id)
        if path is not None:
            self._by_id.move_to_end(cgroup_id)
            return path
        if cgroup_id in self._unresolvable:
            return None
        self._pending.setdefault(cgroup_id, self._clock())
        if self._clock() - self._last_walk >= self.min_rewalk_s:
            self.refresh()
            path = self._by_id.get(cgroup_id)
        return path

    def exists(self, cgroup_id: int) -> bool:
        """Whether a cgroup id this resolver knows still names a live cgroup: one stat of its
        path, no walk. An id it does not know counts as gone (it was never resolved, or was
        evicted past max_cgroups): what that costs a caller must be at most a re-count."""
        path = self._by_id.get(cgroup_id)
        if path is None:
            return False
        try:
            return os.stat(self.directory(path)).st_ino == cgroup_id
        except OSError:
            return False

    def id_of(self, path: str) -> int | None:
        """Id of the cgroup at `path` (stat when not known yet); None when it does not exist."""
        cid = self._by_path.get(path)
        if cid is not None:
            self._by_id.move_to_end(cid)
            return cid
        try:
            cid = os.stat(self.directory(path)).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None
        self._pending.pop(cid, None)
        self._unresolvable.pop(cid, None)
        self._admit(cid, path)
        return cid

    def directory(self, path: str) -> str:
        return self.mount if path == "/" else self.mount + path

    def owner(self, path: str) -> Owner:
        owner = self._owners.get(path)
        if owner is None:
            owner = owner_of(path)
            if path in self._by_path:  # cache only what the cap holds
                self._owners[path] = owner
        return owner

    def __len__(self) -> int:
        return len(self._by_id)

    # ---- per-cgroup counters ------------------------------------------------------------

    def sample(
        self,
        path: str,
        pressure: Mapping[str, PsiSample],
        v1_memory_path: str | None = None,
    ) -> CgroupSample | None:
        """Memory and cpu.stat deltas of one cgroup; None when it no longer exists."""
        cid = self.id_of(path)
        if cid is None:
            return None
        directory = self.directory(path)
        memory = _read_int(directory + "/memory.current")
        if memory is None and self.v1_memory is not None and v1_memory_path is not None:
            base = self.v1_memory if v1_memory_path == "/" else self.v1_memory + v1_memory_path
            memory = _read_int(base + "/memory.usage_in_bytes")
        cpu_usage = nr_thr = thr_us = None
        stat = _read_keyed(directory + "/cpu.stat")
        if stat is not None and "usage_usec" in stat:
            now = _CpuPrev(stat["usage_usec"], stat.get("nr_throttled"), stat.get("throttled_usec"))
            prev = self._cpu_prev.get(path)
            if path in self._by_path:
                self._cpu_prev[path] = now
            if prev is not None:
                cpu_usage = max(0, now.usage_us - prev.usage_us)
                nr_thr = _delta(now.nr_throttled, prev.nr_throttled)
                thr_us = _delta(now.throttled_us, prev.throttled_us)
        memory_max, memory_high = self.memory_limits(path)
        return CgroupSample(
            id=cid,
            path=path,
            owner=self.owner(path),
            pressure=dict(pressure),
            memory_bytes=memory,
            cpu_usage_us=cpu_usage,
            nr_throttled=nr_thr,
            throttled_us=thr_us,
            memory_max_bytes=memory_max,
            memory_high_bytes=memory_high,
        )

    def memory_limits(self, path: str) -> tuple[int | None, int | None]:
        """Effective memory.max and memory.high of a cgroup: the lowest set on its path (None: "max").

        Limits change rarely: each path is re-read at most every LIMITS_REFRESH_S.
        """
        now = self._clock()
        cached = self._limits.get(path)
        if cached is not None and now - cached[0] < LIMITS_REFRESH_S:
            return cached[1], cached[2]
        lowest: list[int | None] = [None, None]
        p = path
        while p.startswith("/") and p != "/":  # the root cgroup has no memory.max or memory.high
            directory = self.directory(p)
            for i, name in enumerate(("memory.max", "memory.high")):
                v = _read_limit(f"{directory}/{name}")
                if v is not None and (lowest[i] is None or v < lowest[i]):  # type: ignore[operator]
                    lowest[i] = v
            p = p.rsplit("/", 1)[0] or "/"
        if path in self._by_path:  # cache only what the cap holds
            self._limits[path] = (now, lowest[0], lowest[1])
        return lowest[0], lowest[1]


def _delta(now: int | None, prev: int | None) -> int | None:
    if now is None or prev is None:
        return None
    return max(0, now - prev)


def _read_limit(path: str) -> int | None:
    """A memory.max/memory.high value; None for "max", a missing file or garbage."""
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _read_keyed(path: str) -> dict[str, int] | None:
    try:
        with open(path, "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in data.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out
