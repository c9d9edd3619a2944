"""The till's sale: the model, its validation and its canonical form (pure; no I/O, no clock).

`parse_sale` turns the till's JSON (already decoded, numbers as Decimal or str) into a `Sale`,
refusing anything KRA would reject with an `InvalidSale` that names the field. Limits follow the
OSCU field lengths (kra-oscu.md §3.1-3.3): a sale that passes here fits KRA's `saveTrnsSalesOsdc`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from agent.errors import InvalidSale

TAX_BANDS = ("A", "B", "C", "D", "E")
DEFAULT_TAX_RATES: Mapping[str, Decimal] = {
    "A": Decimal(0), "B": Decimal(16), "C": Decimal(0), "D": Decimal(0), "E": Decimal(8),
}
"""Used until KRA's code list (class 04) is known: A exempt, B 16 %, C zero-rated, D non-VAT, E 8 %."""

PAYMENT_TYPES: Mapping[str, str] = {
    "cash": "01", "credit": "02", "cash_credit": "03", "bank_check": "04",
    "card": "05", "mobile_money": "06", "other": "07",
}
"""The till's payment method -> KRA code class 07 (pmtTyCd)."""

MAX_LINES_KRA = 9999  # itemSeq is at most four digits
CENT = Decimal("0.01")
MAX_QTY = Decimal(10) ** 11  # N(13,2)
MAX_AMOUNT = Decimal(10) ** 16  # N(18,2)
EARLIEST, LATEST = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)  # issued_at

