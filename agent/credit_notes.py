"""Credit notes: a refund of a whole sale or some of its lines, built as a sale of its own (pure).

A credit note is stored and signed like a sale (kra-oscu.md §3.9): positive quantities and
amounts, `rcptTyCd` R, the original's `invcNo` as `orgInvcNo`, a reason from code class 32. It is
priced exactly as the original was: the same unit prices, the original's tax rates and VAT basis,
a line discount credited in proportion to the quantity. KRA does not check that credit notes stay
within the original, so this module does: per item, never more than was sold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from agent.errors import InvalidSale
from agent.intake import IntakeRules, prepare
from agent.queue.outbox import NewSale
from agent.sales import CENT, MAX_QTY, parse_sale

REFUND_REASONS: Mapping[str, str] = {
    "01": "missing quantity",
    "02": "missing data",
    "03": "damaged",
    "04": "wasted",
    "05": "raw material shortage",
    "06": "refund",
    "07": "wrong customer PIN",
    "08": "wrong customer name",
    "09": "wrong amount/price",
    "10": "wrong quantity",
    "11": "wrong item(s)",
    "12": "wrong tax type",
    "13": "other reason",
}
"""KRA code class 32 as published (kra-oscu.md §3.7); KRA's own list, once fetched, takes over."""

_KNOWN = ("credit_note_id", "reason", "lines", "issued_at")


@dataclass(frozen=True, slots=True)
class Original:
    """What a credit note needs of the sale it refunds."""

    id: int
    till_id: str
    sale_id: str
    kra_state: str
    sale: Mapping[str, Any]  # the stored canonical sale
    amounts: Mapping[str, Any]  # the stored amounts
    credited: Mapping[str, Decimal]  # quantity per item code already credited by earlier notes


def _invalid(field: str, code: str, problem: str, fix: str) -> InvalidSale:
    return InvalidSale(field, code, f"{problem}; {fix}")


def prepare_credit_note(
    data: object, original: Original, now: datetime, reasons: Mapping[str, str] = REFUND_REASONS
) -> NewSale:
    """Validate a credit-note request against its original; InvalidSale names the field at fault."""
    if not isinstance(data, dict):
        raise _invalid(
            "", "wrong_type", "the body must be a JSON object", 'send {"credit_note_id": ..., "reason": ...}'
        )
    unknown = sorted(set(data) - set(_KNOWN))
    if unknown:
        raise _invalid(unknown[0], "unknown_field", "is not a credit-note field", f"use only {', '.join(_KNOWN)}")
    if original.kra_state == "parked":
        raise _invalid(
            "sale_id",
            "original_rejected",
            f"sale {original.sale_id!r} was refused by KRA and never signed",
            "correct and requeue the sale first; a credit note needs a signed original",
        )
    reason = data.get("reason")
    if not isinstance(reason, str) or reason not in reasons:  # a list or object is not hashable
        raise _invalid(
            "reason",
            "bad_reason",
            f"{reason!r} is not a refund reason (KRA code class 32)",
            "use one of " + ", ".join(f"{k} ({v})" for k, v in reasons.items()),
        )
    lines = _credited_lines(data.get("lines"), original)
    issued_at = data.get("issued_at", now.isoformat())
    till_sale = {
        "sale_id": data.get("credit_note_id"),
        "till_id": original.till_id,
        "issued_at": issued_at,
        "payment": original.sale["payment"],
        "lines": lines,
        **({"customer": original.sale["customer"]} if "customer" in original.sale else {}),
    }
    # Parse first: it names a bad credit_note_id or issued_at in the till's own terms.
    parsed = parse_sale(till_sale)
    if parsed.issued_at < datetime.fromisoformat(original.sale["issued_at"]):
        raise _invalid(
            "issued_at",
            "before_original",
            "is before the original sale",
            "KRA refuses credit notes dated before the sale",
        )
    rules = IntakeRules(
        tax_rates=_rates_of(original.amounts), prices_include_vat=bool(original.amounts["prices_include_vat"])
    )
    new = prepare(till_sale, rules)
    return NewSale(
        till_id=new.till_id,
        sale_id=new.sale_id,
        content_hash=new.content_hash,
        sale_json=new.sale_json,
        amounts_json=new.amounts_json,
        total=new.total,
        kind="credit_note",
        original_id=original.id,
        refund_reason=str(reason),
    )


