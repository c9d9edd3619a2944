"""accept(sale): validate, compute the KRA amounts and store, for every way a sale arrives.

HTTP and serial intake both call `accept`, so a sale is checked and stored the same way whichever
wire it came on. A bad sale raises InvalidSale before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from agent.amounts import amounts_to_dict, compute_amounts
from agent.queue.outbox import Accepted, NewSale
from agent.sales import canonical_json, content_hash, parse_sale, sale_to_dict


class SaleStore(Protocol):
    def accept(self, new: NewSale, now: datetime) -> Accepted: ...


@dataclass(frozen=True, slots=True)
class IntakeRules:
    tax_rates: Mapping[str, Decimal]
    prices_include_vat: bool = True
    max_lines: int = 1000


def prepare(data: object, rules: IntakeRules) -> NewSale:
    """Validate the till's decoded JSON and serialise it for the outbox (pure)."""
    sale = parse_sale(data, max_lines=rules.max_lines)
    amounts = compute_amounts(sale, rules.tax_rates, prices_include_vat=rules.prices_include_vat)
    return NewSale(
        till_id=sale.till_id,
        sale_id=sale.sale_id,
        content_hash=content_hash(sale),
        sale_json=canonical_json(sale_to_dict(sale)),
        amounts_json=json.dumps(amounts_to_dict(amounts), separators=(",", ":")),
        total=amounts.total,
    )


def accept(store: SaleStore, data: object, rules: IntakeRules, now: datetime) -> Accepted:
    """Validate and durably store a sale; returns once it is committed (or is a replay)."""
    return store.accept(prepare(data, rules), now)
