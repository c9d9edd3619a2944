"""What every command shares: the app, the common options, and one way to report an AgentError."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.app import outbox_path
from agent.config import Config, load_config
from agent.errors import AgentError, ConfigError, DataDirLocked, StorageError
from agent.queue.admin import open_outbox
from agent.queue.outbox import Outbox

# Locals in tracebacks would print secrets; never show them.
app = typer.Typer(pretty_exceptions_show_locals=False, no_args_is_help=True, add_completion=False,
                  rich_markup_mode="markdown",  # joins wrapped docstring lines into paragraphs
                  help="etims-agent: the KRA eTIMS edge agent beside the till.")

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="TOML config file (default: $ETIMS_AGENT_CONFIG, else built-in defaults).",
    dir_okay=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
TillOption = Annotated[str | None, typer.Option("--till-id", help="The till, if several tills used this sale id.")]
SaleArgument = Annotated[str, typer.Argument(help="The till's sale id (as on the receipt).")]


def exit_code(exc: AgentError) -> int:
    if isinstance(exc, ConfigError):
        return 2
    if isinstance(exc, DataDirLocked):
        return 3
    if isinstance(exc, StorageError):
        return 4
    return 1


@contextmanager
def errors() -> Iterator[None]:
    """Print an AgentError as one sentence (no traceback) and exit with its code."""
    try:
        yield
    except AgentError as exc:
        typer.echo(f"etims-agent: {exc}", err=True)
        raise typer.Exit(exit_code(exc)) from None


def load(path: Path | None) -> Config:
    return load_config(path)


@contextmanager
def opened(cfg: Config, *, write: bool = False) -> Iterator[Outbox]:
    outbox = open_outbox(outbox_path(cfg.data_dir), write=write)
    try:
        yield outbox
    finally:
        outbox.close()


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a terminal, fed `(done, total)`; silent when the output goes to a file or a pipe."""
    if not sys.stdout.isatty():
        yield lambda done, total: None
        return
    bar: Any = None
    shown = 0

    def step(done: int, total: int) -> None:
        nonlocal bar, shown
        if bar is None:
            bar = typer.progressbar(length=max(total, 1), label=label, file=sys.stderr).__enter__()
        bar.update(done - shown)
        shown = done

    try:
        yield step
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def running_agent(cfg: Config) -> dict[str, Any] | None:
    """The running agent's /v1/status (lanes, offline budget, clock), or None if it does not answer."""
    import httpx

    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.http.port}/v1/status"
    headers = {"Authorization": f"Bearer {cfg.http.till_token.reveal()}"} if cfg.http.till_token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=2.0)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None
