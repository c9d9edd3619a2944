"""Receipt rendering: every field a Kenyan eTIMS receipt must show, at every paper width, in each format.

The views are built here by hand in the shape `agent.receipts.sale_view` returns; the expected texts are
written out literally, not produced by the code under test.
"""

from __future__ import annotations

import copy as copy_module
from typing import Any

import pytest

from agent.receipt_format import render, render_escpos, render_html, render_text

WIDTHS = (32, 42, 48)
KINDS = ("signed", "credit_note", "temporary")
URL = "https://etims-sbx.kra.go.ke/common/link/etims/receipt/indexEtimsReceiptData?Data=P052112956W00LVJ52Q83D1ADLZMO"
NOTICE = ("TEMPORARY RECEIPT - NOT A KRA TAX INVOICE. "
          "The KRA-signed receipt follows once KRA has signed this sale.")
CHAIN = {"hash": "ab" * 32, "prev_hash": "cd" * 32, "key_id": "0123456789abcdef",
         "signature": "MEUCIQDx" * 10 + "AbCdEfGhIjKlMnOpQrStUvWx=="}
ESC_INIT = bytes([0x1B, 0x40])
QR_PRINT = bytes([0x1D, 0x28, 0x6B, 3, 0, 49, 81, 48])
QR_MODEL_2 = bytes([0x1D, 0x28, 0x6B, 4, 0, 49, 65, 50, 0])
QR_SIZE_6 = bytes([0x1D, 0x28, 0x6B, 3, 0, 49, 67, 6])
QR_LEVEL_M = bytes([0x1D, 0x28, 0x6B, 3, 0, 49, 69, 49])
PARTIAL_CUT = bytes([0x1D, 0x56, 66, 0])


def make_view(kind: str = "signed", **receipt_changes: Any) -> dict[str, Any]:
    """A receipt view: a signed sale, a signed credit note or a temporary receipt; receipt keys replaced."""
    receipt: dict[str, Any] = {
        "kind": "signed",
        "seller": {"name": "Duka Bora Ltd", "pin": "P052112956W", "branch": "00"},
        "kra": {"invc_no": 1, "scu_id": "KRACU0287624417", "cu_invoice_no": "KRACU0287624417/1",
                "receipt_no": 1, "total_receipt_no": 1, "label": "NS",
                "internal_data": "P5PL-RDZ2-VL47-EBDJ-2NOR-BSKT-LU", "signature": "LVJ5-2Q83-D1AD-LZMO",
                "signed_at": "20261121233237", "qr_url": URL, "original_cu_invoice_no": None},
        "issued_at": "2026-11-21T14:05:00+03:00",
        "payment": "mobile_money",
        "lines": [
            {"name": "Bread 400g", "item_code": "KE2NTU0000001", "qty": "2.00", "qty_unit": "U",
             "unit_price": "58.00", "discount": "0.00", "tax_band": "B", "tax_rate": "16", "tax": "16.00",
             "total": "116.00"},
            {"name": "Sukuma wiki", "item_code": "KE2NTKG0000002", "qty": "1.50", "qty_unit": "KG",
             "unit_price": "40.00", "discount": "5.00", "tax_band": "A", "tax_rate": "0", "tax": "0.00",
             "total": "55.00"},
        ],
        "bands": [{"band": "A", "rate": "0", "taxable": "55.00", "tax": "0.00"},
                  {"band": "B", "rate": "16", "taxable": "100.00", "tax": "16.00"}],
        "rates": {"A": "0", "B": "16", "C": "0", "D": "0", "E": "8"},
        "totals": {"taxable": "155.00", "tax": "16.00", "total": "171.00"},
        "prices_include_vat": True,
        "customer": {"name": "Jane", "pin": "A123456789Z"},
    }
    view: dict[str, Any] = {"sale_id": "R-1", "till_id": "TILL-1", "status": "signed", "receipt_no": 1,
                            "accepted_at": "2026-11-21T20:32:37.127378+00:00", "kind": "sale", "receipt": receipt}
    if kind == "credit_note":
        view["kind"] = "credit_note"
        receipt["kra"].update(invc_no=2, cu_invoice_no="KRACU0287624417/2", receipt_no=1, total_receipt_no=2,
                              label="NC", original_cu_invoice_no="KRACU0287624417/1")
    elif kind == "temporary":
        view["status"] = "pending"
        del receipt["kra"]
        receipt.update(kind="temporary", number=1, label="T-000001", notice=NOTICE,
                       chain=copy_module.deepcopy(CHAIN))
    receipt.update(receipt_changes)
    return view


def text_lines(view: dict[str, Any], width: int = 42, copy: bool = False) -> list[str]:
    return render_text(view, width, copy).splitlines()


