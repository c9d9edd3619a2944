"""`codes refresh` and `items list|register`: KRA's code lists on demand, and the item catalogue registered with KRA.

None of these takes the DataDirLock, so they work while the agent runs. That lock keeps a second agent from
numbering invoices; these commands touch no invoice number. Their writes (a `kra_items` row per accepted item,
a `kra_code_lists` row per list) are single short transactions that SQLite's WAL and busy timeout serialise
with the agent's, and saveItem is an upsert at KRA, so the lane registering the same item at the same moment
does no harm. A running agent keeps its own copy of the code lists (the tax rates) in memory until its next
scheduled refresh or a restart.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.app import CMC_KEY, open_secrets, outbox_path, uses_builtin_simulator
from agent.cli.common import ConfigOption, JsonOption, app, errors, load, opened, progress_bar, shorten
from agent.clock import NAIROBI, system_clock
from agent.config import Config
from agent.errors import ConfigError, KraError
from agent.kra.catalogue import (
    Catalogue,
    CodesRefresh,
    Defaults,
    Failures,
    ItemResult,
    KnownCodes,
    ListChange,
    Planned,
    Registration,
    Status,
    cached_known_codes,
    parse_catalogue,
    plan,
    refresh_codes,
    register,
)
from agent.kra.client import KraClient
from agent.kra.codes import Outcome, describe
from agent.kra.payloads import Seller
from agent.logs import configure, get_logger
from agent.queue.kra_items import ItemStore
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox
from agent.sales import TAX_BANDS
from agent.secret import Secret

log = get_logger("agent.cli.catalogue")

codes_app = typer.Typer(no_args_is_help=True, help="KRA's code lists and item classes (works while the agent runs).")
app.add_typer(codes_app, name="codes")
items_app = typer.Typer(no_args_is_help=True, help="The items registered with KRA, saveItem (works while the agent "
                        "runs).")
app.add_typer(items_app, name="items")


# --- talking to KRA from a command ------------------------------------------------------------------

def _check_reachable(cfg: Config) -> None:
    if uses_builtin_simulator(cfg):
        raise ConfigError(
            "kra.environment", "is the built-in simulator, which lives inside the agent process, so this command "
            "cannot reach it", "set kra.base_url to a KRA it can reach (e.g. `etims-agent simulate kra` run on its "
            "own) or kra.environment to sandbox or production, then run `etims-agent init`", source=cfg.source)


def _not_initialised(cfg: Config) -> ConfigError:
    return ConfigError("device", f"serial {cfg.kra.device_serial} (PIN {cfg.kra.tin}, branch {cfg.kra.branch_id}) "
                       f"is not initialised with KRA at {cfg.kra.url}", "run `etims-agent init` first")


@contextmanager
def _device_outbox(cfg: Config) -> Iterator[Outbox]:
    """The outbox of an initialised device, for writing; ConfigError (exit 2) if there is none."""
    if not outbox_path(cfg.data_dir).exists():  # `init` creates it
        raise _not_initialised(cfg)
    with opened(cfg, write=True) as outbox:
        yield outbox


def _device_key(cfg: Config, outbox: Outbox) -> Secret:
    """The device's key, found as the agent's lane finds it: in the config or the secret store."""
    key = cfg.kra.cmc_key or open_secrets(cfg).get(CMC_KEY)
    if key is None or KraStore(outbox).device() is None:
        raise _not_initialised(cfg)
    return key


def _client(cfg: Config, key: Secret, failures: Failures | None = None) -> KraClient:
    return KraClient(cfg.kra.url, tin=cfg.kra.tin, bhf_id=cfg.kra.branch_id, cmc_key=key,
                     connect_timeout=cfg.kra.connect_timeout_s, read_timeout=cfg.kra.read_timeout_s, on_reply=failures)


def _seller(cfg: Config) -> Seller:
    return Seller(cfg.kra.tin, cfg.kra.branch_id, cfg.kra.user_id, cfg.kra.user_name)  # as app.build_kra


def _configure_logs(cfg: Config) -> None:
    configure(cfg.log.level, cfg.log.format, file=cfg.log.file, max_bytes=cfg.log.max_bytes, backups=cfg.log.backups)


def _kra_time(moment: datetime | None) -> str:
    return "never" if moment is None else moment.astimezone(NAIROBI).strftime("%Y-%m-%d %H:%M:%S") + " Nairobi"


# --- codes refresh ----------------------------------------------------------------------------------

@codes_app.command("refresh")
def codes_refresh(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Fetch KRA's code lists and item classes now, and print what changed.

    The agent does this by itself every kra.code_refresh_h hours. Asks KRA only for what changed since the
    cached copy (everything the first time), stores it in the outbox database, and prints per list the
    entries, how many are new or changed, and KRA's time the cache is current to; then the tax rates A-E
    new sales will use. Needs the device initialised and a KRA this command can reach (not the built-in
    simulator). A running agent takes new tax rates at its next scheduled refresh or a restart.

    Exit codes: 0 refreshed (or nothing new), 1 KRA could not be reached or refused, 2 a configuration error,
    the built-in simulator or the device not initialised, 4 the outbox cannot be used.

    Example: etims-agent codes refresh --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        _check_reachable(cfg)
        _configure_logs(cfg)
        with _device_outbox(cfg) as outbox:
            failures = Failures()
            client = _client(cfg, _device_key(cfg, outbox), failures)
            if sys.stderr.isatty() and not as_json:  # the item classes can take a while on a slow line
                typer.echo(f"asking KRA at {cfg.kra.url} ...", err=True)
            result = asyncio.run(_refresh(KraStore(outbox), client, failures, cfg))
        if not result.ok:
            raise KraError(_refresh_failure(cfg, result))
    if as_json:
        typer.echo(json.dumps({"kra_url": cfg.kra.url, "checked_at": system_clock().isoformat(),
                               **result.to_json()}, indent=2))
        return
    _print_refresh(result)


async def _refresh(store: KraStore, client: KraClient, failures: Failures, cfg: Config) -> CodesRefresh:
    try:
        return await refresh_codes(store, client, failures, system_clock, cfg.tax.default_rates)
    finally:
        await client.aclose()


def _refresh_failure(cfg: Config, result: CodesRefresh) -> str:
    kept = (f"the cached lists (current to KRA's {_kra_time(result.codes.fetched_at)}) stay in use"
            if result.codes.fetched_at else "until KRA answers, new sales use the configured tax.default_rates")
    if not result.failures:
        return f"the code lists were not refreshed; {kept}"
    path, reply = result.failures[0]
    if not reply.code.isdigit() and reply.outcome is not Outcome.REJECTED:
        return (f"KRA at {cfg.kra.url} did not answer ({reply.message}); check the network and kra.base_url, then "
                f"run the command again; {kept}")
    hint = (" - check kra.tin, kra.branch_id and kra.device_serial, and that `etims-agent init` was run against "
            "this KRA" if reply.code in ("900", "901", "902", "903") else "")
    return f"KRA refused {path}: {describe(reply.code, reply.message)}{hint}; {kept}"


def _print_refresh(result: CodesRefresh) -> None:
    def line(label: str, change: ListChange, what: str) -> None:
        news = f"{change.new} new, {change.changed} changed" if change.new or change.changed else "no change"
        typer.echo(f"{label:14} {what}: {news}; current to KRA's {_kra_time(change.fetched_at)}")

    line("code lists", result.codes, f"{result.code_classes} classes, {result.codes.total} codes")
    line("item classes", result.item_classes, f"{result.item_classes.total} classes")
    rates = ", ".join(f"{band} {rate} %" for band, rate in result.rates.items())
    if result.rates != result.rates_before:
        was = ", ".join(f"{band} {result.rates_before[band]} -> {rate} %" for band, rate in result.rates.items()
                        if rate != result.rates_before.get(band))
        typer.echo(f"{'tax rates':14} {rates} (changed: {was}; a running agent uses them after its next scheduled "
                   "refresh or a restart)")
    else:
        typer.echo(f"{'tax rates':14} {rates}")


# --- items list -------------------------------------------------------------------------------------

@items_app.command("list")
def items_list(
        config: ConfigOption = None,
        search: Annotated[str | None, typer.Option(
            "--search", help="Only items whose code or name contains this (any case).")] = None,
        tax_band: Annotated[str | None, typer.Option("--tax-band", help="Only this tax band, A-E.")] = None,
        item_class: Annotated[str | None, typer.Option(
            "--item-class", help="Only this KRA item classification code.")] = None,
        limit: Annotated[int | None, typer.Option(help="At most this many items (default: all).")] = None,
        as_json: JsonOption = False) -> None:
    """List the items registered with KRA, as the outbox records them, by item code.

    Registered by `items register` or by the signing lane before an item's first sale. Each line: item code,
    name, item class, tax band, default price, quantity/packaging unit and when KRA accepted it (UTC);
    --json gives every field of the record.

    Exit codes: 0 listed (even none), 2 a bad filter or config, 4 the outbox cannot be read.

    Example: etims-agent items list --search bread --tax-band B --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        if tax_band is not None and tax_band.upper() not in TAX_BANDS:
            raise ConfigError("--tax-band", f"{tax_band!r} is not a tax band", "use one of A, B, C, D, E")
        if limit is not None and limit < 1:
            raise ConfigError("--limit", f"{limit} is not a number of items", "give 1 or more")
        with opened(cfg) as outbox:
            store = ItemStore(outbox)
            items = store.list(search=search, tax_band=tax_band, item_class=item_class, limit=limit)
            total = store.count()
    if as_json:
        typer.echo(json.dumps([item.to_json() for item in items], indent=2))
        return
    if not items:
        typer.echo("no registered items match" if total else "no items are registered with KRA yet")
        return
    typer.echo(f"{'item code':20} {'name':30} {'class':10} {'tax':3} {'price':>12}  {'units':8} registered (UTC)")
    for item in items:
        r = item.to_json()
        typer.echo(f"{item.code:20} {shorten(str(r['name'] or ''), 30):30} {r['item_class'] or '':10} "
                   f"{r['tax_band'] or '':3} {r['unit_price'] or '':>12}  "
                   f"{(r['qty_unit'] or '') + '/' + (r['pkg_unit'] or ''):8} "
                   f"{item.registered_at.strftime('%Y-%m-%d %H:%M:%S')}")
    typer.echo(f"{len(items)} of {total} registered item(s)")


