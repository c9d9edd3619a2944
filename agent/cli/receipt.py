"""`receipt print|show`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from agent.app import intake_rules, open_secrets, reprint
from agent.cli.common import ConfigOption, app, errors, load, opened
from agent.clock import system_clock
from agent.config import Config
from agent.desk import ApiContext, SaleDesk
from agent.errors import ConfigError
from agent.queue.admin import find_sale
from agent.queue.kra_store import KraStore
from agent.queue.outbox import Outbox, SaleRecord
from agent.receipt_format import WIDTHS, render
from agent.receipt_signing import KEY_NAME as RECEIPT_KEY
from agent.receipt_signing import ReceiptSigner
from agent.receipts import Seller

receipt_app = typer.Typer(no_args_is_help=True, help="Show and print receipts.")
app.add_typer(receipt_app, name="receipt")


@receipt_app.command("print")
def receipt_print(sale_id: Annotated[str, typer.Argument(help="The till's sale id.")],
                  config: ConfigOption = None,
                  till_id: Annotated[str | None, typer.Option(help="The till, if several used this id.")] = None,
                  printer: Annotated[int, typer.Option(help="Which [[printers]] entry, from 0.")] = 0) -> None:
    """Reprint a sale's receipt on a configured printer, marked COPY.

    Exit codes: 0 printed, 2 no such sale or printer (or several tills used the id: give --till-id),
    4 the printer could not be reached (the message says what to check).

    Example: etims-agent receipt print R-0001 --config /etc/etims-agent/agent.toml
    """
    with errors():
        cfg = load(config)
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
    with errors():
        if fmt not in ("text", "html", "escpos", "json"):
            raise ConfigError("--format", f"{fmt!r} is not a receipt format", "use text, html, escpos or json")
        if width not in WIDTHS:
            raise ConfigError("--width", f"{width} columns is not a paper width",
                              f"use {', '.join(map(str, WIDTHS))}")
        cfg = load(config)
        with opened(cfg) as outbox:
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
