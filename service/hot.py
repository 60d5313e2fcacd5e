"""The hot routes straight from the ASGI scope: POST /events, GET /recommend/{user_id} and GET /livez.

Every event and recommendation used to pass four middleware layers, Starlette's router (a regex per
route), a Request and a Response object before and after the route's own work: under load that
was about 40% of the service's CPU (bench/results/serve.md, section 6). This outermost layer
matches the three routes by method and path, reads the headers it needs from the scope, and
calls the same functions the FastAPI routes call (service/api.py: apply_events, recommendations),
so validation, refusals and answers are one implementation. A refusal or failure is rendered by
the app's own exception handlers, so status codes and error bodies are the app's. Anything else
(other routes, a streamed or oversized body, a root_path) goes down the full stack unchanged.
It records holorec_http_request_duration_seconds as the Timing middleware does.
"""
from __future__ import annotations

import time
from fastapi import FastAPI, Request
from starlette.datastructures import QueryParams
from starlette.types import Receive, Scope, Send

from service.api import apply_events, recommendations
from service.metrics import HTTP_LATENCY, labelled

LIVEZ = b'{"status":"alive"}'
CLIENT_GONE = 499  # the status nginx logs for a client that closed the connection before the answer
PREFIX = "/recommend/"


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header, as Starlette's Headers.get gives it (names arrive lower-cased)."""
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


class HotRoutes:
    """Wraps the app itself (app_from_env serves HotRoutes(app)), outside even FastAPI's own middleware."""

    def __init__(self, app: FastAPI) -> None:
        self.app, self.body_limit = app, app.state.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/livez":
            route, answer = "/livez", _livez
        elif method == "POST" and path == "/events" and self._body_fits(scope):
            route, answer = "/events", self._events
        elif method == "GET" and path.startswith(PREFIX) and len(path) > len(PREFIX):  # the rest is the id, '/' included
            route, answer = "/recommend/{user_id}", self._recommend
        else:
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500
        try:
            body = await answer(scope, receive)
            if body is None:  # the client went away before its body arrived: nobody to answer, and not our error
                status = CLIENT_GONE
                return
            status = 200
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        except Exception as exc:
            status = await self._refuse(scope, receive, send, exc)
        finally:
            labelled(HTTP_LATENCY, route, method, str(status)).observe(time.perf_counter() - t0)

    def _body_fits(self, scope: Scope) -> bool:
        """A declared length within the limit: else BodyLimit (413, or a streamed body counted) takes the request."""
        length = header(scope, b"content-length")
        return length is not None and length.isdigit() and int(length) <= self.body_limit

    async def _events(self, scope: Scope, receive: Receive) -> bytes | None:
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return None
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        return await apply_events(self.app.state, header(scope, b"x-api-key"), header(scope, b"content-type"), b"".join(chunks))

    async def _recommend(self, scope: Scope, receive: Receive) -> bytes:
        user_id = scope["path"][len(PREFIX):]
        qs = scope["query_string"]
        return await recommendations(self.app.state, header(scope, b"x-api-key"), user_id, QueryParams(qs) if qs else {})

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> int:
        """Answer with the app's handler for this exception (the one its routes would get); -> the status sent."""
        handler = next((h for cls in type(exc).__mro__ if (h := self.app.exception_handlers.get(cls))), None)
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)
        return response.status_code


async def _livez(scope: Scope, receive: Receive) -> bytes:  # on the event loop: a blocked loop is what a liveness probe must notice
    return LIVEZ

