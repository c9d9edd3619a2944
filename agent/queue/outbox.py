"""The outbox: the only place the program writes SQL.

One connection, guarded by a lock, opened in WAL mode with synchronous=FULL: a sale the till was
told about has been fsynced to the write-ahead log and survives a crash or a power cut. Every write
is one `BEGIN IMMEDIATE` transaction, and a fiscal event is journalled inside the transaction that
makes it happen, so the journal and the rows can never disagree. sqlite3 errors never leave this
module: they become StorageError (or SaleConflict for a reused sale id).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from agent.errors import DiskFull, OutboxDamaged, SaleConflict, SalePruned, StorageError
from agent.logs import get_logger
from agent.queue.journal import GENESIS, JournalEntry, entry_hash, verify_chain
from agent.queue.pruning import pruned_in, pruned_problems, signed_evidence
from agent.queue.schema import PRUNED_REFUSAL, kra_pending, migrations

log = get_logger("agent.outbox")

_SALE_COLUMNS = (
    "id, till_id, sale_id, kind, content_hash, sale, amounts, total, receipt_no, accepted_at, "
    "kra_state, kra_invc_no, kra_error, kra_signature, kra_signed_at, tsms_state, tsms_synced_at, "
    "original_id, refund_reason"
)


@dataclass(frozen=True, slots=True)
class NewSale:
    """A validated sale, serialised by the intake, ready to store."""

    till_id: str
    sale_id: str
    content_hash: str
    sale_json: str
    amounts_json: str
    total: Decimal
    kind: str = "sale"  # or "credit_note"
    original_id: int | None = None  # a credit note's original sale (its outbox id)
    refund_reason: str | None = None  # a credit note's reason, KRA code class 32
    # Builds the head-office transaction once the receipt number is known: (transaction id, JSON).
    head_office: Callable[[int], tuple[str, str]] | None = None


@dataclass(frozen=True, slots=True)
class SaleRecord:
    id: int
    till_id: str
    sale_id: str
    kind: str
    content_hash: str
    sale: dict[str, Any]
    amounts: dict[str, Any]
    total: Decimal
    receipt_no: int
    accepted_at: datetime
    kra_state: str
    kra_invc_no: int | None
    kra_error: str | None
    kra_signature: dict[str, Any] | None
    kra_signed_at: datetime | None
    tsms_state: str
    tsms_synced_at: datetime | None
    original_id: int | None = None
    refund_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    record: SaleRecord
    created: bool  # False: a replay of a sale already stored
    entry: tuple[str, str] | None = None  # (previous hash, hash) of its journal entry, when created


@dataclass(frozen=True, slots=True)
class OutboxStats:
    sales: int
    kra: dict[str, int]
    tsms: dict[str, int]
    oldest_unsigned_at: datetime | None
    journal_entries: int
    unsigned_value: Decimal = Decimal(0)  # the sum of the unsigned sales' totals (credit notes count too)


# SQLITE_CORRUPT and SQLITE_NOTADB: the file itself is bad (as opposed to locked, missing or unwritable).
DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def primary_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error (its extended code carries more in the upper bits)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def timestamp(now: datetime) -> str:
    """Stored times are UTC ISO 8601 with microseconds, so text order is time order."""
    return now.astimezone(UTC).isoformat(timespec="microseconds")


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Outbox:
    """The outbox on one SQLite file: a write connection, and a read connection beside it.

    Reads (status, lookups) run on their own connection, so in WAL mode they see the last
    committed state and never wait for, or hold up, a sale being committed.
    """

    def __init__(self, conn: sqlite3.Connection, reader: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._reader = reader
        self._db = Database(conn, execute_plugins=False)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self.path = path
        # The journal's last (seq, hash), cached so a sale needs no extra read; it only advances
        # once the transaction that wrote the entry has committed.
        self._head: tuple[int, str] | None = None
        self._pending_head: tuple[int, str] | None = None
        self._full = False  # the last write failed for want of disk space
        self.commits = 0  # write transactions this Outbox committed so far
        self._flushed = 0  # how many of them an fsync has carried to the disk

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Outbox:
        """Open (creating and migrating unless readonly) and check the database."""
        conns: list[sqlite3.Connection] = []
        try:
            if readonly and not path.exists():
                raise StorageError(f"no outbox at {path}; check data_dir, or start the agent once to create it")
            if not readonly:
                path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                conns.append(_connect(path, readonly))
            conn, reader = conns
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise OutboxDamaged(
                    f"the outbox {path} is damaged ({check}); the agent moves it to quarantine/ at its "
                    "next start and starts a fresh one; `etims-agent outbox rescue` recovers its readable sales"
                )
            outbox = cls(conn, reader, path)
            if not readonly:
                migrations.apply(outbox._db)
            return outbox
        except (sqlite3.Error, StorageError) as exc:
            for c in conns:
                c.close()
            if isinstance(exc, StorageError):
                raise
            if isinstance(exc, sqlite3.Error) and primary_code(exc) in DAMAGE_CODES:
                raise OutboxDamaged(f"the outbox {path} is damaged ({exc}); the agent moves it to quarantine/ "
                                    "at its next start and starts a fresh one; `etims-agent outbox rescue` "
                                    "recovers its readable sales") from exc
            raise StorageError(f"cannot open the outbox {path}: {exc}; check the disk and its permissions") from exc

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._conn.close()

    @contextmanager
    def _write(self, *, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. flush=False commits without its own fsync (synchronous=NORMAL): it
        survives a crash of the process at once and a power cut once the next commit's fsync of the
        write-ahead log has carried it too. Only for what can be learned again if a power cut loses it.
        """
        # BEGIN IMMEDIATE takes the write lock up front: a deferred BEGIN that reads first can fail
        # with SQLITE_BUSY when it upgrades, if a technician's command writes at the same moment.
        with self._lock:
            self._pending_head = None
            try:
                if not flush:
                    self._conn.execute("PRAGMA synchronous = NORMAL")
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._head = None
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                self.commits += 1
                if flush:  # the fsync of the write-ahead log carried every commit before it too
                    self._flushed = self.commits
                if self._pending_head is not None:
                    self._head = self._pending_head
                if self._full:
                    self._full = False
                    log.info("disk_space_back", path=str(self.path))
            except sqlite3.Error as exc:
                self._head = None
                self._rollback_after(exc)
                if primary_code(exc) == sqlite3.SQLITE_FULL:
                    if not self._full:  # logged when it starts and when it ends, not at every refusal
                        self._full = True
                        log.error("disk_full", path=str(self.path),
                                  hint="sales are refused (507 disk_full) until space is freed")
                    # SQLite rolled the transaction back whole: what was stored before is intact.
                    raise DiskFull(f"the disk holding {self.path} is full; nothing was stored. Free some space "
                                   "(old logs, the quarantine/ folder); the agent goes on by itself once "
                                   "there is room") from exc
                raise StorageError(f"writing to the outbox {self.path} failed: {exc}; "
                                   "check free disk space and run `etims-agent doctor`") from exc
            finally:
                if not flush:
                    self._restore_full_sync()

    def make_durable(self, commit: int) -> None:
        """Return once commit number `commit` (see `commits`) is on the disk, syncing the write-ahead
        log if no fsync has carried it yet. For a sale stored with flush=False, before its answer."""
        with self._lock:
            if self._flushed >= commit:
                return
            upto = self.commits
            try:
                # The WAL holds the commit's frames, or a checkpoint has copied them into the database,
                # which in WAL mode SQLite syncs before and after (synchronous=NORMAL).
                fd = os.open(f"{self.path}-wal", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:  # no WAL: every frame went into the database at a checkpoint
                pass
            except OSError as exc:
                raise StorageError(f"syncing the outbox {self.path} to disk failed: {exc}; "
                                   "run `etims-agent doctor`") from exc
            self._flushed = upto

    def _restore_full_sync(self) -> None:
        try:
            self._conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:  # every later sale would be committed without its fsync
            raise StorageError(f"the outbox {self.path} could not return to synchronous=FULL: {exc}; "
                               "restart the agent") from exc

    def _rollback_after(self, failure: sqlite3.Error) -> None:
        # The failure may have ended the transaction already, or the connection may be unusable;
        # the original error is the one worth reporting, so a failing rollback is not raised.
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            try:
                yield self._reader
            except sqlite3.Error as exc:
                raise StorageError(f"reading the outbox {self.path} failed: {exc}; "
                                   "run `etims-agent doctor`") from exc

    # --- intake -----------------------------------------------------------------------------

    def accept(self, new: NewSale, now: datetime) -> Accepted:
        """Store a new sale and journal it in one transaction, or return the stored replay.

        Raises SaleConflict if the till's sale id is already stored with other content, SalePruned if it
        belongs to a sale that retention removed.
        """
        at = timestamp(now)
        with self._write() as conn:
            return self._accept_in(conn, new, at)

    def accept_many(self, sales: list[tuple[NewSale, datetime]], *,
                    flush: bool = True) -> list[Accepted | Exception]:
        """Store several sales in one transaction: one fsync for all of them (a group commit).

        Each sale has its own savepoint, so one refused (a reused sale id) leaves the others alone; its
        place in the result holds the error. A failure of the transaction itself (a full disk) raises,
        and then none is stored. flush=False: see `_write`; `make_durable` before any answer.
        """
        results: list[Accepted | Exception] = []
        with self._write(flush=flush) as conn:
            for new, now in sales:
                head = self._pending_head
                conn.execute("SAVEPOINT sale")
                try:
                    results.append(self._accept_in(conn, new, timestamp(now)))
                except Exception as exc:  # sorted out below; the batch goes on
                    if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                        raise  # the database itself failed (a full disk): the whole transaction goes
                    conn.execute("ROLLBACK TO sale")
                    # The journal head cached for this entry was rolled back with it.
                    self._head, self._pending_head = None, head
                    results.append(StorageError(f"the outbox refused {new.till_id}/{new.sale_id}: {exc}")
                                   if isinstance(exc, sqlite3.Error) else exc)
                conn.execute("RELEASE sale")
        return results

    def _accept_in(self, conn: sqlite3.Connection, new: NewSale, at: str) -> Accepted:
        # Few statements on purpose: each one is a trip out of SQLite and back into Python,
        # and this runs once per sale on the till's critical path. The receipt number comes
        # from the counter, which a trigger advances in the same insert.
        try:
            inserted = conn.execute(
                """INSERT INTO sales (till_id, sale_id, content_hash, sale, amounts, total,
                                      receipt_no, accepted_at, kind, original_id, refund_reason)
                   VALUES (?, ?, ?, ?, ?, ?,
                           (SELECT value + 1 FROM counters WHERE name = 'receipt_no'), ?, ?, ?, ?)
                   ON CONFLICT (till_id, sale_id) DO NOTHING
                   RETURNING id, receipt_no""",
                (new.till_id, new.sale_id, new.content_hash, new.sale_json, new.amounts_json,
                 str(new.total), at, new.kind, new.original_id, new.refund_reason),
            ).fetchone()
        except sqlite3.IntegrityError as exc:  # the tombstone trigger (m007): checked by the insert itself
            if PRUNED_REFUSAL in str(exc):
                raise SalePruned(new.till_id, new.sale_id, PRUNED_REFUSAL) from exc
            raise
        if inserted is None:
            row = conn.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE till_id = ? AND sale_id = ?",
                               (new.till_id, new.sale_id)).fetchone()
            record = _record(row)
            if record.content_hash != new.content_hash:
                raise SaleConflict(new.till_id, new.sale_id)
            return Accepted(record, created=False)
        sale_ref, receipt_no = inserted
        if new.head_office is not None:
            tsms_id, transaction = new.head_office(receipt_no)
            conn.execute("UPDATE sales SET tsms_id = ? WHERE id = ?", (tsms_id, sale_ref))
            conn.execute("INSERT INTO outgoing (sale_ref, lane, body) VALUES (?, 'tsms', ?)",
                         (sale_ref, transaction))
        detail: dict[str, Any] = {
            "till_id": new.till_id, "sale_id": new.sale_id, "content_hash": new.content_hash,
            "receipt_no": receipt_no, "total": str(new.total),
        }
        if new.kind != "sale":
            detail.update(kind=new.kind, original_id=new.original_id, refund_reason=new.refund_reason)
        entry = self._journal(conn, at, "accepted", sale_ref, detail)
        return Accepted(SaleRecord(
            id=sale_ref, till_id=new.till_id, sale_id=new.sale_id, kind=new.kind,
            content_hash=new.content_hash, sale=json.loads(new.sale_json),
            amounts=json.loads(new.amounts_json), total=new.total, receipt_no=receipt_no,
            accepted_at=datetime.fromisoformat(at), kra_state="queued", kra_invc_no=None,
            kra_error=None, kra_signature=None, kra_signed_at=None, tsms_state="pending",
            tsms_synced_at=None, original_id=new.original_id, refund_reason=new.refund_reason,
        ), created=True, entry=entry)

    def _journal(self, conn: sqlite3.Connection, at: str, event: str, sale_ref: int | None,
                 detail: dict[str, Any]) -> tuple[str, str]:
        """Append an entry linked to the last one, inside a write transaction; returns (prev hash, hash)."""
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        for _ in range(2):
            if self._head is None and self._pending_head is None:
                last = conn.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
                self._head = (last[0], last[1]) if last else (0, GENESIS)
            # After an entry earlier in this transaction (a group commit), the next one links to it.
            base = self._pending_head or self._head
            assert base is not None
            seq, prev = base[0] + 1, base[1]
            digest = entry_hash(prev, seq, at, event, sale_ref, text)
            try:
                conn.execute("INSERT INTO journal (seq, at, event, sale_ref, detail, hash) VALUES (?, ?, ?, ?, ?, ?)",
                             (seq, at, event, sale_ref, text, digest))
            except sqlite3.IntegrityError:
                # The cached head is stale: another process (a technician's command) appended
                # since. We hold the write lock now, so reading the head again settles it.
                self._head = self._pending_head = None
                continue
            self._pending_head = (seq, digest)
            return prev, digest
        raise StorageError(f"cannot append to the journal in {self.path}; run `etims-agent verify`")

    def count_print(self, sale_ref: int, kind: str, now: datetime) -> int:
        """Record one more rendering of a sale's receipt of this kind; returns how many came before."""
        with self._write() as conn:
            return count_print_in(conn, sale_ref, kind, now)

    # --- reads ------------------------------------------------------------------------------

    def unsigned(self) -> tuple[int, datetime | None]:
        """How many sales wait for KRA, and when the first of them was accepted (from the lane's index)."""
        with self._read() as conn:
            count, first = conn.execute(
                f"SELECT count(*), (SELECT accepted_at FROM sales WHERE {kra_pending()} ORDER BY id LIMIT 1) "
                f"FROM sales WHERE {kra_pending()}").fetchone()
        return int(count), _time(first)

    def prints_of(self, sale_ref: int, kind: str) -> int:
        """How often the sale's receipt of this kind has been printed or rendered."""
        with self._read() as conn:
            row = conn.execute("SELECT prints FROM receipt_prints WHERE sale_ref = ? AND kind = ?",
                               (sale_ref, kind)).fetchone()
        return 0 if row is None else int(row[0])

    def get(self, till_id: str, sale_id: str) -> SaleRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE till_id = ? AND sale_id = ?",
                               (till_id, sale_id)).fetchone()
        return None if row is None else _record(row)

    def by_id(self, sale_ref: int) -> SaleRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE id = ?", (sale_ref,)).fetchone()
        return None if row is None else _record(row)

    def accepted_entry(self, sale_ref: int) -> tuple[str, str] | None:
        """(previous hash, hash) of the journal entry that recorded the sale's acceptance."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT CASE WHEN j.seq = 1 THEN ? ELSE (SELECT p.hash FROM journal p WHERE p.seq = j.seq - 1) END, "
                "j.hash FROM journal j WHERE j.sale_ref = ? AND j.event = 'accepted'", (GENESIS, sale_ref)).fetchone()
        if row is None:
            return None
        if row[0] is None:
            raise StorageError(f"the journal entry before sale {sale_ref}'s is missing from {self.path}; "
                               "run `etims-agent verify`")
        return row[0], row[1]

    def credit_notes_of(self, original_id: int) -> list[SaleRecord]:
        """The credit notes issued against a sale, oldest first."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE original_id = ? ORDER BY id",
                                (original_id,)).fetchall()
        return [_record(r) for r in rows]

    def find(self, sale_id: str) -> list[SaleRecord]:
        """Every till's sale with this id (a sale id is unique per till, not per agent)."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_SALE_COLUMNS} FROM sales WHERE sale_id = ? ORDER BY id",
                                (sale_id,)).fetchall()
        return [_record(r) for r in rows]

    def all_sales(self) -> list[SaleRecord]:
        with self._read() as conn:
            return _all_sales(conn)

    def stats(self) -> OutboxStats:
        with self._read() as conn:
            try:
                counts = conn.execute("SELECT lane, state, sales FROM state_counts WHERE sales != 0").fetchall()
            except sqlite3.OperationalError:  # read-only, on an outbox a newer agent has not migrated yet
                counts = [(lane, state, n) for lane in ("kra", "tsms") for state, n in conn.execute(
                    f"SELECT {lane}_state, count(*) FROM sales GROUP BY {lane}_state")]
            kra = {state: n for lane, state, n in counts if lane == "kra"}
            tsms = {state: n for lane, state, n in counts if lane == "tsms"}
            first = conn.execute(  # the head of the lane's order is (near enough) the oldest
                f"SELECT accepted_at FROM sales WHERE {kra_pending()} ORDER BY id LIMIT 1"
            ).fetchone()
            entries = conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0]  # seq runs 1..N
            # Summed here as exact decimals (SQLite's SUM would go through floats).
            value = sum((Decimal(r[0]) for r in conn.execute(f"SELECT total FROM sales WHERE {kra_pending()}")),
                        Decimal(0))
        return OutboxStats(sales=sum(kra.values()), kra=kra, tsms=tsms,
                           oldest_unsigned_at=_time(first[0] if first else None), journal_entries=entries,
                           unsigned_value=value)

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute("SELECT 1").fetchone()

    def journal(self) -> list[JournalEntry]:
        with self._read() as conn:
            return _all_entries(conn)

    def snapshot(self) -> Snapshot:
        """The journal, the sales and the tombstones as of one moment (one read transaction): a sale
        accepted or pruned by the running agent meanwhile cannot make them disagree."""
        with self._read() as conn:
            conn.execute("BEGIN")
            try:
                entries, sales = _all_entries(conn), _all_sales(conn)
                try:
                    tombstones: set[int] | None = {r[0] for r in conn.execute("SELECT sale_ref FROM pruned_sales")}
                except sqlite3.OperationalError:  # read-only, on an outbox from before retention (m007)
                    tombstones = None
            finally:
                conn.execute("COMMIT")
        return Snapshot(entries, sales, tombstones)

    def verify(self) -> list[str]:
        """Check the journal chain and that it agrees with the sales it describes.

        The chain alone cannot see its last entries being cut off, so each stored sale must also
        have its `accepted` entry, and the local receipt numbers must run 1..N without a gap. A sale
        retention removed is accounted for by the `pruned` entry naming it (and its tombstone); one
        deleted any other way is reported.
        """
        snap = self.snapshot()
        entries, sales = snap.journal, snap.sales
        problems = verify_chain(entries)
        # A rescued sale (from a quarantined outbox) is created by its `rescued` entry instead.
        recorded = {e.sale_ref: json.loads(e.detail) for e in entries if e.event in ("accepted", "rescued")}
        accepted = dict(recorded)
        pruned = pruned_in(entries)
        # An outbox that replaced a damaged one goes on from the damaged one's receipt number.
        first: dict[str, Any] = next((json.loads(e.detail) for e in entries if e.event == "quarantined"), {})
        start = int(first.get("receipt_no") or 0) + 1
        for s in sales:
            detail = accepted.pop(s.id, None)
            if detail is None:
                problems.append(f"sale {s.id} ({s.till_id}/{s.sale_id}) has no 'accepted' journal entry")
            elif detail.get("content_hash") != s.content_hash or detail.get("receipt_no") != s.receipt_no:
                problems.append(f"sale {s.id} ({s.till_id}/{s.sale_id}) differs from its journal entry")
        problems.extend(f"journal entry for sale {ref} refers to a sale that is not stored, and no 'pruned' entry "
                        "names it: it was deleted outside the agent; compare with an audit bundle and KRA"
                        for ref in accepted if ref not in pruned.by_id)
        problems.extend(pruned_problems(pruned, recorded, signed_evidence(entries, pruned.ids), {s.id for s in sales},
                                        snap.tombstones))
        # Pruned sales keep their place in the numbering.
        numbers = sorted([s.receipt_no for s in sales] + pruned.receipt_nos())
        if numbers != list(range(start, start + len(numbers))):
            problems.append(f"local receipt numbers are not a gap-free sequence from {start}")
        problems.extend(invoice_number_gaps(sales, entries, pruned.invc_nos()))
        return problems


@dataclass(frozen=True, slots=True)
class Snapshot:
    journal: list[JournalEntry]
    sales: list[SaleRecord]
    tombstones: set[int] | None  # the ids in pruned_sales; None on an outbox from before retention


def invoice_number_gaps(sales: list[SaleRecord], entries: list[JournalEntry],
                        pruned: Collection[int] = ()) -> list[str]:
    """KRA invoice numbers from 1 to the highest held that no sale holds, except the ones a strict
    KRA told us to skip (journalled as `renumbered`: another system on the same PIN used them) and
    those of pruned sales (`pruned`)."""
    held = sorted({s.kra_invc_no for s in sales if s.kra_invc_no is not None} | set(pruned))
    if not held:
        return []
    explained: set[int] = set()
    for entry in entries:
        if entry.event == "renumbered":
            moved = json.loads(entry.detail)
            if isinstance(moved.get("from"), int) and isinstance(moved.get("to"), int):
                explained.update(range(moved["from"], moved["to"]))
    missing = sorted(set(range(1, held[-1] + 1)) - set(held) - explained)
    if not missing:
        return []
    shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
    quarantined = [json.loads(e.detail).get("file") for e in entries if e.event == "quarantined"]
    if quarantined:
        return [f"KRA invoice numbers with no sale here: {shown} ({len(missing)}); this outbox replaced the "
                f"damaged {quarantined[0]}: run `etims-agent outbox rescue` on it, then compare what is still "
                "missing with KRA (selectInvoiceDetails)"]
    return [f"KRA invoice numbers with no sale here: {shown} ({len(missing)}); compare with KRA "
            "(selectInvoiceDetails) before anything else"]


def count_print_in(conn: sqlite3.Connection, sale_ref: int, kind: str, now: datetime) -> int:
    """Outbox.count_print inside the caller's write transaction."""
    prints: int = conn.execute(
        "INSERT INTO receipt_prints (sale_ref, kind, prints, first_at) VALUES (?, ?, 1, ?) "
        "ON CONFLICT (sale_ref, kind) DO UPDATE SET prints = prints + 1 RETURNING prints",
        (sale_ref, kind, timestamp(now)),
    ).fetchone()[0]
    return prints - 1


