"""`etims-agent doctor`: everything a technician checks on a visit, each with what to do when it fails.

Read-only: it changes nothing (no token is kept, no key made), so it is safe beside a running agent.
Each check is one function returning a Finding; a check that cannot run says why instead of failing
the others.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.app import CMC_KEY, bind, open_secrets, outbox_path, uses_builtin_simulator
from agent.clock import Clock
from agent.config import Config
from agent.errors import AgentError, ConfigError
from agent.keystore import SecretStore
from agent.kra.client import KraClient
from agent.kra.payloads import parse_kra_datetime
from agent.queue.recovery import QUARANTINE_DIR
from agent.receipt_signing import KEY_NAME as RECEIPT_KEY
from agent.sync.client import Outcome as TsmsOutcome
from agent.sync.client import TsmsClient, server_time
from agent.sync.credentials import API_KEY as TSMS_API_KEY
from agent.sync.credentials import TOKEN as TSMS_TOKEN

FREE_FAIL_BYTES = 100 * 1024 * 1024  # below this a busy shop fills the disk within days
FREE_WARN_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    level: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "level": self.level, "detail": self.detail, "fix": self.fix}


def examine(cfg: Config, clock: Clock, running: dict[str, Any] | None) -> list[Finding]:
    """Every check, in the order a technician reads them. `running`: the agent's /v1/status, if it answers."""
    findings = [_config(cfg)]
    secrets = _secrets(cfg, findings)
    findings.append(_database(cfg))
    findings.append(_quarantine(cfg))
    findings.append(_disk(cfg.data_dir))
    findings.append(_http(cfg, running))
    offsets: list[tuple[str, float]] = []
    findings.append(_kra(cfg, secrets, clock, offsets))
    findings.append(_tsms(cfg, secrets, clock, offsets))
    findings.append(_clock(running, offsets))
    findings.extend(_serial_ports(cfg, running))
    return findings


def _guard(check: str, fix: str, body: Callable[[], Finding]) -> Finding:
    try:
        return body()
    except AgentError as exc:
        return Finding(check, "fail", str(exc), fix)


def _config(cfg: Config) -> Finding:
    from agent.app import check_exposure

    def body() -> Finding:
        check_exposure(cfg)
        inline = ", ".join(cfg.secrets_in_file)
        if inline:
            return Finding("config", "warn", f"{cfg.source}: secrets written in the file ({inline})",
                           "move them to the environment or the secret store (`etims-agent init`)")
        return Finding("config", "ok", f"{cfg.source}")
    return _guard("config", "correct the setting named, then run `etims-agent config check`", body)


def _secrets(cfg: Config, findings: list[Finding]) -> SecretStore | None:
    try:
        secrets = open_secrets(cfg)
        names = {name: secrets.get(name) is not None for name in (CMC_KEY, TSMS_API_KEY, RECEIPT_KEY)}
    except AgentError as exc:
        findings.append(Finding("secrets", "fail", str(exc), "fix the secret store named, or run `etims-agent "
                                "init` again"))
        return None
    missing = []
    if not uses_builtin_simulator(cfg) and not names[CMC_KEY] and cfg.kra.cmc_key is None:
        missing.append("the KRA device key (run `etims-agent init`)")
    tsms_remote = cfg.tsms.environment != "off" and (cfg.tsms.environment != "simulator" or bool(cfg.tsms.base_url))
    if tsms_remote and not names[TSMS_API_KEY] and cfg.tsms.api_key is None:
        missing.append("the TSMS API key (run `etims-agent init tsms --api-key -`)")
    if missing:
        findings.append(Finding("secrets", "fail", f"{secrets.description}: missing " + "; ".join(missing),
                                "run the command given"))
    elif not names[RECEIPT_KEY]:
        findings.append(Finding("secrets", "warn", f"{secrets.description}: no receipt key yet",
                                "start the agent once; it makes the key that signs temporary receipts"))
    else:
        findings.append(Finding("secrets", "ok", secrets.description))
    return secrets


