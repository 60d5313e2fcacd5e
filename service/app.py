"""create_app(settings) -> FastAPI, and `serve` behind `holorec serve`."""
from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.checkpoint import Checkpoint, CheckpointError, load
from model.fast_step import packed_kind
from service.api import NotReady, router, schemas
from service.batcher import Batcher
from service.engine import Conflict, Engine
from service.metrics import ERRORS, MODEL_INFO
from service.hot import CLIENT_GONE, HotRoutes
from service.middleware import BodyLimit, Timing
from service.settings import Settings, setting_problems
from service.cache import RecordCache
from service.store import MemoryStore, RedisStore, StateStore, StoreUnavailable, user_key_prefix

log = logging.getLogger("holorec")


def make_store(s: Settings, serving: bool = False) -> StateStore:
    """The store the settings name; `serving` (the app): with the client-side record cache for GET /recommend."""
    if not s.redis_url:
        log.warning("HOLOREC_REDIS_URL is not set: using the embedded in-process state store (state is lost on exit, "
                    "not shared between workers). Set it to a redis:// URL for production.")
        return MemoryStore()
    log.info("state store: %s %s", "Redis Cluster" if s.redis_cluster else "Redis", s.redis_url.split("@")[-1])
    cache = None
    if serving and s.client_cache_entries and not s.redis_cluster:
        cache = RecordCache(s.redis_url, user_key_prefix(s.namespace), s.client_cache_entries, s.store_timeout_s)
    return RedisStore(s.redis_url, cluster=s.redis_cluster, timeout_s=s.store_timeout_s, cache=cache)


def create_app(settings: Settings | None = None, checkpoint: Checkpoint | None = None) -> FastAPI:
    """The app; the checkpoint is loaded at startup unless given (app_from_env loads it first to fail cleanly)."""
    s = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(s.threads)
        ckpt = checkpoint or load(s.checkpoint)
        engine = Engine(ckpt, make_store(s, serving=True), s)
        MODEL_INFO.labels(ckpt.version, ckpt.model.config.model).set(1)
        window = s.batch_window_ms / 1000
        app.state.event_batcher = Batcher(engine.apply, window_s=window, max_size=s.max_batch, name="events")
        app.state.rec_batcher = Batcher(engine.recommend, window_s=window, max_size=s.max_batch, name="recommend")
        app.state.event_batcher.start()
        app.state.rec_batcher.start()
        app.state.engine = engine
        # Everything alive now (torch, the model, FastAPI's schemas: some 200,000 objects) lives as long as the
        # process. Left in the collector's oldest generation, each full collection walks all of it: under load that
        # stalled the event loop 116-138 ms every second or two (p99 of GET /recommend at c=32: 130-142 ms -> 14-16 ms).
        gc.collect()
        gc.freeze()
        if not engine.store.ping():  # the service starts anyway and recovers when Redis answers; say so now
            log.warning("state store %s is not answering (HOLOREC_REDIS_URL): /readyz says 503 and requests that "
                        "need it get 503 until it does", s.redis_url.split("@")[-1] if s.redis_url else "")
        log.info("holorec ready: model %s version %s, %d items, store %s; one event's step: %s, top-k: %s", ckpt.model.config.model,
                 ckpt.version, len(ckpt.items), engine.store.kind, packed_kind(engine.applier.packed),
                 "C (model/native.c)" if engine.scorer.native else "torch")
        yield
        await app.state.event_batcher.stop()
        await app.state.rec_batcher.stop()

    app = FastAPI(title="holorec", version="0.1.0", lifespan=lifespan,
                  description="Sequential recommendations from a constant-size per-user state, advanced in O(1) per event.")
    app.state.settings = s
    app.include_router(router)

    def openapi() -> dict:
        """FastAPI's schema plus the body models of the routes that validate their own bodies."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schemas())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's words
            return JSONResponse({"detail": "the body could not be parsed as JSON (invalid UTF-8, nesting too deep, "
                                 "or a number too long)", "error": "bad_body"}, 400)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # loc, msg and type only: echoing the input back could be 10 kB, or NaN, which JSON cannot carry
        errors = [{"loc": list(e.get("loc", ())), "msg": _plain(e), "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        ERRORS.labels("store_unavailable").inc()
        log.warning("state store unavailable: %s", exc)
        return JSONResponse({"detail": "state store unavailable; retry later", "error": "store_unavailable"}, 503,
                            headers={"Retry-After": str(s.retry_after_s)})

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": "not_ready"}, 503, headers={"Retry-After": str(s.retry_after_s)})

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        ERRORS.labels("cas_exhausted").inc()
        return JSONResponse({"detail": str(exc), "error": "conflict"}, 503, headers={"Retry-After": str(s.retry_after_s)})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # the client closed the connection before its body arrived: no one reads this answer, and it is no server
        # error (it had reached the handler below: an internal error with a traceback, a 500 in the latency metric)
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        ERRORS.labels("internal").inc()
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error", "error": "internal"}, 500)

    app.add_middleware(Timing, own_pages=frozenset(p for p in (app.docs_url, app.openapi_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p))
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)  # outermost: refuse before anything reads
    return app


def _plain(error: dict) -> str:
    """A validation message a client can act on (pydantic's own, except for the id pattern's regex)."""
    if error.get("type") == "string_pattern_mismatch":
        return "must be free of control characters (U+0000 to U+001F, U+007F)"
    return error.get("msg", "")


def app_from_env() -> HotRoutes:
    """uvicorn factory: the app behind its hot routes (service/hot.py), settings from HOLOREC_* environment variables.
    A bad setting or checkpoint (missing, tampered, corrupt) ends the process with one clear line and exit status 3,
    never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        ckpt = load(settings.checkpoint)
    except CheckpointError as e:
        log.critical("holorec cannot start: checkpoint refused: %s", e)
        sys.exit(3)
    except ValidationError as e:
        log.critical("holorec cannot start: bad settings: %s", "; ".join(setting_problems(e)))
        sys.exit(3)
    return HotRoutes(create_app(settings, ckpt))
