"""KRA amounts for a sale (pure): per-line tax, per-band sums A-E and header totals, in Decimal.

The arithmetic follows kra-oscu.md §3.5. Tax is computed per line and rounded half-up to cents;
`taxable = gross - tax`, so every line balances exactly; band sums and header totals add up the
rounded lines, so the header always equals the sum of what is printed.

With VAT-inclusive prices (the Kenyan retail norm) the line's gross is what the customer pays and
`prc`/`splyAmt`/`dcAmt` are on the gross basis; with VAT-exclusive prices they are on the net basis
and the tax is added on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from agent.errors import InvalidSale
from agent.sales import MAX_AMOUNT, TAX_BANDS, Line, Sale, money, round_cents

ZERO = Decimal("0.00")
HUNDRED = Decimal(100)


@dataclass(frozen=True, slots=True)
class LineAmounts:
    band: str
    rate: Decimal
    price: Decimal  # prc
    supply: Decimal  # splyAmt = prc x qty
    discount_rate: Decimal  # dcRt, percent
    discount: Decimal  # dcAmt
    taxable: Decimal  # taxblAmt
    tax: Decimal  # taxAmt
    total: Decimal  # totAmt


@dataclass(frozen=True, slots=True)
class BandTotals:
    band: str
    rate: Decimal
    taxable: Decimal
    tax: Decimal


@dataclass(frozen=True, slots=True)
class Amounts:
    lines: tuple[LineAmounts, ...]
    bands: tuple[BandTotals, ...]  # always all five, A-E, zeros for unused bands
    taxable: Decimal
    tax: Decimal
    total: Decimal
    prices_include_vat: bool


def compute_amounts(sale: Sale, rates: Mapping[str, Decimal], *, prices_include_vat: bool) -> Amounts:
    """Compute every KRA amount of the sale; raises InvalidSale if a total exceeds KRA's limits."""
    lines = tuple(_line(line, rates[line.tax_band], prices_include_vat) for line in sale.lines)
    bands = tuple(
        BandTotals(
            band=band,
            rate=rates[band],
            taxable=sum((la.taxable for la in lines if la.band == band), ZERO),
            tax=sum((la.tax for la in lines if la.band == band), ZERO),
        )
        for band in TAX_BANDS
    )
    total = sum((la.total for la in lines), ZERO)
    if total >= MAX_AMOUNT:
        raise InvalidSale("lines", "too_large", f"sale total {total} is above KRA's limit of {MAX_AMOUNT}")
    return Amounts(
        lines=lines,
        bands=bands,
        taxable=sum((b.taxable for b in bands), ZERO),
        tax=sum((b.tax for b in bands), ZERO),
        total=total,
        prices_include_vat=prices_include_vat,
    )


def _line(line: Line, rate: Decimal, prices_include_vat: bool) -> LineAmounts:
    supply = round_cents(line.unit_price * line.qty)
    after_discount = supply - line.discount
    if prices_include_vat:
        tax = round_cents(after_discount * rate / (HUNDRED + rate))
        taxable, total = after_discount - tax, after_discount
    else:
        tax = round_cents(after_discount * rate / HUNDRED)
        taxable, total = after_discount, after_discount + tax
    discount_rate = round_cents(line.discount * HUNDRED / supply) if supply else ZERO
    return LineAmounts(
        band=line.tax_band, rate=rate, price=line.unit_price, supply=supply,
        discount_rate=discount_rate, discount=line.discount,
        taxable=taxable, tax=tax, total=total,
    )


def amounts_to_dict(amounts: Amounts) -> dict[str, object]:
    """JSON-ready form, money as fixed two-decimal strings so no float ever touches it."""
    return {
        "prices_include_vat": amounts.prices_include_vat,
        "taxable": money(amounts.taxable),
        "tax": money(amounts.tax),
        "total": money(amounts.total),
        "bands": [
            {"band": b.band, "rate": str(b.rate), "taxable": money(b.taxable), "tax": money(b.tax)}
            for b in amounts.bands
        ],
        "lines": [
            {"band": la.band, "rate": str(la.rate), "price": money(la.price),
             "supply": money(la.supply), "discount_rate": money(la.discount_rate),
             "discount": money(la.discount), "taxable": money(la.taxable),
             "tax": money(la.tax), "total": money(la.total)}
            for la in amounts.lines
        ],
    }

