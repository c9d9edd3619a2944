"""KRA amounts: hand-computed lines, bands and headers, then properties over random sales.

Every expected value below was worked out by hand from kra-oscu.md §3.5 (the arithmetic is in the
comment above each case); none is produced by the code under test. "round" is half-up to cents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from conftest import make_sale
from hypothesis import given
from hypothesis import strategies as st

from agent.amounts import Amounts, amounts_to_dict, compute_amounts
from agent.errors import InvalidSale
from agent.sales import DEFAULT_TAX_RATES, TAX_BANDS, Sale, parse_sale

D = Decimal
INCLUSIVE, EXCLUSIVE = True, False


def rates(**changes: str) -> dict[str, Decimal]:
    """The default rates (A 0, B 16, C 0, D 0, E 8) with some bands' rates replaced."""
    out = dict(DEFAULT_TAX_RATES)
    out.update({band: D(rate) for band, rate in changes.items()})
    return out


def sale_of(*lines: tuple[str, str, str, str]) -> Sale:
    """A valid sale whose lines are (qty, unit_price, discount, band)."""
    return parse_sale(make_sale(lines=[
        {"item_code": f"ITEM{i}", "item_class": "5059690800", "name": f"Item {i}", "qty": qty,
         "unit_price": price, "discount": discount, "tax_band": band, "qty_unit": "U",
         "pkg_unit": "NT"}
        for i, (qty, price, discount, band) in enumerate(lines)
    ]))


def band_values(amounts: Amounts) -> dict[str, tuple[Decimal, Decimal, Decimal]]:
    return {b.band: (b.rate, b.taxable, b.tax) for b in amounts.bands}


# --- single lines, worked by hand ---------------------------------------------------------------

