"""The KRA signing lane against the simulator over real sockets: signing, outages, lost answers,
rejections and strict numbering. Every check of what KRA holds reads the simulator's own state."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RULES, make_sale
from kra_agent import BHF, TIN, agent_client, init_key
from starlette.testclient import TestClient

from agent.clock import system_clock
from agent.intake import accept
from agent.kra.client import KraClient
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.outbox import Outbox

pytestmark = pytest.mark.timeout(60)
BRANCH = "P052112956W/00"


@pytest.fixture(name="sim")
def _sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig()).start() as sim:
        yield sim


def kra_invoices(sim: Simulator) -> dict[int, dict[str, Any]]:
    return {int(k): v for k, v in sim.state()["branches"][BRANCH]["invoices"].items()}


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def post(client: TestClient, sale_id: str, **changes: Any) -> dict[str, Any]:
    response = client.post("/v1/sales", json=make_sale(sale_id=sale_id, **changes))
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def assert_no_double_signing(sim: Simulator) -> None:
    branch = sim.state()["branches"][BRANCH]
    assert branch["gaps"] == []
    assert branch["trd_invc_no_signed_twice"] == []
    trd = [v["trdInvcNo"] for v in branch["invoices"].values()]
    assert len(trd) == len(set(trd))


def test_the_client_says_when_its_request_is_on_the_wire(sim: Simulator) -> None:
    """`on_sent` comes once the request is written, while KRA still works on it (the lane builds the
    next sale's request in that time); never for a request that could not leave."""
    key, _ = init_key(sim)
    sim.set_faults(latency_ms=200)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/etims-api"

    async def send(url: str) -> tuple[str, list[float], float]:
        client = KraClient(url, tin=TIN, bhf_id=BHF, cmc_key=key, connect_timeout=1.0)
        sent: list[float] = []
        try:
            reply = await client.call("selectInvoiceDetails", {"invcNo": 1},
                                      on_sent=lambda: sent.append(time.perf_counter()))
        finally:
            await client.aclose()
        return reply.code, sent, time.perf_counter()

    code, sent, answered = asyncio.run(send(sim.api_url))
    assert code.isdigit() and len(sent) == 1 and answered - sent[0] >= 0.15
    code, sent, _ = asyncio.run(send(nowhere))
    assert code == "connect" and sent == []


class TestOnline:
    def test_sale_is_signed_within_the_budget(self, sim: Simulator, db_path: Path) -> None:
        """With KRA up the till's answer carries KRA's signature, SCU block and QR URL."""
        key, sdc_id = init_key(sim)
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            body = post(client, "R-1")
        outbox.close()
        assert body["status"] == "signed"
        receipt = body["receipt"]
        assert receipt["kind"] == "signed"
        kra = receipt["kra"]
        invoice = kra_invoices(sim)[1]
        assert kra["invc_no"] == 1
        assert kra["cu_invoice_no"] == f"{sdc_id}/1"
        assert kra["label"] == "NS"
        assert kra["signature"].replace("-", "") == invoice["rcptSign"]
        assert kra["internal_data"].replace("-", "") == invoice["intrlData"]
        assert len(kra["signature"].split("-")) == 4
        assert kra["qr_url"].endswith(f"Data=P052112956W00{invoice['rcptSign']}")
        assert invoice["trdInvcNo"] == "R-1"
        assert set(sim.state()["branches"][BRANCH]["items"]) >= {"KE2NTU0000001", "KE2NTKG0000002"}

    def test_replay_of_a_signed_sale_returns_the_signature(self, sim: Simulator, db_path: Path) -> None:
        """Posting a signed sale again answers 200 with the same signed receipt and signs nothing new."""
        key, sdc_id = init_key(sim)
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            first = post(client, "R-1")
            again = client.post("/v1/sales", json=make_sale(sale_id="R-1"))
        outbox.close()
        assert again.status_code == 200
        assert again.json() == first
        assert len(kra_invoices(sim)) == 1


class TestOutage:
    def test_temporary_receipts_then_in_order_drain(self, sim: Simulator, db_path: Path) -> None:
        """During an outage tills get temporary receipts; afterwards the backlog is signed in order, no gap."""
        key, sdc_id = init_key(sim)
        sim.set_faults(outage=True)
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=1.0)
        with client:
            bodies = [post(client, f"R-{i}") for i in range(1, 6)]
            assert [b["status"] for b in bodies] == ["pending"] * 5
            assert [b["receipt"]["kind"] for b in bodies] == ["temporary"] * 5
            started = time.monotonic()
            post(client, "R-6")
            assert time.monotonic() - started < 0.5, "once KRA is known down the till must not wait"
            assert client.get("/v1/status").json()["lanes"]["kra"]["state"] == "offline"
            sim.set_faults(outage=False)
            wait_for(lambda: len(kra_invoices(sim)) == 6)
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
            assert client.get("/v1/sales/R-3").json()["receipt"]["kind"] == "signed"
        invoices = kra_invoices(sim)
        assert [invoices[n]["trdInvcNo"] for n in sorted(invoices)] == [f"R-{i}" for i in range(1, 7)]
        assert [s.kra_invc_no for s in outbox.all_sales()] == [1, 2, 3, 4, 5, 6]
        assert outbox.verify() == []
        outbox.close()
        assert_no_double_signing(sim)


    def test_the_signed_answer_is_what_the_lane_then_stores(self, sim: Simulator, db_path: Path) -> None:
        """A waiting till is answered from KRA's signature in memory, before the lane's commit of it: a
        GET right after says the same, and the row and the journal hold that signature."""
        key, sdc_id = init_key(sim)
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            answers = [client.post("/v1/sales", json=make_sale(sale_id=f"R-{i}")).json() for i in range(3)]
            again = [client.get(f"/v1/sales/R-{i}").json() for i in range(3)]
        try:
            assert [a["status"] for a in answers] == ["signed"] * 3 and again == answers
            stored = [outbox.get("TILL-1", f"R-{i}") for i in range(3)]
            assert [(r.kra_state, r.kra_invc_no) for r in stored if r] == [("signed", 1), ("signed", 2), ("signed", 3)]
            invoices = kra_invoices(sim)
            assert [r.kra_signature["rcptSign"] for r in stored if r and r.kra_signature] == \
                [invoices[n]["rcptSign"] for n in (1, 2, 3)]
            assert [e.event for e in outbox.journal() if e.sale_ref == stored[0].id] == ["accepted", "sent", "signed"]
            assert outbox.verify() == []
        finally:
            outbox.close()

    def test_a_signed_answer_says_how_long_kra_took(self, sim: Simulator, db_path: Path) -> None:
        """Server-Timing on a signed answer: `kra` at least KRA's latency, within `total`, itself within
        the whole answer, and `store` before it; a temporary receipt (KRA down) carries no `kra`."""
        key, sdc_id = init_key(sim)
        sim.set_faults(latency_ms=150)
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            started = time.perf_counter()
            response = client.post("/v1/sales", json=make_sale(sale_id="R-1"))
            whole_ms = (time.perf_counter() - started) * 1000
            sim.set_faults(outage=True)
            offline = client.post("/v1/sales", json=make_sale(sale_id="R-2"))
        outbox.close()
        assert response.status_code == 201 and response.json()["status"] == "signed"
        timings = server_timing(response.headers["server-timing"])
        assert list(timings) == ["store", "kra", "total"]
        assert 150 <= timings["kra"] <= timings["total"] <= whole_ms
        assert timings["store"] + timings["kra"] <= timings["total"] + 0.2  # each rounded to 0.1 ms
        assert offline.json()["status"] == "pending"
        assert list(server_timing(offline.headers["server-timing"])) == ["store", "total"]

    def test_a_sale_answered_before_kra_signs_is_on_disk_first(self, sim: Simulator, db_path: Path) -> None:
        """A sale that waits for KRA is stored without its own fsync; when the budget runs out before
        the lane's next commit (here KRA is slow to register the sale's items), the agent syncs the
        log itself before the till gets its temporary receipt."""
        key, sdc_id = init_key(sim)
        sim.set_faults(latency_ms=1500)
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=0.3, read_timeout=5.0)
        with client:
            assert client.post("/v1/sales", json=make_sale(sale_id="R-1")).json()["status"] == "pending"
            flushed, commits = outbox._flushed, outbox.commits
            sim.set_faults(latency_ms=0)
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
        outbox.close()
        assert flushed == commits  # the last commit, the sale's own, was synced before the answer

    def test_a_backlog_drains_with_one_commit_per_sale(self, sim: Simulator, db_path: Path) -> None:
        """Each signature is stored in the transaction that numbers the sale behind it: draining N
        sales takes N commits and a few more (start-up, the items, the last signature), not 2N."""
        key, sdc_id = init_key(sim)
        box = Outbox.open(db_path)
        for i in range(20):
            accept(box, make_sale(sale_id=f"R-{i}"), RULES, system_clock())
        box.close()
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
            commits = outbox.commits
        assert 20 < commits <= 25
        events = [e.event for e in outbox.journal() if e.event in ("sent", "signed")]
        assert events == ["sent", "signed"] * 20  # each sale signed before the next is numbered
        assert [s.kra_invc_no for s in outbox.all_sales()] == list(range(1, 21))
        assert outbox.verify() == []
        outbox.close()
        assert_no_double_signing(sim)

    def test_no_wait_behind_a_backlog(self, sim: Simulator, db_path: Path) -> None:
        """While a backlog drains that takes longer than the budget, a new sale gets its temporary
        receipt at once instead of waiting out the budget for a signature that cannot come."""
        key, sdc_id = init_key(sim)
        sim.set_faults(latency_ms=200)
        budget = 3.0
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=budget)
        with client:
            assert post(client, "R-0")["status"] == "signed"  # the lane learns KRA's round trip
            sim.set_faults(outage=True)
            for i in range(1, 31):  # 30 sales x 0.2 s: twice the budget
                post(client, f"R-{i}")
            sim.set_faults(outage=False)
            wait_for(lambda: len(kra_invoices(sim)) >= 2)
            started = time.monotonic()
            late = post(client, "R-31")
            assert time.monotonic() - started < budget / 2, "the till waited behind the backlog"
            assert (late["status"], late["receipt"]["kind"]) == ("pending", "temporary")
            sim.set_faults(latency_ms=0)
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
        outbox.close()
        assert_no_double_signing(sim)


