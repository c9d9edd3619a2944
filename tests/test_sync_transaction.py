"""A sale as TSMS wants it: the mapping from KRA bands and discounts, built once at acceptance."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

from conftest import RULES, FakeClock, make_sale

from agent.intake import accept, prepare
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.queue.tsms_store import TsmsStore
from agent.sync.lane import head_office_builder
from agent.sync.transaction import ADJUSTMENT_TYPES, Terminal, tsms_transaction

TERMINAL = Terminal(hardware_id="TSMS-SIM-0001", customer_code="C-T1001")


def stored(sale: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    new = prepare(sale, RULES)
    return json.loads(new.sale_json), json.loads(new.amounts_json)


def taxes(tx: dict[str, object]) -> dict[str, Decimal]:
    return {t["tax_type"]: t["amount"] for t in tx["taxes"]}  # type: ignore[attr-defined, index]


def test_the_sample_sale() -> None:
    """Bread (B, 116.00 incl. 16 %) and greens (A, 60.00 less 5.00): gross 176, discount 5, VAT 16, net 155."""
    sale, amounts = stored(make_sale())
    tx = tsms_transaction(sale, amounts, 12, "6f1d2c3b-4a5e-4f70-8a9b-0c1d2e3f4a5b", TERMINAL)
    assert tx["receipt_no"] == "12" and tx["hardware_id"] == "TSMS-SIM-0001"
    assert tx["transaction_timestamp"] == "2026-11-21T11:05:00Z"  # 14:05 Nairobi
    assert (tx["gross_sales"], tx["net_sales"]) == (Decimal("176.00"), Decimal("155.00"))
    assert taxes(tx) == {"VAT": Decimal("16.00"), "VATABLE_SALES": Decimal("100.00"),
                         "SC_VAT_EXEMPT_SALES": Decimal("55.00"), "OTHER_TAX": Decimal("0.00")}
    adjustments = {a["adjustment_type"]: a["amount"] for a in tx["adjustments"]}
    assert list(adjustments) == list(ADJUSTMENT_TYPES)
    assert adjustments["promo_discount"] == Decimal("5.00")
    assert tx["gross_sales"] - adjustments["promo_discount"] - taxes(tx)["VAT"] == tx["net_sales"]
    assert (tx["promo_status"], tx["customer_code"]) == ("NONE", "C-T1001")


def test_bands_c_and_e_are_vatable_and_d_exempt() -> None:
    sale = make_sale()
    sale["lines"][0]["tax_band"] = "E"
    sale["lines"][1]["tax_band"] = "D"
    tx = tsms_transaction(*stored(sale), 1, "x", TERMINAL)
    assert taxes(tx)["VATABLE_SALES"] == Decimal("107.41")  # 116 / 1.08
    assert taxes(tx)["SC_VAT_EXEMPT_SALES"] == Decimal("55.00")


def test_legacy_shape() -> None:
    tx = tsms_transaction(*stored(make_sale()), 1, "x", Terminal("SN", "C", protocol="legacy"))
    assert "receipt_no" not in tx and "net_sales" not in tx
    assert tx["base_amount"] == Decimal("155.00")


def test_built_once_at_acceptance(outbox: Outbox, clock: FakeClock) -> None:
    """The transaction is stored with the sale, with its receipt number; a replay does not rebuild it."""
    ids = iter(["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"])
    rules = RULES.__class__(tax_rates=RULES.tax_rates, head_office=head_office_builder(TERMINAL, lambda: next(ids)))
    accept(outbox, make_sale(), rules, clock())
    accept(outbox, make_sale(), rules, clock())  # a replay
    conn = outbox._reader
    rows = conn.execute("SELECT tsms_id, body, receipt_no FROM sales JOIN outgoing ON sale_ref = id "
                        "AND lane = 'tsms'").fetchall()
    assert len(rows) == 1
    tsms_id, text, receipt_no = rows[0]
    assert tsms_id == "11111111-1111-4111-8111-111111111111"
    body = json.loads(text)
    assert body["transaction_id"] == tsms_id and body["receipt_no"] == str(receipt_no)
    assert '"gross_sales":176.00' in text  # exact decimals on the wire, never through float


def test_the_texts_to_send_are_kept_until_acknowledged_then_dropped(outbox: Outbox, clock: FakeClock) -> None:
    """The KRA request stays until KRA signs, the transaction until head office holds its submission;
    then both go (with the submission's body), and the sale keeps its invoice number and transaction id."""
    rules = RULES.__class__(tax_rates=RULES.tax_rates, head_office=head_office_builder(TERMINAL))
    accept(outbox, make_sale(), rules, clock())
    conn = outbox._reader

    def texts() -> dict[str, str]:
        return dict(conn.execute("SELECT lane, body FROM outgoing").fetchall())

    kra, tsms = KraStore(outbox), TsmsStore(outbox)
    work = kra.next_work()
    assert work is not None and set(texts()) == {"tsms"}
    allocated = kra.allocate(work.id, lambda n: f"request {n}", clock(), items=[])
    assert allocated == (1, "request 1") and texts()["kra"] == "request 1"
    assert kra.next_work() == replace(work, state="in_flight", invc_no=1, request="request 1")
    kra.signed(work.id, {"rcptSign": "X"}, clock(), adopted=False)
    assert set(texts()) == {"tsms"}

    (pending,) = tsms.unsynced(10)
    assert pending.transaction == texts()["tsms"]
    tsms.create_submission("u-1", '{"transactions": []}', [pending.id], {}, clock())
    assert tsms.open_submission() is not None and set(texts()) == {"tsms"}
    tsms.accepted("u-1", clock())
    assert texts() == {} and tsms.open_submission() is None
    # Head office holds it: the submission's row goes, and its journal entry says what it was.
    assert conn.execute("SELECT count(*) FROM tsms_submissions").fetchone() == (0,)
    (detail,) = conn.execute("SELECT detail FROM journal WHERE event = 'tsms_synced'").fetchone()
    assert json.loads(detail) == {"submission_uuid": "u-1", "sales": 1}
    record = outbox.by_id(work.id)
    assert record is not None and (record.kra_invc_no, record.kra_state, record.tsms_state) == (1, "signed", "synced")
    assert outbox.verify() == []
