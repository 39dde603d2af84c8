"""The composition root: builds every part of the daemon from the policy and the command line.

`build()` is the one place parts are made and wired: collectors, the host model, the state
directory and history, triage and names, sinks, the enforcer, the API, and the services the
Runner starts (the D-Bus endpoint, the enforcer's revert loop, the metrics exporter). The
daemon core gets its parts through its constructor; alerts and actions reach their listeners
through Daemon.subscribe. The Runner (daemon.py) only drives time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .api import Api
from .collector.attach import Attachments, NetSource, SchedSource, TriggerSource
from .constants import EXIT_OSERR, EXIT_UNAVAILABLE, STATE_DIR
from .daemon import CurrentPolicy, Daemon, _release_compiler_memory, open_history, open_state_dir
from .daemonlog import LOG_NOTICE, LOG_WARNING, log
from .health import Health
from .metrics import TextfileWriter
from .parts import Notifier, Sink
from .registry import collectors_for

# The start deadline is moved this far ahead at each slow start-up step (one BPF compile, the
# first /proc walk): ~2 s each on a quiet host, minutes under software emulation with load.
COMPILE_STEP_S = 180.0

if TYPE_CHECKING:
    from .bus import SupervisedBus
    from .config import Policy
    from .enforcement import Enforcer


class StartupError(Exception):
    """The daemon cannot start; `code` is the documented exit code, the message one line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Service(Protocol):
    """Something the Runner starts before the first tick and stops after the last."""

    name: str

    async def start(self) -> None: ...

    def stop(self) -> None: ...


class BusEndpoint:
    """The D-Bus service: owns the bus name and serves the API, reconnecting (bus.supervise)."""

    name = "bus"

    def __init__(self, api: Api, bus: str) -> None:
        self.api = api
        self.bus = bus
        self.service: SupervisedBus | None = None
        # the Runner's: called when the bus stays away (the daemon exits 69, systemd restarts it)
        self.fatal: Callable[[str], None] = lambda why: None

    @property
    def healthy(self) -> bool:
        """False while the connection is lost: the Runner does not feed the watchdog then."""
        return self.service is None or self.service.healthy

    async def start(self) -> None:
        from .bus import supervise

        try:
            self.service = await supervise(self.api, self.bus, on_give_up=self.fatal)
        except Exception as exc:
            raise StartupError(
                EXIT_UNAVAILABLE, f"cannot serve on the {self.bus} bus: {exc}"
            ) from None

    def stop(self) -> None:
        if self.service is not None:
            self.service.close()

    def health(self) -> Health:
        return self.service.health() if self.service is not None else Health()


