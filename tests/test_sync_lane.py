"""The TSMS lane against the TSMS simulator over real sockets: every sale at head office exactly
once, whatever the server does. Every check of what head office holds reads the simulator's state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RULES, make_sale
from kra_agent import init_key, kra_lane
from starlette.testclient import TestClient
from tsms_agent import SERIAL, sync_agent

from agent.clock import system_clock
from agent.intake import accept
from agent.kra.simulator import Simulator as KraSimulator
from agent.kra.simulator import SimulatorConfig as KraSimulatorConfig
from agent.kra_window import KraWindow
from agent.queue.outbox import Outbox
from agent.queue.tsms_store import TsmsStore
from agent.sync.lane import head_office_builder
from agent.sync.simulator import Simulator, TsmsSimulatorConfig
from agent.sync.transaction import Terminal

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(name="sim")
def _sim() -> Iterator[Simulator]:
    with Simulator(TsmsSimulatorConfig()).start() as sim:
        yield sim


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def post_many(client: TestClient, n: int, prefix: str = "S") -> None:
    for i in range(n):
        assert client.post("/v1/sales", json=make_sale(sale_id=f"{prefix}-{i}")).status_code == 201


def stored(db_path: Path, count: int) -> Outbox:
    """An outbox holding `count` sales (A-0, A-1, ...) that wait for head office."""
    box = Outbox.open(db_path)
    rules = dataclasses.replace(RULES, head_office=head_office_builder(Terminal(SERIAL, "C-T1001")))
    for i in range(count):
        accept(box, make_sale(sale_id=f"A-{i}"), rules, system_clock())
    return box


def synced_count(outbox: Outbox) -> int:
    return sum(s.tsms_state == "synced" for s in outbox.all_sales())


def all_synced(outbox: Outbox) -> bool:
    return all(s.tsms_state == "synced" for s in outbox.all_sales())


def assert_each_once(sim: Simulator, outbox: Outbox) -> None:
    """Head office holds every stored sale exactly once, and never answered 409."""
    state = sim.state()
    conn = outbox._reader
    ours = {row[0] for row in conn.execute("SELECT tsms_id FROM sales WHERE kind = 'sale'")}
    assert set(state["transactions"]) == ours
    assert all(t["times_received"] == 1 for t in state["transactions"].values())
    assert state["duplicates"] == [] and state["conflicts"] == []


def test_single_and_batch_submissions(sim: Simulator, db_path: Path) -> None:
    """One sale goes alone; 120 sales go in batches of at most 50; all held once."""
    client, outbox, _ = sync_agent(db_path, sim, batch_size=50)
    with client:
        post_many(client, 1, "A")
        wait_for(lambda: all_synced(outbox))
        post_many(client, 120, "B")
        wait_for(lambda: all_synced(outbox))
        status = client.get("/v1/status").json()["lanes"]["tsms"]
    assert status["state"] == "online" and status["backlog"] == 0
    assert_each_once(sim, outbox)
    sizes = [s["transaction_count"] for s in sim.state()["submissions"].values()]
    assert sizes[0] == 1 and max(sizes) <= 50 and sum(sizes) == 121
    assert outbox.verify() == []
    outbox.close()


def test_fewer_than_a_batch_left_after_a_submission_wait_for_more(sim: Simulator, db_path: Path) -> None:
    """After a submission, the sales left over (fewer than a batch) wait `coalesce_s` for more to
    arrive instead of going at once: each submission costs a request, a row and journal entries."""
    box = stored(db_path, 60)
    client, outbox, _ = sync_agent(db_path, sim, batch_size=50, coalesce_s=1.0, outbox=box)
    with client:
        wait_for(lambda: len(sim.state()["submissions"]) >= 1)
        post_many(client, 30, "B")  # while the 10 left over wait
        wait_for(lambda: all_synced(outbox))
    assert [s["transaction_count"] for s in sim.state()["submissions"].values()] == [50, 40]
    assert_each_once(sim, outbox)
    outbox.close()


def test_head_office_steps_wait_while_the_kra_lane_works_between_requests(sim: Simulator, db_path: Path) -> None:
    """A batch holds the event loop for milliseconds; a till waiting for KRA's answer would wait for it.
    So it is neither read nor stored while the KRA lane works between two requests, and goes as soon
    as the next request is on the wire (agent/kra_window.py)."""
    box = stored(db_path, 3)
    window = KraWindow(idle_after_s=60.0)
    _, outbox, lane = sync_agent(db_path, sim, outbox=box, window=window)

    async def go() -> tuple[bool, float | None]:
        window.answered()  # the KRA lane has just had an answer and is working on it
        step = asyncio.create_task(lane.step())
        await asyncio.sleep(0.3)
        held = TsmsStore(outbox).open_submission() is None and not sim.state()["submissions"]
        window.sent()
        try:
            async with asyncio.timeout(10):
                return held, await step
        finally:
            await lane.close()
    held, pause = asyncio.run(go())
    assert held, "the batch was read and stored while the KRA lane was between two requests"
    assert pause == 0.0 and all_synced(outbox)
    assert_each_once(sim, outbox)
    outbox.close()


def test_head_office_four_batches_behind_stops_waiting_for_kra(sim: Simulator, db_path: Path) -> None:
    """In a rush the window would let head office take a few steps per KRA request, and it would fall
    ever further behind: from four batches behind it goes at once, until it is nearer again."""
    box = stored(db_path, 10)
    window = KraWindow(idle_after_s=60.0)
    _, outbox, lane = sync_agent(db_path, sim, outbox=box, window=window, batch_size=2)

    async def go() -> tuple[list[int], bool]:
        window.answered()  # the KRA lane is busy between two requests, and stays so
        synced = []
        try:
            for _ in range(2):  # 10 waiting, then 8: four batches behind, so no wait
                async with asyncio.timeout(10):
                    await lane.step()
                synced.append(synced_count(outbox))
            step = asyncio.create_task(lane.step())  # 6 waiting: the window again
            await asyncio.sleep(0.3)
            waited = not step.done()
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step
        finally:
            await lane.close()
        return synced, waited
    assert asyncio.run(go()) == ([2, 4], True)
    assert synced_count(outbox) == 4
    outbox.close()


def test_lost_answer_is_resent_as_a_replay(sim: Simulator, db_path: Path) -> None:
    """The server stores a submission but the answer is lost: the same bytes go again and get a replay."""
    sim.set_faults(lose_response={"count": 1})
    client, outbox, _ = sync_agent(db_path, sim)
    with client:
        post_many(client, 3)
        wait_for(lambda: all_synced(outbox))
    assert_each_once(sim, outbox)
    assert sum(s["replays"] for s in sim.state()["submissions"].values()) >= 1
    outbox.close()


def test_revoked_token_means_one_new_authentication(sim: Simulator, db_path: Path) -> None:
    client, outbox, _ = sync_agent(db_path, sim)
    with client:
        post_many(client, 1, "A")
        wait_for(lambda: all_synced(outbox))
        sim.set_faults(revoke_tokens=True)
        post_many(client, 1, "B")
        wait_for(lambda: all_synced(outbox))
    state = sim.state()
    assert state["tokens_issued"] == 2 and state["unauthorized"] >= 1
    assert_each_once(sim, outbox)
    outbox.close()


def test_a_429_storm_is_obeyed(db_path: Path) -> None:
    """With a limit of 3 submissions per 2 s window and one sale per submission, the lane waits for
    Retry-After instead of hammering: few 429s, and everything arrives."""
    with Simulator(TsmsSimulatorConfig(rate_limit=3, rate_window_s=2.0)).start() as sim:
        client, outbox, _ = sync_agent(db_path, sim, batch_size=1)
        with client:
            post_many(client, 9)
            wait_for(lambda: all_synced(outbox), timeout=30)
        state = sim.state()
        assert state["rate_limited"] <= 4, state["rate_limited"]
        assert_each_once(sim, outbox)
        outbox.close()


def test_too_large_is_split(db_path: Path) -> None:
    """A server that takes smaller bodies than ours answers 413; the lane halves until they fit."""
    with Simulator(TsmsSimulatorConfig(max_body_bytes=8 * 1024)).start() as sim:
        client, outbox, _ = sync_agent(db_path, sim, batch_size=40)
        with client:
            post_many(client, 40)
            wait_for(lambda: all_synced(outbox))
        assert_each_once(sim, outbox)
        assert any(r for r in sim.state()["requests"].values())
        outbox.close()


def test_rejected_sale_is_set_aside_and_the_rest_arrive(sim: Simulator, db_path: Path) -> None:
    """A batch the server refuses is halved until the bad sale is alone; it is set aside with the
    server's words, and every other sale arrives."""
    client, outbox, _ = sync_agent(db_path, sim, batch_size=10)
    post_many(client, 6)  # outside `with`: the lanes are not running yet
    bad = outbox.get("TILL-1", "S-3")
    assert bad is not None
    conn = outbox._conn  # spoil one stored transaction, as a bug in an older version might have
    conn.execute("UPDATE outgoing SET body = replace(body, '\"NONE\"', '\"\"') WHERE sale_ref = ? AND lane = 'tsms'",
                 (bad.id,))
    with client:
        wait_for(lambda: all(s.tsms_state in ("synced", "rejected") for s in outbox.all_sales()))
    states = {s.sale_id: s.tsms_state for s in outbox.all_sales()}
    assert states.pop("S-3") == "rejected"
    assert set(states.values()) == {"synced"}
    assert len(sim.state()["transactions"]) == 5 and sim.state()["conflicts"] == []
    outbox.close()


