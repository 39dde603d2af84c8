"""linnixctl: the command line client of linnixd's D-Bus interface (plus check-config and demos)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from dbus_next import Message, MessageType

from . import __version__, client, polkitagent
from .api import cpu_pct_problem
from .client import bus_label
from .constants import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_NOINPUT,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    MAX_CPU_PCT,
)
from .model import Alert, owner_label
from .wire import (
    ACTION_SIGNALS,
    ACTION_SIGNATURE,
    ALERT_SIGNAL,
    ALERT_SIGNATURE,
    BUS_NAME,
    DBUS_INTERFACE,
    DBUS_NAME,
    DBUS_PATH,
    ERROR_INVALID_ARGS,
    ERROR_NO_SUCH_INCIDENT,
    ERROR_NOT_AUTHORIZED,
    ERROR_POLICY,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    decode_action,
    decode_alert,
    signal_match,
)

CALL_TIMEOUT_S = 30.0  # longer than the daemon's 25 s polkit timeout, so its answer wins
_UNAVAILABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.NoServer",
}
_DENIED = {
    ERROR_NOT_AUTHORIZED,
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class CtlError(Exception):
    """A failure with its exit code; main() prints the one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(error_name: str) -> int:
    """The documented exit code for a D-Bus error name."""
    if error_name in _UNAVAILABLE:
        return EXIT_UNAVAILABLE
    if error_name in _DENIED:
        return EXIT_NOPERM
    if error_name == ERROR_POLICY:
        return EXIT_CONFIG
    if error_name == ERROR_NO_SUCH_INCIDENT:
        return EXIT_NOINPUT
    if error_name in (ERROR_INVALID_ARGS, "org.freedesktop.DBus.Error.InvalidArgs"):
        return EXIT_USAGE
    return EXIT_FAILURE


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from '10m', '2h', '3d', '90s', '1w' (ago) or an ISO time (local if no zone)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 10m, 2h, 3d or an ISO time like 2025-11-21T14:00, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without a zone is local time, as people type it
    return when.timestamp()


class Client:
    """One connection to linnixd over the chosen bus; every failure is a CtlError with its exit code."""

    def __init__(self, bus: str) -> None:
        self.bus_spec = bus
        self.bus: Any = None

    async def __aenter__(self) -> Client:
        try:
            self.bus = await client.connect(self.bus_spec, CALL_TIMEOUT_S)
        except client.BusUnreachable as exc:
            text = (
                exc.detail
                if exc.timed_out
                else f"cannot reach {bus_label(self.bus_spec)}: {exc.detail}"
            )
            raise CtlError(EXIT_UNAVAILABLE, text) from None
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    async def _call(self, msg: Message, what: str) -> Message:
        try:
            return await client.call(self.bus, msg, CALL_TIMEOUT_S)
        except client.CallTimeout:
            raise CtlError(
                EXIT_UNAVAILABLE, f"{what} did not answer {msg.member} within {CALL_TIMEOUT_S:g} s"
            ) from None
        except client.ConnectionLost as exc:
            raise CtlError(
                EXIT_UNAVAILABLE, f"lost {bus_label(self.bus_spec)}: {exc.detail}"
            ) from None
        except client.ErrorReply as exc:
            raise self.error(exc.error_name, exc.detail or exc.error_name) from None

    async def call(
        self, member: str, signature: str = "", body: Sequence[Any] = (), interactive: bool = False
    ) -> Any:
        """Call a Manager method; returns the first value of the reply or raises CtlError."""
        msg = client.method_call(
            BUS_NAME,
            OBJECT_PATH,
            MANAGER_INTERFACE,
            member,
            signature,
            body,
            interactive=interactive,
        )
        reply = await self._call(msg, "linnixd")
        return reply.body[0] if reply.body else None

    def error(self, error_name: str, text: str) -> CtlError:
        code = exit_code_for(error_name)
        if code == EXIT_UNAVAILABLE:
            text = f"linnixd is not running (nobody owns {BUS_NAME} on {bus_label(self.bus_spec)})"
        elif code == EXIT_NOPERM:
            text = f"permission denied: {text}"
        return CtlError(code, text)

    async def call_json(self, member: str, signature: str = "", body: Sequence[Any] = ()) -> Any:
        return json.loads(await self.call(member, signature, body))

    async def _bus_daemon(self, member: str, arg: str) -> Message:
        msg = client.method_call(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, member, "s", [arg])
        return await self._call(msg, "the bus daemon")

    async def has_owner(self) -> bool:
        reply = await self._bus_daemon("NameHasOwner", BUS_NAME)
        return bool(reply.body[0])

    async def add_match(self, rule: str) -> None:
        await self._bus_daemon("AddMatch", rule)


