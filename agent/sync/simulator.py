"""A local double of the head office's TSMS server (HEAD behaviour, tsms-api.md §1-§4), served over
real sockets, with fault injection. Every TSMS test of the project talks to it.

Built like the KRA simulator (`agent.kra.simulator`), on the same server (`agent.simserver`, which
also serves the `/_sim/` state, faults and reset endpoints):

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

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent import simserver
from agent.clock import Clock
from agent.simserver import ALL_METHODS, SimServer
from agent.sync.sim_state import (
    ApiRequest,
    Faults,
    SimState,
    SimTerminal,
    TsmsSimulatorConfig,
    route_name,
)

__all__ = ["SimTerminal", "Simulator", "TsmsSimulatorConfig", "serve_forever"]

_DEFAULT_CONFIG = TsmsSimulatorConfig()
API_PREFIX = "/api/v1"


class Simulator(SimServer[SimState, Faults]):
    """The TSMS server on real sockets, served from a background thread (see the module docstring).

    `with Simulator(cfg).start() as sim:` stops it on exit. State and faults may be read and set
    from any thread.
    """

    _NAME = "TSMS"

    def __init__(self, config: TsmsSimulatorConfig = _DEFAULT_CONFIG, clock: Clock | None = None) -> None:
        super().__init__(SimState(config), Faults, clock)

    # --- control --------------------------------------------------------------------------------

    @property
    def config(self) -> TsmsSimulatorConfig:
        with self._lock:
            return self._state.config

    # --- what the server asks -------------------------------------------------------------------

    def _merge_faults(self, changes: dict[str, Any]) -> None:
        if self._faults.merge(changes):  # revoke_tokens is an action, taken as the plan changes
            self._state.revoke_all_tokens()

    def _api_route(self) -> Route:
        return Route(API_PREFIX + "/{path:path}", self._api, methods=ALL_METHODS)

    def _unknown_api_path(self, request: Request, status: int) -> Response:
        return self._json({"message": f"The route {request.url.path.lstrip('/')} could not be found."},
                          status=status)

    # --- HTTP -----------------------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        path: str = request.path_params["path"]
        name = route_name(path)
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        with self._lock:
            self._state.note_request(name)
        await self._latency()
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
        return self._json(answer.body, status=answer.status, headers=dict(answer.headers))


def serve_forever(config: TsmsSimulatorConfig, host: str, port: int, control_port: int,
                  on_ready: Callable[[str, str], None] | None = None) -> None:
    """Blocking, for `etims-agent simulate tsms`; stops on SIGINT/SIGTERM (when run in the main thread)."""
    simserver.serve_forever(Simulator(config), host, port, control_port, on_ready)
