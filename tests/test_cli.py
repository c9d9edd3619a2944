"""The technician's commands, run in-process with Typer's runner against real files."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import RULES, FakeClock, make_sale
from typer.testing import CliRunner

from agent.cli import app
from agent.intake import accept
from agent.keystore import open_secret_store
from agent.kra.simulator import Simulator, SimulatorConfig
from agent.queue.outbox import Outbox

runner = CliRunner()


@pytest.fixture(name="config")
def _config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('data_dir = "data"\n[http]\ntill_token = "secret-token-0123456789"\n')
    return path


def fill(config: Path, n: int) -> None:
    box = Outbox.open(config.parent / "data" / "outbox.sqlite3")
    clock = FakeClock()
    for i in range(n):
        accept(box, make_sale(sale_id=f"S{i}"), RULES, clock())
    box.close()


class TestConfigCheck:
    def test_prints_settings_and_masks_the_token(self, config: Path) -> None:
        """config check prints the effective settings, never the token, and warns it is in the file."""
        result = runner.invoke(app, ["config", "check", "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 0
        assert "config OK" in result.output
        assert "token=set" in result.output
        assert "secret-token" not in result.output
        assert "http.till_token is in the config file" in result.output

    def test_bad_config_exits_2_with_the_key(self, tmp_path: Path) -> None:
        """A bad value exits 2 with a one-line message naming the key, no traceback."""
        path = tmp_path / "bad.toml"
        path.write_text("[http]\nport = -1\n")
        result = runner.invoke(app, ["config", "check", "--config", str(path)], catch_exceptions=False)
        assert result.exit_code == 2
        assert "http.port: -1 is out of range" in result.output
        assert "Traceback" not in result.output


class TestStatusAndVerify:
    def test_status_json(self, config: Path) -> None:
        """status reads the outbox and reports the backlog per lane."""
        fill(config, 3)
        result = runner.invoke(app, ["status", "--json", "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 0
        body = json.loads(result.output)
        assert body["sales"] == 3
        assert body["kra"] == {"queued": 3}

    def test_status_without_outbox_exits_4(self, config: Path) -> None:
        """status on a data directory with no outbox says so and exits 4."""
        result = runner.invoke(app, ["status", "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 4
        assert "no outbox" in result.output

    def test_verify_ok_then_tampered(self, config: Path) -> None:
        """verify passes on an intact journal and exits 1 naming the entry once one is edited."""
        fill(config, 3)
        ok = runner.invoke(app, ["verify", "--config", str(config)], catch_exceptions=False)
        assert ok.exit_code == 0
        assert "journal OK: 3 entries" in ok.output

        conn = sqlite3.connect(config.parent / "data" / "outbox.sqlite3", isolation_level=None)
        conn.execute("DROP TRIGGER journal_no_update")
        conn.execute("UPDATE journal SET at = '2020-01-01T00:00:00+00:00' WHERE seq = 2")
        conn.close()
        bad = runner.invoke(app, ["verify", "--config", str(config)], catch_exceptions=False)
        assert bad.exit_code == 1
        assert "entry 2" in bad.output
        assert "FAILED" in bad.output


class TestRunRefusals:
    def test_unusable_data_dir_exits_4_with_advice(self, tmp_path: Path) -> None:
        """A data directory that cannot be created is refused with a sentence, not a traceback."""
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("a file where the data directory should go")
        path = tmp_path / "agent.toml"
        path.write_text(f'data_dir = "{blocker / "data"}"\n[http]\nport = 0\n')
        result = runner.invoke(app, ["run", "--config", str(path)], catch_exceptions=False)
        assert result.exit_code == 4
        assert "cannot use the data directory" in result.output
        assert "Traceback" not in result.output


class TestInit:
    """`etims-agent init` against the KRA simulator over real sockets, keys in the file secret store."""

    @pytest.fixture(name="sim")
    def _sim(self) -> Iterator[Simulator]:
        with Simulator(SimulatorConfig()).start() as sim:
            yield sim

    def kra_config(self, tmp_path: Path, sim: Simulator, serial: str = "SIM-0001") -> Path:
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "kra.toml"
        path.write_text(f'data_dir = "data"\n[kra]\nbase_url = "{sim.api_url}"\ndevice_serial = "{serial}"\n'
                        '[secrets]\nbackend = "file"\n')
        return path

    def cmc_key(self, data_dir: Path) -> str:
        key = open_secret_store(data_dir, "file").get("kra.cmc_key")
        assert key is not None
        return key.reveal()

    def test_initialises_once_and_stores_the_key_encrypted(self, tmp_path: Path, sim: Simulator) -> None:
        """The first init stores the key (never printed, not in the database); a second changes nothing."""
        config = self.kra_config(tmp_path, sim)
        first = runner.invoke(app, ["init", "--config", str(config)], catch_exceptions=False)
        assert first.exit_code == 0, first.output
        assert "device initialised" in first.output and "SCU id" in first.output
        key = self.cmc_key(tmp_path / "data")
        assert key not in first.output
        data = tmp_path / "data"
        assert not any(key.encode() in f.read_bytes() for f in data.iterdir() if f.is_file())
        second = runner.invoke(app, ["init", "--config", str(config)])
        assert second.exit_code == 1
        assert "already initialised" in second.output and "Nothing was changed" in second.output

    def test_unknown_serial_is_explained(self, tmp_path: Path, sim: Simulator) -> None:
        """KRA's 901 for a serial it does not know names the settings to check."""
        config = self.kra_config(tmp_path, sim, serial="NOT-APPROVED")
        result = runner.invoke(app, ["init", "--config", str(config)])
        assert result.exit_code == 1
        assert "901" in result.output and "kra.device_serial" in result.output

    def test_second_agent_is_told_about_902_and_adopts_the_key(self, tmp_path: Path, sim: Simulator) -> None:
        """A device initialised elsewhere gets 902 explained; --cmc-key - adopts the key from stdin."""
        elsewhere = self.kra_config(tmp_path / "other", sim)
        assert runner.invoke(app, ["init", "--config", str(elsewhere)]).exit_code == 0
        config = self.kra_config(tmp_path, sim)
        refused = runner.invoke(app, ["init", "--config", str(config)])
        assert refused.exit_code == 1
        assert "902" in refused.output and "--cmc-key" in refused.output
        key = self.cmc_key(tmp_path / "other" / "data")
        sdc_id = str(sim.state()["branches"]["P052112956W/00"]["devices"][0]["sdcId"])
        adopted = runner.invoke(app, ["init", "--config", str(config), "--cmc-key", "-", "--scu-id", sdc_id],
                                input=key + "\n")
        assert adopted.exit_code == 0, adopted.output
        assert "device adopted" in adopted.output and key not in adopted.output