# The id and code rules the OpenAPI document publishes as they are (agent/openapi.py).
SALE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/#-]*")
TILL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PIN = re.compile(r"[A-Z][0-9]{9}[A-Z]")
_PHONE = re.compile(r"\+?[0-9]{7,15}")
ITEM_CLASS = re.compile(r"[0-9A-Za-z]{1,10}")
_UNIT = re.compile(r"[A-Z0-9]{1,5}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls


@dataclass(frozen=True, slots=True)
class Customer:
    pin: str | None = None
    name: str | None = None
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class Line:
    item_code: str
    item_class: str
    name: str
    qty: Decimal
    unit_price: Decimal
    discount: Decimal
    tax_band: str
    qty_unit: str
    pkg_unit: str
    barcode: str | None = None


@dataclass(frozen=True, slots=True)
class Sale:
    sale_id: str
    till_id: str
    issued_at: datetime
    payment: str
    lines: tuple[Line, ...]
    customer: Customer | None = None

    @property
    def payment_code(self) -> str:
        return PAYMENT_TYPES[self.payment]


def parse_sale(data: object, *, max_lines: int = 1000) -> Sale:
    """Validate the till's decoded JSON and build a Sale, or raise InvalidSale naming the field."""
    obj = _object(data, "", ("sale_id", "till_id", "issued_at", "customer", "payment", "lines"))
    raw_lines = obj.get("lines")
    if not isinstance(raw_lines, list):
        raise InvalidSale("lines", "required" if raw_lines is None else "wrong_type",
                          "expected a list of sale lines")
    if not raw_lines:
        raise InvalidSale("lines", "empty", "a sale needs at least one line")
    if len(raw_lines) > max_lines:
        raise InvalidSale("lines", "too_many",
                          f"{len(raw_lines)} lines; at most {max_lines} per sale, split the sale")
    return Sale(
        sale_id=_pattern(obj, "sale_id", "", SALE_ID,
                         "letters, digits or . _ : / # -, starting with a letter or digit", max_len=50),
        till_id=_pattern(obj, "till_id", "", TILL_ID,
                         "letters, digits or . _ -, starting with a letter or digit", max_len=20),
        issued_at=_timestamp(obj, "issued_at"),
        payment=_payment(obj),
        lines=tuple(_line(raw, f"lines[{i}]") for i, raw in enumerate(raw_lines)),
        customer=_customer(obj.get("customer")),
    )


def sale_to_dict(sale: Sale) -> dict[str, Any]:
    """The canonical JSON-ready form: what is stored, hashed and echoed back."""
    out: dict[str, Any] = {
        "sale_id": sale.sale_id,
        "till_id": sale.till_id,
        "issued_at": sale.issued_at.isoformat(),
        "payment": sale.payment,
        "lines": [_line_to_dict(line) for line in sale.lines],
    }
    if sale.customer is not None:
        out["customer"] = {k: v for k, v in (("pin", sale.customer.pin),
                                             ("name", sale.customer.name),
                                             ("phone", sale.customer.phone)) if v is not None}
    return out


def sale_from_dict(data: Mapping[str, Any]) -> Sale:
    """Rebuild a stored sale; it was validated on the way in, so this is parse_sale again."""
    return parse_sale(dict(data), max_lines=MAX_LINES_KRA)


def canonical_json(value: object) -> str:
    """Deterministic JSON: sorted keys, no spaces, Decimals as their exact text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default)


def content_hash(sale: Sale) -> str:
    """SHA-256 of the canonical sale: equal for a replay, different for a conflicting sale."""
    return hashlib.sha256(canonical_json(sale_to_dict(sale)).encode()).hexdigest()


def round_cents(value: Decimal) -> Decimal:
    """Round half-up to cents, as KRA and Kenyan receipts do (never banker's rounding)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def money(value: Decimal) -> str:
    return str(value.quantize(CENT))


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _line_to_dict(line: Line) -> dict[str, Any]:
    out = {
        "item_code": line.item_code, "item_class": line.item_class, "name": line.name,
        "qty": money(line.qty), "unit_price": money(line.unit_price),
        "discount": money(line.discount), "tax_band": line.tax_band,
        "qty_unit": line.qty_unit, "pkg_unit": line.pkg_unit,
    }
    if line.barcode is not None:
        out["barcode"] = line.barcode
    return out


# --- field readers: each returns a clean value or raises InvalidSale naming the field ----------

def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _object(data: object, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidSale(path, "wrong_type", "expected a JSON object")
    for key in data:
        if key not in known:
            raise InvalidSale(_path(path, str(key)), "unknown_field",
                              f"unknown field; remove it or fix the spelling (known: {', '.join(known)})")
    return data


def _text(obj: Mapping[str, Any], name: str, prefix: str, max_len: int,
          *, required: bool = True) -> str | None:
    path = _path(prefix, name)
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidSale(path, "required", "missing; this field is required, add it")
        return None
    if not isinstance(value, str):
        raise InvalidSale(path, "wrong_type", "expected a string; send the value in quotes")
    value = value.strip()
    if not value:
        if required:
            raise InvalidSale(path, "required", "is empty; this field is required, give a value")
        return None
    if _CONTROL.search(value):
        raise InvalidSale(path, "bad_characters", "contains control characters; remove them")
    if len(value) > max_len:
        raise InvalidSale(path, "too_long",
                          f"{len(value)} characters; KRA allows at most {max_len}, shorten it")
    return value


def _required_text(obj: Mapping[str, Any], name: str, prefix: str, max_len: int) -> str:
    value = _text(obj, name, prefix, max_len)
    assert value is not None  # required=True never returns None
    return value


def _pattern(obj: Mapping[str, Any], name: str, prefix: str, pattern: re.Pattern[str],
             expected: str, *, max_len: int = 200, upper: bool = False) -> str:
    value = _required_text(obj, name, prefix, max_len)
    if upper:
        value = value.upper()
    if not pattern.fullmatch(value):
        raise InvalidSale(_path(prefix, name), "bad_format", f"{value!r} is not valid; expected {expected}")
    return value


def _timestamp(obj: Mapping[str, Any], name: str) -> datetime:
    text = _required_text(obj, name, "", 40)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidSale(name, "bad_format",
                          f"{text!r} is not an ISO 8601 time; expected e.g. 2026-11-21T14:05:00+03:00"
                          ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidSale(name, "no_offset",
                          f"{text!r} has no UTC offset; add one, e.g. {text}+03:00")
    # KRA and head office get the time as YYYYMMDDhhmmss in Nairobi time and in UTC: year 1 or 9999
    # would not convert (OverflowError in the lanes) and year 5 would give a malformed date.
    if not EARLIEST <= value < LATEST:
        raise InvalidSale(name, "out_of_range",
                          f"{text!r} is not a plausible sale time; expected a time from 2000 to 2099")
    return value


def _payment(obj: Mapping[str, Any]) -> str:
    value = _required_text(obj, "payment", "", 20).lower()
    if value not in PAYMENT_TYPES:
        raise InvalidSale("payment", "unknown_code",
                          f"{value!r} is not a payment type; use one of {', '.join(PAYMENT_TYPES)}")
    return value


def _customer(data: object) -> Customer | None:
    if data is None:
        return None
    obj = _object(data, "customer", ("pin", "name", "phone"))
    pin = _text(obj, "pin", "customer", 11, required=False)
    if pin is not None:
        pin = pin.upper()
        if not _PIN.fullmatch(pin):
            raise InvalidSale("customer.pin", "bad_format",
                              f"{pin!r} is not a KRA PIN; expected a letter, 9 digits and a letter, "
                              "e.g. P051234567Q")
    phone = _text(obj, "phone", "customer", 30, required=False)
    if phone is not None:
        phone = re.sub(r"[\s-]", "", phone)
        if not _PHONE.fullmatch(phone):
            raise InvalidSale("customer.phone", "bad_format",
                              f"{phone!r} is not a phone number; expected 7-15 digits, e.g. +254712345678")
    customer = Customer(pin=pin, name=_text(obj, "name", "customer", 60, required=False), phone=phone)
    return None if customer == Customer() else customer


def _number(obj: Mapping[str, Any], name: str, prefix: str, *, default: Decimal | None = None) -> Decimal:
    path = _path(prefix, name)
    value = obj.get(name)
    if value is None:
        if default is not None:
            return default
        raise InvalidSale(path, "required", "missing; this field is required, add it")
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise InvalidSale(path, "wrong_type", "expected a number, e.g. 58.00 or \"58.00\"")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidSale(path, "wrong_type", f"{value!r} is not a number") from None
    if not number.is_finite():
        raise InvalidSale(path, "wrong_type", "expected a finite number, e.g. 58.00")
    if number.copy_abs() >= MAX_AMOUNT:  # copy_abs: abs() rounds to the context and overflows on 1E+999999999
        raise InvalidSale(path, "too_large", f"{value} is above KRA's limit of {MAX_AMOUNT}")
    if number != number.quantize(CENT, rounding=ROUND_DOWN):
        raise InvalidSale(path, "too_precise",
                          f"{value} has more than 2 decimal places; KRA amounts and quantities have "
                          "2, round it at the till")
    number = number.quantize(CENT)
    # "-0" passes the sign checks but would be stored as "-0.00" and change the content hash.
    return number.copy_abs() if number.is_zero() else number


def _line(data: object, path: str) -> Line:
    obj = _object(data, path, ("item_code", "item_class", "name", "qty", "unit_price",
                               "discount", "tax_band", "qty_unit", "pkg_unit", "barcode"))
    qty = _number(obj, "qty", path)
    if qty <= 0:
        raise InvalidSale(f"{path}.qty", "not_positive",
                          f"{qty} is not a positive quantity; returns are credit notes")
    if qty >= MAX_QTY:
        raise InvalidSale(f"{path}.qty", "too_large", f"{qty} is above KRA's limit of {MAX_QTY}")
    price = _number(obj, "unit_price", path)
    if price < 0:
        raise InvalidSale(f"{path}.unit_price", "negative", "a unit price cannot be negative")
    gross = price * qty
    if gross < MAX_AMOUNT:  # not before: rounding 10**26 or more to cents exceeds the context's 28 digits
        gross = round_cents(gross)
    if gross >= MAX_AMOUNT:
        raise InvalidSale(f"{path}.unit_price", "too_large",
                          f"qty x unit_price = {gross} is above KRA's limit of {MAX_AMOUNT}")
    discount = _number(obj, "discount", path, default=Decimal("0.00"))
    if discount < 0:
        raise InvalidSale(f"{path}.discount", "negative", "a discount cannot be negative")
    if discount > gross:
        raise InvalidSale(f"{path}.discount", "above_line",
                          f"discount {discount} is more than the line's {gross} (qty x unit_price)")
    band = _pattern(obj, "tax_band", path, re.compile("[A-E]"), "one of A, B, C, D, E", upper=True)
    return Line(
        item_code=_required_text(obj, "item_code", path, 20),
        item_class=_pattern(obj, "item_class", path, ITEM_CLASS,
                            "KRA item classification code of up to 10 letters or digits"),
        name=_required_text(obj, "name", path, 200),
        qty=qty,
        unit_price=price,
        discount=discount,
        tax_band=band,
        qty_unit=_pattern(obj, "qty_unit", path, _UNIT,
                          "a KRA quantity unit code (class 10), e.g. U, KG, L", upper=True),
        pkg_unit=_pattern(obj, "pkg_unit", path, _UNIT,
                          "a KRA packaging unit code (class 17), e.g. NT, BG, CT", upper=True),
        barcode=_text(obj, "barcode", path, 20, required=False),
    )
