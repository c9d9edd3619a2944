"""TOML settings parsed into frozen, typed dataclasses.

Parsing is pure (`parse_config(text, base_dir, env)`); `load_config` only finds and reads the file.
Unknown keys are errors because a misspelt key silently ignored is a setting that never applied.
Every error names the key, what is wrong and the fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.sales import DEFAULT_TAX_RATES, MAX_LINES_KRA, TAX_BANDS
from agent.secret import Secret

CONFIG_ENV = "ETIMS_AGENT_CONFIG"
DATA_DIR_ENV = "ETIMS_AGENT_DATA_DIR"
TILL_TOKEN_ENV = "ETIMS_AGENT_TILL_TOKEN"
CMC_KEY_ENV = "ETIMS_AGENT_KRA_CMC_KEY"
TSMS_API_KEY_ENV = "ETIMS_AGENT_TSMS_API_KEY"

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8089
    till_token: Secret | None = None
    max_body_bytes: int = 1_048_576

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


@dataclass(frozen=True, kw_only=True, slots=True)
class SalesSettings:
    prices_include_vat: bool = True
    max_lines: int = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class TaxSettings:
    default_rates: Mapping[str, Decimal] = field(default_factory=lambda: dict(DEFAULT_TAX_RATES))


KRA_URLS = {
    "sandbox": "https://etims-api-sbx.kra.go.ke/etims-api",
    "production": "https://etims-api.kra.go.ke/etims-api",
}
SIMULATOR_DEVICE = ("P052112956W", "00", "SIM-0001")  # the built-in simulator's known device


@dataclass(frozen=True, kw_only=True, slots=True)
class KraSettings:
    environment: str = "simulator"  # simulator (built in, started with the agent), sandbox, production
    base_url: str = ""  # empty: KRA's URL for the environment, or the built-in simulator's
    tin: str = SIMULATOR_DEVICE[0]
    branch_id: str = SIMULATOR_DEVICE[1]
    device_serial: str = SIMULATOR_DEVICE[2]
    cmc_key: Secret | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    sign_budget_s: float = 3.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    user_id: str = "etims-agent"
    user_name: str = "etims-agent"
    origin_country: str = "KE"
    code_refresh_h: float = 24.0  # how often KRA's code lists and item classes are refreshed

    @property
    def url(self) -> str:
        return self.base_url or KRA_URLS.get(self.environment, "")


TSMS_SIMULATOR_TERMINAL = ("TSMS-SIM-0001", "sim-api-key-0001", 1, 7, "C-T1001")  # the built-in simulator's


@dataclass(frozen=True, kw_only=True, slots=True)
class TsmsSettings:
    environment: str = "simulator"  # simulator (built in, started with the agent), server, off
    base_url: str = ""  # the head office's TSMS server, e.g. https://tsms.example.com
    protocol: str = "v2.1"  # checksum version: v2.1 (current server), v2.0, legacy (older shape too)
    hardware_id: str = TSMS_SIMULATOR_TERMINAL[0]  # the terminal serial registered at head office
    tenant_id: int = TSMS_SIMULATOR_TERMINAL[2]
    terminal_id: int = TSMS_SIMULATOR_TERMINAL[3]
    customer_code: str = TSMS_SIMULATOR_TERMINAL[4]
    api_key: Secret | None = None  # development only; `etims-agent init tsms` stores it in the keyring
    batch_size: int = 50
    max_body_bytes: int = 2 * 1024 * 1024
    sync_interval_s: float = 10.0
    heartbeat_interval_s: float = 300.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 600.0


@dataclass(frozen=True, kw_only=True, slots=True)
class SerialPortSettings:
    url: str  # /dev/ttyUSB0, COM3, socket://host:port, loop://, a pty path
    mode: str = "plain"  # plain: one JSON object per line; framed: STX/ETX/CRC with ACK/NAK
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # N, E, O, M, S
    stopbits: float = 1.0
    read_timeout_s: float = 0.1
    reopen_interval_s: float = 2.0  # how often a lost port is tried again
    max_bytes: int = 1_048_576  # largest message


@dataclass(frozen=True, kw_only=True, slots=True)
class PrinterSettings:
    url: str  # file:/dev/usb/lp0, socket://192.168.1.50:9100, /dev/ttyUSB1, COM4 (pyserial URLs)
    width: int = 42  # columns: 32 (58 mm paper), 42 or 48 (80 mm)
    temporary: bool = True  # print temporary receipts by themselves
    signed: bool = True  # print signed receipts by themselves
    signed_after_temporary: bool = True  # print the signed copy once a temporary receipt is signed
    baudrate: int = 9600  # for serial printers
    retry_interval_s: float = 5.0


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicySettings:
    offline_warn_after_h: float = 12.0  # warn once the oldest unsigned sale is this old
    offline_limit_h: float = 48.0  # the offline budget is exhausted at this age...
    offline_count_limit: int = 2000  # ...or this many unsigned sales
    offline_action: str = "warn"  # when exhausted: warn (keep taking sales) or refuse (new sales)
    clock_warn_s: float = 60.0  # clock offset from KRA/TSMS that is shown as a warning
    clock_refuse_s: float = 600.0  # offset at which signing stops until the clock is fixed


@dataclass(frozen=True, kw_only=True, slots=True)
class RetentionSettings:
    keep_days: int = 30  # prune sales KRA signed and head office holds once this old; 0 keeps everything


@dataclass(frozen=True, kw_only=True, slots=True)
class SecretSettings:
    backend: str = "auto"  # auto: the platform keyring if there is one, else our encrypted file


@dataclass(frozen=True, kw_only=True, slots=True)
class LogSettings:
    level: str = "info"
    format: str = "logfmt"
    file: Path | None = None  # also write the log here, rotated (relative paths: to the config file)
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    data_dir: Path
    http: HttpSettings = field(default_factory=HttpSettings)
    sales: SalesSettings = field(default_factory=SalesSettings)
    tax: TaxSettings = field(default_factory=TaxSettings)
    log: LogSettings = field(default_factory=LogSettings)
    kra: KraSettings = field(default_factory=KraSettings)
    tsms: TsmsSettings = field(default_factory=TsmsSettings)
    serial_ports: tuple[SerialPortSettings, ...] = ()
    printers: tuple[PrinterSettings, ...] = ()
    policy: PolicySettings = field(default_factory=PolicySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    secrets: SecretSettings = field(default_factory=SecretSettings)
    source: str = "built-in defaults"
    secrets_in_file: tuple[str, ...] = ()
    """Keys whose secret came from the config file; fine for development, warned about otherwise."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read the config from `path`, else from $ETIMS_AGENT_CONFIG, else use the built-in defaults."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is None:
        return parse_config("", base_dir=Path.cwd(), env=env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "--config", f"{path} does not exist", "give the path of an existing TOML file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {path} ({exc})", "check the file") from None
    return parse_config(text, base_dir=path.resolve().parent, env=env, source=str(path))


