"""A local double of KRA's legacy OSCU API, served over real sockets, with fault injection
(kra-oscu.md §7.5). Every KRA test of the project talks to it.

Two ports:

* the API port (`api_url`, ".../etims-api"): a small asyncio TCP relay in front of a Starlette app
  on uvicorn. The relay is what an outage switches off (its listening socket is closed, so clients
  get ECONNREFUSED, and open connections are reset), where TCP connections are counted, and what
  a `reset` fault uses to drop a connection without an answer. `/_sim/...` is served here too
  while there is no outage.
* the control port (`control_url`): `/_sim/...` only, never faulted.

The endpoints, their state and validation live in `agent.kra.sim_state` (pure); this module is the
HTTP, threading and fault layer. Decisions where KRA's behaviour is not documented:

* Every answer is HTTP 200 with `{resultCd, resultMsg, resultDt, data}` except: an unknown path is
  HTTP 404 with resultCd `912`; a method other than POST on an API path is HTTP 405 with `912`;
  the strict-numbering refusal uses `strict_http_status` (200 or 400). An empty body is `911`;
  a body that is not JSON, or not a JSON object, is `910`.
* A `910` message is "Request parameter error: <field>: <problem>", the field as a JSON path
  (`itemList[0].taxTyCd`). The strict refusal's message is exactly
  "Invc No: N is invalid, use the expected value: M".
* Checks run in this order: headers (900/901), invcNo type, strict sequence (which a reused number
  fails too), already signed (994, so lenient mode only), the payload (910), credit-note rules (910).
* Amounts: lines may follow the net convention (taxAmt = taxblAmt * r/100, totAmt = taxblAmt +
  taxAmt) or the spec samples' gross one (taxblAmt tax-inclusive, taxAmt = taxblAmt * r/(100+r),
  totAmt = taxblAmt), within 0.01, but not both in one invoice; band and header sums within 0.05.
  Amounts must be JSON numbers (not strings), non-negative, with at most 2 decimals.
* A credit note's date check compares `salesDt` with the original's `salesDt` (day precision).
* `lastReqDt` is required on the list lookups and returns records changed strictly after it.
  `selectCustomer` and `selectInvoiceDetails` do not take it.

Faults (`POST /_sim/faults`, or `set_faults(**faults)`; given entries replace, null clears) apply to
`/etims-api/` requests in this order: latency, then the first matching of reset, http_status,
malformed_json, result_code (each `count` requests, optionally only on `paths`); `commit: true`
runs the request for real before the faulty answer. hang_after_commit holds the answer of the
next `count` saveTrnsSalesOsdc calls that ran for `seconds` after they were processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import struct
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agent.clock import Clock
from agent.kra.sim_state import (
    SAVE_SALE,
    Answer,
    CountedFault,
    Faults,
    SimDevice,
    SimState,
    SimulatorConfig,
    changed_config,
    kra_time,
    to_json,
)

__all__ = ["SimDevice", "Simulator", "SimulatorConfig", "serve_forever"]

_DEFAULT_CONFIG = SimulatorConfig()
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it
    # Nagle and delayed ACKs add 40 ms to every answer written in two parts.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed: its streams make the relay and uvicorn several times cheaper, so the
    simulator adds little of its own to the latency a test or benchmark asks for."""
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pipe:
    """One relayed connection: the client's and the one to uvicorn."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client, self.upstream = client, upstream

    def abort(self) -> None:
        _abort(self.client, rst=True)
        _abort(self.upstream, rst=False)

    def close(self) -> None:
        self.client.close()
        self.upstream.close()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, pipe: _Pipe) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if not dst.is_closing() and dst.can_write_eof():
            dst.write_eof()
    except (OSError, RuntimeError):
        pipe.abort()


class _Relay:
    """The public API port: relays TCP to uvicorn, can stop listening, counts and resets connections."""

    def __init__(self, sock: socket.socket, upstream_port: int, on_connect: Callable[[], None]) -> None:
        self._sock: socket.socket | None = sock  # bound and listening, until served or closed
        self._host, self._port = sock.getsockname()[:2]
        self._upstream_port = upstream_port
        self._on_connect = on_connect
        self._server: asyncio.Server | None = None
        self._pipes: dict[int, _Pipe] = {}  # by the local port of the upstream leg = uvicorn's client port

    async def listen(self, on: bool) -> None:
        if on and self._server is None:
            sock = self._sock if self._sock is not None else _listening_socket(self._host, self._port)
            self._sock = None
            self._server = await asyncio.start_server(self._handle, sock=sock)
        elif not on:
            self.close()

    def close(self) -> None:
        """Stop listening (new connections are refused) and reset every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for pipe in list(self._pipes.values()):
            pipe.abort()

    def reset(self, upstream_port: int) -> bool:
        pipe = self._pipes.get(upstream_port)
        if pipe is None:
            return False
        pipe.abort()
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._on_connect()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except OSError:
            _abort(writer, rst=True)
            return
        pipe = _Pipe(writer, up_writer)
        if self._server is None:  # the outage began while connecting
            pipe.abort()
            return
        port = up_writer.get_extra_info("sockname")[1]
        self._pipes[port] = pipe
        try:
            await asyncio.gather(_copy(reader, up_writer, pipe), _copy(up_reader, writer, pipe))
        finally:
            self._pipes.pop(port, None)
            pipe.close()


