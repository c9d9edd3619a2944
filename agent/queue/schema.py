"""Versioned schema migrations; each runs in one transaction with its record in _sqlite_migrations."""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("etims-agent")

KRA_STATES = ("queued", "in_flight", "retry", "unknown", "signed", "parked", "void")
TSMS_STATES = ("pending", "batched", "synced", "rejected")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


# The m007 trigger's words when an insert meets a tombstone; the outbox turns them into SalePruned.
PRUNED_REFUSAL = "the sale was signed, synced and pruned here; it is never stored again"

TSMS_PENDING = "tsms_state = 'pending'"  # verbatim the predicate of the partial index sales_tsms_pending


def kra_pending(table: str = "") -> str:
    """The KRA backlog's predicate, written exactly as the partial index `sales_kra_pending` has it:
    SQLite uses a partial index only for a query that repeats its WHERE term."""
    return f"{table + '.' if table else ''}kra_state IN ('queued', 'in_flight', 'retry', 'unknown')"


@migrations()
def m001_outbox(db: Database) -> None:
    # AUTOINCREMENT: a sale's id is its place in the KRA lane's order and is never reused.
    db.execute(f"""
        CREATE TABLE sales (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            till_id TEXT NOT NULL,
            sale_id TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT 'sale' CHECK (kind IN ('sale', 'credit_note')),
            content_hash TEXT NOT NULL,
            sale TEXT NOT NULL,
            amounts TEXT NOT NULL,
            payload_version INTEGER NOT NULL DEFAULT 1,
            total TEXT NOT NULL,
            receipt_no INTEGER NOT NULL UNIQUE,
            accepted_at TEXT NOT NULL,
            kra_state TEXT NOT NULL DEFAULT 'queued' CHECK (kra_state IN ({_in(KRA_STATES)})),
            kra_invc_no INTEGER UNIQUE,
            kra_request TEXT,
            kra_attempts INTEGER NOT NULL DEFAULT 0,
            kra_next_attempt_at TEXT,
            kra_error TEXT,
            kra_signature TEXT,
            kra_signed_at TEXT,
            tsms_state TEXT NOT NULL DEFAULT 'pending' CHECK (tsms_state IN ({_in(TSMS_STATES)})),
            tsms_submission TEXT,
            tsms_synced_at TEXT,
            UNIQUE (till_id, sale_id)
        ) STRICT
    """)
    db.execute("CREATE INDEX sales_kra_backlog ON sales (kra_state, id) WHERE kra_state != 'signed'")
    db.execute("CREATE INDEX sales_tsms_backlog ON sales (tsms_state, id) WHERE tsms_state != 'synced'")
    # Gap-free counters: incremented inside the transaction that uses the number, so a rollback
    # (or a crash before commit) hands the number back.
    db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT")
    db.execute("INSERT INTO counters (name, value) VALUES ('receipt_no', 0)")
    # The insert takes counter + 1 as its receipt number; this advances the counter with it.
    db.execute("""
        CREATE TRIGGER sales_receipt_no AFTER INSERT ON sales
        BEGIN UPDATE counters SET value = NEW.receipt_no WHERE name = 'receipt_no'; END
    """)
    db.execute("""
        CREATE TABLE journal (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            event TEXT NOT NULL,
            sale_ref INTEGER,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        ) STRICT
    """)
    # Append-only by construction; `verify` still checks the hash chain, because anyone with the
    # file can drop these triggers.
    for op in ("UPDATE", "DELETE"):
        db.execute(f"""
            CREATE TRIGGER journal_no_{op.lower()} BEFORE {op} ON journal
            BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END
        """)


@migrations()
def m002_kra_lane(db: Database) -> None:
    db.execute("ALTER TABLE sales ADD COLUMN original_id INTEGER REFERENCES sales(id)")
    db.execute("ALTER TABLE sales ADD COLUMN refund_reason TEXT")
    # KRA's invoice numbers (invcNo): allocated when a sale is first sent, handed back when KRA
    # refuses it for good, so the sequence KRA sees has no gap.
    db.execute("INSERT INTO counters (name, value) VALUES ('invc_no', 0)")
    # The device's identity from selectInitOsdcInfo. Never the cmcKey: that lives in the keyring.
    db.execute("""
        CREATE TABLE kra_device (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            tin TEXT NOT NULL,
            bhf_id TEXT NOT NULL,
            serial TEXT NOT NULL,
            sdc_id TEXT NOT NULL,
            mrc_no TEXT,
            info TEXT NOT NULL,
            initialised_at TEXT NOT NULL
        ) STRICT
    """)
    db.execute("""
        CREATE TABLE kra_items (
            item_code TEXT PRIMARY KEY,
            request TEXT NOT NULL,
            registered_at TEXT NOT NULL
        ) STRICT
    """)
    db.execute("""
        CREATE TABLE kra_code_lists (
            name TEXT PRIMARY KEY,
            data TEXT NOT NULL,
            fetched_at TEXT NOT NULL
        ) STRICT
    """)