# (qty, unit_price, discount, band, rates, prices_include_vat,
#  supply, discount_rate, taxable, tax, total)
LINE_CASES = [
    # --- VAT-inclusive (tax = round(G x r/(100+r)), taxable = G - tax, total = G) ---
    # B: 2 x 58.00 = 116.00; 116.00 x 16/116 = 16.00 exactly; 116.00 - 16.00 = 100.00
    pytest.param("2", "58.00", "0", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "116.00", "0.00", "100.00", "16.00", "116.00", id="incl-B-exact"),
    # B: 1 x 100.00; 1600/116 = 13.793103... -> 13.79; 100.00 - 13.79 = 86.21
    pytest.param("1", "100.00", "0", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "100.00", "0.00", "86.21", "13.79", "100.00", id="incl-B-recurring"),
    # B: 100.16 x 16 = 1602.56; 116 x 13.815 = 1602.54, remainder 0.02/116 = 0.000172
    #    so tax = 13.815172... (x.xx5 before rounding) -> 13.82; 100.16 - 13.82 = 86.34
    #    (G x 4/29 can never be exactly x.xx5: 8G = 29 x odd has no solution in cents)
    pytest.param("1", "100.16", "0", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "100.16", "0.00", "86.34", "13.82", "100.16", id="incl-B-x.xx5172-rounds-up"),
    # B: 100.23 x 16 = 1603.68; 116 x 13.82 = 1603.12, remainder 0.56/116 = 0.0048276
    #    so tax = 13.8248276... -> 13.82; 100.23 - 13.82 = 86.41
    pytest.param("1", "100.23", "0", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "100.23", "0.00", "86.41", "13.82", "100.23", id="incl-B-x.xx4828-rounds-down"),
    # E: 1 x 108.00; 108.00 x 8/108 = 8.00; 108.00 - 8.00 = 100.00
    pytest.param("1", "108.00", "0", "E", DEFAULT_TAX_RATES, INCLUSIVE,
                 "108.00", "0.00", "100.00", "8.00", "108.00", id="incl-E-exact"),
    # E: 1 x 100.00; 800/108 = 7.407407... -> 7.41; 100.00 - 7.41 = 92.59
    pytest.param("1", "100.00", "0", "E", DEFAULT_TAX_RATES, INCLUSIVE,
                 "100.00", "0.00", "92.59", "7.41", "100.00", id="incl-E-recurring"),
    # E: 99.97 x 8 = 799.76; 108 x 7.40 = 799.20, remainder 0.56/108 = 0.0051852
    #    so tax = 7.4051852... (x.xx5 before rounding) -> 7.41; 99.97 - 7.41 = 92.56
    pytest.param("1", "99.97", "0", "E", DEFAULT_TAX_RATES, INCLUSIVE,
                 "99.97", "0.00", "92.56", "7.41", "99.97", id="incl-E-x.xx5185-rounds-up"),
    # A: 1.5 x 40.00 = 60.00; minus 5.00 = 55.00; exempt, tax 0.00
    #    discount_rate = 5.00 x 100 / 60.00 = 8.333... -> 8.33
    pytest.param("1.5", "40.00", "5.00", "A", DEFAULT_TAX_RATES, INCLUSIVE,
                 "60.00", "8.33", "55.00", "0.00", "55.00", id="incl-A-discount"),
    # C: 3 x 10.00 = 30.00; zero-rated, tax 0.00
    pytest.param("3", "10.00", "0", "C", DEFAULT_TAX_RATES, INCLUSIVE,
                 "30.00", "0.00", "30.00", "0.00", "30.00", id="incl-C"),
    # D: 1 x 99.99 = 99.99; non-VAT, tax 0.00
    pytest.param("1", "99.99", "0", "D", DEFAULT_TAX_RATES, INCLUSIVE,
                 "99.99", "0.00", "99.99", "0.00", "99.99", id="incl-D"),
    # B: 3 x 33.33 = 99.99; minus 9.99 = 90.00; 1440/116 = 12.413793... -> 12.41;
    #    90.00 - 12.41 = 77.59; discount_rate = 999/99.99 = 9.990999... -> 9.99
    pytest.param("3", "33.33", "9.99", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "99.99", "9.99", "77.59", "12.41", "90.00", id="incl-B-discount"),
    # B: supply 0.5 x 0.25 = 0.125 exactly -> 0.13 (half-up; half-even would give 0.12);
    #    0.13 x 16/116 = 2.08/116 = 0.017931 -> 0.02; 0.13 - 0.02 = 0.11
    pytest.param("0.5", "0.25", "0", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "0.13", "0.00", "0.11", "0.02", "0.13", id="incl-B-supply-half-cent"),
    # B: 2 x 5.00 = 10.00, all of it discounted: 0.00 left, no tax; discount_rate 100.00
    pytest.param("2", "5.00", "10.00", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "10.00", "100.00", "0.00", "0.00", "0.00", id="incl-B-fully-discounted"),
    # B: a free item: supply 0.00, discount_rate 0.00 (no division by zero), everything 0.00
    pytest.param("4", "0.00", "0", "B", DEFAULT_TAX_RATES, INCLUSIVE,
                 "0.00", "0.00", "0.00", "0.00", "0.00", id="incl-B-free"),
    # A: 1 x 1.60, discount 0.01; discount_rate = 0.01 x 100/1.60 = 0.625 exactly -> 0.63
    #    (half-up); 1.60 - 0.01 = 1.59 all taxable, tax 0.00
    pytest.param("1", "1.60", "0.01", "A", DEFAULT_TAX_RATES, INCLUSIVE,
                 "1.60", "0.63", "1.59", "0.00", "1.59", id="incl-A-discount-rate-half"),
    # B at a custom 20 %: 1000.11 x 20/120 = 1000.11/6 = 166.685 exactly (6 x 166.685 =
    #    1000.11) -> 166.69 half-up (half-even would give 166.68); 1000.11 - 166.69 = 833.42
    pytest.param("1", "1000.11", "0", "B", rates(B="20"), INCLUSIVE,
                 "1000.11", "0.00", "833.42", "166.69", "1000.11", id="incl-20pc-exact-half"),
    # B at a custom 20 %: 0.03/6 = 0.005 exactly -> 0.01; 0.03 - 0.01 = 0.02
    pytest.param("1", "0.03", "0", "B", rates(B="20"), INCLUSIVE,
                 "0.03", "0.00", "0.02", "0.01", "0.03", id="incl-20pc-half-cent"),
    # E at a custom 12.5 %: 112.50 x 12.5/112.5 = 12.50; 112.50 - 12.50 = 100.00
    pytest.param("1", "112.50", "0", "E", rates(E="12.5"), INCLUSIVE,
                 "112.50", "0.00", "100.00", "12.50", "112.50", id="incl-12.5pc"),
    # B at a custom 16.50 %: 116.50 x 16.5/116.5 = 16.50; 116.50 - 16.50 = 100.00
    pytest.param("1", "116.50", "0", "B", rates(B="16.50"), INCLUSIVE,
                 "116.50", "0.00", "100.00", "16.50", "116.50", id="incl-16.50pc"),
    # C at a configured 5 % (the band's own rate is used): 105.00 x 5/105 = 5.00
    pytest.param("1", "105.00", "0", "C", rates(C="5"), INCLUSIVE,
                 "105.00", "0.00", "100.00", "5.00", "105.00", id="incl-C-configured-rate"),
    # --- VAT-exclusive (tax = round(G x r/100), taxable = G, total = G + tax) ---
    # B: 1 x 100.00; 100.00 x 0.16 = 16.00; total 116.00
    pytest.param("1", "100.00", "0", "B", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "100.00", "0.00", "100.00", "16.00", "116.00", id="excl-B"),
    # B: 3 x 33.33 = 99.99; minus 9.99 = 90.00; 90.00 x 0.16 = 14.40; total 104.40;
    #    discount_rate = 999/99.99 = 9.990999... -> 9.99
    pytest.param("3", "33.33", "9.99", "B", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "99.99", "9.99", "90.00", "14.40", "104.40", id="excl-B-discount"),
    # B: 12.34 x 0.16 = 1.9744 -> 1.97; total 14.31
    pytest.param("1", "12.34", "0", "B", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "12.34", "0.00", "12.34", "1.97", "14.31", id="excl-B-rounds-down"),
    # B: 0.22 x 0.16 = 0.0352 -> 0.04; total 0.26
    pytest.param("1", "0.22", "0", "B", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "0.22", "0.00", "0.22", "0.04", "0.26", id="excl-B-rounds-up"),
    # B: 0.03 x 0.16 = 0.0048 -> 0.00; total 0.03
    pytest.param("1", "0.03", "0", "B", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "0.03", "0.00", "0.03", "0.00", "0.03", id="excl-B-tax-below-half-cent"),
    # E: 2.5 x 10.10 = 25.25; 25.25 x 0.08 = 2.02 exactly; total 27.27
    pytest.param("2.5", "10.10", "0", "E", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "25.25", "0.00", "25.25", "2.02", "27.27", id="excl-E"),
    # E: supply 2.5 x 0.05 = 0.125 -> 0.13; 0.13 x 0.08 = 0.0104 -> 0.01; total 0.14
    pytest.param("2.5", "0.05", "0", "E", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "0.13", "0.00", "0.13", "0.01", "0.14", id="excl-E-supply-half-cent"),
    # A: 2 x 50.00 = 100.00, tax 0.00
    pytest.param("2", "50.00", "0", "A", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "100.00", "0.00", "100.00", "0.00", "100.00", id="excl-A"),
    # C: 4 x 2.50 = 10.00, tax 0.00
    pytest.param("4", "2.50", "0", "C", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "10.00", "0.00", "10.00", "0.00", "10.00", id="excl-C"),
    # D: 0.25 x 8.00 = 2.00, minus 0.50 = 1.50, tax 0.00; discount_rate 50/2 = 25.00
    pytest.param("0.25", "8.00", "0.50", "D", DEFAULT_TAX_RATES, EXCLUSIVE,
                 "2.00", "25.00", "1.50", "0.00", "1.50", id="excl-D-discount"),
    # B at a custom 10 %: 0.05 x 0.10 = 0.005 exactly -> 0.01; total 0.06
    pytest.param("1", "0.05", "0", "B", rates(B="10"), EXCLUSIVE,
                 "0.05", "0.00", "0.05", "0.01", "0.06", id="excl-10pc-half-cent"),
    # B at a custom 10 %: 0.25 x 0.10 = 0.025 -> 0.03 half-up (half-even: 0.02); total 0.28
    pytest.param("1", "0.25", "0", "B", rates(B="10"), EXCLUSIVE,
                 "0.25", "0.00", "0.25", "0.03", "0.28", id="excl-10pc-half-cent-even"),
    # B at a custom 10 %: 1234.65 x 0.10 = 123.465 -> 123.47 (half-even: 123.46);
    #    1234.65 + 123.47 = 1358.12
    pytest.param("1", "1234.65", "0", "B", rates(B="10"), EXCLUSIVE,
                 "1234.65", "0.00", "1234.65", "123.47", "1358.12", id="excl-10pc-exact-half"),
    # E at a custom 12.5 %: 10.00 x 0.125 = 1.25; total 11.25
    pytest.param("1", "10.00", "0", "E", rates(E="12.5"), EXCLUSIVE,
                 "10.00", "0.00", "10.00", "1.25", "11.25", id="excl-12.5pc"),
    # B at a custom 16.50 %: 10.00 x 0.165 = 1.65; total 11.65
    pytest.param("1", "10.00", "0", "B", rates(B="16.50"), EXCLUSIVE,
                 "10.00", "0.00", "10.00", "1.65", "11.65", id="excl-16.50pc"),
]


