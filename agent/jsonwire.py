"""JSON for the wire with Decimals written as exact numbers (pure; used by the KRA and TSMS adapters).

Money is Decimal throughout the agent; KRA and TSMS want JSON numbers. Going through float would
turn 0.1 + 0.2 into 0.30000000000000004 on the wire, so Decimals are written digit for digit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

_NUMBER = re.compile(r'"\\u0000(-?[0-9]+(?:\.[0-9]+)?)\\u0000"')


def wire_json(body: Mapping[str, Any] | list[Any]) -> str:
    """JSON with Decimals written as exact JSON numbers (never through float).

    Each Decimal goes out as a marked string and the marks are then stripped. The mark is a NUL,
    which no accepted sale can contain (control characters are refused at intake).
    """
    def mark(value: object) -> str:
        if isinstance(value, Decimal):
            return f"\0{value:f}\0"
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return _NUMBER.sub(r"\1", json.dumps(body, default=mark, separators=(",", ":"), ensure_ascii=False))
