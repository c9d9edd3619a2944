"""`serial list|test`: find and check the ports tills use."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from agent.cli.common import JsonOption, app

serial_app = typer.Typer(no_args_is_help=True, help="Find and check the serial ports tills use.")
app.add_typer(serial_app, name="serial")


@serial_app.command("list")
def serial_list(as_json: JsonOption = False) -> None:
    """List the serial ports this machine has (USB adapters show their maker and serial number).

    Exit codes: 0 (even when none is found).

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
