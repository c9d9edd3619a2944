"""A local double of KRA's legacy OSCU API, served over real sockets, with fault injection
(kra-oscu.md §7.5). Every KRA test of the project talks to it.

Two ports:

* the API port (`api_url`, ".../etims-api"): a small asyncio TCP relay in front of a Starlette app
  on uvicorn. The relay is what an outage switches off (its listening socket is closed, so clients
  get ECONNREFUSED, and open connections are reset), where TCP connections are counted, and what
  a `reset` fault uses to drop a connection without an answer. `/_sim/...` is served here too
  while there is no outage.
* the control port (`control_url`): `/_sim/...` only, never faulted.

The endpoints, their state and validation live in `agent.kra.sim_state` (pure); the ports, relay,
server thread and the `/_sim/` state, faults and reset endpoints in `agent.simserver` (shared with
the TSMS simulator); this module is the HTTP and fault layer. Decisions where KRA's behaviour is not
documented:

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

import dataclasses
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent import simserver
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
from agent.simserver import ALL_METHODS, SimServer, json_error, read_json_object

__all__ = ["SimDevice", "Simulator", "SimulatorConfig", "serve_forever"]

_DEFAULT_CONFIG = SimulatorConfig()


class Simulator(SimServer[SimState, Faults]):
    """KRA's OSCU API on real sockets, served from a background thread (see the module docstring).

    `with Simulator(cfg).start() as sim:` stops it on exit. State and faults may be read and set
    from any thread.
    """

    _NAME = "KRA"
    _API_PATH = "/etims-api"

    def __init__(self, config: SimulatorConfig = _DEFAULT_CONFIG, clock: Clock | None = None) -> None:
        super().__init__(SimState(config), Faults, clock)

    # --- control --------------------------------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        with self._lock:
            return self._state.config

    def configure(self, **changes: Any) -> None:
        """Change numbering, reinit_code, require_registered_items, strict_http_status, tax_convention."""
        with self._lock:
            self._state.config = changed_config(self._state.config, changes)

    # --- what the server asks -------------------------------------------------------------------

    def _merge_faults(self, changes: dict[str, Any]) -> None:
        self._faults.merge(changes, self._state.paths)

    # Decimals as exact numbers, in the state snapshot as in the API's answers.
    _dumps = staticmethod(to_json)

    def _api_route(self) -> Route:
        return Route(self._API_PATH + "/{name:path}", self._api, methods=ALL_METHODS)

    def _more_sim_routes(self) -> list[Route]:
        return [Route("/_sim/config", self._config_endpoint, methods=["GET", "POST"])]

    def _unknown_api_path(self, request: Request, status: int) -> Response:
        return self._reply(request.url.path, Answer.of("912", f"there is no API {request.url.path}",
                                                       http_status=status))

    # --- HTTP -----------------------------------------------------------------------------------

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
        await self._latency()
        headers = {key.lower(): value for key, value in request.headers.items()}
        with self._lock:
            if name == SAVE_SALE:
                self._state.note_attempt(headers, body)
            fault = self._faults.take(name)
        if fault is not None and fault.kind == "reset":
            dropped = self._drop_connection(request)
            with self._lock:
                self._state.note_result(name, "reset")
            return dropped
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

    def _envelope(self, answer: Answer) -> str:
        return to_json({"resultCd": answer.code, "resultMsg": answer.message, "resultDt": kra_time(self._clock()),
                        "data": answer.data})

    def _reply(self, name: str, answer: Answer) -> Response:
        with self._lock:
            self._state.note_result(name, answer.code)
        return Response(self._envelope(answer), status_code=answer.http_status, media_type="application/json")

    async def _config_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            doc = await read_json_object(request)
            if isinstance(doc, Response):
                return doc
            try:
                self.configure(**doc)
            except ValueError as exc:
                return json_error(400, str(exc))
        return self._json({"config": dataclasses.asdict(self.config)})


def serve_forever(config: SimulatorConfig, host: str, port: int, control_port: int,
                  on_ready: Callable[[str, str], None] | None = None) -> None:
    """Blocking, for `etims-agent simulate kra`; stops on SIGINT/SIGTERM (when run in the main thread)."""
    simserver.serve_forever(Simulator(config), host, port, control_port, on_ready)