def squeezed(text: str) -> str:
    """The text without any whitespace: values cut over several lines read as one."""
    return "".join(text.split())


def title_of(kind: str) -> str:
    return {"signed": "TAX INVOICE", "credit_note": "CREDIT NOTE", "temporary": "TEMPORARY RECEIPT"}[kind]


# ---- every kind at every width -------------------------------------------------------------------------

kind_and_width = pytest.mark.parametrize(("kind", "width"), [(k, w) for k in KINDS for w in WIDTHS])


@kind_and_width
def test_every_line_fits_the_paper(kind: str, width: int) -> None:
    for copy in (False, True):
        lines = text_lines(make_view(kind), width, copy)
        assert lines
        assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]


@kind_and_width
def test_header_shows_seller_title_and_sale(kind: str, width: int) -> None:
    lines = [line.strip() for line in text_lines(make_view(kind), width)]
    assert lines[:4] == ["Duka Bora Ltd", "PIN: P052112956W", "Branch: 00", title_of(kind)]
    assert "Date: 2026-11-21 14:05:00" in lines  # issued_at in its own offset, Nairobi +03:00
    assert "Sale ID: R-1" in lines
    assert "Till: TILL-1" in lines
    assert ("Receipt No: T-000001" if kind == "temporary" else "Receipt No: 1") in lines
    assert "Customer PIN: A123456789Z" in lines
    assert "Customer: Jane" in lines
    assert "*** COPY ***" not in render_text(make_view(kind), width)
    assert lines[-1] == "Thank you"


@kind_and_width
def test_copy_marker_right_under_the_title(kind: str, width: int) -> None:
    lines = [line.strip() for line in text_lines(make_view(kind), width, copy=True)]
    title = lines.index(title_of(kind))
    assert lines[title + 1] == "*** COPY ***"
    assert lines.count("*** COPY ***") == 1


@kind_and_width
def test_items_with_amount_and_band_flush_right(kind: str, width: int) -> None:
    lines = text_lines(make_view(kind), width)
    bread = lines.index("Bread 400g")
    assert lines[bread + 1].startswith("  2.00 x 58.00 ")
    assert lines[bread + 1].endswith("116.00 B")
    assert len(lines[bread + 1]) == width
    sukuma = lines.index("Sukuma wiki")
    assert lines[sukuma + 1].startswith("  1.50 x 40.00 ")
    assert lines[sukuma + 1].endswith(" 55.00 A")
    assert lines[sukuma + 2].split() == ["Discount", "-5.00"]
    assert sum("Discount" in line for line in lines) == 1  # not for Bread, whose discount is 0.00


@kind_and_width
def test_tax_table_has_all_five_bands(kind: str, width: int) -> None:
    lines = text_lines(make_view(kind), width)
    header = next(i for i, line in enumerate(lines) if line.startswith("Band"))
    assert lines[header].split() == ["Band", "Rate", "Taxable", "Tax"]
    rows = [line.split() for line in lines[header + 1:header + 6]]
    assert rows == [["A", "0%", "55.00", "0.00"], ["B", "16%", "100.00", "16.00"], ["C", "0%", "0.00", "0.00"],
                    ["D", "0%", "0.00", "0.00"], ["E", "8%", "0.00", "0.00"]]
    assert all(len(line) == width for line in lines[header:header + 6])  # amounts flush right


@kind_and_width
def test_totals_item_count_and_payment(kind: str, width: int) -> None:
    lines = text_lines(make_view(kind), width)
    assert [line.split() for line in lines if line.startswith("TOTAL")] == [["TOTAL", "171.00"],
                                                                           ["TOTAL", "TAX", "16.00"]]
    assert "Items: 2" in lines
    assert "Payment: MOBILE MONEY" in lines


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(("kind", "number"), [("signed", "1/1 NS"), ("credit_note", "1/2 NC")])
def test_signed_receipts_carry_the_scu_block(kind: str, number: str, width: int) -> None:
    text = render_text(make_view(kind), width)
    lines = text.splitlines()
    assert "SCU INFORMATION" in [line.strip() for line in lines]
    assert "Date: 2026-11-21 23:32:37" in lines  # from sdcDateTime 20261121233237
    assert "SCU ID: KRACU0287624417" in lines
    invoice = "KRACU0287624417/2" if kind == "credit_note" else "KRACU0287624417/1"
    assert f"CU INVOICE NO: {invoice}" in lines
    assert f"RECEIPT NUMBER: {number}" in lines
    assert "InternalData:P5PL-RDZ2-VL47-EBDJ-2NOR-BSKT-LUReceiptSignature:LVJ5-2Q83-D1AD-LZMO" in squeezed(text)
    assert f"Verify:{URL}" in squeezed(text)
    assert ("ORIGINAL CU INVOICE NO" in text) == (kind == "credit_note")
    if kind == "credit_note":
        assert "ORIGINALCUINVOICENO:KRACU0287624417/1" in squeezed(text)
        assert "TAX INVOICE" not in text
    assert "Receipt chain" not in text
    assert "NOT A KRA TAX INVOICE" not in text


