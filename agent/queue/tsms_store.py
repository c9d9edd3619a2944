"""The TSMS lane's side of the outbox: submissions stored before they are sent, and their outcome.

A submission's exact body is written, and its sales marked `batched`, in one transaction before the
first send; until the server has answered it for good, the lane sends those same bytes again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.queue.outbox import Outbox, timestamp
from agent.queue.schema import TSMS_PENDING


@dataclass(frozen=True, slots=True)
class Unsynced:
    id: int
    receipt_no: int
    sale_json: str
    amounts_json: str
    transaction: str | None  # built at acceptance; None for a sale accepted while TSMS was off

    def source(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The sale and its amounts, to build the transaction from. Parsed only when asked: most
        sales' transactions were built at acceptance, and parsing 50 sales held up the tills."""
        return json.loads(self.sale_json), json.loads(self.amounts_json)


@dataclass(frozen=True, slots=True)
class PendingVoid:
    """A credit note waiting to reach head office, with the sale it refunds."""

    id: int
    refund_reason: str | None
    lines: list[dict[str, Any]]  # the credit note's lines
    original_lines: list[dict[str, Any]]
    original_tsms_id: str | None
    original_tsms_state: str
    earlier_notes: int  # credit notes against the same sale before this one


@dataclass(frozen=True, slots=True)
class Submission:
    uuid: str
    body: bytes
    sales: int
    attempts: int


