"""A sale's receipt view rendered for printing: plain text, a small HTML page, ESC/POS bytes (pure).

The view is the dict built by `agent.receipts.sale_view`; nothing here computes an amount, it only lays
out what the view holds. `receipt_lines` builds the lines once; text, HTML and ESC/POS only dress them:
the title in bold, and the verification URL as text, a link with a QR code (SVG), or the printer's
own QR code.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from itertools import groupby
from typing import Any, Literal, NamedTuple

import segno

WIDTHS = (32, 42, 48)  # columns of 58 mm and 80 mm thermal paper
HTML_WIDTH = 42
TAX_BANDS = ("A", "B", "C", "D", "E")
PAYMENT_LABELS: Mapping[str, str] = {
    "cash": "CASH",
    "credit": "CREDIT",
    "cash_credit": "CASH/CREDIT",
    "bank_check": "BANK CHECK",
    "card": "DEBIT&CREDIT CARD",
    "mobile_money": "MOBILE MONEY",
    "other": "OTHER",
}
MEDIA_TYPES: Mapping[str, str] = {
    "text": "text/plain; charset=utf-8",
    "html": "text/html; charset=utf-8",
    "escpos": "application/octet-stream",
}

# ESC/POS commands (Epson TM series and the many printers that copy it).
ESC_INIT = b"\x1b@"  # ESC @: reset the printer to its power-on settings
ESC_CODE_PAGE_PC437 = b"\x1bt\x00"  # ESC t 0: character code table 0, PC437 (USA, standard Europe)
ESC_BOLD_ON = b"\x1bE\x01"  # ESC E 1: emphasized (bold) on
ESC_BOLD_OFF = b"\x1bE\x00"  # ESC E 0: emphasized off
GS_DOUBLE_HEIGHT = b"\x1d!\x01"  # GS ! 1: double-height characters (width unchanged, so lines still fit)
GS_NORMAL_SIZE = b"\x1d!\x00"  # GS ! 0: normal character size
ESC_ALIGN_LEFT = b"\x1ba\x00"  # ESC a 0: left-justify
ESC_ALIGN_CENTER = b"\x1ba\x01"  # ESC a 1: centre (used for the QR code)
LF = b"\n"  # LF: print the buffer and feed one line
QR_MODEL_2 = b"\x1d(k\x04\x001A2\x00"  # GS ( k 4 0 49 65 50 0: QR model 2
QR_MODULE_SIZE_6 = b"\x1d(k\x03\x001C\x06"  # GS ( k 3 0 49 67 6: module (dot) size 6
QR_ERROR_CORRECTION_M = b"\x1d(k\x03\x001E1"  # GS ( k 3 0 49 69 49: error correction level M (15%)
QR_STORE_PREFIX = b"\x1d(k"  # GS ( k pL pH 49 80 48 <data>: store data; pL pH = len(data) + 3, little-endian
QR_STORE_FUNCTION = b"1P0"  # 49 80 48: cn 49 (QR), fn 80 (store), m 48
QR_PRINT = b"\x1d(k\x03\x001Q0"  # GS ( k 3 0 49 81 48: print the stored QR code
ESC_FEED_4 = b"\x1bd\x04"  # ESC d 4: print and feed four lines, so the cut clears the last line
GS_PARTIAL_CUT = b"\x1dVB\x00"  # GS V 66 0: feed to the cutter and cut, leaving one point uncut

Style = Literal["plain", "title", "strong", "url"]


class Line(NamedTuple):
    """One printed line, at most `width` characters; `style` says how each medium dresses it."""

    text: str
    style: Style = "plain"


# ---- public API ------------------------------------------------------------------------------------


def render(view: Mapping[str, Any], fmt: str, width: int = 42, copy: bool = False) -> tuple[bytes, str]:
    """The receipt in `fmt` (text, html or escpos) and its media type; ValueError for a bad format or width."""
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(MEDIA_TYPES)}")
    check_width(width)
    if fmt == "text":
        body = render_text(view, width, copy).encode("utf-8")
    elif fmt == "html":
        body = render_html(view, copy).encode("utf-8")
    else:
        body = render_escpos(view, width, copy)
    return body, MEDIA_TYPES[fmt]


def render_text(view: Mapping[str, Any], width: int = 42, copy: bool = False) -> str:
    return "".join(line.text + "\n" for line in receipt_lines(view, width, copy))


def render_html(view: Mapping[str, Any], copy: bool = False) -> str:
    lines = receipt_lines(view, HTML_WIDTH, copy)
    title = " ".join(_titles(view))
    banner = '<div class="copy">COPY</div>\n' if copy else ""
    body = "\n".join(_html_block(style, [line.text for line in group]) for style, group in _by_style(lines))
    return _HTML_PAGE.format(title=html.escape(f"{title} {_text(view.get('sale_id'))}"),
                             width=HTML_WIDTH, banner=banner, body=body)


def render_escpos(view: Mapping[str, Any], width: int = 42, copy: bool = False) -> bytes:
    out = bytearray(ESC_INIT + ESC_CODE_PAGE_PC437)
    for style, group in _by_style(receipt_lines(view, width, copy)):
        out += _escpos_block(style, [line.text for line in group])
    return bytes(out + ESC_FEED_4 + GS_PARTIAL_CUT)


def check_width(width: int) -> None:
    if width not in WIDTHS:
        raise ValueError(f"width: {width} is not one of {', '.join(map(str, WIDTHS))}")


def receipt_lines(view: Mapping[str, Any], width: int = 42, copy: bool = False) -> list[Line]:
    """Every line of the receipt, in order, none longer than `width`."""
    check_width(width)
    receipt: Mapping[str, Any] = view["receipt"]
    signed = receipt.get("kind") == "signed"
    sections = [
        _header(view, width, copy),
        _sale_info(view, width),
        _items(receipt.get("lines") or [], width),
        _tax_table(receipt, width),
        _totals(receipt, width),
        _scu_block(view, width) if signed else _chain_block(receipt.get("chain"), width),
        [_centre("Thank you", width)],
    ]
    separator = Line("-" * width)
    lines = [line for section in sections if section for line in [*section, separator]][:-1]
    return [fitted for line in lines for fitted in _fit(line, width)]


# ---- sections -----------------------------------------------------------------------------------------


def _header(view: Mapping[str, Any], width: int, copy: bool) -> list[Line]:
    receipt: Mapping[str, Any] = view["receipt"]
    seller: Mapping[str, Any] = receipt.get("seller") or {}
    lines = [_centre(text, width) for text in _wrap(_text(seller.get("name")), width)]
    if seller:
        lines += [_centre(f"PIN: {_text(seller.get('pin'))}", width),
                  _centre(f"Branch: {_text(seller.get('branch'))}", width)]
    lines += [_centre(title, width, "title") for title in _titles(view)]
    if copy:
        lines.append(_centre("*** COPY ***", width, "title"))
    if receipt.get("kind") != "signed":
        lines += [Line(text) for text in _wrap(_text(receipt.get("notice")), width)]
        lines += [Line(text, "strong") for text in _wrap(_text(receipt.get("offline_warning")), width)]
    else:  # signed by KRA's simulator or sandbox: said as loudly as the title
        lines += [Line(text, "strong") for text in _wrap(_text(receipt.get("notice")), width)]
    return lines


def _sale_info(view: Mapping[str, Any], width: int) -> list[Line]:
    receipt: Mapping[str, Any] = view["receipt"]
    number = view.get("receipt_no") if receipt.get("kind") == "signed" else _temporary_label(view)
    customer: Mapping[str, Any] = receipt.get("customer") or {}
    fields = [("Date", _iso_time(_text(receipt.get("issued_at")))), ("Sale ID", view.get("sale_id")),
              ("Till", view.get("till_id")), ("Receipt No", number),
              ("Customer PIN", customer.get("pin")), ("Customer", customer.get("name"))]
    return [line for label, value in fields if value not in (None, "") for line in _labelled(label, value, width)]


def _items(items: Sequence[Mapping[str, Any]], width: int) -> list[Line]:
    lines: list[Line] = []
    for item in items:
        lines += [Line(text) for text in _wrap(_text(item.get("name")), width)]
        detail = f"  {_text(item.get('qty'))} x {_text(item.get('unit_price'))}"
        lines += _pair(detail, f"{_text(item.get('total'))} {_text(item.get('tax_band'))}", width)
        if _text(item.get("discount"), "0.00") != "0.00":
            lines += _pair("  Discount", f"-{_text(item.get('discount'))}", width)
    return lines


def _tax_table(receipt: Mapping[str, Any], width: int) -> list[Line]:
    present = {_text(b.get("band")): b for b in receipt.get("bands") or []}
    rates: Mapping[str, Any] = receipt.get("rates") or {}
    lines = _columns(("Band", "Rate", "Taxable", "Tax"), width)
    for band in TAX_BANDS:
        row = present.get(band, {})
        rate = _text(row.get("rate", rates.get(band)), "-")
        lines += _columns((band, rate if rate == "-" else f"{rate}%",
                           _text(row.get("taxable"), "0.00"), _text(row.get("tax"), "0.00")), width)
    return lines


def _totals(receipt: Mapping[str, Any], width: int) -> list[Line]:
    totals: Mapping[str, Any] = receipt.get("totals") or {}
    payment = _text(receipt.get("payment"))
    return [*_pair("TOTAL", _text(totals.get("total")), width, "strong"),
            *_pair("TOTAL TAX", _text(totals.get("tax")), width),
            *_labelled("Items", len(receipt.get("lines") or []), width),
            *_labelled("Payment", PAYMENT_LABELS.get(payment, payment.upper()), width)]


def _scu_block(view: Mapping[str, Any], width: int) -> list[Line]:
    kra: Mapping[str, Any] = view["receipt"].get("kra") or {}
    label = _text(kra.get("label")) or ("NC" if _is_credit_note(view) else "NS")
    number = f"{_text(kra.get('receipt_no'), '-')}/{_text(kra.get('total_receipt_no'), '-')} {label}"
    lines = [_centre("SCU INFORMATION", width, "strong"),
             *_labelled("Date", _scu_time(_text(kra.get("signed_at"))), width),
             *_labelled("SCU ID", _text(kra.get("scu_id"), "-"), width),
             *_labelled("CU INVOICE NO", _text(kra.get("cu_invoice_no"), "-"), width),
             *_labelled("RECEIPT NUMBER", number, width),
             *_grouped("Internal Data", _text(kra.get("internal_data")), width),
             *_grouped("Receipt Signature", _text(kra.get("signature")), width)]
    if kra.get("original_cu_invoice_no"):
        lines += _labelled("ORIGINAL CU INVOICE NO", kra["original_cu_invoice_no"], width)
    if kra.get("qr_url"):
        lines += [Line("Verify:"), *[Line(text, "url") for text in _chunks(_text(kra["qr_url"]), width)]]
    return lines


def _chain_block(chain: Mapping[str, Any] | None, width: int) -> list[Line]:
    if not chain:
        return []
    fields = (("Hash", "hash"), ("Prev", "prev_hash"), ("Sig", "signature"), ("Key", "key_id"))
    return [Line("Receipt chain", "strong"),
            *[line for label, key in fields for line in _labelled(label, chain.get(key), width)]]


# ---- view fields --------------------------------------------------------------------------------------


def _is_credit_note(view: Mapping[str, Any]) -> bool:
    kra: Mapping[str, Any] = view["receipt"].get("kra") or {}
    return view.get("kind") == "credit_note" or kra.get("label") == "NC"


def _titles(view: Mapping[str, Any]) -> list[str]:
    credit = _is_credit_note(view)
    if view["receipt"].get("kind") == "signed":
        return ["CREDIT NOTE" if credit else "TAX INVOICE"]
    return ["TEMPORARY RECEIPT", "CREDIT NOTE"] if credit else ["TEMPORARY RECEIPT"]


def _temporary_label(view: Mapping[str, Any]) -> str:
    label = _text(view["receipt"].get("label"))
    number = view.get("receipt_no")
    return label or (f"T-{number:06d}" if isinstance(number, int) else _text(number))


def _iso_time(value: str) -> str:
    """An ISO 8601 time as YYYY-MM-DD HH:MM:SS in its own offset; as given if it does not parse."""
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _scu_time(value: str) -> str:
    """KRA's sdcDateTime (YYYYMMDDhhmmss) as YYYY-MM-DD HH:MM:SS; as given if it does not parse."""
    try:
        return datetime.strptime(value, "%Y%m%d%H%M%S").strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value or "-"


