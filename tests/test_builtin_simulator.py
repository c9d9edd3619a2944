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


def test_status_command_shows_the_running_agents_lanes(tmp_path: Path) -> None:
    """`etims-agent status` reads the outbox and asks the running agent for its lanes and budget."""
    import socket

    from agent_process import run_cli

    with socket.socket() as probe:  # a free port for the agent, so the command can find it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Agents(tmp_path) as agents:
        agents.config.write_text(agents.config.read_text().replace("port = 0\n", f"port = {port}\n"))
        agent = agents.start()
        httpx.post(f"{agent.url}/v1/sales", json=make_sale(sale_id="R-1"), timeout=30)
        result = run_cli("status", "--config", str(agents.config))
        assert agent.terminate() == 0
        stopped = run_cli("status", "--config", str(agents.config))
    assert result.returncode == 0, result.stderr
    assert "kra lane             online" in result.stdout and "drain ETA" in result.stdout
    assert "offline budget       ok" in result.stdout and "tsms lane" in result.stdout
    assert "not answering" in stopped.stdout