class TsmsStore:
    def __init__(self, outbox: Outbox) -> None:
        self._box = outbox

    def open_submission(self) -> Submission | None:
        """The oldest submission not yet answered for good: it goes again, byte for byte."""
        with self._box._read() as conn:
            row = conn.execute("SELECT uuid, body, sales, attempts FROM tsms_submissions WHERE state = 'pending' "
                               "ORDER BY created_at, uuid LIMIT 1").fetchone()
        return None if row is None else Submission(row[0], row[1].encode(), row[2], row[3])

    def unsynced(self, limit: int) -> list[Unsynced]:
        """The oldest sales not yet in a submission (credit notes travel as voids, not here)."""
        with self._box._read() as conn:
            rows = conn.execute(
                "SELECT id, receipt_no, sale, amounts, (SELECT body FROM outgoing WHERE sale_ref = sales.id AND "
                f"lane = 'tsms') FROM sales WHERE {TSMS_PENDING} AND kind = 'sale' ORDER BY id LIMIT ?",
                (limit,)).fetchall()
        return [Unsynced(*r) for r in rows]

    def backlog(self, at_most: int = -1) -> int:
        """How many sales wait for head office; counting stops at `at_most` (that many rows read, not
        all; -1 counts all)."""
        with self._box._read() as conn:
            count: int = conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM sales WHERE {TSMS_PENDING} AND "
                                      "kind = 'sale' LIMIT ?)", (at_most,)).fetchone()[0]
        return count

    def create_submission(self, uuid: str, body: str, sale_refs: list[int],
                          built: dict[int, tuple[str, str]], now: datetime) -> None:
        """Store a submission and tie its sales to it; `built`: transactions made just now (id -> tsms id, JSON)."""
        at = timestamp(now)
        with self._box._write() as conn:
            for sale_ref, (tsms_id, transaction) in built.items():
                if conn.execute("UPDATE sales SET tsms_id = ? WHERE id = ? AND tsms_id IS NULL",
                                (tsms_id, sale_ref)).rowcount:
                    conn.execute("INSERT INTO outgoing (sale_ref, lane, body) VALUES (?, 'tsms', ?)",
                                 (sale_ref, transaction))
            conn.execute("INSERT INTO tsms_submissions (uuid, body, sales, state, created_at, updated_at) "
                         "VALUES (?, ?, ?, 'pending', ?, ?)", (uuid, body, len(sale_refs), at, at))
            conn.executemany("UPDATE sales SET tsms_state = 'batched', tsms_submission = ? WHERE id = ?",
                             [(uuid, ref) for ref in sale_refs])

    def attempted(self, uuid: str, status: int, error: str | None, now: datetime) -> None:
        with self._box._write() as conn:
            conn.execute("UPDATE tsms_submissions SET attempts = attempts + 1, last_status = ?, last_error = ?, "
                         "updated_at = ? WHERE uuid = ?", (status, error, timestamp(now), uuid))

    def accepted(self, uuid: str, now: datetime) -> int:
        """The server holds the submission (new or replay): its sales are synced, and journalled so.

        Head office holds it now and it is never sent again: its row goes, with the sales' texts. The
        journal entry keeps what is worth keeping (its uuid, which each sale names, and the count). In a
        shop selling a sale every few seconds each sale travels alone, and the row cost about 240 bytes
        a sale (bench/memory.py, slow shop)."""
        at = timestamp(now)
        with self._box._write() as conn:
            conn.execute("DELETE FROM tsms_submissions WHERE uuid = ?", (uuid,))
            # Each `tsms_submission = ?` comes with `tsms_state = 'batched'`: the index on the submission
            # is partial (m010), and SQLite uses it only when the query repeats its WHERE term.
            conn.execute("DELETE FROM outgoing WHERE lane = 'tsms' AND sale_ref IN "
                         "(SELECT id FROM sales WHERE tsms_submission = ? AND tsms_state = 'batched')", (uuid,))
            count = conn.execute("UPDATE sales SET tsms_state = 'synced', tsms_synced_at = ? "
                                 "WHERE tsms_submission = ? AND tsms_state = 'batched'", (at, uuid)).rowcount
            self._box._journal(conn, at, "tsms_synced", None, {"submission_uuid": uuid, "sales": count})
        return count

    def rejected(self, uuid: str, status: int, error: str, now: datetime) -> None:
        """The server refused this content for good: its sales are set aside with the server's words."""
        at = timestamp(now)
        with self._box._write() as conn:
            conn.execute("UPDATE tsms_submissions SET state = 'rejected', attempts = attempts + 1, last_status = ?, "
                         "last_error = ?, updated_at = ? WHERE uuid = ?", (status, error, at, uuid))
            conn.execute("UPDATE sales SET tsms_state = 'rejected' "
                         "WHERE tsms_submission = ? AND tsms_state = 'batched'", (uuid,))
            self._box._journal(conn, at, "tsms_rejected", None, {"submission_uuid": uuid, "status": status,
                                                                  "error": error[:500]})

    def split(self, uuid: str, status: int, error: str, now: datetime) -> None:
        """The server never took this submission (too large, or one bad sale in it): its sales go back
        to the queue and travel again in smaller submissions with new uuids."""
        at = timestamp(now)
        with self._box._write() as conn:
            conn.execute("UPDATE tsms_submissions SET state = 'split', attempts = attempts + 1, last_status = ?, "
                         "last_error = ?, updated_at = ? WHERE uuid = ?", (status, error, at, uuid))
            conn.execute("UPDATE sales SET tsms_state = 'pending', tsms_submission = NULL "
                         "WHERE tsms_submission = ? AND tsms_state = 'batched'", (uuid,))

    def pending_voids(self) -> list[PendingVoid]:
        """Credit notes not yet settled with head office whose original has reached it, oldest first."""
        with self._box._read() as conn:
            rows = conn.execute(
                "SELECT n.id, n.refund_reason, n.sale, o.sale, o.tsms_id, o.tsms_state, "
                "(SELECT count(*) FROM sales e WHERE e.original_id = n.original_id AND e.id < n.id) "
                "FROM sales n JOIN sales o ON o.id = n.original_id "
                "WHERE n.original_id IS NOT NULL AND n.tsms_state = 'pending' ORDER BY n.id").fetchall()
        return [PendingVoid(r[0], r[1], json.loads(r[2])["lines"], json.loads(r[3])["lines"], r[4], r[5], r[6])
                for r in rows]

    def void_settled(self, note_ref: int, outcome: str, detail: dict[str, Any], now: datetime) -> None:
        """The credit note is done with head office: `synced` (voided, or nothing to send) or `rejected`."""
        at = timestamp(now)
        with self._box._write() as conn:
            conn.execute("UPDATE sales SET tsms_state = ?, tsms_synced_at = ? WHERE id = ?",
                         (outcome, at if outcome == "synced" else None, note_ref))
            self._box._journal(conn, at, "tsms_void" if outcome == "synced" else "tsms_rejected", note_ref, detail)

    def submission_state(self, uuid: str) -> str | None:
        with self._box._read() as conn:
            row = conn.execute("SELECT state FROM tsms_submissions WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else str(row[0])
