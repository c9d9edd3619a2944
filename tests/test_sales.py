"""The till's sale: every validation rule names its field and code; normalisation and the hash."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from conftest import BASE_SALE, make_sale

from agent.errors import InvalidSale
from agent.sales import (
    PAYMENT_TYPES,
    Customer,
    Sale,
    content_hash,
    parse_sale,
    round_cents,
    sale_from_dict,
    sale_to_dict,
)

MISSING: Any = object()
"""A change that removes the key instead of setting it."""


def _apply(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is MISSING:
            target.pop(key, None)
        else:
            target[key] = value


def sale_with(**changes: Any) -> dict[str, Any]:
    """BASE_SALE with top-level fields replaced (or removed with MISSING)."""
    sale = make_sale()
    _apply(sale, changes)
    return sale


def line_with(index: int = 1, **changes: Any) -> dict[str, Any]:
    """BASE_SALE with fields of line `index` replaced (or removed with MISSING)."""
    sale = make_sale()
    _apply(sale["lines"][index], changes)
    return sale


def customer_with(**fields: Any) -> dict[str, Any]:
    """BASE_SALE with a customer made of exactly these fields."""
    return make_sale(customer=dict(fields))


def base_line(**changes: Any) -> dict[str, Any]:
    """A copy of the first line of BASE_SALE with fields replaced."""
    line = copy.deepcopy(BASE_SALE["lines"][0])
    _apply(line, changes)
    return line


def refused(data: object, **kwargs: Any) -> InvalidSale:
    """parse_sale must raise InvalidSale; return it after checking its message."""
    with pytest.raises(InvalidSale) as info:
        parse_sale(data, **kwargs)
    error = info.value
    assert isinstance(error.message, str)
    assert error.message.strip() == error.message != ""
    assert "\n" not in error.message
    assert str(error).endswith(error.message)
    return error


def hash_of(data: dict[str, Any]) -> str:
    return content_hash(parse_sale(data))


# --- the refusals ------------------------------------------------------------------------------

HEADER_CASES = [
    # the whole body
    pytest.param([], "", "wrong_type", id="body-list"),
    pytest.param("sale", "", "wrong_type", id="body-string"),
    pytest.param(None, "", "wrong_type", id="body-null"),
    pytest.param(sale_with(total="171.00"), "total", "unknown_field", id="unknown-top-field"),
    # sale_id: 1-50 chars, [A-Za-z0-9][A-Za-z0-9._:/#-]*
    pytest.param(sale_with(sale_id=MISSING), "sale_id", "required", id="sale_id-missing"),
    pytest.param(sale_with(sale_id=None), "sale_id", "required", id="sale_id-null"),
    pytest.param(sale_with(sale_id=""), "sale_id", "required", id="sale_id-empty"),
    pytest.param(sale_with(sale_id="   "), "sale_id", "required", id="sale_id-blank"),
    pytest.param(sale_with(sale_id=1), "sale_id", "wrong_type", id="sale_id-int"),
    pytest.param(sale_with(sale_id="-R1"), "sale_id", "bad_format", id="sale_id-leading-dash"),
    pytest.param(sale_with(sale_id="R 1"), "sale_id", "bad_format", id="sale_id-space"),
    pytest.param(sale_with(sale_id="R*1"), "sale_id", "bad_format", id="sale_id-star"),
    pytest.param(sale_with(sale_id="R" * 51), "sale_id", "too_long", id="sale_id-51-chars"),
    pytest.param(sale_with(sale_id="R" * 201), "sale_id", "too_long", id="sale_id-201-chars"),
    pytest.param(sale_with(sale_id="R\x001"), "sale_id", "bad_characters", id="sale_id-nul"),
    # till_id: 1-20 chars
    pytest.param(sale_with(till_id=MISSING), "till_id", "required", id="till_id-missing"),
    pytest.param(sale_with(till_id=""), "till_id", "required", id="till_id-empty"),
    pytest.param(sale_with(till_id=7), "till_id", "wrong_type", id="till_id-int"),
    pytest.param(sale_with(till_id="T" * 21), "till_id", "too_long", id="till_id-21-chars"),
    pytest.param(sale_with(till_id="TILL 1"), "till_id", "bad_format", id="till_id-space"),
    pytest.param(sale_with(till_id="TILL#1"), "till_id", "bad_format", id="till_id-hash"),
    pytest.param(sale_with(till_id="_TILL"), "till_id", "bad_format",
                 id="till_id-leading-underscore"),
    # issued_at: ISO 8601 with a UTC offset
    pytest.param(sale_with(issued_at=MISSING), "issued_at", "required", id="issued_at-missing"),
    pytest.param(sale_with(issued_at=1763723100), "issued_at", "wrong_type", id="issued_at-epoch"),
    pytest.param(sale_with(issued_at="21/11/2026 14:05"), "issued_at", "bad_format",
                 id="issued_at-not-iso"),
    pytest.param(sale_with(issued_at="2026-11-31T14:05:00+03:00"), "issued_at", "bad_format",
                 id="issued_at-no-such-day"),
    pytest.param(sale_with(issued_at="2026-11-21T14:05:00"), "issued_at", "no_offset",
                 id="issued_at-naive"),
    pytest.param(sale_with(issued_at="2026-11-21"), "issued_at", "no_offset",
                 id="issued_at-date-only"),
    pytest.param(sale_with(issued_at="2026-11-21T14:05:00+03:00" + "x" * 16),
                 "issued_at", "too_long", id="issued_at-41-chars"),
    # payment
    pytest.param(sale_with(payment=MISSING), "payment", "required", id="payment-missing"),
    pytest.param(sale_with(payment=""), "payment", "required", id="payment-empty"),
    pytest.param(sale_with(payment=6), "payment", "wrong_type", id="payment-int"),
    pytest.param(sale_with(payment="bitcoin"), "payment", "unknown_code", id="payment-unknown"),
    pytest.param(sale_with(payment="06"), "payment", "unknown_code", id="payment-kra-code"),
    pytest.param(sale_with(payment="mobile money"), "payment", "unknown_code",
                 id="payment-space-not-underscore"),
    pytest.param(sale_with(payment="x" * 21), "payment", "too_long", id="payment-21-chars"),
    # lines
    pytest.param(sale_with(lines=MISSING), "lines", "required", id="lines-missing"),
    pytest.param(sale_with(lines=None), "lines", "required", id="lines-null"),
    pytest.param(sale_with(lines={}), "lines", "wrong_type", id="lines-object"),
    pytest.param(sale_with(lines="x"), "lines", "wrong_type", id="lines-string"),
    pytest.param(sale_with(lines=[]), "lines", "empty", id="lines-empty"),
    pytest.param(sale_with(lines=["x"]), "lines[0]", "wrong_type", id="line-string"),
    pytest.param(sale_with(lines=[base_line(), None]), "lines[1]", "wrong_type", id="line-null"),
]

CUSTOMER_CASES = [
    pytest.param(sale_with(customer="P051234567Q"), "customer", "wrong_type", id="customer-string"),
    pytest.param(sale_with(customer=[]), "customer", "wrong_type", id="customer-list"),
    pytest.param(customer_with(email="a@b.ke"), "customer.email", "unknown_field",
                 id="customer-unknown-field"),
    pytest.param(customer_with(pin="P05123456Q"), "customer.pin", "bad_format", id="pin-8-digits"),
    pytest.param(customer_with(pin="0512345678Q"), "customer.pin", "bad_format",
                 id="pin-no-leading-letter"),
    pytest.param(customer_with(pin="P0512345678"), "customer.pin", "bad_format",
                 id="pin-no-trailing-letter"),
    pytest.param(customer_with(pin="P05123456QQ"), "customer.pin", "bad_format",
                 id="pin-two-letters"),
    pytest.param(customer_with(pin="P0512345678Q"), "customer.pin", "too_long", id="pin-12-chars"),
    pytest.param(customer_with(pin=51234567), "customer.pin", "wrong_type", id="pin-int"),
    pytest.param(customer_with(name="N" * 61), "customer.name", "too_long", id="name-61-chars"),
    pytest.param(customer_with(name=["Wanjiku"]), "customer.name", "wrong_type", id="name-list"),
    pytest.param(customer_with(name="Wan\x07jiku"), "customer.name", "bad_characters",
                 id="name-bell"),
    pytest.param(customer_with(phone="123456"), "customer.phone", "bad_format",
                 id="phone-6-digits"),
    pytest.param(customer_with(phone="+2547123456789012"), "customer.phone", "bad_format",
                 id="phone-16-digits"),
    pytest.param(customer_with(phone="0712x45678"), "customer.phone", "bad_format",
                 id="phone-letter"),
    pytest.param(customer_with(phone="254+712345678"), "customer.phone", "bad_format",
                 id="phone-inner-plus"),
    pytest.param(customer_with(phone="(0712) 345678"), "customer.phone", "bad_format",
                 id="phone-brackets"),
    pytest.param(customer_with(phone="0" * 31), "customer.phone", "too_long", id="phone-31-chars"),
    pytest.param(customer_with(phone=712345678), "customer.phone", "wrong_type", id="phone-int"),
]

LINE_CASES = [
    pytest.param(line_with(colour="brown"), "lines[1].colour", "unknown_field",
                 id="unknown-line-field"),
    # qty: > 0, at most 2 decimals, below 10^11
    pytest.param(line_with(qty=MISSING), "lines[1].qty", "required", id="qty-missing"),
    pytest.param(line_with(qty=None), "lines[1].qty", "required", id="qty-null"),
    pytest.param(line_with(qty="0"), "lines[1].qty", "not_positive", id="qty-zero"),
    pytest.param(line_with(qty=0), "lines[1].qty", "not_positive", id="qty-int-zero"),
    pytest.param(line_with(qty="0.00"), "lines[1].qty", "not_positive", id="qty-zero-2dp"),
    pytest.param(line_with(qty="-0"), "lines[1].qty", "not_positive", id="qty-negative-zero"),
    pytest.param(line_with(qty="-1"), "lines[1].qty", "not_positive", id="qty-negative"),
    pytest.param(line_with(qty=Decimal("-0.01")), "lines[1].qty", "not_positive",
                 id="qty-decimal-negative"),
    pytest.param(line_with(qty="1.005"), "lines[1].qty", "too_precise", id="qty-3dp"),
    pytest.param(line_with(qty=0.001), "lines[1].qty", "too_precise", id="qty-float-3dp"),
    pytest.param(line_with(qty=Decimal("0.0001")), "lines[1].qty", "too_precise",
                 id="qty-decimal-4dp"),
    pytest.param(line_with(qty="abc"), "lines[1].qty", "wrong_type", id="qty-text"),
    pytest.param(line_with(qty=""), "lines[1].qty", "wrong_type", id="qty-empty-string"),
    pytest.param(line_with(qty="1,5"), "lines[1].qty", "wrong_type", id="qty-comma"),
    pytest.param(line_with(qty=True), "lines[1].qty", "wrong_type", id="qty-bool"),
    pytest.param(line_with(qty=[1]), "lines[1].qty", "wrong_type", id="qty-list"),
    pytest.param(line_with(qty={"value": 1}), "lines[1].qty", "wrong_type", id="qty-object"),
    pytest.param(line_with(qty="NaN"), "lines[1].qty", "wrong_type", id="qty-nan"),
    pytest.param(line_with(qty=float("nan")), "lines[1].qty", "wrong_type", id="qty-float-nan"),
    pytest.param(line_with(qty=float("inf")), "lines[1].qty", "wrong_type", id="qty-float-inf"),
    pytest.param(line_with(qty="Infinity"), "lines[1].qty", "wrong_type", id="qty-infinity"),
    pytest.param(line_with(qty="100000000000"), "lines[1].qty", "too_large", id="qty-10^11"),
    pytest.param(line_with(qty="1e16"), "lines[1].qty", "too_large", id="qty-10^16"),
    # unit_price: >= 0, at most 2 decimals, qty x unit_price below 10^16
    pytest.param(line_with(unit_price=MISSING), "lines[1].unit_price", "required",
                 id="price-missing"),
    pytest.param(line_with(unit_price="-0.01"), "lines[1].unit_price", "negative",
                 id="price-negative"),
    pytest.param(line_with(unit_price="40.001"), "lines[1].unit_price", "too_precise",
                 id="price-3dp"),
    pytest.param(line_with(unit_price="free"), "lines[1].unit_price", "wrong_type",
                 id="price-text"),
    pytest.param(line_with(unit_price=False), "lines[1].unit_price", "wrong_type",
                 id="price-bool"),
    pytest.param(line_with(unit_price="1e16"), "lines[1].unit_price", "too_large",
                 id="price-10^16"),
    pytest.param(line_with(unit_price="-1e16"), "lines[1].unit_price", "too_large",
                 id="price-minus-10^16"),
    # 1000.00 x 10000000000000.00 = 10^16 exactly, KRA's N(18,2) limit
    pytest.param(line_with(qty="1000", unit_price="10000000000000"), "lines[1].unit_price",
                 "too_large", id="qty-times-price-10^16"),
    # each below its own limit, their product beyond what rounding to cents can hold
    pytest.param(line_with(qty="99999999999.99", unit_price="9999999999999999.99"), "lines[1].unit_price",
                 "too_large", id="qty-times-price-10^27"),
    # discount: >= 0, at most 2 decimals, not above round(qty x unit_price)
    pytest.param(line_with(discount="-1.00"), "lines[1].discount", "negative",
                 id="discount-negative"),
    pytest.param(line_with(discount="0.001"), "lines[1].discount", "too_precise",
                 id="discount-3dp"),
    pytest.param(line_with(discount="five"), "lines[1].discount", "wrong_type", id="discount-text"),
    pytest.param(line_with(discount="1e16"), "lines[1].discount", "too_large", id="discount-10^16"),
    # 1.5 x 40.00 = 60.00
    pytest.param(line_with(discount="60.01"), "lines[1].discount", "above_line",
                 id="discount-above-gross"),
    # 0.50 x 0.25 = 0.125, rounded half-up to 0.13: 0.14 is above it
    pytest.param(line_with(qty="0.5", unit_price="0.25", discount="0.14"), "lines[1].discount",
                 "above_line", id="discount-above-rounded-gross"),
    pytest.param(line_with(unit_price="0", discount="0.01"), "lines[1].discount", "above_line",
                 id="discount-on-free-item"),
    # tax_band: one of A-E
    pytest.param(line_with(tax_band=MISSING), "lines[1].tax_band", "required", id="band-missing"),
    pytest.param(line_with(tax_band=""), "lines[1].tax_band", "required", id="band-empty"),
    pytest.param(line_with(tax_band="F"), "lines[1].tax_band", "bad_format", id="band-F"),
    pytest.param(line_with(tax_band="AB"), "lines[1].tax_band", "bad_format", id="band-AB"),
    pytest.param(line_with(tax_band="16"), "lines[1].tax_band", "bad_format", id="band-rate"),
    pytest.param(line_with(tax_band=2), "lines[1].tax_band", "wrong_type", id="band-int"),
    # item_code: <= 20
    pytest.param(line_with(item_code=MISSING), "lines[1].item_code", "required",
                 id="item_code-missing"),
    pytest.param(line_with(item_code="  "), "lines[1].item_code", "required", id="item_code-blank"),
    pytest.param(line_with(item_code=12345), "lines[1].item_code", "wrong_type",
                 id="item_code-int"),
    pytest.param(line_with(item_code="K" * 21), "lines[1].item_code", "too_long",
                 id="item_code-21-chars"),
    pytest.param(line_with(item_code="KE2\x1bNT"), "lines[1].item_code", "bad_characters",
                 id="item_code-escape"),
    # item_class: 1-10 letters or digits
    pytest.param(line_with(item_class=MISSING), "lines[1].item_class", "required",
                 id="item_class-missing"),
    pytest.param(line_with(item_class=5010150000), "lines[1].item_class", "wrong_type",
                 id="item_class-int"),
    pytest.param(line_with(item_class="50101500001"), "lines[1].item_class", "bad_format",
                 id="item_class-11-chars"),
    pytest.param(line_with(item_class="5010-1500"), "lines[1].item_class", "bad_format",
                 id="item_class-dash"),
    # name: <= 200
    pytest.param(line_with(name=MISSING), "lines[1].name", "required", id="name-missing"),
    pytest.param(line_with(name=""), "lines[1].name", "required", id="name-empty"),
    pytest.param(line_with(name="n" * 201), "lines[1].name", "too_long", id="name-201-chars"),
    pytest.param(line_with(name="Sukuma\x00wiki"), "lines[1].name", "bad_characters",
                 id="name-nul"),
    pytest.param(line_with(name="Sukuma\twiki"), "lines[1].name", "bad_characters", id="name-tab"),
    pytest.param(line_with(name="Sukuma\nwiki"), "lines[1].name", "bad_characters",
                 id="name-inner-newline"),
    pytest.param(line_with(name="Sukuma\x7fwiki"), "lines[1].name", "bad_characters",
                 id="name-del"),
    # qty_unit / pkg_unit: 1-5 uppercase letters or digits
    pytest.param(line_with(qty_unit=MISSING), "lines[1].qty_unit", "required",
                 id="qty_unit-missing"),
    pytest.param(line_with(qty_unit=""), "lines[1].qty_unit", "required", id="qty_unit-empty"),
    pytest.param(line_with(qty_unit="KGRAMS"), "lines[1].qty_unit", "bad_format",
                 id="qty_unit-6-chars"),
    pytest.param(line_with(qty_unit="K G"), "lines[1].qty_unit", "bad_format", id="qty_unit-space"),
    pytest.param(line_with(qty_unit=1), "lines[1].qty_unit", "wrong_type", id="qty_unit-int"),
    pytest.param(line_with(pkg_unit=MISSING), "lines[1].pkg_unit", "required",
                 id="pkg_unit-missing"),
    pytest.param(line_with(pkg_unit="NT/BG"), "lines[1].pkg_unit", "bad_format",
                 id="pkg_unit-slash"),
    pytest.param(line_with(pkg_unit="PACKET"), "lines[1].pkg_unit", "bad_format",
                 id="pkg_unit-6-chars"),
    # barcode: optional, <= 20
    pytest.param(line_with(barcode="6" * 21), "lines[1].barcode", "too_long",
                 id="barcode-21-chars"),
    pytest.param(line_with(barcode=6161100100010), "lines[1].barcode", "wrong_type",
                 id="barcode-int"),
    pytest.param(line_with(barcode="6161\x1f100"), "lines[1].barcode", "bad_characters",
                 id="barcode-unit-separator"),
    # the path names the right line
    pytest.param(line_with(0, qty="0"), "lines[0].qty", "not_positive", id="first-line-path"),
    pytest.param(sale_with(lines=[base_line()] * 11 + [base_line(tax_band="Z")]),
                 "lines[11].tax_band", "bad_format", id="twelfth-line-path"),
]


class TestHeaderValidation:
    @pytest.mark.parametrize(("data", "field", "code"), HEADER_CASES)
    def test_header_refusal_names_field_and_code(self, data: object, field: str, code: str) -> None:
        """A bad header field is refused with its path and a machine code."""
        error = refused(data)
        assert (error.field, error.code) == (field, code)

    def test_more_lines_than_allowed_are_refused(self) -> None:
        """A sale with more lines than max_lines is refused as too many."""
        error = refused(make_sale(lines=[base_line()] * 3), max_lines=2)
        assert (error.field, error.code) == ("lines", "too_many")
        assert len(parse_sale(make_sale(lines=[base_line()] * 2), max_lines=2).lines) == 2

    def test_default_limit_is_a_thousand_lines(self) -> None:
        """Without max_lines a sale may have 1000 lines but not 1001."""
        assert len(parse_sale(make_sale(lines=[base_line()] * 1000)).lines) == 1000
        error = refused(make_sale(lines=[base_line()] * 1001))
        assert (error.field, error.code) == ("lines", "too_many")


class TestCustomerValidation:
    @pytest.mark.parametrize(("data", "field", "code"), CUSTOMER_CASES)
    def test_customer_refusal_names_field_and_code(self, data: object, field: str,
                                                   code: str) -> None:
        """A bad customer field is refused with its path and a machine code."""
        error = refused(data)
        assert (error.field, error.code) == (field, code)


class TestLineValidation:
    @pytest.mark.parametrize(("data", "field", "code"), LINE_CASES)
    def test_line_refusal_names_field_and_code(self, data: object, field: str, code: str) -> None:
        """A bad line field is refused with its indexed path and a machine code."""
        error = refused(data)
        assert (error.field, error.code) == (field, code)


# --- what passes, and how it is normalised ------------------------------------------------------

class TestAccepted:
    def test_base_sale_parses(self) -> None:
        """The conftest sale parses into the expected model."""
        sale = parse_sale(make_sale())
        assert sale.sale_id == "R-0001"
        assert sale.till_id == "TILL-1"
        assert sale.issued_at == datetime(2026, 11, 21, 14, 5, tzinfo=timezone(timedelta(hours=3)))
        assert sale.payment == "mobile_money"
        assert sale.customer is None
        first, second = sale.lines
        assert (first.qty, first.unit_price, first.discount) == (
            Decimal("2.00"), Decimal("58.00"), Decimal("0.00"))
        assert (second.qty, second.unit_price, second.discount) == (
            Decimal("1.50"), Decimal("40.00"), Decimal("5.00"))
        assert (second.tax_band, second.qty_unit, second.pkg_unit) == ("A", "KG", "NT")
        assert first.barcode is None

    @pytest.mark.parametrize("data", [
        pytest.param(sale_with(sale_id="R" * 50), id="sale_id-50-chars"),
        pytest.param(sale_with(sale_id="9a._:/#-Z"), id="sale_id-all-punctuation"),
        pytest.param(sale_with(till_id="T" * 20), id="till_id-20-chars"),
        pytest.param(sale_with(till_id="t.1_a-2"), id="till_id-punctuation"),
        pytest.param(sale_with(issued_at="2026-11-21T11:05:00Z"), id="issued_at-Z"),
        pytest.param(sale_with(issued_at="2026-11-21T14:05:00.123+03:00"), id="issued_at-millis"),
        pytest.param(customer_with(pin="P051234567Q", name="N" * 60, phone="0712345"),
                     id="customer-limits"),
        pytest.param(customer_with(phone="+123456789012345"), id="phone-15-digits"),
        pytest.param(line_with(item_code="K" * 20, item_class="A" * 10, name="n" * 200,
                               barcode="6" * 20, qty_unit="ABCDE", pkg_unit="12345"),
                     id="line-length-limits"),
        pytest.param(line_with(item_class="ab12"), id="item_class-lowercase"),
        pytest.param(line_with(discount="60.00"), id="discount-equals-gross"),
        # 0.50 x 0.25 = 0.125, rounded half-up to 0.13
        pytest.param(line_with(qty="0.5", unit_price="0.25", discount="0.13"),
                     id="discount-equals-rounded-gross"),
        pytest.param(line_with(unit_price="0", discount=MISSING), id="price-zero"),
        pytest.param(line_with(qty="0.01", discount="0.40"), id="qty-smallest"),
        pytest.param(line_with(qty="99999999999.99", unit_price="1"), id="qty-largest"),
        pytest.param(line_with(unit_price="9999999999999999.99", qty="1"), id="price-largest"),
    ])
    def test_boundary_values_are_accepted(self, data: dict[str, Any]) -> None:
        """Values exactly at a documented limit are accepted."""
        assert isinstance(parse_sale(data), Sale)

    @pytest.mark.parametrize(("payment", "code"), [
        ("cash", "01"), ("credit", "02"), ("cash_credit", "03"), ("bank_check", "04"),
        ("card", "05"), ("mobile_money", "06"), ("other", "07"),
    ])
    def test_payment_maps_to_kra_class_07(self, payment: str, code: str) -> None:
        """Each payment type maps to its KRA code class 07 value."""
        assert parse_sale(make_sale(payment=payment)).payment_code == code
        assert parse_sale(make_sale(payment=payment.upper())).payment_code == code

    def test_every_payment_type_is_mapped(self) -> None:
        """The mapping covers exactly the seven payment types with codes 01..07."""
        assert sorted(PAYMENT_TYPES.values()) == [f"0{n}" for n in range(1, 8)]
        assert set(PAYMENT_TYPES) == {"cash", "credit", "cash_credit", "bank_check", "card",
                                      "mobile_money", "other"}


class TestNormalisation:
    def test_band_and_units_are_uppercased(self) -> None:
        """A lowercase tax band, quantity unit and packaging unit are uppercased."""
        line = parse_sale(line_with(tax_band="b", qty_unit="kg", pkg_unit="nt")).lines[1]
        assert (line.tax_band, line.qty_unit, line.pkg_unit) == ("B", "KG", "NT")

    def test_payment_is_case_insensitive(self) -> None:
        """A payment type in any case is stored lowercase."""
        assert parse_sale(make_sale(payment=" Mobile_MONEY ")).payment == "mobile_money"

    def test_pin_is_uppercased(self) -> None:
        """A lowercase KRA PIN is uppercased."""
        customer = parse_sale(customer_with(pin="p051234567q")).customer
        assert customer == Customer(pin="P051234567Q")

    @pytest.mark.parametrize(("phone", "stored"), [
        ("+254 712 345 678", "+254712345678"),
        ("0712-345-678", "0712345678"),
        (" 0712 345-678 ", "0712345678"),
        ("+254\u00a0712345678", "+254712345678"),
    ])
    def test_phone_spaces_and_dashes_are_removed(self, phone: str, stored: str) -> None:
        """Spaces and dashes in a phone number are removed before it is checked."""
        customer = parse_sale(customer_with(phone=phone)).customer
        assert customer is not None
        assert customer.phone == stored

    @pytest.mark.parametrize("customer", [{}, {"name": "  "}, {"pin": "", "phone": " "}, None])
    def test_empty_customer_is_none(self, customer: dict[str, Any] | None) -> None:
        """A customer object with no values is the same as no customer."""
        sale = parse_sale(make_sale(customer=customer))
        assert sale.customer is None
        assert "customer" not in sale_to_dict(sale)
        assert content_hash(sale) == hash_of(make_sale())

    def test_strings_are_stripped(self) -> None:
        """Whitespace around a text value, newlines included, is stripped rather than refused."""
        sale = parse_sale(make_sale(sale_id=" R-0001 ", till_id="\tTILL-1\n",
                                    customer={"name": " Wanjiku Kamau \n"}))
        assert (sale.sale_id, sale.till_id) == ("R-0001", "TILL-1")
        assert sale.customer == Customer(name="Wanjiku Kamau")
        line = parse_sale(line_with(name="  Sukuma wiki\r\n", item_code=" KE2 ")).lines[1]
        assert (line.name, line.item_code) == ("Sukuma wiki", "KE2")

    def test_missing_discount_is_zero(self) -> None:
        """A line without a discount has a discount of 0.00."""
        assert parse_sale(make_sale()).lines[0].discount == Decimal("0.00")
        assert hash_of(line_with(0, discount="0")) == hash_of(make_sale())

    def test_empty_barcode_is_none(self) -> None:
        """An empty or blank barcode is the same as no barcode."""
        assert parse_sale(line_with(barcode=" ")).lines[1].barcode is None
        assert hash_of(line_with(barcode="")) == hash_of(make_sale())

    def test_offset_is_kept(self) -> None:
        """A time in UTC ('Z') keeps its zero offset."""
        issued_at = parse_sale(make_sale(issued_at="2026-11-21T11:05:00Z")).issued_at
        assert issued_at == datetime(2026, 11, 21, 11, 5, tzinfo=UTC)
        assert issued_at.utcoffset() == timedelta(0)

    @pytest.mark.parametrize("qty", ["2", 2, "2.00", "2.0", 2.0, Decimal("2"), Decimal("2.000"),
                                     " 2 ", "2e0", "0.02e2"])
    def test_equal_quantities_hash_alike(self, qty: object) -> None:
        """Every spelling of the quantity two gives the same content hash."""
        sale = parse_sale(line_with(0, qty=qty))
        assert sale.lines[0].qty == Decimal("2.00")
        assert sale_to_dict(sale)["lines"][0]["qty"] == "2.00"
        assert content_hash(sale) == hash_of(make_sale())

    @pytest.mark.parametrize("price", ["58", 58, 58.0, "58.00", Decimal("58.0")])
    def test_equal_prices_hash_alike(self, price: object) -> None:
        """Every spelling of the unit price 58 gives the same content hash."""
        assert hash_of(line_with(0, unit_price=price)) == hash_of(make_sale())

    def test_float_amounts_are_read_by_their_shortest_text(self) -> None:
        """A float such as 0.1 is read as 0.10, not its binary approximation."""
        line = parse_sale(line_with(0, qty=0.1, unit_price=19.99, discount=0.01)).lines[0]
        assert (line.qty, line.unit_price, line.discount) == (
            Decimal("0.10"), Decimal("19.99"), Decimal("0.01"))

    @pytest.mark.parametrize("field", ["unit_price", "discount"])
    @pytest.mark.parametrize("zero", ["-0", "-0.00", Decimal("-0.0"), -0.0],
                             ids=["str", "str-2dp", "decimal", "float"])
    def test_negative_zero_is_stored_as_zero(self, field: str, zero: object) -> None:
        """A unit price or discount of negative zero is stored as 0.00 and hashes like 0."""
        sale = parse_sale(line_with(0, **{field: zero}))
        assert sale_to_dict(sale)["lines"][0][field] == "0.00"
        assert content_hash(sale) == hash_of(line_with(0, **{field: "0"}))

    def test_round_cents_is_half_up(self) -> None:
        """round_cents rounds an exact half cent away from zero, never to even."""
        assert round_cents(Decimal("0.125")) == Decimal("0.13")
        assert round_cents(Decimal("0.135")) == Decimal("0.14")
        assert round_cents(Decimal("0.1249999")) == Decimal("0.12")
        assert round_cents(Decimal("2")) == Decimal("2.00")


# --- canonical form and content hash ------------------------------------------------------------

def _changed(mutate: Any) -> dict[str, Any]:
    sale = make_sale(customer={"pin": "P051234567Q", "name": "Wanjiku", "phone": "0712345678"})
    sale["lines"][0]["barcode"] = "6161100100010"
    mutate(sale)
    return sale


def _set(*path: Any, value: Any) -> Any:
    def mutate(sale: dict[str, Any]) -> None:
        target = sale
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


CHANGES = [
    pytest.param(_set("sale_id", value="R-0002"), id="sale_id"),
    pytest.param(_set("sale_id", value="r-0001"), id="sale_id-case"),
    pytest.param(_set("till_id", value="TILL-2"), id="till_id"),
    pytest.param(_set("issued_at", value="2026-11-21T14:05:01+03:00"), id="issued_at"),
    pytest.param(_set("issued_at", value="2026-11-21T11:05:00+00:00"), id="issued_at-same-instant"),
    pytest.param(_set("payment", value="cash"), id="payment"),
    pytest.param(_set("customer", "pin", value="P051234567R"), id="customer.pin"),
    pytest.param(_set("customer", "name", value="Wanjiru"), id="customer.name"),
    pytest.param(_set("customer", "phone", value="0712345679"), id="customer.phone"),
    pytest.param(_set("customer", value=None), id="customer-removed"),
    pytest.param(_set("lines", 0, "item_code", value="KE2NTU0000009"), id="item_code"),
    pytest.param(_set("lines", 0, "item_class", value="5059690801"), id="item_class"),
    pytest.param(_set("lines", 0, "name", value="Bread 600g"), id="name"),
    pytest.param(_set("lines", 0, "qty", value="2.01"), id="qty"),
    pytest.param(_set("lines", 0, "unit_price", value="58.01"), id="unit_price"),
    pytest.param(_set("lines", 0, "discount", value="0.01"), id="discount"),
    pytest.param(_set("lines", 0, "tax_band", value="E"), id="tax_band"),
    pytest.param(_set("lines", 0, "qty_unit", value="KG"), id="qty_unit"),
    pytest.param(_set("lines", 0, "pkg_unit", value="BG"), id="pkg_unit"),
    pytest.param(_set("lines", 0, "barcode", value="6161100100011"), id="barcode"),
    pytest.param(_set("lines", 0, "barcode", value=None), id="barcode-removed"),
    pytest.param(lambda sale: sale["lines"].reverse(), id="line-order"),
    pytest.param(lambda sale: sale["lines"].pop(), id="line-removed"),
    pytest.param(lambda sale: sale["lines"].append(copy.deepcopy(sale["lines"][0])),
                 id="line-repeated"),
]


class TestContentHash:
    def test_hash_is_stable(self) -> None:
        """The same content hashes alike every time, as 64 lowercase hex digits."""
        first, again = hash_of(_changed(lambda sale: None)), hash_of(_changed(lambda sale: None))
        assert first == again
        assert len(first) == 64
        assert set(first) <= set("0123456789abcdef")

    def test_key_order_does_not_matter(self) -> None:
        """The order of the keys in the till's JSON does not change the hash."""
        sale = _changed(lambda sale: None)
        reordered = {key: sale[key] for key in reversed(list(sale))}
        reordered["lines"] = [{k: line[k] for k in sorted(line)} for line in sale["lines"]]
        assert hash_of(reordered) == hash_of(sale)

    def test_equivalent_spellings_hash_alike(self) -> None:
        """Case, whitespace and number spellings that normalise alike give the same hash."""
        sale = _changed(lambda sale: None)
        respelled = _changed(lambda sale: None)
        respelled["payment"] = "MOBILE_MONEY"
        respelled["customer"] = {"pin": "p051234567q", "name": " Wanjiku ", "phone": "0712 345 678"}
        respelled["lines"][0].update(qty=2, unit_price=Decimal("58"), discount="0.00", tax_band="b",
                                     qty_unit="u", pkg_unit="nt", barcode=" 6161100100010 ")
        respelled["lines"][1].update(qty="1.50", unit_price=40, discount=5)
        assert hash_of(respelled) == hash_of(sale)

    @pytest.mark.parametrize("mutate", CHANGES)
    def test_any_change_changes_the_hash(self, mutate: Any) -> None:
        """Changing any field of the sale gives a different content hash."""
        assert hash_of(_changed(mutate)) != hash_of(_changed(lambda sale: None))


