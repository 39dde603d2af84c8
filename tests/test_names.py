"""Pod, namespace and container names from the runtimes' and kubelet's files, laid out as they write them.

Every runtime file here is a real file in a temporary node root, shaped like the one containerd,
CRI-O, Docker, Podman (containers/storage) and kubelet write; the cgroups of the cache tests are
real directories in the real cgroup2 tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from linnixd.collector.cgroups import cgroup2_mount, owner_of
from linnixd.model import Alert, Culprit, Names
from linnixd.names import (
    MAX_FILE_BYTES,
    AlertNamer,
    NameResolver,
    QueryError,
    RowFilter,
    alert_matches,
    read_bounded,
    relabel,
)

POD_UID = "3f6d1b2a-8c4e-4b1f-9a7d-2e5c6b7a8d90"
CRIO_UID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
CID = "4f2c" + "a" * 60
SANDBOX = "5e1d" + "b" * 60
CRIO_CID = "9c0b" + "c" * 60
DOCKER_CID = "7d3e" + "d" * 60
PODMAN_CID = "c4e8ac5a1a485da5317b1af9cbc0bccd2597dc6fa563dac71b6639639c186aaf"
IMAGE_ID = "0deb079ac5029de854c4cebac4c54922ec9b4dd796bdc18ae0f01385418b226e"

# kubelet's systemd driver: '-' in the pod uid becomes '_' in the slice name
SYSTEMD_POD = (
    "/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice"
)
SYSTEMD_CONTAINER = f"{SYSTEMD_POD}/cri-containerd-{CID}.scope"
CGROUPFS_CRIO = f"/kubepods/besteffort/pod{CRIO_UID}/crio-{CRIO_CID}"
CGROUPFS_CONTAINERD = f"/kubepods/burstable/pod{POD_UID}/{CID}"


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def oci_spec(annotations: dict[str, str], cgroups_path: str) -> dict[str, Any]:
    """An OCI runtime config.json as runtimes write it (trimmed to the fields that matter)."""
    return {
        "ociVersion": "1.1.0",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["/app"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "hostname": "api-7d9f8c6b5-x2x9z",
        "annotations": annotations,
        "linux": {"cgroupsPath": cgroups_path, "namespaces": [{"type": "pid"}]},
    }


def containerd_bundle(root: Path, cid: str, annotations: dict[str, str], base: str = "") -> Path:
    task = base or "run/containerd/io.containerd.runtime.v2.task"
    return write(
        root / task / "k8s.io" / cid / "config.json",
        oci_spec(
            annotations,
            f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice:cri-containerd:{cid}",
        ),
    )


def containerd_container(root: Path, cid: str = CID, base: str = "") -> Path:
    return containerd_bundle(
        root,
        cid,
        {
            "io.kubernetes.cri.container-name": "api",
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.image-name": "registry.example/payments/api:1.4.2",
            "io.kubernetes.cri.sandbox-id": SANDBOX,
            "io.kubernetes.cri.sandbox-name": "api-7d9f8c6b5-x2x9z",
            "io.kubernetes.cri.sandbox-namespace": "payments",
            "io.kubernetes.cri.sandbox-uid": POD_UID,
        },
        base,
    )


def crio_container(root: Path) -> Path:
    return write(
        root / "run/containers/storage/overlay-containers" / CRIO_CID / "userdata/config.json",
        oci_spec(
            {
                "io.kubernetes.container.name": "checkout",
                "io.kubernetes.cri-o.ContainerType": "container",
                "io.kubernetes.cri-o.ImageName": "registry.example/shop/checkout:2.0",
                "io.kubernetes.cri-o.Name": f"k8s_checkout_checkout-6c8d_shop_{CRIO_UID}_0",
                "io.kubernetes.pod.name": "checkout-6c8d",
                "io.kubernetes.pod.namespace": "shop",
                "io.kubernetes.pod.uid": CRIO_UID,
            },
            f"/kubepods/besteffort/pod{CRIO_UID}/crio-{CRIO_CID}",
        ),
    )


def podman_state(root: Path, cid: str = PODMAN_CID, name: str = "web") -> Path:
    """containers/storage's containers.json as podman 4.3 wrote it on this host."""
    meta = {"image-name": "localhost/linnix-probe:1", "image-id": IMAGE_ID, "name": name}
    return write(
        root / "var/lib/containers/storage/overlay-containers/containers.json",
        [
            {
                "id": cid,
                "names": [name],
                "image": IMAGE_ID,
                "layer": "516c8db9baedaadb2b5931144d42896e7b3f1603748b51ed686a094696e235a2",
                "metadata": json.dumps(meta),
                "created": "2026-12-03T04:12:36.539492196Z",
                "flags": {"MountLabel": "", "ProcessLabel": ""},
            }
        ],
    )


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return tmp_path