class TestSerialAndReceiptCommands:
    def test_serial_list_answers(self) -> None:
        result = runner.invoke(app, ["serial", "list", "--json"], catch_exceptions=False)
        assert result.exit_code == 0
        assert isinstance(json.loads(result.output), list)

    def test_serial_test_shows_what_the_till_sends(self) -> None:
        """A frame arrives on a pty: the command decodes it, answers ACK and exits 0."""
        import os
        import threading
        import tty

        from agent.devices.framing import ACK, encode

        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        path = os.ttyname(slave)
        sender = threading.Timer(0.5, lambda: os.write(master, b"noise" + encode(b'{"sale_id":"S-1"}', "framed")))
        sender.start()
        try:
            result = runner.invoke(app, ["serial", "test", path, "--mode", "framed", "--seconds", "2"])
            reply = os.read(master, 16)
        finally:
            sender.join()
            os.close(master)
            os.close(slave)
        assert result.exit_code == 0, result.output
        assert 'message: {"sale_id":"S-1"}' in result.output and "noise: 5 byte(s)" in result.output
        assert reply == bytes([ACK])

    def test_serial_test_on_a_missing_port(self) -> None:
        result = runner.invoke(app, ["serial", "test", "/dev/does-not-exist", "--seconds", "0.1"])
        assert result.exit_code == 2
        assert "serial list" in result.output

    def test_receipt_print_reprints_as_copy(self, tmp_path: Path) -> None:
        config = tmp_path / "agent.toml"
        device = tmp_path / "lp0"
        config.write_text(f'data_dir = "data"\n[secrets]\nbackend = "file"\n[[printers]]\nurl = "file:{device}"\n')
        fill(config, 1)
        result = runner.invoke(app, ["receipt", "print", "S0", "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        data = device.read_bytes()
        assert b"*** COPY ***" in data and b"TEMPORARY RECEIPT" in data
        missing = runner.invoke(app, ["receipt", "print", "NOPE", "--config", str(config)])
        assert missing.exit_code == 2 and "check the sale id" in missing.output


def test_json_logs_go_to_a_rotated_file_too(tmp_path: Path) -> None:
    """[log] file: JSON lines in a file that is rotated at max_bytes, keeping `backups` old files."""
    import logging

    from agent.logs import configure, get_logger

    log_file = tmp_path / "logs" / "agent.log"
    configure("info", "json", file=log_file, max_bytes=64 * 1024, backups=2)
    try:
        log = get_logger("agent.test")
        for i in range(2000):
            log.info("state_changed", n=i, detail="x" * 60)
    finally:
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers[:] = []
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["agent.log", "agent.log.1", "agent.log.2"]
    assert all(p.stat().st_size <= 64 * 1024 for p in log_file.parent.iterdir())
    last = json.loads(log_file.read_text().splitlines()[-1])
    assert (last["event"], last["n"], last["level"]) == ("state_changed", 1999, "info")


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), command


@pytest.mark.parametrize("name", [name for name, _ in _commands(typer.main.get_command(app))])
def test_every_command_has_an_example_and_its_exit_codes(name: str) -> None:
    command = dict(_commands(typer.main.get_command(app)))[name]
    assert "Example: etims-agent " in (command.help or ""), name
    assert "Exit codes:" in (command.help or ""), name