def test_hardware_id_mismatch_is_a_configuration_error(db_path: Path) -> None:
    from agent.sync.simulator import SimTerminal

    with Simulator(TsmsSimulatorConfig(terminals=(SimTerminal(serial_number="OTHER-SERIAL"),))).start() as sim:
        client, outbox, _ = sync_agent(db_path, sim)
        with client:
            post_many(client, 1)
            wait_for(lambda: client.get("/v1/status").json()["lanes"]["tsms"]["state"] == "config_error")
            detail = client.get("/v1/status").json()["lanes"]["tsms"]["detail"]
        assert "tsms.hardware_id" in detail or "HARDWARE_ID_MISMATCH" in detail
        outbox.close()


def test_kra_down_does_not_stop_head_office(sim: Simulator, db_path: Path) -> None:
    """With KRA unreachable, sales get temporary receipts and still reach TSMS (whose steps wait for
    the KRA lane's window, which an outage must leave open)."""
    with KraSimulator(KraSimulatorConfig()).start() as kra:
        key, sdc_id = init_key(kra)
        kra.set_faults(outage=True)
        outbox = Outbox.open(db_path)
        window = KraWindow()
        lane = kra_lane(outbox, kra, key, sdc_id, window=window)
        client, outbox, _ = sync_agent(db_path, sim, signer=lane, outbox=outbox, sign_budget_s=0.3, window=window)
        with client:
            post_many(client, 5)
            wait_for(lambda: all_synced(outbox))
            assert all(s.kra_state != "signed" for s in outbox.all_sales())
        assert_each_once(sim, outbox)
        outbox.close()


