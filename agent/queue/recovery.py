"""A damaged outbox at start-up: set it aside, keep selling on a fresh one, rescue its rows later.

The damaged file (with its write-ahead log, which may hold the newest committed sales) is moved to
`quarantine/` untouched, so nothing is lost and its SHA-256 is journalled. A fresh outbox takes
what can be read cheaply (the counters, the device's identity, the items KRA knows) so the shop
keeps selling at once. Its invoice numbering is marked unverified: before the first new invoice the
KRA lane asks KRA which numbers it holds (see `KraLane`), because a number the damaged file knew
about must never be used twice.

`rescue` later copies every readable sale from the quarantined file into the live outbox, one row
at a time so one damaged page costs only the rows on it. A sale KRA may hold under its old number
keeps that number only when KRA is known to have used it; any other unsigned sale is queued again
without a number and signed in turn. Nothing here talks to the network.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.errors import AgentError, OutboxDamaged, StorageError
from agent.files import fsync_dir, sha256_of
from agent.queue.outbox import Outbox, timestamp

QUARANTINE_DIR = "quarantine"
UNVERIFIED = "invc_no_unverified"  # counters row: present while KRA's numbering is not yet known
LEARNED = "invc_no_learned"  # counters row: the last invoice number KRA held when last asked


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a fresh outbox takes over from a damaged one, read without trusting it."""

    receipt_no: int = 0
    invc_no: int = 0
    device: dict[str, Any] | None = None
    items: tuple[tuple[str, str, str], ...] = ()
    unreadable: tuple[str, ...] = ()  # what could not be read, for the journal and the log


@dataclass(frozen=True, slots=True)
class Quarantined:
    path: Path
    sha256: str
    reason: str
    salvage: Salvage


def open_or_quarantine(path: Path, now: datetime) -> tuple[Outbox, Quarantined | None]:
    """Open the outbox; if it is damaged, quarantine it and open a fresh one seeded from it."""
    try:
        return Outbox.open(path), None
    except OutboxDamaged as exc:
        reason = str(exc)
    moved = quarantine(path, now)
    salvage = salvage_from(moved)
    outbox = Outbox.open(path)
    try:
        digest = sha256_of(moved)
        _seed(outbox, moved, digest, reason, salvage, now)
    except BaseException:
        outbox.close()
        raise
    return outbox, Quarantined(path=moved, sha256=digest, reason=reason, salvage=salvage)


def quarantine(path: Path, now: datetime) -> Path:
    """Move the outbox and its -wal/-shm files to quarantine/, renamed together so SQLite still pairs them."""
    folder = path.parent / QUARANTINE_DIR
    try:
        folder.mkdir(exist_ok=True)
        stem = f"{path.stem}-{now.strftime('%Y%m%dT%H%M%SZ')}"
        target = folder / f"{stem}{path.suffix}"
        n = 1
        while target.exists():
            n += 1
            target = folder / f"{stem}-{n}{path.suffix}"
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{target}{suffix}"))
        for directory in (folder, path.parent):
            fsync_dir(directory)
    except OSError as exc:
        raise StorageError(f"the outbox {path} is damaged and could not be moved to {folder} ({exc.strerror}); "
                           "free disk space or fix the folder's permissions, then start the agent again") from exc
    return target


def _open_damaged(path: Path) -> sqlite3.Connection:
    # Read-only: the quarantined file stays byte for byte what was found (its SHA-256 is journalled).
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def _try(conn: sqlite3.Connection, sql: str, what: str, missing: list[str]) -> list[sqlite3.Row]:
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.Error as exc:
        missing.append(f"{what}: {exc}")
        return []