# ---- output -----------------------------------------------------------------------------


def emit(line: str) -> None:
    print(line, flush=True)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _uptime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def format_status(st: dict[str, Any]) -> list[str]:
    started = float(st.get("started_at") or 0)
    counters = st.get("counters") or {}
    lines = [
        f"linnixd {st.get('version', '?')}, running since {_stamp(started)} ({_uptime(time.time() - started)})",
        f"policy:       {st.get('policy_path', '?')} (tick {st.get('tick_s', '?')} s)",
        f"rules:        {', '.join(st.get('enabled_rules') or []) or 'none'}",
        f"transport:    {st.get('transport') or 'none'}, psi {st.get('psi_mode', '?')}",
        f"enforcement:  {'enabled' if st.get('enforcement_enabled') else 'disabled'}",
        f"tracked:      {st.get('processes', 0)} processes, {st.get('cgroups', 0)} cgroups",
        f"incidents:    {st.get('open_incidents', 0)} open",
        "counters:     " + " ".join(f"{k}={v}" for k, v in counters.items()),
    ]
    return lines


def format_alert(d: dict[str, Any]) -> str:
    from .sinks.stdout import format_text

    return format_text(Alert.from_dict(d))


def _cell(row: dict[str, Any], key: str, fmt: str = "{}") -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_stalls(stalls: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'STALL_MS':>9} {'SHARE':>6}  VICTIM <- CULPRIT"]
    for row in stalls:
        lines.append(
            f"{_cell(row, 'stall_ms', '{:.1f}'):>9} {_cell(row, 'share', '{:.0%}'):>6}  "
            f"{row.get('victim', '?')}{_named(row, 'victim_')} <- "
            f"{row.get('culprit', '?')}{_named(row, 'culprit_')}"
        )
    return lines


FILTERS = ("namespace", "pod", "container", "unit", "rule")


def _named(row: dict[str, Any], prefix: str = "") -> str:
    """' [pod NS/POD (container C)]' for a row whose cgroup the node names, else ''."""
    label = owner_label(
        row.get(prefix + "pod"), row.get(prefix + "namespace"), row.get(prefix + "container")
    )
    return f" [{label}]" if label else ""


def query_filters(args: argparse.Namespace, keys: Sequence[str] = FILTERS) -> dict[str, str]:
    """The Query method's `where` from --namespace, --pod, --container, --unit (and --rule)."""
    return {k: str(getattr(args, k)) for k in keys if getattr(args, k, None)}


def alert_from_signal(body: list[Any]) -> dict[str, Any]:
    """Alert.to_dict() form of an Alert signal (rule, severity, summary, a{sv} details)."""
    return decode_alert(body).to_dict()


# ---- commands ---------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace) -> int:
    async with Client(args.bus) as c:
        st = await c.call_json("Status")
    if args.json:
        emit(json.dumps(st, sort_keys=True))
    else:
        for line in format_status(st):
            emit(line)
    return EXIT_OK


