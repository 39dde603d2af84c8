"""History reads off the tick loop: a worker thread with its own SQLite connection, bounded and paged.

A RecentAlerts over 10,000 alerts costs about a second of Python on the daemon's loop; fifty of
them stop the ticks for a minute. Here the query runs in one worker thread on a connection of
its own (WAL: readers never block the writer), the reply is built from the stored JSON bodies
without decoding them, and it is bounded twice: at most `max_rows` rows and `max_bytes` bytes
(well under the bus's 32 MiB message limit). At most `max_queries` queries are queued or running
at a time, and at most `max_per_caller` for one caller; one more is refused at once with
HistoryBusy (a clear "busy" error), never queued without bound.
"""

from __future__ import annotations

import asyncio
import collections
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .health import Health

MAX_ROWS = 10_000
MAX_BYTES = 4 << 20
MAX_QUERIES = 3
MAX_PER_CALLER = 2
_CURSOR = re.compile(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?):(\d{1,19})\Z")


class HistoryBusy(Exception):
    """Too many history queries at once: refused now, the caller may try again."""


class BadCursor(ValueError):
    """A page cursor that this daemon did not hand out."""


@dataclass(frozen=True)
class Page:
    """Alerts as a JSON array text, how many, whether the budget cut it short, and where to go on."""

    json: str
    rows: int
    truncated: bool  # more rows matched than fit in the row or byte budget
    cursor: str  # pass back to get the next (older) page; "" when there is none


class HistoryReader:
    """Runs history queries in a worker thread; the event loop only awaits them."""

    def __init__(
        self,
        path: str,
        *,
        max_rows: int = MAX_ROWS,
        max_bytes: int = MAX_BYTES,
        max_queries: int = MAX_QUERIES,
        max_per_caller: int = MAX_PER_CALLER,
    ) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_queries = max_queries
        self.max_per_caller = max_per_caller
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linnixd-history")
        self._local = threading.local()
        self._active = 0
        self._by_caller: collections.Counter[str] = collections.Counter()
        self.queries = 0
        self.busy = 0  # refused: over the overall or the per-caller limit
        self.truncated = 0  # replies cut short by the row or byte budget
        self.failures = 0

    async def recent(
        self, since: float, rule: str, limit: int, *, caller: str = "", cursor: str = ""
    ) -> Page:
        """Alerts with ts >= since (of `rule` when given), newest first, from `cursor` on."""
        if self._active >= self.max_queries:
            self.busy += 1
            raise HistoryBusy(
                f"busy: {self._active} history queries are running (at most {self.max_queries}); try again"
            )
        if self._by_caller[caller] >= self.max_per_caller:
            self.busy += 1
            raise HistoryBusy(
                f"busy: this caller already has {self._by_caller[caller]} history queries running "
                f"(at most {self.max_per_caller}); try again"
            )
        before = parse_cursor(cursor)
        self._active += 1
        self._by_caller[caller] += 1
        try:
            loop = asyncio.get_running_loop()
            page = await loop.run_in_executor(
                self._pool, self._query, since, rule, min(limit, self.max_rows), before
            )
        except HistoryBusy:
            raise
        except Exception:
            self.failures += 1
            raise
        finally:
            self._active -= 1
            self._by_caller[caller] -= 1
            if self._by_caller[caller] <= 0:
                del self._by_caller[caller]
        self.queries += 1
        if page.truncated:
            self.truncated += 1
        return page

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=True)
            self._local.db = db
        return db

    def _query(self, since: float, rule: str, limit: int, before: tuple[float, int] | None) -> Page:
        where: list[str] = ["ts >= ?"]
        args: list[Any] = [since]
        if rule:
            where.append("rule = ?")
            args.append(rule)
        if before is not None:
            where.append("(ts < ? OR (ts = ? AND rowid < ?))")
            args.extend([before[0], before[0], before[1]])
        rows = self._db().execute(
            f"SELECT ts, rowid, body FROM alerts WHERE {' AND '.join(where)} "
            "ORDER BY ts DESC, rowid DESC LIMIT ?",
            (*args, limit + 1),
        )
        parts: list[str] = []
        size = 2
        last: tuple[float, int] | None = None
        truncated = False
        for ts, rowid, body in rows:
            if len(parts) >= limit or size + len(body) + 1 > self.max_bytes:
                truncated = True
                break
            parts.append(body)  # stored as Alert.to_dict() JSON: passed on, not decoded
            size += len(body) + 1
            last = (ts, rowid)
        cursor = f"{last[0]!r}:{last[1]}" if truncated and last is not None else ""
        return Page("[" + ",".join(parts) + "]", len(parts), truncated, cursor)

    def health(self) -> Health:
        return Health(
            counters={
                "queries": self.queries,
                "busy_refusals": self.busy,
                "truncated_replies": self.truncated,
                "failures": self.failures,
            },
            gauges={"running": self._active},
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def parse_cursor(cursor: str) -> tuple[float, int] | None:
    if not cursor:
        return None
    m = _CURSOR.match(cursor)
    if m is None:
        raise BadCursor(f"not a page cursor: {cursor[:40]!r}")
    return float(m.group(1)), int(m.group(2))
