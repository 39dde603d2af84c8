"""linnixctl top: cgroups by pressure, CPU, memory and the stall they cause and suffer.

Live on a terminal (curses, refreshed every second, keys sort and filter), printed once
otherwise. Rendering is pure (rows, view, size in; lines out) so it is tested without a
terminal; the curses loop only reads keys, fetches and draws.
"""

from __future__ import annotations

import asyncio
import curses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

REFRESH_S = 1.0
FETCH_ROWS = 1000  # the most TopCgroups answers (bus.MAX_ROWS): sorting and filtering are local
KEY_POLL_S = 0.05
MIN_LABEL = 30  # the CGROUP column keeps at least this much; numeric columns give way first
ELLIPSIS = "..."


@dataclass(frozen=True)
class Column:
    """One numeric column: the row key, its header (what the number is, with its unit), width."""

    key: str
    header: str
    width: int
    scale: float = 1.0  # displayed value = raw / scale
    meaning: str = ""


COLUMNS: tuple[Column, ...] = (
    Column("cpu_some_pct", "CPU_PSI%", 8, meaning="CPU pressure (PSI some), % of the last tick"),
    Column("io_some_pct", "IO_PSI%", 7, meaning="I/O pressure (PSI some), % of the last tick"),
    Column(
        "memory_some_pct", "MEM_PSI%", 8, meaning="memory pressure (PSI some), % of the last tick"
    ),
    Column("cpu_pct", "CPU%", 6, meaning="CPU used by the cgroup's own processes, % of one CPU"),
    Column("memory_bytes", "MEM_MB", 8, 1048576.0, "memory charged to the cgroup, MiB"),
    Column("stall_caused_ms", "CAUSED_MS", 9, meaning="CPU wait it caused others (stall window)"),
    Column(
        "stall_suffered_ms", "SUFFERED_MS", 11, meaning="CPU wait others caused it (stall window)"
    ),
    Column("runq_wait_ms", "RUNQ_MS", 8, meaning="its run-queue wait in the last tick"),
    Column("connects_per_s", "CONN/S", 7, meaning="TCP connections it opened per second (2 s)"),
    Column(
        "retransmits_per_s", "RETX/S", 7, meaning="TCP segments it retransmitted per second (2 s)"
    ),
)
_BY_KEY = {c.key: c for c in COLUMNS}
# narrow terminals drop these first; the columns of the current sort are never dropped
DROP_ORDER = (
    "retransmits_per_s",
    "connects_per_s",
    "runq_wait_ms",
    "memory_some_pct",
    "io_some_pct",
    "stall_suffered_ms",
    "stall_caused_ms",
    "memory_bytes",
    "cpu_pct",
    "cpu_some_pct",
)
PSI_KEYS = ("cpu_some_pct", "io_some_pct", "memory_some_pct")


@dataclass(frozen=True)
class Sort:
    name: str
    key: str  # the keyboard key
    columns: tuple[str, ...]  # the columns it orders by (kept on screen)

    def value(self, row: dict[str, Any]) -> float:
        return max(_num(row.get(c)) for c in self.columns)


SORTS: dict[str, Sort] = {
    s.name: s
    for s in (
        Sort("pressure", "p", PSI_KEYS),
        Sort("caused", "c", ("stall_caused_ms",)),
        Sort("suffered", "s", ("stall_suffered_ms",)),
        Sort("cpu", "u", ("cpu_pct",)),
        Sort("memory", "m", ("memory_bytes",)),
        Sort("connections", "n", ("connects_per_s",)),
        Sort("retransmits", "r", ("retransmits_per_s",)),
    )
}
SORT_TITLES = {
    "pressure": "pressure",
    "caused": "stall caused",
    "suffered": "stall suffered",
    "cpu": "CPU",
    "memory": "memory",
    "connections": "TCP connections",
    "retransmits": "TCP retransmits",
}
HELP = "p pressure  c caused  s suffered  u CPU  m memory  n conn  r retx  / filter unit  q quit"


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass
class View:
    """What the operator chose: sort order, unit filter, and the filter being typed (if any)."""

    sort: str = "pressure"
    unit_filter: str = ""
    editing: str | None = None

    def key(self, ch: int) -> bool:
        """Apply one key; False when it means quit."""
        if self.editing is not None:
            if ch in (10, 13, curses.KEY_ENTER):
                self.unit_filter, self.editing = self.editing.strip(), None
            elif ch == 27:  # Esc: leave the filter as it was
                self.editing = None
            elif ch in (curses.KEY_BACKSPACE, 127, 8):
                self.editing = self.editing[:-1]
            elif 32 <= ch < 127:
                self.editing += chr(ch)
            return True
        if ch in (ord("q"), ord("Q")):
            return False
        if ch in (ord("/"), ord("f")):
            self.editing = self.unit_filter
        for sort in SORTS.values():
            if ch == ord(sort.key):
                self.sort = sort.name
        return True