def parse_config(
    text: str, *, base_dir: Path, env: Mapping[str, str], source: str = "built-in defaults"
) -> Config:
    """Parse TOML text; relative paths resolve against `base_dir` (the config file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"not valid TOML: {exc}", "fix the syntax", source=source) from None

    root = _Table(raw, "", source)
    data_dir = root.take("data_dir", _path(base_dir), base_dir / "data")
    http_t = root.table("http")
    sales_t = root.table("sales")
    tax_t = root.table("tax")
    log_t = root.table("log")
    kra_t = root.table("kra")
    tsms_t = root.table("tsms")
    serial_t = root.table("serial")
    secrets_t = root.table("secrets")
    printer_ts = root.tables("printers")
    policy_t = root.table("policy")
    retention_t = root.table("retention")
    root.done()

    in_file: list[str] = []
    token = http_t.take("till_token", _secret, None)
    if token is not None:
        in_file.append("http.till_token")
    http = HttpSettings(
        host=http_t.take("host", _host, "127.0.0.1"),
        port=http_t.take("port", _int(0, 65535), 8089),
        till_token=token,
        max_body_bytes=http_t.take("max_body_bytes", _int(1024, 64 * 1024 * 1024), 1_048_576),
    )
    http_t.done()

    sales = SalesSettings(
        prices_include_vat=sales_t.take("prices_include_vat", _bool, True),
        max_lines=sales_t.take("max_lines", _int(1, MAX_LINES_KRA), 1000),
    )
    sales_t.done()

    rates_t = tax_t.table("default_rates")
    rates = {band: rates_t.take(band, _rate, DEFAULT_TAX_RATES[band]) for band in TAX_BANDS}
    rates_t.done()
    tax_t.done()

    log_file = log_t.take("file", _bounded_str(1000), "")
    log = LogSettings(
        level=log_t.take("level", _choice("debug", "info", "warning", "error"), "info"),
        format=log_t.take("format", _choice("logfmt", "json"), "logfmt"),
        file=_path(base_dir)(log_file, log_t.key("file")) if log_file else None,
        max_bytes=log_t.take("max_bytes", _int(64 * 1024, 1024 * 1024 * 1024), 10 * 1024 * 1024),
        backups=log_t.take("backups", _int(1, 100), 5),
    )
    log_t.done()

    kra = _kra(kra_t)
    if kra.cmc_key is not None:
        in_file.append("kra.cmc_key")
    tsms = _tsms(tsms_t)
    serial_ports = tuple(_serial_port(t) for t in serial_t.tables("ports"))
    serial_t.done()
    printers = tuple(_printer(t) for t in printer_ts)
    policy = _policy(policy_t)
    retention = RetentionSettings(keep_days=retention_t.take("keep_days", _keep_days, 30))
    retention_t.done()
    if tsms.api_key is not None:
        in_file.append("tsms.api_key")
    secrets = SecretSettings(backend=secrets_t.take("backend", _choice("auto", "keyring", "file"), "auto"))
    secrets_t.done()

    # The environment overrides the file: it is how a service manager hands over paths and secrets.
    if env.get(DATA_DIR_ENV):
        data_dir = _path(Path.cwd())(env[DATA_DIR_ENV], DATA_DIR_ENV)
    if env.get(TILL_TOKEN_ENV):
        http = _replace_token(http, _secret(env[TILL_TOKEN_ENV], TILL_TOKEN_ENV))
        in_file = [k for k in in_file if k != "http.till_token"]

    if env.get(CMC_KEY_ENV):
        kra = replace(kra, cmc_key=_secret(env[CMC_KEY_ENV], CMC_KEY_ENV))
        in_file = [k for k in in_file if k != "kra.cmc_key"]
    if env.get(TSMS_API_KEY_ENV):
        tsms = replace(tsms, api_key=_secret(env[TSMS_API_KEY_ENV], TSMS_API_KEY_ENV))
        in_file = [k for k in in_file if k != "tsms.api_key"]

    return Config(
        data_dir=data_dir,
        http=http,
        sales=sales,
        tax=TaxSettings(default_rates=rates),
        log=log,
        kra=kra,
        tsms=tsms,
        serial_ports=serial_ports,
        printers=printers,
        policy=policy,
        retention=retention,
        secrets=secrets,
        source=source,
        secrets_in_file=tuple(in_file),
    )


def _kra(t: _Table) -> KraSettings:
    env = t.take("environment", _choice("simulator", "sandbox", "production"), "simulator")
    device = SIMULATOR_DEVICE if env == "simulator" else (None, "00", None)
    kra = KraSettings(
        environment=env,
        base_url=t.take("base_url", _url(require_https=env != "simulator"), ""),
        tin=t.take("tin", _pin, device[0]) or "",
        branch_id=t.take("branch_id", _branch, device[1]) or "00",
        device_serial=t.take("device_serial", _serial, device[2]) or "",
        cmc_key=t.take("cmc_key", _secret, None),
        connect_timeout_s=t.take("connect_timeout_s", _seconds(0.1, 120), 5.0),
        read_timeout_s=t.take("read_timeout_s", _seconds(0.1, 600), 30.0),
        sign_budget_s=t.take("sign_budget_s", _seconds(0, 60), 3.0),
        backoff_base_s=t.take("backoff_base_s", _seconds(0.01, 3600), 1.0),
        backoff_max_s=t.take("backoff_max_s", _seconds(0.01, 86400), 300.0),
        user_id=t.take("user_id", _bounded_str(20), "etims-agent"),
        user_name=t.take("user_name", _bounded_str(60), "etims-agent"),
        origin_country=t.take("origin_country", _bounded_str(5), "KE"),
        code_refresh_h=t.take("code_refresh_h", _seconds(0.01, 24 * 30, "hours"), 24.0),
    )
    t.done()
    if env != "simulator":
        for key, value, what in (("tin", kra.tin, "the taxpayer's KRA PIN"),
                                 ("device_serial", kra.device_serial, "the serial KRA approved for this device")):
            if not value:
                raise ConfigError(t.key(key), f"is required when kra.environment is {env!r}",
                                  f"set it to {what}", source=t.source)
    return kra


def _tsms(t: _Table) -> TsmsSettings:
    env = t.take("environment", _choice("simulator", "server", "off"), "simulator")
    sim = env == "simulator"
    tsms = TsmsSettings(
        environment=env,
        base_url=t.take("base_url", _url(require_https=not sim), ""),
        protocol=t.take("protocol", _choice("v2.1", "v2.0", "legacy"), "v2.1"),
        hardware_id=t.take("hardware_id", _bounded_str(255), TSMS_SIMULATOR_TERMINAL[0] if sim else ""),
        tenant_id=t.take("tenant_id", _int(1, 2**31), TSMS_SIMULATOR_TERMINAL[2] if sim else 0),
        terminal_id=t.take("terminal_id", _int(1, 2**31), TSMS_SIMULATOR_TERMINAL[3] if sim else 0),
        customer_code=t.take("customer_code", _bounded_str(255), TSMS_SIMULATOR_TERMINAL[4] if sim else ""),
        api_key=t.take("api_key", _secret, None),
        batch_size=t.take("batch_size", _int(1, 500), 50),
        max_body_bytes=t.take("max_body_bytes", _int(64 * 1024, 2 * 1024 * 1024), 2 * 1024 * 1024),
        sync_interval_s=t.take("sync_interval_s", _seconds(0.05, 3600), 10.0),
        heartbeat_interval_s=t.take("heartbeat_interval_s", _seconds(1, 86400), 300.0),
        connect_timeout_s=t.take("connect_timeout_s", _seconds(0.1, 120), 5.0),
        read_timeout_s=t.take("read_timeout_s", _seconds(0.1, 600), 30.0),
        backoff_base_s=t.take("backoff_base_s", _seconds(0.01, 3600), 2.0),
        backoff_max_s=t.take("backoff_max_s", _seconds(0.01, 86400), 600.0),
    )
    t.done()
    if env == "server":
        for key, value, what in (("base_url", tsms.base_url, "the head office's TSMS address (https://...)"),
                                 ("hardware_id", tsms.hardware_id, "the terminal serial registered at head office"),
                                 ("customer_code", tsms.customer_code, "the tenant's customer code at head office"),
                                 ("tenant_id", tsms.tenant_id, "the tenant id at head office"),
                                 ("terminal_id", tsms.terminal_id, "the terminal id at head office")):
            if not value:
                raise ConfigError(t.key(key), "is required when tsms.environment is 'server'", f"set it to {what}",
                                  source=t.source)
    return tsms


def _serial_port(t: _Table) -> SerialPortSettings:
    url = t.take("url", _bounded_str(300), "")
    if not url:
        raise ConfigError(t.key("url"), "is required", "give the port, e.g. /dev/ttyUSB0, COM3 or socket://host:4001",
                          source=t.source)
    port = SerialPortSettings(
        url=url,
        mode=t.take("mode", _choice("plain", "framed"), "plain"),
        baudrate=t.take("baudrate", _int(50, 4_000_000), 9600),
        bytesize=t.take("bytesize", _int(5, 8), 8),
        parity=t.take("parity", _choice("N", "E", "O", "M", "S"), "N"),
        stopbits=t.take("stopbits", _stopbits, 1.0),
        read_timeout_s=t.take("read_timeout_s", _seconds(0.01, 10), 0.1),
        reopen_interval_s=t.take("reopen_interval_s", _seconds(0.05, 600), 2.0),
        max_bytes=t.take("max_bytes", _int(1024, 16 * 1024 * 1024), 1_048_576),
    )
    t.done()
    return port


def _policy(t: _Table) -> PolicySettings:
    policy = PolicySettings(
        offline_warn_after_h=t.take("offline_warn_after_h", _seconds(0.01, 24 * 365, "hours"), 12.0),
        offline_limit_h=t.take("offline_limit_h", _seconds(0.01, 24 * 365, "hours"), 48.0),
        offline_count_limit=t.take("offline_count_limit", _int(1, 10_000_000), 2000),
        offline_action=t.take("offline_action", _choice("warn", "refuse"), "warn"),
        clock_warn_s=t.take("clock_warn_s", _seconds(1, 86400), 60.0),
        clock_refuse_s=t.take("clock_refuse_s", _seconds(1, 86400 * 365), 600.0),
    )
    t.done()
    if policy.offline_warn_after_h > policy.offline_limit_h:
        raise ConfigError(t.key("offline_warn_after_h"), "is after offline_limit_h",
                          "warn before the limit (e.g. 12 and 48)", source=t.source)
    if policy.clock_warn_s > policy.clock_refuse_s:
        raise ConfigError(t.key("clock_warn_s"), "is above clock_refuse_s", "warn before refusing (e.g. 60 and 600)",
                          source=t.source)
    return policy


def _printer(t: _Table) -> PrinterSettings:
    url = t.take("url", _bounded_str(300), "")
    if not url:
        raise ConfigError(t.key("url"), "is required",
                          "give the printer, e.g. socket://192.168.1.50:9100, file:/dev/usb/lp0 or /dev/ttyUSB1",
                          source=t.source)
    printer = PrinterSettings(
        url=url,
        width=t.take("width", _choice_int(32, 42, 48), 42),
        temporary=t.take("temporary", _bool, True),
        signed=t.take("signed", _bool, True),
        signed_after_temporary=t.take("signed_after_temporary", _bool, True),
        baudrate=t.take("baudrate", _int(50, 4_000_000), 9600),
        retry_interval_s=t.take("retry_interval_s", _seconds(0.05, 3600), 5.0),
    )
    t.done()
    return printer


def _choice_int(*options: int) -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        if value not in options or isinstance(value, bool):
            raise ConfigError(key, f"{value!r} is not allowed", f"use one of {', '.join(map(str, options))}")
        return int(value)
    return parse


MAX_KEEP_DAYS = 36_500


def _keep_days(value: Any, key: str) -> int:
    fix = f"give a whole number of days from 1 to {MAX_KEEP_DAYS}, or 0 to keep every sale"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected a whole number of days, got {_kind(value)} {value!r}", fix)
    if not 0 <= value <= MAX_KEEP_DAYS:
        raise ConfigError(key, f"{value} is out of range", fix)
    return value


def _stopbits(value: Any, key: str) -> float:
    if value not in (1, 1.5, 2) or isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not a number of stop bits", "use 1, 1.5 or 2")
    return float(value)


def _replace_token(http: HttpSettings, token: Secret) -> HttpSettings:
    return HttpSettings(
        host=http.host, port=http.port, till_token=token, max_body_bytes=http.max_body_bytes
    )


class _Table:
    """One TOML table being read; remembers which keys were used so leftovers can be refused."""

    def __init__(self, data: Mapping[str, Any], prefix: str, source: str) -> None:
        self._data = data
        self._prefix = prefix
        self._source = source
        self._seen: set[str] = set()

    @property
    def source(self) -> str:
        return self._source

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def take(self, name: str, parse: Callable[[Any, str], T], default: T) -> T:
        self._seen.add(name)
        if name not in self._data:
            return default
        try:
            return parse(self._data[name], self.key(name))
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.problem, exc.hint, source=self._source) from None

    def table(self, name: str) -> _Table:
        self._seen.add(name)
        value = self._data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(
                self.key(name), f"expected a table, got {_kind(value)}",
                f"write it as a [{self.key(name)}] section", source=self._source,
            )
        return _Table(value, f"{self.key(name)}.", self._source)

    def tables(self, name: str) -> list[_Table]:
        """An array of tables ([[name]] sections)."""
        self._seen.add(name)
        value = self._data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(self.key(name), f"expected an array of tables, got {_kind(value)}",
                              f"write each as a [[{self.key(name)}]] section", source=self._source)
        return [_Table(v, f"{self.key(name)}[{i}].", self._source) for i, v in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            known = ", ".join(sorted(self._seen)) or "(none)"
            raise ConfigError(
                self.key(unknown[0]), "unknown setting",
                f"remove it or fix the spelling; known here: {known}", source=self._source,
            )


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            dict: "a table", list: "an array"}.get(type(value), type(value).__name__)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_kind(value)}", "write true or false")
    return value


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_kind(value)}",
                              f"write a whole number from {lo} to {hi}")
        if not lo <= value <= hi:
            raise ConfigError(key, f"{value} is out of range", f"use a number from {lo} to {hi}")
        return value
    return parse


def _choice(*options: str) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        if value not in options:
            raise ConfigError(key, f"{value!r} is not allowed", f"use one of {', '.join(options)}")
        return str(value)
    return parse


def _nonempty_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_kind(value)}", 'write it in quotes')
    if not value.strip():
        raise ConfigError(key, "is empty", "give a value or remove the key to use the default")
    return value


def _path(base_dir: Path) -> Callable[[Any, str], Path]:
    def parse(value: Any, key: str) -> Path:
        path = Path(_nonempty_str(value, key)).expanduser()
        return path if path.is_absolute() else (base_dir / path)
    return parse


def _host(value: Any, key: str) -> str:
    host = _nonempty_str(value, key)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IP address",
                              'expected an address such as "127.0.0.1" or "0.0.0.0"') from None
    return host


def _secret(value: Any, key: str) -> Secret:
    text = _nonempty_str(value, key)
    if len(text) < 16:
        raise ConfigError(key, "is shorter than 16 characters",
                          "use a long random token, e.g. from `python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'`")
    return Secret(text)


def _bounded_str(max_len: int) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        text = _nonempty_str(value, key)
        if len(text) > max_len:
            raise ConfigError(key, f"is longer than {max_len} characters", "shorten it")
        return text
    return parse


def _seconds(lo: float, hi: float, unit: str = "seconds") -> Callable[[Any, str], float]:
    def parse(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number of {unit}, got {_kind(value)}",
                              f"write a number like {hi / 10:g}")
        if not lo <= value <= hi:
            raise ConfigError(key, f"{value} is out of range", f"use a number of {unit} from {lo:g} to {hi:g}")
        return float(value)
    return parse


def _url(*, require_https: bool) -> Callable[[Any, str], str]:
    def parse(value: Any, key: str) -> str:
        if value == "":
            return ""  # the environment's own address
        text = _nonempty_str(value, key)
        parts = urlsplit(text)
        scheme_ok = parts.scheme == "https" or (parts.scheme == "http" and not require_https)
        if not (scheme_ok and parts.netloc):
            expected = "https://..." if require_https else "http(s)://..."
            raise ConfigError(key, f"{text!r} is not a{'n https' if require_https else ''} URL",
                              f"expected {expected}, e.g. {KRA_URLS['sandbox']}")
        return text.rstrip("/")
    return parse


def _pin(value: Any, key: str) -> str:
    text = _nonempty_str(value, key).strip().upper()
    if not re.fullmatch(r"[A-Z][0-9]{9}[A-Z]", text):
        raise ConfigError(key, f"{text!r} is not a KRA PIN",
                          "expected a letter, 9 digits and a letter, e.g. P051234567Q")
    return text


def _branch(value: Any, key: str) -> str:
    text = _nonempty_str(value, key).strip()
    if not re.fullmatch(r"[0-9A-Za-z]{2}", text):
        raise ConfigError(key, f"{text!r} is not a branch id", 'expected 2 characters, "00" for the head office')
    return text


def _serial(value: Any, key: str) -> str:
    text = _nonempty_str(value, key).strip()
    if len(text) > 100:
        raise ConfigError(key, "is longer than 100 characters", "give the serial exactly as KRA approved it")
    return text


def _rate(value: Any, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(key, f"expected a number, got {_kind(value)}", "write a percentage like 16")
    try:
        rate = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(key, f"{value!r} is not a number", "write a percentage like 16") from None
    if not (rate.is_finite() and Decimal(0) <= rate < Decimal(100)):
        raise ConfigError(key, f"{value} is out of range", "use a percentage from 0 to 99.99")
    return rate
