"""The technician's side of the outbox: look at sales, and move a stuck one by hand.

Used by `etims-agent outbox ...` while the agent may be running: SQLite in WAL mode lets this
process write beside the agent (each change is one `BEGIN IMMEDIATE` transaction, waiting up to the
busy timeout for the agent's own), and the outbox's journal append re-reads the chain's head when
another process appended since. Every state a change depends on is read again inside the
transaction that makes it, so a lane that moved the sale meanwhile turns the change into a refusal,
never into a lost update. Every fiscal change is journalled in its own transaction with
`operator: true`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError, StorageError
from agent.queue.outbox import Outbox, SaleRecord, timestamp
from agent.queue.schema import KRA_STATES, TSMS_STATES, kra_pending
from agent.signing import PENDING_STATES


class SaleNotFound(AgentError):
    """No stored sale has this id (for this till)."""


class Refused(AgentError):
    """The sale is not in a state the command may change; nothing was changed."""


KRA_RETRYABLE = ("queued", "retry", "unknown")
KRA_HELD = ("in_flight", "retry", "unknown")  # KRA may hold the request: only the lane settles these

_WHY_NOT_RETRY_KRA = {
    "in_flight": "it is in flight: the lane is waiting for KRA's answer and settles it by itself",
    "signed": "KRA has signed it: nothing to retry",
    "parked": "it is parked (KRA refused it, or a technician set it aside): use `etims-agent outbox requeue` "
              "once the cause is fixed",
    "void": "it is void: nothing to retry",
}
_WHY_NOT_RETRY_TSMS = {
    "pending": "it waits for the next submission; the lane sends it by itself",
    "batched": "its submission is being sent; the lane resends the same submission by itself",
    "synced": "head office holds it: nothing to retry",
}


@dataclass(frozen=True, slots=True)
class SaleLine:
    """One line of `outbox list`."""

    id: int
    till_id: str
    sale_id: str
    kind: str
    total: Decimal
    receipt_no: int
    accepted_at: datetime
    kra_state: str
    kra_invc_no: int | None
    kra_error: str | None
    tsms_state: str
    tsms_error: str | None  # the last error of the sale's submission, if any

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "till_id": self.till_id, "sale_id": self.sale_id, "kind": self.kind,
                "total": str(self.total), "receipt_no": self.receipt_no,
                "accepted_at": self.accepted_at.isoformat(), "kra_state": self.kra_state,
                "kra_invc_no": self.kra_invc_no, "kra_error": self.kra_error, "tsms_state": self.tsms_state,
                "tsms_error": self.tsms_error}


@dataclass(frozen=True, slots=True)
class Moved:
    """What a retry or requeue changed."""

    sale_ref: int
    till_id: str
    sale_id: str
    kra_from: str | None = None  # the KRA state it left (retry: the state it kept, now due)
    kra_due_was: str | None = None  # retry: when the lane meant to try it next, before
    dropped_invc_no: int | None = None  # requeue: the KRA invoice number a parked sale still held
    kra_error_was: str | None = None  # requeue: why it was parked
    ahead: int = 0  # sales before it in the KRA lane (the lane never overtakes them)
    tsms_moved: bool = False  # TSMS rejected -> pending (journalled as requeued)
    tsms_submission: str | None = None  # the rejected submission it left (None for a credit note's void)
    notes: tuple[str, ...] = ()  # why the other lane was left alone


def open_outbox(path: Path, *, write: bool) -> Outbox:
    """The outbox for a technician's command; never creates one (exit 4 if there is none)."""
    if not path.exists():
        raise StorageError(f"no outbox at {path}; check data_dir, or start the agent once to create it")
    return Outbox.open(path, readonly=not write)


