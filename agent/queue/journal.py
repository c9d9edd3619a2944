"""The hash chain of fiscal events (pure).

Each entry's hash covers its own fields and the previous entry's hash, so editing, removing or
reordering any entry breaks every hash after it. `verify_chain` reports each break it finds.
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


def verify_chain(entries: Iterable[JournalEntry]) -> list[str]:
    """Return one sentence per problem found; an empty list means the chain is intact."""
    problems: list[str] = []
    prev_hash, expected_seq = GENESIS, 1
    for e in entries:
        if e.seq != expected_seq:
            problems.append(f"entry {e.seq}: expected entry {expected_seq} here; entries are missing or reordered")
        if e.prev_hash != prev_hash:
            problems.append(f"entry {e.seq}: does not follow the entry before it (prev_hash mismatch)")
        if entry_hash(e.prev_hash, e.seq, e.at, e.event, e.sale_ref, e.detail) != e.hash:
            problems.append(f"entry {e.seq}: content does not match its hash; the entry was edited")
        prev_hash, expected_seq = e.hash, e.seq + 1
    return problems
