"""Policies a shop lives with: how long KRA may stay unreachable, and how wrong the clock may be (pure).

Offline budget (field-notes.md §5.4, pending KRA guidance): warn once the oldest unsigned sale is
`warn_after_h` old or the backlog nears `count_limit`; the budget is exhausted at `limit_h` or
`count_limit`. What happens then is the shop's choice (`action`): keep taking sales with a warning
on every temporary receipt, or refuse new sales with a clear error until KRA has caught up. A
sale already taken is never dropped either way.

Clock guard: KRA stamps every answer (resultDt) and TSMS every heartbeat (server_time); the
difference from our clock is the offset. Past `warn_s` the status says so; past `refuse_s` the
KRA lane stops signing (invoices dated by a wrong clock would be wrong for good) until the clock is
fixed, and says so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    warn_after_h: float = 12.0
    limit_h: float = 48.0
    count_limit: int = 2000
    action: str = "warn"  # warn: keep taking sales; refuse: refuse new sales once exhausted


@dataclass(frozen=True, slots=True)
class Budget:
    level: str  # ok, warning, exhausted
    unsigned: int
    oldest_age_s: float | None
    time_left_s: float | None  # until exhausted by age (None while nothing is unsigned)
    count_left: int
    message: str | None  # for the till's display and the temporary receipt


def offline_budget(settings: BudgetSettings, unsigned: int, oldest: datetime | None, now: datetime) -> Budget:
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    limit_s, warn_s = settings.limit_h * 3600, settings.warn_after_h * 3600
    count_left = max(0, settings.count_limit - unsigned)
    time_left = None if age is None else max(0.0, limit_s - age)
    hours = 0.0 if age is None else age / 3600
    if (age is not None and age >= limit_s) or unsigned >= settings.count_limit:
        action = ("new sales are refused until KRA has signed the backlog"
                  if settings.action == "refuse" else "sales are still taken")
        message = (f"OFFLINE LIMIT REACHED: {unsigned} sales unsigned, the oldest {hours:.1f} h old; {action}. "
                   "Restore the internet connection or call the technician")
        return Budget("exhausted", unsigned, age, time_left, count_left, message)
    if (age is not None and age >= warn_s) or unsigned >= 0.8 * settings.count_limit:
        left = "" if time_left is None else f", {time_left / 3600:.1f} h"
        message = (f"KRA unreachable: {unsigned} sales unsigned, the oldest {hours:.1f} h old; "
                   f"offline budget left: {count_left} sales{left}. Check the internet connection")
        return Budget("warning", unsigned, age, time_left, count_left, message)
    return Budget("ok", unsigned, age, time_left, count_left, None)


@dataclass(frozen=True, slots=True)
class ClockSettings:
    warn_s: float = 60.0
    refuse_s: float = 600.0


class ClockGuard:
    """The clock offset as KRA and TSMS see it; thread-safe (lanes and status read it)."""

    def __init__(self, settings: ClockSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._samples: dict[str, tuple[float, datetime]] = {}  # source -> (server minus ours, when)

    def note(self, source: str, offset_s: float, at: datetime) -> None:
        with self._lock:
            self._samples[source] = (offset_s, at)

    def offset_s(self) -> float | None:
        """The latest sample's offset: the freshest word on the time wins."""
        with self._lock:
            if not self._samples:
                return None
            return max(self._samples.values(), key=lambda sample: sample[1])[0]

    def verdict(self) -> tuple[str, str | None]:
        """(ok | warning | refuse, what to do)."""
        offset = self.offset_s()
        if offset is None or abs(offset) < self._settings.warn_s:
            return "ok", None
        way = "behind" if offset > 0 else "ahead of"
        text = f"this machine's clock is {abs(offset):.0f} s {way} KRA/head office"
        if abs(offset) >= self._settings.refuse_s:
            return "refuse", f"{text}: signing is stopped until the clock is corrected (enable NTP, then wait a minute)"
        return "warning", f"{text}: correct it (enable NTP) before it reaches {self._settings.refuse_s:.0f} s"

    def status(self) -> dict[str, object]:
        level, message = self.verdict()
        with self._lock:
            sources = {k: round(v[0], 3) for k, v in self._samples.items()}
        return {"offset_s": self.offset_s(), "level": level, "message": message, "sources": sources}
