"""What retention may prune, what its journal entry says, and how `verify` reads that entry (pure).

A sale (or credit note) may go once KRA has signed it (`kra_state` 'signed') and head office holds it
(`tsms_state` 'synced'; for a credit note: its void is settled), and it was accepted before the
cutoff (now minus `retention.keep_days`): proof of audit exists at both ends before anything is
erased. Nothing else goes: not a sale waiting for either lane, not a `parked` one (KRA refused it),
not a `void` one (never signed by KRA, so KRA holds no record of it), not a head-office `rejected` one.

A sale and its credit notes go together or not at all: a credit note refers to its original (a
foreign key), and the credit-note check counts the notes already issued against a sale, so a sale
whose notes are kept stays, and a note whose original stays is kept too.

Each batch that prunes anything appends one `pruned` journal entry (no sale_ref) whose detail says
what went:

    count           sales and credit notes removed
    credit_notes    how many of them were credit notes
    ids             their outbox ids, as inclusive runs [[first, last], ...]
    receipt_nos     their local receipt numbers, as runs
    invc_nos        their KRA invoice numbers, as runs (they need not be contiguous)
    cutoff          accepted before this moment (UTC)
    keep_days       the setting that made the cutoff
    receipt_prints  rows of that table removed with them (entries written before m009 also give
                    tsms_submissions: the accepted submissions removed; they are no longer kept)
    rows_sha256     SHA-256 over one line per sale, in id order: the compact JSON array
                    [id, till_id, sale_id, content_hash, receipt_no, kra_invc_no, rcptSign] and "\\n"
    rows_sha256_of  the names of those fields, so the digest explains itself

The journal itself is never pruned: every sale's `accepted`, `sent` and `signed` entries stay, and
`verify` accepts a missing sale only when a `pruned` entry names its id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.queue.journal import JournalEntry

EVENT = "pruned"
DIGEST_FIELDS = ("id", "till_id", "sale_id", "content_hash", "receipt_no", "kra_invc_no", "rcptSign")
# A batch holds at most about BATCH sales (a sale's credit notes may take it a little over); an entry
# claiming far more is not one the agent wrote, and is not expanded (it could exhaust memory).
MAX_ENTRY_SALES = 100_000


@dataclass(frozen=True, slots=True)
class Row:
    """What retention reads of one stored sale or credit note."""

    id: int
    till_id: str
    sale_id: str
    kind: str
    content_hash: str
    receipt_no: int
    accepted_at: datetime
    kra_state: str
    kra_invc_no: int | None
    rcpt_sign: str | None
    tsms_state: str
    original_id: int | None


def settled(row: Row, cutoff: datetime) -> bool:
    """Signed by KRA, held by head office, and accepted before the cutoff."""
    return row.kra_state == "signed" and row.tsms_state == "synced" and row.accepted_at < cutoff


def choose(candidates: Sequence[Row], families: Mapping[int, Sequence[Row]], cutoff: datetime,
           limit: int) -> list[Row]:
    """The rows to prune in one batch, in id order.

    `candidates`: rows accepted before the cutoff, oldest first; `families`: for each original sale
    (a candidate's own id, or its original's), the sale and every credit note against it, as stored
    now. A family goes whole, only when every member is settled; batches stop adding families once
    `limit` rows are chosen.
    """
    chosen: dict[int, Row] = {}
    decided: set[int] = set()
    for row in candidates:
        if len(chosen) >= limit:
            break
        root = row.id if row.original_id is None else row.original_id
        if root in decided:
            continue
        decided.add(root)
        members = families.get(root, ())
        # No root row: the original is not stored (a foreign key forbids it); leave it to a person.
        if any(m.id == root for m in members) and all(settled(m, cutoff) for m in members):
            chosen.update((m.id, m) for m in members)
    return sorted(chosen.values(), key=lambda r: r.id)


def runs(numbers: Iterable[int]) -> list[list[int]]:
    """Sorted, distinct numbers as inclusive runs: 1, 2, 3, 7 -> [[1, 3], [7, 7]]."""
    out: list[list[int]] = []
    for n in sorted(set(numbers)):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def expand(value: Any) -> list[int]:
    """The numbers of a runs list; ValueError if it is not one, or claims too many."""
    if not isinstance(value, list):
        raise ValueError("not a list of runs")
    total = 0
    for run in value:
        if not (isinstance(run, list) and len(run) == 2 and all(type(n) is int for n in run) and run[0] <= run[1]):
            raise ValueError(f"{run!r} is not a run [first, last]")
        total += run[1] - run[0] + 1
        if total > MAX_ENTRY_SALES:
            raise ValueError("more numbers than a batch can hold")
    return [n for first, last in value for n in range(first, last + 1)]


def rows_digest(rows: Iterable[Row]) -> str:
    digest = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r.id):
        fields = [r.id, r.till_id, r.sale_id, r.content_hash, r.receipt_no, r.kra_invc_no, r.rcpt_sign]
        digest.update((json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
    return digest.hexdigest()


def entry_detail(rows: Sequence[Row], cutoff: datetime, keep_days: int, *, receipt_prints: int) -> dict[str, Any]:
    """The detail of the batch's `pruned` journal entry (see the module's docstring)."""
    return {
        "count": len(rows),
        "credit_notes": sum(r.kind == "credit_note" for r in rows),
        "ids": runs(r.id for r in rows),
        "receipt_nos": runs(r.receipt_no for r in rows),
        "invc_nos": runs(r.kra_invc_no for r in rows if r.kra_invc_no is not None),
        "cutoff": cutoff.astimezone(UTC).isoformat(timespec="microseconds"),
        "keep_days": keep_days,
        "receipt_prints": receipt_prints,
        "rows_sha256": rows_digest(rows),
        "rows_sha256_of": list(DIGEST_FIELDS),
    }


# --- reading the journal back -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Batch:
    """One `pruned` entry, read back."""

    entry: JournalEntry
    ids: tuple[int, ...]
    receipt_nos: tuple[int, ...]
    invc_nos: tuple[int, ...]


@dataclass(slots=True)
class Pruned:
    """Every `pruned` entry of a journal: which sales went, and under which entry."""

    batches: list[Batch] = field(default_factory=list)
    by_id: dict[int, Batch] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # entries that cannot be read

    @property
    def ids(self) -> Collection[int]:
        return self.by_id.keys()

    def receipt_nos(self) -> list[int]:
        return [n for b in self.batches for n in b.receipt_nos]

    def invc_nos(self) -> set[int]:
        return {n for b in self.batches for n in b.invc_nos}


def read_batch(entry: JournalEntry) -> Batch:
    """A `pruned` entry's sales; ValueError if its detail is not what the agent writes."""
    try:
        detail = json.loads(entry.detail)
    except ValueError:
        raise ValueError("its detail is not JSON") from None
    if not isinstance(detail, dict):
        raise ValueError("its detail is not an object")
    ids = expand(detail.get("ids"))
    receipt_nos = expand(detail.get("receipt_nos"))
    invc_nos = expand(detail.get("invc_nos"))
    if not (len(ids) == len(receipt_nos) == detail.get("count")) or len(invc_nos) > len(ids):
        raise ValueError("its counts do not agree")
    return Batch(entry, tuple(ids), tuple(receipt_nos), tuple(invc_nos))


