"""Credit notes: the till's request checked against its original, then signed through the same lane.

The API tests run against an agent without a KRA lane (sales stay pending); the signing tests run
the lane against the KRA simulator over real sockets and check what KRA holds.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import make_sale
from kra_agent import agent_client, init_key
from starlette.testclient import TestClient
from test_kra_lane import BRANCH, kra_invoices, wait_for

from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.outbox import Outbox


def credit(client: TestClient, sale_id: str = "R-0001", **body: Any) -> Any:
    body.setdefault("credit_note_id", "CN-1")
    body.setdefault("reason", "06")
    return client.post(f"/v1/sales/{sale_id}/credit-notes", json=body)


class TestRequest:
    """Validation and idempotency at the API (no KRA lane)."""

    @pytest.fixture(autouse=True)
    def _sale(self, client: TestClient) -> None:
        assert client.post("/v1/sales", json=make_sale()).status_code == 201

    def test_whole_sale_by_default(self, client: TestClient) -> None:
        """Without lines, every line is credited at its full quantity, priced as sold."""
        response = credit(client)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["kind"] == "credit_note"
        assert body["credits"] == {"sale_id": "R-0001", "till_id": "TILL-1", "receipt_no": 1, "reason": "06"}
        assert body["receipt"]["totals"] == {"taxable": "155.00", "tax": "16.00", "total": "171.00"}
        assert body["receipt_no"] == 2

    def test_partial_credit_prorates_the_discount(self, client: TestClient) -> None:
        """Crediting 0.5 of the 1.5 kg line with its 5.00 discount credits 1.67 of the discount."""
        response = credit(client, lines=[{"line": 2, "qty": "0.5"}])
        assert response.status_code == 201, response.text
        (line,) = response.json()["receipt"]["lines"]
        assert (line["qty"], line["discount"], line["total"]) == ("0.50", "1.67", "18.33")

    def test_never_more_than_was_sold(self, client: TestClient) -> None:
        """Two credit notes may not credit more of an item than the sale had."""
        assert credit(client, lines=[{"line": 1, "qty": "1"}]).status_code == 201
        over = credit(client, credit_note_id="CN-2", lines=[{"line": 1, "qty": "2"}])
        assert over.status_code == 422
        assert over.json()["error"]["code"] == "over_credit"
        assert over.json()["error"]["field"] == "lines[0].qty"
        rest = credit(client, credit_note_id="CN-3")  # the whole remainder: 1 bread, all the greens
        assert rest.status_code == 201
        assert [line["qty"] for line in rest.json()["receipt"]["lines"]] == ["1.00", "1.50"]
        nothing = credit(client, credit_note_id="CN-4")
        assert nothing.json()["error"]["code"] == "nothing_left"

    def test_repeat_is_a_replay_and_changed_repeat_a_conflict(self, client: TestClient) -> None:
        """The same credit note id with the same body answers 200; with another body 409."""
        first = credit(client, lines=[{"line": 1, "qty": "1"}])
        again = credit(client, lines=[{"line": 1, "qty": "1"}])
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json()
        changed = credit(client, lines=[{"line": 1, "qty": "2"}])
        assert changed.status_code == 409

    @pytest.mark.parametrize(("body", "field", "code"), [
        ({"reason": "99"}, "reason", "bad_reason"),
        ({"lines": []}, "lines", "wrong_type"),
        ({"lines": [{"line": 3, "qty": "1"}]}, "lines[0].line", "bad_line"),
        ({"lines": [{"line": 1, "qty": "-1"}]}, "lines[0].qty", "bad_quantity"),
        ({"lines": [{"line": 1, "qty": "1"}, {"line": 1, "qty": "1"}]}, "lines[1].line", "bad_line"),
        ({"issued_at": "2026-11-20T10:00:00+03:00"}, "issued_at", "before_original"),
        ({"refund": True}, "refund", "unknown_field"),
    ])
    def test_bad_requests_name_the_field(self, client: TestClient, body: dict[str, Any], field: str,
                                         code: str) -> None:
        response = credit(client, **body)
        assert response.status_code == 422, response.text
        assert (response.json()["error"]["field"], response.json()["error"]["code"]) == (field, code)

    def test_unknown_sale_and_credit_of_a_credit_note(self, client: TestClient) -> None:
        assert credit(client, "NOPE").status_code == 404
        assert credit(client).status_code == 201
        refused = credit(client, "CN-1", credit_note_id="CN-9")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "not_a_sale"


class TestSigning:
    """Credit notes through the KRA lane against the simulator."""

    def test_credit_note_is_signed_with_the_original_number(self, db_path: Path) -> None:
        """KRA gets rcptTyCd R with orgInvcNo = the original's invcNo; the receipt names the original."""
        with Simulator(SimulatorConfig()).start() as sim:
            key, sdc_id = init_key(sim)
            client, outbox = agent_client(db_path, sim, key, sdc_id)
            with client:
                sale = client.post("/v1/sales", json=make_sale()).json()
                note = credit(client, lines=[{"line": 1, "qty": "1"}]).json()
            outbox.close()
            assert (sale["status"], note["status"]) == ("signed", "signed")
            kra = note["receipt"]["kra"]
            assert kra["label"] == "NC"
            assert kra["invc_no"] == 2
            assert kra["original_cu_invoice_no"] == f"{sdc_id}/1"
            held = kra_invoices(sim)[2]
            assert (held["rcptTyCd"], held["orgInvcNo"], held["trdInvcNo"]) == ("R", 1, "CN-1")
            assert Decimal(str(held["totAmt"])) == Decimal("58.00")  # one loaf, VAT included

    def test_credit_note_of_a_refused_sale_is_parked(self, db_path: Path) -> None:
        """When KRA refuses the original after the credit note was taken, the note is parked too."""
        with Simulator(SimulatorConfig()).start() as sim:
            key, sdc_id = init_key(sim)
            sim.set_faults(outage=True)
            client, outbox = agent_client(db_path, sim, key, sdc_id, budget=0.5)
            with client:
                client.post("/v1/sales", json=make_sale())
                assert credit(client).status_code == 201
                sim.set_faults(outage=False, result_code={"code": "910", "count": 1, "paths": ["saveTrnsSalesOsdc"]})
                wait_for(lambda: all(s.kra_state == "parked" for s in outbox.all_sales()))
                note = client.get("/v1/sales/CN-1").json()
            outbox.close()
            assert note["status"] == "rejected"
            assert "refused by KRA" in note["error"]
            assert sim.state()["branches"][BRANCH]["invoices"] == {}


def test_credit_notes_are_journalled(outbox: Outbox, client: TestClient) -> None:
    """The journal records a credit note's original and reason, and verify accepts the chain."""
    client.post("/v1/sales", json=make_sale())
    credit(client)
    entry = outbox.journal()[-1]
    assert entry.event == "accepted"
    detail = json.loads(entry.detail)
    assert (detail["kind"], detail["original_id"], detail["refund_reason"]) == ("credit_note", 1, "06")
    assert outbox.verify() == []
