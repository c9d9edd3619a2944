"""accept(sale): validate, compute the KRA amounts and store, for every way a sale arrives.

HTTP and serial intake both call `accept`, so a sale is checked and stored the same way whichever
wire it came on. A bad sale raises InvalidSale before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from agent.amounts import amounts_to_dict, compute_amounts
from agent.queue.outbox import Accepted, NewSale
from agent.sales import canonical_json, content_hash, parse_sale, sale_to_dict


class SaleStore(Protocol):
    def accept(self, new: NewSale, now: datetime) -> Accepted: ...


HeadOffice = Callable[[Mapping[str, Any], Mapping[str, Any], int], tuple[str, str]]
"""(sale, amounts, receipt number) -> (TSMS transaction id, transaction JSON); made by the sync lane."""


@dataclass(frozen=True, slots=True)
class IntakeRules:
    tax_rates: Mapping[str, Decimal]
    prices_include_vat: bool = True
    max_lines: int = 1000
    head_office: HeadOffice | None = None  # None: sales are not sent to TSMS


def prepare(data: object, rules: IntakeRules) -> NewSale:
    """Validate the till's decoded JSON and serialise it for the outbox (pure)."""
    sale = parse_sale(data, max_lines=rules.max_lines)
    amounts = compute_amounts(sale, rules.tax_rates, prices_include_vat=rules.prices_include_vat)
    sale_dict, amounts_dict = sale_to_dict(sale), amounts_to_dict(amounts)
    build = rules.head_office
    return NewSale(
        till_id=sale.till_id,
        sale_id=sale.sale_id,
        content_hash=content_hash(sale),
        sale_json=canonical_json(sale_dict),
        amounts_json=json.dumps(amounts_dict, separators=(",", ":")),
        total=amounts.total,
        head_office=None if build is None else (lambda receipt_no: build(sale_dict, amounts_dict, receipt_no)),
    )


def accept(store: SaleStore, data: object, rules: IntakeRules, now: datetime) -> Accepted:
    """Validate and durably store a sale; returns once it is committed (or is a replay)."""
    return store.accept(prepare(data, rules), now)