@migrations()
def m003_lane_indexes(db: Database) -> None:
    # The lane asks for the oldest unsigned sale before every send; without this index that was a
    # scan of every sale ever signed, and draining a backlog slowed down as the outbox grew.
    db.execute("CREATE INDEX sales_kra_pending ON sales (id) "
               "WHERE kra_state IN ('queued', 'in_flight', 'retry', 'unknown')")
    # A sale's credit notes, looked up before each new one (quantities may not be credited twice).
    db.execute("CREATE INDEX sales_original ON sales (original_id) WHERE original_id IS NOT NULL")
    # A temporary receipt shows its sale's journal entry (see agent/receipt_signing.py).
    db.execute("CREATE INDEX journal_sale ON journal (sale_ref)")
    # How often each receipt (temporary, then signed) was rendered: every print after the first
    # says COPY, so a second original cannot be printed.
    db.execute("""
        CREATE TABLE receipt_prints (
            sale_ref INTEGER NOT NULL REFERENCES sales(id),
            kind TEXT NOT NULL,
            prints INTEGER NOT NULL,
            first_at TEXT NOT NULL,
            PRIMARY KEY (sale_ref, kind)
        ) STRICT
    """)


@migrations()
def m004_tsms_lane(db: Database) -> None:
    # The head-office transaction, built once at acceptance so every resend is identical.
    db.execute("ALTER TABLE sales ADD COLUMN tsms_transaction TEXT")
    db.execute("ALTER TABLE sales ADD COLUMN tsms_id TEXT")
    db.execute("CREATE UNIQUE INDEX sales_tsms_id ON sales (tsms_id) WHERE tsms_id IS NOT NULL")
    db.execute("CREATE INDEX sales_tsms_pending ON sales (id) WHERE tsms_state = 'pending'")
    db.execute("CREATE INDEX sales_tsms_submission ON sales (tsms_submission) WHERE tsms_submission IS NOT NULL")
    # A submission's exact body is stored before its first send; a resend sends these bytes again,
    # so the server answers a replay, never a conflict.
    db.execute("""
        CREATE TABLE tsms_submissions (
            uuid TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            sales INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'rejected', 'split')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_status INTEGER,
            last_error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        ) STRICT
    """)


@migrations()
def m005_state_counts(db: Database) -> None:
    # Sales per lane state, kept by triggers inside the transaction that changes a state, so status and
    # /metrics read a few rows instead of counting every sale ever stored (775 ms at 100,000 sales).
    db.execute("""
        CREATE TABLE state_counts (
            lane TEXT NOT NULL,
            state TEXT NOT NULL,
            sales INTEGER NOT NULL,
            PRIMARY KEY (lane, state)
        ) STRICT, WITHOUT ROWID
    """)
    for lane in ("kra", "tsms"):
        db.execute(f"INSERT INTO state_counts SELECT '{lane}', {lane}_state, count(*) FROM sales "
                   f"GROUP BY {lane}_state")

    def add(lane: str, state: str, delta: int) -> str:
        return (f"INSERT INTO state_counts (lane, state, sales) VALUES ('{lane}', {state}, {delta}) "
                f"ON CONFLICT (lane, state) DO UPDATE SET sales = sales + {delta};")

    db.execute(f"CREATE TRIGGER sales_count_insert AFTER INSERT ON sales BEGIN "
               f"{add('kra', 'NEW.kra_state', 1)} {add('tsms', 'NEW.tsms_state', 1)} END")
    db.execute(f"CREATE TRIGGER sales_count_delete AFTER DELETE ON sales BEGIN "
               f"{add('kra', 'OLD.kra_state', -1)} {add('tsms', 'OLD.tsms_state', -1)} END")
    for lane in ("kra", "tsms"):
        db.execute(f"CREATE TRIGGER sales_count_{lane} AFTER UPDATE OF {lane}_state ON sales "
                   f"WHEN OLD.{lane}_state IS NOT NEW.{lane}_state BEGIN "
                   f"{add(lane, f'OLD.{lane}_state', -1)} {add(lane, f'NEW.{lane}_state', 1)} END")