class TestUnknownOutcome:
    @pytest.mark.parametrize("numbering", ["lenient", "strict"])
    def test_lost_answer_is_reconciled_not_resent(self, db_path: Path, numbering: str) -> None:
        """KRA signs but the answer is lost: the lane asks KRA, adopts the signature, signs nothing twice.
        (Strict KRA would answer a resend with "expected value", and renumbering would sign it twice.)"""
        with Simulator(SimulatorConfig(numbering=numbering)).start() as sim:
            key, sdc_id = init_key(sim)
            sim.set_faults(hang_after_commit={"count": 1, "seconds": 3})
            client, outbox = agent_client(db_path, sim, key, sdc_id, budget=0.2, read_timeout=0.5)
            with client:
                post(client, "R-1")
                post(client, "R-2")
                wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
            invoices = kra_invoices(sim)
            assert [invoices[n]["trdInvcNo"] for n in sorted(invoices)] == ["R-1", "R-2"]
            assert [s.kra_invc_no for s in outbox.all_sales()] == [1, 2]
            sale = outbox.get("TILL-1", "R-1")
            assert sale is not None and sale.kra_signature is not None
            assert sale.kra_signature["rcptSign"] == invoices[1]["rcptSign"]
            assert [e.event for e in outbox.journal() if e.sale_ref == sale.id] == ["accepted", "sent", "signed"]
            outbox.close()
            assert sim.state()["branches"][BRANCH]["already_signed_attempts"] == 0
            assert_no_double_signing(sim)

    @pytest.mark.parametrize("code", ["994", "999", "991"])
    def test_ambiguous_codes_after_commit_are_reconciled(self, sim: Simulator, db_path: Path, code: str) -> None:
        """A duplicate or unknown-error code after KRA stored the sale ends in adoption, not a resend."""
        key, sdc_id = init_key(sim)
        sim.set_faults(result_code={"code": code, "count": 1, "paths": ["saveTrnsSalesOsdc"], "commit": True})
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=2.0)
        with client:
            assert post(client, "R-1")["status"] == "signed"
        outbox.close()
        assert len(kra_invoices(sim)) == 1
        assert_no_double_signing(sim)

    @pytest.mark.parametrize("fault", [{"http_status": {"status": 503, "count": 2}},
                                       {"malformed_json": {"count": 1}}, {"reset": {"count": 1}},
                                       {"result_code": {"code": "894", "count": 2,
                                                        "paths": ["saveTrnsSalesOsdc"]}}])
    def test_failures_before_commit_end_signed_once(self, sim: Simulator, db_path: Path,
                                                    fault: dict[str, Any]) -> None:
        """5xx, broken JSON, a reset connection or 894 before KRA stored anything: signed exactly once."""
        key, sdc_id = init_key(sim)
        sim.set_faults(**fault)
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=0.2)
        with client:
            post(client, "R-1")
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
        outbox.close()
        assert [v["trdInvcNo"] for v in kra_invoices(sim).values()] == ["R-1"]
        assert_no_double_signing(sim)


