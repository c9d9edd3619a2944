"""`etims-agent doctor`: as a real subprocess beside a running agent and real simulators, and through
typer's runner; every failing line names the fix."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_process import Agents, SimulatorProcess, run_cli, write_config
from typer.testing import CliRunner

from agent.cli import app

TSMS_API_KEY = "sim-api-key-0001"  # the simulator's default terminal


def findings(config: Path) -> tuple[int, dict[str, dict[str, str]]]:
    done = run_cli("doctor", "--json", "--config", str(config))
    assert done.stdout, done.stderr
    return done.returncode, {f["check"]: f for f in json.loads(done.stdout)}


def test_all_well_beside_a_running_agent_then_kra_down_and_a_damaged_outbox(
        tmp_path: Path, sims: tuple[SimulatorProcess, SimulatorProcess]) -> None:
    kra, tsms = sims
    with Agents(tmp_path, kra_url=kra.api_url, tsms_url=tsms.api_url) as agents:
        with socket.socket() as free:  # doctor looks for the agent on its configured port, so fix one
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        agents.config.write_text(agents.config.read_text().replace("port = 0", f"port = {port}"))
        for command in (["init"], ["init", "tsms", "--api-key", TSMS_API_KEY]):
            assert run_cli(*command, "--config", str(agents.config)).returncode == 0
        agent = agents.start()
        code, found = findings(agents.config)
        assert code == 0, found
        for check in ("config", "secrets", "database", "disk", "http", "kra", "tsms", "clock"):
            assert found[check]["level"] == "ok", found[check]
        assert "answers" in found["http"]["detail"] and "quick_check ok" in found["database"]["detail"]

        httpx.post(f"{kra.control_url}/_sim/faults", json={"outage": True}, timeout=5).raise_for_status()
        code, found = findings(agents.config)
        assert code == 1 and found["kra"]["level"] == "fail"
        assert "kra.base_url" in found["kra"]["fix"] and found["tsms"]["level"] == "ok"

        plain = run_cli("doctor", "--config", str(agents.config))
        assert plain.returncode == 1
        assert any(line.startswith("FAIL kra") for line in plain.stdout.splitlines()), plain.stdout
        assert "-> check the network" in plain.stdout
        assert agent.terminate() == 0

    with agents.outbox.open("r+b") as f:  # a damaged page in the middle of the file
        f.seek(3 * 4096)
        f.write(b"\xa5" * 4096)
    code, found = findings(agents.config)
    assert code == 1 and found["database"]["level"] == "fail", found["database"]
    assert "outbox rescue" in found["database"]["fix"]
    assert found["http"]["level"] == "warn" and "not running" in found["http"]["detail"]


def test_a_port_held_by_another_program_and_missing_keys_fail_with_the_fix(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path, kra_url="http://127.0.0.1:9/etims-api", http_extra="")
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        code, found = findings(config)
    assert code == 1
    assert found["http"]["level"] == "fail" and "another http.port" in found["http"]["fix"]
    assert found["secrets"]["level"] == "fail" and "etims-agent init" in found["secrets"]["detail"]
    assert found["kra"]["level"] == "fail" and "init" in found["kra"]["fix"]


def test_runner_on_the_built_in_defaults_warns_but_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETIMS_AGENT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ETIMS_AGENT_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = {f["check"]: f for f in json.loads(result.output)}
    assert found["kra"]["level"] == "skip" and found["database"]["level"] == "warn"
    assert not (tmp_path / "data").exists(), "doctor must change nothing"