# --- items register ---------------------------------------------------------------------------------

_LABELS = {Status.REGISTERED: "registered", Status.UPDATED: "updated", Status.UNCHANGED: "already there",
           Status.REFUSED: "refused", Status.NOT_SENT: "not sent"}
_DRY_LABELS = {Status.REGISTERED: "would register", Status.UPDATED: "would update",
               Status.UNCHANGED: "already there"}


@items_app.command("register")
def items_register(
        csv_file: Annotated[Path, typer.Argument(
            metavar="CSV", help="The catalogue: a header row, then one item per row (see README, Item catalogue).",
            dir_okay=False)],
        config: ConfigOption = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Check the file and show what would be sent; send nothing (needs no KRA).")] = False,
        skip_bad: Annotated[bool, typer.Option(
            "--skip-bad", help="Register the good rows even if some are bad (the bad ones are listed).")] = False,
        as_json: JsonOption = False) -> None:
    """Register a catalogue of items with KRA (saveItem) from a CSV file.

    Columns: item_code, name, item_class, tax_band, unit_price (required); qty_unit (default U), pkg_unit
    (default NT), origin_country (default kra.origin_country), item_type (default 2), barcode. Every bad row
    is listed with its line, column, problem and fix, and then nothing is sent (unless --skip-bad). Items
    the outbox records with the very same details are not sent again, so the command can be rerun; each item
    KRA accepts is recorded as the signing lane records it, so the lane does not register it again before
    its first sale. A progress bar shows on a terminal; then a summary: registered, updated, already there,
    refused (with KRA's message), not sent.

    Exit codes: 0 every item registered or already there, 1 KRA refused an item or stopped answering (rerun
    to send the rest), 2 a bad file or row, a configuration error, the built-in simulator or the device not
    initialised, 4 the outbox cannot be used.

    Example: etims-agent items register catalogue.csv --dry-run --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        data = _read(csv_file)
        if dry_run:
            catalogue, planned = _dry_plan(cfg, csv_file, data, skip_bad)
            done = Registration(results=[ItemResult(p.item, _would(p)) for p in planned])
        else:
            _check_reachable(cfg)
            _configure_logs(cfg)
            with _device_outbox(cfg) as outbox:
                key = _device_key(cfg, outbox)
                catalogue = _parse(cfg, csv_file, data, skip_bad, cached_known_codes(KraStore(outbox)))
                planned = plan(catalogue.items, ItemStore(outbox).requests(i.code for i in catalogue.items),
                               _seller(cfg))
                done = asyncio.run(_register(planned, _client(cfg, key), KraStore(outbox)))
            counts = done.counts()
            log.info("kra_items_registered", file=csv_file.name, **counts, bad_rows=len(catalogue.errors),
                     stopped=done.stopped)
    if as_json:
        typer.echo(json.dumps({"file": str(csv_file), "dry_run": dry_run, "counts": done.counts(),
                               "results": [r.to_json() for r in done.results],
                               "bad_rows": [e.to_json() for e in catalogue.errors], "stopped": done.stopped},
                              indent=2))
    else:
        _print_registration(csv_file, catalogue, done, dry_run)
    with errors():
        if done.stopped is not None:
            unsent = done.counts()[Status.NOT_SENT]
            raise KraError(f"KRA at {cfg.kra.url}: {done.stopped}. {unsent} item(s) were not sent; run the command "
                           "again once that is fixed: it skips what is registered")
    refused = done.counts()[Status.REFUSED]
    if refused:
        typer.echo(f"etims-agent: KRA refused {refused} item(s); correct them in the file and run the command "
                   "again", err=True)
        raise typer.Exit(1)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror or exc})",
                          "check the file name and its permissions") from None


def _parse(cfg: Config, path: Path, data: bytes, skip_bad: bool, known: KnownCodes) -> Catalogue:
    return parse_catalogue(data, source=str(path), defaults=Defaults(origin_country=cfg.kra.origin_country),
                           known=known, skip_bad=skip_bad)


def _dry_plan(cfg: Config, path: Path, data: bytes, skip_bad: bool) -> tuple[Catalogue, list[Planned]]:
    """The file checked against the cached code lists and the recorded items, if there is an outbox yet."""
    if not outbox_path(cfg.data_dir).exists():
        catalogue = _parse(cfg, path, data, skip_bad, KnownCodes())
        return catalogue, plan(catalogue.items, {}, _seller(cfg))
    with opened(cfg) as outbox:
        catalogue = _parse(cfg, path, data, skip_bad, cached_known_codes(KraStore(outbox)))
        return catalogue, plan(catalogue.items, ItemStore(outbox).requests(i.code for i in catalogue.items),
                               _seller(cfg))


def _would(p: Planned) -> Status:
    if p.unchanged:
        return Status.UNCHANGED
    return Status.UPDATED if p.previous is not None else Status.REGISTERED


async def _register(planned: list[Planned], client: KraClient, store: KraStore) -> Registration:
    try:
        with progress_bar("saveItem") as step:
            sent = 0

            def tick(_: ItemResult) -> None:
                nonlocal sent
                sent += 1
                step(sent, len(planned))

            return await register(planned, client, store, system_clock, on_item=tick)
    finally:
        await client.aclose()


def _print_registration(path: Path, catalogue: Catalogue, done: Registration, dry_run: bool) -> None:
    counts = done.counts()
    labels = _DRY_LABELS if dry_run else _LABELS
    typer.echo(f"{path.name}: {len(catalogue.items)} item(s)" + (", nothing was sent (--dry-run)" if dry_run else ""))
    for status, label in labels.items():
        typer.echo(f"  {label:15} {counts[status]}")
    problems: list[tuple[str, list[Any]]] = [
        ("refused by KRA", [r for r in done.results if r.status is Status.REFUSED]),
        ("bad rows left out (--skip-bad)", list(catalogue.errors)),
    ]
    for title, rows in problems:
        if rows:
            typer.echo(f"{title}:")
            for row in rows:
                if isinstance(row, ItemResult):
                    typer.echo(f"  line {row.item.line}, {row.item.code}: {row.message}")
                else:
                    typer.echo(f"  {row}")
