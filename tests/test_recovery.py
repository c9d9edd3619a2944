"""A damaged outbox at start-up: quarantined, a fresh one keeps selling, KRA's numbering is learned
again, and the technician's rescue brings back every readable sale, none signed twice.

Real agent processes, a real KRA simulator process, real files damaged on disk.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import AgentProcess, Agents, SimulatorProcess, run_cli
from conftest import RULES, make_sale

from agent.errors import OutboxDamaged
from agent.intake import accept
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.queue.recovery import (
    RescueRefused,
    distrust_numbering,
    numbering_learned,
    open_or_quarantine,
    rescue,
)

BRANCH = "P052112956W/00"  # the simulator's default device


@pytest.fixture(name="agents")
def _agents(tmp_path: Path, kra: SimulatorProcess) -> Iterator[Agents]:
    with Agents(tmp_path, kra_url=kra.api_url, sign_budget_s=3.0) as agents:
        init = run_cli("init", "--config", str(agents.config))
        assert init.returncode == 0, init.stdout + init.stderr
        yield agents


def post(agent: AgentProcess, sale_id: str) -> dict[str, Any]:
    response = httpx.post(f"{agent.url}/v1/sales", json=make_sale(sale_id=sale_id), timeout=10)
    assert response.status_code in (200, 201, 202), response.text
    body: dict[str, Any] = response.json()
    return body


def kra_branch(kra: SimulatorProcess) -> dict[str, Any]:
    branch: dict[str, Any] = httpx.get(f"{kra.control_url}/_sim/state", timeout=10).json()["branches"][BRANCH]
    return branch


def outage(kra: SimulatorProcess, on: bool) -> None:
    response = httpx.post(f"{kra.control_url}/_sim/faults", json={"outage": on}, timeout=10)
    assert response.status_code == 200, response.text


def states(outbox: Path) -> dict[str, tuple[str, int | None]]:
    conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
    try:
        return {s: (k, n) for s, k, n in conn.execute("SELECT sale_id, kra_state, kra_invc_no FROM sales")}
    finally:
        conn.close()


def wait_signed(outbox: Path, count: int, timeout: float = 30.0) -> dict[str, tuple[str, int | None]]:
    deadline = time.monotonic() + timeout
    while True:
        now = states(outbox)
        if len(now) >= count and all(state == "signed" for state, _ in now.values()):
            return now
        assert time.monotonic() < deadline, f"not all signed: {now}"
        time.sleep(0.1)


def assert_kra_clean(kra: SimulatorProcess) -> dict[int, str]:
    branch = kra_branch(kra)
    assert branch["gaps"] == [], f"invoice numbers skipped at KRA: {branch['gaps']}"
    assert branch["trd_invc_no_signed_twice"] == [], branch["trd_invc_no_signed_twice"]
    return {int(no): inv["trdInvcNo"] for no, inv in branch["invoices"].items()}


def damage_one_page(db: Path) -> set[int]:
    """Overwrite one page of the sales table so some rows cannot be read and others can.

    Tried on copies first: the page chosen is the last one whose loss costs some rows but not all.
    Returns the ids of the rows it made unreadable.
    """
    data = db.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    pages = len(data) // page_size
    probe = db.with_name("probe.sqlite3")
    for page in range(pages, 2, -1):
        start = (page - 1) * page_size
        probe.write_bytes(data[:start] + b"\xa5" * page_size + data[start + page_size:])
        conn = sqlite3.connect(f"file:{probe}?mode=ro", uri=True)
        try:
            ids = range(1, conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'sales'").fetchone()[0] + 1)
            lost = set()
            for sale_ref in ids:
                try:
                    conn.execute("SELECT * FROM sales WHERE id = ?", (sale_ref,)).fetchone()
                except sqlite3.DatabaseError:
                    lost.add(sale_ref)
            counters_ok = conn.execute("SELECT count(*) FROM counters").fetchone()[0] > 0
        except sqlite3.DatabaseError:
            continue
        finally:
            conn.close()
        if counters_ok and 0 < len(lost) < len(ids) // 2:
            shutil.move(probe, db)
            return lost
    raise AssertionError("no page of the sales table could be damaged on its own")


def test_a_damaged_outbox_is_quarantined_and_numbering_continues_after_kras(agents: Agents,
                                                                            kra: SimulatorProcess) -> None:
    agent = agents.start()
    for n in range(8):
        assert post(agent, f"A-{n}")["status"] == "signed"
    agent.kill()  # the newest sales are still in the write-ahead log
    # Both headers go (the log's too, or SQLite would read the newest page 1 from it): SQLite no
    # longer knows the file, and nothing of it can be read.
    for path, size in ((agents.outbox, 100), (Path(f"{agents.outbox}-wal"), 32)):
        with path.open("r+b") as f:
            f.write(b"\x00" * size)

    agent = agents.start()
    assert "event=outbox_quarantined" in agent.log()
    quarantined = sorted((agents.data_dir / "quarantine").glob("outbox-*.sqlite3"))
    assert len(quarantined) == 1
    assert Path(f"{quarantined[0]}-wal").exists(), "the write-ahead log must travel with the damaged file"
    for n in range(3):
        assert post(agent, f"B-{n}")["status"] == "signed"  # selling goes on at once
    assert "event=kra_numbering_learned" in agent.log()
    at_kra = assert_kra_clean(kra)
    assert sorted(at_kra) == list(range(1, 12)), "the fresh outbox must go on after KRA's last number"
    assert [at_kra[n] for n in (9, 10, 11)] == ["B-0", "B-1", "B-2"]

    verify = run_cli("verify", "--config", str(agents.config))
    assert verify.returncode == 1, verify.stdout  # invoices 1..8 live only in the quarantined file
    assert "outbox rescue" in verify.stdout and "1, 2, 3, 4, 5, 6, 7, 8" in verify.stdout
    agent.terminate()


def test_rescue_brings_back_every_readable_sale_and_none_is_signed_twice(agents: Agents,
                                                                         kra: SimulatorProcess) -> None:
    agent = agents.start()
    for n in range(24):
        assert post(agent, f"S-{n}")["status"] == "signed"
    outage(kra, True)
    for n in range(6):
        assert post(agent, f"Q-{n}")["status"] != "signed"  # temporary receipts, queued
    assert agent.terminate() == 0
    lost_ids = damage_one_page(agents.outbox)
    outage(kra, False)

    agent = agents.start()
    assert "event=outbox_quarantined" in agent.log()
    for n in range(2):
        assert post(agent, f"N-{n}")["status"] == "signed"  # the device identity was salvaged: no new init
    quarantined = next((agents.data_dir / "quarantine").glob("outbox-*.sqlite3"))

    dry = run_cli("outbox", "rescue", str(quarantined), "--dry-run", "--json", "--config", str(agents.config))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert states(agents.outbox).keys() == {"N-0", "N-1"}, "a dry run changes nothing"
    done = run_cli("outbox", "rescue", str(quarantined), "--config", str(agents.config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"read {30 - len(lost_ids)} sale(s)" in done.stdout
    assert f"{len(lost_ids)} row(s) could not be read" in done.stdout

    rows = wait_signed(agents.outbox, 32 - len(lost_ids))
    lost = {f"S-{i - 1}" if i <= 24 else f"Q-{i - 25}" for i in lost_ids}
    expected = {f"S-{n}" for n in range(24)} | {f"Q-{n}" for n in range(6)} | {"N-0", "N-1"}
    assert rows.keys() == expected - lost
    at_kra = assert_kra_clean(kra)
    ours = {no: sale for sale, (_, no) in rows.items()}
    assert all(at_kra[no] == sale for no, sale in ours.items()), "agent and KRA disagree"
    # Every sale KRA holds is here, except the signed ones whose row was on the damaged page.
    assert {sale for sale in at_kra.values()} - set(rows) == {s for s in lost if s.startswith("S-")}

    again = run_cli("outbox", "rescue", str(quarantined), "--config", str(agents.config))
    assert "imported 0" in again.stdout and "already in the live outbox" in again.stdout
    verify = run_cli("verify", "--config", str(agents.config))
    lost_signed = sorted(int(s[2:]) + 1 for s in lost if s.startswith("S-"))
    if lost_signed:
        assert verify.returncode == 1 and ", ".join(map(str, lost_signed)) in verify.stdout, verify.stdout
    else:
        assert verify.returncode == 0, verify.stdout
    agent.terminate()


def test_a_garbage_file_in_place_of_the_outbox_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database, it is a shopping list" * 100)
    with pytest.raises(OutboxDamaged, match="outbox rescue"):
        Outbox.open(path)
    outbox, quarantined = open_or_quarantine(path, datetime(2026, 11, 21, 8, 0, tzinfo=UTC))
    try:
        assert quarantined is not None and quarantined.path.name == "outbox-20261121T080000Z.sqlite3"
        assert quarantined.path.read_bytes().startswith(b"this is not a database")  # kept as found
        assert quarantined.salvage.unreadable  # and what could not be read is said
        assert outbox.verify() == []
        assert [e.event for e in outbox.journal()] == ["quarantined"]
    finally:
        outbox.close()


def test_rescue_waits_until_kras_numbering_is_known(tmp_path: Path) -> None:
    damaged = tmp_path / "old.sqlite3"
    Outbox.open(damaged).close()
    outbox = Outbox.open(tmp_path / "outbox.sqlite3")
    try:
        distrust_numbering(outbox, "test", datetime(2026, 11, 21, tzinfo=UTC))
        with pytest.raises(RescueRefused, match="KRA lane online"):
            rescue(outbox, damaged, datetime(2026, 11, 21, tzinfo=UTC))
    finally:
        outbox.close()


def test_rescue_counts_a_sale_posted_again_and_pruned_since_as_already_there(tmp_path: Path) -> None:
    """The till posted the sale again to the fresh outbox, where retention has since pruned it: the
    rescue leaves it alone (its tombstone refuses a second copy) and goes on with the rest."""
    now = datetime(2026, 11, 21, tzinfo=UTC)
    damaged = tmp_path / "old.sqlite3"
    old = Outbox.open(damaged)
    for sale_id in ("S-1", "S-2"):
        accept(old, make_sale(sale_id=sale_id), RULES, now)
    old.close()
    outbox = Outbox.open(tmp_path / "outbox.sqlite3")
    try:
        distrust_numbering(outbox, "test", now)
        numbering_learned(outbox, 0, 1, now)
        with outbox._write() as conn:
            conn.execute("INSERT INTO pruned_sales (till_id, sale_id, sale_ref, receipt_no, kra_invc_no) "
                         "VALUES ('TILL-1', 'S-1', 7, 7, 7)")
        report = rescue(outbox, damaged, now)
        assert (report.read, report.already_there, report.imported, report.conflicts) == (2, 1, 1, [])
        assert [s.sale_id for s in outbox.all_sales()] == ["S-2"]
    finally:
        outbox.close()


def test_a_held_number_whose_request_cannot_be_read_goes_to_a_person(tmp_path: Path) -> None:
    """The quarantined file still holds the sale but not the request it sent under invoice 1, which KRA
    holds: only KRA can say whose invoice 1 is, so the sale is left for a person, never requeued."""
    now = datetime(2026, 11, 21, tzinfo=UTC)
    damaged = tmp_path / "old.sqlite3"
    old = Outbox.open(damaged)
    accept(old, make_sale(sale_id="S-1"), RULES, now)
    head = KraStore(old).next_work()
    assert head is not None and KraStore(old).allocate(head.id, lambda n: f"request {n}", now, items=[]) is not None
    with old._write() as conn:
        conn.execute("DELETE FROM outgoing WHERE lane = 'kra'")  # as if its page were unreadable
    old.close()
    outbox = Outbox.open(tmp_path / "outbox.sqlite3")
    try:
        distrust_numbering(outbox, "test", now)
        numbering_learned(outbox, 1, 1, now)  # KRA holds invoice 1
        report = rescue(outbox, damaged, now)
        assert report.imported == 0 and outbox.all_sales() == []
        assert len(report.conflicts) == 1 and "KRA holds invoice 1" in report.conflicts[0]
    finally:
        outbox.close()
