"""The loopback HTTP API for tills (Starlette, served by uvicorn).

Sales are validated and committed on the event loop itself, one at a time, in arrival order; reads
go to a thread. Errors always have the shape {"error": {"code", "message", "field"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agent import __version__
from agent.desk import Answer, ApiContext, SaleDesk, Signer, Syncer
from agent.errors import DiskFull, StorageError
from agent.logs import get_logger
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.openapi import openapi_document
from agent.queue.outbox import SaleRecord
from agent.receipt_format import MEDIA_TYPES, WIDTHS, render
from agent.scheduler import start as start_jobs
from agent.secret import Secret
from agent.signing import PENDING_STATES

log = get_logger("agent.api")


class _TooLarge(Exception):
    pass


def error(status: int, code: str, message: str, field: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}},
                        status_code=status, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(ctx: ApiContext, *, till_token: Secret | None = None) -> ASGIApp:
    desk = SaleDesk(ctx)
    if ctx.metrics is not None:
        ctx.metrics.bind_lanes(lambda: {"kra": _kra_lane_state(ctx.signer), "tsms": _tsms_lane_state(ctx.syncer)})

    def answer(result: Answer) -> Response:
        # Server-Timing (a standard header): where the wait went (KRA's share above all), for the
        # till's integrator.
        headers = None if not result.timings else {
            "Server-Timing": ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in result.timings)}
        return JSONResponse(result.body, status_code=result.status, headers=headers)

    async def read_json(request: Request) -> Any:
        """The decoded body, or the error Response to send instead."""
        try:
            body = await _body(request, ctx.max_body_bytes)
        except _TooLarge:
            return error(413, "too_large", f"the body is larger than {ctx.max_body_bytes} bytes; "
                         "split the sale or raise http.max_body_bytes", None)
        try:
            return json.loads(body, parse_float=Decimal)
        except (ValueError, RecursionError):
            return error(422, "invalid_json", "the body is not valid JSON; send one JSON object")

    async def lookup(request: Request, sale_id: str | None = None) -> SaleRecord | Response:
        """The sale the path names, or `sale_id` (and ?till_id= when several tills used its id), or an error."""
        sale_id = request.path_params["sale_id"] if sale_id is None else sale_id
        till_id = request.query_params.get("till_id")
        if till_id is not None:
            record = await run_in_threadpool(ctx.outbox.get, till_id, sale_id)
            records = [] if record is None else [record]
        else:
            records = await run_in_threadpool(ctx.outbox.find, sale_id)
        if not records:
            return error(404, "not_found", f"no sale {sale_id!r} is stored; check the sale_id"
                         + (" and till_id" if till_id else ""), "sale_id")
        if len(records) > 1:
            tills = ", ".join(r.till_id for r in records)
            return error(409, "ambiguous", f"tills {tills} each have a sale {sale_id!r}; "
                         "add ?till_id=... to choose one", "till_id")
        return records[0]

    async def post_sale(request: Request) -> Response:
        data = await read_json(request)
        if isinstance(data, Response):
            return data
        return answer(await desk.sale(data))

    async def post_credit_note(request: Request) -> Response:
        original = await lookup(request)
        if isinstance(original, Response):
            return original
        if original.kind != "sale":
            return error(422, "not_a_sale", f"{original.sale_id!r} is a credit note; credit the original sale",
                         "sale_id")
        data = await read_json(request)
        if isinstance(data, Response):
            return data
        return answer(await desk.credit_note(original, data))

    async def get_receipt(request: Request) -> Response:
        if _suffix_encoded(request, b"receipt"):  # /v1/sales/A%2Freceipt: the sale "A/receipt" itself
            return await get_sale(request, request.path_params["sale_id"] + "/receipt")
        record = await lookup(request)
        if isinstance(record, Response):
            return record
        fmt = request.query_params.get("format", "text")
        copy = request.query_params.get("copy", "auto")
        width = request.query_params.get("width", "42")
        if fmt not in MEDIA_TYPES:
            return error(422, "bad_parameter", f"{fmt!r} is not a receipt format; use {', '.join(MEDIA_TYPES)}",
                         "format")
        if width not in {str(w) for w in WIDTHS}:
            return error(422, "bad_parameter", f"{width!r} columns is not a paper width; use "
                         f"{', '.join(map(str, WIDTHS))}", "width")
        if copy not in ("auto", "true", "false"):
            return error(422, "bad_parameter", f"{copy!r}: use auto (COPY after the first print), true or false",
                         "copy")
        body = desk.view(record)
        earlier = ctx.outbox.count_print(record.id, body["receipt"]["kind"], ctx.clock())
        content, media_type = render(body, fmt, int(width), copy=copy == "true" or (copy == "auto" and earlier > 0))
        return Response(content, media_type=media_type)

    async def get_sale(request: Request, sale_id: str | None = None) -> Response:
        record = await lookup(request, sale_id)
        if isinstance(record, Response):
            return record
        return JSONResponse(desk.view(record))

    async def metrics(request: Request) -> Response:
        if ctx.metrics is None:
            return error(404, "not_found", "metrics are not enabled in this agent")
        body = await run_in_threadpool(ctx.metrics.render)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    async def status(request: Request) -> Response:
        stats = await run_in_threadpool(ctx.outbox.stats)
        now = ctx.clock()
        oldest = stats.oldest_unsigned_at
        backlog = sum(stats.kra.get(state, 0) for state in PENDING_STATES)
        signer = ctx.receipt_signer
        body: dict[str, Any] = {
            "agent": {"version": __version__, "started_at": ctx.started_at.isoformat(),
                      "uptime_s": round((now - ctx.started_at).total_seconds(), 3),
                      "receipt_key": None if signer is None else {"key_id": signer.key_id,
                                                                  "public_key": signer.public_key}},
            "outbox": {"sales": stats.sales, "journal_entries": stats.journal_entries},
            "lanes": {
                "kra": {**_kra_lane_state(ctx.signer),
                        "backlog": backlog, "backlog_value": str(stats.unsigned_value), "by_state": stats.kra,
                        "round_trip_s": None if ctx.signer is None or ctx.signer.round_trip_s is None
                        else round(ctx.signer.round_trip_s, 3),
                        # one request in flight, so the backlog drains at one round trip per sale
                        "drain_eta_s": None if ctx.signer is None or ctx.signer.round_trip_s is None
                        else round(backlog * ctx.signer.round_trip_s, 1),
                        "oldest_unsigned_age_s": None if oldest is None
                        else round((now - oldest).total_seconds(), 3)},
                "tsms": {**_tsms_lane_state(ctx.syncer),
                         "backlog": stats.tsms.get("pending", 0) + stats.tsms.get("batched", 0),
                         "by_state": stats.tsms},
            },
            "devices": {device.name: device.status() for device in ctx.devices},
            "offline_budget": None if (budget := desk.budget()) is None else dataclasses.asdict(budget),
            "clock": None if ctx.clock_guard is None else ctx.clock_guard.status(),
            "retention": None if ctx.retention is None else await run_in_threadpool(ctx.retention.status),
        }
        return JSONResponse(body)

    async def health(request: Request) -> Response:
        try:
            await run_in_threadpool(ctx.outbox.ping)
        except StorageError as exc:
            return error(503, "storage", str(exc))
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(__version__, ctx.rules.max_lines, desk.refund_reasons()))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(404, "not_found", f"no such endpoint {request.url.path}; see /openapi.json")
        if exc.status_code == 405:
            return error(405, "method_not_allowed",
                         f"{request.method} is not allowed on {request.url.path}; see /openapi.json",
                         headers=dict(exc.headers or {}))
        return error(exc.status_code, "http_error", str(exc.detail))

    async def storage_error(request: Request, exc: Exception) -> Response:
        log.error("storage_error", path=request.url.path, error=str(exc))
        if isinstance(exc, DiskFull):  # as for sales: nothing was written, the till asks again later
            return error(507, "disk_full", str(exc))
        return error(503, "storage", str(exc))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return error(500, "internal", "the agent hit an unexpected error; it is logged, "
                     "retry the request and report it if it persists")

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        # StorageError is answered here; only truly unexpected errors reach server_error.
        HTTPException: http_error, StorageError: storage_error, Exception: server_error,
    }
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lanes = [asyncio.create_task(lane.run(), name=name)
                 for name, lane in (("kra-lane", ctx.signer), ("tsms-lane", ctx.syncer)) if lane is not None]
        scheduler = start_jobs(ctx.jobs, ctx.clock()) if ctx.jobs else None
        loop = asyncio.get_running_loop()
        for device in ctx.devices:
            device.start(loop, desk)
        try:
            yield
        finally:
            for device in ctx.devices:  # before the loop goes: their threads submit to it
                await asyncio.to_thread(device.stop)
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            for task in lanes:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for close in ctx.on_shutdown:
                await close()

    app: ASGIApp = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/v1/sales", post_sale, methods=["POST"]),
            Route("/v1/sales/{sale_id:path}/credit-notes", post_credit_note, methods=["POST"]),
            Route("/v1/sales/{sale_id:path}/receipt", get_receipt, methods=["GET"]),
            Route("/v1/sales/{sale_id:path}", get_sale, methods=["GET"]),
            Route("/v1/status", status, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers=handlers,
    )
    if till_token is not None:
        app = BearerAuth(app, till_token)
    return app


def _suffix_encoded(request: Request, suffix: bytes) -> bool:
    """Whether the '/' before the route's `suffix` came percent-encoded (%2F). Sale ids may hold '/', and
    the decoded path cannot tell the sale "A/receipt" from the receipt of sale "A"; the raw path can."""
    raw: bytes = request.scope.get("raw_path") or b""
    return bool(raw) and unquote_to_bytes(raw.rsplit(b"/", 1)[-1]) != suffix


def _tsms_lane_state(syncer: Syncer | None) -> dict[str, Any]:
    if syncer is None:
        return {"state": "not_running", "detail": "tsms.environment is off: sales are not sent to head office"}
    return {"state": syncer.state, "detail": syncer.detail,
            "last_sync_at": None if syncer.last_sync_at is None else syncer.last_sync_at.isoformat(),
            "clock_offset_s": syncer.clock_offset_s}


def _kra_lane_state(signer: Signer | None) -> dict[str, Any]:
    if signer is None:
        return {"state": "not_running",
                "detail": "the device is not initialised with KRA; run `etims-agent init`; sales wait in the outbox"}
    state = {None: "starting", True: "online", False: "offline"}[signer.online]
    return {"state": state, "detail": signer.last_error}


class BearerAuth:
    """Every request must carry `Authorization: Bearer <till token>`."""

    def __init__(self, app: ASGIApp, token: Secret) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not self.token.matches(given.strip()):
                response = error(401, "unauthorized",
                                 "missing or wrong till token; send `Authorization: Bearer <token>` "
                                 "with the token configured in http.till_token",
                                 headers={"WWW-Authenticate": 'Bearer realm="etims-agent"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