def print_alerts(args: argparse.Namespace, rows: list[Any], empty: str) -> int:
    """One JSON array (--json: a listing is one document; only watch streams) or one readable
    line per alert; say so when there are none."""
    if args.json:
        emit(json.dumps(rows, sort_keys=True))
        return EXIT_OK
    for row in rows:
        emit(format_alert(row))
    if not rows:
        print(empty, file=sys.stderr)
    return EXIT_OK


async def cmd_alerts(args: argparse.Namespace) -> int:
    where = query_filters(args)
    async with Client(args.bus) as c:
        if set(where) - {"rule"}:
            where["since"] = repr(float(args.since))
            rows = await c.call_json("Query", "sa{ss}su", ["alerts", where, "", args.limit])
        else:
            rows = await c.call_json(
                "RecentAlerts", "dsu", [float(args.since), args.rule, args.limit]
            )
    rows.reverse()  # the daemon answers newest first; print in time order like journalctl
    return print_alerts(args, rows, "no alerts")


async def cmd_incidents(args: argparse.Namespace) -> int:
    if args.all:
        async with Client(args.bus) as c:
            rows = await c.call_json("IncidentHistory", "du", [float(args.since), args.limit])
        rows.reverse()  # oldest first, like `alerts`
        return show_rows(args, rows, format_incident_rows, "no incidents in the history")
    async with Client(args.bus) as c:
        rows = await c.call_json("OpenIncidents")
    return print_alerts(args, rows, "no open incidents")


def format_incident_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'OPENED':<19} {'STATE':<8} {'DURATION':>8}  {'INCIDENT':<32} {'RULE':<17} CULPRIT"]
    for r in rows:
        opened = float(r.get("opened_ts") or 0.0)
        resolved = r.get("resolved_ts")
        took = f"{float(resolved) - opened:.0f}s" if resolved is not None else "-"
        lines.append(
            f"{_stamp(opened):<19} {r.get('state', '?'):<8} {took:>8}  {r.get('incident', '?'):<32} "
            f"{r.get('rule', '?'):<17} {r.get('culprit', '?')}"
        )
    return lines


async def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import render

    async with Client(args.bus) as c:
        result = await c.call_json("Explain", "s", [args.incident])
    if args.json:
        emit(json.dumps(result, sort_keys=True))
    else:
        for line in render(result):
            emit(line)
        emit("")
        emit(
            f"incident {result.get('incident')}; the snapshot: linnixctl explain {result.get('incident')} --json"
        )
    return EXIT_OK


async def cmd_top(args: argparse.Namespace) -> int:
    from . import top

    # namespace, pod, container: names only the daemon knows; --unit is the view's own filter
    where = query_filters(args, ("namespace", "pod", "container"))
    async with Client(args.bus) as c:

        async def fetch() -> list[dict[str, Any]]:
            if where:
                query = ["cgroups", where, "pressure", top.FETCH_ROWS]
                return list(await c.call_json("Query", "sa{ss}su", query))
            return list(await c.call_json("TopCgroups", "u", [top.FETCH_ROWS]))

        if not (args.once or args.json) and sys.stdin.isatty() and sys.stdout.isatty():
            try:
                return await top.live(fetch, top.View(sort=args.sort, unit_filter=args.unit))
            except top.NoTerminal as exc:
                print(f"linnixctl: no live view ({exc}), printing once", file=sys.stderr)
        cgroups = await fetch()
        if where:
            stalls = await c.call_json("Query", "sa{ss}su", ["stalls", where, "", args.limit])
        else:
            stalls = await c.call_json("StallTable", "u", [args.limit])
    rows = top.select_rows(cgroups, args.sort, args.unit)[: args.limit]
    if args.json:
        emit(json.dumps({"cgroups": rows, "stalls": stalls}, sort_keys=True))
        return EXIT_OK
    for line in top.table(rows, top.COLUMNS, None):
        emit(line)
    if stalls:
        emit("")
        for line in format_stalls(stalls):
            emit(line)
    return EXIT_OK


