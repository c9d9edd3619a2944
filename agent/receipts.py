"""What the till gets back for a sale: its status and the receipt to print (pure).

Until KRA has signed a sale the receipt is temporary: it carries the agent's own gap-free number
and says in words that it is not a KRA tax invoice, so nobody mistakes it for one.
"""

from __future__ import annotations

from typing import Any

from agent.queue.outbox import SaleRecord

TEMPORARY_NOTICE = (
    "TEMPORARY RECEIPT - NOT A KRA TAX INVOICE. "
    "The KRA-signed receipt follows once KRA has signed this sale."
)

_STATUS = {"signed": "signed", "parked": "rejected", "void": "rejected"}


def temporary_label(receipt_no: int) -> str:
    return f"T-{receipt_no:06d}"


def sale_status(kra_state: str) -> str:
    """The till-facing status: signed, rejected (parked for a technician) or pending."""
    return _STATUS.get(kra_state, "pending")


def sale_view(record: SaleRecord) -> dict[str, Any]:
    """The response body for a sale: the same for its first answer, a replay and a later GET."""
    view: dict[str, Any] = {
        "sale_id": record.sale_id,
        "till_id": record.till_id,
        "status": sale_status(record.kra_state),
        "accepted_at": record.accepted_at.isoformat(),
        "receipt": _receipt(record),
    }
    if record.kra_error is not None:
        view["error"] = record.kra_error
    return view


def _receipt(record: SaleRecord) -> dict[str, Any]:
    sale, amounts = record.sale, record.amounts
    body: dict[str, Any] = {
        "issued_at": sale["issued_at"],
        "payment": sale["payment"],
        "lines": [
            {"name": line["name"], "item_code": line["item_code"], "qty": line["qty"],
             "qty_unit": line["qty_unit"], "unit_price": line["unit_price"],
             "discount": line["discount"], "tax_band": la["band"], "tax_rate": la["rate"],
             "tax": la["tax"], "total": la["total"]}
            for line, la in zip(sale["lines"], amounts["lines"], strict=True)
        ],
        "bands": [b for b in amounts["bands"] if b["taxable"] != "0.00" or b["tax"] != "0.00"],
        "totals": {"taxable": amounts["taxable"], "tax": amounts["tax"], "total": amounts["total"]},
        "prices_include_vat": amounts["prices_include_vat"],
    }
    if "customer" in sale:
        body["customer"] = sale["customer"]
    if record.kra_signature is not None:
        return {"kind": "signed", "kra": record.kra_signature, **body}
    return {
        "kind": "temporary",
        "number": record.receipt_no,
        "label": temporary_label(record.receipt_no),
        "notice": TEMPORARY_NOTICE,
        **body,
    }