def pruned_in(entries: Iterable[JournalEntry]) -> Pruned:
    found = Pruned()
    for entry in entries:
        if entry.event != EVENT:
            continue
        try:
            batch = read_batch(entry)
        except ValueError as exc:
            found.problems.append(f"entry {entry.seq}: a '{EVENT}' entry that cannot be read ({exc})")
            continue
        found.batches.append(batch)
        for sale_ref in batch.ids:
            if sale_ref in found.by_id:
                found.problems.append(f"entry {entry.seq}: sale {sale_ref} was already pruned by entry "
                                      f"{found.by_id[sale_ref].entry.seq}")
            found.by_id[sale_ref] = batch
    return found


def signed_evidence(entries: Iterable[JournalEntry], of: Collection[int]) -> dict[int, int | None]:
    """Sale id -> the KRA invoice number its journal says KRA signed (a `signed` entry, or a rescue of a
    signed sale), for the sales in `of`; sales KRA never signed are absent."""
    signed: dict[int, int | None] = {}
    for e in entries:
        if e.sale_ref is None or e.event not in ("signed", "rescued") or e.sale_ref not in of:
            continue
        try:
            detail = json.loads(e.detail)
        except ValueError:
            continue  # an edited entry; the chain check reports it
        if not isinstance(detail, dict) or (e.event == "rescued" and detail.get("kra_state") != "signed"):
            continue
        invc_no = detail.get("invc_no")
        signed[e.sale_ref] = invc_no if isinstance(invc_no, int) else None
    return signed


def pruned_problems(pruned: Pruned, recorded: Mapping[int | None, Any], signed: Mapping[int, int | None],
                    stored: Collection[int], tombstones: Collection[int] | None) -> list[str]:
    """What does not hold about the pruned sales: each was journalled when it came, KRA's signature is
    journalled, it is gone from the sales, its tombstone is there, and the numbers agree.

    `recorded`: sale id -> the detail of its `accepted` (or `rescued`) entry; `stored`: the ids still in
    the outbox; `tombstones`: the ids in `pruned_sales` (None: an outbox from before retention).
    """
    problems = list(pruned.problems)
    for batch in pruned.batches:
        seq = batch.entry.seq
        never = [i for i in batch.ids if i not in recorded]
        if never:
            problems.append(f"entry {seq}: prunes sale(s) {_few(never)} that the journal never recorded as accepted")
        still = [i for i in batch.ids if i in stored]
        if still:
            problems.append(f"entry {seq}: sale(s) {_few(still)} are journalled as pruned but are still stored")
        unsigned = [i for i in batch.ids if i not in signed]
        if unsigned:
            problems.append(f"entry {seq}: sale(s) {_few(unsigned)} were pruned with no KRA signature in the "
                            "journal; only signed sales may be pruned")
        numbers = [n for i in batch.ids if i in recorded and type(n := recorded[i].get("receipt_no")) is int]
        if not never and sorted(numbers) != sorted(batch.receipt_nos):
            problems.append(f"entry {seq}: its receipt numbers differ from those journalled when the sales came")
        invoices = sorted(n for i in batch.ids if (n := signed.get(i)) is not None)
        if not unsigned and invoices != sorted(batch.invc_nos):
            problems.append(f"entry {seq}: its KRA invoice numbers differ from those journalled when KRA signed")
    if tombstones is not None:
        lost = [i for i in pruned.ids if i not in tombstones]
        if lost:
            problems.append(f"pruned sale(s) {_few(lost)} have no tombstone in pruned_sales: a till could store "
                            "them again; compare with an audit bundle and KRA before anything else")
        extra = [i for i in tombstones if i not in pruned.by_id]
        if extra:
            problems.append(f"tombstone(s) for sale(s) {_few(extra)} in pruned_sales with no '{EVENT}' journal "
                            "entry: those sales were removed outside retention")
    return problems


def _few(ids: Iterable[int]) -> str:
    shown = sorted(ids)
    return ", ".join(map(str, shown[:20])) + (f" ... ({len(shown)})" if len(shown) > 20 else "")

