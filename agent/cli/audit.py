"""Audit: the journal's hash chain and the invoice numbers."""

from __future__ import annotations

import typer

from agent.app import outbox_path
from agent.cli.common import ConfigOption, app, errors, load
from agent.queue.outbox import Outbox


@app.command()
def verify(config: ConfigOption = None) -> None:
    """Check the journal's hash chain against the stored sales; exit 1 if anything is wrong."""
    with errors():
        cfg = load(config)
        outbox = Outbox.open(outbox_path(cfg.data_dir), readonly=True)
        try:
            problems = outbox.verify()
            entries = len(outbox.journal())
        finally:
            outbox.close()
    for problem in problems:
        typer.echo(f"PROBLEM {problem}")
    if problems:
        typer.echo(f"journal verification FAILED: {len(problems)} problem(s) in {entries} entries")
        raise typer.Exit(1)
    typer.echo(f"journal OK: {entries} entries, chain intact, every sale journalled")
