"""The daemon on D-Bus: org.linnix.linnixd1.Manager methods, properties, the Alert signal, the polkit gate.

Interface org.linnix.linnixd1.Manager on /org/linnix/linnixd1 (stable signatures):

    Status() -> s                                  JSON object (Api.status())
    RecentAlerts(d since, s rule, u limit) -> s    JSON array of Alert.to_dict(), newest first (at
                                                   most 4 MiB: fewer rows when the budget is reached)
    RecentAlertsPage(d since, s rule, u limit, s cursor) -> s  JSON {alerts, truncated, cursor}: the
                                                   same rows; pass cursor back for the next page
    OpenIncidents() -> s                           JSON array of Alert.to_dict()
    Explain(s incident) -> s                       JSON {headline, facts, suffered, uncertain, actions,
                                                   snapshot, resolution}; "latest" = the newest incident;
                                                   Error.NoSuchIncident when unknown or without snapshot
    IncidentHistory(d since, u limit) -> s         JSON array of incidents from the history, newest first
    TopCgroups(u limit) -> s                       JSON array of cgroup rows
    StallTable(u limit) -> s                       JSON array of {victim, culprit, stall_ms, share, window_s}
    Query(s table, a{ss} where, s sort, u limit) -> s  cgroups/stalls/alerts rows filtered by
                                                   namespace, pod, container, unit, rule (alerts: since)
    ReloadPolicy() -> s                            one-line result; polkit org.linnix.linnixd1.reload-policy
    EnableEnforcement(b dry_run) -> s              polkit org.linnix.linnixd1.manage-enforcement
    DisableEnforcement() -> s                      polkit org.linnix.linnixd1.manage-enforcement
    ListActions() -> s                             JSON array of active actions (the ledger)
    Throttle(s unit, d cpu_pct, d duration_s) -> s polkit org.linnix.linnixd1.act
    Unthrottle(s unit) -> s                        polkit org.linnix.linnixd1.act
    signal ActionTaken(s unit, s action, s before, s after, s rule, s incident), ActionReverted(same)
    signal Alert(s rule, s severity, s summary, a{sv} details)
    properties (read-only): Version s, EnforcementEnabled b, PolicyPath s, StartedAt d,
                            Events t, DroppedEvents t, Alerts t, DryRun b (when enforcement is available)

The operations and their argument rules are linnixd/api.py's; the handlers here decode, call and
encode. Every call is dispatched here from the raw message (bus.add_message_handler), because dbus-next's
ServiceInterface hides the caller. Methods are exported with @exported; a method that is not
also marked @read_only is authorized through polkit for the caller's unique name before it
runs, so a forgotten marker means "authorization required", never "open".

History reads run in a worker thread (historyreader.py) with a busy limit (Error.Busy), the
connection has a bounded writer and is kept up by a supervisor (busconnection.py), Peer is
answered on every path, and no error text echoes more than a short prefix of caller input.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import MessageFlag, NameFlag, RequestNameReply

from . import client
from .api import (
    BUSY,
    FAILED,
    INVALID_ARGS,
    NO_SUCH_INCIDENT,
    POLICY_INVALID,
    Api,
    ApiError,
    DaemonCore,
)
from .busconnection import BoundedWriter, BusSupervisor, harden, machine_id, peer_reply
from .constants import POLKIT_ACT, POLKIT_ENFORCEMENT, POLKIT_RELOAD
from .daemonlog import LOG_ERR, LOG_WARNING, log
from .health import Health
from .model import Alert
from .wire import (
    ACTION_SIGNALS,
    ACTION_SIGNATURE,
    ALERT_SIGNAL,
    ALERT_SIGNATURE,
    BUS_NAME,
    DBUS_INTERFACE,
    DBUS_NAME,
    DBUS_PATH,
    ERROR_BUSY,
    ERROR_FAILED,
    ERROR_INVALID_ARGS,
    ERROR_NO_SUCH_INCIDENT,
    ERROR_NOT_AUTHORIZED,
    ERROR_POLICY,
    INTROSPECTABLE_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PROPERTIES_CHANGED_SIGNATURE,
    PROPERTIES_INTERFACE,
    encode_action,
    encode_alert,
    to_json,
)

# ApiError kinds -> D-Bus error names
API_ERRORS = {
    INVALID_ARGS: ERROR_INVALID_ARGS,
    NO_SUCH_INCIDENT: ERROR_NO_SUCH_INCIDENT,
    POLICY_INVALID: ERROR_POLICY,
    FAILED: ERROR_FAILED,
    BUSY: ERROR_BUSY,
}
# (D-Bus name, signature, key in Api.properties()); all read-only
PROPERTIES = (
    ("Version", "s", "version"),
    ("EnforcementEnabled", "b", "enforcement_enabled"),
    ("PolicyPath", "s", "policy_path"),
    ("StartedAt", "d", "started_at"),
    ("Events", "t", "events"),
    ("DroppedEvents", "t", "dropped_events"),
    ("Alerts", "t", "alerts"),
    ("DryRun", "b", "dry_run"),  # only when enforcement is available
)
AUTH_TIMEOUT_S = 25.0  # a polkit that has not answered by then is a denial
PROPERTIES_INTERVAL_S = 1.0  # PropertiesChanged for the counters at most this often
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar(
    "linnixd_caller", default=""
)  # unique name of the call being run

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
POLKIT_ALLOW_USER_INTERACTION = 1
DBUS_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
DBUS_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
DBUS_UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
DBUS_PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
DBUS_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"


class BusError(Exception):
    """An error reply: a D-Bus error name and a one-line message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = " ".join(message.splitlines())


