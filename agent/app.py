"""Composition root: builds the agent from its config, runs it, and stops it cleanly.

The only module (with cli.py) that knows every part. Config values are turned into plain arguments
here; no other module sees a Config.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from agent.api import ApiContext, create_app
from agent.clock import Clock, system_clock
from agent.config import TILL_TOKEN_ENV, Config
from agent.errors import ConfigError
from agent.intake import IntakeRules
from agent.lock import DataDirLock
from agent.logs import get_logger
from agent.queue.outbox import Outbox

log = get_logger("agent")

OUTBOX_FILE = "outbox.sqlite3"


def outbox_path(data_dir: Path) -> Path:
    return data_dir / OUTBOX_FILE


def check_exposure(cfg: Config) -> None:
    """Refuse to listen beyond this machine unless tills must present a token."""
    if not cfg.http.is_loopback and cfg.http.till_token is None:
        raise ConfigError(
            "http.host",
            f"{cfg.http.host} is not a loopback address and no till token is set",
            f"set http.till_token or {TILL_TOKEN_ENV} so every till must authenticate, "
            'or bind "127.0.0.1"',
            source=cfg.source,
        )


def intake_rules(cfg: Config) -> IntakeRules:
    return IntakeRules(tax_rates=cfg.tax.default_rates,
                       prices_include_vat=cfg.sales.prices_include_vat,
                       max_lines=cfg.sales.max_lines)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("http.port", f"cannot listen on {host}:{port} ({exc.strerror})",
                          "stop whatever holds the port (is another agent running?) or pick "
                          "another http.port") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve until SIGTERM/SIGINT, then return so the outbox is closed properly.

    uvicorn re-raises the signal it caught once it has shut down, which under the default handlers
    would kill the process before our cleanup runs; our handlers only ask the server to stop.
    """
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(cfg: Config, *, clock: Clock = system_clock,
        on_ready: Callable[[str], None] | None = None) -> None:
    """Run in the foreground until SIGTERM or SIGINT; in-flight requests finish first."""
    check_exposure(cfg)
    for key in cfg.secrets_in_file:
        log.warning("secret_in_config_file", key=key,
                    hint="fine for development; in production use the environment or the keyring")
    with DataDirLock(cfg.data_dir):
        outbox = Outbox.open(outbox_path(cfg.data_dir))
        try:
            ctx = ApiContext(outbox=outbox, rules=intake_rules(cfg), clock=clock,
                             max_body_bytes=cfg.http.max_body_bytes, started_at=clock())
            app = create_app(ctx, till_token=cfg.http.till_token)
            sock = bind(cfg.http.host, cfg.http.port)
            host, port = sock.getsockname()[:2]
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            server = uvicorn.Server(uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="off", http="httptools",
                timeout_graceful_shutdown=10, server_header=False,
            ))
            log.info("listening", url=url, data_dir=str(cfg.data_dir), config=cfg.source)
            if on_ready is not None:
                on_ready(url)
            _serve(server, sock)
        finally:
            outbox.close()
            log.info("stopped", data_dir=str(cfg.data_dir))
