"""An in-process agent whose TSMS lane talks to a TSMS simulator (real sockets both ways)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from conftest import RULES
from starlette.testclient import TestClient

from agent.api import create_app
from agent.clock import system_clock
from agent.desk import ApiContext
from agent.kra.lane import KraLane
from agent.kra_window import KraWindow
from agent.queue.outbox import Outbox
from agent.queue.tsms_store import TsmsStore
from agent.secret import Secret
from agent.sync.client import TsmsClient
from agent.sync.credentials import StoredCredentials
from agent.sync.lane import SyncSettings, TsmsLane, head_office_builder
from agent.sync.simulator import Simulator
from agent.sync.transaction import Terminal

SERIAL, API_KEY = "TSMS-SIM-0001", "sim-api-key-0001"


def sync_agent(db_path: Path, sim: Simulator, *, batch_size: int = 50, max_body_bytes: int = 2 * 1024 * 1024,
               protocol: str = "v2.1", signer: KraLane | None = None, outbox: Outbox | None = None,
               sign_budget_s: float = 0.0, coalesce_s: float = 0.05,
               window: KraWindow | None = None) -> tuple[TestClient, Outbox, TsmsLane]:
    """A till API with a TSMS lane on `sim`; use the client as a context manager to run the lanes."""
    outbox = outbox or Outbox.open(db_path)
    terminal = Terminal(hardware_id=SERIAL, customer_code="C-T1001", protocol=protocol)
    client = TsmsClient(sim.api_url, connect_timeout=1.0, read_timeout=2.0)
    settings = SyncSettings(tenant_id=1, terminal_id=7, serial_number=SERIAL, batch_size=batch_size,
                            max_body_bytes=max_body_bytes, interval_s=0.2, backoff_base_s=0.05, backoff_max_s=0.5,
                            coalesce_s=coalesce_s)
    lane = TsmsLane(TsmsStore(outbox), client, StoredCredentials(None, Secret(API_KEY)), terminal, settings,
                    system_clock, window=window)
    ctx = ApiContext(outbox=outbox, rules=dataclasses.replace(RULES, head_office=head_office_builder(terminal)),
                     clock=system_clock, max_body_bytes=1_048_576, started_at=system_clock(), syncer=lane,
                     signer=signer, sign_budget_s=sign_budget_s,
                     on_shutdown=(lane.close, *((signer.close,) if signer else ())))
    return TestClient(create_app(ctx)), outbox, lane
