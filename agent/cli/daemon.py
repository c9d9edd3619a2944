"""Running the agent: run, status, init and version."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from agent import __version__
from agent.app import init_device, outbox_path, run, store_tsms_key
from agent.cli.common import ConfigOption, JsonOption, app, errors, load, running_agent
from agent.errors import ConfigError
from agent.logs import configure
from agent.queue.outbox import Outbox
from agent.queue.retention import summary
from agent.secret import Secret


@app.command("run")
def run_cmd(config: ConfigOption = None) -> None:
    """Run the agent in the foreground (stop with Ctrl-C or SIGTERM; in-flight requests finish first).

    Exit codes: 0 stopped cleanly, 2 configuration error (or the HTTP port is taken), 3 another agent
    uses this data directory, 4 the outbox cannot be opened.

    Example: etims-agent run --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        configure(cfg.log.level, cfg.log.format, file=cfg.log.file, max_bytes=cfg.log.max_bytes,
                  backups=cfg.log.backups)
        run(cfg)


@app.command()
def status(config: ConfigOption = None,
           as_json: JsonOption = False) -> None:
    """Show the outbox (sales by lane state, oldest unsigned sale, retention: keep_days and the sales pruned
    so far) and, when the agent is running, its lanes, drain ETA, offline budget, clock offset and the
    retention job's last run.

    Exit codes: 0, 2 configuration error, 4 no outbox.
    Example: etims-agent status --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
        outbox = Outbox.open(outbox_path(cfg.data_dir), readonly=True)
        try:
            stats = outbox.stats()
            retention = {"keep_days": cfg.retention.keep_days, **summary(outbox)}
        finally:
            outbox.close()
        body: dict[str, Any] = {
            "data_dir": str(cfg.data_dir), "sales": stats.sales, "kra": stats.kra,
            "tsms": stats.tsms, "journal_entries": stats.journal_entries,
            "oldest_unsigned_at": stats.oldest_unsigned_at.isoformat() if stats.oldest_unsigned_at else None,
            "unsigned_value": str(stats.unsigned_value),
            "retention": retention,
            "agent": running_agent(cfg),
        }
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        agent = body.pop("agent")
        body["retention"] = _retention_line(body["retention"], agent)
        for key, value in body.items():
            typer.echo(f"{key:20} {value}")
        if agent is None:
            typer.echo(f"{'agent':20} not answering on {cfg.http.host}:{cfg.http.port} (stopped?)")
            return
        kra, tsms = agent["lanes"]["kra"], agent["lanes"]["tsms"]
        budget, clock = agent.get("offline_budget") or {}, agent.get("clock") or {}
        typer.echo(f"{'kra lane':20} {kra['state']}" + (f" ({kra['detail']})" if kra.get("detail") else "")
                   + f", backlog {kra['backlog']} (value {kra.get('backlog_value')}), drain ETA "
                   f"{kra.get('drain_eta_s')} s")
        typer.echo(f"{'tsms lane':20} {tsms['state']}" + (f" ({tsms['detail']})" if tsms.get("detail") else "")
                   + f", backlog {tsms['backlog']}, last sync {tsms.get('last_sync_at')}")
        if budget:
            typer.echo(f"{'offline budget':20} {budget['level']}, {budget['count_left']} sales left"
                       + (f": {budget['message']}" if budget.get("message") else ""))
        if clock:
            typer.echo(f"{'clock offset':20} {clock.get('offset_s')} s ({clock.get('level')})")



def _retention_line(retention: dict[str, Any], agent: dict[str, Any] | None) -> str:
    days = retention["keep_days"]
    line = f"keep_days {days}" + (" (every sale is kept)" if not days else "")
    line += f", {retention['pruned_sales']} sales pruned so far"
    if retention["last_pruned_at"]:
        line += f", the last at {retention['last_pruned_at']}"
    running = (agent or {}).get("retention") or {}
    if running.get("last_run_at"):
        line += f"; last run {running['last_run_at']} ({running['last_run_pruned']} pruned)"
    return line


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

    Exit codes: 0 done, 1 KRA refused or could not be reached (the message says what to do), 2 a bad
    option or config, 3 the agent holds the data directory (stop it first), 4 storage error.

    Example: etims-agent init --config /etc/etims-agent/agent.toml
    Example: echo "$KEY" | etims-agent init tsms --api-key - --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
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


@app.command()
def version() -> None:
    """Print the version.

    Exit codes: 0.

    Example: etims-agent version
    """
    typer.echo(__version__)
