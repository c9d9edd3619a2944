"""The technician's command line: thin; it parses arguments and calls the library."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import __version__
from agent.app import check_exposure, init_device, outbox_path, reprint, run, store_tsms_key
from agent.config import SIMULATOR_DEVICE, TSMS_SIMULATOR_TERMINAL, Config, load_config
from agent.errors import AgentError, ConfigError, DataDirLocked, StorageError
from agent.logs import configure
from agent.queue.outbox import Outbox
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
        configure(cfg.log.level, cfg.log.format)
        run(cfg)


@app.command()
def status(config: ConfigOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the outbox: sales by lane state and the oldest unsigned sale (works while running)."""
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
        }
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        for key, value in body.items():
            typer.echo(f"{key:20} {value}")


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
        configure(cfg.log.level, cfg.log.format)
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


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
