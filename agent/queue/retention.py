"""Retention: remove the sales KRA and head office both hold once they are `keep_days` old (the I/O;
what may go and what the journal says about it are in pruning.py).

Each batch (at most about BATCH sales) is one write transaction: it picks its sales inside the
transaction, so a lane or a technician's command cannot change one between the choice and the
delete; it removes their rows in the per-sale tables, writes a tombstone per sale, deletes the sales
and the head-office submissions left empty, and appends one `pruned` journal entry. A failure rolls
the whole batch back. The job runs the batches on the event loop and pauses between them, so a till
waits at most one batch for its answer.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agent.clock import Clock
from agent.logs import get_logger
from agent.queue import pruning
from agent.queue.outbox import Outbox, timestamp

log = get_logger("agent.retention")

BATCH = 500
EVERY_S = 3600.0  # the job runs hourly (and once at start)
KEEP_ALL = 0  # retention.keep_days = 0: nothing is ever pruned
# Tables whose rows (keyed by sale_ref) belong to one sale and go with it. A new per-sale table must be
# listed here or in KEPT_TABLES; tests/test_retention.py fails until it is.
SALE_TABLES = ("receipt_prints", "outgoing", "print_jobs")  # print_jobs: a receipt still unprinted after keep_days
KEPT_TABLES = ("journal", "pruned_sales")  # keyed by sale_ref, kept for good: the evidence

_ROW = ("id, till_id, sale_id, kind, content_hash, receipt_no, accepted_at, kra_state, kra_invc_no, "
        "json_extract(kra_signature, '$.rcptSign'), tsms_state, original_id")


def _row(r: tuple[Any, ...]) -> pruning.Row:
    return pruning.Row(id=r[0], till_id=r[1], sale_id=r[2], kind=r[3], content_hash=r[4], receipt_no=r[5],
                       accepted_at=datetime.fromisoformat(r[6]), kra_state=r[7], kra_invc_no=r[8],
                       rcpt_sign=None if r[9] is None else str(r[9]), tsms_state=r[10],
                       original_id=r[11])


@dataclass(frozen=True, slots=True)
class BatchResult:
    pruned: int = 0
    credit_notes: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # rows of SALE_TABLES
    cursor: tuple[str, int] | None = None  # (accepted_at, id) of the last sale looked at; None: no more


def prune_batch(outbox: Outbox, *, cutoff: datetime, keep_days: int, now: datetime,
                after: tuple[str, int] | None = None, limit: int = BATCH) -> BatchResult:
    """Prune one batch of the sales accepted before `cutoff`, looking at those after `after` in
    (accepted_at, id) order; one transaction."""
    start = after or ("", 0)
    with outbox._write() as conn:
        found = conn.execute(f"SELECT {_ROW} FROM sales WHERE accepted_at < ? AND (accepted_at, id) > (?, ?) "
                             "ORDER BY accepted_at, id LIMIT ?", (timestamp(cutoff), *start, limit)).fetchall()
        if not found:
            return BatchResult()
        candidates = [_row(r) for r in found]
        cursor = (found[-1][6], found[-1][0]) if len(found) == limit else None  # the stored text, as compared
        roots = json.dumps(sorted({r.id if r.original_id is None else r.original_id for r in candidates}))
        families: dict[int, list[pruning.Row]] = {}
        for r in conn.execute(f"SELECT {_ROW} FROM sales WHERE id IN (SELECT value FROM json_each(?1)) "
                              "OR original_id IN (SELECT value FROM json_each(?1))", (roots,)):
            row = _row(r)
            families.setdefault(row.id if row.original_id is None else row.original_id, []).append(row)
        chosen = pruning.choose(candidates, families, cutoff, limit)
        if not chosen:
            return BatchResult(cursor=cursor)
        removed = _delete(conn, chosen)
        detail = pruning.entry_detail(chosen, cutoff, keep_days, receipt_prints=removed["receipt_prints"])
        outbox._journal(conn, timestamp(now), pruning.EVENT, None, detail)
    return BatchResult(pruned=len(chosen), credit_notes=detail["credit_notes"], removed=removed, cursor=cursor)


def _delete(conn: sqlite3.Connection, rows: list[pruning.Row]) -> dict[str, int]:
    ids = json.dumps([r.id for r in rows])
    removed = {table: conn.execute(f"DELETE FROM {table} WHERE sale_ref IN (SELECT value FROM json_each(?))",
                                   (ids,)).rowcount for table in SALE_TABLES}
    conn.executemany("INSERT INTO pruned_sales (till_id, sale_id, sale_ref, receipt_no, kra_invc_no) "
                     "VALUES (?, ?, ?, ?, ?)",
                     [(r.till_id, r.sale_id, r.id, r.receipt_no, r.kra_invc_no) for r in rows])
    # One statement: a credit note and its original go together, and the foreign key between them is
    # checked at the end of the statement.
    conn.execute("DELETE FROM sales WHERE id IN (SELECT value FROM json_each(?))", (ids,))
    conn.execute("UPDATE counters SET value = value + ? WHERE name = 'pruned_sales'", (len(rows),))
    return removed


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A sale or credit note that was pruned: its till's id may never be stored again."""

    till_id: str
    sale_id: str
    sale_ref: int
    receipt_no: int
    kra_invc_no: int | None

    def refusal(self) -> str:
        invoice = f", KRA invoice {self.kra_invc_no}" if self.kra_invc_no is not None else ""
        return (f"sale {self.sale_id!r} of till {self.till_id!r} was taken here before (receipt no "
                f"{self.receipt_no}{invoice}), signed by KRA, held by head office and then pruned "
                "(retention.keep_days); it is not stored or signed again. A new sale needs a new sale_id; "
                "the signed record is in the journal and in audit bundles exported before it was pruned")


