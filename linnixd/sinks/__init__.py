"""Alert sinks: where alerts go after the history has stored them (stdout, journald)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Protocol

from ..health import Health
from ..model import Alert


class Sink(Protocol):
    name: str

    def write(self, alert: Alert) -> None: ...


class QueuedSink:
    """Runs a sink on its own thread behind a bounded queue so a slow sink never blocks the loop.

    An alert that does not fit is dropped and counted (`drops`), never silently lost.
    """

    def __init__(
        self, sink: Sink, maxsize: int = 1024, on_error: Callable[[str], None] | None = None
    ):
        self.sink = sink
        self.name = sink.name
        self.drops = 0
        self.errors = 0
        self._on_error = on_error
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        self._thread.start()

    def health(self) -> Health:
        return Health(
            counters={"drops": self.drops, "errors": self.errors},
            gauges={"queued": self._queue.qsize()},
        )

    def put(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.drops += 1

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            try:
                self.sink.write(alert)
            except Exception as exc:  # a broken sink must not kill the daemon; it is counted
                self.errors += 1
                if self._on_error is not None:
                    self._on_error(f"sink {self.name}: {exc}")

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (bounded by timeout) and stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
