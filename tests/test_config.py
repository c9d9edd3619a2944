"""Config parsing: the example parses, defaults hold, and every error names its key."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from agent.app import check_exposure
from agent.config import load_config, parse_config
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return parse_config(text, base_dir=Path("/etc/etims"), env=env or {}, source="test.toml")


class TestExample:
    def test_example_parses_to_the_defaults(self) -> None:
        """config.example.toml parses, and every value it shows is the built-in default."""
        example = load_config(ROOT / "config.example.toml", env={})
        defaults = parse("")
        assert example.http == defaults.http
        assert example.sales == defaults.sales
        assert example.tax == defaults.tax
        assert example.log == defaults.log
        assert example.kra == defaults.kra
        assert example.secrets == defaults.secrets
        assert example.retention == defaults.retention
        assert example.data_dir == ROOT / "data"

    def test_example_mentions_every_key(self) -> None:
        """Every setting the parser knows appears in the example, commented out or not."""
        text = (ROOT / "config.example.toml").read_text()
        for key in ("data_dir", "[http]", "host", "port", "till_token", "max_body_bytes",
                    "[sales]", "prices_include_vat", "max_lines", "[tax.default_rates]",
                    "[log]", "level", "format", "[kra]", "environment", "base_url", "tin", "branch_id",
                    "device_serial", "cmc_key", "connect_timeout_s", "read_timeout_s", "sign_budget_s",
                    "backoff_base_s", "backoff_max_s", "user_id", "user_name", "origin_country",
                    "[secrets]", "backend", "[retention]", "keep_days"):
            assert key in text


class TestValues:
    def test_defaults(self) -> None:
        """With no file the agent listens on 127.0.0.1:8089 with VAT-inclusive prices."""
        cfg = parse("")
        assert (cfg.http.host, cfg.http.port, cfg.http.till_token) == ("127.0.0.1", 8089, None)
        assert cfg.sales.prices_include_vat is True
        assert cfg.tax.default_rates["B"] == Decimal(16)
        assert cfg.tax.default_rates["E"] == Decimal(8)

    def test_relative_data_dir_is_relative_to_the_file(self) -> None:
        """A relative data_dir resolves against the config file's folder, not the working dir."""
        assert parse('data_dir = "var/agent"').data_dir == Path("/etc/etims/var/agent")
        assert parse('data_dir = "/srv/agent"').data_dir == Path("/srv/agent")

    def test_environment_overrides(self) -> None:
        """ETIMS_AGENT_DATA_DIR and ETIMS_AGENT_TILL_TOKEN override the file."""
        cfg = parse('[http]\ntill_token = "file-token-0123456789"',
                    env={"ETIMS_AGENT_DATA_DIR": "/srv/x",
                         "ETIMS_AGENT_TILL_TOKEN": "env-token-0123456789"})
        assert cfg.data_dir == Path("/srv/x")
        assert cfg.http.till_token is not None
        assert cfg.http.till_token.reveal() == "env-token-0123456789"
        assert cfg.secrets_in_file == ()

    def test_token_in_file_is_flagged_and_masked(self) -> None:
        """A token written in the file works but is flagged, and never shows in a repr."""
        cfg = parse('[http]\ntill_token = "file-token-0123456789"')
        assert cfg.secrets_in_file == ("http.till_token",)
        assert "file-token" not in repr(cfg)
        assert "file-token" not in str(cfg.http.till_token)

    def test_custom_rates(self) -> None:
        """Rates may be integers or decimals."""
        cfg = parse("[tax.default_rates]\nB = 16.5\nE = 8")
        assert cfg.tax.default_rates["B"] == Decimal("16.5")


