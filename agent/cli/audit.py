"""Audit: the journal's hash chain and the invoice numbers; audit bundles for an auditor to take away."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import __version__, audit_bundle
from agent.app import intake_rules, open_secrets, outbox_path, seller_of
from agent.cli.common import ConfigOption, JsonOption, app, errors, load, opened
from agent.clock import system_clock
from agent.config import Config
from agent.desk import ApiContext, SaleDesk
from agent.errors import AgentError, ConfigError
from agent.queue.outbox import Outbox, SaleRecord
from agent.receipt_format import render
from agent.receipt_signing import KEY_NAME as RECEIPT_KEY
from agent.receipt_signing import ReceiptSigner

BundleOption = Annotated[Path | None, typer.Option(
    "--bundle", help="Check this audit bundle (from `etims-agent export`) instead of the local journal.",
    dir_okay=False)]
ExpectKeyOption = Annotated[str | None, typer.Option(
    "--expect-key", help="With --bundle: the key id or public key (base64) the bundle must be signed with, "
                         "e.g. agent.receipt_key in GET /v1/status.")]


@app.command()
def verify(config: ConfigOption = None, bundle: BundleOption = None, expect_key: ExpectKeyOption = None,
           as_json: JsonOption = False) -> None:
    """Check the journal's hash chain against the stored sales, and the KRA invoice numbers for gaps;
    with --bundle, check an audit bundle instead.

    A bundle is checked on its own: the manifest's signature, every file's SHA-256, the journal chain
    from its anchor, every sale against its journal entry, and the invoice numbers. It prints the key
    id that signed it; compare it with agent.receipt_key in GET /v1/status (or give --expect-key).
    With the agent's config at hand, it also says whether this agent's key signed it.

    Exit codes: 0 everything holds, 1 one PROBLEM line per finding, 2 configuration error or no such
    bundle, 4 the outbox (or the bundle) cannot be read.

    Example: etims-agent verify --config /etc/etims-agent/agent.toml

    Example: etims-agent verify --bundle audit-2026-11.zip --expect-key 3f2a9c1d0b8e7f65
    """
    if bundle is not None:
        _verify_bundle(config, bundle, expect_key, as_json)
        return
    with errors():
        if expect_key is not None:
            raise ConfigError("--expect-key", "only applies to a bundle", "give --bundle FILE as well")
        cfg = load(config)
        outbox = Outbox.open(outbox_path(cfg.data_dir), readonly=True)
        try:
            problems = outbox.verify()
            entries = len(outbox.journal())
        finally:
            outbox.close()
    if as_json:
        typer.echo(json.dumps({"ok": not problems, "journal_entries": entries, "problems": problems}, indent=2))
    else:
        for problem in problems:
            typer.echo(f"PROBLEM {problem}")
        if problems:
            typer.echo(f"journal verification FAILED: {len(problems)} problem(s) in {entries} entries")
        else:
            typer.echo(f"journal OK: {entries} entries, chain intact, every sale journalled")
    if problems:
        raise typer.Exit(1)


def _verify_bundle(config: Path | None, bundle: Path, expect_key: str | None, as_json: bool) -> None:
    with errors():
        if not bundle.is_file():
            raise ConfigError("--bundle", f"{bundle} does not exist", "give the path of a bundle from `etims-agent "
                                                                      "export`")
        result = audit_bundle.check(bundle)
        local = _local_key(config)
    problems = list(result.problems)
    if expect_key is not None and not result.matches_key(expect_key):
        problems.append(f"the bundle is signed by key {result.key_id}, not by the expected key {expect_key}")
    local_matches = None if local is None or result.key_id is None else result.matches_key(local.public_key)
    if local is not None and not local_matches:
        problems.append(f"the bundle is signed by key {result.key_id}, not by this agent's key {local.key_id}")
    if as_json:
        typer.echo(json.dumps({
            "ok": not problems, "bundle": bundle.name, "problems": problems,
            "signature_valid": result.signature_valid, "key_id": result.key_id, "public_key": result.public_key,
            "local_key_matches": local_matches, "created_at": result.created_at,
            "agent_version": result.agent_version, "period": result.period, "counts": result.counts,
            "pruned_sales": result.pruned_sales,
        }, indent=2))
    else:
        typer.echo(f"{'bundle':10} {bundle.name}")
        if result.period is not None:  # the manifest could be read
            counts = result.counts
            typer.echo(f"{'period':10} {result.period['from']} to {result.period['to']} (to exclusive)")
            typer.echo(f"{'created':10} {result.created_at} by etims-agent {result.agent_version}")
            typer.echo(f"{'contents':10} {counts.get('sales')} sales, {counts.get('receipts')} receipts, "
                       f"{counts.get('journal_entries')} journal entries"
                       + (f"; {result.pruned_sales} sales of the period pruned after KRA and head office had "
                          "them (their journal entries are there)" if result.pruned_sales else ""))
            typer.echo(f"{'signed by':10} key id {result.key_id} (public key {result.public_key}); signature "
                       + ("valid" if result.signature_valid else "INVALID"))
            if local_matches is None:
                typer.echo(f"{'this agent':10} its key is not available here: compare the key id with "
                           "agent.receipt_key in the agent's GET /v1/status")
            else:
                typer.echo(f"{'this agent':10} " + ("signed it (same key)" if local_matches else "did NOT sign it"))
        for problem in problems:
            typer.echo(f"PROBLEM {problem}")
        typer.echo(f"bundle verification FAILED: {len(problems)} problem(s)" if problems
                   else "bundle OK: signature valid, every file matches, journal chain intact, every sale journalled")
    if problems:
        raise typer.Exit(1)


def _local_key(config: Path | None) -> ReceiptSigner | None:
    """This agent's key, if its config and key are here; an auditor's machine has neither.

    Only looked up where the data directory exists, so checking a bundle never creates a secret store
    or asks a desktop keyring for a password.
    """
    try:
        cfg = load(config)
        if not cfg.data_dir.is_dir():
            return None
        stored = open_secrets(cfg).get(RECEIPT_KEY)
    except AgentError:
        return None
    return None if stored is None else ReceiptSigner.from_secret(stored)


@app.command()
def export(start: Annotated[str, typer.Option("--from", help="First day (YYYY-MM-DD, midnight UTC) or ISO time.",
                                              show_default=False)],
           end: Annotated[str, typer.Option("--to", help="Day or time just after the period (exclusive).",
                                            show_default=False)],
           out: Annotated[Path, typer.Option("--out", help="The bundle file to write (a zip).", dir_okay=False,
                                             show_default=False)],
           config: ConfigOption = None,
           force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
           as_json: JsonOption = False) -> None:
    """Write an audit bundle: the period's sales, their receipts and the journal, with a manifest of
    SHA-256 sums signed by the agent's key. Safe while the agent runs (it only reads the outbox).

    The period is [--from, --to), by the time each sale was accepted; a date alone means midnight UTC.
    The file is written whole or not at all. Check it anywhere with `etims-agent verify --bundle FILE`.

    Exit codes: 0 written, 2 a bad option or config, --out exists (give --force), or the agent's key is
    not there yet (start the agent once), 4 the outbox cannot be read or the file cannot be written.

    Example: etims-agent export --from 2026-11-01 --to 2026-12-01 --out audit-2026-11.zip -c agent.toml
    """
    with errors():
        period = audit_bundle.parse_period(start, end)
        if out.exists() and not force:
            raise _exists(out)
        if not out.parent.is_dir():
            raise ConfigError("--out", f"the folder {out.parent} does not exist", "create it, or write elsewhere")
        cfg = load(config)
        stored = open_secrets(cfg).get(RECEIPT_KEY)
        if stored is None:
            raise ConfigError("secrets", "the agent's signing key is not in the secret store",
                              "the agent creates it on its first start: start it once with this config "
                              "(`etims-agent run`), then export again")
        with opened(cfg) as outbox:
            selection = audit_bundle.select(outbox, period)
            receipt_text = _receipt_renderer(cfg, outbox, ReceiptSigner.from_secret(stored))
            with _progress(len(selection.sales), "receipts") as step:
                try:
                    written = audit_bundle.write(
                        out, selection, receipt_text=receipt_text, key=audit_bundle.signing_key(stored),
                        created_at=system_clock(), agent_version=__version__,
                        issuer={"tin": cfg.kra.tin, "branch_id": cfg.kra.branch_id}, replace=force, progress=step)
                except FileExistsError:
                    raise _exists(out) from None
    summary = {"file": str(out), "sha256": written.sha256, "sales": written.sales,
               "pruned_sales": selection.pruned_sales, "journal_entries": written.journal_entries,
               "from": period.start.isoformat(), "to": period.end.isoformat(), "key_id": written.key_id,
               "public_key": written.public_key}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"exported {written.sales} sales and {written.journal_entries} journal entries "
               f"from {summary['from']} to {summary['to']}"
               + (f" ({selection.pruned_sales} more sales of the period were pruned; their journal entries are "
                  "in the bundle)" if selection.pruned_sales else ""))
    typer.echo(f"{'file':8} {out}")
    typer.echo(f"{'sha256':8} {written.sha256}")
    typer.echo(f"{'key id':8} {written.key_id} (public key {written.public_key}; the same as agent.receipt_key "
               "in GET /v1/status)")


def _exists(out: Path) -> ConfigError:
    return ConfigError("--out", f"{out} already exists", "give another file name, or --force to replace it")


def _receipt_renderer(cfg: Config, outbox: Outbox, signer: ReceiptSigner) -> Callable[[SaleRecord], str]:
    """Each sale's receipt text as `receipt show` gives it (COPY if printed before), with one desk for all:
    nothing is counted as a print and no key is made."""
    desk = SaleDesk(ApiContext(outbox=outbox, rules=intake_rules(cfg), clock=system_clock, max_body_bytes=0,
                               started_at=system_clock(), receipt_signer=signer, seller=seller_of(cfg, outbox)))

    def text(record: SaleRecord) -> str:
        view: dict[str, Any] = desk.view(record)
        printed = outbox.prints_of(record.id, view["receipt"]["kind"]) > 0
        body, _ = render(view, "text", audit_bundle.RECEIPT_WIDTH, copy=printed)
        return body.decode("utf-8")

    return text


@contextmanager
def _progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on standard error when it is a terminal; nothing in a script or a pipe."""
    if length == 0 or not sys.stderr.isatty():
        yield lambda _: None
        return
    with typer.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update