def _all_sales(conn: sqlite3.Connection) -> list[SaleRecord]:
    return [_record(r) for r in conn.execute(f"SELECT {_SALE_COLUMNS} FROM sales ORDER BY id")]


def _all_entries(conn: sqlite3.Connection) -> list[JournalEntry]:
    # Each entry's prev_hash is the hash of the row before it (m011); an outbox not yet upgraded keeps a
    # stored copy, which this ignores: the hash covers it anyway.
    return [JournalEntry(*r) for r in conn.execute(
        "SELECT seq, at, event, sale_ref, detail, lag(hash, 1, ?) OVER (ORDER BY seq), hash FROM journal "
        "ORDER BY seq", (GENESIS,))]


def _record(row: tuple[Any, ...]) -> SaleRecord:
    (id_, till_id, sale_id, kind, content_hash, sale, amounts, total, receipt_no, accepted_at,
     kra_state, kra_invc_no, kra_error, kra_signature, kra_signed_at, tsms_state, tsms_synced_at,
     original_id, refund_reason) = row
    return SaleRecord(
        id=id_, till_id=till_id, sale_id=sale_id, kind=kind, content_hash=content_hash,
        sale=json.loads(sale), amounts=json.loads(amounts), total=Decimal(total),
        receipt_no=receipt_no, accepted_at=datetime.fromisoformat(accepted_at),
        kra_state=kra_state, kra_invc_no=kra_invc_no, kra_error=kra_error,
        kra_signature=None if kra_signature is None else json.loads(kra_signature),
        kra_signed_at=_time(kra_signed_at), tsms_state=tsms_state, tsms_synced_at=_time(tsms_synced_at),
        original_id=original_id, refund_reason=refund_reason,
    )