def _text(value: object, default: str = "") -> str:
    return default if value is None else str(value)


# ---- layout -------------------------------------------------------------------------------------------


def _wrap(text: str, width: int, hyphens: bool = False) -> list[str]:
    """Words on lines of at most `width`; a word longer than a line is split (at its hyphens if `hyphens`)."""
    return textwrap.wrap(text, width, break_on_hyphens=hyphens)


def _chunks(text: str, width: int) -> list[str]:
    """Text without spaces (a hash, a URL) cut into equal pieces of at most `width`."""
    if not text:
        return []
    size = -(-len(text) // -(-len(text) // width))
    return [text[i:i + size] for i in range(0, len(text), size)]


def _centre(text: str, width: int, style: Style = "plain") -> Line:
    return Line(" " * max(0, (width - len(text)) // 2) + text, style)


def _pair(left: str, right: str, width: int, style: Style = "plain") -> list[Line]:
    """`left` and `right` on one line, `right` flush right; `right` on its own line if they do not fit."""
    if len(left) + 1 + len(right) <= width:
        return [Line(left + right.rjust(width - len(left)), style)]
    return [*(Line(text, style) for text in _wrap(left, width)), Line(right.rjust(width), style)]


def _labelled(label: str, value: object, width: int) -> list[Line]:
    """`Label: value` on one line, or the label on its own line and the value cut below it."""
    text = _text(value)
    if len(label) + 2 + len(text) <= width:
        return [Line(f"{label}: {text}")]
    return [Line(f"{label}:"), *(Line(piece) for piece in _chunks(text, width))]


def _grouped(label: str, value: str, width: int) -> list[Line]:
    """The label on its own line, then a value in dash-separated groups, wrapped between groups."""
    return [Line(f"{label}:"), *(Line(text) for text in _wrap(value, width, hyphens=True))]


def _columns(cells: tuple[str, str, str, str], width: int) -> list[Line]:
    """A tax-table row: band, rate, taxable and tax right-aligned; split over lines if an amount is too wide."""
    amount = (width - 10) // 2
    band, rate, taxable, tax = cells
    row = f"{band:<4}{rate:>6}{taxable:>{width - 10 - amount}}{tax:>{amount}}"
    if len(row) <= width:
        return [Line(row)]
    return [Line(f"{band} {rate}"), *_pair("  Taxable", taxable, width), *_pair("  Tax", tax, width)]


def _fit(line: Line, width: int) -> Iterator[Line]:
    """The last guard of the width: a line that is still too long is cut."""
    if len(line.text) <= width:
        yield line
        return
    for piece in _chunks(line.text, width):
        yield Line(piece, line.style)


def _by_style(lines: Iterable[Line]) -> Iterator[tuple[Style, Iterator[Line]]]:
    return groupby(lines, key=lambda line: line.style)


# ---- ESC/POS ------------------------------------------------------------------------------------------


def _escpos_block(style: Style, texts: list[str]) -> bytes:
    if style == "url":
        return escpos_qr("".join(texts))
    body = b"".join(text.encode("cp437", errors="replace") + LF for text in texts)
    if style == "title":
        return ESC_BOLD_ON + GS_DOUBLE_HEIGHT + body + GS_NORMAL_SIZE + ESC_BOLD_OFF
    if style == "strong":
        return ESC_BOLD_ON + body + ESC_BOLD_OFF
    return body


def escpos_qr(data: str) -> bytes:
    """The printer's native QR code (model 2, module size 6, level M) of `data`, centred."""
    payload = data.encode("utf-8")
    size = len(payload) + 3
    if size > 0xFFFF:
        raise ValueError(f"qr: {len(payload)} bytes do not fit in one QR code")
    store = QR_STORE_PREFIX + size.to_bytes(2, "little") + QR_STORE_FUNCTION + payload
    return (ESC_ALIGN_CENTER + QR_MODEL_2 + QR_MODULE_SIZE_6 + QR_ERROR_CORRECTION_M + store + QR_PRINT
            + LF + ESC_ALIGN_LEFT)


# ---- HTML ---------------------------------------------------------------------------------------------


def _html_block(style: Style, texts: list[str]) -> str:
    if style == "url":
        url = "".join(texts)
        # segno writes the QR code as inline SVG; a phone can scan it off the screen or a printout.
        qr = segno.make(url, error="m").svg_inline(scale=3, border=2)
        return f'</pre><div class="qr">{qr}</div><pre><a href="{html.escape(url)}">{html.escape(url)}</a>'
    body = "\n".join(html.escape(text) for text in texts)
    if style == "title":
        return f'<strong class="title">{body}</strong>'
    if style == "strong":
        return f"<strong>{body}</strong>"
    return body


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ margin: 0; padding: 1em; background: #eee; color: #000; }}
.receipt {{ width: {width}ch; margin: 0 auto; padding: 1em; background: #fff;
            font: 14px/1.3 "Courier New", monospace; }}
pre {{ margin: 0; font: inherit; white-space: pre-wrap; word-break: break-all; }}
.title {{ font-size: 1.15em; }}
.copy {{ margin-bottom: .5em; padding: .3em; border: 3px double #b00; color: #b00;
        font: bold 1.5em sans-serif; letter-spacing: .3em; text-align: center; }}
a {{ color: #000; }}
.qr {{ text-align: center; }}
@media print {{ body {{ padding: 0; background: #fff; }} .receipt {{ padding: 0; }} }}
</style>
</head>
<body>
<main class="receipt">
{banner}<pre>
{body}
</pre>
</main>
</body>
</html>
"""
