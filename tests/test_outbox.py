"""The outbox on real SQLite files: durability across reopen, replay, conflict, the journal."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
from conftest import RULES, FakeClock, make_sale
from sqlite_utils import Database

from agent.errors import SaleConflict, StorageError
from agent.intake import accept, prepare
from agent.queue import recovery
from agent.queue.journal import GENESIS, entry_hash
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox, timestamp
from agent.queue.schema import kra_pending, migrations
from agent.queue.tsms_store import TsmsStore
from agent.signing import PENDING_STATES, Signed


def store(outbox: Outbox, clock: FakeClock, n: int, till: str = "TILL-1") -> None:
    for i in range(n):
        accept(outbox, make_sale(sale_id=f"S-{i:04d}", till_id=till), RULES, clock())
        clock.advance(1)


class TestDurability:
    def test_reopen_keeps_everything(self, db_path: Path, clock: FakeClock) -> None:
        """Sales, receipt numbers and the journal are all there after close and reopen."""
        box = Outbox.open(db_path)
        store(box, clock, 5)
        before = box.all_sales()
        box.close()

        box = Outbox.open(db_path)
        try:
            after = box.all_sales()
            assert after == before
            assert [s.receipt_no for s in after] == [1, 2, 3, 4, 5]
            assert len(box.journal()) == 5
            assert box.verify() == []
            store(box, clock, 1, till="TILL-2")
            assert box.all_sales()[-1].receipt_no == 6
        finally:
            box.close()

    def test_pragmas(self, outbox: Outbox, db_path: Path) -> None:
        """The file is in WAL mode with STRICT tables."""
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'sales'").fetchone()[0]
            assert sql.rstrip().endswith("STRICT")
        finally:
            conn.close()

    def test_migrations_run_once(self, db_path: Path) -> None:
        """Reopening does not re-apply migrations."""
        Outbox.open(db_path).close()
        Outbox.open(db_path).close()
        conn = sqlite3.connect(db_path)
        try:
            names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")]
            assert names[0] == "m001_outbox"
            assert len(names) == len(set(names))
            assert migrations.pending(Database(conn)) == []
        finally:
            conn.close()

    def test_upgrade_from_the_first_schema(self, db_path: Path, clock: FakeClock) -> None:
        """An outbox written by the first schema is migrated on open and keeps its sales and numbering."""
        db_path.parent.mkdir(parents=True)
        conn = sqlite3.connect(db_path, isolation_level=None)
        migrations.apply(Database(conn), stop_before="m002_kra_lane")
        prev = GENESIS
        for seq in (1, 2):  # the rows the first version wrote: the m001 columns only
            new, at = prepare(make_sale(sale_id=f"S-{seq}"), RULES), timestamp(clock())
            conn.execute("INSERT INTO sales (till_id, sale_id, content_hash, sale, amounts, total, receipt_no, "
                         "accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (new.till_id, new.sale_id, new.content_hash, new.sale_json, new.amounts_json,
                          str(new.total), seq, at))
            detail = json.dumps({"till_id": new.till_id, "sale_id": new.sale_id, "content_hash": new.content_hash,
                                 "receipt_no": seq, "total": str(new.total)}, sort_keys=True, separators=(",", ":"))
            digest = entry_hash(prev, seq, at, "accepted", seq, detail)
            conn.execute("INSERT INTO journal VALUES (?, ?, 'accepted', ?, ?, ?, ?)",
                         (seq, at, seq, detail, prev, digest))
            prev = digest
        conn.close()

        box = Outbox.open(db_path)
        try:
            store(box, clock, 1, till="TILL-2")
            assert [s.receipt_no for s in box.all_sales()] == [1, 2, 3]
            assert box.verify() == []
            # m011 dropped the stored copy of each link; the entries written with it still chain.
            assert box.accepted_entry(3) == (prev, box.journal()[2].hash)
        finally:
            box.close()
        conn = sqlite3.connect(db_path)
        try:
            assert "prev_hash" not in {r[1] for r in conn.execute("PRAGMA table_info(journal)")}
        finally:
            conn.close()

    def test_upgrade_moves_the_texts_still_to_send_out_of_the_sales_rows(self, db_path: Path) -> None:
        """m006: a request or transaction not yet acknowledged moves to `outgoing` unchanged; one
        already acknowledged is dropped, and so is the body of a submission head office holds (and, from
        m009, the whole submission)."""
        db_path.parent.mkdir(parents=True)
        conn = sqlite3.connect(db_path, isolation_level=None)
        migrations.apply(Database(conn), stop_before="m006_outgoing")
        rows = [  # (kra_state, kra_request, tsms_state, tsms_transaction)
            ("signed", "request 1", "synced", "transaction 1"),
            ("in_flight", "request 2", "batched", "transaction 2"),
            ("queued", None, "pending", "transaction 3"),
        ]
        for n, (kra, request, tsms, transaction) in enumerate(rows, 1):
            conn.execute("INSERT INTO sales (till_id, sale_id, content_hash, sale, amounts, total, receipt_no, "
                         "accepted_at, kra_state, kra_request, tsms_state, tsms_transaction) "
                         "VALUES ('T', ?, 'h', '{}', '{}', '1.00', ?, 'at', ?, ?, ?, ?)",
                         (f"S-{n}", n, kra, request, tsms, transaction))
        for uuid, state in (("u-accepted", "accepted"), ("u-pending", "pending")):
            conn.execute("INSERT INTO tsms_submissions (uuid, body, sales, state, created_at, updated_at) "
                         "VALUES (?, 'body', 1, ?, 'at', 'at')", (uuid, state))
        conn.close()

        Outbox.open(db_path).close()
        conn = sqlite3.connect(db_path)
        try:
            assert conn.execute("SELECT sale_ref, lane, body FROM outgoing ORDER BY sale_ref, lane").fetchall() == [
                (2, "kra", "request 2"), (2, "tsms", "transaction 2"), (3, "tsms", "transaction 3")]
            columns = {r[1] for r in conn.execute("PRAGMA table_info(sales)")}
            assert not {"kra_request", "tsms_transaction"} & columns
            # m009: an accepted submission is not kept at all (m006 had emptied its body).
            assert dict(conn.execute("SELECT uuid, body FROM tsms_submissions")) == {"u-pending": "body"}
        finally:
            conn.close()

    def test_damaged_file_is_refused_with_advice(self, tmp_path: Path) -> None:
        """A file that is not a database gives a StorageError that says what happens next."""
        path = tmp_path / "outbox.sqlite3"
        path.write_bytes(b"this is not a database" * 100)
        with pytest.raises(StorageError, match=r"quarantine/.*outbox rescue"):
            Outbox.open(path)

    def test_readonly_open_of_missing_outbox(self, tmp_path: Path) -> None:
        """Reading an outbox that does not exist says to check data_dir."""
        with pytest.raises(StorageError, match="data_dir"):
            Outbox.open(tmp_path / "none.sqlite3", readonly=True)


class TestIdempotency:
    def test_replay_returns_the_stored_sale(self, outbox: Outbox, clock: FakeClock) -> None:
        """The same sale again is not stored twice and gets the same receipt number."""
        first = accept(outbox, make_sale(), RULES, clock())
        clock.advance(60)
        again = accept(outbox, make_sale(), RULES, clock())
        assert first.created and not again.created
        assert again.record == first.record
        assert len(outbox.all_sales()) == 1
        assert len(outbox.journal()) == 1

    def test_replay_tolerates_formatting(self, outbox: Outbox, clock: FakeClock) -> None:
        """A replay with numbers written differently ("2" vs 2.00) is still a replay."""
        sale = make_sale()
        accept(outbox, sale, RULES, clock())
        sale["lines"][0]["qty"] = 2
        sale["lines"][0]["unit_price"] = "58"
        assert not accept(outbox, sale, RULES, clock()).created

    def test_conflict(self, outbox: Outbox, clock: FakeClock) -> None:
        """The same id with other content is a conflict and changes nothing."""
        accept(outbox, make_sale(), RULES, clock())
        with pytest.raises(SaleConflict) as info:
            accept(outbox, make_sale(payment="cash"), RULES, clock())
        assert "R-0001" in str(info.value)
        assert len(outbox.all_sales()) == 1
        assert outbox.verify() == []

    def test_sale_id_is_per_till(self, outbox: Outbox, clock: FakeClock) -> None:
        """Two tills may use the same receipt number; both are stored."""
        accept(outbox, make_sale(till_id="A"), RULES, clock())
        accept(outbox, make_sale(till_id="B"), RULES, clock())
        assert {s.till_id for s in outbox.find("R-0001")} == {"A", "B"}

    def test_conflict_does_not_consume_a_receipt_number(self, outbox: Outbox, clock: FakeClock) -> None:
        """A refused write hands its number back: the next sale gets the next number."""
        accept(outbox, make_sale(), RULES, clock())
        with pytest.raises(SaleConflict):
            accept(outbox, make_sale(payment="cash"), RULES, clock())
        assert accept(outbox, make_sale(sale_id="R-0002"), RULES, clock()).record.receipt_no == 2


class TestJournal:
    def test_chain_verifies(self, outbox: Outbox, clock: FakeClock) -> None:
        """An untouched journal verifies, and each entry links to the one before."""
        store(outbox, clock, 4)
        entries = outbox.journal()
        assert [e.seq for e in entries] == [1, 2, 3, 4]
        assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
        assert outbox.verify() == []

    def test_two_writers_keep_one_chain(self, db_path: Path, clock: FakeClock) -> None:
        """Entries appended through a second connection (a technician's command) keep one chain."""
        first, second = Outbox.open(db_path), Outbox.open(db_path)
        try:
            for i in range(6):
                box = first if i % 3 else second
                accept(box, make_sale(sale_id=f"S{i}"), RULES, clock())
            assert [e.seq for e in first.journal()] == [1, 2, 3, 4, 5, 6]
            assert first.verify() == []
            assert [s.receipt_no for s in first.all_sales()] == [1, 2, 3, 4, 5, 6]
        finally:
            first.close()
            second.close()

    def test_journal_is_append_only(self, outbox: Outbox, clock: FakeClock, db_path: Path) -> None:
        """The database itself refuses to update or delete a journal entry."""
        store(outbox, clock, 1)
        conn = sqlite3.connect(db_path)
        try:
            for sql in ("UPDATE journal SET event = 'x'", "DELETE FROM journal"):
                with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                    conn.execute(sql)
        finally:
            conn.close()

    def tamper(self, db_path: Path, *statements: str) -> None:
        """Edit the file as an attacker would: drop the guards first."""
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute("DROP TRIGGER journal_no_update")
            conn.execute("DROP TRIGGER journal_no_delete")
            for sql in statements:
                conn.execute(sql)
        finally:
            conn.close()

    @pytest.mark.parametrize(("statements", "expected"), [
        (["UPDATE journal SET detail = replace(detail, '\"total\":\"', '\"total\":\"1') WHERE seq = 2"],
         "entry 2: does not match its hash"),
        (["DELETE FROM journal WHERE seq = 2"], "entry 3: expected entry 2"),
        (["UPDATE journal SET seq = 99 WHERE seq = 2", "UPDATE journal SET seq = 2 WHERE seq = 3",
          "UPDATE journal SET seq = 3 WHERE seq = 99"], "entry 2: does not match its hash"),
        (["DELETE FROM journal WHERE seq = 4"], "has no 'accepted' journal entry"),
        (["UPDATE sales SET total = '1.00', content_hash = 'x' WHERE id = 1"], "differs from its journal"),
        (["DELETE FROM sales WHERE id = 2"], "refers to a sale that is not stored"),
    ], ids=["edited", "removed", "reordered", "tail-cut", "sale-edited", "sale-removed"])
    def test_tampering_is_detected(self, db_path: Path, clock: FakeClock,
                                   statements: list[str], expected: str) -> None:
        """Editing, removing or reordering entries, or editing a sale, fails verification."""
        box = Outbox.open(db_path)
        store(box, clock, 4)
        box.close()
        self.tamper(db_path, *statements)
        box = Outbox.open(db_path, readonly=True)
        try:
            problems = box.verify()
        finally:
            box.close()
        assert any(expected in p for p in problems), problems


class TestStats:
    def test_stats_count_backlog(self, outbox: Outbox, clock: FakeClock) -> None:
        """Stats count sales per lane state and give the oldest unsigned sale's time."""
        first_at = clock()
        store(outbox, clock, 3)
        stats = outbox.stats()
        assert stats.sales == 3
        assert stats.kra == {"queued": 3}
        assert stats.tsms == {"pending": 3}
        assert stats.oldest_unsigned_at == first_at
        assert stats.journal_entries == 3

    def test_lane_head_and_backlog_use_the_pending_index(self, outbox: Outbox, db_path: Path,
                                                         clock: FakeClock) -> None:
        """The lane's head and the count of unsigned sales (Outbox.unsigned) come from the partial index,
        not a scan of every signed sale; the lane's backlog from the per-state counts."""
        store(outbox, clock, 3)
        assert KraStore(outbox).next_work() is not None and KraStore(outbox).backlog() == 3
        assert kra_pending() == f"kra_state IN ({', '.join(repr(s) for s in PENDING_STATES)})"
        conn = sqlite3.connect(db_path)
        try:
            for query in (f"SELECT s.id FROM sales s LEFT JOIN sales o ON o.id = s.original_id "
                          f"WHERE {kra_pending('s')} ORDER BY s.id LIMIT 1",
                          f"SELECT count(*) FROM sales WHERE {kra_pending()}"):
                plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}"))
                assert "USING INDEX sales_kra_pending" in plan or "USING COVERING INDEX sales_kra_pending" in plan, plan
        finally:
            conn.close()

    def test_head_office_answers_find_a_submission_through_the_batched_index(
            self, outbox: Outbox, db_path: Path, clock: FakeClock) -> None:
        """Accepting, splitting and refusing a submission find its sales through the partial index on
        batched sales (m010), not by scanning every sale head office already holds."""
        store(outbox, clock, 6)
        tsms = TsmsStore(outbox)
        refs = [u.id for u in tsms.unsynced(10)]
        for n, uuid in enumerate(("u-ok", "u-split", "u-bad")):
            tsms.create_submission(uuid, "{}", refs[2 * n:2 * n + 2], {}, clock())
        statements: list[str] = []
        outbox._conn.set_trace_callback(statements.append)  # each statement as run, its values in place
        try:
            tsms.accepted("u-ok", clock())
            tsms.split("u-split", 413, "too large", clock())
            tsms.rejected("u-bad", 422, "bad sale", clock())
        finally:
            outbox._conn.set_trace_callback(None)
        # Unique: the state-count triggers make each UPDATE show once more per trigger step.
        lookups = list(dict.fromkeys(sql for sql in statements if "tsms_submission =" in sql))
        assert len(lookups) == 4, statements
        conn = sqlite3.connect(db_path)
        try:
            for sql in lookups:
                plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
                assert "USING INDEX sales_tsms_batched" in plan and "SCAN sales" not in plan, (sql, plan)
        finally:
            conn.close()
        assert [record.tsms_state for record in outbox.all_sales()] == [
            "synced", "synced", "pending", "pending", "rejected", "rejected"]

    def test_prepare_is_pure(self) -> None:
        """prepare() validates and serialises without touching storage."""
        new = prepare(make_sale(), RULES)
        # 2 x 58.00 = 116.00 (band B) + 1.5 x 40.00 - 5.00 = 55.00 (band A)
        assert str(new.total) == "171.00"
        assert '"sale_id":"R-0001"' in new.sale_json