def test_head_office_syncs_while_kra_works_on_each_sale(sim: Simulator, db_path: Path) -> None:
    """The KRA lane opens the window when its request is on the wire and closes it at KRA's answer:
    with a bound of a minute, head office gets every sale only if the requests open it."""
    with KraSimulator(KraSimulatorConfig()).start() as kra:
        key, sdc_id = init_key(kra)
        kra.set_faults(latency_ms=400)  # KRA signs for 4 s, head office needs well under 1 s of it
        outbox = Outbox.open(db_path)
        window = KraWindow(idle_after_s=60.0)
        lane = kra_lane(outbox, kra, key, sdc_id, window=window)
        client, outbox, _ = sync_agent(db_path, sim, signer=lane, outbox=outbox, sign_budget_s=0.0, window=window,
                                       batch_size=2)
        with client:
            post_many(client, 2, "A")
            wait_for(lambda: any(s.kra_state == "signed" for s in outbox.all_sales()))
            post_many(client, 8, "B")  # head office gets these only in KRA's windows
            wait_for(lambda: all_synced(outbox) and all(s.kra_state == "signed" for s in outbox.all_sales()))
            assert not window.is_open(), "KRA's last answer did not close the window"
        assert_each_once(sim, outbox)
        outbox.close()


def test_tsms_down_does_not_stop_signing(sim: Simulator, db_path: Path) -> None:
    """With head office unreachable, KRA signs every sale; TSMS gets them once it is back."""
    sim.set_faults(outage=True)
    with KraSimulator(KraSimulatorConfig()).start() as kra:
        key, sdc_id = init_key(kra)
        outbox = Outbox.open(db_path)
        window = KraWindow()
        lane = kra_lane(outbox, kra, key, sdc_id, window=window)
        client, outbox, _ = sync_agent(db_path, sim, signer=lane, outbox=outbox, sign_budget_s=2.0, window=window)
        with client:
            for i in range(5):
                assert client.post("/v1/sales", json=make_sale(sale_id=f"S-{i}")).json()["status"] == "signed"
            wait_for(lambda: client.get("/v1/status").json()["lanes"]["tsms"]["state"] == "offline")
            sim.set_faults(outage=False)
            wait_for(lambda: all_synced(outbox))
        assert_each_once(sim, outbox)
        outbox.close()


