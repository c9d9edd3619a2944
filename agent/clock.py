"""Time is passed in: the domain never reads the wall clock itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

Clock = Callable[[], datetime]
"""Returns the current time as an aware datetime."""

# Kenya has kept UTC+3 without daylight saving since 1960, so a fixed offset is exact and needs no
# tz database (which Windows lacks without the tzdata package).
NAIROBI = timezone(timedelta(hours=3), "EAT")


def system_clock() -> datetime:
    return datetime.now(UTC)
