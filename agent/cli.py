"""The technician's command line: thin; it parses arguments and calls the library."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import __version__
from agent.app import (
    check_exposure,
    init_device,
    intake_rules,
    open_secrets,
    outbox_path,
    reprint,
    run,
    store_tsms_key,
)
from agent.clock import system_clock
from agent.config import SIMULATOR_DEVICE, TSMS_SIMULATOR_TERMINAL, Config, load_config
from agent.desk import ApiContext, SaleDesk
from agent.errors import AgentError, ConfigError, DataDirLocked, StorageError
from agent.logs import configure
from agent.queue.admin import Moved, OutboxAdmin, find_sale, open_outbox
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox, SaleRecord
from agent.receipt_format import WIDTHS, render
from agent.receipt_signing import KEY_NAME as RECEIPT_KEY
from agent.receipt_signing import ReceiptSigner
from agent.receipts import Seller
from agent.secret import Secret

# Locals in tracebacks would print secrets; never show them.
app = typer.Typer(pretty_exceptions_show_locals=False, no_args_is_help=True, add_completion=False,
                  help="etims-agent: the KRA eTIMS edge agent beside the till.")
config_app = typer.Typer(no_args_is_help=True, help="Check the configuration.")
app.add_typer(config_app, name="config")

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="TOML config file (default: $ETIMS_AGENT_CONFIG, else built-in defaults).",
    dir_okay=False)]


def _exit_code(exc: AgentError) -> int:
    if isinstance(exc, ConfigError):
        return 2
    if isinstance(exc, DataDirLocked):
        return 3
    if isinstance(exc, StorageError):
        return 4
    return 1


@contextmanager
def _errors() -> Iterator[None]:
    """Print an AgentError as one sentence (no traceback) and exit with its code."""
    try:
        yield
    except AgentError as exc:
        typer.echo(f"etims-agent: {exc}", err=True)
        raise typer.Exit(_exit_code(exc)) from None


def _load(path: Path | None) -> Config:
    return load_config(path)


@app.command("run")
def run_cmd(config: ConfigOption = None) -> None:
    """Run the agent in the foreground (stop with Ctrl-C or SIGTERM)."""
    with _errors():
        cfg = _load(config)
        configure(cfg.log.level, cfg.log.format, file=cfg.log.file, max_bytes=cfg.log.max_bytes,
                  backups=cfg.log.backups)
        run(cfg)


@app.command()
def status(config: ConfigOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the outbox (sales by lane state, oldest unsigned sale) and, when the agent is running, its
    lanes, drain ETA, offline budget and clock offset.

    Exit codes: 0, 2 configuration error, 4 no outbox.
    Example: etims-agent status --config /etc/etims-agent/agent.toml
    """
    with _errors():
        cfg = _load(config)
        outbox = Outbox.open(outbox_path(cfg.data_dir), readonly=True)
        try:
            stats = outbox.stats()
        finally:
            outbox.close()
        body: dict[str, Any] = {
            "data_dir": str(cfg.data_dir), "sales": stats.sales, "kra": stats.kra,
            "tsms": stats.tsms, "journal_entries": stats.journal_entries,
            "oldest_unsigned_at": stats.oldest_unsigned_at.isoformat() if stats.oldest_unsigned_at else None,
            "agent": _running_agent(cfg),
        }
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        agent = body.pop("agent")
        for key, value in body.items():
            typer.echo(f"{key:20} {value}")
        if agent is None:
            typer.echo(f"{'agent':20} not answering on {cfg.http.host}:{cfg.http.port} (stopped?)")
            return
        kra, tsms = agent["lanes"]["kra"], agent["lanes"]["tsms"]
        budget, clock = agent.get("offline_budget") or {}, agent.get("clock") or {}
        typer.echo(f"{'kra lane':20} {kra['state']}" + (f" ({kra['detail']})" if kra.get("detail") else "")
                   + f", backlog {kra['backlog']}, drain ETA {kra.get('drain_eta_s')} s")
        typer.echo(f"{'tsms lane':20} {tsms['state']}" + (f" ({tsms['detail']})" if tsms.get("detail") else "")
                   + f", backlog {tsms['backlog']}, last sync {tsms.get('last_sync_at')}")
        if budget:
            typer.echo(f"{'offline budget':20} {budget['level']}, {budget['count_left']} sales left"
                       + (f": {budget['message']}" if budget.get("message") else ""))
        if clock:
            typer.echo(f"{'clock offset':20} {clock.get('offset_s')} s ({clock.get('level')})")


def _running_agent(cfg: Config) -> dict[str, Any] | None:
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


