"""The optional kernel collectors, attached while an enabled rule needs them and detached when none does.

Which rules need what is the registry's (linnixd/registry.py `needs`): "sched" is bpf/sched.c
(stall attribution and per-process CPU from the kernel), "psi_triggers" the kernel PSI triggers
that wake the tick early, "net" bpf/net.c (TCP connections, retransmits, port use). The
lifecycle program is always attached: the host model follows execs and exits through it. A
reload calls sync() with the new policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..daemonlog import LOG_ERR, LOG_NOTICE, LOG_WARNING
from ..detectors.net import PortExhaustion
from ..detectors.pressure import PsiSaturation
from ..health import Health
from ..model import NetTick, StallSnapshot
from ..registry import collectors_for
from .taskcpu import TaskCpuReader

if TYPE_CHECKING:
    from ..config import Policy

PSI_TRIGGER_WINDOW_S = 2.0  # the shortest window unprivileged triggers accept (kernel >= 6.5)


class SchedSource(Protocol):
    """bpf/sched.c as the daemon uses it (collector/sched.py SchedCollector)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def task_cpu(self) -> TaskCpuReader: ...

    def read(self, resolve: Callable[[int], str | None]) -> StallSnapshot: ...

    def set_attribution(self, on: bool) -> None: ...

    def health(self) -> Health: ...


class NetSource(Protocol):
    """bpf/net.c as the daemon uses it (collector/net.py NetCollector)."""

    port_gate_pct: float

    def start(self) -> None: ...

    def close(self) -> None: ...

    def set_short_lived(self, seconds: float) -> None: ...

    def read(self) -> NetTick: ...

    def health(self) -> Health: ...


class TriggerSource(Protocol):
    """Kernel PSI triggers (collector/psi.py PsiTriggers)."""

    mode: str

    def health(self) -> Health: ...

    def fileno(self) -> int: ...

    def drain(self) -> list[str]: ...

    def close(self) -> None: ...


def _psi_key(policy: Policy) -> tuple[tuple[str, ...], float]:
    cfg = policy.settings(PsiSaturation)
    return tuple(cfg.resources), float(cfg.some_pct)


class Attachments:
    """bpf/sched.c and the PSI triggers, present exactly while the policy's enabled rules need them."""

    def __init__(
        self,
        *,
        make_sched: Callable[[], SchedSource] | None,
        make_triggers: Callable[[Sequence[str], float, float], TriggerSource] | None,
        make_net: Callable[[], NetSource] | None = None,
    ) -> None:
        """`make_sched` None: never attach sched.c (--no-sched); `make_triggers` None: always
        poll; `make_net` None: never attach net.c (--no-net)."""
        self.make_sched = make_sched
        self.make_triggers = make_triggers
        self.make_net = make_net
        self.sched: SchedSource | None = None
        self.net: NetSource | None = None
        self.net_problem = ""  # why bpf/net.c is not attached although a network rule wants it
        self.triggers: TriggerSource | None = None
        self._triggers_for: tuple[tuple[str, ...], float] | None = None

    @property
    def psi_mode(self) -> str:
        return self.triggers.mode if self.triggers is not None else "polling"

    def sync(self, policy: Policy) -> list[tuple[int, str]]:
        """Attach what the enabled rules need and detach the rest; (syslog priority, line) per change.

        Attaching bpf/sched.c may raise KernelFeatureError (nothing is then attached). PSI
        triggers that cannot be armed leave the daemon polling, said in the returned lines.
        """
        wanted = collectors_for(policy.enabled_rules())
        changes: list[tuple[int, str]] = []
        if "sched" in wanted and self.sched is None and self.make_sched is not None:
            sched = self.make_sched()
            try:
                sched.start()
            except BaseException:
                sched.close()
                raise
            self.sched = sched
            changes.append((LOG_NOTICE, "attached bpf/sched.c"))
        elif "sched" not in wanted and self.sched is not None:
            self.sched.close()
            self.sched = None
            changes.append((LOG_NOTICE, "detached bpf/sched.c"))
        changes += self._sync_net(policy, "net" in wanted)
        key = _psi_key(policy) if "psi_triggers" in wanted else None
        if key != self._triggers_for:
            if self.triggers is not None:
                self.triggers.close()
                self.triggers = None
                changes.append((LOG_NOTICE, "disarmed the PSI triggers"))
            self._triggers_for = key
            if key is not None and self.make_triggers is not None:
                try:
                    self.triggers = self.make_triggers(key[0], key[1], PSI_TRIGGER_WINDOW_S)
                    changes.append((LOG_NOTICE, f"PSI triggers: {self.triggers.mode}"))
                except Exception as exc:
                    changes.append(
                        (LOG_WARNING, f"PSI triggers unavailable, polling every tick: {exc}")
                    )
        return changes

    def _sync_net(self, policy: Policy, wanted: bool) -> list[tuple[int, str]]:
        """bpf/net.c follows the network rules; a kernel that refuses it disables only them."""
        from .bpfload import KernelFeatureError

        if not wanted or self.make_net is None:
            self.net_problem = ""
            if self.net is None:
                return []
            self.net.close()
            self.net = None
            return [(LOG_NOTICE, "detached bpf/net.c")]
        if self.net is None:
            net = self.make_net()
            net.set_short_lived(policy.daemon.short_lived_s)
            try:
                net.start()
            except KernelFeatureError as exc:
                net.close()
                self.net_problem = str(exc)
                return [(LOG_ERR, f"network rules disabled, bpf/net.c cannot attach: {exc}")]
            self.net = net
            self.net_problem = ""
            change = [(LOG_NOTICE, "attached bpf/net.c")]
        else:
            change = []
        self.net.set_short_lived(policy.daemon.short_lived_s)
        # /proc/PID/net/tcp is read once the kernel's counts reach half the alert level
        self.net.port_gate_pct = policy.settings(PortExhaustion).pct / 2
        return change

    def close(self) -> None:
        if self.net is not None:
            self.net.close()
            self.net = None
        if self.sched is not None:
            self.sched.close()
            self.sched = None
        if self.triggers is not None:
            self.triggers.close()
            self.triggers = None
        self._triggers_for = None
