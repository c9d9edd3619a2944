"""The TSMS client: terminal auth, submissions, heartbeats and voids, answers classified at the edge.

httpx exceptions never leave this module; every call returns a `TsmsReply` whose `outcome` tells
the lane what to do (tsms-api.md §3.1, §4).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from agent.secret import Secret
from agent.upstream import Upstream


class Outcome(enum.Enum):
    ACCEPTED = "accepted"  # 202 (new or replay), 200 already processed
    UNAUTHORIZED = "unauthorized"  # 401: authenticate again
    CONFIG = "config"  # 403 (hardware id, ability, licence): a person must fix the configuration
    TOO_LARGE = "too_large"  # 413, or 422 BATCH_LIMIT_EXCEEDED: split the batch
    REJECTED = "rejected"  # 422: this content will never be accepted
    CONFLICT = "conflict"  # 409: the uuid is known with other content; must never happen
    WAIT = "wait"  # 429, 503: come back after Retry-After
    TRANSIENT = "transient"  # network error, timeout, other 5xx, unreadable answer: back off


@dataclass(frozen=True, slots=True)
class TsmsReply:
    outcome: Outcome
    status: int  # HTTP status, 0 when there was no answer
    message: str
    error_code: str | None = None
    errors: Any = None
    retry_after_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


def classify(status: int, body: bytes, headers: httpx.Headers | dict[str, str]) -> TsmsReply:
    """Map an HTTP answer to what the lane does next (pure)."""
    try:
        doc = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        doc = {}
        if 200 <= status < 300:
            return TsmsReply(Outcome.TRANSIENT, status, "TSMS answered with something that is not JSON")
    message = str(doc.get("message") or doc.get("error") or f"HTTP {status}")
    code = doc.get("error_code")
    errors = doc.get("errors")
    data: dict[str, Any] = doc["data"] if isinstance(doc.get("data"), dict) else {}
    if status in (200, 202):
        return TsmsReply(Outcome.ACCEPTED, status, message, data=data)
    if status == 401:
        return TsmsReply(Outcome.UNAUTHORIZED, status, message)
    if status == 403:
        return TsmsReply(Outcome.CONFIG, status, message, code, errors)
    if status == 413 or code == "BATCH_LIMIT_EXCEEDED":
        return TsmsReply(Outcome.TOO_LARGE, status, message, code, errors)
    if status == 409:
        return TsmsReply(Outcome.CONFLICT, status, message, code, doc.get("conflict"))
    if status in (429, 503) and (status == 429 or _retry_after(headers, doc) is not None or code):
        return TsmsReply(Outcome.WAIT, status, message, code, errors, _retry_after(headers, doc) or 60.0)
    if 400 <= status < 500:
        return TsmsReply(Outcome.REJECTED, status, message, code, errors)
    return TsmsReply(Outcome.TRANSIENT, status, message, code, errors)


def _retry_after(headers: httpx.Headers | dict[str, str], doc: dict[str, Any]) -> float | None:
    for value in (headers.get("retry-after"), doc.get("retry_after_seconds"), doc.get("retry_after")):
        try:
            seconds = float(str(value))
        except ValueError:
            continue
        if 0 <= seconds <= 86400:
            return seconds
    return None


class TsmsClient:
    """One kept-alive connection pool to the head office's server."""

    def __init__(self, base_url: str, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = Upstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout,
                              transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def authenticate(self, serial_number: str, api_key: Secret) -> tuple[TsmsReply, Secret | None]:
        """POST /api/v1/auth/terminal; the bearer token on success."""
        body = json.dumps({"serial_number": serial_number, "api_key": api_key.reveal()}).encode()
        reply = await self._call("/api/v1/auth/terminal", body, None)
        return reply, _token(reply)

    async def refresh(self, token: Secret) -> tuple[TsmsReply, Secret | None]:
        """POST /api/v1/auth/refresh: a new token; the server revokes every older one."""
        reply = await self._call("/api/v1/auth/refresh", b"", token)
        return reply, _token(reply)

    async def submit(self, body: bytes, token: Secret, request_id: str) -> TsmsReply:
        return await self._call("/api/v1/transactions/official", body, token, request_id)

    async def heartbeat(self, token: Secret) -> TsmsReply:
        return await self._call("/api/v1/heartbeat", b"", token)

    async def void(self, transaction_id: str, body: bytes, token: Secret) -> TsmsReply:
        return await self._call(f"/api/v1/transactions/{transaction_id}/void", body, token)

    async def _call(self, path: str, body: bytes, token: Secret | None,
                    request_id: str | None = None) -> TsmsReply:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        if request_id:
            headers["X-Request-Id"] = request_id
        try:
            answer = await self._http.post(path, body, headers)
        except httpx.HTTPError as exc:
            return TsmsReply(Outcome.TRANSIENT, 0, f"no answer from TSMS ({type(exc).__name__}: {exc})")
        return classify(answer.status, answer.body, answer.headers)


def server_time(reply: TsmsReply) -> datetime | None:
    """The `server_time` of an accepted answer (heartbeat), or None when absent, unreadable or without a UTC offset."""
    text = reply.data.get("server_time") if reply.outcome is Outcome.ACCEPTED else None
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.utcoffset() is not None else None


def _token(reply: TsmsReply) -> Secret | None:
    token = reply.data.get("access_token") if reply.outcome is Outcome.ACCEPTED else None
    return Secret(token) if isinstance(token, str) and token else None
