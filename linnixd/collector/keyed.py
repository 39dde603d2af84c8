"""Reading per-key monotonic counters from a kernel hash as deltas, pruning keys that went stale.

Shared by the lifecycle and network collectors. A counter map is either walked whole on a
read (`dirty=None`; the caller may skip the walk when it knows nothing moved), or read only at
the keys a companion "dirty" hash names: the kernel marks a key there when its counters
change, and user space takes the mark off before reading the value, so an increment after
that read marks the key again and is seen at the next read (never lost).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

Values = tuple[int, ...]
V = TypeVar("V")


def py_key(ckey: Any) -> Hashable:
    """A hashable Python key for a bcc key: an int for scalar keys, the raw bytes for structs."""
    value = getattr(ckey, "value", None)
    return int(value) if value is not None else bytes(ckey)


def c_key(table: Any, key: Hashable) -> Any:
    """The bcc key object of `table` for a Python key made by py_key()."""
    if isinstance(key, bytes):
        return table.Key.from_buffer_copy(key)
    return table.Key(key)


class KeyedCounters(Generic[V]):
    """Monotonic per-key counter arrays (`.v`) of one kernel hash: deltas per read, stale keys pruned.

    `make` turns a tuple of deltas into the caller's type (LifecycleCounts, NetCounts, ...).
    """

    def __init__(
        self,
        table: Any,
        prune_after: int,
        make: Callable[[Values], V],
        dirty: Any = None,
    ) -> None:
        self.table = table
        self.dirty = dirty
        self.prune_after = prune_after
        self.make = make
        self.prev: dict[Hashable, Values] = {}  # last value read: cumulative since attach
        self.changed_at: dict[Hashable, int] = {}  # key -> the read at which it last changed
        self.reads = 0
        self.walks = 0  # reads that walked the whole map (monotonic)
        self.lookups = 0  # single-key reads of marked keys (monotonic)

    def read(self, moved: bool = True) -> dict[Hashable, V]:
        """Per-key deltas since the previous read, for the keys that changed.

        Without a dirty map, `moved=False` (the caller's totals stood still) skips the walk:
        the next walk reports what the skipped reads left, so deltas stay exact.
        """
        self.reads += 1
        if self.dirty is not None:
            return self._read_marked()
        if not moved:
            return {}
        self.walks += 1
        now: dict[Hashable, Values] = {
            py_key(k): tuple(v.v)
            for k, v in self.table.items()  # type: ignore[misc]
        }
        out: dict[Hashable, V] = {}
        for key, val in now.items():
            old = self.prev.get(key)
            if val != old:
                out[key] = self.make(_minus(val, old))
                self.changed_at[key] = self.reads
        for gone in self.prev.keys() - now.keys():
            self.changed_at.pop(gone, None)
        self.prev = now
        return out

    def _read_marked(self) -> dict[Hashable, V]:
        out: dict[Hashable, V] = {}
        for ck in list(self.dirty.keys()):
            key = py_key(ck)
            try:
                del self.dirty[ck]  # first: an increment from here on marks the key again
            except KeyError:
                pass
            self.lookups += 1
            try:
                val = tuple(self.table[c_key(self.table, key)].v)
            except KeyError:
                continue  # pruned between the mark and now
            old = self.prev.get(key)
            if val != old:
                out[key] = self.make(_minus(val, old))
                self.prev[key] = val
            self.changed_at[key] = self.reads
        return out

    def idle(self, key: Hashable) -> int:
        """Reads since the key last changed."""
        return self.reads - self.changed_at.get(key, self.reads)

    def prune(self, alive: Callable[[list[Any]], set[Any]]) -> int:
        """Delete keys idle for prune_after reads whose owner no longer exists; returns how many.

        A key is re-read just before its delete; an increment landing between that read and
        the delete (an event whose owner died long ago, or a reused pid) is the one loss window.
        A dirty-marked map is swept only every prune_after reads (its reads cost O(changes)).
        """
        if self.dirty is not None and self.reads % self.prune_after:
            return 0
        limit = self.reads - self.prune_after
        stale = [k for k, at in self.changed_at.items() if at <= limit]
        if not stale:
            return 0
        living = alive(stale)
        removed = 0
        for key in stale:
            self.changed_at[key] = self.reads  # alive or not, look again after prune_after reads
            if key in living:
                continue
            ckey = c_key(self.table, key)
            try:
                if tuple(self.table[ckey].v) != self.prev.get(key):
                    continue
                del self.table[ckey]
            except KeyError:
                pass  # already gone
            self.prev.pop(key, None)
            self.changed_at.pop(key, None)
            removed += 1
        return removed


def _minus(now: Values, prev: Values | None) -> Values:
    if prev is None:
        return now
    return tuple(a - b for a, b in zip(now, prev, strict=True))


class PerCpuSlots:
    """Slots of a kernel per-CPU array, read into one buffer made once (bcc builds a key, a
    leaf and a list per lookup; a per-tick read of a fixed slot needs none of that).

    `read(i)` returns the per-CPU values of slot i as a ctypes array, valid until the next read.
    """

    def __init__(self, table: Any) -> None:
        import ctypes as ct

        from bcc.libbcc import lib  # type: ignore[import-not-found]

        self._ct = ct
        self._lookup = lib.bpf_lookup_elem
        self._fd = table.map_fd
        self._key = table.Key(0)
        self._leaf = table.Leaf()  # bcc's per-CPU leaf: one value per possible CPU

    def read(self, index: int = 0) -> Any:
        ct = self._ct
        self._key.value = index
        if self._lookup(self._fd, ct.byref(self._key), ct.byref(self._leaf)) < 0:
            raise OSError(ct.get_errno(), f"per-CPU slot {index} could not be read")
        return self._leaf

    def sum(self, index: int) -> int:
        """Slot `index` of a per-CPU array of integers, summed over CPUs."""
        return int(sum(self.read(index)))