@pytest.mark.parametrize("width", WIDTHS)
def test_temporary_receipt_says_so_and_carries_the_chain(width: int) -> None:
    text = render_text(make_view("temporary"), width)
    lines = text.splitlines()
    assert NOTICE in " ".join(line.strip() for line in lines)  # printed in full
    assert "Receipt chain" in lines
    assert (f"Hash:{CHAIN['hash']}Prev:{CHAIN['prev_hash']}Sig:{CHAIN['signature']}Key:{CHAIN['key_id']}"
            in squeezed(text))
    for absent in ("TAX INVOICE\n", "SCU", "CU INVOICE NO", "RECEIPT NUMBER", "Internal Data", "Verify", "http"):
        assert absent not in text


def test_temporary_receipt_without_seller_or_chain_or_customer() -> None:
    view = make_view("temporary", chain=None)
    del view["receipt"]["seller"], view["receipt"]["customer"], view["receipt"]["rates"]
    lines = [line.strip() for line in text_lines(view, 32)]
    assert lines[0] == "TEMPORARY RECEIPT"
    assert not any(line.startswith(("PIN:", "Branch:", "Customer")) for line in lines)
    assert "Receipt chain" not in lines
    header = lines.index("Band  Rate    Taxable        Tax")
    assert [line.split()[:2] for line in lines[header + 1:header + 6]] == [
        ["A", "0%"], ["B", "16%"], ["C", "-"], ["D", "-"], ["E", "-"]]  # no rate known for unused bands


def test_temporary_credit_note_says_both() -> None:
    view = make_view("temporary")
    view["kind"] = "credit_note"
    lines = [line.strip() for line in text_lines(view)]
    assert lines[3:5] == ["TEMPORARY RECEIPT", "CREDIT NOTE"]


@pytest.mark.parametrize(("payment", "label"), [
    ("cash", "CASH"), ("credit", "CREDIT"), ("cash_credit", "CASH/CREDIT"), ("bank_check", "BANK CHECK"),
    ("card", "DEBIT&CREDIT CARD"), ("mobile_money", "MOBILE MONEY"), ("other", "OTHER"), ("voucher", "VOUCHER"),
])
def test_payment_labels(payment: str, label: str) -> None:
    assert f"Payment: {label}" in text_lines(make_view(payment=payment))