def select_rows(
    rows: Sequence[dict[str, Any]], sort: str, unit_filter: str
) -> list[dict[str, Any]]:
    """Rows whose unit contains the filter (case-insensitive), highest first by the sort."""
    needle = unit_filter.lower()
    chosen = [r for r in rows if not needle or needle in str(r.get("unit") or "").lower()]
    order = SORTS[sort]
    return sorted(chosen, key=lambda r: (-order.value(r), str(r.get("path", ""))))


def names_of(row: dict[str, Any]) -> str:
    """The names kept whole after the path: pod and container when the node knows them (the
    runtime's scope name says less), else the unit unless the path already ends in it."""
    path = str(row.get("path", "?"))
    unit = str(row.get("unit") or "")
    parts = []
    if row.get("pod"):
        ns = row.get("namespace")
        parts.append(f"pod {ns}/{row['pod']}" if ns else f"pod {row['pod']}")
    if row.get("container"):
        parts.append(f"container {row['container']}")
    if not parts and unit and unit != path and path.rsplit("/", 1)[-1] != unit:
        parts.append(unit)
    return f" ({', '.join(parts)})" if parts else ""


def fit_label(row: dict[str, Any], width: int) -> str:
    """Path and names in `width` characters: the middle of the path gives way, names stay whole."""
    path = str(row.get("path", "?"))
    names = names_of(row)
    if len(path) + len(names) <= width:
        return path + names
    last = path.rsplit("/", 1)[-1]
    tail = "/" + last if names == "" and last else ""  # the path ends in the unit: keep it whole
    head = path[: len(path) - len(tail)]
    room = width - len(names) - len(tail) - len(ELLIPSIS)
    if room >= 1:
        return head[:room] + ELLIPSIS + tail + names
    whole = (tail.lstrip("/") + names) if tail else names.strip()
    if len(ELLIPSIS) + len(whole) <= width:
        return ELLIPSIS + whole  # only the names: the whole path gave way
    # not even the names fit: cut at the end, said with the ellipsis
    return whole if len(whole) <= width else whole[: max(0, width - len(ELLIPSIS))] + ELLIPSIS


def columns_for(width: int, sort: str) -> list[Column]:
    """The numeric columns that fit beside a label of at least MIN_LABEL characters."""
    keep = set(SORTS[sort].columns)
    shown = list(COLUMNS)
    for key in DROP_ORDER:
        if width - sum(c.width + 1 for c in shown) - 1 >= MIN_LABEL:
            break
        if key not in keep:
            shown = [c for c in shown if c.key != key]
    return shown


def _cell(col: Column, row: dict[str, Any]) -> str:
    value = row.get(col.key)
    if value is None:
        return "-".rjust(col.width)
    return f"{_num(value) / col.scale:.1f}".rjust(col.width)


def table(
    rows: Sequence[dict[str, Any]], columns: Sequence[Column], label_width: int | None
) -> list[str]:
    """Header and one line per row; label_width None prints whole paths (not on a terminal)."""
    lines = [" ".join(c.header.rjust(c.width) for c in columns) + "  CGROUP (UNIT)"]
    for row in rows:
        label = (
            str(row.get("path", "?")) + names_of(row)
            if label_width is None
            else fit_label(row, label_width)
        )
        lines.append(" ".join(_cell(c, row) for c in columns) + "  " + label)
    return lines


