"""No secret ever reaches a log line, a command's output or the database: a real agent with real
keys (KRA cmcKey from `init`, the TSMS API key and bearer token, the till token, the receipt key),
every reading command run against it, and everything they wrote searched for every secret."""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx
import pytest
from agent_process import Agents, SimulatorProcess, run_cli
from conftest import make_sale

from agent.keystore import open_secret_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TILL_TOKEN = "till-token-9f3a7c1e5b2d4068"
TSMS_KEY = "sim-api-key-0001"


def test_no_secret_in_logs_outputs_or_database(tmp_path: Path, sims: tuple[SimulatorProcess, SimulatorProcess]
                                               ) -> None:
    kra, tsms = sims
    outputs: list[str] = []
    bundle = tmp_path / "audit.zip"
    with Agents(tmp_path, kra_url=kra.api_url, tsms_url=tsms.api_url) as agents:
        config = agents.config
        config.write_text(config.read_text().replace("port = 0\n", f'port = 0\ntill_token = "{TILL_TOKEN}"\n'))
        for command in (["init"], ["init", "tsms", "--api-key", TSMS_KEY]):
            result = run_cli(*command, "--config", str(config))
            assert result.returncode == 0, result.stderr
            outputs += [result.stdout, result.stderr]
        agent = agents.start()
        auth = {"Authorization": f"Bearer {TILL_TOKEN}"}
        with httpx.Client(base_url=agent.url, headers=auth, timeout=30) as http:
            for i in range(3):
                assert http.post("/v1/sales", json=make_sale(sale_id=f"S-{i}")).status_code == 201
            for path in ("/v1/status", "/metrics", "/v1/sales/S-0", "/v1/sales/S-0/receipt", "/openapi.json"):
                outputs.append(http.get(path).text)
        for command in (["status"], ["status", "--json"], ["config", "show"], ["config", "show", "--json"],
                        ["config", "check"], ["outbox", "list"], ["outbox", "show", "S-0"], ["verify"],
                        ["receipt", "show", "S-0"], ["receipt", "show", "S-0", "--format", "json"],
                        ["doctor"], ["doctor", "--json"], ["codes", "refresh", "--json"], ["items", "list"],
                        ["export", "--from", "2000-01-01", "--to", "2100-01-01", "--out", str(bundle)],
                        ["verify", "--bundle", str(bundle), "--json"]):
            result = run_cli(*command, "--config", str(config))
            outputs += [result.stdout, result.stderr]
        with zipfile.ZipFile(bundle) as zf:  # what an auditor takes away
            outputs += [zf.read(name).decode("utf-8", "replace") for name in zf.namelist()]
        assert agent.terminate() == 0
        outputs.append(agent.log())
        store = open_secret_store(agents.data_dir, "file")
        secrets = {name: store.get(name) for name in ("kra.cmc_key", "tsms.api_key", "tsms.token",
                                                      "agent.receipt_key")}
        assert all(secrets.values()), f"a secret was not stored: {[k for k, v in secrets.items() if v is None]}"
        values = {name: secret.reveal() for name, secret in secrets.items() if secret is not None}
        values["http.till_token"] = TILL_TOKEN
        files = [p for p in agents.data_dir.iterdir() if p.is_file() and not p.name.startswith("secrets.")]
        blobs = {str(p.name): p.read_bytes() for p in files}
    text = "\n".join(outputs)
    assert "S-0" in text and "P052112956W" in text  # the outputs are real
    for name, value in values.items():
        assert value not in text, f"{name} appears in a log line or a command's output"
        for file, data in blobs.items():
            assert value.encode() not in data, f"{name} appears in {file}"