def tombstone(outbox: Outbox, till_id: str, sale_id: str) -> Tombstone | None:
    with outbox._read() as conn:
        row = conn.execute("SELECT sale_ref, receipt_no, kra_invc_no FROM pruned_sales WHERE till_id = ? "
                           "AND sale_id = ?", (till_id, sale_id)).fetchone()
    return None if row is None else Tombstone(till_id, sale_id, row[0], row[1], row[2])


def summary(outbox: Outbox) -> dict[str, Any]:
    """Sales pruned so far and when the last went (two small reads)."""
    with outbox._read() as conn:
        count = conn.execute("SELECT value FROM counters WHERE name = 'pruned_sales'").fetchone()
        last = conn.execute("SELECT at FROM journal WHERE event = 'pruned' ORDER BY seq DESC LIMIT 1").fetchone()
    return {"pruned_sales": 0 if count is None else int(count[0]), "last_pruned_at": None if last is None else last[0]}


@dataclass(slots=True)
class RunReport:
    pruned: int = 0
    credit_notes: int = 0
    batches: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    cutoff: datetime | None = None

    def add(self, batch: BatchResult) -> None:
        self.batches += batch.pruned > 0
        self.pruned += batch.pruned
        self.credit_notes += batch.credit_notes
        for table, n in batch.removed.items():
            self.removed[table] = self.removed.get(table, 0) + n


class Retention:
    """The hourly job, and what status shows of it."""

    def __init__(self, outbox: Outbox, clock: Clock, keep_days: int, *, batch: int = BATCH) -> None:
        self._outbox = outbox
        self._clock = clock
        self.keep_days = keep_days
        self._batch = batch
        self.last_run_at: datetime | None = None
        self.last_run_pruned: int | None = None

    @property
    def enabled(self) -> bool:
        return self.keep_days != KEEP_ALL

    def _batches(self, report: RunReport) -> Iterator[None]:
        """Prune batch after batch, yielding between them; fills `report`."""
        if not self.enabled:
            return
        now = self._clock()
        report.cutoff = now - timedelta(days=self.keep_days)
        cursor: tuple[str, int] | None = None
        while True:
            batch = prune_batch(self._outbox, cutoff=report.cutoff, keep_days=self.keep_days, now=self._clock(),
                                after=cursor, limit=self._batch)
            report.add(batch)
            if batch.cursor is None:
                return
            cursor = batch.cursor
            yield

    def prune(self) -> RunReport:
        """One run to the end, without pauses (tests, and anything not on the event loop)."""
        report = RunReport()
        started = time.perf_counter()
        for _ in self._batches(report):
            pass
        self._finish(report, time.perf_counter() - started)
        return report

    async def run(self) -> RunReport:
        """The scheduled job: a run, pausing between batches as long as the last one took (at most 0.5 s),
        so selling goes on at no less than half speed during a long first run."""
        report = RunReport()
        started = mark = time.perf_counter()
        for _ in self._batches(report):
            took = time.perf_counter() - mark
            await asyncio.sleep(min(took, 0.5))
            mark = time.perf_counter()
        self._finish(report, time.perf_counter() - started)
        return report

    def _finish(self, report: RunReport, seconds: float) -> None:
        self.last_run_at, self.last_run_pruned = self._clock(), report.pruned
        if report.pruned and report.cutoff is not None:  # a run that found nothing due says nothing
            log.info("retention_pruned", sales=report.pruned, credit_notes=report.credit_notes,
                     batches=report.batches, keep_days=self.keep_days, cutoff=timestamp(report.cutoff),
                     seconds=round(seconds, 3), **report.removed)

    def status(self) -> dict[str, Any]:
        return {"keep_days": self.keep_days, "enabled": self.enabled,
                "every_s": EVERY_S if self.enabled else None,
                "last_run_at": None if self.last_run_at is None else self.last_run_at.isoformat(),
                "last_run_pruned": self.last_run_pruned, **summary(self._outbox)}
