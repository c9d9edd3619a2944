"""GET /v1/sales/{id}/receipt: every kind of receipt in every format, the first print original,
every later one marked COPY. Signed receipts come from the KRA simulator over real sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import RULES, make_sale
from kra_agent import agent_client, init_key
from starlette.testclient import TestClient

from agent.clock import system_clock
from agent.intake import accept
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.outbox import Outbox
from agent.receipt_format import render_text
from agent.receipts import REHEARSAL_NOTICES, Seller, sale_view


class TestTemporary:
    def test_text_receipt_then_copies(self, client: TestClient) -> None:
        """The first print is the original temporary receipt; every later one says COPY."""
        client.post("/v1/sales", json=make_sale(sale_id="R-1"))
        first = client.get("/v1/sales/R-1/receipt")
        assert first.status_code == 200
        assert first.headers["content-type"] == "text/plain; charset=utf-8"
        text = first.text
        assert "TEMPORARY RECEIPT" in text and "NOT A KRA TAX INVOICE" in text
        assert "T-000001" in text and "COPY" not in text
        chain = client.get("/v1/sales/R-1").json()["receipt"]["chain"]
        assert chain["key_id"] in text
        assert all(len(line) <= 42 for line in text.splitlines())
        again = client.get("/v1/sales/R-1/receipt", params={"width": "32"}).text
        assert "*** COPY ***" in again
        assert all(len(line) <= 32 for line in again.splitlines())

    def test_copy_can_be_forced_either_way(self, client: TestClient) -> None:
        client.post("/v1/sales", json=make_sale(sale_id="R-1"))
        assert "COPY" in client.get("/v1/sales/R-1/receipt", params={"copy": "true"}).text
        assert "COPY" not in client.get("/v1/sales/R-1/receipt", params={"copy": "false"}).text

    def test_escpos_temporary_has_no_qr(self, client: TestClient) -> None:
        client.post("/v1/sales", json=make_sale(sale_id="R-1"))
        body = client.get("/v1/sales/R-1/receipt", params={"format": "escpos"}).content
        assert body.startswith(b"\x1b@") and b"TEMPORARY RECEIPT" in body
        assert b"\x1d(k" not in body  # no QR code: KRA has not signed it yet

    @pytest.mark.parametrize(("params", "field"), [({"format": "pdf"}, "format"), ({"width": "40"}, "width"),
                                                   ({"copy": "maybe"}, "copy")])
    def test_bad_parameters(self, client: TestClient, params: dict[str, str], field: str) -> None:
        client.post("/v1/sales", json=make_sale(sale_id="R-1"))
        response = client.get("/v1/sales/R-1/receipt", params=params)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == field

    def test_unknown_sale(self, client: TestClient) -> None:
        assert client.get("/v1/sales/NOPE/receipt").status_code == 404


def test_signed_receipts_in_every_format(db_path: Path) -> None:
    """A signed sale and its credit note: SCU block, labels NS/NC, the original CU number and the QR."""
    with Simulator(SimulatorConfig()).start() as sim:
        key, sdc_id = init_key(sim)
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            sale = client.post("/v1/sales", json=make_sale(sale_id="R-1")).json()
            client.post("/v1/sales/R-1/credit-notes", json={"credit_note_id": "CN-1", "reason": "06"})
            text = client.get("/v1/sales/R-1/receipt", params={"width": "48"}).text
            note = client.get("/v1/sales/CN-1/receipt").text
            escpos = client.get("/v1/sales/R-1/receipt", params={"format": "escpos"}).content
            page = client.get("/v1/sales/R-1/receipt", params={"format": "html"})
        outbox.close()
    kra = sale["receipt"]["kra"]
    assert "TAX INVOICE" in text and "COPY" not in text
    # Signed by KRA's sandbox: said under the title, in every format.
    assert sale["receipt"]["notice"] == REHEARSAL_NOTICES["sandbox"]
    assert "NOT A TAX INVOICE" in text and "NOT A TAX INVOICE" in note
    assert b"NOT A TAX INVOICE" in escpos and "NOT A TAX INVOICE" in page.text
    for expected in ("P052112956W", f"SCU ID: {sdc_id}", f"{sdc_id}/1", "NS", kra["signature"], "Items: 2",
                     "MOBILE MONEY"):
        assert expected in text, expected
    for band in "ABCDE":
        assert any(line.startswith(band) for line in text.splitlines()), band
    assert "CREDIT NOTE" in note and "NC" in note and f"{sdc_id}/1" in note and f"{sdc_id}/2" in note
    url = kra["qr_url"].encode()
    assert b"\x1d(k" + (len(url) + 3).to_bytes(2, "little") + b"1P0" + url in escpos
    assert b"*** COPY ***" in escpos  # the second print of the signed receipt
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert kra["qr_url"].replace("&", "&amp;") in page.text
    assert page.text.count("<svg") == 1  # the QR code, drawn by segno


@pytest.mark.parametrize("environment", ["simulator", "sandbox", "production"])
def test_only_kra_production_signs_a_tax_invoice(outbox: Outbox, environment: str) -> None:
    """A receipt signed by the built-in simulator (the installed starter config) or KRA's sandbox says
    in bold under its title that it is no tax invoice; one signed by KRA's production system does not."""
    stored = accept(outbox, make_sale(sale_id="R-1"), RULES, system_clock()).record
    signed = dataclasses.replace(stored, kra_state="signed", kra_invc_no=1,
                                 kra_signature={"rcptSign": "LVJ52Q83D1ADLZMO", "curRcptNo": 1, "totRcptNo": 1})
    view = sale_view(signed, Seller(tin="P052112956W", bhf_id="00", sdc_id="KRACU0287624417",
                                    environment=environment))
    text = render_text(view, 42, False)
    if environment == "production":
        assert "notice" not in view["receipt"] and "NOT A TAX INVOICE" not in text
    else:
        assert view["receipt"]["notice"] == REHEARSAL_NOTICES[environment]
        lines = text.splitlines()
        title = next(i for i, line in enumerate(lines) if line.strip() == "TAX INVOICE")
        assert lines[title + 1].strip().startswith("NOT A TAX INVOICE")
