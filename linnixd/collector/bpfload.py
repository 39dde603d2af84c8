"""Compiling and loading BPF C with bcc, turning every missing kernel feature into one clear line."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BTF_PATH = "/sys/kernel/btf/vmlinux"


class KernelFeatureError(Exception):
    """A kernel feature, file or privilege linnixd needs is missing; str() is the one-line fix."""


def tracefs_root() -> str | None:
    for root in TRACEFS_CANDIDATES:
        if os.path.exists(os.path.join(root, "events", "sched", "sched_switch", "format")):
            return root
    return None


def preflight(tracepoints: Sequence[str] = ()) -> None:
    """Check what bcc needs before spending ~0.5 s in LLVM; raise KernelFeatureError if missing."""
    try:
        import bcc  # noqa: F401  (its import is the check)
    except ImportError:
        raise KernelFeatureError(
            "bcc is not installed: apt install python3-bpfcc (and run with /usr/bin/python3)"
        ) from None
    root = tracefs_root()
    if root is None:
        if _unreadable(os.path.join(TRACEFS_CANDIDATES[0], "README")) == "denied":
            raise KernelFeatureError(
                "cannot read /sys/kernel/tracing: needs CAP_DAC_READ_SEARCH (bcc reads tracepoint formats)"
            )
        raise KernelFeatureError(
            "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
        )
    for tp in tracepoints:
        fmt = os.path.join(root, "events", tp, "format")
        problem = _unreadable(fmt)
        if problem == "missing":
            raise KernelFeatureError(f"tracepoint {tp} is missing from this kernel ({fmt})")
        if problem == "denied":
            raise KernelFeatureError(
                f"cannot read {fmt}: needs CAP_DAC_READ_SEARCH (bcc reads tracepoint formats)"
            )
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "Makefile").exists() and not Path(BTF_PATH).exists():
        raise KernelFeatureError(
            f"kernel headers missing: {build} does not exist (apt install linux-headers-amd64; "
            "on a kernel without its own headers, link build and source to /usr/src/linux-headers-*)"
        )
    if not (build / "Makefile").exists():
        raise KernelFeatureError(
            f"kernel headers missing: {build} does not exist (apt install linux-headers-$(uname -r), "
            "or link it to the newest /usr/src/linux-headers-*-amd64 as .ci/setup-host does)"
        )


def _unreadable(path: str) -> str | None:
    """ "missing", "denied" or None, by really opening the file.

    os.access() would be wrong here: it ignores capabilities such as CAP_DAC_READ_SEARCH,
    which is exactly how the service user reads tracefs.
    """
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "denied"
    except OSError:
        return "denied"
    return None


def ringbuf_supported() -> bool:
    """True when the kernel offers BPF ring buffers (BPF_MAP_TYPE_RINGBUF, Linux >= 5.8).

    Decided by asking the kernel to create a tiny ring buffer map, not from the version number.
    """
    try:
        from bcc import libbcc  # type: ignore[attr-defined]
    except ImportError:
        return False
    map_type_ringbuf = 27  # enum bpf_map_type: BPF_MAP_TYPE_RINGBUF
    create = libbcc.lib.bcc_create_map
    create.restype = ctypes.c_int
    create.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    fd = create(map_type_ringbuf, b"lx_probe_rb", 0, 0, 4096, 0)
    if fd < 0:
        return False
    os.close(fd)
    return True


def source_text(src: Path, cflags: Sequence[str]) -> str:
    """What would be compiled: the -D settings as a header comment, then the C source."""
    header = "\n".join(f"// cflag: {flag}" for flag in cflags)
    return f"// {src}\n{header}\n{src.read_text()}"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[io.StringIO]:
    """Capture fd 2 while LLVM runs (its diagnostics bypass sys.stderr); a file, so it never fills."""
    buf = io.StringIO()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read().decode(errors="replace"))


def _perf_paranoid() -> int:
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 2


def _verifier_reason(text: str) -> str:
    """The verifier log's verdict: the last line that is not a statistics or instruction line."""
    skip = ("processed ", "verification time", "stack depth", "max_states_per_insn", "mark_precise")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)
    ]
    lines = [ln for ln in lines if not ln[:1].isdigit() and not ln.startswith(";")]
    return lines[-1] if lines else "no verifier log"


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def compile_program(src: Path, cflags: Sequence[str]) -> Any:
    """BPF(src_file=...) with errors mapped to KernelFeatureError; returns the bcc.BPF object."""
    from bcc import BPF

    if not src.is_file():
        raise KernelFeatureError(
            f"BPF source {src} is missing (set LINNIXD_BPF_DIR or reinstall linnixd)"
        )
    try:
        with _captured_stderr() as err:
            try:
                return BPF(src_file=str(src).encode(), cflags=list(cflags))
            except Exception as exc:
                failure: Exception = exc
    except OSError as exc:
        raise KernelFeatureError(f"cannot compile {src.name}: {exc}") from None
    text = err.getvalue()
    message = str(failure)
    if "Failed to load BPF program" in message and "Permission denied" in message:
        # EACCES from BPF_PROG_LOAD is the verifier saying no; its log ends with the reason.
        raise KernelFeatureError(
            f"the kernel's BPF verifier rejected {src.name} ({message.split(':')[0].split()[-1]}): "
            f"{_verifier_reason(text)}"
        ) from None
    if "Operation not permitted" in message or "Permission denied" in message or "EPERM" in text:
        raise KernelFeatureError(
            f"permission denied loading {src.name}: needs CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH (or root)"
        ) from None
    if "Failed to compile" in message or "error:" in text:
        raise KernelFeatureError(f"cannot compile {src.name}: {_first_error(text)}") from None
    if "Failed to attach" in message or "attach" in message:
        if _perf_paranoid() > 2:
            raise KernelFeatureError(
                f"cannot attach {src.name}: kernel.perf_event_paranoid={_perf_paranoid()} refuses "
                "tracepoints without CAP_SYS_ADMIN; set it to 2 (the linnixd package ships "
                "/usr/lib/sysctl.d/50-linnixd.conf: sysctl --system)"
            ) from None
        raise KernelFeatureError(f"cannot attach {src.name}: {message.splitlines()[0]}") from None
    raise KernelFeatureError(
        f"cannot load {src.name}: {message.splitlines()[0] if message else _first_error(text)}"
    ) from None


class ShortLivedThreshold:
    """The short-lived threshold bpf/lifecycle.c and bpf/net.c share: compiled in as
    DEFAULT_SHORT_NS, then held in slot 0 of their `config` array so it changes without a
    recompile. A collector sets `short_lived_s` through init_short_lived and `_bpf` on start."""

    short_lived_s: float
    _bpf: Any

    def init_short_lived(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"short_lived_s must be positive, got {seconds}")
        self.short_lived_s = seconds

    def short_lived_cflag(self) -> str:
        return f"-DDEFAULT_SHORT_NS={int(self.short_lived_s * 1e9)}ULL"

    def set_short_lived(self, seconds: float) -> None:
        """Change the short-lived threshold; takes effect in the kernel at once, no recompile."""
        if seconds <= 0:
            raise ValueError(f"short-lived threshold must be positive, got {seconds}")
        self.short_lived_s = seconds
        if self._bpf is not None:
            self.write_short_lived()

    def write_short_lived(self) -> None:
        """Put the threshold into the running program's `config` map (after each compile)."""
        table = self._bpf[b"config"]
        table[table.Key(0)] = table.Leaf(int(self.short_lived_s * 1e9))
