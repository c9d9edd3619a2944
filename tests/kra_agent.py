"""An in-process agent wired to a KRA simulator, for the lane tests (real sockets both ways)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from conftest import RULES
from starlette.testclient import TestClient

from agent.api import create_app
from agent.clock import system_clock
from agent.desk import ApiContext
from agent.kra.client import KraClient
from agent.kra.device import initialise
from agent.kra.lane import KraLane, LaneSettings
from agent.kra.payloads import Seller as PayloadSeller
from agent.kra.simulator import Simulator
from agent.kra_window import KraWindow
from agent.policy import BudgetSettings, ClockGuard
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.receipts import Seller
from agent.secret import Secret

TIN, BHF, SERIAL = "P052112956W", "00", "SIM-0001"


def init_key(sim: Simulator) -> tuple[Secret, str]:
    """Initialise the simulator's device once and return its cmcKey and SCU id."""
    async def go() -> tuple[Secret, str]:
        client = KraClient(sim.api_url, tin=TIN, bhf_id=BHF, cmc_key=None)
        try:
            init = await initialise(client, tin=TIN, bhf_id=BHF, serial=SERIAL)
        finally:
            await client.aclose()
        return init.cmc_key, init.sdc_id
    return asyncio.run(go())


def kra_lane(outbox: Outbox, sim: Simulator, key: Secret, sdc_id: str, *, read_timeout: float = 2.0,
             guard: ClockGuard | None = None, on_round_trip: Callable[[float], None] | None = None,
             window: KraWindow | None = None) -> KraLane:
    """The KRA lane of an agent on `outbox`, talking to `sim` (its client closes with the lane's app)."""
    store = KraStore(outbox)
    if store.device() is None:
        store.save_device(tin=TIN, bhf_id=BHF, serial=SERIAL, sdc_id=sdc_id, mrc_no=None, info={},
                          now=system_clock())
    client = KraClient(sim.api_url, tin=TIN, bhf_id=BHF, cmc_key=key, connect_timeout=1.0,
                       read_timeout=read_timeout)
    return KraLane(store, client, PayloadSeller(TIN, BHF), system_clock,
                   LaneSettings(backoff_base_s=0.05, backoff_max_s=0.4), clock_guard=guard,
                   on_round_trip=on_round_trip, window=window)


def agent_client(db_path: Path, sim: Simulator, key: Secret, sdc_id: str, *, budget: float = 2.0,
                 read_timeout: float = 2.0, offline: BudgetSettings | None = None,
                 guard: ClockGuard | None = None) -> tuple[TestClient, Outbox]:
    """A till API whose KRA lane talks to `sim`; use as a context manager to run the lane."""
    outbox = Outbox.open(db_path)
    lane = kra_lane(outbox, sim, key, sdc_id, read_timeout=read_timeout, guard=guard)
    ctx = ApiContext(outbox=outbox, rules=RULES, clock=system_clock, max_body_bytes=1_048_576,
                     started_at=system_clock(), signer=lane, sign_budget_s=budget,
                     seller=Seller(tin=TIN, bhf_id=BHF, sdc_id=sdc_id, environment="sandbox"),
                     on_shutdown=(lane.close,), budget=offline, clock_guard=guard)
    return TestClient(create_app(ctx)), outbox