def test_allocate_refuses_a_sale_parked_meanwhile(outbox: Outbox, clock: FakeClock) -> None:
    """A technician parks the head sale while the lane registers its items: no number is taken."""
    store(outbox, clock, 2)
    kra = KraStore(outbox)
    head = kra.next_work()
    assert head is not None
    kra.park(head.id, "operator", "wrong price", clock(), release=False)
    assert kra.allocate(head.id, lambda n: f"request {n}", clock(), items=[]) is None
    following = kra.next_work()
    assert following is not None and following.id != head.id
    # number 1 was handed back unused
    assert kra.allocate(following.id, lambda n: f"request {n}", clock(), items=[]) == (1, "request 1")
    assert outbox.verify() == []


def test_allocate_numbers_no_sale_kra_is_not_ready_for(outbox: Outbox, clock: FakeClock) -> None:
    """Whatever the lane read before, allocate itself refuses while one of the sale's items is not
    registered with KRA, or while KRA's numbering must be learned first; no number is used."""
    store(outbox, clock, 1)
    kra = KraStore(outbox)
    head = kra.next_work()
    assert head is not None
    assert kra.allocate(head.id, lambda n: f"request {n}", clock(), items=["ITEM-A", "ITEM-B"]) is None
    kra.item_registered("ITEM-A", "{}", clock())
    kra.item_registered("ITEM-B", "{}", clock())
    recovery.distrust_numbering(outbox, "test", clock())
    assert kra.allocate(head.id, lambda n: f"request {n}", clock(), items=["ITEM-A", "ITEM-B"]) is None
    kra.numbering_learned(0, 1, clock())
    assert kra.allocate(head.id, lambda n: f"request {n}", clock(), items=["ITEM-A", "ITEM-B", "ITEM-A"]) == (
        1, "request 1")
    assert outbox.verify() == []


