"""A local double of the head office's TSMS server (HEAD behaviour, tsms-api.md §1-§4), served over
real sockets, with fault injection. Every TSMS test of the project talks to it.

Built like the KRA simulator (`agent.kra.simulator`, whose relay and socket helpers it reuses):

* the API port (`api_url`, the server's root: the API is under /api/v1, as on the real server, so
  it is what `[tsms] base_url` takes): an asyncio TCP relay in front of a Starlette app on
  uvicorn. The relay is what an outage switches off (its listening socket is closed, so clients get
  ECONNREFUSED, and open connections are reset), where TCP connections are counted, and what
  `lose_response` uses to drop a connection without an answer. `/_sim/...` is served here too
  while there is no outage.
* the control port (`control_url`): `/_sim/...` only, never faulted. `GET /_sim/state`,
  `GET|POST /_sim/faults`, `POST /_sim/reset` (`{"state": true}` also forgets everything held).

The endpoints, their state and validation live in `agent.sync.sim_state` (pure; its docstring lists
the decisions taken where the reference is silent); this module is the HTTP, threading and fault
layer. Decisions of this layer:

* Faults (`POST /_sim/faults` or `set_faults(**faults)`; given entries replace, null clears) apply to
  /api/v1 requests of a known route, in this order: `latency_ms` (after the body is read), then the
  first matching of `http_status` {status, count, paths} (that status, an HTML body, nothing done)
  and `unavailable` {count, retry_after, paths} (503, the open-circuit JSON of §3.1 row 8,
  Retry-After); otherwise the request is processed, and `lose_response` {count, paths} then resets
  the connection instead of answering ("timeout after commit"). `paths` limits a fault to route
  names ("auth/terminal", "auth/refresh", "heartbeat", "transactions/official",
  "transactions/status", "transactions/void"); without it `http_status` hits every route and
  `unavailable` and `lose_response` hit "transactions/official" only. `count: 0` clears.
  `rate_limit` (an integer, null = the config's) replaces the fairness limit; `outage` (bool)
  closes the API port; `revoke_tokens: true` deletes every token at once (an action, not a
  standing fault).
* Faulted requests are counted in `requests` (and `faults_served`), but not by the fairness limiter.
* The clock is read once per request, after any latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
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
from agent.kra.simulator import _error, _json_object, _listening_socket, _netloc, _new_event_loop, _Relay
from agent.sync.sim_state import (
    Answer,
    ApiRequest,
    Faults,
    SimState,
    SimTerminal,
    TsmsSimulatorConfig,
    route_name,
)

__all__ = ["SimTerminal", "Simulator", "TsmsSimulatorConfig", "serve_forever"]

_DEFAULT_CONFIG = TsmsSimulatorConfig()
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
API_PREFIX = "/api/v1"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Simulator:
    """The TSMS server on real sockets, served from a background thread (see the module docstring).

    `with Simulator(cfg).start() as sim:` stops it on exit. State and faults may be read and set
    from any thread.
    """

    def __init__(self, config: TsmsSimulatorConfig = _DEFAULT_CONFIG, clock: Clock | None = None) -> None:
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
        self._api_url = f"http://{_netloc(host, public.getsockname()[1])}"
        self._control_url = f"http://{_netloc(host, control.getsockname()[1])}"
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, args=(public, control, internal),
                                        name="tsms-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._failure is not None:
            failure = self._failure
            self.stop()
            raise RuntimeError(f"the TSMS simulator did not start ({failure!r})")
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
        """The public, fault-injectable server root, e.g. "http://127.0.0.1:PORT" (the API is under /api/v1)."""
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
    def config(self) -> TsmsSimulatorConfig:
        with self._lock:
            return self._state.config

    def set_faults(self, **faults: Any) -> None:
        """Same semantics as POST /_sim/faults; ValueError on a bad fault (nothing changes)."""
        with self._lock:
            self._merge_faults(faults)
        self._sync_outage()

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.describe()

    def reset(self, state: bool = False) -> None:
        """Clear every fault; with state=True also forget tokens, submissions, transactions and counters."""
        with self._lock:
            self._faults = Faults()
            if state:
                self._state.clear()
        self._sync_outage()

    def state(self) -> dict[str, Any]:
        """What head office holds and what it saw: the body of GET /_sim/state."""
        with self._lock:
            snapshot = self._state.snapshot()
            snapshot["faults"] = self._faults.describe()
            snapshot["config"] = dataclasses.asdict(self._state.config)
        result: dict[str, Any] = json.loads(json.dumps(snapshot))
        return result

    def _merge_faults(self, faults: dict[str, Any]) -> None:
        if self._faults.merge(faults):
            self._state.revoke_all_tokens()

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
        ]
        if on_api_port:
            routes.append(Route(API_PREFIX + "/{path:path}", self._api, methods=_ALL_METHODS))

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            if on_api_port and not request.url.path.startswith("/_sim/"):
                return _json({"message": f"The route {request.url.path.lstrip('/')} could not be found."},
                             status=exc.status_code)
            return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    async def _api(self, request: Request) -> Response:
        path: str = request.path_params["path"]
        name = route_name(path)
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        with self._lock:
            self._state.note_request(name)
            latency = self._faults.latency_ms
        if latency > 0:
            await self._pause(latency / 1000)
        lose = False
        with self._lock:
            fault = self._faults.take(name)
            if fault is not None:
                self._state.note_fault(fault.kind)
                if fault.kind == "http_status":
                    return Response(f"<html><body><h1>{fault.status} Simulated fault</h1></body></html>",
                                    status_code=fault.status, media_type="text/html")
                answer = self._state.unavailable(headers, fault.retry_after)
            else:
                answer = self._state.handle(ApiRequest(request.method, path, headers, body), self._clock(),
                                            rate_limit=self._faults.rate_limit)
                if self._faults.take(name, ("lose_response",)) is not None:
                    self._state.note_fault("lose_response")
                    lose = True
        if lose:
            return self._drop_connection(request)
        return _answer(answer)

    def _drop_connection(self, request: Request) -> Response:
        client = request.scope.get("client")
        if self._relay is not None and client is not None:
            self._relay.reset(client[1])
        return Response(status_code=500)  # goes nowhere: the relay already reset the connection

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
                    self._merge_faults(doc)
            except ValueError as exc:
                return _error(400, str(exc))
            background = await self._outage_change(on_api_port)
        return _json({"faults": self.faults()}, background=background)

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
        return _json({"faults": self.faults(), "state_cleared": state},
                     background=await self._outage_change(on_api_port))

    async def _outage_change(self, on_api_port: bool) -> BackgroundTask | None:
        """Apply the outage setting now, or, asked on the API port, once the answer has gone out."""
        if not on_api_port:
            await self._apply_outage()
            return None

        async def later() -> None:
            await asyncio.sleep(0.05)
            await self._apply_outage()
        return BackgroundTask(later)


def _answer(answer: Answer) -> Response:
    return _json(answer.body, status=answer.status, headers=dict(answer.headers))


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None,
          background: BackgroundTask | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json",
                    background=background)


def serve_forever(config: TsmsSimulatorConfig, host: str, port: int, control_port: int,
                  on_ready: Callable[[str, str], None] | None = None) -> None:
    """Blocking, for `etims-agent simulate tsms`; stops on SIGINT/SIGTERM (when run in the main thread)."""
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