class TestCanonicalForm:
    @pytest.mark.parametrize("data", [
        pytest.param(make_sale(), id="base"),
        pytest.param(_changed(lambda sale: None), id="customer-and-barcode"),
        pytest.param(customer_with(phone="+254 712 345 678"), id="phone-only-customer"),
        pytest.param(make_sale(issued_at="2026-11-21T11:05:00.250Z"), id="utc-with-millis"),
        pytest.param(line_with(qty=0.5, unit_price="0.25", discount="0.13", tax_band="e"),
                     id="rounded-gross-discount"),
    ])
    def test_sale_to_dict_round_trips(self, data: dict[str, Any]) -> None:
        """parse_sale(sale_to_dict(sale)) gives back an equal sale with the same hash and form."""
        sale = parse_sale(data)
        form = sale_to_dict(sale)
        again = parse_sale(form)
        assert again == sale
        assert sale_to_dict(again) == form
        assert content_hash(again) == content_hash(sale)
        assert sale_from_dict(form) == sale

    def test_canonical_form_of_base_sale(self) -> None:
        """The canonical form has fixed two-decimal amounts and omits absent optional fields."""
        assert sale_to_dict(parse_sale(make_sale())) == {
            "sale_id": "R-0001",
            "till_id": "TILL-1",
            "issued_at": "2026-11-21T14:05:00+03:00",
            "payment": "mobile_money",
            "lines": [
                {"item_code": "KE2NTU0000001", "item_class": "5059690800", "name": "Bread 400g",
                 "qty": "2.00", "unit_price": "58.00", "discount": "0.00", "tax_band": "B",
                 "qty_unit": "U", "pkg_unit": "NT"},
                {"item_code": "KE2NTKG0000002", "item_class": "5010150000", "name": "Sukuma wiki",
                 "qty": "1.50", "unit_price": "40.00", "discount": "5.00", "tax_band": "A",
                 "qty_unit": "KG", "pkg_unit": "NT"},
            ],
        }

    def test_customer_form_keeps_only_given_fields(self) -> None:
        """The canonical customer lists only the fields that have a value."""
        form = sale_to_dict(parse_sale(customer_with(pin="p051234567q", name="")))
        assert form["customer"] == {"pin": "P051234567Q"}

    def test_sale_from_dict_allows_kra_line_limit(self) -> None:
        """A stored sale is rebuilt with KRA's own line limit, not the till default of 1000."""
        form = sale_to_dict(parse_sale(make_sale(lines=[base_line()] * 1001), max_lines=1001))
        assert len(sale_from_dict(form).lines) == 1001