def salvage_from(path: Path) -> Salvage:
    """The counters, device and items of a damaged outbox, each read on its own; what fails is noted."""
    missing: list[str] = []
    try:
        conn = _open_damaged(path)
    except sqlite3.Error as exc:
        return Salvage(unreadable=(f"file: {exc}",))
    try:
        counters = {r[0]: r[1] for r in _try(conn, "SELECT name, value FROM counters", "counters", missing)}
        maxima = _try(conn, "SELECT MAX(receipt_no), MAX(kra_invc_no) FROM sales", "sales", missing)
        top_receipt, top_invc = (maxima[0][0], maxima[0][1]) if maxima else (None, None)
        device_rows = _try(conn, "SELECT tin, bhf_id, serial, sdc_id, mrc_no, info FROM kra_device",
                           "kra_device", missing)
        items = _try(conn, "SELECT item_code, request, registered_at FROM kra_items", "kra_items", missing)
    finally:
        conn.close()
    device = None
    if device_rows:
        r = device_rows[0]
        device = {"tin": r[0], "bhf_id": r[1], "serial": r[2], "sdc_id": r[3], "mrc_no": r[4], "info": r[5]}
    return Salvage(
        receipt_no=max(int(counters.get("receipt_no") or 0), int(top_receipt or 0)),
        invc_no=max(int(counters.get("invc_no") or 0), int(top_invc or 0)),
        device=device, items=tuple((r[0], r[1], r[2]) for r in items), unreadable=tuple(missing))


def _seed(outbox: Outbox, moved: Path, digest: str, reason: str, salvage: Salvage, now: datetime) -> None:
    at = timestamp(now)
    with outbox._write() as conn:
        conn.execute("UPDATE counters SET value = ? WHERE name = 'receipt_no'", (salvage.receipt_no,))
        conn.execute("UPDATE counters SET value = ? WHERE name = 'invc_no'", (salvage.invc_no,))
        conn.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, 1)", (UNVERIFIED,))
        if salvage.device is not None:
            d = salvage.device
            conn.execute("INSERT INTO kra_device (id, tin, bhf_id, serial, sdc_id, mrc_no, info, initialised_at) "
                         "VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                         (d["tin"], d["bhf_id"], d["serial"], d["sdc_id"], d["mrc_no"], d["info"], at))
        conn.executemany("INSERT OR REPLACE INTO kra_items (item_code, request, registered_at) VALUES (?, ?, ?)",
                         salvage.items)
        outbox._journal(conn, at, "quarantined", None, {
            "file": f"{QUARANTINE_DIR}/{moved.name}", "sha256": digest, "reason": reason,
            "receipt_no": salvage.receipt_no, "invc_no": salvage.invc_no, "device": salvage.device is not None,
            "items": len(salvage.items), "unreadable": list(salvage.unreadable),
        })


# --- the numbering KRA holds ------------------------------------------------------------------


def numbering_unverified(outbox: Outbox) -> bool:
    with outbox._read() as conn:
        return conn.execute("SELECT 1 FROM counters WHERE name = ?", (UNVERIFIED,)).fetchone() is not None


def distrust_numbering(outbox: Outbox, why: str, now: datetime) -> None:
    """KRA may hold invoices this outbox does not know of (a fresh outbox, an adopted key): ask first."""
    at = timestamp(now)
    with outbox._write() as conn:
        conn.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, 1)", (UNVERIFIED,))
        outbox._journal(conn, at, "numbering_unverified", None, {"why": why})


def numbering_learned(outbox: Outbox, last_held: int, probes: int, now: datetime) -> int:
    """KRA holds invoices 1..last_held: continue from there. Returns the counter it replaced."""
    at = timestamp(now)
    with outbox._write() as conn:
        was: int = conn.execute("SELECT value FROM counters WHERE name = 'invc_no'").fetchone()[0]
        conn.execute("UPDATE counters SET value = ? WHERE name = 'invc_no'", (last_held,))
        conn.execute("DELETE FROM counters WHERE name = ?", (UNVERIFIED,))
        conn.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (LEARNED, last_held))
        outbox._journal(conn, at, "numbering_learned", None, {"last_held": last_held, "counter_was": was,
                                                              "probes": probes})
    return was


def invoice_counter(outbox: Outbox) -> int:
    with outbox._read() as conn:
        value: int = conn.execute("SELECT value FROM counters WHERE name = 'invc_no'").fetchone()[0]
    return value


# --- rescue -----------------------------------------------------------------------------------


class RescueRefused(AgentError):
    """The live outbox is not ready to take rescued sales; nothing was changed."""


@dataclass
class RescueReport:
    read: int = 0
    imported: int = 0
    already_there: int = 0
    unreadable: list[int] = field(default_factory=list)  # outbox ids of the damaged file
    conflicts: list[str] = field(default_factory=list)  # sales left for a person, with why
    requeued: int = 0  # unsigned sales queued again without a number
    reconcile: int = 0  # sales KRA may hold under their old number: the lane asks KRA


