"""One kept-alive HTTP connection pool to an upstream server (KRA, head office), shared plumbing.

Keep-alive saves a TCP and TLS handshake per request, which on a Kenyan mobile link costs more than
the request itself. The transport is called directly: the lanes need none of AsyncClient's
cookies, redirects or auth flows, and skipping them halves the client's CPU per request.
TCP_NODELAY: a request written in two parts must not wait for a delayed ACK. httpx errors pass
through; each adapter translates them at its own edge.

`on_sent` uses httpcore's documented `trace` extension to say when the request's last byte has been
handed to the socket, so the caller can do its own work while the server does its part.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

SENT_EVENT = "http11.send_request_body.complete"  # httpcore's trace event: the request is on the wire


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: httpx.Headers


class Upstream:
    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._urls: dict[str, httpx.URL] = {}  # parsed once: parsing is a third of building a request
        self._timeout = {"connect": connect_timeout, "read": read_timeout, "write": read_timeout,
                         "pool": connect_timeout}
        self._http = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def post(self, path: str, content: bytes, headers: dict[str, str], *,
                   on_sent: Callable[[], None] | None = None) -> Answer:
        """POST `content` to base_url + path; raises httpx.HTTPError when no answer came. `on_sent` is
        called once the whole request is written, while the answer is still to come."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(f"{self._base_url}{path}")
        extensions: dict[str, Any] = {"timeout": self._timeout}
        if on_sent is not None:
            async def trace(event: str, info: dict[str, Any]) -> None:
                if event == SENT_EVENT:
                    on_sent()
            extensions["trace"] = trace
        request = httpx.Request("POST", url, content=content, headers=headers, extensions=extensions)
        response = await self._http.handle_async_request(request)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return Answer(response.status_code, body, response.headers)
