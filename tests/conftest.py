"""Shared fixtures: real SQLite files under tmp_path, a sale factory, an in-process API client."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_process import SimulatorProcess
from starlette.testclient import TestClient

from agent.api import create_app
from agent.desk import ApiContext
from agent.intake import IntakeRules
from agent.queue.outbox import Outbox
from agent.receipt_signing import ReceiptSigner
from agent.sales import DEFAULT_TAX_RATES
from agent.secret import Secret

# The README's example sale (installer/examples/sale.json, also the smoke test's and the benchmarks'),
# without its customer.
EXAMPLE_SALE: dict[str, Any] = json.loads((Path(__file__).resolve().parents[1] / "installer" / "examples"
                                          / "sale.json").read_text(encoding="utf-8"))
BASE_SALE: dict[str, Any] = {k: v for k, v in EXAMPLE_SALE.items() if k != "customer"}


def make_sale(**changes: Any) -> dict[str, Any]:
    """A valid sale as a till would post it, with top-level fields replaced."""
    sale = copy.deepcopy(BASE_SALE)
    sale.update(changes)
    return sale


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 21, 11, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="db_path")
def _db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "outbox.sqlite3"


@pytest.fixture(name="outbox")
def _outbox(db_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(db_path)
    yield box
    box.close()


RULES = IntakeRules(tax_rates=DEFAULT_TAX_RATES)
RECEIPT_SIGNER = ReceiptSigner.generate()  # the agent's temporary-receipt key in API tests


def api_client(outbox: Outbox, clock: FakeClock, *, token: Secret | None = None,
               max_body_bytes: int = 1_048_576) -> TestClient:
    ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock,
                     max_body_bytes=max_body_bytes, started_at=clock(), receipt_signer=RECEIPT_SIGNER)
    return TestClient(create_app(ctx, till_token=token))


@pytest.fixture(name="client")
def _client(outbox: Outbox, clock: FakeClock) -> Iterator[TestClient]:
    with api_client(outbox, clock) as client:
        yield client


# Upstream simulators as their own processes (`etims-agent simulate ...`): their state outlives
# the agents a test starts and kills.
def _simulator(tmp_path: Path, kind: str) -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(tmp_path, kind)
    try:
        yield sim
    finally:
        sim.close()


@pytest.fixture(name="kra")
def _kra_process(tmp_path: Path) -> Iterator[SimulatorProcess]:
    yield from _simulator(tmp_path, "kra")


@pytest.fixture(name="tsms")
def _tsms_process(tmp_path: Path) -> Iterator[SimulatorProcess]:
    yield from _simulator(tmp_path, "tsms")


@pytest.fixture(name="sims")
def _sims(kra: SimulatorProcess, tsms: SimulatorProcess) -> tuple[SimulatorProcess, SimulatorProcess]:
    return kra, tsms
