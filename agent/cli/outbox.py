"""`outbox list|show|retry|park|requeue`: inspect the outbox and move a stuck sale by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli.common import (
    ConfigOption,
    JsonOption,
    SaleArgument,
    TillOption,
    app,
    errors,
    load,
    opened,
    progress_bar,
    shorten,
)
from agent.clock import system_clock
from agent.config import Config
from agent.queue.admin import Moved, OutboxAdmin, find_sale
from agent.queue.recovery import describe, rescue

outbox_app = typer.Typer(no_args_is_help=True, help="Inspect the outbox and move a stuck sale by hand (works while "
                         "the agent runs).")
app.add_typer(outbox_app, name="outbox")


@outbox_app.command("list")
def outbox_list(
        config: ConfigOption = None,
        kra: Annotated[str | None, typer.Option(
            "--kra", help="Only sales in this KRA lane state: queued, in_flight, retry, unknown, signed, parked, "
                          "void.")] = None,
        tsms: Annotated[str | None, typer.Option(
            "--tsms", help="Only sales in this TSMS lane state: pending, batched, synced, rejected.")] = None,
        till: Annotated[str | None, typer.Option("--till", help="Only this till's sales.")] = None,
        limit: Annotated[int, typer.Option(help="At most this many sales.")] = 50,
        oldest_first: Annotated[bool, typer.Option("--oldest-first", help="Oldest first (the KRA lane's order) "
                                                   "instead of newest first.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON (errors in full).")] = False) -> None:
    """List sales, newest first, one line each.

    Each line: outbox id, till, sale id, kind, total, KRA state (with its invoice number), TSMS state, when it
    was accepted (UTC) and the last error, shortened (--json gives it in full).

    Exit codes: 0 listed (even none), 2 a bad state name, --limit or config, 4 the outbox cannot be read.

    Example: etims-agent outbox list --kra parked --limit 20 --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        with opened(cfg) as outbox:
            lines = OutboxAdmin(outbox).list_sales(kra_state=kra, tsms_state=tsms, till_id=till, limit=limit,
                                                   newest_first=not oldest_first)
    if as_json:
        typer.echo(json.dumps([line.to_json() for line in lines], indent=2))
        return
    if not lines:
        typer.echo("no sales match")
        return
    typer.echo(f"{'id':>7}  {'till':12} {'sale id':18} {'kind':11} {'total':>11}  {'KRA':16} {'TSMS':9} "
               f"{'accepted (UTC)':20} error")
    for line in lines:
        kra_text = line.kra_state + (f" #{line.kra_invc_no}" if line.kra_invc_no is not None else "")
        error = line.kra_error or (line.tsms_error if line.tsms_state == "rejected" else None) or ""
        typer.echo(f"{line.id:>7}  {line.till_id:12} {line.sale_id:18} {line.kind:11} {line.total:>11}  "
                   f"{kra_text:16} {line.tsms_state:9} {line.accepted_at.strftime('%Y-%m-%d %H:%M:%S'):20} "
                   f"{shorten(error, 60)}")


@outbox_app.command("show")
def outbox_show(sale_id: SaleArgument, config: ConfigOption = None, till_id: TillOption = None,
                as_json: JsonOption = False) -> None:
    """Show everything stored about one sale.

    The sale and its amounts, the KRA request stored for it, KRA's signature or error, attempts and next
    attempt, its TSMS transaction and submission (state, last status, last error), how often its receipts
    were printed, and its journal entries (event, time, detail).

    Exit codes: 0 shown, 1 no such sale, 2 several tills used the id (give --till-id) or a bad config,
    4 the outbox cannot be read.

    Example: etims-agent outbox show R-0001 --till-id TILL-1 --json
    """
    with errors():
        cfg = load(config)
        with opened(cfg) as outbox:
            record = find_sale(outbox, sale_id, till_id)
            details = OutboxAdmin(outbox).details(record.id)
    if as_json:
        typer.echo(json.dumps(details, indent=2, default=str))
        return
    _print_details(details)