@migrations()
def m006_outgoing(db: Database) -> None:
    # The exact texts still to be sent (the KRA request, the head-office transaction) live apart from
    # the sale and are deleted once the other side has them: a sale row then stays a third of its old
    # size from the start, so SQLite packs two or three to a page instead of one (6.3 KB a sale before).
    db.execute("""
        CREATE TABLE outgoing (
            sale_ref INTEGER NOT NULL REFERENCES sales(id),
            lane TEXT NOT NULL CHECK (lane IN ('kra', 'tsms')),
            body TEXT NOT NULL,
            PRIMARY KEY (sale_ref, lane)
        ) STRICT
    """)
    db.execute("INSERT INTO outgoing SELECT id, 'kra', kra_request FROM sales "
               "WHERE kra_request IS NOT NULL AND kra_state != 'signed'")
    db.execute("INSERT INTO outgoing SELECT id, 'tsms', tsms_transaction FROM sales "
               "WHERE tsms_transaction IS NOT NULL AND tsms_state != 'synced'")
    db.execute("ALTER TABLE sales DROP COLUMN kra_request")
    db.execute("ALTER TABLE sales DROP COLUMN tsms_transaction")
    # A submission head office holds is never sent again; its body is not needed any more.
    db.execute("UPDATE tsms_submissions SET body = '' WHERE state = 'accepted'")


@migrations()
def m007_retention(db: Database) -> None:
    # Retention finds the sales accepted before its cutoff through this index, a batch at a time,
    # instead of reading every row (and its JSON) of a years-old outbox every hour.
    db.execute("CREATE INDEX sales_accepted_at ON sales (accepted_at)")
    # A tombstone per pruned sale or credit note: a till that posts it again must not get it stored
    # and signed a second time. About 50 bytes each against kilobytes for the sale. Append-only, and
    # checked by the database itself on every insert, whatever the path (HTTP, serial, rescue).
    db.execute("""
        CREATE TABLE pruned_sales (
            till_id TEXT NOT NULL,
            sale_id TEXT NOT NULL,
            sale_ref INTEGER NOT NULL,
            receipt_no INTEGER NOT NULL,
            kra_invc_no INTEGER,
            PRIMARY KEY (till_id, sale_id)
        ) STRICT, WITHOUT ROWID
    """)
    db.execute(f"""
        CREATE TRIGGER sales_not_pruned BEFORE INSERT ON sales
        WHEN EXISTS (SELECT 1 FROM pruned_sales WHERE till_id = NEW.till_id AND sale_id = NEW.sale_id)
        BEGIN SELECT RAISE(ABORT, '{PRUNED_REFUSAL}'); END
    """)
    for op in ("UPDATE", "DELETE"):
        db.execute(f"""
            CREATE TRIGGER pruned_sales_no_{op.lower()} BEFORE {op} ON pruned_sales
            BEGIN SELECT RAISE(ABORT, 'pruned_sales is append-only'); END
        """)
    # How many sales retention removed so far (status reads one row), and a tiny index to find the
    # last `pruned` entry without reading the whole journal.
    db.execute("INSERT INTO counters (name, value) VALUES ('pruned_sales', 0)")
    db.execute("CREATE INDEX journal_pruned ON journal (seq) WHERE event = 'pruned'")


@migrations()
def m008_no_tsms_id_index(db: Database) -> None:
    # Nothing looks a sale up by its head-office transaction id; the unique index only guarded random
    # UUID v4s against a collision (head office would answer one with a 409 anyway), at about 50 bytes
    # a sale, 1.5 % of a stored sale.
    db.execute("DROP INDEX sales_tsms_id")


@migrations()
def m009_no_accepted_submissions(db: Database) -> None:
    # A submission head office accepted is never sent again, and each of its sales names its uuid; its
    # `tsms_synced` journal entry keeps the count. The row is no longer kept (tsms_store.accepted).
    db.execute("DELETE FROM tsms_submissions WHERE state = 'accepted'")


@migrations()
def m010_batched_index(db: Database) -> None:
    # The lane finds a submission's sales only while they are in it (`batched`); once head office holds
    # them the index entry served nothing, at about 50 bytes a sale kept for good.
    db.execute("DROP INDEX sales_tsms_submission")
    db.execute("CREATE INDEX sales_tsms_batched ON sales (tsms_submission) WHERE tsms_state = 'batched'")


@migrations()
def m011_journal_without_prev_hash(db: Database) -> None:
    # An entry's link to the one before it is that entry's hash, which the row before holds already:
    # readers take it from there (outbox._all_entries). Each hash still covers the previous one, so `verify`
    # finds the same edits; the copy cost 65 bytes an entry, four entries a sale.
    db.execute("ALTER TABLE journal DROP COLUMN prev_hash")


@migrations()
def m012_print_jobs(db: Database) -> None:
    # Receipts waiting for a printer (agent/queue/print_jobs.py): a printer that is off when the agent
    # stops still prints them after the restart. In rowid order, the order they were queued.
    db.execute("""
        CREATE TABLE print_jobs (
            printer TEXT NOT NULL,
            sale_ref INTEGER NOT NULL,
            kind TEXT NOT NULL,
            queued_at TEXT NOT NULL,
            UNIQUE (printer, sale_ref, kind)
        ) STRICT
    """)