class TestLineAmounts:
    @pytest.mark.parametrize(
        ("qty", "price", "discount", "band", "tax_rates", "inclusive",
         "supply", "discount_rate", "taxable", "tax", "total"),
        LINE_CASES,
    )
    def test_single_line(self, qty: str, price: str, discount: str, band: str,
                         tax_rates: Mapping[str, Decimal], inclusive: bool, supply: str,
                         discount_rate: str, taxable: str, tax: str, total: str) -> None:
        """A one-line sale has the hand-computed line, band and header amounts."""
        amounts = compute_amounts(sale_of((qty, price, discount, band)), tax_rates,
                                  prices_include_vat=inclusive)
        (line,) = amounts.lines
        assert line.band == band
        assert line.rate == tax_rates[band]
        assert line.price == D(price)
        assert line.discount == D(discount)
        assert (line.supply, line.discount_rate, line.taxable, line.tax, line.total) == (
            D(supply), D(discount_rate), D(taxable), D(tax), D(total))
        zero = (D("0.00"), D("0.00"))
        assert {b.band: (b.taxable, b.tax) for b in amounts.bands} == {
            other: (D(taxable), D(tax)) if other == band else zero for other in TAX_BANDS}
        assert (amounts.taxable, amounts.tax, amounts.total) == (D(taxable), D(tax), D(total))
        assert amounts.prices_include_vat is inclusive


