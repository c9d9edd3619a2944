"""The quick-start agent (`etims-agent run` on its defaults) signs with its built-in KRA simulator
and syncs to its built-in TSMS simulator, across restarts too: the simulators start empty each
time, and the agent registers its items with KRA again."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from agent_process import Agents
from conftest import make_sale


def test_signs_and_syncs_before_and_after_a_restart(tmp_path: Path) -> None:
    with Agents(tmp_path) as agents:
        for sale_id in ("R-1", "R-2"):
            agent = agents.start()
            answer = httpx.post(f"{agent.url}/v1/sales", json=make_sale(sale_id=sale_id), timeout=30).json()
            assert (answer["status"], answer["receipt"]["kind"]) == ("signed", "signed"), answer
            deadline = time.monotonic() + 20
            while (tsms := httpx.get(f"{agent.url}/v1/status", timeout=10).json()["lanes"]["tsms"])["backlog"]:
                assert time.monotonic() < deadline, tsms
                time.sleep(0.2)
            assert tsms["state"] == "online", tsms
            assert agent.terminate() == 0, agent.log()