class Simulator:
    """KRA's OSCU API on real sockets, served from a background thread (see the module docstring).

    `with Simulator(cfg).start() as sim:` stops it on exit. State and faults may be read and set
    from any thread.
    """

    def __init__(self, config: SimulatorConfig = _DEFAULT_CONFIG, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or _utc_now
        self._lock = threading.RLock()
        self._state = SimState(config)
        self._faults = Faults()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._relay: _Relay | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._api_url = ""
        self._control_url = ""

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, control_port: int = 0) -> Simulator:
        """Serve in a background thread; returns once both ports accept connections."""
        if self._thread is not None:
            raise RuntimeError("the simulator is already running")
        sockets: list[socket.socket] = []
        try:
            for h, p in ((host, port), (host, control_port), ("127.0.0.1", 0)):
                sockets.append(_listening_socket(h, p))
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        public, control, internal = sockets
        self._api_url = f"http://{_netloc(host, public.getsockname()[1])}/etims-api"
        self._control_url = f"http://{_netloc(host, control.getsockname()[1])}"
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, args=(public, control, internal),
                                        name="kra-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._failure is not None:
            failure = self._failure
            self.stop()
            raise RuntimeError(f"the KRA simulator did not start ({failure!r})")
        return self

    def stop(self) -> None:
        thread, loop, closing = self._thread, self._loop, self._closing
        if thread is None:
            return
        if loop is not None and closing is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(closing.set)
        thread.join(timeout=15)
        self._thread = self._loop = self._closing = self._relay = None

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        """The public, fault-injectable API base, e.g. "http://127.0.0.1:PORT/etims-api"."""
        if not self._api_url:
            raise RuntimeError("the simulator is not started")
        return self._api_url

    @property
    def control_url(self) -> str:
        """The control API base, e.g. "http://127.0.0.1:CPORT" (serves /_sim/...)."""
        if not self._control_url:
            raise RuntimeError("the simulator is not started")
        return self._control_url

    # --- control --------------------------------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        with self._lock:
            return self._state.config

    def configure(self, **changes: Any) -> None:
        """Change numbering, reinit_code, require_registered_items, strict_http_status, tax_convention."""
        with self._lock:
            self._state.config = changed_config(self._state.config, changes)

    def set_faults(self, **faults: Any) -> None:
        """Same semantics as POST /_sim/faults; ValueError on a bad fault (nothing changes)."""
        with self._lock:
            self._faults.merge(faults, self._state.paths)
        self._sync_outage()

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.describe()

    def reset(self, state: bool = False) -> None:
        """Clear every fault; with state=True also forget devices' keys, items, sales and counters."""
        with self._lock:
            self._faults = Faults()
            if state:
                self._state.clear()
        self._sync_outage()

    def state(self) -> dict[str, Any]:
        """What KRA holds and what it saw: the body of GET /_sim/state."""
        with self._lock:
            snapshot = self._state.snapshot()
            snapshot["faults"] = self._faults.describe()
            snapshot["config"] = dataclasses.asdict(self._state.config)
        result: dict[str, Any] = json.loads(to_json(snapshot))
        return result

    def _sync_outage(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not loop.is_running():
            return
        if threading.current_thread() is thread:
            loop.create_task(self._apply_outage())
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._apply_outage(), loop).result(timeout=10)

    async def _apply_outage(self) -> None:
        with self._lock:
            outage = self._faults.outage
        if self._relay is not None:
            await self._relay.listen(not outage)

    # --- the server thread ----------------------------------------------------------------------

    def _run(self, public: socket.socket, control: socket.socket, internal: socket.socket) -> None:
        loop = _new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(public, control, internal))
        except BaseException as exc:  # reported by start(); the thread must not die noisily
            self._failure = exc
        finally:
            for sock in (public, control, internal):
                sock.close()
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self, public: socket.socket, control: socket.socket, internal: socket.socket) -> None:
        closing = self._closing = asyncio.Event()
        internal_port = internal.getsockname()[1]
        api_app, control_app = self._app(on_api_port=True), self._app(on_api_port=False)

        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            server = scope.get("server")
            app = api_app if server is not None and server[1] == internal_port else control_app
            await app(scope, receive, send)

        server = uvicorn.Server(uvicorn.Config(
            dispatch, log_config=None, access_log=False, lifespan="off", http="httptools", ws="none",
            server_header=False, timeout_graceful_shutdown=1,
        ))
        serving = asyncio.create_task(server.serve(sockets=[internal, control]))
        relay = self._relay = _Relay(public, internal_port, self._note_connection)
        try:
            await self._apply_outage()
            while not server.started:
                if serving.done():
                    await serving
                    raise RuntimeError("uvicorn stopped during startup")
                await asyncio.sleep(0.005)
            self._ready.set()
            await closing.wait()
        finally:
            closing.set()
            relay.close()
            server.should_exit = True
            await serving
            current = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def _note_connection(self) -> None:
        with self._lock:
            self._state.note_connection()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the simulator stops."""
        closing = self._closing
        if closing is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)

    # --- HTTP -----------------------------------------------------------------------------------

    def _app(self, *, on_api_port: bool) -> Starlette:
        async def faults(request: Request) -> Response:
            return await self._faults_endpoint(request, on_api_port)

        async def reset(request: Request) -> Response:
            return await self._reset_endpoint(request, on_api_port)

        routes = [
            Route("/_sim/state", self._state_endpoint, methods=["GET"]),
            Route("/_sim/faults", faults, methods=["GET", "POST"]),
            Route("/_sim/reset", reset, methods=["POST"]),
            Route("/_sim/config", self._config_endpoint, methods=["GET", "POST"]),
        ]
        if on_api_port:
            routes.append(Route("/etims-api/{name:path}", self._api, methods=_ALL_METHODS))

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if on_api_port and not request.url.path.startswith("/_sim/"):
                return self._reply(request.url.path, Answer.of("912", f"there is no API {request.url.path}",
                                                               http_status=exc.status_code))
            return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def _api(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        with self._lock:
            self._state.note_request(name)
            known = name in self._state.paths
        if not known:
            return self._reply(name, Answer.of("912", f"there is no API /{name}", http_status=404))
        if request.method != "POST":
            return self._reply(name, Answer.of("912", f"use POST, not {request.method}", http_status=405))
        body = await request.body()
        with self._lock:
            latency = self._faults.latency_ms
        if latency > 0:
            await self._pause(latency / 1000)
        headers = {key.lower(): value for key, value in request.headers.items()}
        with self._lock:
            if name == SAVE_SALE:
                self._state.note_attempt(headers, body)
            fault = self._faults.take(name)
        if fault is not None and fault.kind == "reset":
            return self._drop_connection(request, name)
        answer = None
        if fault is None or fault.commit:
            with self._lock:
                answer = self._state.handle(name, headers, body, self._clock())
            if name == SAVE_SALE:
                with self._lock:
                    hang = self._faults.take_hang()
                if hang > 0:
                    await self._pause(hang)
        if fault is None:
            assert answer is not None
            return self._reply(name, answer)
        return self._faulty_reply(name, fault, answer)

    def _faulty_reply(self, name: str, fault: CountedFault, answer: Answer | None) -> Response:
        if fault.kind == "result_code":
            return self._reply(name, Answer.of(fault.code))
        if fault.kind == "http_status":
            with self._lock:
                self._state.note_result(name, f"http-{fault.status}")
            return Response(f"<html><body><h1>{fault.status} Simulated fault</h1></body></html>",
                            status_code=fault.status, media_type="text/html")
        text = self._envelope(answer or Answer.of("000"))
        with self._lock:
            self._state.note_result(name, "malformed-json")
        return Response(text[: max(1, len(text) // 2)], media_type="application/json")

    def _drop_connection(self, request: Request, name: str) -> Response:
        client = request.scope.get("client")
        if self._relay is not None and client is not None:
            self._relay.reset(client[1])
        with self._lock:
            self._state.note_result(name, "reset")
        return Response(status_code=500)  # goes nowhere: the relay already reset the connection

    def _envelope(self, answer: Answer) -> str:
        return to_json({"resultCd": answer.code, "resultMsg": answer.message, "resultDt": kra_time(self._clock()),
                        "data": answer.data})

    def _reply(self, name: str, answer: Answer) -> Response:
        with self._lock:
            self._state.note_result(name, answer.code)
        return Response(self._envelope(answer), status_code=answer.http_status, media_type="application/json")

    async def _state_endpoint(self, request: Request) -> Response:
        return _json(self.state())

    async def _faults_endpoint(self, request: Request, on_api_port: bool) -> Response:
        background = None
        if request.method == "POST":
            doc = await _json_object(request)
            if isinstance(doc, Response):
                return doc
            try:
                with self._lock:
                    self._faults.merge(doc, self._state.paths)
            except ValueError as exc:
                return _error(400, str(exc))
            background = await self._outage_change(on_api_port)
        return _json({"faults": self.faults()}, background)

    async def _reset_endpoint(self, request: Request, on_api_port: bool) -> Response:
        doc = await _json_object(request, allow_empty=True)
        if isinstance(doc, Response):
            return doc
        state = doc.get("state", False)
        if not isinstance(state, bool):
            return _error(400, "state must be true or false")
        with self._lock:
            self._faults = Faults()
            if state:
                self._state.clear()
        return _json({"faults": self.faults(), "state_cleared": state}, await self._outage_change(on_api_port))

    async def _outage_change(self, on_api_port: bool) -> BackgroundTask | None:
        """Apply the outage setting now, or, asked on the API port, once the answer has gone out."""
        if not on_api_port:
            await self._apply_outage()
            return None

        async def later() -> None:
            await asyncio.sleep(0.05)
            await self._apply_outage()
        return BackgroundTask(later)

    async def _config_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            doc = await _json_object(request)
            if isinstance(doc, Response):
                return doc
            try:
                self.configure(**doc)
            except ValueError as exc:
                return _error(400, str(exc))
        return _json({"config": dataclasses.asdict(self.config)})


async def _json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any] | Response:
    body = await request.body()
    if allow_empty and not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return _error(400, "the body must be a JSON object")
    if not isinstance(doc, dict):
        return _error(400, "the body must be a JSON object")
    return doc


def _json(body: Any, background: BackgroundTask | None = None) -> Response:
    return Response(to_json(body), media_type="application/json", background=background)


def _error(status: int, message: str) -> Response:
    return Response(to_json({"error": message}), status_code=status, media_type="application/json")


def serve_forever(config: SimulatorConfig, host: str, port: int, control_port: int,
                  on_ready: Callable[[str, str], None] | None = None) -> None:
    """Blocking, for `etims-agent simulate kra`; stops on SIGINT/SIGTERM (when run in the main thread)."""
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: object) -> None:
            stop.set()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    simulator = Simulator(config)
    try:
        simulator.start(host, port, control_port)
        if on_ready is not None:
            on_ready(simulator.api_url, simulator.control_url)
        while not stop.wait(0.5):
            pass
    finally:
        simulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