# --- whole sales, worked by hand -----------------------------------------------------------------

ALL_BANDS = (
    ("2", "58.00", "0", "B"),  # 116.00
    ("1.5", "40.00", "5.00", "A"),  # 60.00 - 5.00 = 55.00
    ("1", "100.00", "0", "B"),  # 100.00
    ("3", "10.00", "0", "C"),  # 30.00
    ("1", "99.99", "0", "D"),  # 99.99
    ("1", "100.00", "0", "E"),  # 100.00
)


class TestSaleAmounts:
    def test_all_bands_inclusive(self) -> None:
        """A VAT-inclusive sale over all five bands sums its rounded lines per band and in total."""
        amounts = compute_amounts(sale_of(*ALL_BANDS), DEFAULT_TAX_RATES, prices_include_vat=True)
        # lines: B 116.00 -> tax 16.00, taxable 100.00 | A 55.00 -> 0.00, 55.00
        #        B 100.00 -> 1600/116 = 13.79, 86.21 | C 30.00 -> 0.00, 30.00
        #        D 99.99 -> 0.00, 99.99 | E 100.00 -> 800/108 = 7.41, 92.59
        assert [(la.taxable, la.tax, la.total) for la in amounts.lines] == [
            (D("100.00"), D("16.00"), D("116.00")),
            (D("55.00"), D("0.00"), D("55.00")),
            (D("86.21"), D("13.79"), D("100.00")),
            (D("30.00"), D("0.00"), D("30.00")),
            (D("99.99"), D("0.00"), D("99.99")),
            (D("92.59"), D("7.41"), D("100.00")),
        ]
        # B: taxable 100.00 + 86.21 = 186.21, tax 16.00 + 13.79 = 29.79
        assert band_values(amounts) == {
            "A": (D(0), D("55.00"), D("0.00")),
            "B": (D(16), D("186.21"), D("29.79")),
            "C": (D(0), D("30.00"), D("0.00")),
            "D": (D(0), D("99.99"), D("0.00")),
            "E": (D(8), D("92.59"), D("7.41")),
        }
        # taxable 55.00 + 186.21 + 30.00 + 99.99 + 92.59 = 463.79; tax 29.79 + 7.41 = 37.20;
        # total 116.00 + 55.00 + 100.00 + 30.00 + 99.99 + 100.00 = 500.99 = 463.79 + 37.20
        assert (amounts.taxable, amounts.tax, amounts.total) == (
            D("463.79"), D("37.20"), D("500.99"))

    def test_all_bands_exclusive(self) -> None:
        """A VAT-exclusive sale over all five bands adds tax on top, per band and in total."""
        amounts = compute_amounts(sale_of(*ALL_BANDS), DEFAULT_TAX_RATES, prices_include_vat=False)
        # lines: B 116.00 x 0.16 = 18.56 -> 134.56 | A 55.00 | B 100.00 -> 16.00 -> 116.00
        #        C 30.00 | D 99.99 | E 100.00 x 0.08 = 8.00 -> 108.00
        assert [(la.taxable, la.tax, la.total) for la in amounts.lines] == [
            (D("116.00"), D("18.56"), D("134.56")),
            (D("55.00"), D("0.00"), D("55.00")),
            (D("100.00"), D("16.00"), D("116.00")),
            (D("30.00"), D("0.00"), D("30.00")),
            (D("99.99"), D("0.00"), D("99.99")),
            (D("100.00"), D("8.00"), D("108.00")),
        ]
        # B: taxable 116.00 + 100.00 = 216.00, tax 18.56 + 16.00 = 34.56
        assert band_values(amounts) == {
            "A": (D(0), D("55.00"), D("0.00")),
            "B": (D(16), D("216.00"), D("34.56")),
            "C": (D(0), D("30.00"), D("0.00")),
            "D": (D(0), D("99.99"), D("0.00")),
            "E": (D(8), D("100.00"), D("8.00")),
        }
        # taxable 55.00 + 216.00 + 30.00 + 99.99 + 100.00 = 500.99; tax 34.56 + 8.00 = 42.56;
        # total 134.56 + 55.00 + 116.00 + 30.00 + 99.99 + 108.00 = 543.55 = 500.99 + 42.56
        assert (amounts.taxable, amounts.tax, amounts.total) == (
            D("500.99"), D("42.56"), D("543.55"))

    def test_header_sums_rounded_lines_not_the_rounded_sum(self) -> None:
        """Header tax is the sum of each line's rounded tax, not the tax of the summed total."""
        amounts = compute_amounts(sale_of(*[("1", "1.00", "0", "B")] * 3), DEFAULT_TAX_RATES,
                                  prices_include_vat=True)
        # each line: 1.00 x 16/116 = 0.137931 -> 0.14, taxable 0.86
        assert [la.tax for la in amounts.lines] == [D("0.14")] * 3
        # band B: 3 x 0.14 = 0.42 (rounding 3.00 x 16/116 = 0.4138 would give 0.41), 3 x 0.86
        assert band_values(amounts)["B"] == (D(16), D("2.58"), D("0.42"))
        assert (amounts.taxable, amounts.tax, amounts.total) == (D("2.58"), D("0.42"), D("3.00"))

    def test_unused_bands_are_zero_in_order(self) -> None:
        """All five bands A-E are always present, in order, with their rates and zeros if unused."""
        amounts = compute_amounts(sale_of(("1", "10.00", "0", "E")),
                                  rates(A="1", B="2", C="3", D="4", E="5"),
                                  prices_include_vat=False)
        # E: 10.00 x 0.05 = 0.50
        assert [(b.band, b.rate, b.taxable, b.tax) for b in amounts.bands] == [
            ("A", D(1), D("0.00"), D("0.00")),
            ("B", D(2), D("0.00"), D("0.00")),
            ("C", D(3), D("0.00"), D("0.00")),
            ("D", D(4), D("0.00"), D("0.00")),
            ("E", D(5), D("10.00"), D("0.50")),
        ]

    def test_default_rates(self) -> None:
        """The default rates are A 0, B 16, C 0, D 0, E 8 (kra-oscu.md §3.6)."""
        assert dict(DEFAULT_TAX_RATES) == {"A": 0, "B": 16, "C": 0, "D": 0, "E": 8}

    def test_total_at_kra_limit_is_refused(self) -> None:
        """A sale whose total reaches 10^16 is refused even if every line is below it."""
        # 6 x 10^15 + 6 x 10^15 = 1.2 x 10^16 >= 10^16
        big = ("1", "6000000000000000.00", "0", "A")
        with pytest.raises(InvalidSale) as info:
            compute_amounts(sale_of(big, big), DEFAULT_TAX_RATES, prices_include_vat=True)
        assert (info.value.field, info.value.code) == ("lines", "too_large")
        assert info.value.message

    def test_tax_on_top_pushing_total_past_limit_is_refused(self) -> None:
        """A VAT-exclusive line whose tax lifts the total to 10^16 or more is refused."""
        # 9 x 10^15 x 1.16 = 1.044 x 10^16 >= 10^16
        sale = sale_of(("1", "9000000000000000.00", "0", "B"))
        with pytest.raises(InvalidSale) as info:
            compute_amounts(sale, DEFAULT_TAX_RATES, prices_include_vat=False)
        assert (info.value.field, info.value.code) == ("lines", "too_large")

    def test_largest_total_is_accepted(self) -> None:
        """A total just below 10^16 is accepted and kept exact to the cent."""
        sale = sale_of(("1", "9999999999999999.99", "0", "A"))
        amounts = compute_amounts(sale, DEFAULT_TAX_RATES, prices_include_vat=True)
        assert amounts.total == D("9999999999999999.99")


