"""`config check|show`: the effective settings, secrets masked."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import typer

from agent.app import check_exposure
from agent.cli.common import ConfigOption, JsonOption, app, errors, load
from agent.secret import Secret

config_app = typer.Typer(no_args_is_help=True, help="Check the configuration.")
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Parse and validate the config; print the main settings with secrets masked.

    Exit codes: 0 valid, 2 invalid (the message names the setting and the fix).

    Example: etims-agent config check --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        check_exposure(cfg)
    typer.echo(f"config OK ({cfg.source})")
    typer.echo(f"data_dir             {cfg.data_dir}")
    typer.echo(f"http                 {cfg.http.host}:{cfg.http.port} "
               f"token={'set' if cfg.http.till_token else 'none'} max_body={cfg.http.max_body_bytes}")
    typer.echo(f"sales                prices_include_vat={cfg.sales.prices_include_vat} "
               f"max_lines={cfg.sales.max_lines}")
    rates = " ".join(f"{b}={r}" for b, r in cfg.tax.default_rates.items())
    typer.echo(f"tax.default_rates    {rates}")
    typer.echo(f"log                  {cfg.log.level} {cfg.log.format}")
    typer.echo(f"retention            keep_days={cfg.retention.keep_days}"
               + (" (every sale is kept)" if cfg.retention.keep_days == 0 else ""))
    for key in cfg.secrets_in_file:
        typer.echo(f"warning: {key} is in the config file; use the environment or keyring in production")


MASK = "********"


@config_app.command("show")
def config_show(config: ConfigOption = None,
                as_json: JsonOption = False) -> None:
    """Print every effective setting with secrets masked.

    Every section, after the environment's overrides; a secret shows as ******** when it is set. A secret
    kept in the secret store (`etims-agent init`) is not read.

    Exit codes: 0 shown, 2 the config is invalid.

    Example: etims-agent config show --json --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
    body = _plain(cfg)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        for key, value in _flatten(body):
            typer.echo(f"{key} = {_setting(value)}")
    for key in cfg.secrets_in_file:
        typer.echo(f"warning: {key} is in the config file; use the environment or keyring in production", err=True)


def _plain(value: Any) -> Any:
    """Settings as JSON values. A Secret becomes the mask; its value is never read."""
    if isinstance(value, Secret):
        return MASK
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # Path, Decimal, and whatever else prints as itself


def _setting(value: Any) -> str:
    if value is None:
        return "(not set)"
    if value == "" or value == []:
        return '""' if value == "" else "(none)"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value

