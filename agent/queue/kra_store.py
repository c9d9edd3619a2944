"""The KRA lane's side of the outbox: moving a sale through its states, one transaction each.

Every transition that matters to KRA's sequence (a number allocated, a signature stored, a number
handed back) is journalled in the same transaction that makes it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from agent.queue import recovery
from agent.queue.outbox import Outbox, timestamp
from agent.queue.schema import kra_pending
from agent.signing import PENDING_STATES, KraWork, Signed

_WORK_COLUMNS = (
    "s.id, s.till_id, s.sale_id, s.kind, s.kra_state, s.kra_invc_no, k.body, s.kra_attempts, "
    "s.kra_next_attempt_at, s.sale, s.amounts, o.kra_invc_no, s.refund_reason"
)


def _work(row: tuple[Any, ...]) -> KraWork:
    (id_, till_id, sale_id, kind, state, invc_no, request, attempts, next_at, sale, amounts,
     original_invc_no, refund_reason) = row
    return KraWork(id=id_, till_id=till_id, sale_id=sale_id, kind=kind, state=state, invc_no=invc_no,
                   request=request, attempts=attempts,
                   next_attempt_at=None if next_at is None else datetime.fromisoformat(next_at),
                   sale=json.loads(sale), amounts=json.loads(amounts),
                   original_invc_no=original_invc_no, refund_reason=refund_reason)


class _NotReady(Exception):
    pass


def _held_back(conn: sqlite3.Connection, items: Sequence[str]) -> bool:
    """Whether a sale must not be numbered yet although it is queued (see KraStore.allocate)."""
    codes = sorted(set(items))
    marks = ", ".join("?" * len(codes))
    blocked: int = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM counters WHERE name = ?) "
        f"OR (SELECT count(*) FROM kra_items WHERE item_code IN ({marks})) < ?",
        (recovery.UNVERIFIED, *codes, len(codes)),
    ).fetchone()[0]
    return blocked == 1


def _keep_request(conn: sqlite3.Connection, sale_ref: int, request: str) -> None:
    """The exact request, kept until KRA has signed the sale: a resend sends these bytes again."""
    conn.execute("INSERT INTO outgoing (sale_ref, lane, body) VALUES (?, 'kra', ?) "
                 "ON CONFLICT (sale_ref, lane) DO UPDATE SET body = excluded.body", (sale_ref, request))


class KraStore:
    def __init__(self, outbox: Outbox) -> None:
        self._box = outbox

    # --- the lane ---------------------------------------------------------------------------

    def recover(self, now: datetime) -> int:
        """After a restart, a sale that was in flight may or may not have reached KRA: unknown."""
        with self._box._write() as conn:
            return conn.execute(
                "UPDATE sales SET kra_state = 'unknown', kra_next_attempt_at = ? WHERE kra_state = 'in_flight'",
                (timestamp(now),),
            ).rowcount

    def numbering_unverified(self) -> bool:
        return recovery.numbering_unverified(self._box)

    def invoice_counter(self) -> int:
        return recovery.invoice_counter(self._box)

    def numbering_learned(self, last_held: int, probes: int, now: datetime) -> int:
        return recovery.numbering_learned(self._box, last_held, probes, now)

    def next_work(self, *, skip: int | None = None) -> KraWork | None:
        """The oldest sale not yet signed or parked: the lane never overtakes it. `skip`: the sale
        KRA has just signed, its signature not stored yet: the sale behind it is wanted."""
        with self._box._read() as conn:
            row = conn.execute(
                f"SELECT {_WORK_COLUMNS} FROM sales s LEFT JOIN sales o ON o.id = s.original_id "
                "LEFT JOIN outgoing k ON k.sale_ref = s.id AND k.lane = 'kra' "
                f"WHERE {kra_pending('s')} AND s.id != ? ORDER BY s.id LIMIT 1", (skip or 0,)
            ).fetchone()
        return None if row is None else _work(row)

    def backlog(self) -> int:
        """Sales waiting for KRA. Read on every sale a till posts (is it worth waiting for KRA?), so
        from the per-state counts the triggers keep (m005), not by counting the backlog's rows."""
        with self._box._read() as conn:
            marks = ", ".join("?" * len(PENDING_STATES))
            count: int = conn.execute(f"SELECT coalesce(sum(sales), 0) FROM state_counts WHERE lane = 'kra' "
                                      f"AND state IN ({marks})", PENDING_STATES).fetchone()[0]
        return count

    def allocate(self, sale_ref: int, build: Callable[[int], str], now: datetime, *, items: Sequence[str],
                 after: Signed | None = None) -> tuple[int, str] | None:
        """Give the sale the next invoice number and store the exact request, before any send.

        `after`: the signature KRA has just given the sale before it, stored in the same transaction,
        so that the two take one commit and one fsync instead of two commits.

        None (and nothing changed, the number handed back; `after` stored on its own) if the sale may
        not be numbered now, checked here under the write lock whatever the lane read before: it is no
        longer queued (a technician parked it), KRA's numbering must be learned first, or KRA lacks one
        of its `items`."""
        at = timestamp(now)
        try:
            with self._box._write() as conn:
                if after is not None:
                    self._store_signature(conn, after, at)
                invc_no = conn.execute(
                    "UPDATE counters SET value = value + 1 WHERE name = 'invc_no' RETURNING value"
                ).fetchone()[0]
                moved = conn.execute(
                    "UPDATE sales SET kra_state = 'in_flight', kra_invc_no = ?, "
                    "kra_next_attempt_at = NULL, kra_error = NULL WHERE id = ? AND kra_state = 'queued'",
                    (invc_no, sale_ref),
                ).rowcount
                if moved != 1 or _held_back(conn, items):
                    raise _NotReady  # rolls the counter back with everything else
                request = build(invc_no)
                _keep_request(conn, sale_ref, request)
                self._box._journal(conn, at, "sent", sale_ref, {
                    "invc_no": invc_no, "request_sha256": hashlib.sha256(request.encode()).hexdigest(),
                })
        except _NotReady:
            if after is not None:
                self.signed(after.sale_ref, after.signature, now, adopted=after.adopted)
            return None
        return invc_no, request

    def renumber(self, sale_ref: int, invc_no: int, build: Callable[[int], str], now: datetime) -> str:
        """KRA wants another number for a request it never accepted: take it, keep the counter there."""
        at = timestamp(now)
        with self._box._write() as conn:
            old = conn.execute("SELECT kra_invc_no FROM sales WHERE id = ?", (sale_ref,)).fetchone()[0]
            request = build(invc_no)
            conn.execute("UPDATE counters SET value = ? WHERE name = 'invc_no'", (invc_no,))
            conn.execute("UPDATE sales SET kra_state = 'in_flight', kra_invc_no = ? WHERE id = ?", (invc_no, sale_ref))
            _keep_request(conn, sale_ref, request)
            self._box._journal(conn, at, "renumbered", sale_ref, {"from": old, "to": invc_no})
        return request

    def mark_sending(self, sale_ref: int) -> None:
        with self._box._write() as conn:
            conn.execute("UPDATE sales SET kra_state = 'in_flight' WHERE id = ? AND kra_state IN ('retry', 'unknown')",
                         (sale_ref,))

    def signed(self, sale_ref: int, signature: dict[str, Any], now: datetime, *, adopted: bool) -> None:
        """Store KRA's signature. Without an fsync of its own: the next commit (the next sale's invoice
        number, or any sale accepted) carries it to the disk. A power cut before then leaves the sale
        in flight with its number, and after the restart the lane asks KRA and adopts the same
        signature; it is never signed again. That saves one of the two fsyncs per signed sale."""
        with self._box._write(flush=False) as conn:
            self._store_signature(conn, Signed(sale_ref, signature, adopted), timestamp(now))

    def _store_signature(self, conn: sqlite3.Connection, done: Signed, at: str) -> None:
        invc_no = conn.execute(
            "UPDATE sales SET kra_state = 'signed', kra_signature = ?, kra_signed_at = ?, kra_error = NULL, "
            "kra_next_attempt_at = NULL WHERE id = ? RETURNING kra_invc_no",
            (json.dumps(done.signature, sort_keys=True), at, done.sale_ref),
        ).fetchone()[0]
        # KRA holds the sale now; the request's SHA-256 stays in the journal's `sent` entry.
        conn.execute("DELETE FROM outgoing WHERE sale_ref = ? AND lane = 'kra'", (done.sale_ref,))
        self._box._journal(conn, at, "signed", done.sale_ref, {
            "invc_no": invc_no, "rcpt_sign": done.signature.get("rcptSign"),
            "sdc_date_time": done.signature.get("sdcDateTime"), "adopted": done.adopted,
        })

    def defer(self, sale_ref: int, state: str, next_attempt_at: datetime, error: str) -> None:
        """Try again later (retry: resend as is; unknown: ask KRA first). Not a fiscal event."""
        with self._box._write() as conn:
            conn.execute(
                "UPDATE sales SET kra_state = ?, kra_next_attempt_at = ?, kra_error = ?, "
                "kra_attempts = kra_attempts + 1 WHERE id = ?",
                (state, timestamp(next_attempt_at), error, sale_ref),
            )

    def park(self, sale_ref: int, code: str, message: str, now: datetime, *, release: bool) -> None:
        """KRA refused the sale for good: hand its number back (if unused) and set it aside."""
        at = timestamp(now)
        with self._box._write() as conn:
            invc_no = conn.execute("SELECT kra_invc_no FROM sales WHERE id = ?", (sale_ref,)).fetchone()[0]
            released = False
            if release and invc_no is not None:
                # Only the newest number can go back; the lane sends one sale at a time, so it is.
                released = conn.execute(
                    "UPDATE counters SET value = value - 1 WHERE name = 'invc_no' AND value = ?", (invc_no,)
                ).rowcount == 1
            conn.execute(
                "UPDATE sales SET kra_state = 'parked', kra_error = ?, kra_invc_no = ?, "
                "kra_next_attempt_at = NULL WHERE id = ?",
                (f"{code}: {message}", None if released else invc_no, sale_ref),
            )
            self._box._journal(conn, at, "parked", sale_ref, {
                "code": code, "message": message, "invc_no": invc_no, "released": released,
            })

    # --- device identity, items, code lists ----------------------------------------------------

    def device(self) -> dict[str, Any] | None:
        with self._box._read() as conn:
            row = conn.execute("SELECT tin, bhf_id, serial, sdc_id, mrc_no, info FROM kra_device").fetchone()
        if row is None:
            return None
        tin, bhf_id, serial, sdc_id, mrc_no, info = row
        return {"tin": tin, "bhf_id": bhf_id, "serial": serial, "sdc_id": sdc_id, "mrc_no": mrc_no,
                "info": json.loads(info)}

    def save_device(self, *, tin: str, bhf_id: str, serial: str, sdc_id: str, mrc_no: str | None,
                    info: dict[str, Any], now: datetime) -> None:
        at = timestamp(now)
        with self._box._write() as conn:
            conn.execute(
                "INSERT INTO kra_device (id, tin, bhf_id, serial, sdc_id, mrc_no, info, initialised_at) "
                "VALUES (1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET tin = excluded.tin, "
                "bhf_id = excluded.bhf_id, serial = excluded.serial, sdc_id = excluded.sdc_id, "
                "mrc_no = excluded.mrc_no, info = excluded.info, initialised_at = excluded.initialised_at",
                (tin, bhf_id, serial, sdc_id, mrc_no, json.dumps(info, sort_keys=True), at),
            )
            self._box._journal(conn, at, "device_initialised", None,
                               {"tin": tin, "bhf_id": bhf_id, "serial": serial, "sdc_id": sdc_id})

    def registered_items(self, codes: list[str]) -> set[str]:
        """Which of these item codes KRA already has (saveItem done); asks only about these."""
        with self._box._read() as conn:
            marks = ", ".join("?" * len(codes))
            return {r[0] for r in conn.execute(f"SELECT item_code FROM kra_items WHERE item_code IN ({marks})",
                                               codes)}

    def forget_items(self) -> None:
        """Every item will be registered again before its next sale (KRA's side was reset)."""
        with self._box._write() as conn:
            conn.execute("DELETE FROM kra_items")

    def item_registered(self, item_code: str, request: str, now: datetime) -> None:
        with self._box._write() as conn:
            conn.execute("INSERT OR REPLACE INTO kra_items (item_code, request, registered_at) VALUES (?, ?, ?)",
                         (item_code, request, timestamp(now)))

    def code_list(self, name: str) -> tuple[Any, datetime] | None:
        with self._box._read() as conn:
            row = conn.execute("SELECT data, fetched_at FROM kra_code_lists WHERE name = ?", (name,)).fetchone()
        return None if row is None else (json.loads(row[0]), datetime.fromisoformat(row[1]))

    def save_code_list(self, name: str, data: Any, now: datetime) -> None:
        with self._box._write() as conn:
            conn.execute("INSERT OR REPLACE INTO kra_code_lists (name, data, fetched_at) VALUES (?, ?, ?)",
                         (name, json.dumps(data, sort_keys=True), timestamp(now)))
