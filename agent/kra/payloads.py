"""OSCU request bodies built from a stored sale and its amounts (pure; kra-oscu.md §3).

The stored sale and amounts are the canonical dicts the outbox holds (`sale_to_dict`,
`amounts_to_dict`), so the request can be rebuilt byte for byte from what was accepted. All
fifteen per-band fields are always sent; dates are Nairobi local time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from agent.clock import NAIROBI
from agent.sales import PAYMENT_TYPES, TAX_BANDS


@dataclass(frozen=True, slots=True)
class Seller:
    """Who signs: the taxpayer's PIN and branch, and the user recorded as creator/modifier."""

    tin: str
    bhf_id: str
    user_id: str = "etims-agent"
    user_name: str = "etims-agent"


@dataclass(frozen=True, slots=True)
class CreditNoteRef:
    original_invc_no: int
    reason_code: str  # code class 32
    refunded_at: datetime


def kra_datetime(moment: datetime) -> str:
    return moment.astimezone(NAIROBI).strftime("%Y%m%d%H%M%S")


def parse_kra_datetime(text: object) -> datetime | None:
    """KRA's YYYYMMDDhhmmss (Nairobi time, e.g. resultDt) as an aware datetime; None if it is not one."""
    try:
        return datetime.strptime(str(text), "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    except ValueError:
        return None


def kra_date(moment: datetime) -> str:
    return moment.astimezone(NAIROBI).strftime("%Y%m%d")


def _money(text: str) -> Decimal:
    return Decimal(text)


def sale_request(sale: Mapping[str, Any], amounts: Mapping[str, Any], invc_no: int, seller: Seller,
                 *, credit: CreditNoteRef | None = None) -> dict[str, Any]:
    """The saveTrnsSalesOsdc body for a sale, or for a credit note when `credit` is given."""
    issued = datetime.fromisoformat(sale["issued_at"])
    confirmed = kra_datetime(issued if credit is None else credit.refunded_at)
    customer = sale.get("customer", {})
    bands = {b["band"]: b for b in amounts["bands"]}
    header: dict[str, Any] = {
        "tin": seller.tin,
        "bhfId": seller.bhf_id,
        "trdInvcNo": sale["sale_id"],
        "invcNo": invc_no,
        "orgInvcNo": 0 if credit is None else credit.original_invc_no,
        "custTin": customer.get("pin"),
        "custNm": customer.get("name"),
        "salesTyCd": "N",
        "rcptTyCd": "S" if credit is None else "R",
        "pmtTyCd": PAYMENT_TYPES[sale["payment"]],
        "salesSttsCd": "02",
        "cfmDt": confirmed,
        "salesDt": kra_date(issued if credit is None else credit.refunded_at),
        "stockRlsDt": confirmed,
        "totItemCnt": len(sale["lines"]),
        "totTaxblAmt": _money(amounts["taxable"]),
        "totTaxAmt": _money(amounts["tax"]),
        "totAmt": _money(amounts["total"]),
        "prchrAcptcYn": "N",
        "regrId": seller.user_id, "regrNm": seller.user_name,
        "modrId": seller.user_id, "modrNm": seller.user_name,
        "receipt": {
            "custTin": customer.get("pin"),
            "custMblNo": customer.get("phone"),
            "rcptPbctDt": confirmed,
            "prchrAcptcYn": "N",
        },
        "itemList": [_item(i, line, la) for i, (line, la) in
                     enumerate(zip(sale["lines"], amounts["lines"], strict=True), start=1)],
    }
    for band in TAX_BANDS:
        header[f"taxblAmt{band}"] = _money(bands[band]["taxable"])
        header[f"taxRt{band}"] = Decimal(bands[band]["rate"])
        header[f"taxAmt{band}"] = _money(bands[band]["tax"])
    if credit is not None:
        header["rfdDt"] = confirmed
        header["rfdRsnCd"] = credit.reason_code
    return _drop_none(header)


def _item(seq: int, line: Mapping[str, Any], la: Mapping[str, Any]) -> dict[str, Any]:
    return _drop_none({
        "itemSeq": seq,
        "itemCd": line["item_code"],
        "itemClsCd": line["item_class"],
        "itemNm": line["name"],
        "bcd": line.get("barcode"),
        "pkgUnitCd": line["pkg_unit"],
        "pkg": _money(line["qty"]),
        "qtyUnitCd": line["qty_unit"],
        "qty": _money(line["qty"]),
        "prc": _money(la["price"]),
        "splyAmt": _money(la["supply"]),
        "dcRt": _money(la["discount_rate"]),
        "dcAmt": _money(la["discount"]),
        "taxTyCd": la["band"],
        "taxblAmt": _money(la["taxable"]),
        "taxAmt": _money(la["tax"]),
        "totAmt": _money(la["total"]),
    })


def item_request(line: Mapping[str, Any], seller: Seller, *, origin_country: str = "KE",
                 item_type: str = "2") -> dict[str, Any]:
    """The saveItem body registering a line's item before the first sale that uses it (§2.10)."""
    return _drop_none({
        "itemCd": line["item_code"],
        "itemClsCd": line["item_class"],
        "itemTyCd": item_type,
        "itemNm": line["name"],
        "orgnNatCd": origin_country,
        "pkgUnitCd": line["pkg_unit"],
        "qtyUnitCd": line["qty_unit"],
        "taxTyCd": line["tax_band"],
        "bcd": line.get("barcode"),
        "dftPrc": _money(line["unit_price"]),
        "isrcAplcbYn": "N",
        "useYn": "Y",
        "regrId": seller.user_id, "regrNm": seller.user_name,
        "modrId": seller.user_id, "modrNm": seller.user_name,
    })


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}
