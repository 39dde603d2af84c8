"""Names people use for a cgroup's owner: pod, namespace, container and image, from the node's files.

No API server and no runtime socket: the files containerd, CRI-O, Docker, Podman and kubelet
already keep on the node, read-only and size-bounded:

- containerd's OCI bundles, run/containerd/io.containerd.runtime.v2.task/<ns>/<id>/config.json
  (k3s: run/k3s/containerd/...): annotations io.kubernetes.cri.sandbox-name, -namespace, -uid,
  container-name, container-type, image-name;
- CRI-O's bundles, run/containers/storage/overlay-containers/<id>/userdata/config.json:
  annotations io.kubernetes.pod.name, .pod.namespace, .pod.uid, .container.name;
- containers/storage's containers.json (Podman and CRI-O): names and metadata (image-name);
- Docker's var/lib/docker/containers/<id>/config.v2.json: Name, Config.Image, Config.Labels;
- kubelet's log directories var/log/pods/<namespace>_<pod>_<uid>/ and the links
  var/log/containers/<pod>_<namespace>_<container>-<id>.log, when no runtime file says more.

Resolution is lazy (only cgroups an alert or a query names), cached per cgroup path, dropped
when the cgroup goes away or is re-created, bounded, and every failure is counted (health()).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import json
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .collector.cgroups import owner_of
from .health import Health
from .model import Alert, Names, Owner

MAX_FILE_BYTES = 1 << 20  # a runtime file bigger than this is not read (counted as too_large)
MAX_STATE_BYTES = 16 << 20  # containers.json holds every container of the node
MAX_DIR_ENTRIES = 10_000  # entries read from one directory listing (more: counted, cut)
MAX_NAME_CHARS = 253  # the longest Kubernetes name (a DNS subdomain)
CACHE_ENTRIES = 2048  # cgroup paths whose names are held
INCIDENTS = 10_000  # open incidents whose names are remembered for their resolved record
RETRY_UNNAMED_S = 30.0  # a cgroup no file named is looked at again after this long

CONTAINERD_TASKS = (
    "run/containerd/io.containerd.runtime.v2.task",
    "run/k3s/containerd/io.containerd.runtime.v2.task",
)
CRIO_RUN = "run/containers/storage/overlay-containers"
STORAGE_STATE = (
    "var/lib/containers/storage/overlay-containers/containers.json",
    "run/containers/storage/overlay-containers/volatile-containers.json",
)
DOCKER_CONTAINERS = "var/lib/docker/containers"
KUBELET_PODS = "var/log/pods"
KUBELET_CONTAINERS = "var/log/containers"

_ID = re.compile(r"^[0-9a-f]{64}\Z")
_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_CONTAINER_LOG = re.compile(r"^(?P<pod>[^_]+)_(?P<ns>[^_]+)_(?P<c>.+)-(?P<id>[0-9a-f]{64})\.log\Z")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@functools.lru_cache(maxsize=8192)
def _owner(cgroup: str) -> Owner:
    """owner_of() is pure: a live top asks about the same few hundred paths every second."""
    return owner_of(cgroup)


def clean(value: Any) -> str | None:
    """A name as reported: a string, control characters replaced, at most MAX_NAME_CHARS."""
    if not isinstance(value, str):
        return None
    value = _UNPRINTABLE.sub("?", value.strip())[:MAX_NAME_CHARS]
    return value or None


class _Failed(Exception):
    """A runtime file that exists and could not be used; `kind` is the health counter."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def read_bounded(path: str, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """A regular file's bytes, never more than `limit` read; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise _Failed("unreadable") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Failed("malformed")
        if st.st_size > limit:
            raise _Failed("too_large")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:  # grew while read
            raise _Failed("too_large")
        return data
    except OSError:
        raise _Failed("unreadable") from None
    finally:
        os.close(fd)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Failed("malformed") from None


def _annotations(doc: Any) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise _Failed("malformed")
    ann = doc.get("annotations")
    return ann if isinstance(ann, dict) else {}


@dataclass(frozen=True)
class _Entry:
    names: Names | None
    inode: int | None  # the cgroup directory's inode when resolved: a new cgroup, new names
    at: float


