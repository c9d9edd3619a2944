"""One kept-alive HTTP connection pool to an upstream server (KRA, head office), shared plumbing.

Keep-alive saves a TCP and TLS handshake per request, which on a Kenyan mobile link costs more than
the request itself. The transport is called directly: the lanes need none of AsyncClient's
cookies, redirects or auth flows, and skipping them halves the client's CPU per request.
TCP_NODELAY: a request written in two parts must not wait for a delayed ACK. httpx errors pass
through; each adapter translates them at its own edge.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import httpx


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: httpx.Headers


class Upstream:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = {"connect": connect_timeout, "read": read_timeout, "write": read_timeout,
                         "pool": connect_timeout}
        self._http = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> Answer:
        """POST `content` to base_url + path; raises httpx.HTTPError when no answer came."""
        request = httpx.Request("POST", f"{self._base_url}{path}", content=content, headers=headers,
                                extensions={"timeout": self._timeout})
        response = await self._http.handle_async_request(request)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return Answer(response.status_code, body, response.headers)
