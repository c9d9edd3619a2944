"""A sale as the head office's TSMS server wants it (pure; tsms-api.md §1.2).

Built once, when the sale is accepted, and stored with it: every resend of the sale carries the
same `transaction_id` and the same figures, so the server can only ever see one transaction.

How a sale maps (documented in the README as well):

* `transaction_id`: a UUID v4 made at acceptance; `hardware_id`: the terminal serial from config;
  `receipt_no`: the agent's own gap-free receipt number (unique per agent, which is one TSMS
  terminal; the till's sale id may hold characters TSMS refuses, and two tills may use the same one);
  `transaction_timestamp`: the sale's `issued_at` in UTC with `Z`.
* `gross_sales` = what the lines came to before discounts (total + discounts), `promo_discount` =
  the line discounts, `VAT` = the tax of all bands, `net_sales` = the taxable amount (after
  discounts, without VAT). So gross - promo_discount - VAT = net, as in the server's own example.
* Taxes from the KRA bands: `VATABLE_SALES` = taxable of B (16 %), E (8 %) and C (zero-rated,
  still a VAT supply); `SC_VAT_EXEMPT_SALES` = taxable of A (exempt) and D (non-VAT); `OTHER_TAX` 0.
* The other six adjustment types are 0: nothing in a Kenyan sale maps to them.
* `promo_status` "NONE" and `customer_code` from config (the tenant's code at head office).

The legacy server (tsms.protocol = "legacy") wants `base_amount` (= net) instead of `net_sales`
and has no `receipt_no`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

ADJUSTMENT_TYPES = ("promo_discount", "senior_discount", "pwd_discount", "vip_card_discount",
                    "service_charge_distributed_to_employees", "service_charge_retained_by_management",
                    "employee_discount")
VATABLE_BANDS = ("B", "C", "E")
EXEMPT_BANDS = ("A", "D")
PROTOCOLS = ("v2.1", "v2.0", "legacy")  # checksum version; legacy also means the old transaction shape


@dataclass(frozen=True, slots=True)
class Terminal:
    """Who the agent is at head office."""

    hardware_id: str  # the TSMS terminal's registered serial number
    customer_code: str
    protocol: str = "v2.1"


def tsms_transaction(sale: Mapping[str, Any], amounts: Mapping[str, Any], receipt_no: int, transaction_id: str,
                     terminal: Terminal) -> dict[str, Any]:
    """The transaction object for a stored sale (money as Decimal; its checksum is added when it is sent)."""
    bands = {b["band"]: b for b in amounts["bands"]}
    discounts = sum((Decimal(line["discount"]) for line in amounts["lines"]), Decimal("0.00"))
    total, tax, net = Decimal(amounts["total"]), Decimal(amounts["tax"]), Decimal(amounts["taxable"])
    out: dict[str, Any] = {
        "transaction_id": transaction_id,
        "hardware_id": terminal.hardware_id,
        "transaction_timestamp": utc_z(datetime.fromisoformat(sale["issued_at"])),
        "gross_sales": total + discounts,
        "promo_status": "NONE",
        "customer_code": terminal.customer_code,
        "adjustments": [{"adjustment_type": kind, "amount": discounts if kind == "promo_discount" else Decimal("0.00")}
                        for kind in ADJUSTMENT_TYPES],
        "taxes": [
            {"tax_type": "VAT", "amount": tax},
            {"tax_type": "VATABLE_SALES", "amount": _taxable(bands, VATABLE_BANDS)},
            {"tax_type": "SC_VAT_EXEMPT_SALES", "amount": _taxable(bands, EXEMPT_BANDS)},
            {"tax_type": "OTHER_TAX", "amount": Decimal("0.00")},
        ],
    }
    if terminal.protocol == "legacy":
        out["base_amount"] = net
    else:
        out["receipt_no"] = str(receipt_no)
        out["net_sales"] = net
    return out


def utc_z(moment: datetime) -> str:
    """TSMS's timestamp form: UTC, seconds, `Z` (its regex refuses offsets)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _taxable(bands: Mapping[str, Mapping[str, Any]], which: tuple[str, ...]) -> Decimal:
    return sum((Decimal(bands[b]["taxable"]) for b in which if b in bands), Decimal("0.00"))