# ---- each runtime's files -------------------------------------------------------------


def test_containerd_systemd_driver(node: Path) -> None:
    containerd_container(node)
    names = NameResolver(str(node)).resolve(SYSTEMD_CONTAINER)
    assert names == Names(
        pod="api-7d9f8c6b5-x2x9z",
        namespace="payments",
        pod_uid=POD_UID,
        container="api",
        container_id=CID,
        image="registry.example/payments/api:1.4.2",
        runtime="containerd",
    )
    assert names.label() == "pod payments/api-7d9f8c6b5-x2x9z (container api)"


def test_containerd_cgroupfs_driver_and_k3s(node: Path) -> None:
    containerd_container(node, base="run/k3s/containerd/io.containerd.runtime.v2.task")
    names = NameResolver(str(node)).resolve(CGROUPFS_CONTAINERD)
    assert names is not None
    assert (names.pod, names.namespace, names.container) == (
        "api-7d9f8c6b5-x2x9z",
        "payments",
        "api",
    )


def test_containerd_sandbox_is_the_pod_container(node: Path) -> None:
    containerd_bundle(
        node,
        SANDBOX,
        {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-name": "api-7d9f8c6b5-x2x9z",
            "io.kubernetes.cri.sandbox-namespace": "payments",
            "io.kubernetes.cri.sandbox-uid": POD_UID,
        },
    )
    names = NameResolver(str(node)).resolve(f"{SYSTEMD_POD}/cri-containerd-{SANDBOX}.scope")
    assert names is not None and names.container == "POD" and names.pod == "api-7d9f8c6b5-x2x9z"


def test_crio_cgroupfs_driver(node: Path) -> None:
    crio_container(node)
    assert owner_of(CGROUPFS_CRIO).runtime == "cri-o"
    names = NameResolver(str(node)).resolve(CGROUPFS_CRIO)
    assert names == Names(
        pod="checkout-6c8d",
        namespace="shop",
        pod_uid=CRIO_UID,
        container="checkout",
        container_id=CRIO_CID,
        image="registry.example/shop/checkout:2.0",
        runtime="cri-o",
    )


def test_crio_systemd_driver(node: Path) -> None:
    crio_container(node)
    path = (
        f"/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{CRIO_UID.replace('-', '_')}.slice/crio-{CRIO_CID}.scope"
    )
    names = NameResolver(str(node)).resolve(path)
    assert names is not None and names.label() == "pod shop/checkout-6c8d (container checkout)"


def test_docker_name_and_image(node: Path) -> None:
    write(
        node / "var/lib/docker/containers" / DOCKER_CID / "config.v2.json",
        {
            "ID": DOCKER_CID,
            "Name": "/billing-worker",
            "Config": {"Image": "billing:3", "Labels": {"com.example.team": "billing"}},
            "State": {"Running": True, "Pid": 4242},
        },
    )
    names = NameResolver(str(node)).resolve(f"/system.slice/docker-{DOCKER_CID}.scope")
    assert names is not None
    assert (names.container, names.image, names.runtime, names.pod) == (
        "billing-worker",
        "billing:3",
        "docker",
        None,
    )
    assert names.label() == "container billing-worker"