@dataclass(frozen=True)
class Export:
    """One exported method: its D-Bus shape and, unless read-only, the polkit action it needs."""

    name: str
    in_args: tuple[tuple[str, str], ...]  # (name, signature)
    out_args: tuple[tuple[str, str], ...]
    read_only: bool
    action: str
    doc: str
    fn: Callable[..., Any]

    @property
    def in_signature(self) -> str:
        return "".join(sig for _, sig in self.in_args)

    @property
    def out_signature(self) -> str:
        return "".join(sig for _, sig in self.out_args)


def exported(
    name: str,
    in_args: tuple[tuple[str, str], ...] = (),
    out_args: tuple[tuple[str, str], ...] = (("result", "s"),),
    *,
    action: str = POLKIT_ACT,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Export a method. It needs polkit `action` (default: the most privileged one) unless @read_only."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__bus_export__ = (name, in_args, out_args, action)  # type: ignore[attr-defined]
        return fn

    return mark


def read_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an exported method as a read that any local user may call without polkit."""
    fn.__bus_read_only__ = True  # type: ignore[attr-defined]
    return fn


def collect_exports(cls: type) -> dict[str, Export]:
    out: dict[str, Export] = {}
    attrs = {k: v for klass in reversed(cls.__mro__) for k, v in vars(klass).items()}
    for attr in attrs.values():
        spec = getattr(attr, "__bus_export__", None)
        if spec is None:
            continue
        name, in_args, out_args, action = spec
        out[name] = Export(
            name=name,
            in_args=in_args,
            out_args=out_args,
            read_only=bool(getattr(attr, "__bus_read_only__", False)),
            action=action,
            doc=" ".join((attr.__doc__ or "").split()),
            fn=attr,
        )
    return out


class BusService:
    """Binds the API (linnixd/api.py) to one bus connection; create it with serve()."""

    def __init__(
        self, api: Api, bus: MessageBus, *, auth_timeout_s: float = AUTH_TIMEOUT_S
    ) -> None:
        self.api = api
        self.bus = bus
        self.auth_timeout_s = auth_timeout_s
        self.exports = collect_exports(type(self))
        self.internal_errors = 0  # calls that failed inside the daemon (ERROR_FAILED replies)
        self.send_failures = 0  # signals and replies the connection could not send
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancel_ids = itertools.count(1)
        self._last_props: dict[str, Any] = {}
        self._props_task: asyncio.Task[Any] | None = None
        self._disconnect_task: asyncio.Task[Any] | None = None
        self.machine_id: str | None = None
        self.supervised = False

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, *, subscribe: bool = True) -> None:
        """Serve on the connection; `subscribe=False` when a supervisor relays alerts (once)."""
        self.machine_id = machine_id()
        self.bus.add_message_handler(self._on_message)
        if subscribe:
            self.api.subscribe(alerts=self.send_alert, actions=self.send_action)
        reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RuntimeError(f"the bus name {BUS_NAME} is taken: is another linnixd running?")
        self._last_props = self._changing_properties()
        self._props_task = asyncio.ensure_future(self._properties_loop())
        self._disconnect_task = asyncio.ensure_future(self._watch_disconnect())

    async def _watch_disconnect(self) -> None:
        """Say so when the bus goes away (the daemon keeps monitoring without it)."""
        try:
            await self.bus.wait_for_disconnect()
            reason = ""
        except Exception as exc:
            reason = f": {exc!r}"
        if not self._closed:
            self._closed = True
            if self._props_task is not None:
                self._props_task.cancel()
            if not self.supervised:  # a supervisor says so itself, and reconnects
                log(
                    f"lost the bus connection{reason}; alerts still go to the other sinks",
                    LOG_WARNING,
                )

    def close(self) -> None:
        self._closed = True
        if self._props_task is not None:
            self._props_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.bus.disconnect()

    # ---- the exported methods: decode, call the API, encode ------------------------------

    @read_only
    @exported("Status")
    def Status(self) -> str:
        """The daemon's state as a JSON object: version, policy, rules, counters, open incidents."""
        return to_json(self.api.status())

    @read_only
    @exported("RecentAlerts", (("since", "d"), ("rule", "s"), ("limit", "u")))
    async def RecentAlerts(self, since: float, rule: str, limit: int) -> str:
        """Alerts from the history with ts >= since (epoch s), of rule ("" = any), newest first, as JSON."""
        page = await self.api.recent_alerts_page(since, rule, limit, "", _CALLER.get())
        return page.json

    @read_only
    @exported("RecentAlertsPage", (("since", "d"), ("rule", "s"), ("limit", "u"), ("cursor", "s")))
    async def RecentAlertsPage(self, since: float, rule: str, limit: int, cursor: str) -> str:
        """RecentAlerts in pages: {alerts, truncated, cursor}; pass cursor back for older alerts."""
        page = await self.api.recent_alerts_page(since, rule, limit, cursor, _CALLER.get())
        tail = to_json({"truncated": page.truncated, "cursor": page.cursor})
        return '{"alerts": ' + page.json + ", " + tail[1:]  # the rows are JSON already

    @read_only
    @exported("OpenIncidents")
    def OpenIncidents(self) -> str:
        """The firing alerts of incidents not yet resolved, as a JSON array."""
        return to_json(self.api.open_incidents())

    @read_only
    @exported("Explain", (("incident", "s"),))
    def Explain(self, incident: str) -> str:
        """What happened in an incident ("latest": the newest): headline, numbered facts, snapshot (JSON)."""
        return to_json(self.api.explain(incident))

    @read_only
    @exported("IncidentHistory", (("since", "d"), ("limit", "u")))
    def IncidentHistory(self, since: float, limit: int) -> str:
        """Incidents opened at or after since (epoch s), open and resolved, newest first (JSON)."""
        return to_json(self.api.incident_history(since, limit))

    @read_only
    @exported("TopCgroups", (("limit", "u"),))
    def TopCgroups(self, limit: int) -> str:
        """Cgroups by pressure: path, unit, cpu/io/memory some %, run-queue wait ms, memory bytes (JSON)."""
        return to_json(self.api.top_cgroups(limit))

    @read_only
    @exported("StallTable", (("limit", "u"),))
    def StallTable(self, limit: int) -> str:
        """Who made whom wait for a CPU: victim, culprit, stall_ms, share, window_s (JSON)."""
        return to_json(self.api.stall_table(limit))

    @read_only
    @exported("Query", (("table", "s"), ("where", "a{ss}"), ("sort", "s"), ("limit", "u")))
    def Query(self, table: str, where: dict[str, str], sort: str, limit: int) -> str:
        """Rows of cgroups, stalls or alerts filtered by namespace, pod, container, unit (globs), rule (JSON)."""
        return to_json(self.api.query(table, dict(where), sort, limit))

    @exported("ReloadPolicy", action=POLKIT_RELOAD)
    def ReloadPolicy(self) -> str:
        """Re-read the policy file; a bad file is refused (PolicyInvalid) and the old policy keeps running."""
        return self.api.reload()

    @exported("EnableEnforcement", (("dry_run", "b"),), action=POLKIT_ENFORCEMENT)
    async def EnableEnforcement(self, dry_run: bool) -> str:
        """Let linnixd act on the rules that have an action (dry_run: only journal what it would do)."""
        return await self.api.set_enforcement(True, dry_run, await self.caller())

    @exported("DisableEnforcement", action=POLKIT_ENFORCEMENT)
    async def DisableEnforcement(self) -> str:
        """Back to monitor-only; actions taken by rules are reverted (manual ones run out)."""
        return await self.api.set_enforcement(False, False, await self.caller())

    @read_only
    @exported("ListActions")
    def ListActions(self) -> str:
        """Actions applied and not yet reverted: unit, action, before, after, rule, incident, expires_at (JSON)."""
        return to_json(self.api.list_actions())

    @exported("Throttle", (("unit", "s"), ("cpu_pct", "d"), ("duration_s", "d")), action=POLKIT_ACT)
    async def Throttle(self, unit: str, cpu_pct: float, duration_s: float) -> str:
        """CPUQuota= on a unit for duration_s seconds (runtime only, reverted after), by hand."""
        return await self.api.throttle(unit, cpu_pct, duration_s, await self.caller())

    @exported("Unthrottle", (("unit", "s"),), action=POLKIT_ACT)
    async def Unthrottle(self, unit: str) -> str:
        """Restore a unit's CPUQuota= from before linnixd throttled it."""
        return await self.api.unthrottle(unit)

    async def caller(self) -> Any:
        """Who is calling: uid and pid from the bus daemon for the caller's unique name."""
        from .enforcement import Caller

        sender = _CALLER.get()
        values: list[int | None] = []
        for member in ("GetConnectionUnixUser", "GetConnectionUnixProcessID"):
            msg = client.method_call(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, member, "s", [sender])
            try:
                reply = await client.call(self.bus, msg, self.auth_timeout_s)
                values.append(int(reply.body[0]))
            except (client.BusClientError, TypeError, ValueError, IndexError):
                values.append(None)  # recorded as unknown; the caller was authorized already
        return Caller(bus_name=sender, uid=values[0], pid=values[1])

    def health(self) -> Health:
        writer = getattr(self.bus, "_writer", None)
        w = writer.health() if isinstance(writer, BoundedWriter) else {}
        return Health(
            counters={
                "internal_errors": self.internal_errors,
                "send_failures": self.send_failures,
                "dropped_messages": w.get("dropped_messages", 0),
                "would_block": w.get("would_block", 0),
            },
            gauges={
                "queued_bytes": w.get("queued_bytes", 0),
                "peak_queued_bytes": w.get("peak_queued_bytes", 0),
            },
        )

    def send_action(self, name: str, event: Mapping[str, str]) -> None:
        """Enforcer listener: ActionTaken / ActionReverted(unit, action, before, after, rule, incident)."""
        if self._closed or name not in ACTION_SIGNALS:
            return
        self._send(
            Message.new_signal(
                OBJECT_PATH, MANAGER_INTERFACE, name, ACTION_SIGNATURE, encode_action(event)
            )
        )

    # ---- properties and the Alert signal ------------------------------------------------

    def properties(self) -> dict[str, Variant]:
        """The API's properties under their D-Bus names and signatures (PROPERTIES)."""
        values = self.api.properties()
        return {
            name: Variant(signature, values[key])
            for name, signature, key in PROPERTIES
            if key in values
        }

    def _changing_properties(self) -> dict[str, Any]:
        return {
            k: v.value for k, v in self.properties().items() if k not in ("Version", "StartedAt")
        }

    async def _properties_loop(self) -> None:
        while True:
            await asyncio.sleep(PROPERTIES_INTERVAL_S)
            self.emit_properties_changed()

    def emit_properties_changed(self) -> None:
        """PropertiesChanged with the properties that differ from the last emission, if any."""
        props = self.properties()
        now = self._changing_properties()
        changed = {k: props[k] for k, v in now.items() if self._last_props.get(k) != v}
        self._last_props = now
        if changed:
            self._send(
                Message.new_signal(
                    OBJECT_PATH,
                    PROPERTIES_INTERFACE,
                    "PropertiesChanged",
                    PROPERTIES_CHANGED_SIGNATURE,
                    [MANAGER_INTERFACE, changed, []],
                )
            )

    def send_alert(self, alert: Alert) -> None:
        """Daemon alert listener: broadcast Alert(rule, severity, summary, details)."""
        if self._closed:
            return
        self._send(
            Message.new_signal(
                OBJECT_PATH,
                MANAGER_INTERFACE,
                ALERT_SIGNAL,
                ALERT_SIGNATURE,
                encode_alert(alert),
            )
        )

    def _send(self, msg: Message) -> None:
        if self._closed or not self.bus.connected:
            self.send_failures += 1
            return
        self.bus.send(msg).add_done_callback(self._count_send_failure)

    def _count_send_failure(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.send_failures += 1

    # ---- dispatch -----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        """Handles every method call to our object; returns False for the rest (dbus-next answers)."""
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        peer = peer_reply(msg, self.machine_id)  # any path; dbus-next's own GetMachineId fails
        if peer is not None:
            self._send(peer)
            return True
        if msg.path != OBJECT_PATH:
            if (
                msg.interface == INTROSPECTABLE_INTERFACE
                and msg.member == "Introspect"
                and _is_ancestor(msg.path)
            ):
                self._reply(msg, "s", [_ancestor_xml(msg.path)])
                return True
            return False
        if msg.interface == PROPERTIES_INTERFACE:
            self._on_properties(msg)
        elif msg.interface == INTROSPECTABLE_INTERFACE:
            self._reply(msg, "s", [self.introspect()])
        elif msg.interface == MANAGER_INTERFACE or (
            msg.interface is None and msg.member in self.exports
        ):
            self._on_method(msg)
        else:
            return False
        return True

    def _on_method(self, msg: Message) -> None:
        export = self.exports.get(msg.member)
        if export is None:
            self._error(msg, DBUS_UNKNOWN_METHOD, f"{MANAGER_INTERFACE} has no method {msg.member}")
            return
        if msg.signature != export.in_signature:
            self._error(
                msg,
                ERROR_INVALID_ARGS,
                f"{export.name} takes ({export.in_signature}), got ({msg.signature})",
            )
            return
        if export.read_only and not inspect.iscoroutinefunction(export.fn):
            self._send(self._run(export, msg))
            return
        if (
            export.read_only
        ):  # a slow read (history): awaited off the dispatch, never queued unbounded
            task = asyncio.ensure_future(self._run_read(export, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        task = asyncio.ensure_future(self._run_authorized(export, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_authorized(self, export: Export, msg: Message) -> None:
        # polkit may ask for a password only when the caller allowed it (linnixctl
        # --no-ask-password does not), as systemd's own methods decide
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        allowed, why = await self.check_authorization(msg.sender, export.action, interactive)
        if self._closed:
            return
        if not allowed:
            self._error(
                msg,
                ERROR_NOT_AUTHORIZED,
                f"{export.name} needs polkit action {export.action}: {why}",
            )
            return
        self._send(await self._run_async(export, msg))

    async def _run_read(self, export: Export, msg: Message) -> None:
        reply = await self._run_async(export, msg)
        if not self._closed:
            self._send(reply)

    async def _run_async(self, export: Export, msg: Message) -> Message:
        """_run for methods that may await (enforcement talks to systemd); the caller is in _CALLER."""
        _CALLER.set(msg.sender or "")
        try:
            result = export.fn(self, *msg.body)
            if inspect.isawaitable(result):
                result = await result
            return Message.new_method_return(msg, export.out_signature, [result])
        except Exception as exc:
            return self._error_reply(export, msg, exc)

    def _error_reply(self, export: Export, msg: Message, exc: Exception) -> Message:
        """A named error with one line for any failure of a method: never a traceback."""
        if isinstance(exc, BusError):
            return Message.new_error(msg, exc.name, exc.message)
        if isinstance(exc, ApiError):
            return Message.new_error(msg, API_ERRORS.get(exc.kind, ERROR_FAILED), exc.message)
        self.internal_errors += 1
        line = " ".join(str(exc).splitlines()) or type(exc).__name__
        log(f"{export.name} failed: {type(exc).__name__}: {line}", LOG_ERR)
        return Message.new_error(msg, ERROR_FAILED, f"{export.name} failed: {line}")

    def _run(self, export: Export, msg: Message) -> Message:
        """Call the method; every failure becomes a named error with one line, never a traceback."""
        try:
            result = export.fn(self, *msg.body)
            return Message.new_method_return(msg, export.out_signature, [result])
        except Exception as exc:
            return self._error_reply(export, msg, exc)

    async def check_authorization(
        self, sender: str | None, action: str, interactive: bool = True
    ) -> tuple[bool, str]:
        """polkit CheckAuthorization for the caller's unique name; any failure or timeout denies."""
        if not sender or not sender.startswith(":"):
            return False, "the caller has no unique bus name"
        cancel_id = f"linnixd-{next(self._cancel_ids)}"
        call = client.method_call(
            POLKIT_NAME,
            POLKIT_PATH,
            POLKIT_INTERFACE,
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            [
                ["system-bus-name", {"name": Variant("s", sender)}],
                action,
                {},
                POLKIT_ALLOW_USER_INTERACTION if interactive else 0,
                cancel_id,
            ],
        )
        try:
            reply = await client.call(self.bus, call, self.auth_timeout_s)
        except client.CallTimeout:
            self._cancel_check(cancel_id)
            return False, f"polkit did not answer within {self.auth_timeout_s:g} s"
        except client.ErrorReply as exc:
            return False, f"polkit check failed: {exc.error_name}: {exc.detail}"
        except client.BusClientError as exc:
            return False, f"polkit check failed: {exc.detail}"
        try:
            is_authorized, is_challenge, _details = reply.body[0]
        except (TypeError, ValueError, IndexError):
            return False, "polkit sent a malformed answer"
        if is_authorized is True:
            return True, ""
        if not is_challenge:
            return False, "denied by polkit"
        if not interactive:
            return False, "authentication is required and the caller did not allow interaction"
        return False, "authentication is required and no agent answered"

    def _cancel_check(self, cancel_id: str) -> None:
        self._send(
            Message(
                destination=POLKIT_NAME,
                path=POLKIT_PATH,
                interface=POLKIT_INTERFACE,
                member="CancelCheckAuthorization",
                signature="s",
                body=[cancel_id],
                flags=MessageFlag.NO_REPLY_EXPECTED,  # nothing to wait for
            )
        )

    def _on_properties(self, msg: Message) -> None:
        props = self.properties()
        if msg.member == "Get" and msg.signature == "ss":
            iface, name = msg.body
            if iface not in (MANAGER_INTERFACE, "") or name not in props:
                self._error(msg, DBUS_UNKNOWN_PROPERTY, f"no property {_clip(iface)}.{_clip(name)}")
            else:
                self._reply(msg, "v", [props[name]])
        elif msg.member == "GetAll" and msg.signature == "s":
            if msg.body[0] not in (MANAGER_INTERFACE, ""):
                self._error(
                    msg,
                    DBUS_UNKNOWN_INTERFACE,
                    f"no interface {_clip(msg.body[0])} on {OBJECT_PATH}",
                )
            else:
                self._reply(msg, "a{sv}", [props])
        elif msg.member == "Set" and msg.signature == "ssv":
            self._error(msg, DBUS_PROPERTY_READ_ONLY, "every linnixd property is read-only")
        else:
            self._error(
                msg,
                DBUS_INVALID_ARGS,
                f"no method {PROPERTIES_INTERFACE}.{msg.member}({msg.signature})",
            )

    def _reply(self, msg: Message, signature: str, body: list[Any]) -> None:
        self._send(Message.new_method_return(msg, signature, body))

    def _error(self, msg: Message, name: str, text: str) -> None:
        self._send(Message.new_error(msg, name, text))

    def introspect(self) -> str:
        """Introspection XML generated from the exports, with each method's contract as a comment."""
        parts = [_XML_HEADER, "<node>", f' <interface name="{MANAGER_INTERFACE}">']
        for export in self.exports.values():
            gate = "any local user" if export.read_only else f"polkit {export.action}"
            parts.append(f"  <!-- {escape(export.doc)} ({gate}) -->")
            parts.append(f'  <method name="{export.name}">')
            for name, sig in export.in_args:
                parts.append(f'   <arg name="{name}" type="{sig}" direction="in"/>')
            for name, sig in export.out_args:
                parts.append(f'   <arg name="{name}" type="{sig}" direction="out"/>')
            parts.append("  </method>")
        parts.append(
            "  <!-- One per alert, firing or resolved; details: state, id, incident, ts, pid, comm, unit, cgroup, parent, evidence (JSON) and evidence.<key> numbers -->"
        )
        parts.append(
            '  <signal name="Alert"><arg name="rule" type="s"/><arg name="severity" type="s"/><arg name="summary" type="s"/><arg name="details" type="a{sv}"/></signal>'
        )
        for name in ACTION_SIGNALS:
            parts.append(
                f'  <signal name="{name}"><arg name="unit" type="s"/><arg name="action" type="s"/><arg name="before" type="s"/><arg name="after" type="s"/><arg name="rule" type="s"/><arg name="incident" type="s"/></signal>'
            )
        for name, value in self.properties().items():
            parts.append(f'  <property name="{name}" type="{value.signature}" access="read"/>')
        parts.append(" </interface>")
        parts.append(_STANDARD_INTERFACES)
        parts.append("</node>")
        return "\n".join(parts)


_XML_HEADER = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">'
)
_STANDARD_INTERFACES = """ <interface name="org.freedesktop.DBus.Introspectable">
  <method name="Introspect"><arg name="data" type="s" direction="out"/></method>
 </interface>
 <interface name="org.freedesktop.DBus.Peer">
  <method name="Ping"/>
  <method name="GetMachineId"><arg name="machine_uuid" type="s" direction="out"/></method>
 </interface>
 <interface name="org.freedesktop.DBus.Properties">
  <method name="Get"><arg name="interface" type="s" direction="in"/><arg name="name" type="s" direction="in"/><arg name="value" type="v" direction="out"/></method>
  <method name="GetAll"><arg name="interface" type="s" direction="in"/><arg name="props" type="a{sv}" direction="out"/></method>
  <method name="Set"><arg name="interface" type="s" direction="in"/><arg name="name" type="s" direction="in"/><arg name="value" type="v" direction="in"/></method>
  <signal name="PropertiesChanged"><arg name="interface" type="s"/><arg name="changed" type="a{sv}"/><arg name="invalidated" type="as"/></signal>
 </interface>"""


def _clip(text: Any, most: int = 64) -> str:
    """Caller input in an error message: at most `most` characters (a reply never echoes a flood)."""
    text = str(text)
    return text if len(text) <= most else text[:most] + f"...({len(text)} characters)"


def _is_ancestor(path: str | None) -> bool:
    return bool(path) and (path == "/" or OBJECT_PATH.startswith(str(path).rstrip("/") + "/"))


def _ancestor_xml(path: str | None) -> str:
    """Introspection of /, /org, /org/linnix: one child node leading to our object (busctl tree)."""
    below = OBJECT_PATH[len(str(path).rstrip("/")) + 1 :]
    return f'{_XML_HEADER}\n<node>\n <node name="{below.split("/")[0]}"/>\n</node>'


async def serve(
    api: Api | DaemonCore, bus: str = "system", *, auth_timeout_s: float = AUTH_TIMEOUT_S
) -> BusService:
    """Connect to `bus`, own org.linnix.linnixd1 and serve `api` until BusService.close().

    The one place the daemon's connection is set up. Raises (one-line messages) when the bus
    is unreachable or the name cannot be owned.
    """
    connection = await client.connect(bus, setup=harden)
    service = BusService(
        api if isinstance(api, Api) else Api(api), connection, auth_timeout_s=auth_timeout_s
    )
    try:
        await service.start()
    except Exception:
        service.close()
        raise
    return service


class SupervisedBus:
    """The daemon's bus endpoint across reconnects: one relay for alerts, a service per connection."""

    def __init__(self, api: Api, supervisor: BusSupervisor) -> None:
        self.api = api
        self.supervisor = supervisor
        self.internal_errors = 0  # of the services on connections lost before
        self.send_failures = 0
        api.subscribe(alerts=self._alert, actions=self._action)

    @property
    def healthy(self) -> bool:
        return self.supervisor.healthy

    @property
    def service(self) -> BusService | None:
        service: BusService | None = self.supervisor.service
        return service

    def _alert(self, alert: Alert) -> None:
        service = self.service
        if service is None:
            self.send_failures += 1  # no connection right now: counted, the other sinks have it
        else:
            service.send_alert(alert)

    def _action(self, name: str, event: Mapping[str, str]) -> None:
        service = self.service
        if service is None:
            self.send_failures += 1
        else:
            service.send_action(name, event)

    def health(self) -> Health:
        sup = self.supervisor
        now = self.service.health() if self.service is not None else Health()
        counters = dict(now.counters)
        counters["internal_errors"] = counters.get("internal_errors", 0) + self.internal_errors
        counters["send_failures"] = counters.get("send_failures", 0) + self.send_failures
        counters["disconnects"] = sup.disconnects
        counters["reconnects"] = sup.reconnects
        return Health(counters=counters, gauges={**now.gauges, "connected": int(sup.healthy)})

    def close(self) -> None:
        self.supervisor.close()


async def supervise(
    api: Api | DaemonCore,
    bus: str = "system",
    *,
    on_give_up: Callable[[str], None] = lambda why: None,
    auth_timeout_s: float = AUTH_TIMEOUT_S,
    backoff_s: tuple[float, ...] | None = None,
    give_up_s: float | None = None,
) -> SupervisedBus:
    """serve() that stays on the bus: a lost connection is re-made, the name owned again.

    The first connection must succeed (raises like serve()); later losses are retried with
    backoff, and `on_give_up` is called when the bus stays away (the daemon then exits 69).
    """
    the_api = api if isinstance(api, Api) else Api(api)
    endpoint: SupervisedBus | None = None

    async def start(connection: MessageBus) -> BusService:
        service = BusService(the_api, connection, auth_timeout_s=auth_timeout_s)
        service.supervised = True
        try:
            await service.start(subscribe=False)
        except BaseException:
            service.close()
            raise
        return service

    def lost(service: Any) -> None:
        if endpoint is not None and isinstance(service, BusService):
            endpoint.internal_errors += service.internal_errors
            endpoint.send_failures += service.send_failures

    options: dict[str, Any] = {}
    if backoff_s is not None:
        options["backoff_s"] = backoff_s
    if give_up_s is not None:
        options["give_up_s"] = give_up_s
    supervisor = BusSupervisor(
        lambda: client.connect(bus, setup=harden),
        start,
        on_give_up=on_give_up,
        on_lost=lost,
        **options,
    )
    await supervisor.start()
    endpoint = SupervisedBus(the_api, supervisor)
    return endpoint
