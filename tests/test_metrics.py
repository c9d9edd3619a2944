"""GET /metrics: Prometheus text with the backlog, parked sales, lane states and latency histograms."""

from __future__ import annotations

from pathlib import Path

from conftest import make_sale
from kra_agent import BHF, TIN, init_key, kra_lane
from starlette.testclient import TestClient

from agent.api import create_app
from agent.clock import system_clock
from agent.desk import ApiContext
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.metrics import Metrics
from agent.queue.outbox import Outbox
from agent.receipts import Seller


def value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics:\n{text}")


def test_metrics_after_signing_and_an_outage(db_path: Path) -> None:
    from conftest import RULES

    with Simulator(SimulatorConfig()).start() as sim:
        key, sdc_id = init_key(sim)
        outbox = Outbox.open(db_path)
        metrics = Metrics(outbox, system_clock)
        lane = kra_lane(outbox, sim, key, sdc_id, on_round_trip=metrics.kra_round_trip.observe)
        ctx = ApiContext(outbox=outbox, rules=RULES, clock=system_clock, max_body_bytes=1_048_576,
                         started_at=system_clock(), signer=lane, sign_budget_s=2.0,
                         seller=Seller(tin=TIN, bhf_id=BHF, sdc_id=sdc_id), metrics=metrics,
                         on_shutdown=(lane.close,))
        with TestClient(create_app(ctx)) as client:
            assert client.post("/v1/sales", json=make_sale(sale_id="S-1")).json()["status"] == "signed"
            sim.set_faults(outage=True)
            client.post("/v1/sales", json=make_sale(sale_id="S-2"))
            response = client.get("/metrics")
        outbox.close()
    text = response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(text, "etims_kra_backlog") == 1
    assert value(text, 'etims_sales{state="signed"}') == 1
    assert value(text, "etims_intake_seconds_count") == 2
    assert value(text, "etims_kra_round_trip_seconds_count") >= 1
    assert value(text, 'etims_lane_up{lane="kra"}') == 0  # KRA is down now
    assert value(text, "etims_kra_oldest_unsigned_age_seconds") >= 0
    assert "cmcKey" not in text and key.reveal() not in text