@pytest.mark.parametrize(
    "cgroup",
    [f"/machine.slice/libpod-{PODMAN_CID}.scope", f"/libpod_parent/libpod-{PODMAN_CID}"],
)
def test_podman_from_containers_json(node: Path, cgroup: str) -> None:
    podman_state(node)
    names = NameResolver(str(node)).resolve(cgroup)
    assert names is not None
    assert (names.container, names.image, names.runtime) == (
        "web",
        "localhost/linnix-probe:1",
        "podman",
    )


def test_containers_json_parsed_again_only_when_it_changes(node: Path) -> None:
    state = podman_state(node)
    r = NameResolver(str(node))
    assert r.resolve(f"/machine.slice/libpod-{PODMAN_CID}.scope").container == "web"  # type: ignore[union-attr]
    held = r._state[str(state)][1]
    r.resolve(f"/machine.slice/libpod-{PODMAN_CID}.scope")
    assert r._state[str(state)][1] is held  # same parse
    podman_state(node, name="web-renamed-and-longer")
    os.utime(state, ns=(1, 2))
    assert (
        r.resolve(f"/machine.slice/libpod-{PODMAN_CID}.scope").container == "web-renamed-and-longer"
    )  # type: ignore[union-attr]


def test_kubelet_log_directories_name_pod_and_container(node: Path) -> None:
    """No runtime file readable: kubelet's var/log/pods and var/log/containers still name it."""
    (node / f"var/log/pods/payments_api-7d9f8c6b5-x2x9z_{POD_UID}/api").mkdir(parents=True)
    (node / "var/log/containers").mkdir(parents=True)
    os.symlink(
        f"/var/log/pods/payments_api-7d9f8c6b5-x2x9z_{POD_UID}/api/0.log",
        node / f"var/log/containers/api-7d9f8c6b5-x2x9z_payments_api-{CID}.log",
    )
    r = NameResolver(str(node))
    names = r.resolve(SYSTEMD_CONTAINER)
    assert names is not None
    assert (names.pod, names.namespace, names.container, names.container_id) == (
        "api-7d9f8c6b5-x2x9z",
        "payments",
        "api",
        CID,
    )
    pod_only = r.resolve(SYSTEMD_POD)
    assert pod_only is not None and pod_only.label() == "pod payments/api-7d9f8c6b5-x2x9z"


def test_not_a_container_has_no_names(node: Path) -> None:
    r = NameResolver(str(node))
    assert r.resolve("/system.slice/cron.service") is None
    assert r.resolve(SYSTEMD_CONTAINER) is None  # ids only: no file knows it


# ---- bad input ------------------------------------------------------------------------


def test_bad_files_fall_back_to_ids_and_are_counted(node: Path) -> None:
    bundle = node / "run/containerd/io.containerd.runtime.v2.task/k8s.io" / CID / "config.json"
    r = NameResolver(str(node))
    write(bundle, '{"ociVersion": "1.1.0", "annotations": {"io.kubernetes.cri.sandbox-na')
    assert r.resolve(SYSTEMD_CONTAINER) is None
    assert r.counts["malformed"] == 1
    write(bundle, "[1, 2, 3]")
    assert r.resolve(SYSTEMD_CONTAINER) is None
    assert r.counts["malformed"] == 2
    # over the bound: not parsed, and never read past it
    write(bundle, '{"annotations": {}, "pad": "' + "x" * MAX_FILE_BYTES + '"}')
    assert r.resolve(SYSTEMD_CONTAINER) is None
    assert r.counts["too_large"] == 1
    bundle.unlink()
    os.mkfifo(bundle)  # would block a plain open(): opened non-blocking, refused as not a file
    assert r.resolve(SYSTEMD_CONTAINER) is None
    assert r.counts["malformed"] == 3
    bundle.unlink()
    bundle.mkdir()
    assert r.resolve(SYSTEMD_CONTAINER) is None
    assert r.counts["unreadable"] + r.counts["malformed"] == 4


def test_read_bounded_stops_at_the_bound(tmp_path: Path) -> None:
    f = tmp_path / "big"
    f.write_bytes(b"x" * 100)
    assert read_bounded(str(f), 100) == b"x" * 100
    with pytest.raises(Exception, match="too_large"):
        read_bounded(str(f), 99)
    assert read_bounded(str(tmp_path / "missing")) is None