def render(
    rows: Sequence[dict[str, Any]],
    view: View,
    width: int,
    height: int,
    clock: str,
    note: str = "",
) -> list[str]:
    """The screen: a title line, the table (as many rows as fit) and a help, filter or error line."""
    chosen = select_rows(rows, view.sort, view.unit_filter)
    columns = columns_for(width, view.sort)
    label_width = max(1, width - sum(c.width + 1 for c in columns) - 1)
    filt = f"unit ~ {view.unit_filter!r}" if view.unit_filter else "all units"
    title = (
        f"linnixd top  {clock}  sort: {SORT_TITLES[view.sort]}  {filt}  "
        f"{len(chosen)}/{len(rows)} cgroups"
    )
    body = table(chosen[: max(0, height - 3)], columns, label_width)
    if view.editing is not None:
        bottom = f"filter by unit (Enter applies, Esc cancels): {view.editing}"
    else:
        bottom = note or HELP
    padding = [""] * max(0, height - 2 - len(body))
    return [line[:width] for line in (title, *body, *padding, bottom)]


def print_once(
    cgroups: Sequence[dict[str, Any]], sort: str, unit_filter: str, limit: int
) -> list[str]:
    """Whole paths, every column: what a script or a pipe gets."""
    return table(select_rows(cgroups, sort, unit_filter)[:limit], COLUMNS, None)


# ---- the live view ----------------------------------------------------------------------

Fetch = Callable[[], Awaitable[list[dict[str, Any]]]]


class NoTerminal(Exception):
    """curses cannot drive this terminal: the caller prints once instead."""


async def live(fetch: Fetch, view: View, interval_s: float = REFRESH_S) -> int:
    """Run the curses view until q; a failed fetch keeps the last rows and says why."""
    try:
        screen = curses.initscr()
    except curses.error as exc:  # TERM names no terminal curses knows
        raise NoTerminal(" ".join(str(exc).splitlines())) from None
    try:
        curses.noecho()
        curses.cbreak()
        screen.keypad(True)
        screen.nodelay(True)
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal without cursor control
        rows: list[dict[str, Any]] = []
        note = "asking linnixd..."  # until the first answer
        next_fetch = 0.0
        pending: asyncio.Task[list[dict[str, Any]]] | None = None
        dirty = True
        try:
            while True:
                # fetch in the background: a slow daemon must not make q wait
                if pending is None and time.monotonic() >= next_fetch:
                    next_fetch = time.monotonic() + interval_s
                    pending = asyncio.ensure_future(fetch())
                if pending is not None and pending.done():
                    try:
                        rows, note = pending.result(), ""
                    except Exception as exc:  # shown on the screen; q still quits
                        note = f"linnixctl: {' '.join(str(exc).splitlines())}"
                    pending = None
                    dirty = True
                while (ch := screen.getch()) != -1:
                    if not view.key(ch):
                        return 0
                    dirty = True
                if dirty:
                    _draw(screen, rows, view, note)
                    dirty = False
                await asyncio.sleep(KEY_POLL_S)
        finally:
            if pending is not None:
                pending.cancel()
    finally:
        screen.keypad(False)
        curses.nocbreak()
        curses.echo()
        curses.endwin()


def _draw(screen: Any, rows: list[dict[str, Any]], view: View, note: str) -> None:
    height, width = screen.getmaxyx()
    lines = render(rows, view, width, height, time.strftime("%H:%M:%S"), note)
    screen.erase()
    for y, line in enumerate(lines[:height]):
        attr = curses.A_REVERSE if y == 1 else curses.A_NORMAL
        try:
            # the bottom-right cell cannot be written without scrolling: stop one short there
            screen.addnstr(y, 0, line, width - 1 if y == height - 1 else width, attr)
        except curses.error:
            pass
    screen.refresh()
