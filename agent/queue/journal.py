"""The hash chain of fiscal events (pure).

Each entry's hash covers its own fields and the previous entry's hash, so editing, removing or
reordering any entry breaks every hash after it. `verify_chain` reports each break it finds.

The outbox stores only each entry's own hash and reads `prev_hash` from the row before; an audit
bundle's lines carry it, so a line lifted out of its run can still be checked on its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class JournalEntry:
    seq: int
    at: str
    event: str
    sale_ref: int | None
    detail: str  # canonical JSON text
    prev_hash: str
    hash: str


def entry_hash(prev_hash: str, seq: int, at: str, event: str, sale_ref: int | None, detail: str) -> str:
    material = json.dumps([prev_hash, seq, at, event, sale_ref, detail], separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def verify_chain(entries: Iterable[JournalEntry], after: tuple[int, str] = (0, GENESIS)) -> list[str]:
    """Return one sentence per problem found; an empty list means the chain is intact.

    `after` is the (seq, hash) of the entry before the first one: the genesis for a whole journal.
    """
    problems: list[str] = []
    expected_seq, prev_hash = after[0] + 1, after[1]
    for e in entries:
        if e.seq != expected_seq:
            problems.append(f"entry {e.seq}: expected entry {expected_seq} here; entries are missing or reordered")
        if e.prev_hash != prev_hash:
            problems.append(f"entry {e.seq}: does not follow the entry before it (prev_hash mismatch)")
        if entry_hash(e.prev_hash, e.seq, e.at, e.event, e.sale_ref, e.detail) != e.hash:
            # Read from the outbox, prev_hash is the hash of the row before, so a removed or moved
            # entry before this one shows here too.
            problems.append(f"entry {e.seq}: does not match its hash; it was edited, or does not follow the "
                            "entry before it (one edited, removed or moved)")
        expected_seq, prev_hash = e.seq + 1, e.hash
    return problems