def _database(cfg: Config) -> Finding:
    path = outbox_path(cfg.data_dir)
    if not path.exists():
        return Finding("database", "warn", f"no outbox at {path} yet", "start the agent once to create it")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
            size = sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        rows = [str(exc)]
        size = 0
    if rows != ["ok"]:
        return Finding("database", "fail", f"{path}: quick_check says {'; '.join(rows[:3])}",
                       "restart the agent: it moves the damaged outbox to quarantine/ and starts a fresh one; "
                       "then run `etims-agent outbox rescue` on the quarantined file")
    return Finding("database", "ok", f"{path}: quick_check ok, {size / 1e6:.1f} MB")


def _quarantine(cfg: Config) -> Finding:
    files = sorted((cfg.data_dir / QUARANTINE_DIR).glob("*.sqlite3"))
    if not files:
        return Finding("quarantine", "ok", "no damaged outbox set aside")
    return Finding("quarantine", "warn", f"{len(files)} damaged outbox(es) set aside, newest {files[-1]}",
                   f"run `etims-agent outbox rescue {files[-1]}` (safe to repeat), keep the file for the audit")


def _disk(data_dir: Path) -> Finding:
    probe = data_dir if data_dir.exists() else data_dir.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        return Finding("disk", "fail", f"{probe}: {exc.strerror}", "check that the data directory exists")
    text = f"{free / 1e9:.2f} GB free at {probe}"
    if free < FREE_FAIL_BYTES:
        return Finding("disk", "fail", text, "free space now (old logs, quarantine/); below it the till is refused "
                       "(507 disk_full)")
    if free < FREE_WARN_BYTES:
        return Finding("disk", "warn", text, "free some space soon")
    return Finding("disk", "ok", text)


def _http(cfg: Config, running: dict[str, Any] | None) -> Finding:
    where = f"{cfg.http.host}:{cfg.http.port}"
    if running is not None:
        return Finding("http", "ok", f"the agent answers on {where}")
    try:
        bind(cfg.http.host, cfg.http.port).close()  # exactly as the agent would listen
    except ConfigError as exc:
        return Finding("http", "fail", f"{exc.problem} and the agent does not answer there",
                       "stop that program, or set another http.port here and on the tills")
    return Finding("http", "warn", f"{where} is free: the agent is not running",
                   "start it (`systemctl start etims-agent`, or `etims-agent run`)")


def _kra(cfg: Config, secrets: SecretStore | None, clock: Clock, offsets: list[tuple[str, float]]) -> Finding:
    if uses_builtin_simulator(cfg):
        return Finding("kra", "skip", "the built-in simulator runs inside the agent; nothing to reach")
    key = cfg.kra.cmc_key or (secrets.get(CMC_KEY) if secrets else None)
    if key is None:
        return Finding("kra", "fail", "the device is not initialised (no key)", "run `etims-agent init`")

    async def ask() -> Any:
        client = KraClient(cfg.kra.url, tin=cfg.kra.tin, bhf_id=cfg.kra.branch_id, cmc_key=key,
                           connect_timeout=cfg.kra.connect_timeout_s, read_timeout=cfg.kra.read_timeout_s)
        try:
            # "What changed since now?": the lightest call that proves both reach and key.
            return await client.code_list(clock().strftime("%Y%m%d%H%M%S"))
        finally:
            await client.aclose()

    reply = asyncio.run(ask())
    if not reply.code.isdigit():
        return Finding("kra", "fail", f"{cfg.kra.url}: {reply.message}",
                       "check the network and kra.base_url; sales are still taken and signed later")
    server = parse_kra_datetime(reply.result_dt)
    if server is not None:
        offsets.append(("kra", (server - clock()).total_seconds()))
    if reply.code not in ("000", "001"):
        return Finding("kra", "fail", f"{cfg.kra.url} answered {reply.code}: {reply.message}",
                       "check kra.tin, kra.branch_id and the device key (`etims-agent init`)")
    return Finding("kra", "ok", f"{cfg.kra.url} answers; the device key is accepted")