def show_rows(
    args: argparse.Namespace, rows: Any, formatter: Callable[[Any], Iterable[str]], empty: str
) -> int:
    """Print rows as one JSON document (--json) or as formatted lines; say so when there are none."""
    if args.json:
        emit(json.dumps(rows, sort_keys=True))
    elif rows:
        for line in formatter(rows):
            emit(line)
    else:
        print(empty, file=sys.stderr)
    return EXIT_OK


async def cmd_stalls(args: argparse.Namespace) -> int:
    where = query_filters(args)
    async with Client(args.bus) as c:
        if where:
            stalls = await c.call_json("Query", "sa{ss}su", ["stalls", where, "", args.limit])
        else:
            stalls = await c.call_json("StallTable", "u", [args.limit])
    return show_rows(args, stalls, format_stalls, "no stalls attributed in the current window")


async def cmd_reload(args: argparse.Namespace) -> int:
    async with Client(args.bus) as c:
        emit(await c.call("ReloadPolicy", interactive=args.ask_password))
    return EXIT_OK


async def cmd_watch(args: argparse.Namespace) -> int:
    async with Client(args.bus) as c:
        for member in (ALERT_SIGNAL, *ACTION_SIGNALS):
            await c.add_match(signal_match(member))
        await c.add_match(
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{BUS_NAME}'"
        )
        if not await c.has_owner():
            raise CtlError(
                EXIT_UNAVAILABLE,
                f"linnixd is not running (nobody owns {BUS_NAME} on {bus_label(args.bus)})",
            )
        # on stderr, so stdout stays one record per line; a script can wait for it before acting
        print(f"linnixctl: watching linnixd on {bus_label(args.bus)}", file=sys.stderr, flush=True)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        seen = 0

        def on_message(msg: Message) -> None:
            nonlocal seen
            if msg.message_type != MessageType.SIGNAL or done.done():
                return
            if msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == BUS_NAME:
                print(
                    f"linnixctl: linnixd {'started' if msg.body[2] else 'stopped'}",
                    file=sys.stderr,
                    flush=True,
                )
                return
            if (
                msg.interface == MANAGER_INTERFACE
                and msg.member == ALERT_SIGNAL
                and msg.signature == ALERT_SIGNATURE
            ):
                row = alert_from_signal(msg.body)
                emit(json.dumps(row, sort_keys=True) if args.json else format_alert(row))
            elif (
                msg.interface == MANAGER_INTERFACE
                and msg.member in ACTION_SIGNALS
                and msg.signature == ACTION_SIGNATURE
            ):
                event = decode_action(msg.member, msg.body)
                emit(json.dumps(event, sort_keys=True) if args.json else format_action_event(event))
            else:
                return
            seen += 1
            if args.count and seen >= args.count:
                done.set_result(EXIT_OK)

        c.bus.add_message_handler(on_message)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if not done.done():
                done.set_result(EXIT_OK)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        disconnect = asyncio.ensure_future(c.bus.wait_for_disconnect())
        await asyncio.wait({done, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            raise CtlError(EXIT_UNAVAILABLE, f"lost {bus_label(args.bus)}")
        disconnect.cancel()
        return done.result()


def format_action_event(e: dict[str, str]) -> str:
    """One line per ActionTaken / ActionReverted signal."""
    what = "action taken" if e["signal"] == "ActionTaken" else "action reverted"
    values = (
        f"{e['before']} -> {e['after']}"
        if e["signal"] == "ActionTaken"
        else f"back to {e['before']}"
    )
    return f"{what}: {e['action']} {e['unit']} ({values}) rule {e['rule']} incident {e['incident'] or '-'}"


async def cmd_enforcement(args: argparse.Namespace) -> int:
    async with Client(args.bus) as c:
        if args.command == "enable-enforcement":
            emit(
                await c.call(
                    "EnableEnforcement", "b", [bool(args.dry_run)], interactive=args.ask_password
                )
            )
        else:
            emit(await c.call("DisableEnforcement", interactive=args.ask_password))
    return EXIT_OK


def format_actions(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'UNIT':<32} {'ACTION':<13} {'BEFORE':>20} {'AFTER':>20} {'REVERT IN':>9}  RULE (INCIDENT)"
    ]
    for row in rows:
        show = {
            k: "infinity" if row.get(k) == 2**64 - 1 else str(row.get(k))
            for k in ("before", "after")
        }
        left = max(0.0, float(row.get("expires_at", 0)) - time.time())
        lines.append(
            f"{row.get('unit', '?'):<32} {row.get('action', '?'):<13} {show['before']:>20} {show['after']:>20} "
            f"{left:>8.0f}s  {row.get('rule', '?')} ({row.get('incident') or '-'})"
        )
    return lines


async def cmd_actions(args: argparse.Namespace) -> int:
    async with Client(args.bus) as c:
        rows = await c.call_json("ListActions")
    return show_rows(args, rows, format_actions, "no active actions")


async def cmd_throttle(args: argparse.Namespace) -> int:
    async with Client(args.bus) as c:
        if args.command == "throttle":
            emit(
                await c.call(
                    "Throttle",
                    "sdd",
                    [args.unit, float(args.cpu), float(args.duration)],
                    interactive=args.ask_password,
                )
            )
        else:
            emit(await c.call("Unthrottle", "s", [args.unit], interactive=args.ask_password))
    return EXIT_OK


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentage of one CPU like 20, got {text!r}"
        ) from None
    if cpu_pct_problem(value) is not None:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_CPU_PCT:g}, got {text}"
        )
    return value


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import main_check_config

    return int(main_check_config([args.file]))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demos import main as demos_main

    return int(demos_main(args.demo_args))