def test_a_signature_and_the_next_number_share_one_commit(outbox: Outbox, clock: FakeClock) -> None:
    """allocate(after=...) stores the sale ahead's signature and numbers the next sale in one
    transaction; the journal still reads signed, then sent, and verifies."""
    store(outbox, clock, 2)
    kra = KraStore(outbox)
    first = kra.next_work()
    assert first is not None and kra.allocate(first.id, lambda n: f"request {n}", clock(), items=[]) == (1, "request 1")
    second = kra.next_work(skip=first.id)
    assert second is not None and second.id != first.id
    commits = outbox.commits
    done = Signed(first.id, {"rcptSign": "X"}, adopted=False)
    assert kra.allocate(second.id, lambda n: f"request {n}", clock(), items=[], after=done) == (2, "request 2")
    assert outbox.commits == commits + 1
    assert outbox._flushed == outbox.commits  # with its fsync: the number must be on disk before the send
    states = {s.id: (s.kra_state, s.kra_signature) for s in outbox.all_sales()}
    assert states == {first.id: ("signed", {"rcptSign": "X"}), second.id: ("in_flight", None)}
    assert [e.event for e in outbox.journal()][-3:] == ["sent", "signed", "sent"]
    assert outbox.verify() == []


def test_a_signature_is_stored_even_when_the_next_sale_was_parked_meanwhile(outbox: Outbox,
                                                                            clock: FakeClock) -> None:
    """The sale behind was parked by a technician: no number is taken, and the signature that was to
    share its transaction is stored on its own."""
    store(outbox, clock, 2)
    kra = KraStore(outbox)
    first = kra.next_work()
    assert first is not None and kra.allocate(first.id, lambda n: f"request {n}", clock(), items=[]) is not None
    second = kra.next_work(skip=first.id)
    assert second is not None
    kra.park(second.id, "operator", "wrong price", clock(), release=False)
    done = Signed(first.id, {"rcptSign": "X"}, adopted=True)
    assert kra.allocate(second.id, lambda n: f"request {n}", clock(), items=[], after=done) is None
    states = {s.id: (s.kra_state, s.kra_invc_no) for s in outbox.all_sales()}
    assert states == {first.id: ("signed", 1), second.id: ("parked", None)}
    assert json.loads(outbox.journal()[-1].detail)["adopted"] is True
    assert outbox.verify() == []


