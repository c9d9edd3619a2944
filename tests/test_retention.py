"""Retention on real SQLite files: what is pruned and what is kept, the journal entry, verify, tombstones,
audit bundles across a pruned period, the config; and a real agent process pruning at start.

Sales are taken with the intake, credit notes through the API, and moved through KRA and head office
with the lanes' own store methods, as the audit-bundle tests do; time is a FakeClock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import Agents
from conftest import RECEIPT_SIGNER, RULES, FakeClock, api_client, make_sale
from starlette.testclient import TestClient
from typer.testing import CliRunner, Result

from agent.api import create_app
from agent.app import receipt_signer
from agent.cli import app
from agent.config import load_config
from agent.desk import ApiContext
from agent.errors import StorageError
from agent.intake import accept
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox, invoice_number_gaps
from agent.queue.pruning import pruned_in, runs
from agent.queue.retention import KEPT_TABLES, SALE_TABLES, Retention, summary
from agent.queue.tsms_store import TsmsStore

DAY = 86_400
KEEP = 30
runner = CliRunner()


def take(box: Outbox, clock: FakeClock, sale_id: str) -> int:
    return accept(box, make_sale(sale_id=sale_id), RULES, clock()).record.id


def sign(box: Outbox, clock: FakeClock, ref: int) -> int:
    """The lane numbers the sale and KRA signs it."""
    allocated = KraStore(box).allocate(ref, lambda n: json.dumps({"invcNo": n}), clock(), items=[])
    assert allocated is not None
    KraStore(box).signed(ref, {"rcptSign": f"SIGN{ref:012d}", "intrlData": "DATA", "sdcDateTime": "20261121140501"},
                         clock(), adopted=False)
    return allocated[0]


def sync(box: Outbox, clock: FakeClock, *refs: int, accepted: bool = True) -> str:
    """A head-office submission of these sales, accepted by the server (or still open)."""
    name = str(uuid.uuid4())
    store = TsmsStore(box)
    store.create_submission(name, "{}", list(refs), {}, clock())
    if accepted:
        store.accepted(name, clock())
    return name


def settle(box: Outbox, clock: FakeClock, ref: int) -> None:
    """Signed by KRA and held by head office: what retention waits for."""
    sign(box, clock, ref)
    sync(box, clock, ref)


def credit(client: TestClient, box: Outbox, sale_id: str, note_id: str) -> int:
    answer = client.post(f"/v1/sales/{sale_id}/credit-notes", json={"credit_note_id": note_id, "reason": "06"})
    assert answer.status_code == 201, answer.text
    record = box.get("TILL-1", note_id)
    assert record is not None
    return record.id


def settle_note(box: Outbox, clock: FakeClock, ref: int) -> None:
    sign(box, clock, ref)
    TsmsStore(box).void_settled(ref, "synced", {"voided": "t", "status": 200}, clock())


def ids(box: Outbox) -> list[str]:
    return [s.sale_id for s in box.all_sales()]


def pruned_entries(box: Outbox) -> list[dict[str, Any]]:
    return [json.loads(e.detail) for e in box.journal() if e.event == "pruned"]


def raw(box: Outbox) -> sqlite3.Connection:
    """The file as someone with it would open it, the append-only triggers dropped."""
    conn = sqlite3.connect(box.path, isolation_level=None)
    for trigger in ("journal_no_delete", "pruned_sales_no_delete"):
        conn.execute(f"DROP TRIGGER {trigger}")
    return conn


@pytest.fixture(name="shop")
def _shop(outbox: Outbox, clock: FakeClock) -> Iterator[dict[str, int]]:
    """Sales of every kind, 40 days old unless said otherwise; the clock then stands at day 40.

    Due: OLD-1, OLD-2 (a receipt printed, one submission each), OLD-4 and its settled credit note CN-4.
    Kept: B (KRA signed, head office not yet), Q (queued at KRA), P (parked, head office has it),
    R (head office rejected it), NOTE-KEPT and its credit note CN-K (waiting for KRA), CN-NEW's
    original NOTE-NEW (the note is recent), and NEW (signed and synced, but 5 days old).
    """
    refs: dict[str, int] = {}
    with api_client(outbox, clock) as client:
        for name in ("OLD-1", "B", "OLD-2", "Q", "P", "R", "OLD-4", "NOTE-KEPT", "NOTE-NEW"):
            refs[name] = take(outbox, clock, name)
            clock.advance(60)
        for name in ("OLD-1", "OLD-2", "OLD-4", "NOTE-KEPT", "NOTE-NEW"):
            settle(outbox, clock, refs[name])
        sign(outbox, clock, refs["B"])  # between OLD-1 and OLD-2: the pruned invoice numbers have a hole
        sync(outbox, clock, refs["B"], accepted=False)
        sync(outbox, clock, refs["P"])
        KraStore(outbox).park(refs["P"], "910", "bad item", clock(), release=False)
        sign(outbox, clock, refs["R"])
        TsmsStore(outbox).rejected(sync(outbox, clock, refs["R"], accepted=False), 422, "bad", clock())
        outbox.count_print(refs["OLD-1"], "signed", clock())
        refs["CN-4"] = credit(client, outbox, "OLD-4", "CN-4")
        settle_note(outbox, clock, refs["CN-4"])
        refs["CN-K"] = credit(client, outbox, "NOTE-KEPT", "CN-K")
        clock.advance(35 * DAY)
        refs["CN-NEW"] = credit(client, outbox, "NOTE-NEW", "CN-NEW")
        settle_note(outbox, clock, refs["CN-NEW"])
        refs["NEW"] = take(outbox, clock, "NEW")
        settle(outbox, clock, refs["NEW"])
        clock.advance(5 * DAY)
    yield refs


class TestWhatIsPruned:
    def test_prunes_exactly_the_settled_old_sales(self, outbox: Outbox, clock: FakeClock,
                                                  shop: dict[str, int]) -> None:
        """Only signed, synced, old sales go, a sale with its credit notes only when all are settled; what
        belonged to them alone goes too; the journal records it and verify passes."""
        before = {s.sale_id: s for s in outbox.all_sales()}
        report = Retention(outbox, clock, KEEP).prune()
        assert report.pruned == 4 and report.credit_notes == 1 and report.batches == 1
        assert ids(outbox) == ["B", "Q", "P", "R", "NOTE-KEPT", "NOTE-NEW", "CN-K", "CN-NEW", "NEW"]
        [entry] = pruned_entries(outbox)
        gone = [before[name] for name in ("OLD-1", "OLD-2", "OLD-4", "CN-4")]
        assert entry["count"] == 4 and entry["credit_notes"] == 1
        assert entry["ids"] == runs(s.id for s in gone)
        assert entry["receipt_nos"] == runs(s.receipt_no for s in gone)
        invoices = sorted(s.kra_invc_no for s in gone if s.kra_invc_no is not None)
        assert entry["invc_nos"] == runs(invoices) and len(entry["invc_nos"]) > 1  # kept sales' numbers between
        assert entry["cutoff"] == (clock() - timedelta(days=KEEP)).isoformat(timespec="microseconds")
        assert entry["keep_days"] == KEEP and entry["receipt_prints"] == 1
        assert entry["rows_sha256_of"] == ["id", "till_id", "sale_id", "content_hash", "receipt_no",
                                           "kra_invc_no", "rcptSign"]
        assert len(entry["rows_sha256"]) == 64
        with outbox._read() as conn:
            assert conn.execute("SELECT count(*) FROM receipt_prints").fetchone()[0] == 0
            states = dict(conn.execute("SELECT state, count(*) FROM tsms_submissions GROUP BY state").fetchall())
            tombstones = {r[0] for r in conn.execute("SELECT sale_id FROM pruned_sales")}
        # Accepted submissions are not kept (their journal entries are); the open and the refused stay.
        assert states == {"pending": 1, "rejected": 1}
        assert tombstones == {"OLD-1", "OLD-2", "OLD-4", "CN-4"}
        assert summary(outbox) == {"pruned_sales": 4, "last_pruned_at": clock().isoformat(timespec="microseconds")}
        assert outbox.stats().sales == 9  # the per-state counts follow the deletes
        assert outbox.verify() == []

    def test_a_second_run_prunes_nothing_and_logs_nothing(self, outbox: Outbox, clock: FakeClock,
                                                          shop: dict[str, int],
                                                          caplog: pytest.LogCaptureFixture) -> None:
        retention = Retention(outbox, clock, KEEP)
        with caplog.at_level(logging.INFO, logger="agent.retention"):
            assert retention.prune().pruned == 4
            clock.advance(60)
            assert retention.prune().pruned == 0
        lines = [r for r in caplog.records if r.name == "agent.retention"]
        assert [r.getMessage() for r in lines] == ["retention_pruned"]  # none for the run with nothing due
        assert lines[0].fields["sales"] == 4
        assert len(pruned_entries(outbox)) == 1
        assert retention.last_run_pruned == 0 and retention.last_run_at == clock()
        assert outbox.verify() == []

    def test_keep_days_0_keeps_everything(self, outbox: Outbox, clock: FakeClock, shop: dict[str, int]) -> None:
        clock.advance(3650 * DAY)
        retention = Retention(outbox, clock, 0)
        assert not retention.enabled
        assert retention.prune().pruned == 0
        assert len(ids(outbox)) == 13 and pruned_entries(outbox) == []

    def test_nothing_is_due_before_keep_days(self, outbox: Outbox, clock: FakeClock, shop: dict[str, int]) -> None:
        assert Retention(outbox, clock, 41).prune().pruned == 0
        # 40 days: OLD-1 and OLD-2 are older; CN-4 was accepted exactly 40 days ago, so OLD-4 waits for its note.
        assert Retention(outbox, clock, 40).prune().pruned == 2
        assert "OLD-4" in ids(outbox) and "CN-4" in ids(outbox)
        clock.advance(1)
        assert Retention(outbox, clock, 40).prune().pruned == 2
        assert outbox.verify() == []

    def test_batches_are_one_entry_each_and_yield_to_the_loop(self, outbox: Outbox, clock: FakeClock) -> None:
        """A run of ten due sales in batches of three: four transactions, four entries, other tasks run
        between them, and verify passes."""
        for n in range(10):
            settle(outbox, clock, take(outbox, clock, f"S-{n}"))
        clock.advance(31 * DAY)
        retention = Retention(outbox, clock, KEEP, batch=3)
        ticks = 0

        async def main() -> int:
            async def other() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(other())
            report = await retention.run()
            task.cancel()
            return report.pruned

        assert asyncio.run(main()) == 10
        assert ticks >= 3
        assert [e["count"] for e in pruned_entries(outbox)] == [3, 3, 3, 1]
        assert ids(outbox) == [] and outbox.verify() == []

    def test_every_per_sale_table_is_handled(self, outbox: Outbox) -> None:
        """A table keyed by sale_ref, or with a foreign key to sales, is pruned with its sale or kept on
        purpose: add a new one to SALE_TABLES or KEPT_TABLES in agent/queue/retention.py."""
        with outbox._read() as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                 "AND name NOT LIKE 'sqlite_%' AND name != 'sales'")]
            per_sale = {t for t in tables
                        if any(c[1] == "sale_ref" for c in conn.execute(f"PRAGMA table_info({t})"))
                        or any(fk[2] == "sales" for fk in conn.execute(f"PRAGMA foreign_key_list({t})"))}
        assert per_sale == set(SALE_TABLES) | set(KEPT_TABLES)


class TestVerify:
    def test_a_sale_deleted_without_a_pruned_entry_is_caught(self, outbox: Outbox, clock: FakeClock,
                                                              shop: dict[str, int]) -> None:
        Retention(outbox, clock, KEEP).prune()
        conn = raw(outbox)
        conn.execute("DELETE FROM sales WHERE id = ?", (shop["B"],))
        conn.close()
        problems = outbox.verify()
        assert any(f"journal entry for sale {shop['B']} refers to a sale that is not stored, and no 'pruned' "
                   "entry names it" in p for p in problems), problems
        assert "local receipt numbers are not a gap-free sequence from 1" in problems
        assert any(p.startswith("KRA invoice numbers with no sale here") for p in problems)

    def test_a_delete_passed_off_with_a_tombstone_is_caught(self, outbox: Outbox, clock: FakeClock,
                                                             shop: dict[str, int]) -> None:
        conn = raw(outbox)
        conn.execute("INSERT INTO pruned_sales VALUES ('TILL-1', 'B', ?, 2, 6)", (shop["B"],))
        conn.execute("DELETE FROM sales WHERE id = ?", (shop["B"],))
        conn.close()
        problems = outbox.verify()
        assert any("with no 'pruned' journal entry" in p for p in problems), problems

    def test_a_lost_tombstone_is_caught(self, outbox: Outbox, clock: FakeClock, shop: dict[str, int]) -> None:
        Retention(outbox, clock, KEEP).prune()
        conn = raw(outbox)
        conn.execute("DELETE FROM pruned_sales WHERE sale_id = 'OLD-2'")
        conn.close()
        assert any("have no tombstone" in p for p in outbox.verify())

    def test_a_pruned_entry_for_an_unsigned_sale_is_caught(self, outbox: Outbox, clock: FakeClock,
                                                           shop: dict[str, int]) -> None:
        """A `pruned` entry appended by hand, with a tombstone, to pass off the removal of a sale KRA never
        signed (Q): the chain holds, but verify sees no signature behind it."""
        q = next(s for s in outbox.all_sales() if s.sale_id == "Q")
        conn = raw(outbox)
        conn.execute("INSERT INTO pruned_sales VALUES ('TILL-1', 'Q', ?, ?, NULL)", (q.id, q.receipt_no))
        conn.execute("DELETE FROM sales WHERE id = ?", (q.id,))
        conn.close()
        with outbox._write() as tx:
            outbox._journal(tx, "2026-12-31T00:00:00.000000+00:00", "pruned", None,
                            {"count": 1, "ids": [[q.id, q.id]], "receipt_nos": [[q.receipt_no, q.receipt_no]],
                             "invc_nos": []})
        problems = outbox.verify()
        assert any(f"sale(s) {q.id} were pruned with no KRA signature" in p for p in problems), problems

    def test_the_number_checks_count_pruned_sales(self, outbox: Outbox, clock: FakeClock) -> None:
        """Invoice and receipt numbers held by pruned sales are no gaps; without the pruned entries they
        would be."""
        refs = [take(outbox, clock, f"S-{n}") for n in range(6)]
        for ref in refs:
            settle(outbox, clock, ref)
        clock.advance(31 * DAY)
        take(outbox, clock, "LATE")
        settle(outbox, clock, outbox.all_sales()[-1].id)
        assert Retention(outbox, clock, KEEP).prune().pruned == 6
        kept, journal = outbox.all_sales(), outbox.journal()
        assert [s.kra_invc_no for s in kept] == [7] and [s.receipt_no for s in kept] == [7]
        assert invoice_number_gaps(kept, journal, pruned_in(journal).invc_nos()) == []
        assert invoice_number_gaps(kept, journal) != []
        assert outbox.verify() == []

    def test_verify_command_passes_after_pruning(self, tmp_path: Path, clock: FakeClock) -> None:
        config = tmp_path / "agent.toml"
        config.write_text('data_dir = "data"\n')
        box = Outbox.open(tmp_path / "data" / "outbox.sqlite3")
        try:
            for n in range(3):
                settle(box, clock, take(box, clock, f"S-{n}"))
            clock.advance(31 * DAY)
            Retention(box, clock, KEEP).prune()
        finally:
            box.close()
        result = runner.invoke(app, ["verify", "--json", "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["ok"] is True
        status = runner.invoke(app, ["status", "--json", "--config", str(config)], catch_exceptions=False)
        assert json.loads(status.output)["retention"]["pruned_sales"] == 3


class TestRepost:
    def test_a_pruned_sale_posted_again_is_refused(self, outbox: Outbox, clock: FakeClock,
                                                  shop: dict[str, int]) -> None:
        """409 pruned, nothing stored, nothing to sign; a credit note for it finds no sale."""
        Retention(outbox, clock, KEEP).prune()
        with api_client(outbox, clock) as client:
            answer = client.post("/v1/sales", json=make_sale(sale_id="OLD-1"))
            assert answer.status_code == 409, answer.text
            error = answer.json()["error"]
            assert error["code"] == "pruned" and error["field"] == "sale_id"
            assert "'OLD-1' of till 'TILL-1' was taken here before" in error["message"]
            assert "not stored or signed again" in error["message"] and "new sale_id" in error["message"]
            note = client.post("/v1/sales/OLD-4/credit-notes", json={"credit_note_id": "CN-9", "reason": "06"})
            assert note.status_code == 404
            assert client.post("/v1/sales", json=make_sale(sale_id="OLD-1", till_id="TILL-2")).status_code == 201
        assert outbox.get("TILL-1", "OLD-1") is None  # not stored, so never sent to KRA again
        assert outbox.verify() == []

    def test_the_database_refuses_it_whatever_the_path(self, outbox: Outbox, clock: FakeClock,
                                                      shop: dict[str, int]) -> None:
        Retention(outbox, clock, KEEP).prune()
        with pytest.raises(StorageError, match="pruned here; it is never stored again"):
            accept(outbox, make_sale(sale_id="CN-4"), RULES, clock())
        assert outbox.verify() == []


class TestStatus:
    def test_status_shows_retention(self, outbox: Outbox, clock: FakeClock, shop: dict[str, int]) -> None:
        retention = Retention(outbox, clock, KEEP)
        retention.prune()
        ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock, max_body_bytes=1_048_576, started_at=clock(),
                         receipt_signer=RECEIPT_SIGNER, retention=retention)
        with TestClient(create_app(ctx)) as client:
            body = client.get("/v1/status").json()["retention"]
        assert body == {"keep_days": KEEP, "enabled": True, "every_s": 3600.0, "last_run_at": clock().isoformat(),
                        "last_run_pruned": 4, "pruned_sales": 4,
                        "last_pruned_at": clock().isoformat(timespec="microseconds")}


# --- audit bundles ------------------------------------------------------------------------------

@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('data_dir = "data"\n[secrets]\nbackend = "file"\n')
    receipt_signer(load_config(path))  # the agent's key, as its first start makes it
    return path


def cli(config: Path, *args: str, code: int = 0) -> Result:
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == code, result.output
    return result


class TestBundle:
    def test_a_bundle_across_a_pruned_period_verifies(self, config: Path, tmp_path: Path) -> None:
        """Exported after retention pruned part of the period: the manifest counts the pruned sales,
        their `pruned` entries come along, and verify --bundle calls nothing missing; a sale deleted
        without an entry is still caught."""
        clock = FakeClock()
        box = Outbox.open(tmp_path / "data" / "outbox.sqlite3")
        try:
            KraStore(box).save_device(tin="P052112956W", bhf_id="00", serial="SIM-0001", sdc_id="KRACU0100000001",
                                      mrc_no=None, info={"taxprNm": "Wanjiku Stores"}, now=clock())
            refs = [take(box, clock, f"S-{n}") for n in range(5)]
            for ref in refs[:3]:  # S-0..S-2 due; S-3 waits for head office; S-4 waits for KRA
                settle(box, clock, ref)
            sign(box, clock, refs[3])
            clock.advance(31 * DAY)
            assert Retention(box, clock, KEEP).prune().pruned == 3
        finally:
            box.close()
        out = tmp_path / "audit.zip"
        exported = json.loads(cli(config, "export", "--from", "2026-11-21", "--to", "2026-11-22", "--out", str(out),
                                  "--json").output)
        assert exported["sales"] == 2 and exported["pruned_sales"] == 3
        with zipfile.ZipFile(out) as zf:
            manifest = json.loads(zf.read("manifest.json"))
            pruned = [json.loads(line) for line in zf.read("pruned.jsonl").splitlines()]
        assert manifest["pruned"] == {"sales": 3, "entries": [pruned[0]["seq"]]}
        assert [e["event"] for e in pruned] == ["pruned"]
        checked = cli(config, "verify", "--bundle", str(out))
        assert "3 sales of the period pruned" in checked.output and "bundle OK" in checked.output

        box = Outbox.open(tmp_path / "data" / "outbox.sqlite3")
        try:
            conn = raw(box)
            conn.execute("DELETE FROM sales WHERE sale_id = 'S-4'")
            conn.close()
        finally:
            box.close()
        cli(config, "export", "--from", "2026-11-21", "--to", "2026-11-22", "--out", str(out), "--force")
        failed = cli(config, "verify", "--bundle", str(out), code=1)
        problems = [line for line in failed.output.splitlines() if line.startswith("PROBLEM")]
        assert len(problems) == 1 and f"records sale {refs[4]} accepted in the period" in problems[0], problems


# --- config -------------------------------------------------------------------------------------

def test_keep_days_defaults_to_30_and_0_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    assert load_config(path, env={}).retention.keep_days == 30
    path.write_text("[retention]\nkeep_days = 0\n")
    assert load_config(path, env={}).retention.keep_days == 0


# --- a real agent ---------------------------------------------------------------------------------

def test_a_running_agent_prunes_at_start_unless_keep_days_is_0(tmp_path: Path) -> None:
    """Old settled sales in the outbox: with keep_days 0 the agent leaves them; with the default it prunes
    them right after start, logs one line, shows it in status, and refuses the sale posted again."""
    agents = Agents(tmp_path)
    clock = FakeClock(datetime.now(UTC) - timedelta(days=40))
    box = Outbox.open(agents.outbox)
    try:
        for n in range(3):
            settle(box, clock, take(box, clock, f"S-{n}"))
    finally:
        box.close()
    base = agents.config.read_text()
    with agents:
        agents.config.write_text(base + "[retention]\nkeep_days = 0\n")
        agent = agents.start()
        status = httpx.get(f"{agent.url}/v1/status", timeout=10.0).json()["retention"]
        assert status["enabled"] is False and status["pruned_sales"] == 0
        assert agent.terminate() == 0
        assert "retention_pruned" not in agent.log()

        agents.config.write_text(base)
        agent = agents.start()
        deadline = time.monotonic() + 20
        while "event=retention_pruned" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        line = next(x for x in agent.log().splitlines() if "event=retention_pruned" in x)
        assert "sales=3" in line and "keep_days=30" in line
        answer = httpx.post(f"{agent.url}/v1/sales", json=make_sale(sale_id="S-1"), timeout=10.0)
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "pruned"
        status = httpx.get(f"{agent.url}/v1/status", timeout=10.0).json()["retention"]
        assert status["enabled"] is True and status["pruned_sales"] == 3 and status["last_run_pruned"] == 3
        assert agent.terminate() == 0
    box = Outbox.open(agents.outbox, readonly=True)
    try:
        assert box.verify() == []
    finally:
        box.close()
