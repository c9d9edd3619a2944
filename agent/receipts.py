"""What the till gets back for a sale: its status and the receipt to print (pure).

Until KRA has signed a sale the receipt is temporary: it carries the agent's own gap-free number
and says in words that it is not a KRA tax invoice, so nobody mistakes it for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.queue.outbox import SaleRecord
from agent.receipt_signing import ReceiptFacts, ReceiptSigner

QR_HOSTS = {"production": "https://etims.kra.go.ke"}
SANDBOX_QR_HOST = "https://etims-sbx.kra.go.ke"


@dataclass(frozen=True, slots=True)
class Seller:
    """What a signed receipt shows of the device: from `etims-agent init`."""

    tin: str
    bhf_id: str
    sdc_id: str
    environment: str = "simulator"
    name: str = ""

    def qr_url(self, rcpt_sign: str) -> str:
        """KRA's verification URL (kra-oscu.md §5): Data = PIN + branch + signature, no separators."""
        host = QR_HOSTS.get(self.environment, SANDBOX_QR_HOST)
        return f"{host}/common/link/etims/receipt/indexEtimsReceiptData?Data={self.tin}{self.bhf_id}{rcpt_sign}"


def groups_of_four(text: str) -> str:
    return "-".join(text[i:i + 4] for i in range(0, len(text), 4))


TEMPORARY_NOTICE = (
    "TEMPORARY RECEIPT - NOT A KRA TAX INVOICE. "
    "The KRA-signed receipt follows once KRA has signed this sale."
)

# A receipt signed by anything but KRA's production system is no tax invoice: the installed starter
# config signs with the built-in simulator, and such a receipt must never pass for a real one.
REHEARSAL_NOTICES = {
    "simulator": "NOT A TAX INVOICE: signed by the KRA simulator built into the agent, for rehearsal. "
                 "Nothing was reported to KRA.",
    "sandbox": "NOT A TAX INVOICE: signed by KRA's sandbox, for testing. It is not a sale reported to KRA.",
}

_STATUS = {"signed": "signed", "parked": "rejected", "void": "rejected"}


def temporary_label(receipt_no: int) -> str:
    return f"T-{receipt_no:06d}"


def sale_status(kra_state: str) -> str:
    """The till-facing status: signed, rejected (parked for a technician) or pending."""
    return _STATUS.get(kra_state, "pending")


def receipt_chain(record: SaleRecord, entry: tuple[str, str], signer: ReceiptSigner) -> dict[str, str]:
    """A temporary receipt's proof of origin: its journal entry and the agent's signature over it."""
    prev_hash, journal_hash = entry
    facts = ReceiptFacts(till_id=record.till_id, sale_id=record.sale_id, receipt_no=record.receipt_no,
                         issued_at=record.sale["issued_at"], total=record.amounts["total"], journal_hash=journal_hash)
    return {"hash": journal_hash, "prev_hash": prev_hash, "signature": signer.sign(facts), "key_id": signer.key_id}


def sale_view(record: SaleRecord, seller: Seller | None = None, *,
              original: SaleRecord | None = None, chain: dict[str, str] | None = None) -> dict[str, Any]:
    """The response body for a sale or credit note (`original`: the sale it credits): the same for
    its first answer, a replay and a later GET."""
    view: dict[str, Any] = {
        "sale_id": record.sale_id,
        "till_id": record.till_id,
        "kind": record.kind,
        "status": sale_status(record.kra_state),
        "receipt_no": record.receipt_no,  # the agent's own gap-free number, kept once KRA has signed
        "accepted_at": record.accepted_at.isoformat(),
        "receipt": _receipt(record, seller, original, chain),
    }
    if original is not None:
        view["credits"] = {"sale_id": original.sale_id, "till_id": original.till_id,
                           "receipt_no": original.receipt_no, "reason": record.refund_reason}
    if record.kra_error is not None:
        view["error"] = record.kra_error
    return view


def kra_block(record: SaleRecord, seller: Seller | None, original: SaleRecord | None = None) -> dict[str, Any]:
    """The SCU information of a signed sale or credit note (kra-oscu.md §5)."""
    sig = record.kra_signature or {}
    sdc_id = seller.sdc_id if seller else None
    sign = str(sig.get("rcptSign") or "")
    label = ("NC" if record.kind == "credit_note" else "NS")
    original_no = None if original is None or original.kra_invc_no is None or not sdc_id \
        else f"{sdc_id}/{original.kra_invc_no}"
    return {
        "invc_no": record.kra_invc_no,
        "scu_id": sdc_id,
        "cu_invoice_no": f"{sdc_id}/{record.kra_invc_no}" if sdc_id else None,
        "receipt_no": sig.get("curRcptNo"),
        "total_receipt_no": sig.get("totRcptNo"),
        "label": label,
        "internal_data": groups_of_four(str(sig.get("intrlData") or "")),
        "signature": groups_of_four(sign),
        "signed_at": sig.get("sdcDateTime"),
        "qr_url": seller.qr_url(sign) if seller and sign else None,
        "original_cu_invoice_no": original_no,
    }


def _receipt(record: SaleRecord, seller: Seller | None, original: SaleRecord | None,
             chain: dict[str, str] | None) -> dict[str, Any]:
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
        "rates": {b["band"]: b["rate"] for b in amounts["bands"]},
        "totals": {"taxable": amounts["taxable"], "tax": amounts["tax"], "total": amounts["total"]},
        "prices_include_vat": amounts["prices_include_vat"],
    }
    if "customer" in sale:
        body["customer"] = sale["customer"]
    if seller is not None:
        body["seller"] = {"name": seller.name, "pin": seller.tin, "branch": seller.bhf_id}
    if record.kra_signature is not None:
        notice = REHEARSAL_NOTICES.get(seller.environment) if seller is not None else None
        return {"kind": "signed", **({"notice": notice} if notice else {}), "kra": kra_block(record, seller, original),
                **body}
    return {
        "kind": "temporary",
        "number": record.receipt_no,
        "label": temporary_label(record.receipt_no),
        "notice": TEMPORARY_NOTICE,
        **body,
        **({"chain": chain} if chain is not None else {}),
    }