def test_a_signature_is_committed_without_its_own_fsync_and_every_other_write_keeps_it(
        db_path: Path, clock: FakeClock) -> None:
    """The signature's write skips its fsync (the next commit carries it); the connection goes back to
    synchronous=FULL at once, also when the write fails, so no sale is ever acknowledged unflushed."""
    box = Outbox.open(db_path)
    store(box, clock, 2)
    kra = KraStore(box)
    head = kra.next_work()
    assert head is not None and kra.allocate(head.id, lambda n: f"request {n}", clock(), items=[]) is not None
    full = 2  # PRAGMA synchronous: 1 is NORMAL, 2 is FULL
    kra.signed(head.id, {"rcptSign": "X"}, clock(), adopted=False)
    assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == full
    with pytest.raises(TypeError):  # fails inside the transaction: the sale has no number to return
        kra.signed(10_000, {"rcptSign": "Y"}, clock(), adopted=False)
    assert box._conn.execute("PRAGMA synchronous").fetchone()[0] == full
    box.close()
    box = Outbox.open(db_path, readonly=True)
    try:
        signed = [s for s in box.all_sales() if s.kra_state == "signed"]
        assert [s.kra_signature for s in signed] == [{"rcptSign": "X"}]
        assert box.verify() == []
    finally:
        box.close()