ERRORS = [
    ("colour = 1", "colour", "unknown setting"),
    ("[http]\nprot = 8089", "http.prot", "unknown setting"),
    ("[htp]\nport = 8089", "htp", "unknown setting"),
    ("http = 5", "http", "expected a table"),
    ('[http]\nport = "8089"', "http.port", "expected an integer"),
    ("[http]\nport = 70000", "http.port", "out of range"),
    ("[http]\nport = true", "http.port", "expected an integer"),
    ('[http]\nhost = "my-laptop"', "http.host", "not an IP address"),
    ('[http]\nhost = ""', "http.host", "is empty"),
    ('[http]\ntill_token = "short"', "http.till_token", "shorter than 16"),
    ("[http]\nmax_body_bytes = 10", "http.max_body_bytes", "out of range"),
    ('[sales]\nprices_include_vat = "yes"', "sales.prices_include_vat", "expected true or false"),
    ("[sales]\nmax_lines = 0", "sales.max_lines", "out of range"),
    ("[sales]\nmax_lines = 10000", "sales.max_lines", "out of range"),
    ("[tax.default_rates]\nB = 116", "tax.default_rates.B", "out of range"),
    ('[tax.default_rates]\nB = "x"', "tax.default_rates.B", "not a number"),
    ("[tax.default_rates]\nF = 5", "tax.default_rates.F", "unknown setting"),
    ('[log]\nlevel = "loud"', "log.level", "not allowed"),
    ('[log]\nformat = "xml"', "log.format", "not allowed"),
    ("data_dir = 3", "data_dir", "expected a string"),
    ("[http\nport = 1", "(file)", "not valid TOML"),
    ('[kra]\nbase_url = "etims.example"', "kra.base_url", "not a URL"),
    ('[kra]\nenvironment = "sandbox"\nbase_url = "http://etims.example"', "kra.base_url", "not an https URL"),
    ('[kra]\nenvironment = "sandbox"\ndevice_serial = "x"', "kra.tin", "is required"),
    ('[kra]\nenvironment = "sandbox"\ntin = "P051234567Q"', "kra.device_serial", "is required"),
    ('[kra]\nenvironment = "live"', "kra.environment", "not allowed"),
    ('[kra]\ntin = "12345"', "kra.tin", "not a KRA PIN"),
    ('[kra]\nbranch_id = "000"', "kra.branch_id", "not a branch id"),
    ('[kra]\nsign_budget_s = -1', "kra.sign_budget_s", "out of range"),
    ('[kra]\nread_timeout_s = "30"', "kra.read_timeout_s", "expected a number"),
    ('[kra]\ncmc_key = "short"', "kra.cmc_key", "shorter than 16"),
    ('[secrets]\nbackend = "vault"', "secrets.backend", "not allowed"),
    ('[tsms]\nenvironment = "server"\nbase_url = "https://ho.example"', "tsms.hardware_id", "is required"),
    ('[tsms]\nprotocol = "v3"', "tsms.protocol", "not allowed"),
    ('[tsms]\nbatch_size = 501', "tsms.batch_size", "out of range"),
    ("[[serial.ports]]\nbaudrate = 9600", "serial.ports[0].url", "is required"),
    ('[[serial.ports]]\nurl = "/dev/ttyUSB0"\nparity = "X"', "serial.ports[0].parity", "not allowed"),
    ('[[serial.ports]]\nurl = "/dev/ttyUSB0"\nstopbits = 3', "serial.ports[0].stopbits", "not a number of stop"),
    ('[[serial.ports]]\nurl = "COM3"\nspeed = 9600', "serial.ports[0].speed", "unknown setting"),
    ('[[printers]]\nurl = "file:/dev/usb/lp0"\nwidth = 40', "printers[0].width", "not allowed"),
    ("[serial]\nports = 3", "serial.ports", "expected an array of tables"),
    ("[retention]\nkeep_days = -1", "retention.keep_days", "out of range"),
    ("[retention]\nkeep_days = 1.5", "retention.keep_days", "expected a whole number of days"),
    ('[retention]\nkeep_days = "30"', "retention.keep_days", "expected a whole number of days"),
    ("[retention]\nkeep_days = true", "retention.keep_days", "expected a whole number of days"),
    ("[retention]\nkeep_days = 100000", "retention.keep_days", "out of range"),
    ("[retention]\nkeep = 30", "retention.keep", "unknown setting"),
    ("retention = 30", "retention", "expected a table"),
]


class TestErrors:
    @pytest.mark.parametrize(("text", "key", "problem"), ERRORS)
    def test_error_names_key_problem_and_fix(self, text: str, key: str, problem: str) -> None:
        """Each bad value is refused with the key, the problem, a hint and the file."""
        with pytest.raises(ConfigError) as info:
            parse(text)
        err = info.value
        assert err.key == key
        assert problem in err.problem
        assert err.hint
        message = str(err)
        assert message.startswith(f"{key}: ")
        assert "test.toml" in message

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is named in the error."""
        with pytest.raises(ConfigError, match="does not exist"):
            load_config(tmp_path / "nope.toml", env={})

    def test_config_from_environment(self, tmp_path: Path) -> None:
        """ETIMS_AGENT_CONFIG points at the file when --config is not given."""
        path = tmp_path / "agent.toml"
        path.write_text("[http]\nport = 9001\n")
        assert load_config(None, env={"ETIMS_AGENT_CONFIG": str(path)}).http.port == 9001


class TestExposure:
    def test_non_loopback_without_token_is_refused(self) -> None:
        """Binding beyond loopback without a till token is a config error naming http.host."""
        with pytest.raises(ConfigError) as info:
            check_exposure(parse('[http]\nhost = "0.0.0.0"'))
        assert info.value.key == "http.host"
        assert "till_token" in info.value.hint

    def test_non_loopback_with_token_is_allowed(self) -> None:
        """With a till token the agent may listen on the shop's network."""
        check_exposure(parse('[http]\nhost = "0.0.0.0"\ntill_token = "0123456789abcdef0123"'))

    @pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    def test_loopback_needs_no_token(self, host: str) -> None:
        """Every loopback address is allowed without a token."""
        check_exposure(parse(f'[http]\nhost = "{host}"'))
