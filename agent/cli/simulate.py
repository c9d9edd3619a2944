"""`simulate kra|tsms`: the upstream simulators as their own processes."""

from __future__ import annotations

from typing import Annotated

import typer

from agent.cli.common import app
from agent.config import SIMULATOR_DEVICE, TSMS_SIMULATOR_TERMINAL
from agent.logs import configure

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
    """Serve the KRA OSCU simulator (legacy API under /etims-api/) until stopped.

    Its control API injects faults (outage, latency, lost answers, result codes) and reports what it
    holds; see the README. Exit codes: 0 stopped, 2 a bad option.

    Example: etims-agent simulate kra --port 8088 --control-port 8087 --numbering strict
    """
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
    """Serve the head-office TSMS simulator (/api/v1/...) until stopped.

    Its control API injects faults (outage, 429/503, revoked tokens, lost answers) and reports what it
    holds; see the README. Exit codes: 0 stopped, 2 a bad option.

    Example: etims-agent simulate tsms --port 8098 --control-port 8097 --rate-limit 50
    """
    from agent.sync.simulator import SimTerminal, TsmsSimulatorConfig, serve_forever

    configure()
    cfg = TsmsSimulatorConfig(terminals=(SimTerminal(serial_number=serial, api_key=api_key, tenant_id=tenant_id,
                                                     terminal_id=terminal_id),),
                              rate_limit=rate_limit, rate_window_s=rate_window)
    serve_forever(cfg, host, port, control_port,
                  on_ready=lambda api, control: typer.echo(f"TSMS simulator: {api} (control {control})", err=True))
