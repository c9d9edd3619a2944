"""The server shared by the KRA and TSMS simulators (`agent.kra.simulator`, `agent.sync.simulator`).

`SimServer` serves a simulator's ASGI apps on uvicorn in a background thread with its own event
loop, on two ports: the API port, behind an asyncio TCP relay (`_Relay`) that an outage switches
off (its listening socket is closed and open connections are reset), that counts connections and
that can reset one connection; and the control port, served directly and never faulted.

It also holds what the two simulators share around their state and fault plan: `faults()`,
`set_faults()`, `reset()`, `state()`, the `/_sim/state`, `/_sim/faults` and `/_sim/reset`
endpoints, the outage flag and the `latency_ms` pause. A subclass gives its API route, the answer
to an unknown API path, how a change to its fault plan is applied (`_merge_faults`) and how it
writes JSON (`_dumps`); the API and the meaning of every other fault stay in the simulator modules.
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
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agent.clock import Clock

__all__ = ["SimServer", "json_error", "read_json_object", "serve_forever"]

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # API paths answer every method


def utc_now() -> datetime:
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


class ServerState(Protocol):
    """What the server needs of a simulator's state (pure, not thread-safe: the server locks)."""

    config: Any  # a dataclass: GET /_sim/state shows it

    def clear(self) -> None:
        """Forget everything held and counted (POST /_sim/reset with state=true)."""

    def note_connection(self) -> None:
        """Count one TCP connection to the API port."""

    def snapshot(self) -> dict[str, Any]:
        """A fresh JSON-able view of the state, the body of GET /_sim/state without faults and config."""


class FaultPlan(Protocol):
    """What the server needs of a simulator's fault plan."""

    outage: bool
    latency_ms: float

    def describe(self) -> dict[str, Any]:
        """The plan as GET /_sim/faults shows it."""


StateT = TypeVar("StateT", bound=ServerState)
FaultsT = TypeVar("FaultsT", bound=FaultPlan)