class NameResolver:
    """Cgroup path -> Names from the node's runtime and kubelet files (lazy, cached, bounded)."""

    def __init__(
        self,
        root: str = "/",
        cgroup_dir: Callable[[str], str] | None = None,
        max_entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self._cgroup_dir = cgroup_dir
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._listings: dict[str, tuple[int, dict[str, Any]]] = {}  # dir -> (mtime_ns, parsed)
        self._state: dict[str, tuple[tuple[int, int], dict[str, dict[str, Any]]]] = {}
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "lookups",
                "cache_hits",
                "named",
                "unnamed",
                "invalidated",
                "evicted",
                "too_large",
                "malformed",
                "unreadable",
                "listings_cut",
            ),
            0,
        )

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def health(self) -> Health:
        """Monotonic counters (lookups, hits, named, unnamed, failures by kind) and the cache size."""
        return Health(counters=dict(self.counts), gauges={"cached": len(self._cache)})

    # ---- the cache ----------------------------------------------------------------------

    def names(self, cgroup: str) -> Names | None:
        """Names of the owner of cgroup `cgroup` (path below the cgroup2 mount), None when none known."""
        owner = _owner(cgroup)
        if owner.container_id is None and owner.pod_uid is None:
            return None  # a unit, a session, the root: nothing to look up
        self.counts["lookups"] += 1
        inode = self._inode(cgroup)
        now = self._clock()
        entry = self._cache.get(cgroup)
        if entry is not None:
            fresh = entry.names is not None or now - entry.at < RETRY_UNNAMED_S
            if entry.inode == inode and inode is not None and fresh:
                self._cache.move_to_end(cgroup)
                self.counts["cache_hits"] += 1
                return entry.names
            del self._cache[cgroup]
            if entry.inode != inode:
                self.counts["invalidated"] += 1  # removed or re-created since
        names = self.resolve(cgroup)
        self.counts["named" if names is not None else "unnamed"] += 1
        if inode is not None:  # a cgroup that is gone is not held
            self._cache[cgroup] = _Entry(names, inode, now)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
                self.counts["evicted"] += 1
        return names

    def _inode(self, cgroup: str) -> int | None:
        if self._cgroup_dir is None:
            return 0  # no cgroup tree to check against (tests of the files alone)
        try:
            return os.stat(self._cgroup_dir(cgroup)).st_ino
        except OSError:
            return None

    # ---- resolution ---------------------------------------------------------------------

    def resolve(self, cgroup: str) -> Names | None:
        """Read the files for one cgroup now (no cache): None when it is no pod or container."""
        owner = _owner(cgroup)
        cid = owner.container_id if owner.container_id and _ID.match(owner.container_id) else None
        if cid is None and owner.pod_uid is None:
            return None
        found: dict[str, Any] = {
            "container_id": cid,
            "pod_uid": owner.pod_uid,
            "runtime": owner.runtime,
        }
        if cid is not None:
            for source in (self._containerd, self._crio, self._docker, self._storage):
                if source is self._docker and owner.runtime not in (None, "docker"):
                    continue
                got = self._guarded(source, cid)
                if got:
                    for k, v in got.items():
                        if v is not None and found.get(k) is None:
                            found[k] = v
                    if found.get("container") and (
                        found.get("pod") or found.get("pod_uid") is None
                    ):
                        break
            if not found.get("container") or not found.get("pod"):
                kc = self._guarded(self._kubelet_container, cid)
                for k, v in (kc or {}).items():
                    if found.get(k) is None:
                        found[k] = v
        uid = found.get("pod_uid")
        if uid and not (found.get("pod") and found.get("namespace")):
            kp = self._guarded(self._kubelet_pod, uid)
            for k, v in (kp or {}).items():
                if found.get(k) is None:
                    found[k] = v
        names = Names(**{k: clean(v) for k, v in found.items()})
        if names.pod is None and names.container is None:
            return None
        return names

    def _guarded(
        self, source: Callable[[str], dict[str, Any] | None], key: str
    ) -> dict[str, Any] | None:
        try:
            return source(key)
        except _Failed as exc:
            self.counts[exc.kind] += 1
            return None

    def _containerd(self, cid: str) -> dict[str, Any] | None:
        for tasks in CONTAINERD_TASKS:
            base = self._path(tasks)
            namespaces = self._list(base)
            # kubelet's namespace first; then moby (Docker >= 20 runs on containerd), default, ...
            for ns in sorted(namespaces, key=lambda n: (n != "k8s.io", n)):
                data = read_bounded(os.path.join(base, ns, cid, "config.json"))
                if data is None:
                    continue
                ann = _annotations(_json(data))
                out: dict[str, Any] = {
                    "pod": ann.get("io.kubernetes.cri.sandbox-name"),
                    "namespace": ann.get("io.kubernetes.cri.sandbox-namespace"),
                    "pod_uid": ann.get("io.kubernetes.cri.sandbox-uid"),
                    "image": ann.get("io.kubernetes.cri.image-name"),
                    "runtime": "containerd",
                }
                if ann.get("io.kubernetes.cri.container-type") == "sandbox":
                    out["container"] = "POD"  # the pause container, as kubelet calls it
                else:
                    out["container"] = ann.get("io.kubernetes.cri.container-name") or ann.get(
                        "nerdctl/name"
                    )
                return out
        return None

    def _crio(self, cid: str) -> dict[str, Any] | None:
        data = read_bounded(self._path(os.path.join(CRIO_RUN, cid, "userdata", "config.json")))
        if data is None:
            return None
        ann = _annotations(_json(data))
        if not (ann.get("io.kubernetes.pod.name") or ann.get("io.kubernetes.container.name")):
            return None  # not a pod's (Podman's bundles carry io.kubernetes.cri-o.* too)
        return {
            "pod": ann.get("io.kubernetes.pod.name"),
            "namespace": ann.get("io.kubernetes.pod.namespace"),
            "pod_uid": ann.get("io.kubernetes.pod.uid"),
            "container": ann.get("io.kubernetes.container.name")
            or ("POD" if ann.get("io.kubernetes.cri-o.ContainerType") == "sandbox" else None),
            "image": ann.get("io.kubernetes.cri-o.ImageName"),
            "runtime": "cri-o",
        }

    def _docker(self, cid: str) -> dict[str, Any] | None:
        data = read_bounded(self._path(os.path.join(DOCKER_CONTAINERS, cid, "config.v2.json")))
        if data is None:
            return None
        doc = _json(data)
        if not isinstance(doc, dict):
            raise _Failed("malformed")
        config: dict[str, Any] = doc["Config"] if isinstance(doc.get("Config"), dict) else {}
        labels: dict[str, Any] = config["Labels"] if isinstance(config.get("Labels"), dict) else {}
        name = doc.get("Name")
        return {
            # cri-dockerd labels its containers like dockershim did
            "pod": labels.get("io.kubernetes.pod.name"),
            "namespace": labels.get("io.kubernetes.pod.namespace"),
            "pod_uid": labels.get("io.kubernetes.pod.uid"),
            "container": labels.get("io.kubernetes.container.name")
            or (name.lstrip("/") if isinstance(name, str) else None),
            "image": config.get("Image"),
            "runtime": "docker",
        }

    def _storage(self, cid: str) -> dict[str, Any] | None:
        """containers/storage's record (Podman, CRI-O): the container's name and image."""
        for rel in STORAGE_STATE:
            record = self._storage_records(self._path(rel)).get(cid)
            if record is None:
                continue
            meta: Any = record.get("metadata")
            try:
                meta = json.loads(meta) if isinstance(meta, str) else {}
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            names = record.get("names")
            name = names[0] if isinstance(names, list) and names else meta.get("name")
            out: dict[str, Any] = {"container": name, "image": meta.get("image-name")}
            if meta.get("pod-name"):  # CRI-O: the name is k8s_<container>_<pod>_<ns>_<uid>_<n>
                parts = str(name or "").split("_")
                out.update(pod=meta.get("pod-name"), runtime="cri-o")
                out["container"] = parts[1] if len(parts) >= 6 and parts[0] == "k8s" else None
                if len(parts) >= 6:
                    out["namespace"], out["pod_uid"] = parts[3], parts[4]
            else:
                out["runtime"] = "podman"
            return out
        return None

    def _storage_records(self, path: str) -> dict[str, dict[str, Any]]:
        """containers.json by container id, parsed again only when the file changed."""
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                self._state.pop(path, None)
                return {}
            raise _Failed("unreadable") from None
        key = (st.st_mtime_ns, st.st_size)
        held = self._state.get(path)
        if held is not None and held[0] == key:
            return held[1]
        data = read_bounded(path, MAX_STATE_BYTES)
        doc = _json(data) if data is not None else []
        if not isinstance(doc, list):
            raise _Failed("malformed")
        records = {r["id"]: r for r in doc if isinstance(r, dict) and isinstance(r.get("id"), str)}
        self._state[path] = (key, records)
        return records

    def _kubelet_container(self, cid: str) -> dict[str, Any] | None:
        """var/log/containers/<pod>_<namespace>_<container>-<id>.log: kubelet's own naming."""
        by_id = self._listing(self._path(KUBELET_CONTAINERS), _container_logs)
        return by_id.get(cid)

    def _kubelet_pod(self, uid: str) -> dict[str, Any] | None:
        """var/log/pods/<namespace>_<pod>_<uid>/: pod and namespace from the uid."""
        by_uid = self._listing(self._path(KUBELET_PODS), _pod_dirs)
        return by_uid.get(uid)

    def _list(self, directory: str) -> list[str]:
        try:
            with os.scandir(directory) as it:
                out: list[str] = []
                for entry in it:
                    if len(out) >= MAX_DIR_ENTRIES:
                        self.counts["listings_cut"] += 1
                        break
                    out.append(entry.name)
                return out
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return []
            raise _Failed("unreadable") from None

    def _listing(
        self, directory: str, parse: Callable[[Iterable[str]], dict[str, Any]]
    ) -> dict[str, Any]:
        """A directory's parsed listing, read again only when the directory changed."""
        try:
            mtime = os.stat(directory).st_mtime_ns
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return {}
            raise _Failed("unreadable") from None
        held = self._listings.get(directory)
        if held is not None and held[0] == mtime:
            return held[1]
        parsed = parse(self._list(directory))
        self._listings[directory] = (mtime, parsed)
        return parsed


