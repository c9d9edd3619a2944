"""KRA's code lists: merged, cached in the database, refreshed by the scheduler; tax rates from class 04."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

from agent_process import Agents
from conftest import RULES, FakeClock, make_sale
from kra_agent import BHF, TIN, init_key
from starlette.testclient import TestClient

from agent.api import create_app
from agent.desk import ApiContext
from agent.kra.client import KraClient
from agent.kra.code_lists import CODES, CodeLists, merge_codes, merge_item_classes, refund_reasons, tax_rates
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.sales import DEFAULT_TAX_RATES
from agent.scheduler import Job, start


def cls(code: str, *details: tuple[str, str, str]) -> dict[str, object]:
    return {"cdCls": code, "cdClsNm": f"class {code}",
            "dtlList": [{"cd": cd, "cdNm": name, "userDfnCd1": rate, "useYn": "Y"} for cd, name, rate in details]}


class TestPure:
    def test_an_update_is_merged_into_the_cache(self) -> None:
        first = merge_codes({}, {"clsList": [cls("04", ("A", "A-Exempt", "0"), ("B", "B-16%", "16"))]})
        later = merge_codes(first, {"clsList": [cls("04", ("B", "B-14%", "14"))]})
        assert set(later["04"]["codes"]) == {"A", "B"}
        assert later["04"]["codes"]["B"]["userDfnCd1"] == "14"
        assert first["04"]["codes"]["B"]["userDfnCd1"] == "16"  # the cache given in is not changed

    def test_rates_come_from_class_04_with_defaults_for_the_rest(self) -> None:
        codes = merge_codes({}, {"clsList": [cls("04", ("B", "B", "14"), ("E", "E", "not a rate"))]})
        rates = tax_rates(codes, DEFAULT_TAX_RATES)
        assert rates == {**DEFAULT_TAX_RATES, "B": Decimal(14)}

    def test_a_code_out_of_use_is_ignored(self) -> None:
        codes = merge_codes({}, {"clsList": [cls("04", ("B", "B", "14"))]})
        codes["04"]["codes"]["B"]["useYn"] = "N"
        assert tax_rates(codes, DEFAULT_TAX_RATES)["B"] == Decimal(16)

    def test_refund_reasons_and_item_classes(self) -> None:
        codes = merge_codes({}, {"clsList": [cls("32", ("06", "Refund", ""), ("01", "Missing Quantity", ""))]})
        assert refund_reasons(codes) == {"01": "Missing Quantity", "06": "Refund"}
        classes = merge_item_classes({}, {"itemClsList": [{"itemClsCd": "5059690800", "itemClsNm": "Bread"}]})
        assert classes["5059690800"]["itemClsNm"] == "Bread"
        assert merge_codes({}, {"unexpected": True}) == {} and merge_item_classes({}, None) == {}


def test_refresh_caches_and_asks_only_for_changes(outbox: Outbox) -> None:
    """A refresh stores KRA's lists; a second asks since the first (001: nothing new) and keeps them;
    a new CodeLists reads the cache without asking KRA."""
    with Simulator(SimulatorConfig()).start() as sim:
        key, _ = init_key(sim)

        async def go() -> tuple[bool, bool]:
            client = KraClient(sim.api_url, tin=TIN, bhf_id=BHF, cmc_key=key)
            try:
                codes = CodeLists(KraStore(outbox), client, FakeClock(), DEFAULT_TAX_RATES)
                return await codes.refresh(), await codes.refresh()
            finally:
                await client.aclose()

        assert asyncio.run(go()) == (True, True)
        assert sim.state()["requests"]["selectCodeList"] == 2
    cached = CodeLists(KraStore(outbox), None, FakeClock(), {band: Decimal(99) for band in "ABCDE"})
    assert cached.rates() == DEFAULT_TAX_RATES  # KRA's rates, not the (silly) configured ones
    assert cached.reasons()["06"]
    assert cached.item_class("5059690800") is not None


def test_new_sales_are_priced_with_kra_rates(outbox: Outbox, clock: FakeClock) -> None:
    """Once KRA's class 04 says B is 14 %, the next sale's VAT is computed at 14 %."""
    store = KraStore(outbox)
    store.save_code_list(CODES, merge_codes({}, {"clsList": [cls("04", ("B", "B", "14"))]}), clock())
    codes = CodeLists(store, None, clock, DEFAULT_TAX_RATES)
    ctx = ApiContext(outbox=outbox, rules=RULES, clock=clock, max_body_bytes=1_048_576, started_at=clock(),
                     tax_rates=codes.rates)
    with TestClient(create_app(ctx)) as client:
        body = client.post("/v1/sales", json=make_sale()).json()
    band_b = next(b for b in body["receipt"]["bands"] if b["band"] == "B")
    assert (band_b["rate"], band_b["tax"]) == ("14", "14.25")  # 116.00 incl. 14 %: 116 * 14 / 114


def test_jobs_run_at_start_and_then_repeat() -> None:
    runs: list[float] = []

    async def job() -> None:
        runs.append(time.monotonic())
        if len(runs) == 2:
            raise RuntimeError("a failing run does not stop the job")

    async def go() -> None:
        from datetime import UTC, datetime
        scheduler = start((Job("test", job, every_s=0.05),), datetime.now(UTC))
        try:
            for _ in range(100):
                if len(runs) >= 4:
                    return
                await asyncio.sleep(0.02)
        finally:
            scheduler.shutdown(wait=False)

    asyncio.run(go())
    assert len(runs) >= 4


def test_the_running_agent_fetches_the_lists(tmp_path: Path) -> None:
    """A real agent on its defaults (built-in simulator) has KRA's lists in its database soon after start."""
    with Agents(tmp_path) as agents:
        agent = agents.start()
        deadline = time.monotonic() + 20
        names: set[str] = set()
        while names != {"codes", "item_classes"}:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
            conn = sqlite3.connect(f"file:{agents.outbox}?mode=ro", uri=True)
            try:
                names = {r[0] for r in conn.execute("SELECT name FROM kra_code_lists")}
            finally:
                conn.close()
        assert agent.terminate() == 0, agent.log()