class TestAmountsToDict:
    def test_base_sale_as_dict(self) -> None:
        """amounts_to_dict gives fixed two-decimal strings for every amount of the conftest sale."""
        amounts = compute_amounts(parse_sale(make_sale()), DEFAULT_TAX_RATES,
                                  prices_include_vat=True)
        # line 0: B 2 x 58.00 = 116.00 -> tax 16.00, taxable 100.00
        # line 1: A 1.5 x 40.00 = 60.00 - 5.00 = 55.00; discount_rate 500/60 = 8.33
        # header: taxable 155.00, tax 16.00, total 171.00
        assert amounts_to_dict(amounts) == {
            "prices_include_vat": True,
            "taxable": "155.00",
            "tax": "16.00",
            "total": "171.00",
            "bands": [
                {"band": "A", "rate": "0", "taxable": "55.00", "tax": "0.00"},
                {"band": "B", "rate": "16", "taxable": "100.00", "tax": "16.00"},
                {"band": "C", "rate": "0", "taxable": "0.00", "tax": "0.00"},
                {"band": "D", "rate": "0", "taxable": "0.00", "tax": "0.00"},
                {"band": "E", "rate": "8", "taxable": "0.00", "tax": "0.00"},
            ],
            "lines": [
                {"band": "B", "rate": "16", "price": "58.00", "supply": "116.00",
                 "discount_rate": "0.00", "discount": "0.00", "taxable": "100.00",
                 "tax": "16.00", "total": "116.00"},
                {"band": "A", "rate": "0", "price": "40.00", "supply": "60.00",
                 "discount_rate": "8.33", "discount": "5.00", "taxable": "55.00",
                 "tax": "0.00", "total": "55.00"},
            ],
        }