@app.command()
def verify(config: ConfigOption = None) -> None:
    """Check the journal's hash chain against the stored sales; exit 1 if anything is wrong."""
    with _errors():
        cfg = _load(config)
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


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Parse and validate the config; print the effective settings with secrets masked."""
    with _errors():
        cfg = _load(config)
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
    for key in cfg.secrets_in_file:
        typer.echo(f"warning: {key} is in the config file; use the environment or keyring in production")


MASK = "********"


@config_app.command("show")
def config_show(config: ConfigOption = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Print every effective setting with secrets masked.

    Every section, after the environment's overrides; a secret shows as ******** when it is set. A secret
    kept in the secret store (`etims-agent init`) is not read.

    Exit codes: 0 shown, 2 the config is invalid.

    Example: etims-agent config show --json --config /etc/etims-agent/agent.toml
    """
    with _errors():
        cfg = _load(config)
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


@app.command()
def init(what: Annotated[str, typer.Argument(help="kra (initialise the device with KRA) or tsms (store the "
                                                   "head-office terminal's API key).")] = "kra",
         config: ConfigOption = None,
         cmc_key: Annotated[str | None, typer.Option(
             "--cmc-key", help="Adopt a cmcKey issued earlier instead of asking KRA (needs --scu-id); "
                               "give - to read it from standard input and keep it out of shell history.")] = None,
         scu_id: Annotated[str | None, typer.Option(
             "--scu-id", help="The SCU id (sdcId) issued with that key.")] = None,
         mrc_no: Annotated[str | None, typer.Option("--mrc-no", help="The MRC number, if known.")] = None,
         api_key: Annotated[str | None, typer.Option(
             "--api-key", help="With tsms: the terminal's API key from head office; - reads it from standard "
                               "input.")] = None) -> None:
    """Initialise this device with KRA once (selectInitOsdcInfo) and store its key in the keyring;
    or, with `tsms`, store the head-office terminal's API key there.

    Example: etims-agent init --config /etc/etims-agent/agent.toml
    Example: echo "$KEY" | etims-agent init tsms --api-key - --config /etc/etims-agent/agent.toml
    """
    with _errors():
        cfg = _load(config)
        configure(cfg.log.level, cfg.log.format, file=cfg.log.file, max_bytes=cfg.log.max_bytes,
                  backups=cfg.log.backups)
        if what == "tsms":
            if api_key is None:
                raise ConfigError("--api-key", "is required with tsms", "give the key, or - to read it from stdin")
            key = sys.stdin.readline().strip() if api_key == "-" else api_key
            typer.echo(store_tsms_key(cfg, Secret(key)))
            return
        if what != "kra":
            raise ConfigError("init", f"{what!r} is not something to initialise", "use kra or tsms")
        if cmc_key == "-":
            cmc_key = sys.stdin.readline().strip()
        typer.echo(init_device(cfg, cmc_key=Secret(cmc_key) if cmc_key else None, scu_id=scu_id, mrc_no=mrc_no))


simulate_app = typer.Typer(no_args_is_help=True, help="Run a simulator of an upstream service.")
app.add_typer(simulate_app, name="simulate")


@simulate_app.command("kra")
def simulate_kra(
        port: Annotated[int, typer.Option(help="Port of the OSCU API (faults apply here).")] = 8088,
        control_port: Annotated[int, typer.Option(help="Port of the control API (/_sim/...).")] = 8087,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        seed: Annotated[int, typer.Option(help="Seed for keys and signatures.")] = 1,
        numbering: Annotated[str, typer.Option(help="lenient (unique numbers) or strict (last + 1).")] = "lenient",
        tin: Annotated[str, typer.Option(help="PIN of the simulated device.")] = SIMULATOR_DEVICE[0],
        branch_id: Annotated[str, typer.Option(help="Branch of the simulated device.")] = SIMULATOR_DEVICE[1],
        serial: Annotated[str, typer.Option(help="Serial of the simulated device.")] = SIMULATOR_DEVICE[2]) -> None:
    """Serve the KRA OSCU simulator (legacy API under /etims-api/) until stopped."""
    from agent.kra.simulator import SimDevice, SimulatorConfig, serve_forever

    if numbering not in ("lenient", "strict"):
        raise typer.BadParameter("use lenient or strict", param_hint="--numbering")
    configure()
    cfg = SimulatorConfig(seed=seed, numbering=numbering,
                          devices=(SimDevice(tin=tin, bhf_id=branch_id, serial=serial),))
    serve_forever(cfg, host, port, control_port,
                  on_ready=lambda api, control: typer.echo(f"KRA simulator: {api} (control {control})", err=True))