def test_verify_reports_invoice_number_gaps(db_path: Path, clock: FakeClock) -> None:
    """verify lists KRA invoice numbers no sale holds; numbers a strict KRA told us to skip are not gaps."""
    box = Outbox.open(db_path)
    store(box, clock, 3)
    kra = KraStore(box)
    for _ in range(3):
        head = kra.next_work()
        assert head is not None
        allocated = kra.allocate(head.id, lambda n: f"request {n}", clock(), items=[])
        assert allocated is not None
        kra.signed(head.id, {"rcptSign": "X"}, clock(), adopted=False)
    assert box.verify() == []
    box.close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE sales SET kra_invc_no = 5 WHERE kra_invc_no = 3")  # as if 3 and 4 were lost
    conn.commit()
    conn.close()
    box = Outbox.open(db_path, readonly=True)
    try:
        problems = box.verify()
    finally:
        box.close()
    assert any("KRA invoice numbers with no sale here: 3, 4 (2)" in p for p in problems), problems


def test_state_counts_follow_every_change_of_state(tmp_path: Path) -> None:
    """stats() reads counts kept by triggers; after any mix of inserts, state changes and deletes they
    equal a full count of the sales."""
    import random

    from agent.queue.schema import KRA_STATES, TSMS_STATES

    clock = FakeClock()
    box = Outbox.open(tmp_path / "outbox.sqlite3")
    try:
        store(box, clock, 40)
        rng = random.Random(5)
        conn = sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)
        try:
            for _ in range(300):
                sale_ref = rng.randint(1, 40)
                if rng.random() < 0.5:
                    conn.execute("UPDATE sales SET kra_state = ? WHERE id = ?", (rng.choice(KRA_STATES), sale_ref))
                else:
                    conn.execute("UPDATE sales SET tsms_state = ? WHERE id = ?", (rng.choice(TSMS_STATES), sale_ref))
            conn.execute("DELETE FROM sales WHERE id IN (3, 4) AND original_id IS NULL")
            full = {lane: dict(conn.execute(f"SELECT {lane}_state, count(*) FROM sales GROUP BY {lane}_state"))
                    for lane in ("kra", "tsms")}
        finally:
            conn.close()
        stats = box.stats()
        assert (stats.kra, stats.tsms) == (full["kra"], full["tsms"])
        assert KraStore(box).backlog() == sum(full["kra"].get(state, 0) for state in PENDING_STATES)
        assert stats.sales == 38 and stats.journal_entries == len(box.journal())
    finally:
        box.close()
