"""KRA OSCU result codes and transport outcomes, classified for the signing lane (pure).

kra-oscu.md §4: the HTTP status alone says little (business errors arrive as HTTP 200), so the
class comes from `resultCd`, and from what the transport can tell about whether KRA got the call.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Outcome(StrEnum):
    SUCCESS = "success"  # 000: done
    EMPTY = "empty"  # 001: a lookup found nothing (for selectInvoiceDetails: KRA has no such invoice)
    RETRY = "retry"  # KRA did not act on it (never reached, rate-limited): send the identical request later
    UNKNOWN = "unknown"  # KRA may have acted on it: ask selectInvoiceDetails before any resend
    REJECTED = "rejected"  # a permanent refusal: fix the data or the device; resending cannot help


SUCCESS_CODES = frozenset({"000", "0", "00", "0000"})  # the gateway and VSCU variants of "000"
_RETRY_CODES = frozenset({"894", "896", "990"})
_UNKNOWN_CODES = frozenset({"991", "992", "993", "994", "999"})

MEANINGS = {
    "000": "success", "001": "no search result", "891": "error building the request URL",
    "892": "error building the request headers", "893": "error building the request body",
    "894": "server communication error", "895": "request method not allowed",
    "896": "request status error", "899": "other client error", "900": "no header information",
    "901": "not a valid device", "902": "this device is already installed",
    "903": "only OSCU devices can be verified", "910": "request parameter error",
    "911": "empty request", "912": "request method error", "921": "sales data cannot be received",
    "922": "sales invoice data only after sales data", "990": "maximum number of views exceeded",
    "991": "error during registration", "992": "error during modification",
    "993": "error during deletion", "994": "duplicate (overlapped) data", "995": "no downloaded file",
    "999": "unknown error",
}

_EXPECTED = re.compile(r"Invc No:\s*(\d+)\s+is invalid, use the expected value:\s*(\d+)", re.IGNORECASE)


def classify(code: str) -> Outcome:
    if code in SUCCESS_CODES:
        return Outcome.SUCCESS
    if code == "001":
        return Outcome.EMPTY
    if code in _RETRY_CODES:
        return Outcome.RETRY
    if code in _UNKNOWN_CODES:
        return Outcome.UNKNOWN
    # 900-903, 910-912, 921/922, 89x client errors and any code KRA's table does not list: a
    # person has to look; guessing "maybe it worked" would risk signing a sale twice.
    return Outcome.REJECTED


def expected_invoice_number(message: str) -> int | None:
    """The number KRA wants instead, from the strict-sequence rejection, if that is what this is."""
    match = _EXPECTED.search(message or "")
    return int(match.group(2)) if match else None


def describe(code: str, message: str) -> str:
    meaning = MEANINGS.get(code)
    text = f"KRA {code}" + (f" ({meaning})" if meaning else "")
    return f"{text}: {message}" if message else text