def _credited_lines(requested: object, original: Original) -> list[dict[str, Any]]:
    """The original's lines with the quantities to credit; all of what is left when none are named."""
    sold: Sequence[Mapping[str, Any]] = original.sale["lines"]
    if requested is None:
        wanted = [(i, Decimal(line["qty"])) for i, line in enumerate(sold)]
        wanted = [(i, qty - _left_over(original, sold, i, qty)) for i, qty in wanted]
        wanted = [(i, qty) for i, qty in wanted if qty > 0]
        if not wanted:
            raise _invalid(
                "lines", "nothing_left", "everything on this sale has been credited already", "nothing to do"
            )
    else:
        wanted = _requested(requested, len(sold))
    used: dict[str, Decimal] = dict(original.credited)
    out = []
    for index, qty in wanted:
        line = sold[index]
        code = line["item_code"]
        limit = _sold(sold, code) - used.get(code, Decimal(0))
        if qty > limit:
            raise _invalid(
                f"lines[{index}].qty",
                "over_credit",
                f"{qty} of item {code} is more than is left to credit ({limit})",
                "credit at most what was sold, less earlier credit notes",
            )
        used[code] = used.get(code, Decimal(0)) + qty
        out.append(_line_for(line, qty))
    return out


def _requested(requested: object, count: int) -> list[tuple[int, Decimal]]:
    if not isinstance(requested, list) or not requested:
        raise _invalid(
            "lines", "wrong_type", "must be a non-empty list", 'e.g. [{"line": 1, "qty": "1"}], or leave it out'
        )
    wanted = []
    seen = set()
    for n, entry in enumerate(requested):
        where = f"lines[{n}]"
        if not isinstance(entry, dict) or set(entry) - {"line", "qty"} or "line" not in entry:
            raise _invalid(where, "wrong_type", 'must be {"line": N, "qty": "Q"}', "N counts the sale's lines from 1")
        line_no = entry["line"]
        if not isinstance(line_no, int) or isinstance(line_no, bool) or not 1 <= line_no <= count:
            raise _invalid(f"{where}.line", "bad_line", f"{line_no!r} is not a line of the sale", f"use 1 to {count}")
        if line_no in seen:
            raise _invalid(f"{where}.line", "bad_line", f"line {line_no} is named twice", "name each line once")
        seen.add(line_no)
        qty = _quantity(entry.get("qty"), f"{where}.qty")
        wanted.append((line_no - 1, qty))
    return wanted


def _quantity(value: object, where: str) -> Decimal:
    if value is None:
        raise _invalid(where, "required", "is required", 'give the quantity to credit, e.g. "1"')
    try:
        qty = Decimal(str(value))
    except ArithmeticError:
        raise _invalid(where, "wrong_type", f"{value!r} is not a number", 'e.g. "1.5"') from None
    # Bounded before quantize: a huge value (1e30) cannot be quantized to cents and would raise.
    if not qty.is_finite() or qty <= 0 or qty >= MAX_QTY or qty != qty.quantize(CENT):
        raise _invalid(where, "bad_quantity", f"{value!r} must be positive, below {MAX_QTY}, with at most 2 decimals",
                       'e.g. "1.5"')
    return qty


def _sold(lines: Sequence[Mapping[str, Any]], code: str) -> Decimal:
    return sum((Decimal(line["qty"]) for line in lines if line["item_code"] == code), Decimal(0))


def _left_over(original: Original, lines: Sequence[Mapping[str, Any]], index: int, qty: Decimal) -> Decimal:
    """How much of line `index` earlier credit notes used up (items may repeat over several lines)."""
    code = lines[index]["item_code"]
    earlier = sum((Decimal(line["qty"]) for line in lines[:index] if line["item_code"] == code), Decimal(0))
    used_here = original.credited.get(code, Decimal(0)) - earlier
    return min(qty, max(Decimal(0), used_here))


def _line_for(line: Mapping[str, Any], qty: Decimal) -> dict[str, Any]:
    """The original line at another quantity, its discount credited in proportion."""
    sold = Decimal(line["qty"])
    discount = Decimal(line["discount"])
    if qty != sold:
        discount = (discount * qty / sold).quantize(CENT, rounding=ROUND_HALF_UP)
    out = {k: line[k] for k in ("item_code", "item_class", "name", "unit_price", "tax_band", "qty_unit", "pkg_unit")}
    if line.get("barcode") is not None:
        out["barcode"] = line["barcode"]
    return {**out, "qty": str(qty), "discount": str(discount)}


def _rates_of(amounts: Mapping[str, Any]) -> dict[str, Decimal]:
    return {band["band"]: Decimal(band["rate"]) for band in amounts["bands"]}


def credited_quantities(notes: Sequence[Mapping[str, Any]]) -> dict[str, Decimal]:
    """Quantity per item code in these credit notes' stored sales."""
    out: dict[str, Decimal] = {}
    for sale in notes:
        for line in sale["lines"]:
            out[line["item_code"]] = out.get(line["item_code"], Decimal(0)) + Decimal(line["qty"])
    return out