def _print_details(d: dict[str, Any]) -> None:
    def row(key: str, value: Any, indent: int = 2) -> None:
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        typer.echo(f"{' ' * indent}{key:18} {'-' if value is None else value}")

    typer.echo(f"sale {d['till_id']}/{d['sale_id']}")
    for key in ("id", "kind", "receipt_no", "accepted_at", "total", "content_hash", "original", "refund_reason",
                "credit_notes"):
        if key in ("original", "refund_reason", "credit_notes") and not d[key]:
            continue
        row(key, d[key])
    amounts = d["amounts"]
    row("taxable / tax", f"{amounts.get('taxable')} / {amounts.get('tax')}")
    row("sale", d["sale"])
    row("amounts", amounts)
    kra = d["kra"]
    typer.echo("KRA")
    row("state", kra["state"] + (f" ({kra['sales_ahead']} sale(s) ahead in the lane)"
                                 if kra["sales_ahead"] else ""))
    for key in ("invc_no", "attempts", "next_attempt_at", "error", "signed_at", "signature", "request"):
        row(key, kra[key])
    tsms = d["tsms"]
    typer.echo("TSMS")
    row("state", tsms["state"])
    row("transaction_id", tsms["transaction_id"])
    row("synced_at", tsms["synced_at"])
    sub = tsms["submission"]
    if sub is None:
        row("submission", None)
    else:
        row("submission", f"{sub['uuid']} ({sub.get('state', '?')}, {sub.get('sales', '?')} sale(s), "
                          f"{sub.get('attempts', '?')} attempt(s))")
        row("last_status", sub.get("last_status"))
        row("last_error", sub.get("last_error"))
    row("transaction", tsms["transaction"])
    typer.echo("receipt prints")
    if not d["receipt_prints"]:
        typer.echo("  none")
    for p in d["receipt_prints"]:
        row(p["kind"], f"{p['prints']} (first {p['first_at']})")
    typer.echo("journal")
    for e in d["journal"]:
        detail = json.dumps(e["detail"], sort_keys=True, separators=(",", ":"))
        typer.echo(f"  #{e['seq']:<6} {e['at']}  {e['event']:14} {detail}")


