"""ASGI middleware around the app: request latency by route, and the request-body size limit."""
from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import HTTP_LATENCY, labelled


class Timing:
    """Observe every request's latency by route template and status. FastAPI's own pages (/docs,
    /openapi.json, ...) carry no route in the scope: they are labelled by their path, not "unmatched"."""

    def __init__(self, app: ASGIApp, own_pages: frozenset[str] = frozenset()) -> None:
        self.app, self.own_pages = app, own_pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path_format", None) or (scope["path"] if scope["path"] in self.own_pages else "unmatched")
            labelled(HTTP_LATENCY, path, scope["method"], str(status)).observe(time.perf_counter() - t0)


DRAIN_BYTES = 32 * 2**20  # a refused body is read and dropped up to this size before the 413 goes out


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or, when streamed (chunked), by reading at most
    `limit` + 1 bytes before the app sees any: FastAPI turns any error raised while it reads a body into a 400.

    The 413 is sent only after the rest of the body is read and dropped (up to DRAIN_BYTES): answering and
    closing while the client is still sending makes common clients (curl, requests, httpx, urllib) see a
    connection reset instead of the 413. A body declared larger than DRAIN_BYTES is refused at once."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(receive if length.isdigit() and int(length) <= DRAIN_BYTES else None, send)
        if length is not None or b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # declared size within the limit, or no body
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            more = msg.get("more_body", False)
            if seen > self.limit:
                return await self._too_large(receive if more else None, send, seen)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, receive: Receive | None, send: Send, seen: int = 0) -> None:
        """413, after draining what is left of the body through `receive` (None: nothing to drain)."""
        more = receive is not None
        while more and seen <= DRAIN_BYTES:
            msg = await receive()  # type: ignore[misc]
            if msg["type"] != "http.request":
                return  # the client went away
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        resp = JSONResponse({"detail": f"request body larger than {self.limit} bytes", "error": "too_large"}, 413,
                            headers={"Connection": "close"})
        await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