@simulate_app.command("tsms")
def simulate_tsms(
        port: Annotated[int, typer.Option(help="Port of the TSMS API (faults apply here).")] = 8098,
        control_port: Annotated[int, typer.Option(help="Port of the control API (/_sim/...).")] = 8097,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        serial: Annotated[str, typer.Option(help="Serial number of the simulated terminal.")] =
        TSMS_SIMULATOR_TERMINAL[0],
        api_key: Annotated[str, typer.Option(help="Its API key.")] = TSMS_SIMULATOR_TERMINAL[1],
        tenant_id: Annotated[int, typer.Option(help="Its tenant id.")] = TSMS_SIMULATOR_TERMINAL[2],
        terminal_id: Annotated[int, typer.Option(help="Its terminal id.")] = TSMS_SIMULATOR_TERMINAL[3],
        rate_limit: Annotated[int, typer.Option(help="Submissions per terminal per window (the server's 50).")] = 50,
        rate_window: Annotated[float, typer.Option(help="The limit's window in seconds (the server's 60).")] = 60.0
) -> None:
    """Serve the head-office TSMS simulator (/api/v1/...) until stopped."""
    from agent.sync.simulator import SimTerminal, TsmsSimulatorConfig, serve_forever

    configure()
    cfg = TsmsSimulatorConfig(terminals=(SimTerminal(serial_number=serial, api_key=api_key, tenant_id=tenant_id,
                                                     terminal_id=terminal_id),),
                              rate_limit=rate_limit, rate_window_s=rate_window)
    serve_forever(cfg, host, port, control_port,
                  on_ready=lambda api, control: typer.echo(f"TSMS simulator: {api} (control {control})", err=True))


serial_app = typer.Typer(no_args_is_help=True, help="Find and check the serial ports tills use.")
app.add_typer(serial_app, name="serial")


@serial_app.command("list")
def serial_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the serial ports this machine has (USB adapters show their maker and serial number).

    Example: etims-agent serial list
    """
    from agent.devices.ports import list_ports

    ports = list_ports()
    if as_json:
        typer.echo(json.dumps(ports, indent=2))
        return
    if not ports:
        typer.echo("no serial ports found; is the adapter plugged in (and its driver loaded)?")
    for port in ports:
        typer.echo(f"{port['device']:20} {port['description']}" + (f"  [{port['hwid']}]" if port["hwid"] else ""))


@serial_app.command("test")
def serial_test(
        port: Annotated[str, typer.Argument(help="The port: /dev/ttyUSB0, COM3, socket://host:4001, loop://")],
        mode: Annotated[str, typer.Option(help="plain or framed, as the till speaks.")] = "plain",
        baudrate: Annotated[int, typer.Option(help="Line speed.")] = 9600,
        seconds: Annotated[float, typer.Option(help="How long to listen.")] = 10.0) -> None:
    """Open a port and show what the till sends, decoded (messages, bad frames, noise); nothing is stored.

    Exit codes: 0 at least one message arrived, 1 none did, 2 the port could not be opened.
    Example: etims-agent serial test /dev/ttyUSB0 --mode framed --baudrate 19200
    """
    from agent.devices.ports import listen

    try:
        events = listen(port, mode=mode, baudrate=baudrate, seconds=seconds, echo=typer.echo)
    except (OSError, ValueError) as exc:
        typer.echo(f"etims-agent: cannot open {port}: {exc}; check the name with `etims-agent serial list` "
                   "and that no other program holds it", err=True)
        raise typer.Exit(2) from None
    if not events:
        typer.echo(f"no message in {seconds:g} s: check the cable, the baud rate and the mode")
        raise typer.Exit(1)
    typer.echo(f"{events} message(s) received")


receipt_app = typer.Typer(no_args_is_help=True, help="Show and print receipts.")
app.add_typer(receipt_app, name="receipt")


@receipt_app.command("print")
def receipt_print(sale_id: Annotated[str, typer.Argument(help="The till's sale id.")],
                  config: ConfigOption = None,
                  till_id: Annotated[str | None, typer.Option(help="The till, if several used this id.")] = None,
                  printer: Annotated[int, typer.Option(help="Which [[printers]] entry, from 0.")] = 0) -> None:
    """Reprint a sale's receipt on a configured printer, marked COPY.

    Example: etims-agent receipt print R-0001 --config /etc/etims-agent/agent.toml
    """
    with _errors():
        cfg = _load(config)
        typer.echo(reprint(cfg, sale_id, till_id, printer))


@receipt_app.command("show")
def receipt_show(sale_id: Annotated[str, typer.Argument(help="The till's sale id.")],
                 config: ConfigOption = None,
                 till_id: Annotated[str | None, typer.Option(help="The till, if several used this id.")] = None,
                 fmt: Annotated[str, typer.Option("--format", help="text, html, escpos (printer bytes) or json "
                                                  "(the sale's view, as GET /v1/sales/{id} answers).")] = "text",
                 width: Annotated[int, typer.Option(help="Paper width in columns: 32, 42 or 48.")] = 42) -> None:
    """Show a sale's receipt as the till would get it now; not counted as a print.

    Signed, or temporary until KRA signs it. The next print is still an original if none was printed yet;
    it says COPY if the receipt was printed before, as the till's next print would. escpos writes the
    printer's bytes to standard output (redirect them to the printer or a file).

    Exit codes: 0 shown, 1 no such sale, 2 several tills used the id (give --till-id), a bad --format or
    --width, or a bad config, 4 the outbox cannot be read.

    Example: etims-agent receipt show R-0001 --format escpos --width 48 > /dev/usb/lp0
    """
    with _errors():
        if fmt not in ("text", "html", "escpos", "json"):
            raise ConfigError("--format", f"{fmt!r} is not a receipt format", "use text, html, escpos or json")
        if width not in WIDTHS:
            raise ConfigError("--width", f"{width} columns is not a paper width",
                              f"use {', '.join(map(str, WIDTHS))}")
        cfg = _load(config)
        with _opened(cfg) as outbox:
            record = find_sale(outbox, sale_id, till_id)
            view = _sale_view(cfg, outbox, record)
            printed = outbox.prints_of(record.id, view["receipt"]["kind"]) > 0
    if fmt == "json":
        typer.echo(json.dumps(view, indent=2))
        return
    body, _ = render(view, fmt, width, copy=printed)
    if fmt == "escpos":
        typer.echo(body, nl=False)  # bytes: click writes them to the binary stdout
    else:
        typer.echo(body.decode("utf-8"), nl=False)


def _sale_view(cfg: Config, outbox: Outbox, record: SaleRecord) -> dict[str, Any]:
    """The sale's view, built as the agent builds it, but read-only: no key is made, nothing is counted."""
    identity = KraStore(outbox).device()
    seller = None if identity is None else Seller(
        tin=cfg.kra.tin, bhf_id=cfg.kra.branch_id, sdc_id=identity["sdc_id"], environment=cfg.kra.environment,
        name=str(identity["info"].get("taxprNm") or ""))
    signer = None
    if record.kra_signature is None:  # only a temporary receipt shows the agent's signature
        stored = open_secrets(cfg).get(RECEIPT_KEY)
        if stored is None:
            typer.echo("warning: the agent's receipt key is not in the secret store (has the agent run with this "
                       "config?); the temporary receipt is shown without its signature", err=True)
        else:
            signer = ReceiptSigner.from_secret(stored)
    desk = SaleDesk(ApiContext(outbox=outbox, rules=intake_rules(cfg), clock=system_clock, max_body_bytes=0,
                               started_at=system_clock(), receipt_signer=signer, seller=seller))
    return desk.view(record)


