"""The quick-start agent (`etims-agent run` on its defaults) signs with its built-in simulator,
across restarts too: the simulator starts empty each time, and the agent registers its items again."""

from __future__ import annotations

from pathlib import Path

import httpx
from agent_process import Agents
from conftest import make_sale


def test_signs_before_and_after_a_restart(tmp_path: Path) -> None:
    with Agents(tmp_path) as agents:
        for sale_id in ("R-1", "R-2"):
            agent = agents.start()
            answer = httpx.post(f"{agent.url}/v1/sales", json=make_sale(sale_id=sale_id), timeout=30).json()
            assert (answer["status"], answer["receipt"]["kind"]) == ("signed", "signed"), answer
            assert agent.terminate() == 0, agent.log()