_HELD = ("in_flight", "retry", "unknown")


def damaged_sales(path: Path) -> tuple[int, Iterator[tuple[int, dict[str, Any] | None]]]:
    """(highest id, each id with its row, or None where the row cannot be read)."""
    conn = _open_damaged(path)
    top = 0
    for sql in ("SELECT MAX(id) FROM sales", "SELECT seq FROM sqlite_sequence WHERE name = 'sales'",
                "SELECT value FROM counters WHERE name = 'receipt_no'"):
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.Error:
            continue
        if row is not None and row[0]:
            top = int(row[0])
            break

    def rows() -> Iterator[tuple[int, dict[str, Any] | None]]:
        try:
            for sale_ref in range(1, top + 1):
                try:
                    row = conn.execute("SELECT * FROM sales WHERE id = ?", (sale_ref,)).fetchone()
                except sqlite3.Error:
                    yield sale_ref, None
                    continue
                if row is not None:
                    yield sale_ref, {**_texts_to_send(conn, sale_ref), **dict(row)}
        finally:
            conn.close()

    return top, rows()


def _texts_to_send(conn: sqlite3.Connection, sale_ref: int) -> dict[str, str]:
    """The sale's stored KRA request and head-office transaction, as far as they can be read (an
    outbox older than migration m006 keeps them in the sales row instead, which then wins)."""
    names = {"kra": "kra_request", "tsms": "tsms_transaction"}
    try:
        return {names[lane]: body for lane, body in conn.execute(
            "SELECT lane, body FROM outgoing WHERE sale_ref = ?", (sale_ref,)) if lane in names}
    except sqlite3.Error:
        return {}


def rescue(outbox: Outbox, damaged: Path, now: datetime, *, dry_run: bool = False,
           progress: Callable[[int, int], None] | None = None) -> RescueReport:
    """Copy every readable sale of a quarantined outbox into the live one; `progress(id, highest id)`
    is called for every row tried (see the module's docstring for where each sale goes)."""
    if not damaged.exists():
        raise RescueRefused(f"no file {damaged}; give a file from the data directory's {QUARANTINE_DIR}/ folder")
    with outbox._read() as conn:
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    if UNVERIFIED in counters or LEARNED not in counters:
        raise RescueRefused(
            "the agent has not yet asked KRA which invoice numbers it holds since the outbox was replaced, so an "
            "unsigned sale's old number cannot be judged; start the agent, wait until `etims-agent status` shows "
            "the KRA lane online, then run the rescue again")
    learned = int(counters[LEARNED])
    report = RescueReport()
    try:
        top, rows = damaged_sales(damaged)
    except sqlite3.Error as exc:
        raise RescueRefused(f"{damaged} cannot be opened at all ({exc}); nothing can be rescued from it") from exc
    old_keys: dict[int, tuple[str, str]] = {}
    batch: list[dict[str, Any]] = []
    for sale_ref, row in rows:
        if progress is not None:
            progress(sale_ref, top)
        if row is None:
            report.unreadable.append(sale_ref)
            continue
        report.read += 1
        old_keys[sale_ref] = (row["till_id"], row["sale_id"])
        batch.append(row)
        if len(batch) >= 200:
            _import(outbox, batch, old_keys, learned, damaged, now, report, dry_run)
            batch = []
    _import(outbox, batch, old_keys, learned, damaged, now, report, dry_run)
    return report


