"""Group commit: sales that reach the event loop together share one transaction, and only that."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import RULES, FakeClock, make_sale

from agent.errors import SaleConflict
from agent.intake import prepare
from agent.queue.group_commit import MAX_BATCH, GroupCommit
from agent.queue.outbox import Accepted, Outbox


def commits(outbox: Outbox) -> list[str]:
    """Every COMMIT the outbox's write connection runs from now on."""
    seen: list[str] = []
    outbox._conn.set_trace_callback(lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


def test_a_refused_sale_leaves_the_others_of_its_batch_stored(outbox: Outbox, clock: FakeClock) -> None:
    """A reused sale id in the middle of a batch is refused alone; the journal and numbering stay whole."""
    outbox.accept(prepare(make_sale(sale_id="S-1"), RULES), clock())
    changed = make_sale(sale_id="S-1")
    changed["lines"][0]["qty"] = "3"
    sales = [prepare(make_sale(sale_id="S-2"), RULES), prepare(changed, RULES),
             prepare(make_sale(sale_id="S-3"), RULES), prepare(make_sale(sale_id="S-2"), RULES)]
    seen = commits(outbox)
    results = outbox.accept_many([(new, clock()) for new in sales])
    assert seen == ["COMMIT"]
    assert isinstance(results[1], SaleConflict)
    stored = [r for r in results if isinstance(r, Accepted)]
    assert [(r.record.sale_id, r.record.receipt_no, r.created) for r in stored] == [
        ("S-2", 2, True), ("S-3", 3, True), ("S-2", 2, False)]  # the last: a replay inside the batch
    assert [s.receipt_no for s in outbox.all_sales()] == [1, 2, 3]
    assert outbox.verify() == []
    # The journal head the outbox cached is right: the next sale links to the last entry.
    outbox.accept(prepare(make_sale(sale_id="S-4"), RULES), clock())
    assert outbox.verify() == []


def test_sales_arriving_in_one_turn_share_one_commit(outbox: Outbox, clock: FakeClock) -> None:
    """Ten sales handed over in the same turn of the loop: one transaction; a lone sale later: its own."""
    seen = commits(outbox)
    writer = GroupCommit(outbox)

    async def main() -> list[tuple[Accepted, int]]:
        together = await asyncio.gather(*(writer.accept(prepare(make_sale(sale_id=f"S-{i}"), RULES), clock())
                                          for i in range(10)))
        alone = await writer.accept(prepare(make_sale(sale_id="S-alone"), RULES), clock())
        return [*together, alone]

    results = asyncio.run(main())
    assert seen == ["COMMIT", "COMMIT"]
    assert [r.record.receipt_no for r, _ in results] == list(range(1, 12))
    assert [n for _, n in results] == [1] * 10 + [2]  # the number of the commit that holds each
    assert outbox.verify() == []


def test_each_waiting_till_gets_its_own_answer(outbox: Outbox, clock: FakeClock) -> None:
    """In one batch, the conflicting sale's caller gets SaleConflict and the others their receipts;
    more than MAX_BATCH sales are split into several transactions."""
    outbox.accept(prepare(make_sale(sale_id="S-0"), RULES), clock())
    changed = make_sale(sale_id="S-0")
    changed["lines"][0]["qty"] = "3"
    writer = GroupCommit(outbox)
    seen = commits(outbox)

    async def main() -> list[tuple[Accepted, int] | BaseException]:
        calls = [writer.accept(prepare(make_sale(sale_id=f"S-{i}"), RULES), clock()) for i in range(1, MAX_BATCH + 5)]
        calls.insert(3, writer.accept(prepare(changed, RULES), clock()))
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert len(seen) == 2
    assert isinstance(results[3], SaleConflict)
    assert all(isinstance(r, tuple) and r[0].created for i, r in enumerate(results) if i != 3)
    assert len(outbox.all_sales()) == MAX_BATCH + 5
    assert outbox.verify() == []


def test_a_failed_transaction_fails_every_sale_of_the_batch(tmp_path: Path, clock: FakeClock) -> None:
    """When the transaction itself cannot be written, no caller is told its sale was stored."""
    outbox = Outbox.open(tmp_path / "outbox.sqlite3")
    writer = GroupCommit(outbox)
    outbox._conn.execute("PRAGMA query_only = ON")  # every write now fails inside SQLite

    async def main() -> list[tuple[Accepted, int] | BaseException]:
        return await asyncio.gather(*(writer.accept(prepare(make_sale(sale_id=f"S-{i}"), RULES), clock())
                                      for i in range(3)), return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert all(isinstance(r, Exception) and not isinstance(r, SaleConflict) for r in results), results
        outbox._conn.execute("PRAGMA query_only = OFF")
        assert outbox.all_sales() == []
    finally:
        outbox.close()



def wal_syncs(outbox: Outbox) -> list[str]:
    """Every fsync-bearing statement: what the connection runs with synchronous=FULL in force."""
    seen: list[str] = []

    def note(sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            full = outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
            seen.append("COMMIT FULL" if full else "COMMIT NORMAL")
    outbox._conn.set_trace_callback(note)
    return seen


def test_a_batch_is_flushed_if_any_of_its_sales_asks(outbox: Outbox, clock: FakeClock) -> None:
    """Sales waiting for KRA may skip the fsync; one that does not wait in the same batch gets it."""
    writer = GroupCommit(outbox)
    seen = wal_syncs(outbox)

    async def main() -> None:
        await asyncio.gather(writer.accept(prepare(make_sale(sale_id="A"), RULES), clock(), flush=False),
                             writer.accept(prepare(make_sale(sale_id="B"), RULES), clock(), flush=False))
        await asyncio.gather(writer.accept(prepare(make_sale(sale_id="C"), RULES), clock(), flush=False),
                             writer.accept(prepare(make_sale(sale_id="D"), RULES), clock()))

    asyncio.run(main())
    outbox._conn.set_trace_callback(None)
    assert seen == ["COMMIT NORMAL", "COMMIT FULL"]


def test_make_durable_syncs_only_what_no_fsync_has_carried(outbox: Outbox, clock: FakeClock) -> None:
    """A commit without fsync is synced by make_durable, unless a later full commit already did it."""
    box = outbox
    box.accept_many([(prepare(make_sale(sale_id="A"), RULES), clock())], flush=False)
    first = box.commits
    assert box._flushed < first
    box.make_durable(first)  # nothing since: the log is synced here
    assert box._flushed == first
    box.accept_many([(prepare(make_sale(sale_id="B"), RULES), clock())], flush=False)
    second = box.commits
    box.accept(prepare(make_sale(sale_id="C"), RULES), clock())  # a full commit carries B too
    assert box._flushed == box.commits > second
    box.make_durable(second)
    assert [s.sale_id for s in box.all_sales()] == ["A", "B", "C"] and box.verify() == []
