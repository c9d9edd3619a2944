"""The offline budget and the clock guard: pure rules, then the agent against the KRA simulator."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import make_sale
from kra_agent import agent_client, init_key

from agent.kra.simulator import Simulator, SimulatorConfig
from agent.policy import BudgetSettings, ClockGuard, ClockSettings, offline_budget

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
SETTINGS = BudgetSettings(warn_after_h=12, limit_h=48, count_limit=100)


class TestBudget:
    def test_levels_by_age(self) -> None:
        assert offline_budget(SETTINGS, 0, None, NOW).level == "ok"
        assert offline_budget(SETTINGS, 1, NOW - timedelta(hours=11), NOW).level == "ok"
        warning = offline_budget(SETTINGS, 1, NOW - timedelta(hours=13), NOW)
        assert warning.level == "warning" and "13.0 h" in str(warning.message)
        assert warning.time_left_s == 35 * 3600
        assert offline_budget(SETTINGS, 1, NOW - timedelta(hours=48), NOW).level == "exhausted"

    def test_levels_by_count(self) -> None:
        assert offline_budget(SETTINGS, 79, NOW, NOW).level == "ok"
        assert offline_budget(SETTINGS, 80, NOW, NOW).level == "warning"
        exhausted = offline_budget(SETTINGS, 100, NOW, NOW)
        assert exhausted.level == "exhausted" and exhausted.count_left == 0
        assert "still taken" in str(exhausted.message)
        refusing = offline_budget(BudgetSettings(count_limit=100, action="refuse"), 100, NOW, NOW)
        assert "refused" in str(refusing.message)


class TestClockGuard:
    def test_verdicts(self) -> None:
        guard = ClockGuard(ClockSettings(warn_s=60, refuse_s=600))
        assert guard.verdict() == ("ok", None)
        guard.note("kra", 30.0, NOW)
        assert guard.verdict()[0] == "ok"
        guard.note("tsms", -90.0, NOW + timedelta(seconds=1))  # the freshest sample counts
        level, message = guard.verdict()
        assert level == "warning" and "ahead of" in str(message)
        guard.note("kra", 700.0, NOW + timedelta(seconds=2))
        assert guard.verdict()[0] == "refuse"
        assert guard.status()["sources"] == {"kra": 700.0, "tsms": -90.0}


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_exhausted_budget_refuses_new_sales_but_answers_replays(db_path: Path) -> None:
    """KRA down, three sales allowed: the third is taken with a warning on its receipt, the fourth is
    refused with a clear error, a repeat of the first is still answered; once KRA drains, sales flow."""
    with Simulator(SimulatorConfig()).start() as sim:
        key, sdc_id = init_key(sim)
        sim.set_faults(outage=True)
        offline = BudgetSettings(count_limit=3, action="refuse")
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=0.2, offline=offline)
        with client:
            bodies = [client.post("/v1/sales", json=make_sale(sale_id=f"S-{i}")).json() for i in range(3)]
            assert "offline_warning" not in bodies[0]["receipt"]
            time.sleep(1.1)  # the budget is recomputed at most once a second
            refused = client.post("/v1/sales", json=make_sale(sale_id="S-3"))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "offline_budget_exhausted"
            replay = client.post("/v1/sales", json=make_sale(sale_id="S-0"))
            assert replay.status_code == 200
            assert "OFFLINE LIMIT" in replay.json()["receipt"]["offline_warning"]
            assert "OFFLINE LIMIT" in client.get("/v1/sales/S-0/receipt").text
            assert client.get("/v1/status").json()["offline_budget"]["level"] == "exhausted"
            sim.set_faults(outage=False)
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()))
            time.sleep(1.1)
            assert client.post("/v1/sales", json=make_sale(sale_id="S-3")).status_code == 201
        assert len(outbox.all_sales()) == 4
        outbox.close()


def test_a_wrong_clock_stops_signing_until_it_is_fixed(db_path: Path) -> None:
    """With the clock 20 minutes off, the lane signs nothing and says why; fixed, it signs."""
    with Simulator(SimulatorConfig()).start() as sim:
        key, sdc_id = init_key(sim)
        guard = ClockGuard(ClockSettings(warn_s=60, refuse_s=600))
        guard.note("tsms", 1200.0, datetime.now(UTC))
        client, outbox = agent_client(db_path, sim, key, sdc_id, budget=0.5, guard=guard)
        with client:
            body = client.post("/v1/sales", json=make_sale()).json()
            assert body["status"] == "pending"
            wait_for(lambda: "clock" in str(client.get("/v1/status").json()["lanes"]["kra"]["detail"]))
            status = client.get("/v1/status").json()
            assert status["clock"]["level"] == "refuse"
            assert sim.state()["branches"]["P052112956W/00"]["invoices"] == {}
            guard.note("tsms", 0.5, datetime.now(UTC) + timedelta(seconds=1))
            wait_for(lambda: all(s.kra_state == "signed" for s in outbox.all_sales()), timeout=40)
        outbox.close()