class TestRejection:
    def test_rejected_sale_is_parked_and_its_number_reused(self, sim: Simulator, db_path: Path) -> None:
        """A permanent refusal parks the sale with KRA's message; the next sale gets the released number."""
        key, sdc_id = init_key(sim)
        sim.set_faults(result_code={"code": "910", "count": 1, "paths": ["saveTrnsSalesOsdc"]})
        client, outbox = agent_client(db_path, sim, key, sdc_id)
        with client:
            first = post(client, "R-1")
            second = post(client, "R-2")
        assert first["status"] == "rejected"
        assert "910" in first["error"]
        assert second["status"] == "signed"
        assert second["receipt"]["kra"]["invc_no"] == 1
        parked = outbox.get("TILL-1", "R-1")
        assert parked is not None and parked.kra_state == "parked" and parked.kra_invc_no is None
        assert outbox.verify() == []
        outbox.close()
        assert [v["trdInvcNo"] for v in kra_invoices(sim).values()] == ["R-2"]
        assert_no_double_signing(sim)


class TestNumbering:
    def test_strict_mode_takes_the_expected_number(self, db_path: Path, tmp_path: Path) -> None:
        """In strict mode a counter that drifted (another system used numbers) follows KRA's expected value."""
        with Simulator(SimulatorConfig(numbering="strict")).start() as sim:
            key, sdc_id = init_key(sim)
            client, outbox = agent_client(tmp_path / "a.sqlite3", sim, key, sdc_id)
            with client:
                post(client, "A-1")
                post(client, "A-2")
            outbox.close()
            client, outbox = agent_client(db_path, sim, key, sdc_id)
            with client:
                body = post(client, "B-1", till_id="TILL-B")
            assert body["status"] == "signed"
            assert body["receipt"]["kra"]["invc_no"] == 3
            assert [e.event for e in outbox.journal()] == ["device_initialised", "accepted", "sent", "renumbered",
                                                           "signed"]
            outbox.close()
            assert sorted(kra_invoices(sim)) == [1, 2, 3]
            assert_no_double_signing(sim)

    def test_lenient_mode_never_adopts_another_documents_signature(self, sim: Simulator, db_path: Path,
                                                                   tmp_path: Path) -> None:
        """A number already used by another document (994) is not adopted: the sale is parked for a person."""
        key, sdc_id = init_key(sim)
        client, outbox = agent_client(tmp_path / "a.sqlite3", sim, key, sdc_id)
        with client:
            post(client, "A-1")
        outbox.close()
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=2.0)
        with client:
            body = post(client, "B-1", till_id="TILL-B")
        outbox.close()
        assert body["status"] == "rejected"
        assert "another document" in body["error"]
        assert [v["trdInvcNo"] for v in kra_invoices(sim).values()] == ["A-1"]


def server_timing(header: str) -> dict[str, float]:
    """`store;dur=1.2, kra;dur=150.3` as {"store": 1.2, "kra": 150.3}."""
    metrics = (part.strip().partition(";dur=") for part in header.split(","))
    return {name: float(value) for name, _, value in metrics}
