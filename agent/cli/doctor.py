"""`etims-agent doctor`: one line per check, each saying what to do when it fails."""

from __future__ import annotations

import json

import typer

from agent.cli.common import ConfigOption, JsonOption, app, exit_code, load, running_agent
from agent.clock import system_clock
from agent.doctor import Finding, examine
from agent.errors import AgentError

MARKS = {"ok": "OK  ", "warn": "WARN", "fail": "FAIL", "skip": "--  "}


@app.command()
def doctor(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Check everything a visit should: config, secrets, the outbox (quick_check), quarantined files,
    free disk, the HTTP port, KRA (reachable, device key accepted), head office (authenticated), the
    clock offset and the serial ports. Changes nothing, so it is safe while the agent runs.

    Each failing line says what to do. Exit codes: 0 nothing failed (warnings allowed), 1 a check
    failed, 2 the config cannot be read.

    Example: etims-agent doctor --config /etc/etims-agent/agent.toml
    """
    try:
        cfg = load(config)
    except AgentError as exc:
        finding = Finding("config", "fail", str(exc), "correct the setting named, then run `etims-agent config check`")
        _show([finding], as_json)
        raise typer.Exit(exit_code(exc)) from None
    findings = examine(cfg, system_clock, running_agent(cfg))
    _show(findings, as_json)
    if any(f.level == "fail" for f in findings):
        raise typer.Exit(1)


def _show(findings: list[Finding], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([f.to_json() for f in findings], indent=2))
        return
    for f in findings:
        typer.echo(f"{MARKS[f.level]} {f.check:12} {f.detail}")
        if f.fix and f.level in ("fail", "warn"):
            typer.echo(f"{'':17} -> {f.fix}")