def _tsms(cfg: Config, secrets: SecretStore | None, clock: Clock, offsets: list[tuple[str, float]]) -> Finding:
    t = cfg.tsms
    if t.environment == "off":
        return Finding("tsms", "skip", "head-office sync is off (tsms.environment)")
    if t.environment == "simulator" and not t.base_url:
        return Finding("tsms", "skip", "the built-in simulator runs inside the agent; nothing to reach")
    token = secrets.get(TSMS_TOKEN) if secrets else None
    api_key = t.api_key or (secrets.get(TSMS_API_KEY) if secrets else None)
    if token is None and api_key is None:
        return Finding("tsms", "fail", "no API key", "run `etims-agent init tsms --api-key -`")

    async def ask() -> Any:
        client = TsmsClient(t.base_url, connect_timeout=t.connect_timeout_s, read_timeout=t.read_timeout_s)
        try:
            reply = None
            if token is not None:  # the agent's own token: a heartbeat changes nothing at head office
                reply = await client.heartbeat(token)
            if (reply is None or reply.outcome is TsmsOutcome.UNAUTHORIZED) and api_key is not None:
                reply, fresh = await client.authenticate(t.hardware_id, api_key)
                if fresh is not None:
                    reply = await client.heartbeat(fresh)
            return reply
        finally:
            await client.aclose()

    reply = asyncio.run(ask())
    if reply.status == 0:
        return Finding("tsms", "fail", f"{t.base_url}: {reply.message}",
                       "check the network and tsms.base_url; sales wait and are sent later")
    if reply.outcome is not TsmsOutcome.ACCEPTED:
        return Finding("tsms", "fail", f"{t.base_url} answered {reply.status}: {reply.message}",
                       "check tsms.hardware_id and the API key (`etims-agent init tsms --api-key -`)")
    server = server_time(reply)
    if server is not None:
        offsets.append(("tsms", (server - clock()).total_seconds()))
    return Finding("tsms", "ok", f"{t.base_url} answers; terminal {t.hardware_id} is authenticated")


def _clock(running: dict[str, Any] | None, offsets: list[tuple[str, float]]) -> Finding:
    clock = (running or {}).get("clock") or {}
    if clock.get("offset_s") is not None:
        level = {"ok": "ok", "warn": "warn"}.get(str(clock.get("level")), "fail")
        return Finding("clock", level, f"offset {clock['offset_s']} s (from the running agent)"
                       + (f": {clock['message']}" if clock.get("message") else ""),
                       "" if level == "ok" else "set the system clock right (enable NTP: timedatectl set-ntp true)")
    if not offsets:
        return Finding("clock", "skip", "no server answered with its time")
    source, offset = max(offsets, key=lambda o: abs(o[1]))
    detail = f"offset {offset:+.1f} s against {source}"
    if abs(offset) > 60:
        return Finding("clock", "fail", detail, "set the system clock right (enable NTP: timedatectl set-ntp true)")
    return Finding("clock", "ok", detail)


def _serial_ports(cfg: Config, running: dict[str, Any] | None) -> list[Finding]:
    states = {p["port"]: p for p in ((running or {}).get("devices") or {}).get("serial") or []}
    findings = []
    for port in cfg.serial_ports:
        if port.url in states:
            state = states[port.url]
            ok = state["state"] == "open"
            findings.append(Finding(f"serial {port.url}", "ok" if ok else "fail",
                                    f"{state['state']}" + (f": {state['detail']}" if state.get("detail") else ""),
                                    "" if ok else "check the cable and the name (`etims-agent serial list`)"))
            continue
        findings.append(_open_port(port.url, port.baudrate))
    return findings


def _open_port(url: str, baudrate: int) -> Finding:
    import serial  # type: ignore[import-untyped]

    try:
        serial.serial_for_url(url, baudrate=baudrate, timeout=0.1).close()
    except (serial.SerialException, OSError, ValueError) as exc:
        return Finding(f"serial {url}", "fail", str(exc), "check the cable and the name (`etims-agent serial list`); "
                       "no other program may hold the port")
    return Finding(f"serial {url}", "ok", "opens")