outbox_app = typer.Typer(no_args_is_help=True, help="Inspect the outbox and move a stuck sale by hand (works while "
                         "the agent runs).")
app.add_typer(outbox_app, name="outbox")

TillOption = Annotated[str | None, typer.Option("--till-id", help="The till, if several tills used this sale id.")]
SaleArgument = Annotated[str, typer.Argument(help="The till's sale id (as on the receipt).")]


@contextmanager
def _opened(cfg: Config, *, write: bool = False) -> Iterator[Outbox]:
    outbox = open_outbox(outbox_path(cfg.data_dir), write=write)
    try:
        yield outbox
    finally:
        outbox.close()


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
    with _errors():
        cfg = _load(config)
        with _opened(cfg) as outbox:
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
                   f"{_shorten(error, 60)}")


@outbox_app.command("show")
def outbox_show(sale_id: SaleArgument, config: ConfigOption = None, till_id: TillOption = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show everything stored about one sale.

    The sale and its amounts, the KRA request stored for it, KRA's signature or error, attempts and next
    attempt, its TSMS transaction and submission (state, last status, last error), how often its receipts
    were printed, and its journal entries (event, time, detail).

    Exit codes: 0 shown, 1 no such sale, 2 several tills used the id (give --till-id) or a bad config,
    4 the outbox cannot be read.

    Example: etims-agent outbox show R-0001 --till-id TILL-1 --json
    """
    with _errors():
        cfg = _load(config)
        with _opened(cfg) as outbox:
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
    with _errors():
        cfg = _load(config)
        with _opened(cfg, write=True) as outbox:
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
    with _errors():
        cfg = _load(config)
        with _opened(cfg, write=True) as outbox:
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
    with _errors():
        cfg = _load(config)
        with _opened(cfg, write=True) as outbox:
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


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