class SimServer(ABC, Generic[StateT, FaultsT]):
    """A simulator's two ports, served from a background thread (see the module docstring).

    `with Sub(...).start() as sim:` stops it on exit. `_lock` guards `_state` and `_faults`, which
    may be read and set from any thread; after changing the outage flag call `_sync_outage` (from
    any thread) or await `_apply_outage` (on the server's loop).
    """

    _NAME: ClassVar[str]  # "KRA": the thread is "kra-simulator", start's error names "the KRA simulator"
    _API_PATH: ClassVar[str] = ""  # appended to the API port's root to give `api_url`

    def __init__(self, state: StateT, new_faults: Callable[[], FaultsT], clock: Clock | None) -> None:
        self._clock: Clock = clock or utc_now
        self._state = state
        self._new_faults = new_faults  # reset starts again from a plan without faults
        self._faults = new_faults()
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._relay: _Relay | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._api_url = ""
        self._control_url = ""

    # --- what a simulator gives -----------------------------------------------------------------

    @abstractmethod
    def _api_route(self) -> Route:
        """The simulated API's route, served on the API port only."""

    def _more_sim_routes(self) -> list[Route]:
        """The simulator's own `/_sim/...` routes beside state, faults and reset (on both ports)."""
        return []

    @abstractmethod
    def _unknown_api_path(self, request: Request, status: int) -> Response:
        """The API's own answer to a path (404) or method (405) the API port does not serve."""

    @abstractmethod
    def _merge_faults(self, changes: dict[str, Any]) -> None:
        """Apply POST /_sim/faults `changes` to `_faults`, called under `_lock`; ValueError, and
        nothing changes, on a bad entry."""

    @staticmethod
    def _dumps(value: Any) -> str:
        """The JSON text of every answer `_json` gives and of the state snapshot."""
        return json.dumps(value)

    # --- control --------------------------------------------------------------------------------

    def set_faults(self, **faults: Any) -> None:
        """Same semantics as POST /_sim/faults; ValueError on a bad fault (nothing changes)."""
        with self._lock:
            self._merge_faults(faults)
        self._sync_outage()

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.describe()

    def reset(self, state: bool = False) -> None:
        """Clear every fault; with state=True also forget everything held and counted (the state's `clear`)."""
        self._clear(state)
        self._sync_outage()

    def state(self) -> dict[str, Any]:
        """What the simulated server holds and what it saw: the body of GET /_sim/state."""
        with self._lock:
            snapshot = self._state.snapshot()
            snapshot["faults"] = self._faults.describe()
            snapshot["config"] = dataclasses.asdict(self._state.config)
        result: dict[str, Any] = json.loads(self._dumps(snapshot))
        return result

    def _clear(self, state: bool) -> None:
        with self._lock:
            self._faults = self._new_faults()
            if state:
                self._state.clear()

    def _outage(self) -> bool:
        """Whether the API port is to be closed; called under `_lock`."""
        return self._faults.outage

    def _note_connection(self) -> None:
        """Count a TCP connection to the API port (called on the server's loop)."""
        with self._lock:
            self._state.note_connection()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, control_port: int = 0) -> Self:
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
        self._api_url = f"http://{_netloc(host, public.getsockname()[1])}{self._API_PATH}"
        self._control_url = f"http://{_netloc(host, control.getsockname()[1])}"
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, args=(public, control, internal),
                                        name=f"{self._NAME.lower()}-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._failure is not None:
            failure = self._failure
            self.stop()
            raise RuntimeError(f"the {self._NAME} simulator did not start ({failure!r})")
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        """The public, fault-injectable API base: the API port's root and `_API_PATH`, e.g.
        "http://127.0.0.1:PORT/etims-api" (KRA) or "http://127.0.0.1:PORT" (TSMS, whose API is under /api/v1)."""
        if not self._api_url:
            raise RuntimeError("the simulator is not started")
        return self._api_url

    @property
    def control_url(self) -> str:
        """The control API base, e.g. "http://127.0.0.1:CPORT" (serves /_sim/...)."""
        if not self._control_url:
            raise RuntimeError("the simulator is not started")
        return self._control_url

    # --- outage ---------------------------------------------------------------------------------

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
            outage = self._outage()
        if self._relay is not None:
            await self._relay.listen(not outage)

    async def _outage_change(self, on_api_port: bool) -> BackgroundTask | None:
        """Apply the outage setting now, or, asked on the API port, once the answer has gone out."""
        if not on_api_port:
            await self._apply_outage()
            return None

        async def later() -> None:
            await asyncio.sleep(0.05)
            await self._apply_outage()
        return BackgroundTask(later)

    def _drop_connection(self, request: Request) -> Response:
        """Reset the API-port connection `request` came on, so that its client gets no answer; returns
        the answer to give, which goes nowhere."""
        client = request.scope.get("client")
        if self._relay is not None and client is not None:
            self._relay.reset(client[1])
        return Response(status_code=500)

    # --- HTTP -----------------------------------------------------------------------------------

    def _app(self, *, on_api_port: bool) -> ASGIApp:
        """The app behind the relay (on_api_port=True) or on the control port."""
        async def faults(request: Request) -> Response:
            return await self._faults_endpoint(request, on_api_port)

        async def reset(request: Request) -> Response:
            return await self._reset_endpoint(request, on_api_port)

        routes = [
            Route("/_sim/state", self._state_endpoint, methods=["GET"]),
            Route("/_sim/faults", faults, methods=["GET", "POST"]),
            Route("/_sim/reset", reset, methods=["POST"]),
            *self._more_sim_routes(),
        ]
        if on_api_port:
            routes.append(self._api_route())

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if on_api_port and not request.url.path.startswith("/_sim/"):
                return self._unknown_api_path(request, exc.status_code)
            return json_error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def _latency(self) -> None:
        """Hold an API request for the `latency_ms` fault, if one is set."""
        with self._lock:
            latency = self._faults.latency_ms
        if latency > 0:
            await self._pause(latency / 1000)

    def _json(self, body: Any, *, status: int = 200, headers: dict[str, str] | None = None,
              background: BackgroundTask | None = None) -> Response:
        return Response(self._dumps(body), status_code=status, headers=headers, media_type="application/json",
                        background=background)

    async def _state_endpoint(self, request: Request) -> Response:
        return self._json(self.state())

    async def _faults_endpoint(self, request: Request, on_api_port: bool) -> Response:
        background = None
        if request.method == "POST":
            doc = await read_json_object(request)
            if isinstance(doc, Response):
                return doc
            try:
                with self._lock:
                    self._merge_faults(doc)
            except ValueError as exc:
                return json_error(400, str(exc))
            background = await self._outage_change(on_api_port)
        return self._json({"faults": self.faults()}, background=background)

    async def _reset_endpoint(self, request: Request, on_api_port: bool) -> Response:
        doc = await read_json_object(request, allow_empty=True)
        if isinstance(doc, Response):
            return doc
        state = doc.get("state", False)
        if not isinstance(state, bool):
            return json_error(400, "state must be true or false")
        self._clear(state)
        return self._json({"faults": self.faults(), "state_cleared": state},
                          background=await self._outage_change(on_api_port))

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

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the simulator stops."""
        closing = self._closing
        if closing is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)


# --- the control endpoints' helpers -------------------------------------------------------------


async def read_json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any] | Response:
    """The request's body as a JSON object, or the 400 answer to give (an empty body is {} if allowed)."""
    body = await request.body()
    if allow_empty and not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return json_error(400, "the body must be a JSON object")
    if not isinstance(doc, dict):
        return json_error(400, "the body must be a JSON object")
    return doc


def json_error(status: int, message: str) -> Response:
    """`{"error": message}` with that status."""
    return Response(json.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")),
                    status_code=status, media_type="application/json")


def serve_forever(simulator: SimServer[Any, Any], host: str, port: int, control_port: int,
                  on_ready: Callable[[str, str], None] | None = None) -> None:
    """Serve `simulator` until SIGINT/SIGTERM (when run in the main thread); blocking."""
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: object) -> None:
            stop.set()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
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