@pytest.mark.parametrize("width", WIDTHS)
def test_long_values_wrap_within_the_width(width: int) -> None:
    big = "9999999999999999.99"  # just under KRA's limit of 10^16
    name = "Extra large family pack of premium Kenyan AA coffee beans, medium roast"
    view = make_view(
        seller={"name": "Duka Bora na Bei Nafuu Supermarket Limited (Kariakor)", "pin": "P052112956W",
                "branch": "00"},
        lines=[{"name": name, "qty": "1000.000", "unit_price": big, "discount": big, "tax_band": "B",
                "total": big}],
        bands=[{"band": "B", "rate": "16", "taxable": big, "tax": big}],
        totals={"taxable": big, "tax": big, "total": big},
        customer={"name": "Wanjiku Kamau Njoroge Otieno Mwangi Achieng", "pin": "A123456789Z"},
    )
    view["receipt"]["kra"].update(internal_data="-".join(["ABCD"] * 20), signature="-".join(["WXYZ"] * 12))
    view["sale_id"] = "3f2a9c1e-8d4b-4e7a-9b2c-1d0e5f6a7b8c-till-receipt"
    text = render_text(view, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert name in " ".join(lines)
    assert f"InternalData:{'-'.join(['ABCD'] * 20)}" in squeezed(text)
    assert f"ReceiptSignature:{'-'.join(['WXYZ'] * 12)}" in squeezed(text)
    assert squeezed(text).count(big) == 7  # unit price, line total, discount, taxable, tax, TOTAL, TOTAL TAX


# ---- HTML -----------------------------------------------------------------------------------------------


def test_html_is_a_standalone_escaped_document() -> None:
    view = make_view()
    view["receipt"]["lines"][0]["name"] = '<b>&"'
    view["receipt"]["seller"]["name"] = "Mama's <Duka>"
    view["receipt"]["kra"]["qr_url"] = URL + "&lang=<en>"
    page = render_html(view)
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert '<meta charset="utf-8">' in page
    assert "<style>" in page
    assert "&lt;b&gt;&amp;&quot;" in page
    assert '<b>&"' not in page
    assert "Mama&#x27;s &lt;Duka&gt;" in page
    assert f'<a href="{URL}&amp;lang=&lt;en&gt;">' in page
    assert "TAX INVOICE" in page
    assert "SCU ID: KRACU0287624417" in page
    assert 'class="copy"' not in page


def test_html_copy_banner() -> None:
    page = render_html(make_view(), copy=True)
    assert '<div class="copy">COPY</div>' in page
    assert "*** COPY ***" in page


def test_html_temporary_has_no_link() -> None:
    page = render_html(make_view("temporary"))
    assert "<a " not in page
    assert "TEMPORARY RECEIPT - NOT A KRA TAX INVOICE." in page


# ---- ESC/POS --------------------------------------------------------------------------------------------


def qr_store(data: bytes) -> bytes:
    size = len(data) + 3
    return bytes([0x1D, 0x28, 0x6B, size % 256, size // 256, 49, 80, 48]) + data


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["signed", "credit_note"])
def test_escpos_signed_has_native_qr_and_cut(kind: str, width: int) -> None:
    out = render_escpos(make_view(kind), width)
    assert out.startswith(ESC_INIT)
    store = qr_store(URL.encode())
    assert store[3:5] == bytes([len(URL) + 3, 0])
    positions = [out.index(part) for part in (QR_MODEL_2, QR_SIZE_6, QR_LEVEL_M, store, QR_PRINT, PARTIAL_CUT)]
    assert positions == sorted(positions)
    assert out.endswith(PARTIAL_CUT)
    assert out.index(bytes([0x1B, 0x45, 1])) < out.index(title_of(kind).encode()) < out.index(bytes([0x1B, 0x45, 0]))
    lines = text_lines(make_view(kind), width)
    verify = lines.index("Verify:")
    url_end = next(i for i in range(verify, len(lines)) if lines[i] == "-" * width)
    assert "".join(lines[verify + 1:url_end]) == URL  # the text receipt's URL lines: the QR code in ESC/POS
    for line in lines[:verify + 1] + lines[url_end:]:
        assert line.encode("cp437") + b"\n" in out
    assert URL.encode()[:width] + b"\n" not in out


def test_escpos_qr_length_over_255_bytes() -> None:
    url = URL + "&pad=" + "x" * 200
    out = render_escpos(make_view(kra={**make_view()["receipt"]["kra"], "qr_url": url}))
    assert len(url) + 3 > 255
    assert qr_store(url.encode()) in out
    assert qr_store(url.encode())[3:5] == (len(url) + 3).to_bytes(2, "little")


@pytest.mark.parametrize("width", WIDTHS)
def test_escpos_temporary_has_text_but_no_qr(width: int) -> None:
    out = render_escpos(make_view("temporary"), width, copy=True)
    assert out.startswith(ESC_INIT)
    assert b"\x1d(k" not in out
    assert out.endswith(PARTIAL_CUT)
    assert b"TEMPORARY RECEIPT" in out
    assert b"*** COPY ***" in out
    for line in text_lines(make_view("temporary"), width, copy=True):
        assert line.encode("cp437") + b"\n" in out


def test_escpos_replaces_characters_outside_the_code_page() -> None:
    view = make_view()
    view["receipt"]["lines"][0]["name"] = "Chai ☕ 500g"
    out = render_escpos(view)
    assert b"Chai ? 500g\n" in out


# ---- render() --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "media_type"), [
    ("text", "text/plain; charset=utf-8"),
    ("html", "text/html; charset=utf-8"),
    ("escpos", "application/octet-stream"),
])
def test_render_media_types(fmt: str, media_type: str) -> None:
    view = make_view()
    body, got = render(view, fmt, 32, copy=True)
    assert got == media_type
    expected = {"text": render_text(view, 32, True).encode(), "html": render_html(view, True).encode(),
                "escpos": render_escpos(view, 32, True)}[fmt]
    assert body == expected


def test_render_unknown_format() -> None:
    with pytest.raises(ValueError) as err:
        render(make_view(), "pdf")
    assert str(err.value) == "format: 'pdf' is not one of text, html, escpos"


@pytest.mark.parametrize("width", [0, 40, 80])
def test_bad_width(width: int) -> None:
    for call in (lambda: render_text(make_view(), width), lambda: render_escpos(make_view(), width),
                 lambda: render(make_view(), "html", width)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"width: {width} is not one of 32, 42, 48"