def _container_logs(entries: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in entries:
        m = _CONTAINER_LOG.match(name)
        if m:
            out[m.group("id")] = {
                "pod": m.group("pod"),
                "namespace": m.group("ns"),
                "container": m.group("c"),
            }
    return out


def _pod_dirs(entries: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in entries:
        ns, _, rest = name.partition("_")
        pod, _, uid = rest.rpartition("_")
        if ns and pod and _UID.match(uid):
            out[uid] = {"pod": pod, "namespace": ns}
    return out


# ---- alerts -----------------------------------------------------------------------------


class AlertNamer:
    """Puts names on alerts after detection: culprit fields, victims in the evidence, the summary.

    The detectors stay pure and name cgroups by unit or path; this step, at the edge, looks up
    only the cgroups an alert names. A resolved record reuses the names its firing record got
    (the container may be gone by then).
    """

    def __init__(self, resolver: NameResolver, max_incidents: int = INCIDENTS) -> None:
        self.resolver = resolver
        self.max_incidents = max_incidents
        self._incidents: OrderedDict[str, dict[str, Names]] = OrderedDict()

    def name(self, alert: Alert) -> Alert:
        known = self._incidents.get(alert.incident)
        if known is None:
            known = {}
            for path in _cgroups_in(alert):
                names = self.resolver.names(path)
                if names is not None:
                    known[path] = names
            if alert.state == "firing":
                self._incidents[alert.incident] = known
                while len(self._incidents) > self.max_incidents:
                    self._incidents.popitem(last=False)
        if alert.state == "resolved":
            self._incidents.pop(alert.incident, None)
        if not known:
            return alert
        return apply_names(alert, known)


# Evidence keys naming another cgroup of the story (a stall's victim, a contention's other side).
PARTIES = ("victim", "contender")


def _cgroups_in(alert: Alert) -> list[str]:
    """The cgroups an alert names: its culprit's, the victim's, and those in evidence rows."""
    out: list[str] = []
    if alert.culprit.cgroup:
        out.append(alert.culprit.cgroup)
    ev = alert.evidence
    for key in ("victim", "contender", "cgroup"):
        if isinstance(ev.get(key), str):
            out.append(ev[key])
    for value in ev.values():
        if isinstance(value, list):
            out.extend(
                row["cgroup"]
                for row in value
                if isinstance(row, dict) and isinstance(row.get("cgroup"), str)
            )
    return list(dict.fromkeys(p for p in out if p.startswith("/")))


def row_names(names: Names | None, prefix: str = "") -> dict[str, str]:
    """pod, namespace and container of a row's cgroup (those known), keys prefixed."""
    if names is None:
        return {}
    pairs = (("pod", names.pod), ("namespace", names.namespace), ("container", names.container))
    return {prefix + k: v for k, v in pairs if v is not None}


def apply_names(alert: Alert, known: Mapping[str, Names]) -> Alert:
    """The alert with names: culprit fields, victim_* and per-row names in evidence, summary labels."""
    c = alert.culprit
    culprit = c
    own = known.get(c.cgroup or "")
    if own is not None:
        culprit = replace(
            c,
            pod=own.pod,
            namespace=own.namespace,
            container=own.container,
            container_id=own.container_id,
            image=own.image,
        )
    evidence = dict(alert.evidence)
    for party in PARTIES:
        path = evidence.get(party)
        if isinstance(path, str):
            evidence.update(row_names(known.get(path), f"{party}_"))
    for key, value in list(evidence.items()):
        if isinstance(value, list):
            evidence[key] = [
                {**row, **row_names(known.get(row["cgroup"]))}
                if isinstance(row, dict) and isinstance(row.get("cgroup"), str)
                else row
                for row in value
            ]
    return replace(
        alert,
        culprit=culprit,
        evidence=evidence,
        summary=relabel(alert.summary, known),
    )


def relabel(summary: str, known: Mapping[str, Names]) -> str:
    """The summary with each named cgroup's path, or its own scope's unit name, as a name."""
    labels: dict[str, str] = {}
    for path, names in known.items():
        label = names.label()
        if label is None:
            continue
        labels[path] = label
        owner = _owner(path)
        unit = owner.unit
        # only a unit that is this container's or pod's own (its id is in the name) stands for it
        marks = [m for m in (names.container_id, owner.pod_uid) if m]
        if unit and any(m[:12] in unit or m.replace("-", "_") in unit for m in marks):
            labels.setdefault(unit, label)
    if not labels:
        return summary
    pattern = re.compile(
        r"(?<![\w/.-])("
        + "|".join(re.escape(k) for k in sorted(labels, key=len, reverse=True))
        + r")(?![\w/.-])"
    )
    return pattern.sub(lambda m: labels[m.group(1)], summary)


# ---- queries: --namespace, --pod, --container, --unit -----------------------------------

FILTER_KEYS = ("namespace", "pod", "container", "unit", "rule")


class QueryError(ValueError):
    """A query argument that is not acceptable; the message names it."""


@dataclass(frozen=True)
class RowFilter:
    """Which rows a query keeps: exact namespace, pod/container/unit globs (fnmatch), rule."""

    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    unit: str | None = None
    rule: str | None = None

    @staticmethod
    def parse(where: Mapping[str, str]) -> RowFilter:
        unknown = sorted(set(where) - set(FILTER_KEYS))
        if unknown:
            raise QueryError(f"unknown filter {unknown[0][:40]!r}: use {', '.join(FILTER_KEYS)}")
        for key, value in where.items():
            if (
                not isinstance(value, str)
                or len(value) > MAX_NAME_CHARS
                or _UNPRINTABLE.search(value)
            ):
                raise QueryError(
                    f"filter {key} must be a name of at most {MAX_NAME_CHARS} characters"
                )
        return RowFilter(**{k: v for k, v in where.items() if v})

    def __bool__(self) -> bool:
        return any((self.namespace, self.pod, self.container, self.unit, self.rule))

    def owner(self, names: Names | None, unit: str | None) -> bool:
        """True when one owner (its names and unit) passes every filter but the rule."""
        if self.namespace is not None and (names is None or names.namespace != self.namespace):
            return False
        if self.pod is not None and (
            names is None or names.pod is None or not fnmatch.fnmatchcase(names.pod, self.pod)
        ):
            return False
        if self.container is not None and (
            names is None
            or names.container is None
            or not fnmatch.fnmatchcase(names.container, self.container)
        ):
            return False
        return self.unit is None or (unit is not None and _unit_matches(unit, self.unit))


def _unit_matches(unit: str, pattern: str) -> bool:
    """A glob when it has glob characters, else a case-insensitive substring (as top's / key)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(unit, pattern)
    return pattern.lower() in unit.lower()


def alert_matches(alert: Alert, filt: RowFilter) -> bool:
    """True when the alert's culprit, its victim or its contender passes the filter (and rule)."""
    if filt.rule is not None and alert.rule != filt.rule:
        return False
    c = alert.culprit
    own = Names(pod=c.pod, namespace=c.namespace, container=c.container)
    if filt.owner(own, c.unit):
        return True
    ev = alert.evidence
    for party in PARTIES:
        if not isinstance(ev.get(party), str):
            continue
        names = Names(
            pod=ev.get(f"{party}_pod"),
            namespace=ev.get(f"{party}_namespace"),
            container=ev.get(f"{party}_container"),
        )
        unit = ev.get(f"{party}_unit")
        if filt.owner(names, unit if isinstance(unit, str) else None):
            return True
    return False
