"""CgroupResolver against the real cgroup2 tree, and owners from real-world path shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from linnixd.collector.cgroups import CgroupResolver, cgroup2_mount, owner_of
from linnixd.model import Owner

D64 = "3f2a" * 16
C64 = "9c1e" * 16
POD = "0d1f6a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
POD_ = POD.replace("-", "_")

OWNERS: list[tuple[str, Owner]] = [
    ("/", Owner("root", "/")),
    ("/init.scope", Owner("unit", "init.scope", unit="init.scope")),
    ("/system.slice/foo.service", Owner("unit", "foo.service", unit="foo.service")),
    ("/system.slice/dbus.socket", Owner("unit", "dbus.socket", unit="dbus.socket")),
    ("/system.slice/boot.mount", Owner("unit", "boot.mount", unit="boot.mount")),
    ("/system.slice/dev-vda2.swap", Owner("unit", "dev-vda2.swap", unit="dev-vda2.swap")),
    (
        "/user.slice/user-1000.slice/session-3.scope",
        Owner("unit", "session-3.scope", unit="session-3.scope"),
    ),
    (
        "/user.slice/user-1000.slice/user@1000.service",
        Owner("unit", "user@1000.service", unit="user@1000.service"),
    ),
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
        Owner("unit", "foo.service", unit="foo.service"),
    ),
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-4242.scope",
        Owner("unit", "app-gnome-firefox-4242.scope", unit="app-gnome-firefox-4242.scope"),
    ),
    # a service's own sub-cgroups (Delegate=yes) still belong to the service
    ("/system.slice/foo.service/worker", Owner("unit", "foo.service", unit="foo.service")),
    ("/system.slice", Owner("unknown", "/system.slice")),
    ("/linnixd-test", Owner("unknown", "/linnixd-test")),
    (
        f"/system.slice/docker-{D64}.scope",
        Owner(
            "container",
            f"docker-{D64}.scope",
            unit=f"docker-{D64}.scope",
            container_id=D64,
            runtime="docker",
        ),
    ),
    (f"/docker/{D64}", Owner("container", D64, container_id=D64, runtime="docker")),
    (
        f"/machine.slice/libpod-{C64}.scope/container",
        Owner(
            "container",
            f"libpod-{C64}.scope",
            unit=f"libpod-{C64}.scope",
            container_id=C64,
            runtime="podman",
        ),
    ),
    (
        f"/machine.slice/libpod-conmon-{C64}.scope",
        Owner("unit", f"libpod-conmon-{C64}.scope", unit=f"libpod-conmon-{C64}.scope"),
    ),
    (
        f"/libpod_parent/libpod-{C64}",
        Owner("container", f"libpod-{C64}", container_id=C64, runtime="podman"),
    ),
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/cri-containerd-{C64}.scope",
        Owner(
            "container",
            f"cri-containerd-{C64}.scope",
            unit=f"cri-containerd-{C64}.scope",
            container_id=C64,
            runtime="containerd",
            pod_uid=POD,
        ),
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/crio-{C64}.scope",
        Owner(
            "container",
            f"crio-{C64}.scope",
            unit=f"crio-{C64}.scope",
            container_id=C64,
            runtime="cri-o",
            pod_uid=POD,
        ),
    ),
    (
        f"/kubepods.slice/kubepods-pod{POD_}.slice",
        Owner("pod", f"pod{POD}", pod_uid=POD),
    ),
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice",
        Owner("pod", f"pod{POD}", pod_uid=POD),
    ),
    (f"/kubepods/burstable/pod{POD}/{C64}", Owner("container", C64, container_id=C64, pod_uid=POD)),
    (f"/kubepods/pod{POD}/{C64}", Owner("container", C64, container_id=C64, pod_uid=POD)),
    (f"/kubepods/besteffort/pod{POD}", Owner("pod", f"pod{POD}", pod_uid=POD)),
]


@pytest.mark.parametrize("path,expected", OWNERS, ids=[p for p, _ in OWNERS])
def test_owner_of_real_world_paths(path: str, expected: Owner) -> None:
    assert owner_of(path) == expected


MOUNT = cgroup2_mount()
needs_cgroup2 = pytest.mark.skipif(
    MOUNT is None or os.geteuid() != 0, reason="needs root and cgroup2"
)


@pytest.fixture
def testcg() -> Iterator[str]:
    """A fresh cgroup2 directory, removed (children first) afterwards."""
    assert MOUNT is not None
    rel = f"/linnixd-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(MOUNT + rel)
    try:
        yield rel
    finally:
        for dirpath, _, _ in sorted(os.walk(MOUNT + rel), key=lambda t: -len(t[0])):
            os.rmdir(dirpath)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@needs_cgroup2
def test_mount_found_and_root_is_id_1() -> None:
    r = CgroupResolver()
    assert r.mount == MOUNT
    r.refresh()
    assert r.resolve(os.stat(MOUNT).st_ino) == "/"
    assert r.owner("/") == Owner("root", "/")


@needs_cgroup2
def test_resolve_new_cgroup_by_lazy_rewalk_and_forget_removed(testcg: str) -> None:
    assert MOUNT is not None
    clock = FakeClock()
    r = CgroupResolver(clock=clock)
    r.refresh()
    os.mkdir(MOUNT + testcg + "/inner.service")
    cid = os.stat(MOUNT + testcg + "/inner.service").st_ino
    walks = r.walks
    clock.t += 1.5
    assert r.resolve(cid) == testcg + "/inner.service"  # unknown id -> re-walk
    assert r.walks == walks + 1
    assert r.id_of(testcg + "/inner.service") == cid
    assert r.owner(testcg + "/inner.service").unit == "inner.service"
    assert r.resolve(cid) == testcg + "/inner.service"  # known: no walk
    assert r.walks == walks + 1
    os.rmdir(MOUNT + testcg + "/inner.service")
    clock.t += 2
    r.refresh()
    assert r.id_of(testcg + "/inner.service") is None
    assert cid not in r._by_id


@needs_cgroup2
def test_exists_is_one_stat_of_a_known_path_and_never_a_walk(testcg: str) -> None:
    """What the lifecycle collector prunes idle per-cgroup keys with."""
    assert MOUNT is not None
    r = CgroupResolver(min_rewalk_s=0.0)
    os.mkdir(MOUNT + testcg + "/idle.service")
    cid = os.stat(MOUNT + testcg + "/idle.service").st_ino
    assert r.resolve(cid) == testcg + "/idle.service"
    walks = r.walks
    assert r.exists(cid)
    assert not r.exists(0x7FFF_FFFF_FFFF)  # never resolved: counts as gone
    os.rmdir(MOUNT + testcg + "/idle.service")
    assert not r.exists(cid)  # removed: its path is gone
    os.mkdir(MOUNT + testcg + "/idle.service")  # the same path again is another cgroup
    assert os.stat(MOUNT + testcg + "/idle.service").st_ino != cid
    assert not r.exists(cid)
    assert r.walks == walks


@needs_cgroup2
def test_unknown_id_is_rate_limited_and_counted_once(testcg: str) -> None:
    clock = FakeClock()
    r = CgroupResolver(clock=clock, min_rewalk_s=1.0)
    r.refresh()
    walks = r.walks
    bogus = 0x7FFF_FFFF_FFFF
    clock.t += 0.2
    assert r.resolve(bogus) is None  # asked inside the rate limit: no walk yet, not counted
    assert (r.walks, r.unresolved) == (walks, 0)
    clock.t += 1.0
    assert r.resolve(bogus) is None  # walked, still unknown: counted
    assert (r.walks, r.unresolved) == (walks + 1, 1)
    clock.t += 5.0
    assert r.resolve(bogus) is None  # remembered as unresolvable: no walk, no recount
    assert (r.walks, r.unresolved) == (walks + 1, 1)


@needs_cgroup2
def test_cap_evicts_least_recently_used_and_counts(testcg: str) -> None:
    assert MOUNT is not None
    ids = []
    for i in range(5):
        os.mkdir(f"{MOUNT}{testcg}/c{i}")
        ids.append(os.stat(f"{MOUNT}{testcg}/c{i}").st_ino)
    clock = FakeClock()
    r = CgroupResolver(max_cgroups=3, clock=clock, min_rewalk_s=0.0)
    r.refresh()
    assert len(r) == 3
    for i, cid in enumerate(ids):
        assert r.resolve(cid) == f"{testcg}/c{i}"
        assert len(r) <= 3
    assert r.resolve(os.stat(MOUNT).st_ino) == "/"  # the root is always held
    # c2, c3, c4 each pushed out one held cgroup; the root never goes
    assert r.evicted >= 3
    assert r.unresolved == 0


@needs_cgroup2
def test_sample_reads_cpu_stat_delta_and_v1_memory(testcg: str) -> None:
    assert MOUNT is not None
    r = CgroupResolver()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time\nsys.stdin.readline()\nwhile time.process_time() < 0.6: pass\n",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        with open(f"{MOUNT}{testcg}/cgroup.procs", "w") as f:
            f.write(str(child.pid))
        v1: str | None = None
        with open(f"/proc/{child.pid}/cgroup") as f:
            for line in f:
                _, ctrl, path = line.rstrip("\n").split(":", 2)
                if "memory" in ctrl.split(","):
                    v1 = path
        first = r.sample(testcg, {}, v1)
        assert first is not None and first.cpu_usage_us is None  # no previous read yet
        assert first.id == os.stat(MOUNT + testcg).st_ino
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        child.wait(timeout=20)
        second = r.sample(testcg, {}, v1)
        assert second is not None and second.cpu_usage_us is not None
        assert 550_000 <= second.cpu_usage_us <= 3_000_000  # 0.6 s of CPU time, plus exit
        if os.path.exists(f"{MOUNT}{testcg}/memory.current"):
            assert second.memory_bytes is not None and second.memory_bytes >= 0
        elif r.v1_memory is not None and v1 is not None:
            with open(f"{r.v1_memory}{v1}/memory.usage_in_bytes") as f:
                assert (
                    second.memory_bytes is not None
                    and abs(second.memory_bytes - int(f.read())) < 64 << 20
                )
    finally:
        child.kill()
        child.wait()
    assert r.sample(testcg + "/nope", {}) is None


def test_memory_limits_lowest_on_the_path_and_max_is_none(tmp_path: Path) -> None:
    """memory.max/high as cgroup2 writes them (a tree of plain files: this host's cgroup2 has
    no memory controller; the VM checks the real one)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "memory.max").write_text("1073741824\n")
    (tmp_path / "a" / "memory.high").write_text("max\n")
    (tmp_path / "a" / "b" / "memory.max").write_text("max\n")
    (tmp_path / "a" / "b" / "memory.high").write_text("536870912\n")
    now = [0.0]
    r = CgroupResolver(mount=str(tmp_path), v1_memory="", clock=lambda: now[0])
    r.refresh()
    assert r.memory_limits("/a/b") == (1 << 30, 1 << 29)  # max from the parent, high its own
    assert r.memory_limits("/a") == (1 << 30, None)  # "max" is no limit
    assert r.memory_limits("/") == (None, None)  # the root has none
    (tmp_path / "a" / "memory.max").write_text("max\n")  # changed mid-window ...
    assert r.memory_limits("/a/b") == (1 << 30, 1 << 29)  # ... seen after the refresh period
    now[0] += 5.0
    assert r.memory_limits("/a/b") == (None, 1 << 29)
    (tmp_path / "a" / "b" / "memory.high").write_text("garbage\n")
    (tmp_path / "a" / "b" / "memory.max").unlink()
    now[0] += 5.0
    assert r.memory_limits("/a/b") == (None, None)