# --- properties over random valid sales ---------------------------------------------------------

CENTS = Fraction(1, 100)
HALF_CENT = Fraction(1, 200)


def half_up_cents(value: Fraction) -> Fraction:
    """An independent reference: round a non-negative exact fraction half-up to cents."""
    assert value >= 0
    return Fraction(math.floor(value * 100 + Fraction(1, 2)), 100)


def cents(draw: st.DrawFn, low: int, high: int) -> Decimal:
    return D(draw(st.integers(low, high))).scaleb(-2)


@st.composite
def random_lines(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1-20 valid lines: qty 0.01-1000.00, price 0.00-100000.00, discount up to the line."""
    lines = []
    for i in range(draw(st.integers(1, 20))):
        qty = cents(draw, 1, 100_000)
        price = cents(draw, 0, 10_000_000)
        # the exact qty x price, floored to cents, never exceeds the half-up rounded line
        most = int(qty * price * 100)
        discount = draw(st.one_of(st.just(D("0.00")), st.integers(0, most).map(
            lambda c: D(c).scaleb(-2))))
        lines.append({
            "item_code": f"ITEM{i}", "item_class": "5059690800", "name": f"Item {i}",
            "qty": str(qty), "unit_price": str(price), "discount": str(discount),
            "tax_band": draw(st.sampled_from(TAX_BANDS)), "qty_unit": "U", "pkg_unit": "NT",
        })
    return lines


RATES = st.fixed_dictionaries(
    {band: st.integers(0, 3000).map(lambda c: D(c).scaleb(-2)) for band in TAX_BANDS})


@st.composite
def computed(draw: st.DrawFn) -> tuple[Sale, dict[str, Decimal], Amounts]:
    """A random valid sale, random rates 0-30 % with 2 decimals, either VAT mode, computed."""
    sale = parse_sale(make_sale(lines=draw(random_lines())))
    tax_rates = draw(RATES)
    inclusive = draw(st.booleans())
    return sale, tax_rates, compute_amounts(sale, tax_rates, prices_include_vat=inclusive)


def exact_after_discount(line: Any) -> Fraction:
    """supply (qty x unit_price rounded half-up) minus discount, from the sale itself."""
    supply = half_up_cents(Fraction(line.qty) * Fraction(line.unit_price))
    return supply - Fraction(line.discount)


class TestAmountProperties:
    @given(computed())
    def test_every_line_balances(self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """Every line's taxable plus tax is its total, and 0 <= tax <= total."""
        _, _, amounts = case
        for la in amounts.lines:
            assert la.taxable + la.tax == la.total
            assert D(0) <= la.tax <= la.total
            assert la.taxable >= 0

    @given(computed())
    def test_line_follows_the_sale(self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """Each line keeps its band, rate, price and discount, and supply is qty x price half-up."""
        sale, tax_rates, amounts = case
        assert len(amounts.lines) == len(sale.lines)
        for line, la in zip(sale.lines, amounts.lines, strict=True):
            assert (la.band, la.rate, la.price, la.discount) == (
                line.tax_band, tax_rates[line.tax_band], line.unit_price, line.discount)
            assert Fraction(la.supply) == half_up_cents(
                Fraction(line.qty) * Fraction(line.unit_price))
            supply = Fraction(la.supply)
            expected_rate = half_up_cents(Fraction(la.discount) * 100 / supply) if supply else 0
            assert Fraction(la.discount_rate) == expected_rate

    @given(computed())
    def test_tax_is_the_rate_rounded_half_up(
            self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """Tax is within half a cent of the exact rate, and is exactly its half-up rounding."""
        sale, tax_rates, amounts = case
        for line, la in zip(sale.lines, amounts.lines, strict=True):
            after = exact_after_discount(line)
            rate = Fraction(tax_rates[line.tax_band])
            if amounts.prices_include_vat:
                exact = after * rate / (100 + rate)
                assert Fraction(la.total) == after
            else:
                exact = after * rate / 100
                assert Fraction(la.taxable) == after
                assert Fraction(la.total) == after + Fraction(la.tax)
            assert abs(Fraction(la.tax) - exact) <= HALF_CENT
            assert Fraction(la.tax) == half_up_cents(exact)

    @given(computed())
    def test_bands_sum_their_lines(self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """Each band A-E, in order, holds its rate and the sums over that band's lines."""
        _, tax_rates, amounts = case
        assert [b.band for b in amounts.bands] == list(TAX_BANDS)
        for b in amounts.bands:
            assert b.rate == tax_rates[b.band]
            assert b.taxable == sum((la.taxable for la in amounts.lines if la.band == b.band), D(0))
            assert b.tax == sum((la.tax for la in amounts.lines if la.band == b.band), D(0))

    @given(computed())
    def test_header_sums_bands_and_lines(
            self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """The header equals the sum over bands and over lines, and taxable plus tax is total."""
        _, _, amounts = case
        assert amounts.taxable == sum((b.taxable for b in amounts.bands), D(0))
        assert amounts.tax == sum((b.tax for b in amounts.bands), D(0))
        assert amounts.taxable == sum((la.taxable for la in amounts.lines), D(0))
        assert amounts.tax == sum((la.tax for la in amounts.lines), D(0))
        assert amounts.total == sum((la.total for la in amounts.lines), D(0))
        assert amounts.taxable + amounts.tax == amounts.total

    @given(computed())
    def test_every_amount_has_two_decimals(
            self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """Every money value of the lines, bands and header has exactly two decimal places."""
        _, _, amounts = case
        values = [amounts.taxable, amounts.tax, amounts.total]
        values += [v for b in amounts.bands for v in (b.taxable, b.tax)]
        values += [v for la in amounts.lines for v in (la.price, la.supply, la.discount_rate,
                                                       la.discount, la.taxable, la.tax, la.total)]
        for value in values:
            assert value.is_finite()
            assert value.as_tuple().exponent == -2, value
            assert not value.is_signed(), value

    @given(computed())
    def test_dict_round_trips(self, case: tuple[Sale, dict[str, Decimal], Amounts]) -> None:
        """amounts_to_dict gives two-decimal strings that parse back to the same Decimals."""
        _, _, amounts = case
        out = amounts_to_dict(amounts)
        assert out["prices_include_vat"] is amounts.prices_include_vat

        def same(text: object, value: Decimal) -> None:
            assert isinstance(text, str)
            assert D(text) == value
            assert D(text).as_tuple().exponent == -2

        same(out["taxable"], amounts.taxable)
        same(out["tax"], amounts.tax)
        same(out["total"], amounts.total)
        bands = out["bands"]
        assert isinstance(bands, list)
        assert len(bands) == len(TAX_BANDS)
        for item, b in zip(bands, amounts.bands, strict=True):
            assert item["band"] == b.band
            assert D(item["rate"]) == b.rate
            same(item["taxable"], b.taxable)
            same(item["tax"], b.tax)
        lines = out["lines"]
        assert isinstance(lines, list)
        assert len(lines) == len(amounts.lines)
        for item, la in zip(lines, amounts.lines, strict=True):
            assert (item["band"], D(item["rate"])) == (la.band, la.rate)
            for name in ("price", "supply", "discount_rate", "discount", "taxable", "tax", "total"):
                same(item[name], getattr(la, name))
