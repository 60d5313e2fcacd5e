"""HTTP routes: thin. Validation here, work in service/engine.py through the batchers."""
from __future__ import annotations

import hmac
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from service.engine import Engine, Event, RecQuery
from service.metrics import render
from service.settings import Settings

ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # any printable text (unicode too); control characters are refused
_ID_RE = re.compile(ID_PATTERN.strip("^$"))  # used with fullmatch: Python's $ also matches before a final newline


# --- dependencies ---------------------------------------------------------------------
# async, though none awaits: FastAPI runs a plain `def` dependency on a worker thread, a thread hop per
# dependency per request, which costs more than the check itself.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "model not loaded", headers={"Retry-After": "1"})
    return engine


async def require_api_key(settings: Annotated[Settings, Depends(get_settings)], x_api_key: Annotated[str | None, Header()] = None) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), expected):
        raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})


async def json_body(content_type: Annotated[str | None, Header()] = None) -> None:
    """415 with a plain reason for a body that is not declared JSON (FastAPI would say 'not a valid dictionary')."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(415, f"Content-Type must be application/json (got {media[:100] or 'none'})")


async def user_id_param(request: Request, user_id: Annotated[str, Path(min_length=1)]) -> str:
    return check_user_id(user_id, request.app.state.settings)


def user_id_problem(user_id: str, settings: Settings) -> str | None:
    """Why a user id is refused, None if it is not: the API and the stream consumer refuse the same ids."""
    if len(user_id) > settings.max_user_id_len:
        return f"user_id is longer than {settings.max_user_id_len} characters"
    if not _ID_RE.fullmatch(user_id):
        return "user_id must be non-empty and free of control characters"
    return None


def check_user_id(user_id: str, settings: Settings, where: tuple[str | int, ...] = ("path", "user_id")) -> str:
    problem = user_id_problem(user_id, settings)
    if problem:
        raise HTTPException(422, [{"loc": list(where), "msg": problem, "type": "value_error"}])
    return user_id


# --- bodies -----------------------------------------------------------------------------
class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    user_id: str = Field(min_length=1, pattern=ID_PATTERN, examples=["u1"])
    item_id: str = Field(min_length=1, max_length=512, pattern=ID_PATTERN, examples=["i42"])
    timestamp: StrictInt | StrictFloat | None = Field(None, ge=0, le=1e13, description="seconds or milliseconds since the epoch")
    event_id: str | None = Field(None, min_length=1, max_length=256, pattern=ID_PATTERN, description="deduplication key, unique per user")


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1)


class EventsOut(BaseModel):
    applied: int
    duplicate: int
    unknown: int
    unknown_items: list[str]


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendOut(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: str
    source: str = Field(description="state: from the user's stored state; popular: fallback for users without state")


router = APIRouter()
secured = [Depends(require_api_key)]


@router.post("/events", response_model=EventsOut, dependencies=[*secured, Depends(json_body)])
async def post_events(body: EventsIn, engine: Annotated[Engine, Depends(get_engine)], settings: Annotated[Settings, Depends(get_settings)], request: Request) -> EventsOut:
    """Apply events in the order given per user; the write is done before this answers."""
    if len(body.events) > settings.max_events:
        raise HTTPException(422, [{"loc": ["body", "events"], "msg": f"at most {settings.max_events} events per request", "type": "too_long"}])
    for i, e in enumerate(body.events):
        check_user_id(e.user_id, settings, ("body", "events", i, "user_id"))
    events = [Event(e.user_id, e.item_id, e.event_id, e.timestamp) for e in body.events]
    res = await request.app.state.event_batcher.submit(events)
    return EventsOut(applied=res.applied, duplicate=res.duplicate, unknown=len(res.unknown_items), unknown_items=res.unknown_items)


@router.get("/recommend/{user_id}", response_model=RecommendOut, dependencies=secured)
async def recommend(
    user_id: Annotated[str, Depends(user_id_param)],
    engine: Annotated[Engine, Depends(get_engine)],
    request: Request,
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    exclude_seen: bool = True,
    exclude: Annotated[str | None, Query(max_length=100_000, description="comma-separated item ids to leave out")] = None,
    attribute: Annotated[str | None, Query(min_length=1, description="keep only items with this attribute (genre, category, brand)")] = None,
) -> RecommendOut:
    if attribute is not None and engine.attribute_mask(attribute) is None:
        raise HTTPException(422, [{"loc": ["query", "attribute"], "msg": f"unknown attribute {attribute!r}", "type": "value_error"}])
    ids = [x for x in (exclude or "").split(",") if x]
    res = await request.app.state.rec_batcher.submit(RecQuery(user_id, k, exclude_seen, ids, attribute))
    return RecommendOut(user_id=user_id, items=[ScoredItem(item_id=i, score=s) for i, s in res.items], model_version=engine.version, source=res.source)


@router.get("/users/{user_id}", dependencies=secured)
def get_user(user_id: Annotated[str, Depends(user_id_param)], engine: Annotated[Engine, Depends(get_engine)]) -> dict:
    """Metadata only: never the state itself."""
    meta = engine.user_meta(user_id)
    if meta is None:
        raise HTTPException(404, f"no state for user {user_id!r}")
    return meta


@router.delete("/users/{user_id}", dependencies=secured)
def delete_user(user_id: Annotated[str, Depends(user_id_param)], engine: Annotated[Engine, Depends(get_engine)]) -> dict:
    """Erase the user's state (privacy requests). Idempotent."""
    return {"user_id": user_id, "deleted": engine.delete(user_id)}


@router.get("/livez")
async def livez() -> dict:  # on the event loop: a blocked loop is what a liveness probe must notice
    return {"status": "alive"}


@router.get("/readyz")
def readyz(request: Request, response: Response) -> dict:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    store_ok = engine is not None and engine.store.ping()
    if engine is None or not store_ok:
        response.status_code = 503
        response.headers["Retry-After"] = str(request.app.state.settings.retry_after_s)
    return {"model_loaded": engine is not None, "store": engine.store.kind if engine else None, "store_ok": store_ok,
            "model_version": engine.version if engine else None}


@router.get("/metrics")
def metrics() -> Response:
    return Response(render(), media_type="text/plain; version=0.0.4; charset=utf-8")
