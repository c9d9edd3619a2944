"""When background work may hold the event loop without delaying a till: while KRA works on a sale.

A till waiting for its signature is answered the moment KRA's answer lands, unless the loop is busy
then. Head office's batches hold it for a few milliseconds at a time (reading 50 sales, storing the
submission, settling it); met by KRA's answer, each adds its length to that till's wait, and these
made the tail of the online answer time (docs/performance.md). The KRA lane leaves the loop idle
while its request is on the wire, for the whole of KRA's round trip, so the head-office lane, while
it is nearly up to date, waits for that window before each such step (agent/sync/lane.py).

The wait is bounded so that neither lane can hold the other up: there is none while a request is on
the wire or once `idle_after_s` has passed since KRA's last answer (KRA down, nothing to sign, a
request that never got written), and none longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

IDLE_AFTER_S = 0.2  # sales posted back to back leave the KRA lane about 5 ms between two requests


class KraWindow:
    def __init__(self, idle_after_s: float = IDLE_AFTER_S, timer: Callable[[], float] = time.monotonic) -> None:
        self._idle_after_s = idle_after_s
        self._timer = timer
        self._on_wire = asyncio.Event()
        self._answered_at: float | None = None  # None: the KRA lane has not finished a request yet

    def sent(self) -> None:
        """The KRA lane's request is written; the loop is free until its answer."""
        self._on_wire.set()

    def answered(self) -> None:
        """The KRA lane has its answer (or gave up on the request) and works on it."""
        self._on_wire.clear()
        self._answered_at = self._timer()

    def is_open(self) -> bool:
        return self._on_wire.is_set() or self._closed_for_s() <= 0

    async def wait(self) -> None:
        """Return once the window is open: at once, or when the next request is written, or when the
        KRA lane has been without a request for `idle_after_s`, whichever comes first."""
        if self.is_open():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._closed_for_s()):  # not wait_for: it makes a task each time
                await self._on_wire.wait()

    def _closed_for_s(self) -> float:
        if self._answered_at is None:
            return 0.0
        return self._idle_after_s - (self._timer() - self._answered_at)