def find_sale(outbox: Outbox, sale_id: str, till_id: str | None) -> SaleRecord:
    """The one stored sale with this id; SaleNotFound, or ConfigError naming the tills if several used it."""
    if till_id is not None:
        record = outbox.get(till_id, sale_id)
        if record is None:
            others = sorted({r.till_id for r in outbox.find(sale_id)})
            hint = f"; it exists for till(s) {', '.join(others)}" if others else ""
            raise SaleNotFound(f"no sale {sale_id!r} from till {till_id!r}{hint}; check the ids with "
                               "`etims-agent outbox list`")
        return record
    records = outbox.find(sale_id)
    if not records:
        raise SaleNotFound(f"no sale {sale_id!r} is stored; check the id with `etims-agent outbox list`")
    if len(records) > 1:
        tills = ", ".join(r.till_id for r in records)
        raise ConfigError("SALE_ID", f"{len(records)} tills used the sale id {sale_id!r} ({tills})",
                          "give --till-id to choose one")
    return records[0]


class OutboxAdmin:
    def __init__(self, outbox: Outbox) -> None:
        self._box = outbox

    # --- reads ------------------------------------------------------------------------------

    def list_sales(self, *, kra_state: str | None = None, tsms_state: str | None = None,
                   till_id: str | None = None, limit: int = 50, newest_first: bool = True) -> list[SaleLine]:
        if kra_state is not None and kra_state not in KRA_STATES:
            raise ConfigError("--kra", f"{kra_state!r} is not a KRA lane state", f"use one of {', '.join(KRA_STATES)}")
        if tsms_state is not None and tsms_state not in TSMS_STATES:
            raise ConfigError("--tsms", f"{tsms_state!r} is not a TSMS lane state",
                              f"use one of {', '.join(TSMS_STATES)}")
        if limit < 1:
            raise ConfigError("--limit", f"{limit} is not a number of sales", "give 1 or more")
        where, args = [], []
        for column, value in (("s.kra_state", kra_state), ("s.tsms_state", tsms_state), ("s.till_id", till_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        # The backlog indexes are partial: SQLite uses one only when the query repeats its WHERE term,
        # and a rare state (parked, rejected) in a years-old outbox is then a search, not a scan.
        if kra_state not in (None, "signed"):
            where.append("s.kra_state != 'signed'")
        if tsms_state not in (None, "synced"):
            where.append("s.tsms_state != 'synced'")
        sql = ("SELECT s.id, s.till_id, s.sale_id, s.kind, s.total, s.receipt_no, s.accepted_at, s.kra_state, "
               "s.kra_invc_no, s.kra_error, s.tsms_state, t.last_error "
               "FROM sales s LEFT JOIN tsms_submissions t ON t.uuid = s.tsms_submission"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY s.id {'DESC' if newest_first else 'ASC'} LIMIT ?")
        with self._box._read() as conn:
            rows = conn.execute(sql, (*args, limit)).fetchall()
        return [SaleLine(id=r[0], till_id=r[1], sale_id=r[2], kind=r[3], total=Decimal(r[4]), receipt_no=r[5],
                         accepted_at=datetime.fromisoformat(r[6]), kra_state=r[7], kra_invc_no=r[8],
                         kra_error=r[9], tsms_state=r[10], tsms_error=r[11]) for r in rows]

    def details(self, sale_ref: int) -> dict[str, Any]:
        """Everything stored about one sale, as plain JSON values (one consistent read)."""
        with self._box._read() as conn:
            conn.execute("BEGIN")  # one snapshot for every read below
            try:
                return self._details(conn, sale_ref)
            finally:
                conn.execute("COMMIT")

    def _details(self, conn: sqlite3.Connection, sale_ref: int) -> dict[str, Any]:
        row = conn.execute(
            "SELECT id, till_id, sale_id, kind, receipt_no, accepted_at, total, content_hash, sale, amounts, "
            "original_id, refund_reason, kra_state, kra_invc_no, "
            "(SELECT body FROM outgoing WHERE sale_ref = sales.id AND lane = 'kra'), kra_attempts, "
            "kra_next_attempt_at, kra_error, kra_signature, kra_signed_at, tsms_state, tsms_id, "
            "(SELECT body FROM outgoing WHERE sale_ref = sales.id AND lane = 'tsms'), tsms_submission, "
            "tsms_synced_at FROM sales WHERE id = ?", (sale_ref,)).fetchone()
        if row is None:
            raise SaleNotFound(f"sale {sale_ref} is not stored")
        (id_, till_id, sale_id, kind, receipt_no, accepted_at, total, content_hash, sale, amounts, original_id,
         refund_reason, kra_state, invc_no, request, attempts, next_at, kra_error, signature, signed_at,
         tsms_state, tsms_id, transaction, submission_uuid, synced_at) = row
        ahead = None
        if kra_state in PENDING_STATES:
            ahead = _ahead(conn, id_)
        submission = None
        if submission_uuid is not None:
            sub = conn.execute("SELECT uuid, state, sales, attempts, last_status, last_error, created_at, updated_at "
                               "FROM tsms_submissions WHERE uuid = ?", (submission_uuid,)).fetchone()
            submission = {"uuid": submission_uuid} if sub is None else dict(zip(
                ("uuid", "state", "sales", "attempts", "last_status", "last_error", "created_at", "updated_at"),
                sub, strict=True))
        prints = [{"kind": k, "prints": n, "first_at": at} for k, n, at in conn.execute(
            "SELECT kind, prints, first_at FROM receipt_prints WHERE sale_ref = ? ORDER BY first_at", (id_,))]
        original = None
        if original_id is not None:
            o = conn.execute("SELECT till_id, sale_id, kra_state, kra_invc_no FROM sales WHERE id = ?",
                             (original_id,)).fetchone()
            original = {"id": original_id, **({} if o is None else {
                "till_id": o[0], "sale_id": o[1], "kra_state": o[2], "kra_invc_no": o[3]})}
        notes = [{"id": n[0], "sale_id": n[1], "kra_state": n[2], "tsms_state": n[3]} for n in conn.execute(
            "SELECT id, sale_id, kra_state, tsms_state FROM sales WHERE original_id = ? ORDER BY id", (id_,))]
        # The sale's own entries, and the head office's answers to its current submission (those
        # name the submission, not the sale).
        journal = [{"seq": seq, "at": at, "event": event, "detail": json.loads(detail), "hash": digest}
                   for seq, at, event, detail, digest in conn.execute(
                       "SELECT seq, at, event, detail, hash FROM journal WHERE sale_ref = ? "
                       "UNION ALL SELECT seq, at, event, detail, hash FROM journal WHERE sale_ref IS NULL "
                       "AND ? IS NOT NULL AND event IN ('tsms_synced', 'tsms_rejected') "
                       "AND json_extract(detail, '$.submission_uuid') = ? ORDER BY seq",
                       (id_, submission_uuid, submission_uuid))]
        return {
            "id": id_, "till_id": till_id, "sale_id": sale_id, "kind": kind, "receipt_no": receipt_no,
            "accepted_at": accepted_at, "total": total, "content_hash": content_hash,
            "original": original, "refund_reason": refund_reason, "credit_notes": notes,
            "sale": json.loads(sale), "amounts": json.loads(amounts),
            "kra": {"state": kra_state, "invc_no": invc_no, "attempts": attempts, "next_attempt_at": next_at,
                    "sales_ahead": ahead, "error": kra_error,
                    "signature": None if signature is None else json.loads(signature), "signed_at": signed_at,
                    "request": _json_or_text(request)},
            "tsms": {"state": tsms_state, "transaction_id": tsms_id, "synced_at": synced_at,
                     "submission": submission, "transaction": _json_or_text(transaction)},
            "receipt_prints": prints,
            "journal": journal,
        }

    # --- changes ----------------------------------------------------------------------------

    def retry(self, sale_ref: int, now: datetime) -> Moved:
        """KRA queued/retry/unknown: due now. TSMS rejected: back to pending, out of its submission."""
        at = timestamp(now)
        with self._box._write() as conn:
            row = _states(conn, sale_ref)
            kra_state, next_at, tsms_state = row["kra_state"], row["kra_next_attempt_at"], row["tsms_state"]
            if kra_state not in KRA_RETRYABLE and tsms_state != "rejected":
                raise Refused(f"nothing to retry for {_name(row)}: KRA: "
                              f"{_WHY_NOT_RETRY_KRA.get(kra_state, kra_state)}; TSMS: "
                              f"{_WHY_NOT_RETRY_TSMS.get(tsms_state, tsms_state)}. Nothing was changed")
            moved = Moved(sale_ref, row["till_id"], row["sale_id"])
            notes: list[str] = []
            if kra_state in KRA_RETRYABLE:
                conn.execute("UPDATE sales SET kra_next_attempt_at = ? WHERE id = ?", (at, sale_ref))
                ahead = _ahead(conn, sale_ref)
                moved = replace(moved, kra_from=kra_state, kra_due_was=next_at, ahead=ahead)
            else:
                notes.append(f"KRA: {_WHY_NOT_RETRY_KRA.get(kra_state, kra_state)}")
            if tsms_state == "rejected":
                uuid = self._tsms_back_to_pending(conn, row, at, "retry", None)
                moved = replace(moved, tsms_moved=True, tsms_submission=uuid)
            else:
                notes.append(f"TSMS: {_WHY_NOT_RETRY_TSMS.get(tsms_state, tsms_state)}")
        return replace(moved, notes=tuple(notes))

    def park(self, sale_ref: int, reason: str, now: datetime) -> None:
        """Set a queued sale aside, before the lane gives it a number. Never one KRA may hold."""
        reason = reason.strip()
        if not reason:
            raise ConfigError("--reason", "is empty", "say why the sale is set aside; it goes in the journal")
        at = timestamp(now)
        with self._box._write() as conn:
            row = _states(conn, sale_ref)
            state = row["kra_state"]
            if state in KRA_HELD:
                raise Refused(
                    f"{_name(row)} is {state} on the KRA lane (invoice {row['kra_invc_no']}): KRA may already hold "
                    "it, so only the lane may settle it (it asks KRA before any resend); parking it could set "
                    "aside a sale KRA has signed. Use `etims-agent outbox retry` to hurry it. Nothing was changed")
            if state != "queued":
                why = {"signed": "KRA has signed it; a signed sale is corrected with a credit note",
                       "parked": "it is already parked"}.get(state, f"it is {state}")
                raise Refused(f"cannot park {_name(row)}: {why}; only a queued sale (no KRA invoice number yet) "
                              "can be parked. Nothing was changed")
            conn.execute("UPDATE sales SET kra_state = 'parked', kra_error = ?, kra_next_attempt_at = NULL "
                         "WHERE id = ? AND kra_state = 'queued'", (f"operator: {reason}", sale_ref))
            self._box._journal(conn, at, "parked", sale_ref, {
                "code": "operator", "message": reason, "invc_no": None, "released": False, "operator": True,
            })

    def requeue(self, sale_ref: int, reason: str | None, now: datetime) -> Moved:
        """KRA parked -> queued (no number: the lane gives it the next); TSMS rejected -> pending."""
        at = timestamp(now)
        reason = (reason or "").strip() or None
        with self._box._write() as conn:
            row = _states(conn, sale_ref)
            kra_state, tsms_state = row["kra_state"], row["tsms_state"]
            if kra_state != "parked" and tsms_state != "rejected":
                raise Refused(f"nothing to requeue for {_name(row)}: it is {kra_state} on the KRA lane (only a parked "
                              f"sale goes back to queued) and {tsms_state} on the TSMS lane (only a rejected sale "
                              "goes back to pending). Nothing was changed")
            moved = Moved(sale_ref, row["till_id"], row["sale_id"])
            notes: list[str] = []
            if kra_state == "parked":
                # A later sale that holds an invoice number KRA has not settled yet must be settled
                # first: this sale would take a higher number from the counter, and a strict KRA
                # would then ask for the unsettled number, which that sale holds.
                later = conn.execute(
                    "SELECT id, sale_id, kra_state, kra_invc_no FROM sales WHERE id > ? AND "
                    f"{kra_pending()} AND kra_state != 'queued' ORDER BY id LIMIT 1", (sale_ref,)).fetchone()
                if later is not None:
                    raise Refused(
                        f"cannot requeue {_name(row)} yet: the later sale {later[1]!r} (id {later[0]}) holds KRA "
                        f"invoice {later[3]} and is {later[2]}; requeue once the lane has settled it "
                        "(see `etims-agent outbox list --kra " + later[2] + "`). Nothing was changed")
                dropped = row["kra_invc_no"]
                conn.execute("UPDATE sales SET kra_state = 'queued', kra_invc_no = NULL, "
                             "kra_error = NULL, kra_attempts = 0, kra_next_attempt_at = NULL "
                             "WHERE id = ? AND kra_state = 'parked'", (sale_ref,))
                conn.execute("DELETE FROM outgoing WHERE sale_ref = ? AND lane = 'kra'", (sale_ref,))
                ahead = _ahead(conn, sale_ref)
                self._box._journal(conn, at, "requeued", sale_ref, {
                    "lane": "kra", "from": "parked", "to": "queued", "error": row["kra_error"],
                    "invc_no": dropped, "reason": reason, "operator": True,
                })
                moved = replace(moved, kra_from="parked", dropped_invc_no=dropped, ahead=ahead,
                                kra_error_was=row["kra_error"])
            else:
                notes.append(f"KRA: it is {kra_state}, not parked; left as it is")
            if tsms_state == "rejected":
                uuid = self._tsms_back_to_pending(conn, row, at, "requeue", reason)
                moved = replace(moved, tsms_moved=True, tsms_submission=uuid)
            else:
                notes.append(f"TSMS: it is {tsms_state}, not rejected; left as it is")
        return replace(moved, notes=tuple(notes))

    def _tsms_back_to_pending(self, conn: sqlite3.Connection, row: dict[str, Any], at: str, command: str,
                              reason: str | None) -> str | None:
        """Out of its rejected submission: it travels again in a new one (a new uuid); journalled."""
        sale_ref: int = row["id"]
        uuid: str | None = row["tsms_submission"]
        conn.execute("UPDATE sales SET tsms_state = 'pending', tsms_submission = NULL, tsms_synced_at = NULL "
                     "WHERE id = ? AND tsms_state = 'rejected'", (sale_ref,))
        error = None
        if uuid is not None:
            found = conn.execute("SELECT last_status, last_error FROM tsms_submissions WHERE uuid = ?",
                                 (uuid,)).fetchone()
            if found is not None:
                error = f"{found[0]}: {found[1]}"[:500]
        self._box._journal(conn, at, "requeued", sale_ref, {
            "lane": "tsms", "from": "rejected", "to": "pending", "submission_uuid": uuid, "error": error,
            "reason": reason, "command": command, "operator": True,
        })
        return uuid


def _states(conn: sqlite3.Connection, sale_ref: int) -> dict[str, Any]:
    """The sale's lane states, read inside the write transaction that may change them."""
    cols = ("id", "till_id", "sale_id", "kra_state", "kra_invc_no", "kra_error", "kra_next_attempt_at", "tsms_state",
            "tsms_submission")
    row = conn.execute(f"SELECT {', '.join(cols)} FROM sales WHERE id = ?", (sale_ref,)).fetchone()
    if row is None:
        raise SaleNotFound(f"sale {sale_ref} is not stored")
    return dict(zip(cols, row, strict=True))


def _name(row: dict[str, Any]) -> str:
    return f"{row['till_id']}/{row['sale_id']}"


def _json_or_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _ahead(conn: sqlite3.Connection, sale_ref: int) -> int:
    """Sales ahead of this one in the KRA lane (it takes the lowest id first)."""
    count: int = conn.execute(f"SELECT count(*) FROM sales WHERE {kra_pending()} AND id < ?",
                              (sale_ref,)).fetchone()[0]
    return count
