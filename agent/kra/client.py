"""The OSCU client: one persistent httpx connection pool per device, replies classified at the edge.

httpx exceptions never leave this module. Each call returns a `KraReply` whose `outcome` says
what the lane may do next (kra-oscu.md §4.2): a connection that never opened means KRA did not
get the request (RETRY); a timeout, a reset after sending, a 5xx or a body that is not JSON
means it may have (UNKNOWN).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from agent.jsonwire import wire_json
from agent.kra.codes import Outcome, classify
from agent.secret import Secret
from agent.upstream import Upstream


@dataclass(frozen=True, slots=True)
class KraReply:
    outcome: Outcome
    code: str  # KRA's resultCd, or a transport marker: "connect", "timeout", "http-503", "bad-json"
    message: str
    data: Any = None
    result_dt: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS


def _transport_failure(exc: httpx.HTTPError) -> KraReply:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return KraReply(Outcome.RETRY, "connect", f"KRA unreachable ({type(exc).__name__}: {exc})")
    if isinstance(exc, httpx.TimeoutException):
        return KraReply(Outcome.UNKNOWN, "timeout", f"no answer from KRA in time ({type(exc).__name__})")
    return KraReply(Outcome.UNKNOWN, "transport", f"connection to KRA broke ({type(exc).__name__}: {exc})")


def parse_reply(status: int, body: bytes) -> KraReply:
    """Classify an HTTP answer by the resultCd in its body, whatever the status (pure)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and "responseBody" in doc and isinstance(doc["responseBody"], dict):
        doc = doc["responseBody"]  # the GavaConnect gateway's wrapped envelope
    if not isinstance(doc, dict) or "resultCd" not in doc:
        if status >= 500:
            return KraReply(Outcome.UNKNOWN, f"http-{status}", f"KRA answered HTTP {status}")
        if status >= 400:
            return KraReply(Outcome.REJECTED, f"http-{status}", f"KRA answered HTTP {status}: {body[:200]!r}")
        return KraReply(Outcome.UNKNOWN, "bad-json", "KRA's answer is not the expected JSON")
    code = str(doc.get("resultCd", "")).strip()
    return KraReply(classify(code), code, str(doc.get("resultMsg") or ""), doc.get("data"),
                    doc.get("resultDt"))


class KraClient:
    """Calls one device's OSCU endpoints; `base_url` ends in `/etims-api`."""

    def __init__(self, base_url: str, *, tin: str, bhf_id: str, cmc_key: Secret | None,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_reply: Callable[[str, KraReply], None] | None = None) -> None:
        self._tin, self._bhf_id, self._cmc_key = tin, bhf_id, cmc_key
        self._on_reply = on_reply  # told every endpoint's reply (a command that reports failures)
        self._http = Upstream(base_url, connect_timeout=connect_timeout, read_timeout=read_timeout,
                              transport=transport)

    def with_key(self, cmc_key: Secret) -> None:
        self._cmc_key = cmc_key

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, path: str, body: dict[str, Any] | str, *, device_headers: bool = True,
                   on_sent: Callable[[], None] | None = None) -> KraReply:
        content = (body if isinstance(body, str) else wire_json(body)).encode()
        headers = {"Content-Type": "application/json"}
        if device_headers:
            headers.update(tin=self._tin, bhfId=self._bhf_id,
                           cmcKey=self._cmc_key.reveal() if self._cmc_key else "")
        try:
            answer = await self._http.post(f"/{path}", content, headers, on_sent=on_sent)
            reply = parse_reply(answer.status, answer.body)
        except httpx.HTTPError as exc:
            reply = _transport_failure(exc)
        if self._on_reply is not None:
            self._on_reply(path, reply)
        return reply

    # --- the endpoints the agent uses (kra-oscu.md §2) ----------------------------------------

    async def init_device(self, serial: str) -> KraReply:
        return await self.call("selectInitOsdcInfo",
                               {"tin": self._tin, "bhfId": self._bhf_id, "dvcSrlNo": serial},
                               device_headers=False)

    async def code_list(self, last_req_dt: str = "20180101000000") -> KraReply:
        return await self.call("selectCodeList", {"lastReqDt": last_req_dt})

    async def item_classes(self, last_req_dt: str = "20180101000000") -> KraReply:
        return await self.call("selectItemClsList", {"lastReqDt": last_req_dt})

    async def save_item(self, body: dict[str, Any] | str) -> KraReply:
        return await self.call("saveItem", body)

    async def items(self, last_req_dt: str = "20180101000000") -> KraReply:
        return await self.call("selectItemList", {"lastReqDt": last_req_dt})

    async def save_sale(self, request_json: str, on_sent: Callable[[], None] | None = None) -> KraReply:
        """Send a stored saveTrnsSalesOsdc body exactly as stored (a resend is byte-identical).
        `on_sent`: called once the request is written, while KRA works on it."""
        return await self.call("saveTrnsSalesOsdc", request_json, on_sent=on_sent)

    async def invoice(self, invc_no: int) -> KraReply:
        return await self.call("selectInvoiceDetails", {"invcNo": invc_no})

    async def customer(self, pin: str) -> KraReply:
        return await self.call("selectCustomer", {"custmTin": pin})

    async def notices(self, last_req_dt: str = "20180101000000") -> KraReply:
        return await self.call("selectNoticeList", {"lastReqDt": last_req_dt})
