"""`etims-agent verify` against a journal edited as an attacker with the file would edit it.

tests/test_outbox.py covers Outbox.verify() on an edited entry, a removed one, two swapped sequence
numbers and a cut tail, and tests/test_cli.py the command on an edited entry. Here: the command itself
on removed and reordered entries, and the subtler edits: rows swapped whole, a removal hidden by
renumbering the entries after it, an entry rewritten with its own hash recomputed, and the whole chain
recomputed after a sale and its entry were removed. Every case drops the append-only triggers first.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RULES, FakeClock, make_sale
from typer.testing import CliRunner

from agent.cli import app
from agent.intake import accept
from agent.queue.journal import GENESIS, entry_hash
from agent.queue.outbox import Outbox

runner = CliRunner()
SALES = 5


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('data_dir = "data"\n[http]\ntill_token = "secret-token-0123456789"\n')
    box = Outbox.open(tmp_path / "data" / "outbox.sqlite3")
    clock = FakeClock()
    try:
        for i in range(SALES):
            accept(box, make_sale(sale_id=f"S{i}"), RULES, clock())
            clock.advance(60)
    finally:
        box.close()
    return path


def db(config: Path) -> Path:
    return config.parent / "data" / "outbox.sqlite3"


def verify(config: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["verify", "--config", str(config)], catch_exceptions=False)
    return result.exit_code, result.output


def as_attacker(config: Path, edit: Callable[[sqlite3.Connection], None]) -> None:
    conn = sqlite3.connect(db(config), isolation_level=None)
    try:
        conn.execute("DROP TRIGGER journal_no_update")
        conn.execute("DROP TRIGGER journal_no_delete")
        conn.execute("BEGIN")
        edit(conn)
        conn.execute("COMMIT")
    finally:
        conn.close()


Row = tuple[int, str, str, int | None, str, str]
COLUMNS = "seq, at, event, sale_ref, detail, hash"  # prev_hash is the hash of the row before


def rows(conn: sqlite3.Connection) -> list[Row]:
    return list(conn.execute(f"SELECT {COLUMNS} FROM journal ORDER BY seq"))


def rewrite(conn: sqlite3.Connection, entries: list[Row], *, rechain: bool) -> None:
    """Replace the journal with these entries; with `rechain`, renumbered and every hash recomputed
    (the algorithm is no secret), so the chain itself is intact again."""
    conn.execute("DELETE FROM journal")
    prev = GENESIS
    for seq, (old_seq, at, event, sale_ref, detail, digest) in enumerate(entries, start=1):
        if rechain:
            digest = prev = entry_hash(prev, seq, at, event, sale_ref, detail)
        else:
            seq = old_seq
        conn.execute(f"INSERT INTO journal ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                     (seq, at, event, sale_ref, detail, digest))


def remove_middle(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM journal WHERE seq = 3")


def swap_sequence_numbers(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE journal SET seq = -3 WHERE seq = 3")
    conn.execute("UPDATE journal SET seq = 3 WHERE seq = 4")
    conn.execute("UPDATE journal SET seq = 4 WHERE seq = -3")


def swap_rows_keeping_numbers(conn: sqlite3.Connection) -> None:
    """Entries 3 and 4 change places, each keeping the other's position number."""
    entries = rows(conn)
    third, fourth = entries[2], entries[3]
    entries[2], entries[3] = (3, *fourth[1:]), (4, *third[1:])
    rewrite(conn, entries, rechain=False)


def remove_middle_and_renumber(conn: sqlite3.Connection) -> None:
    """Entry 3 removed and the later ones renumbered, so the sequence has no gap."""
    conn.execute("DELETE FROM journal WHERE seq = 3")
    for seq in range(4, SALES + 1):
        conn.execute("UPDATE journal SET seq = ? WHERE seq = ?", (seq - 1, seq))


def edit_with_own_hash_recomputed(conn: sqlite3.Connection) -> None:
    """Entry 3's total changed and its own hash recomputed: it checks, the entry after it does not."""
    prev_hash = rows(conn)[1][-1]
    seq, at, event, sale_ref, detail, _ = rows(conn)[2]
    detail = json.dumps({**json.loads(detail), "total": "1.00"}, sort_keys=True, separators=(",", ":"))
    conn.execute("UPDATE journal SET detail = ?, hash = ? WHERE seq = ?",
                 (detail, entry_hash(prev_hash, seq, at, event, sale_ref, detail), seq))


def remove_sale_and_rechain(conn: sqlite3.Connection) -> None:
    """Sale 3 and its entry removed, the chain renumbered and recomputed: only the receipt numbers
    (1, 2, 4, 5) give it away."""
    conn.execute("DELETE FROM sales WHERE id = 3")
    rewrite(conn, [r for r in rows(conn) if r[3] != 3], rechain=True)


@pytest.mark.parametrize(("edit", "expected"), [
    (remove_middle, "entry 4: expected entry 3"),
    (swap_sequence_numbers, "entry 3: does not match its hash"),
    (swap_rows_keeping_numbers, "entry 3: does not match its hash"),
    (remove_middle_and_renumber, "entry 3: does not match its hash"),
    (edit_with_own_hash_recomputed, "entry 4: does not match its hash"),
    (remove_sale_and_rechain, "local receipt numbers are not a gap-free sequence"),
], ids=["removed", "reordered", "rows-swapped", "removed-renumbered", "rehashed-entry", "rechained"])
def test_verify_command_detects_the_tampering(config: Path, edit: Callable[[sqlite3.Connection], None],
                                              expected: str) -> None:
    """The technician's `verify` (Outbox.verify on a read-only open) passes on the intact journal, then
    exits 1 naming the problem."""
    assert verify(config) == (0, f"journal OK: {SALES} entries, chain intact, every sale journalled\n")
    as_attacker(config, edit)
    code, output = verify(config)
    assert code == 1, output
    assert "FAILED" in output
    assert any(line.startswith("PROBLEM ") and expected in line for line in output.splitlines()), output