# ---- command line -----------------------------------------------------------------------

DESCRIPTION = """\
linnixctl queries linnixd, the stall monitor, over D-Bus (name org.linnix.linnixd1):
its state, the alert history, the incidents still open, the cgroups under pressure and
who stalls whom. Reading needs no privilege; `reload` is authorized by polkit. It also
validates policy files and runs bounded demo workloads that trip one rule each.
"""

EPILOG = """\
exit status:
  0   success
  1   other failure
  64  bad command line, or arguments the daemon refused
  66  no such incident, or it has no snapshot (explain)
  69  linnixd is not running, or the bus is unreachable
  71  demo: cannot join the cgroup
  77  permission denied (bus policy or polkit)
  78  invalid policy (check-config, reload)
  128+N  demo: stopped by signal N

examples:
  linnixctl status
  linnixctl alerts --since 2h --rule fork_storm
  linnixctl watch --json | jq .
  linnixctl explain latest
  linnixctl incidents --all --since 1d
  linnixctl demo fork-storm

see also: linnixd(8), linnixd-policy(5), busctl(1), journalctl(1)
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors exit 64 (EX_USAGE) with a one-line message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


TOP_SORTS = (
    "pressure",
    "caused",
    "suffered",
    "cpu",
    "memory",
    "connections",
    "retransmits",
)  # linnixd.top.SORTS, without curses


def add_owner_filters(s: argparse.ArgumentParser, what: str, unit: bool = True) -> None:
    """--namespace, --pod, --container (and --unit): filtered by linnixd (the Query method)."""
    s.add_argument("--namespace", metavar="NS", help=f"only {what} in Kubernetes namespace NS")
    s.add_argument("--pod", metavar="NAME", help=f"only {what} in pod NAME (a glob: 'api-*')")
    s.add_argument("--container", metavar="NAME", help=f"only {what} in container NAME (a glob)")
    if unit:
        s.add_argument(
            "--unit",
            metavar="UNIT",
            help=f"only {what} in a systemd unit whose name contains UNIT (or matches a glob: 'cri-*.scope')",
        )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="linnixctl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bus",
        default="system",
        metavar="BUS",
        help="where linnixd is: system (default), session, or a D-Bus address such as unix:path=/run/x",
    )
    p.add_argument(
        "--no-ask-password",
        dest="ask_password",
        action="store_false",
        help="do not start a polkit agent (pkttyagent) or let polkit ask for a password: a command that needs authentication fails instead",
    )
    p.add_argument("--version", action="version", version=f"linnixctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("status", help="the daemon's state: policy, rules, counters, open incidents")
    s.add_argument("--json", action="store_true", help="print the status as one JSON object")
    s.set_defaults(run=cmd_status)

    s = sub.add_parser("alerts", help="recent alerts from the history, oldest first")
    s.add_argument(
        "--since",
        type=parse_since,
        default=0.0,
        metavar="WHEN",
        help="only alerts from WHEN on: a duration ago (90s, 10m, 2h, 3d, 1w) or an ISO time (2025-11-21T14:00, local unless a zone is given)",
    )
    s.add_argument(
        "--rule", default="", metavar="RULE", help="only alerts of this rule, e.g. fork_storm"
    )
    s.add_argument(
        "--limit",
        type=_positive,
        default=20,
        metavar="N",
        help="at most the N newest alerts (default 20, at most 10000)",
    )
    s.add_argument(
        "--json", action="store_true", help="one JSON array of alert records, oldest first"
    )
    add_owner_filters(s, "alerts whose culprit or victim is")
    s.set_defaults(run=cmd_alerts)

    s = sub.add_parser(
        "incidents", help="incidents still firing (--all: every incident in the history)"
    )
    s.add_argument(
        "--all",
        action="store_true",
        help="past incidents too, from the history: opened, state, duration, id, rule, culprit",
    )
    s.add_argument(
        "--since",
        type=parse_since,
        default=0.0,
        metavar="WHEN",
        help="with --all: only incidents opened from WHEN on (10m, 2h, 3d, or an ISO time)",
    )
    s.add_argument(
        "--limit",
        type=_positive,
        default=50,
        metavar="N",
        help="with --all: at most the N newest incidents (default 50, at most 10000)",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="one JSON array (of incident records with --all)",
    )
    s.set_defaults(run=cmd_incidents)

    s = sub.add_parser(
        "explain",
        help="what happened in an incident: headline, numbered facts with figures and sources, who suffered, what to do",
    )
    s.add_argument(
        "incident",
        nargs="?",
        default="latest",
        metavar="INCIDENT",
        help="an incident id (linnixctl incidents --all) or latest (default)",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help='one JSON object: {"headline", "facts", "suffered", "uncertain", "actions", "snapshot", "resolution"}',
    )
    s.set_defaults(run=cmd_explain)

    s = sub.add_parser(
        "watch",
        help="print alerts and enforcement actions (ActionTaken, ActionReverted) as linnixd signals them, until interrupted",
    )
    s.add_argument(
        "--json", action="store_true", help="one JSON object per line instead of a readable line"
    )
    s.add_argument("--count", type=_positive, metavar="N", help="exit after N alerts")
    s.set_defaults(run=cmd_watch)

    s = sub.add_parser(
        "top",
        help="cgroups by pressure, CPU, memory and the stall they cause and suffer; live on a terminal (q quits)",
    )
    s.add_argument(
        "--sort",
        choices=tuple(TOP_SORTS),
        default="pressure",
        help="order: pressure (highest PSI some %%), caused (stall caused to others), suffered, cpu or memory (default pressure; keys p c s u m on the live view)",
    )
    s.add_argument(
        "--unit",
        default="",
        metavar="TEXT",
        help="only cgroups whose unit contains TEXT (the / key on the live view)",
    )
    s.add_argument(
        "--once",
        action="store_true",
        help="print the tables once and exit (also what happens when output is not a terminal)",
    )
    s.add_argument(
        "--limit",
        type=_positive,
        default=10,
        metavar="N",
        help="rows per table when printed once (default 10, at most 1000)",
    )
    s.add_argument(
        "--json", action="store_true", help='one JSON object: {"cgroups": [...], "stalls": [...]}'
    )
    add_owner_filters(s, "cgroups (and stall rows with a side) that are", unit=False)
    s.set_defaults(run=cmd_top)

    s = sub.add_parser("stalls", help="who made whom wait for a CPU over the stall window")
    s.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="rows (default 20, at most 1000)"
    )
    s.add_argument("--json", action="store_true", help="print the table as a JSON array")
    add_owner_filters(s, "rows whose victim or culprit is")
    s.set_defaults(run=cmd_stalls)

    s = sub.add_parser(
        "reload", help="make linnixd re-read its policy (polkit: org.linnix.linnixd1.reload-policy)"
    )
    s.set_defaults(run=cmd_reload, privileged=True)

    s = sub.add_parser(
        "enable-enforcement",
        help="let linnixd act on rules that have an action (polkit: org.linnix.linnixd1.manage-enforcement)",
    )
    s.add_argument(
        "--dry-run", action="store_true", help="only journal what would be done; change nothing"
    )
    s.set_defaults(run=cmd_enforcement, privileged=True)

    s = sub.add_parser(
        "disable-enforcement", help="back to monitor-only; actions taken by rules are reverted"
    )
    s.set_defaults(run=cmd_enforcement, privileged=True)

    s = sub.add_parser(
        "actions", help="actions in force: unit, action, value before and after, time left"
    )
    s.add_argument("--json", action="store_true", help="print the ledger as a JSON array")
    s.set_defaults(run=cmd_actions)

    s = sub.add_parser(
        "throttle",
        help="cap a unit's CPU for a while (CPUQuota=, runtime; polkit: org.linnix.linnixd1.act)",
    )
    s.add_argument("unit", metavar="UNIT", help="the systemd unit, e.g. batch.service")
    s.add_argument(
        "--cpu",
        type=_percent,
        required=True,
        metavar="PCT",
        help="percent of one CPU (100 = one core)",
    )
    s.add_argument(
        "--duration",
        type=_positive,
        default=300,
        metavar="S",
        help="seconds until it is reverted (default 300, at most 86400)",
    )
    s.set_defaults(run=cmd_throttle, privileged=True)

    s = sub.add_parser(
        "unthrottle", help="restore a unit's CPUQuota= from before linnixctl throttle"
    )
    s.add_argument("unit", metavar="UNIT", help="the systemd unit")
    s.set_defaults(run=cmd_throttle, privileged=True)

    s = sub.add_parser(
        "check-config", help="validate a policy file without a daemon (0 valid, 78 invalid)"
    )
    s.add_argument("file", metavar="FILE", help="the policy file, e.g. /etc/linnixd/rules.yaml")
    s.set_defaults(run=cmd_check_config)

    # everything after `demo` belongs to the demos' own parser (linnixctl demo --help)
    s = sub.add_parser(
        "demo",
        add_help=False,
        help="run a bounded workload that trips one rule (linnixctl demo --help)",
    )
    s.set_defaults(run=cmd_demo, demo_args=[])
    return p


def _split_demo(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(linnixctl's own arguments, the demo's arguments or None when the command is not demo)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--bus":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return (argv[: i + 1], argv[i + 1 :]) if argv[i] == "demo" else (argv, None)
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    own, demo_args = _split_demo(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    if demo_args is not None:
        args.demo_args = demo_args
    # like systemctl: a polkit text agent for privileged commands typed on a terminal by a non-root user
    agent = (
        polkitagent.start() if getattr(args, "privileged", False) and args.ask_password else None
    )
    try:
        result = args.run(args)
        return int(asyncio.run(result) if asyncio.iscoroutine(result) else result)
    except CtlError as exc:
        print(f"linnixctl: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return EXIT_OK  # the reader went away (linnixctl watch | head)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if agent is not None:
            agent.close()


if __name__ == "__main__":
    sys.exit(main())