class EnforcerLoop:
    """The enforcer's revert loop (actions run out, left-behind ones are reverted)."""

    name = "enforcer"

    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer
        self._task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.enforcer.run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class MetricsExporter:
    """Rewrites node_exporter's textfile every metrics_interval_s; removes it at stop."""

    name = "metrics"

    def __init__(self, writer: TextfileWriter, daemon: Daemon) -> None:
        self.writer = writer
        self.daemon = daemon
        self._task: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        """Rendered on the loop, written off it."""
        from .metrics import render

        loop = asyncio.get_running_loop()
        while True:
            try:
                data = render(self.daemon)
            except Exception as exc:  # a rendering bug must not stop the daemon; counted
                self.writer.write_errors += 1
                self.daemon._report_once("metrics render", f"metrics rendering failed: {exc!r}")
            else:
                await loop.run_in_executor(None, self.writer.write, data)
            await asyncio.sleep(self.daemon.policy.daemon.metrics_interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.writer.remove()


@dataclass
class Assembly:
    """A built daemon: its core, its API and the services to run around the tick loop."""

    daemon: Daemon
    api: Api
    bus: str  # system, session, none or an address (said in the start message)
    services: list[Service] = field(default_factory=list)


def _sched_factory() -> Callable[[], SchedSource] | None:
    """SchedCollector, or None where bcc's Python module is missing."""
    try:
        from .collector.sched import SchedCollector
    except ImportError:
        return None
    return SchedCollector


def _psi_triggers(resources: Sequence[str], some_pct: float, window_s: float) -> TriggerSource:
    from .collector.psi import PsiTriggers

    return PsiTriggers(list(resources), some_pct, window_s)


def _net_factory() -> NetSource:
    from .collector.net import NetCollector

    return NetCollector()


def _metrics_writer(args: argparse.Namespace, policy: Policy) -> TextfileWriter | None:
    """--metrics-dir, else the policy's metrics_dir when it exists (not with --foreground)."""
    if args.metrics_dir is not None:
        if args.metrics_dir in ("", "none"):
            return None
        return TextfileWriter(args.metrics_dir, log)
    directory = policy.daemon.metrics_dir
    if args.foreground or not directory or not os.path.isdir(directory):
        return None
    return TextfileWriter(directory, log)


def build(
    args: argparse.Namespace, policy_path: str, policy: Policy, notifier: Notifier
) -> Assembly:
    """Every part of the daemon for `policy` and the command line; StartupError when it cannot run."""
    from .collector.bpfload import KernelFeatureError
    from .collector.lifecycle import LifecycleCollector
    from .hostmodel import HostModel
    from .names import AlertNamer, NameResolver, row_names
    from .sinks import QueuedSink
    from .sinks.journal import JournalSink, event_writer, journald_present
    from .sinks.stdout import StdoutSink
    from .systemd_units import SystemdUnits
    from .triage import UNIT_TIMEOUT_S, Triage

    bus = args.bus if args.bus is not None else ("none" if args.foreground else "system")
    state_dir = args.state_dir or (None if args.foreground else STATE_DIR)
    state, state_problem = open_state_dir(state_dir)
    history, history_problem = open_history(state, policy) if state is not None else (None, "")

    # kernel collectors: lifecycle always, sched.c and PSI triggers while a rule needs them
    lifecycle = LifecycleCollector(policy.daemon.short_lived_s)
    attachments = Attachments(
        make_sched=None if args.no_sched else _sched_factory(),
        make_triggers=_psi_triggers,
        make_net=None if args.no_net else _net_factory,
    )
    try:
        notifier.progress(
            "compiling and attaching BPF: process lifecycle (bpf/lifecycle.c)", COMPILE_STEP_S
        )
        lifecycle.start()
        wanted = collectors_for(policy.enabled_rules())
        more = []
        if attachments.make_sched is not None and "sched" in wanted:
            more.append("scheduler stalls (bpf/sched.c)")
        if attachments.make_net is not None and "net" in wanted:
            more.append("TCP connections (bpf/net.c)")
        if more:
            notifier.progress(
                "compiling and attaching BPF: " + ", ".join(more), COMPILE_STEP_S * len(more)
            )
        for priority, line in attachments.sync(policy):
            if priority <= LOG_WARNING:  # at start-up only problems are said; Status tells the rest
                log(line, priority)
    except KernelFeatureError as exc:
        notifier.status(f"missing kernel feature, not starting: {exc}")
        attachments.close()
        lifecycle.close()
        raise StartupError(EXIT_OSERR, str(exc)) from None
    _release_compiler_memory()

    # with the scheduler program, per-process CPU comes from the kernel and only what ran is read
    sched = attachments.sched
    model = HostModel(
        max_processes=policy.daemon.max_processes,
        max_cgroups=policy.daemon.max_cgroups,
        cpu=sched.task_cpu() if sched is not None else None,
    )
    notifier.progress("reading the process table", COMPILE_STEP_S)
    model.seed()
    # idle per-cgroup lifecycle keys are pruned after one stat per key, not a walk of the tree
    lifecycle.cgroup_exists = model.resolver.exists

    # a snapshot per incident; the culprit unit's state comes from systemd with a short timeout
    triage = Triage(
        history,
        SystemdUnits("system", timeout_s=UNIT_TIMEOUT_S),
        log=lambda message: log(message, LOG_WARNING),
    )
    if attachments.make_net is not None:
        from .detectors.net import cgroup_net_fields

        triage.add_cgroup_fields(cgroup_net_fields)
    resolver = NameResolver(args.host_root, model.resolver.directory)
    # the incident snapshot's cgroup rows carry the same names (looked up for those rows only)
    triage.add_cgroup_fields(lambda _snap, path: row_names(resolver.names(path)))

    sinks: list[Sink] = []
    if args.foreground:
        sinks.append(QueuedSink(StdoutSink(args.output), on_error=log))
    if not args.no_journal and journald_present():
        try:
            sinks.append(QueuedSink(JournalSink(), on_error=log))
        except ImportError:
            log(
                "journald is running but python3-systemd is missing: alerts are not journaled",
                LOG_WARNING,
            )

    current = CurrentPolicy(policy)
    enforcer = None
    if state is not None:
        from .enforcement import Enforcer

        # systemd is on the system bus whatever bus linnixd serves on
        enforcer = Enforcer(
            state,
            SystemdUnits("system"),
            current.get,
            journal=event_writer(also_log=True, what="enforcement actions"),
            start_time_of=model.start_time_of,
        )
        if enforcer.enabled:
            log(
                f"enforcement is enabled{' (dry run)' if enforcer.dry_run else ''} (state in {state_dir})",
                LOG_NOTICE,
            )

    daemon = Daemon(
        policy_path,
        policy,
        current=current,
        lifecycle=lifecycle,
        attachments=attachments,
        model=model,
        history=history,
        events=event_writer(use_journal=not args.no_journal),
        triage=triage,
        namer=AlertNamer(resolver),
        enforcer=enforcer,
        sinks=sinks,
        notifier=notifier,
        state=state,
        state_problem=state_problem,
        history_problem=history_problem,
    )
    if enforcer is not None:
        daemon.subscribe(alerts=enforcer.on_alert, actions=triage.on_action)
    if history is not None:  # RecentAlerts in a worker thread on a connection of its own
        from .historyreader import HistoryReader

        daemon.history_reader = HistoryReader(history.path)
        daemon.register_health("history_reader", daemon.history_reader)

    api = Api(daemon)
    services: list[Service] = []
    if bus != "none":
        endpoint = BusEndpoint(api, bus)
        daemon.register_health("bus", endpoint)
        services.append(endpoint)
    if enforcer is not None:
        services.append(EnforcerLoop(enforcer))
    writer = _metrics_writer(args, policy)
    if writer is not None:
        daemon.register_health("metrics", writer)
        log(f"metrics for node_exporter in {writer.path}")
        services.append(MetricsExporter(writer, daemon))
    return Assembly(daemon, api, bus, services)


__all__ = ["Assembly", "BusEndpoint", "Service", "StartupError", "build"]