class TestCreditNotes:
    def test_whole_sale_credit_note_voids_the_transaction(self, sim: Simulator, db_path: Path) -> None:
        """A credit note for the whole sale is a void at head office; a partial one is not sent."""
        client, outbox, _ = sync_agent(db_path, sim)
        with client:
            post_many(client, 2)
            wait_for(lambda: all_synced(outbox))
            whole = client.post("/v1/sales/S-0/credit-notes", json={"credit_note_id": "CN-1", "reason": "06"})
            part = client.post("/v1/sales/S-1/credit-notes",
                               json={"credit_note_id": "CN-2", "reason": "06", "lines": [{"line": 1, "qty": "1"}]})
            assert (whole.status_code, part.status_code) == (201, 201)
            wait_for(lambda: all_synced(outbox))
            events = [(e.event, e.detail) for e in outbox.journal() if e.event == "tsms_void"]
        sold = {s.sale_id: s for s in outbox.all_sales()}
        state = sim.state()
        conn = outbox._reader
        tsms_id = {r[0]: r[1] for r in conn.execute("SELECT sale_id, tsms_id FROM sales")}
        assert state["transactions"][tsms_id["S-0"]]["voided_at"] is not None
        assert state["transactions"][tsms_id["S-1"]]["voided_at"] is None
        assert state["voids"] == 1
        assert sold["CN-2"].tsms_state == "synced" and '"sent":false' in events[1][1]
        outbox.close()


def test_heartbeat_gives_the_clock_offset(sim: Simulator, db_path: Path) -> None:
    client, outbox, lane = sync_agent(db_path, sim)
    with client:
        post_many(client, 1)
        wait_for(lambda: all_synced(outbox))
        client.portal.call(lane.heartbeat)  # type: ignore[union-attr]
        offset = client.get("/v1/status").json()["lanes"]["tsms"]["clock_offset_s"]
    assert offset is not None and abs(offset) < 1.0  # the simulator runs on this machine's clock
    assert sim.state()["heartbeats"] == 1
    outbox.close()


def test_token_rotation_revokes_the_old_token(sim: Simulator, db_path: Path) -> None:
    """After a refresh the old token is refused by the server and the new one is used."""
    client, outbox, lane = sync_agent(db_path, sim)
    with client:
        post_many(client, 1, "A")
        wait_for(lambda: all_synced(outbox))
        client.portal.call(lane.rotate_token)  # type: ignore[union-attr]
        post_many(client, 1, "B")
        wait_for(lambda: all_synced(outbox))
    state = sim.state()
    assert state["tokens_issued"] == 2 and state["unauthorized"] == 0
    assert_each_once(sim, outbox)
    outbox.close()