@outbox_app.command("retry")
def outbox_retry(sale_id: SaleArgument, config: ConfigOption = None, till_id: TillOption = None) -> None:
    """Hurry a waiting sale: due now on the KRA lane, or a rejected one back to pending on the TSMS lane.

    KRA (queued, retry or unknown): its next attempt is set to now. TSMS (rejected): it goes back to
    pending, out of its submission, and travels in a new one (a new uuid); journalled as requeued.

    A running KRA lane that is waiting out its backoff picks the sale up at its next wake: at once when a new
    sale arrives, else within its backoff ceiling (kra.backoff_max_s). The lane never overtakes an older
    sale. Refused (nothing changed) for a sale with nothing to retry: signed, in flight, parked (see
    `outbox requeue`), or pending/batched/synced at head office.

    Exit codes: 0 done, 1 no such sale or refused, 2 several tills used the id (give --till-id) or a bad
    config, 4 the outbox cannot be written.

    Example: etims-agent outbox retry R-0001 --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        with opened(cfg, write=True) as outbox:
            record = find_sale(outbox, sale_id, till_id)
            moved = OutboxAdmin(outbox).retry(record.id, system_clock())
    name = f"{moved.till_id}/{moved.sale_id}"
    if moved.kra_from is not None:
        typer.echo(f"KRA: {name} ({moved.kra_from}) is due now (it was due {moved.kra_due_was or 'already'}). "
                   "A running lane picks it up at its next wake: at once when a new sale arrives, else within "
                   f"its backoff ceiling of {cfg.kra.backoff_max_s:g} s (kra.backoff_max_s).")
        if moved.ahead:
            typer.echo(f"KRA: {moved.ahead} older sale(s) are ahead of it; the lane never overtakes them.")
    if moved.tsms_moved:
        typer.echo(_tsms_moved(name, moved, cfg))
    for note in moved.notes:
        typer.echo(f"({note})")


@outbox_app.command("park")
def outbox_park(sale_id: SaleArgument,
                reason: Annotated[str, typer.Option("--reason", help="Why it is set aside (goes in the journal).")],
                config: ConfigOption = None, till_id: TillOption = None) -> None:
    """Set a queued sale aside so the KRA lane skips it (journalled as parked).

    Only a sale KRA has never been sent (state queued, no invoice number). Never one in flight, to retry or
    unknown: KRA may hold those, so only the lane settles them (it asks KRA before any resend). The till then
    sees the sale as rejected; `outbox requeue` puts it back. The journal entry says operator: true and
    gives the reason.

    Exit codes: 0 parked, 1 no such sale or refused (not queued), 2 several tills used the id (give
    --till-id), an empty --reason or a bad config, 4 the outbox cannot be written.

    Example: etims-agent outbox park R-0001 --reason "duplicate of R-0002, till fault"
    """
    with errors():
        cfg = load(config)
        with opened(cfg, write=True) as outbox:
            record = find_sale(outbox, sale_id, till_id)
            OutboxAdmin(outbox).park(record.id, reason, system_clock())
    typer.echo(f"parked {record.till_id}/{record.sale_id}: the KRA lane skips it from now on; journalled. "
               f"`etims-agent outbox requeue {record.sale_id}` puts it back.")


@outbox_app.command("requeue")
def outbox_requeue(sale_id: SaleArgument, config: ConfigOption = None, till_id: TillOption = None,
                   reason: Annotated[str | None, typer.Option(
                       "--reason", help="Why (goes in the journal).")] = None) -> None:
    """Put a parked sale back on the KRA lane, and/or a rejected one back on the TSMS lane.

    KRA: a parked sale becomes queued with no invoice number (the lane gives it the next one). The lane
    takes the lowest outbox id first, so it goes to the head of the lane, ahead of every later sale still
    waiting. Requeue only once the cause is fixed, and for a sale parked by reconciliation only once you know
    KRA does not hold it. Refused while a later sale holds an invoice number KRA has not settled.
    TSMS: a rejected sale becomes pending and travels in a new submission (a new uuid).
    Journalled as requeued. Refused (nothing changed) for a sale neither parked nor rejected.

    Exit codes: 0 requeued, 1 no such sale or refused, 2 several tills used the id (give --till-id) or a bad
    config, 4 the outbox cannot be written.

    Example: etims-agent outbox requeue R-0001 --reason "item class fixed at KRA"
    """
    with errors():
        cfg = load(config)
        with opened(cfg, write=True) as outbox:
            record = find_sale(outbox, sale_id, till_id)
            moved = OutboxAdmin(outbox).requeue(record.id, reason, system_clock())
    name = f"{moved.till_id}/{moved.sale_id}"
    if moved.kra_from is not None:
        dropped = f"; it no longer holds invoice {moved.dropped_invc_no}" if moved.dropped_invc_no else ""
        ahead = f" ({moved.ahead} older sale(s) still go first)" if moved.ahead else ""
        typer.echo(f"KRA: {name} is queued again with no invoice number{dropped}: the lane gives it the next one. "
                   f"It goes before every later sale still waiting{ahead}; journalled as requeued.")
        if (moved.kra_error_was or "").startswith("reconcile:"):
            typer.echo("caution: it was parked because KRA holds its invoice number for another document; make "
                       "sure KRA does not hold this sale under another number, or it will be signed twice.")
    if moved.tsms_moved:
        typer.echo(_tsms_moved(name, moved, cfg))
    for note in moved.notes:
        typer.echo(f"({note})")


def _tsms_moved(name: str, moved: Moved, cfg: Config) -> str:
    left = (f"left the rejected submission {moved.tsms_submission}" if moved.tsms_submission
            else "was rejected by head office")
    return (f"TSMS: {name} {left} and is pending again; it travels in a new submission (a new uuid) at the "
            f"lane's next round (within {cfg.tsms.sync_interval_s:g} s, tsms.sync_interval_s); journalled as "
            "requeued.")



@outbox_app.command("rescue")
def outbox_rescue(
        damaged: Annotated[Path, typer.Argument(help="A quarantined outbox: data_dir/quarantine/outbox-*.sqlite3.",
                                                dir_okay=False)],
        config: ConfigOption = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and report; change nothing.")] = False,
        as_json: JsonOption = False) -> None:
    """Copy the readable sales of a quarantined (damaged) outbox into the live one.

    When the agent finds its outbox damaged at start-up, it moves it to quarantine/ and goes on with
    a fresh one. This reads the old file row by row (a damaged page costs only its own rows) and
    brings back every sale the live outbox does not have yet (a till may have sent it again since):
    signed sales with their KRA signature; an unsigned sale KRA may hold under its old invoice number
    keeps it, and the lane asks KRA before any resend; every other unsigned sale is queued again
    without a number. Sales head office already holds stay synced; the others are sent with their
    original transaction id, so head office never counts one twice. Each rescued sale is journalled
    (its old id and receipt number included). Run it while the agent runs, once `etims-agent status`
    shows the KRA lane online (the agent must first learn which invoice numbers KRA holds).

    Exit codes: 0 rescued (or nothing to rescue), 1 some sales need a person (listed) or the rescue was
    refused, 2 a bad config, 4 the outbox cannot be written.

    Example: etims-agent outbox rescue /var/lib/etims-agent/quarantine/outbox-20261121T081500Z.sqlite3
    """
    with errors():
        cfg = load(config)
        with opened(cfg, write=True) as outbox, progress_bar("rescuing") as step:
            report = rescue(outbox, damaged, system_clock(), dry_run=dry_run, progress=step)
    body = describe(report)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
    else:
        verb = "would import" if dry_run else "imported"
        typer.echo(f"read {report.read} sale(s), {verb} {report.imported} ({report.requeued} queued again without "
                   f"an invoice number, {report.reconcile} to check with KRA under their old number), "
                   f"{report.already_there} already in the live outbox")
        if report.unreadable:
            typer.echo(f"{len(report.unreadable)} row(s) could not be read (old ids "
                       f"{shorten(', '.join(map(str, report.unreadable)), 200)}); `etims-agent verify` lists the "
                       "invoice numbers they leave missing")
        for conflict in report.conflicts:
            typer.echo(f"NEEDS A PERSON {conflict}")
    if report.conflicts:
        raise typer.Exit(1)