def _import(outbox: Outbox, rows: list[dict[str, Any]], old_keys: dict[int, tuple[str, str]], learned: int,
            damaged: Path, now: datetime, report: RescueReport, dry_run: bool) -> None:
    if not rows:
        return
    at = timestamp(now)
    with outbox._write() as conn:
        for row in rows:
            key = (row["till_id"], row["sale_id"])
            if conn.execute("SELECT 1 FROM sales WHERE till_id = ? AND sale_id = ? UNION ALL "
                            "SELECT 1 FROM pruned_sales WHERE till_id = ? AND sale_id = ?", key + key).fetchone():
                report.already_there += 1  # the till sent it again after the outbox was replaced (and it
                continue                   # may since have been signed, synced and pruned there)
            original_id = None
            if row.get("original_id") is not None:
                original = old_keys.get(row["original_id"])
                found = original and conn.execute("SELECT id FROM sales WHERE till_id = ? AND sale_id = ?",
                                                  original).fetchone()
                if not found:
                    report.conflicts.append(f"{key[0]}/{key[1]}: a credit note whose original sale was not rescued; "
                                            "issue it again from the till once the original is there")
                    continue
                original_id = found[0]
            held = row["kra_invc_no"]
            if row["kra_state"] in _HELD and held is not None and held <= learned and not row.get("kra_request"):
                # KRA holds that number, but the request sent under it is unreadable: only KRA can say whose.
                report.conflicts.append(f"{key[0]}/{key[1]}: KRA holds invoice {held}, which this sale had taken, "
                                        "but its stored request cannot be read; ask KRA (selectInvoiceDetails) "
                                        "whose it is before issuing the sale again")
                continue
            state, invc_no, request = _kra_placement(row, learned)
            if invc_no is not None and conn.execute("SELECT 1 FROM sales WHERE kra_invc_no = ?",
                                                    (invc_no,)).fetchone():
                report.conflicts.append(f"{key[0]}/{key[1]}: invoice {invc_no} is already used by another sale in "
                                        "the live outbox; compare both with KRA before doing anything")
                continue
            report.imported += 1
            report.requeued += state == "queued" and row["kra_state"] != "queued"
            report.reconcile += state == "unknown"
            if dry_run:
                continue
            synced = row.get("tsms_state") == "synced"
            new_id = conn.execute(
                """INSERT INTO sales (till_id, sale_id, kind, content_hash, sale, amounts, payload_version, total,
                                      receipt_no, accepted_at, kra_state, kra_invc_no, kra_error,
                                      kra_signature, kra_signed_at, tsms_state, tsms_synced_at, original_id,
                                      refund_reason, tsms_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, (SELECT value + 1 FROM counters WHERE name = 'receipt_no'),
                           ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id, receipt_no""",
                (row["till_id"], row["sale_id"], row["kind"], row["content_hash"], row["sale"], row["amounts"],
                 row.get("payload_version", 1), row["total"], row["accepted_at"], state, invc_no,
                 row["kra_error"] if state == "parked" else None,
                 row["kra_signature"] if state == "signed" else None,
                 row["kra_signed_at"] if state == "signed" else None,
                 "synced" if synced else "pending", row.get("tsms_synced_at") if synced else None, original_id,
                 row.get("refund_reason"), row.get("tsms_id")),
            ).fetchone()
            texts = {"kra": request if state != "signed" else None,
                     "tsms": None if synced else row.get("tsms_transaction")}
            conn.executemany("INSERT INTO outgoing (sale_ref, lane, body) VALUES (?, ?, ?)",
                             [(new_id[0], lane, body) for lane, body in texts.items() if body is not None])
            outbox._journal(conn, at, "rescued", new_id[0], {
                "from": f"{QUARANTINE_DIR}/{damaged.name}", "old_id": row["id"], "till_id": key[0],
                "sale_id": key[1], "content_hash": row["content_hash"], "receipt_no": new_id[1],
                "receipt_no_was": row["receipt_no"], "kra_state_was": row["kra_state"], "kra_state": state,
                "invc_no": invc_no, "total": row["total"],
            })


def _kra_placement(row: dict[str, Any], learned: int) -> tuple[str, int | None, str | None]:
    """Where a rescued sale goes in the KRA lane: (state, invoice number, stored request)."""
    state, invc_no = row["kra_state"], row["kra_invc_no"]
    if state == "signed":
        return "signed", invc_no, None
    if state in ("parked", "void"):
        return state, None, None
    if state in _HELD and invc_no is not None and invc_no <= learned and row.get("kra_request"):
        # KRA holds this number for some document: the lane asks whose, and adopts or parks.
        return "unknown", invc_no, row["kra_request"]
    # KRA's numbers run without gaps up to `learned`, so it never took this one: sign it afresh.
    return "queued", None, None


def describe(report: RescueReport) -> dict[str, Any]:
    return {"read": report.read, "imported": report.imported, "already_there": report.already_there,
            "requeued_without_number": report.requeued, "to_reconcile_with_kra": report.reconcile,
            "unreadable_ids": report.unreadable, "conflicts": report.conflicts}
