"""The KRA signing lane's shared vocabulary (pure): work items, lane states and backoff.

Shared by the outbox (which stores the states) and the lane (which moves sales through them), so
neither has to import the other.

States of a sale on the KRA lane:
- queued: accepted, no KRA invoice number yet;
- in_flight: number allocated and the exact request stored, being sent;
- retry: the request never reached KRA; send the identical request again later;
- unknown: KRA may have it; ask selectInvoiceDetails before anything else;
- signed: KRA's signature is stored;
- parked: KRA refused it for good; its number was released; a technician decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

PENDING_STATES = ("queued", "in_flight", "retry", "unknown")


@dataclass(frozen=True, slots=True)
class KraWork:
    """The sale at the head of the KRA lane, with everything needed to send it."""

    id: int
    till_id: str
    sale_id: str
    kind: str
    state: str
    invc_no: int | None
    request: str | None
    attempts: int
    next_attempt_at: datetime | None
    sale: dict[str, Any]
    amounts: dict[str, Any]
    original_invc_no: int | None
    refund_reason: str | None


@dataclass(frozen=True, slots=True)
class Signed:
    """KRA's signature for a sale, not stored yet: it goes into the transaction that numbers the next."""

    sale_ref: int
    signature: dict[str, Any]
    adopted: bool


@dataclass(frozen=True, slots=True)
class Handover:
    """What a till waiting for a sale is answered from, before the lane stores it."""

    invc_no: int
    signature: dict[str, Any]
    kra_s: float | None  # how long KRA's request took (None: the signature was adopted after a restart)


def backoff(attempts: int, *, base_s: float, cap_s: float, rand: random.Random) -> timedelta:
    """Exponential backoff with full jitter: uniform in [base/2, min(cap, base * 2**attempts)]."""
    ceiling = min(cap_s, base_s * (2 ** min(attempts, 30)))
    return timedelta(seconds=rand.uniform(min(base_s / 2, ceiling), ceiling))