def test_odd_characters_are_cleaned(node: Path) -> None:
    containerd_bundle(
        node,
        CID,
        {
            "io.kubernetes.cri.container-name": "api\n\x1b[31mFAKE ALERT",
            "io.kubernetes.cri.sandbox-name": "p" * 400,
            "io.kubernetes.cri.sandbox-namespace": 42,  # type: ignore[dict-item]
        },
    )
    names = NameResolver(str(node)).resolve(SYSTEMD_CONTAINER)
    assert names is not None
    assert names.container == "api??[31mFAKE ALERT"
    assert names.pod == "p" * 253
    assert names.namespace is None


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to another user with setpriv")
def test_unreadable_directory_is_counted() -> None:
    """Root's runtime state (0700 directories, 0600 files, Podman's containers.json included)
    read by another user: without CAP_DAC_READ_SEARCH each source is a counted failure; with
    it alone, as the unit grants it, every name is read."""
    node = Path(tempfile.mkdtemp(prefix="linnixd-names-"))  # pytest's own tmp is root-only
    containerd_container(node)
    podman_state(node)
    for d in [node, *node.rglob("*")]:
        d.chmod(0o700 if d.is_dir() else 0o600)
    node.chmod(0o755)
    script = (
        "import json, sys; from linnixd.names import NameResolver; "
        f"r = NameResolver({str(node)!r}); "
        f"n = [r.resolve(p) for p in ({SYSTEMD_CONTAINER!r}, '/machine.slice/libpod-{PODMAN_CID}.scope')]; "
        "print(json.dumps([[x.container if x else None for x in n], r.counts]))"
    )
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    cap = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]

    def as_nobody(*extra: str) -> tuple[list[str | None], dict[str, int]]:
        cp = subprocess.run(
            [*user, *extra, "/usr/bin/python3", "-c", script],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cp.returncode == 0, cp.stderr
        got, counts = json.loads(cp.stdout)
        return got, counts

    try:
        got, counts = as_nobody()
        # each source under the root-only run/ and var/ is one counted failure, nothing else
        assert got == [None, None] and counts["unreadable"] >= 2 and counts["malformed"] == 0
        got, counts = as_nobody(*cap)
        assert got == ["api", "web"] and counts["unreadable"] == 0, counts
    finally:
        shutil.rmtree(node)


# ---- the cache, against real cgroups ---------------------------------------------------

MOUNT = cgroup2_mount()
needs_cgroup2 = pytest.mark.skipif(
    MOUNT is None or os.geteuid() != 0, reason="needs root and cgroup2"
)


@pytest.fixture
def cgroot() -> Iterator[str]:
    """A fresh directory in the real cgroup2 tree to lay kubelet's hierarchy under."""
    assert MOUNT is not None
    rel = f"/linnixd-names-{uuid.uuid4().hex[:8]}"
    os.mkdir(MOUNT + rel)
    try:
        yield rel
    finally:
        for dirpath, _, _ in sorted(os.walk(MOUNT + rel), key=lambda t: -len(t[0])):
            os.rmdir(dirpath)


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


@needs_cgroup2
def test_cache_follows_the_cgroup(node: Path, cgroot: str) -> None:
    assert MOUNT is not None
    path = cgroot + SYSTEMD_CONTAINER
    os.makedirs(MOUNT + path)
    clock = Clock()
    r = NameResolver(str(node), cgroup_dir=lambda p: MOUNT + p, clock=clock)
    assert r.names(path) is None and r.counts["unnamed"] == 1
    containerd_container(node)
    assert r.names(path) is None and r.counts["cache_hits"] == 1  # not looked at again yet
    clock.t += 31
    assert r.names(path).container == "api"  # type: ignore[union-attr]
    assert r.names(path).container == "api"  # type: ignore[union-attr]
    assert r.counts["cache_hits"] == 2 and r.counts["named"] == 1
    # the container goes away and a new one takes the same cgroup name: not the old names
    os.rmdir(MOUNT + path)
    (node / "run/containerd/io.containerd.runtime.v2.task/k8s.io" / CID / "config.json").unlink()
    assert r.names(path) is None
    assert r.counts["invalidated"] == 1 and r.health().gauges["cached"] == 0


@needs_cgroup2
def test_cache_is_bounded(node: Path, cgroot: str) -> None:
    assert MOUNT is not None
    r = NameResolver(str(node), cgroup_dir=lambda p: MOUNT + p, max_entries=3)
    os.mkdir(f"{MOUNT}{cgroot}/docker")
    for i in range(5):
        os.mkdir(f"{MOUNT}{cgroot}/docker/{i:064x}")
        r.names(f"{cgroot}/docker/{i:064x}")
    assert r.health().gauges["cached"] == 3 and r.counts["evicted"] == 2
    # a cgroup no runtime owns is never looked up nor held
    assert r.names(cgroot) is None and r.counts["lookups"] == 5


# ---- alerts and queries ---------------------------------------------------------------


def _stall_alert(state: str = "firing", incident: str = "inc1") -> Alert:
    culprit = f"/kubepods.slice/cri-containerd-{CID}.scope"
    return Alert(
        id=uuid.uuid4().hex,
        incident=incident,
        rule="noisy_neighbour",
        severity="warning",
        state=state,
        ts=1.0,
        summary=(
            f"cri-containerd-{CID}.scope caused 300 ms of stall to {CGROUPFS_CRIO} in the last 10 s"
        ),
        culprit=Culprit(kind="cgroup", cgroup=culprit, unit=f"cri-containerd-{CID}.scope"),
        evidence={
            "victim": CGROUPFS_CRIO,
            "victim_unit": None,
            "top_culprits": [{"cgroup": culprit, "stall_ms": 300.0}],
        },
    )


def test_alert_names_culprit_victim_and_summary(node: Path) -> None:
    containerd_container(node)
    crio_container(node)
    namer = AlertNamer(NameResolver(str(node)))
    named = namer.name(_stall_alert())
    assert named.summary == (
        "pod payments/api-7d9f8c6b5-x2x9z (container api) caused 300 ms of stall to "
        "pod shop/checkout-6c8d (container checkout) in the last 10 s"
    )
    c = named.culprit
    assert (c.pod, c.namespace, c.container, c.container_id, c.image) == (
        "api-7d9f8c6b5-x2x9z",
        "payments",
        "api",
        CID,
        "registry.example/payments/api:1.4.2",
    )
    assert named.evidence["victim_pod"] == "checkout-6c8d"
    assert named.evidence["victim_namespace"] == "shop"
    assert named.evidence["top_culprits"][0]["container"] == "api"
    d = named.to_dict()
    assert (d["pod"], d["namespace"], d["container"], d["container_id"]) == (
        "api-7d9f8c6b5-x2x9z",
        "payments",
        "api",
        CID,
    )
    assert Alert.from_dict(d) == named
    # the resolution comes after the containers are gone: named from the firing record
    for f in node.rglob("config.json"):
        f.unlink()
    resolved = namer.name(_stall_alert("resolved"))
    assert resolved.culprit.pod == "api-7d9f8c6b5-x2x9z"
    assert "pod shop/checkout-6c8d" in resolved.summary


def test_relabel_touches_whole_paths_only() -> None:
    pod = Names(pod="api-1", namespace="payments", container=None)
    container = Names(pod="api-1", namespace="payments", container="api", container_id=CID)
    pod_path = f"/kubepods/burstable/pod{POD_UID}"
    text = f"{pod_path} and {pod_path}/{CID} and {pod_path}/{CID}x"
    out = relabel(text, {pod_path: pod, f"{pod_path}/{CID}": container})
    assert out == (
        f"pod payments/api-1 and pod payments/api-1 (container api) and {pod_path}/{CID}x"
    )
    # a unit that is not the container's own scope is never replaced
    assert (
        relabel("x in kubelet.service", {"/kubelet.service": container}) == "x in kubelet.service"
    )


def test_row_filter() -> None:
    named = Names(pod="api-7d9f", namespace="payments", container="api")
    assert RowFilter.parse({"namespace": "payments"}).owner(named, None)
    assert not RowFilter.parse({"namespace": "shop"}).owner(named, None)
    assert RowFilter.parse({"pod": "api-*", "container": "api"}).owner(named, None)
    assert not RowFilter.parse({"pod": "web-*"}).owner(named, None)
    assert RowFilter.parse({"unit": "cri-*.scope"}).owner(None, "cri-containerd-x.scope")
    assert RowFilter.parse({"unit": "Containerd"}).owner(None, "cri-containerd-x.scope")
    assert not RowFilter.parse({"unit": "cri-*.service"}).owner(None, "cri-containerd-x.scope")
    assert not RowFilter.parse({"namespace": "payments"}).owner(None, "x.service")
    with pytest.raises(QueryError, match="unknown filter 'node'"):
        RowFilter.parse({"node": "x"})
    with pytest.raises(QueryError, match="filter pod must be"):
        RowFilter.parse({"pod": "a\nb"})


def test_alert_matches_culprit_or_victim(node: Path) -> None:
    containerd_container(node)
    crio_container(node)
    named = AlertNamer(NameResolver(str(node))).name(_stall_alert())
    assert alert_matches(named, RowFilter(namespace="payments"))
    assert alert_matches(named, RowFilter(namespace="shop"))  # the victim
    assert not alert_matches(named, RowFilter(namespace="kube-system"))
    assert not alert_matches(named, RowFilter(namespace="payments", rule="cpu_spike"))


def test_journald_and_dbus_carry_the_names(node: Path) -> None:
    from linnixd.sinks.journal import journal_fields
    from linnixd.wire import decode_alert, encode_alert

    containerd_container(node)
    crio_container(node)
    named = AlertNamer(NameResolver(str(node))).name(_stall_alert())
    fields = journal_fields(named)
    assert (
        fields["LINNIX_POD"],
        fields["LINNIX_NAMESPACE"],
        fields["LINNIX_CONTAINER"],
        fields["LINNIX_CONTAINER_ID"],
        fields["LINNIX_IMAGE"],
    ) == ("api-7d9f8c6b5-x2x9z", "payments", "api", CID, "registry.example/payments/api:1.4.2")
    assert fields["MESSAGE"].startswith("noisy_neighbour firing: pod payments/api-7d9f8c6b5-x2x9z")
    assert decode_alert(encode_alert(named)) == named


def test_host_root_must_be_a_directory(tmp_path: Path) -> None:
    cp = subprocess.run(
        ["/usr/bin/python3", "-m", "linnixd", "--host-root", str(tmp_path / "nope"), "--version"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2
    assert cp.stderr.splitlines()[-1] == (
        f"linnixd: error: argument --host-root: '{tmp_path / 'nope'}' is not a directory"
    )


def test_contention_names_both_sides(node: Path) -> None:
    containerd_container(node)
    crio_container(node)
    api = f"/kubepods.slice/cri-containerd-{CID}.scope"
    alert = Alert(
        id="a",
        incident="contention",
        rule="noisy_neighbour",
        severity="info",
        state="firing",
        ts=1.0,
        summary=f"{CGROUPFS_CRIO} and cri-containerd-{CID}.scope contend for CPU (...)",
        culprit=Culprit(kind="system"),
        evidence={"victim": CGROUPFS_CRIO, "contender": api, "explained_by": "contention"},
    )
    named = AlertNamer(NameResolver(str(node))).name(alert)
    assert named.summary == (
        "pod shop/checkout-6c8d (container checkout) and "
        "pod payments/api-7d9f8c6b5-x2x9z (container api) contend for CPU (...)"
    )
    assert (named.evidence["victim_pod"], named.evidence["contender_pod"]) == (
        "checkout-6c8d",
        "api-7d9f8c6b5-x2x9z",
    )
    assert alert_matches(named, RowFilter(namespace="payments"))  # the contender's side
