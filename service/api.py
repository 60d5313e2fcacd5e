"""HTTP routes: thin. Validation here, work in service/engine.py through the batchers."""
from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Mapping
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, TypeAdapter, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import State

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
    return loaded_engine(request.app.state)


async def require_api_key(settings: Annotated[Settings, Depends(get_settings)], x_api_key: Annotated[str | None, Header()] = None) -> None:
    check_api_key(x_api_key, settings)


def check_api_key(x_api_key: str | None, settings: Settings) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), expected):
        raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})


def check_json_body(content_type: str | None) -> None:
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


class RecommendQuery(BaseModel):
    """GET /recommend's query string."""
    model_config = ConfigDict(extra="ignore")
    k: int = Field(10, ge=1, le=1000, description="how many items")
    exclude_seen: bool = Field(True, description="leave out items the user has interacted with")
    exclude: str | None = Field(None, max_length=100_000, description="comma-separated item ids to leave out")
    attribute: str | None = Field(None, min_length=1, description="keep only items with this attribute (genre, category, brand)")


class RecommendOut(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: str
    source: str = Field(description="state: from the user's stored state; popular: fallback for users without state")


# --- the hot routes ----------------------------------------------------------------------
# POST /events and GET /recommend take the raw request: one compiled validator each, the checks inline and
# JSON encoded once, so they skip FastAPI's per-request dependency solving and response-model re-validation,
# which they had paid for on every event (README: Serving over HTTP). The pydantic models above still
# describe both routes in the OpenAPI schema (`openapi_extra`, `response_model`, `schemas()`).
EVENTS_IN = TypeAdapter(EventsIn)
RECOMMEND_QUERY = TypeAdapter(RecommendQuery)
DEFAULT_QUERY = RecommendQuery()  # what an empty query string validates to: the common case skips the validator
REF = "#/components/schemas/{model}"
API_KEY_PARAM = {"name": "x-api-key", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "required when HOLOREC_API_KEY is set"}
USER_PARAM = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
REFUSALS = {401: {"description": "missing or wrong X-API-Key"},
            422: {"description": "invalid request: detail says which field and why",
                  "content": {"application/json": {"schema": {"$ref": REF.format(model="HTTPValidationError")}}}},
            503: {"description": "model not loaded or state store unavailable; retry after Retry-After seconds"}}


def schemas() -> dict[str, Any]:
    """The body models' JSON schemas for the OpenAPI components (no route declares them as parameters)."""
    return models_json_schema([(EventsIn, "validation")], ref_template=REF)[1]["$defs"]


def query_params() -> list[dict[str, Any]]:
    props = RecommendQuery.model_json_schema(ref_template=REF)["properties"]
    return [{"name": n, "in": "query", "required": False, "schema": p, "description": p.get("description", "")} for n, p in props.items()]


def _invalid(e: ValidationError, where: str) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": (where, *err["loc"])} for err in e.errors(include_url=False, include_input=False)])


def json_bytes(content: dict[str, Any]) -> bytes:
    """What FastAPI's JSONResponse writes, without validating the content against the response model again."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def recommendation_json(user_id: str, items: list[tuple[str, float]], version: str, source: str) -> bytes:
    """json_bytes of GET /recommend's answer, written out by hand, without the general encoder's walk over every
    dict. Strings are escaped as json.dumps escapes them and floats written as it writes them
    (repr); a score that is not finite fails as it does (ValueError: a 500)."""
    if not all(math.isfinite(v) for _, v in items):
        raise ValueError("Out of range float values are not JSON compliant")
    rows = ",".join(['{"item_id":%s,"score":%r}' % (encode_basestring(i), v) for i, v in items])
    return ('{"user_id":%s,"items":[%s],"model_version":%s,"source":%s}' % (
        encode_basestring(user_id), rows, encode_basestring(version), encode_basestring(source))).encode()


def parse_body(raw: bytes) -> Any:
    """The request body parsed as FastAPI parses a JSON body, with its errors (422 json_invalid, 400 otherwise)."""
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error"}]) from e
    except Exception as e:  # invalid UTF-8, nesting too deep, a number too long: app.py's 400 handler says which
        raise HTTPException(400, "There was an error parsing the body") from e


class NotReady(RuntimeError):
    """A request before the lifespan has loaded the model (service/app.py answers 503 + Retry-After)."""


def loaded_engine(state: State) -> Engine:
    engine = getattr(state, "engine", None)
    if engine is None:
        raise NotReady("model not loaded; retry later")
    return engine


async def apply_events(state: State, api_key: str | None, content_type: str | None, raw: bytes) -> bytes:
    """POST /events from its headers and body to the JSON answer; refusals raise, for the app's error handlers.
    The FastAPI route and service/hot.py's ASGI route both call this: one implementation of the route."""
    settings: Settings = state.settings
    check_api_key(api_key, settings)
    check_json_body(content_type)
    data = parse_body(raw)
    loaded_engine(state)
    try:
        body = EVENTS_IN.validate_python(data)
    except ValidationError as e:
        raise _invalid(e, "body") from None
    if len(body.events) > settings.max_events:
        raise HTTPException(422, [{"loc": ["body", "events"], "msg": f"at most {settings.max_events} events per request", "type": "too_long"}])
    for i, e in enumerate(body.events):
        check_user_id(e.user_id, settings, ("body", "events", i, "user_id"))
    events = [Event(e.user_id, e.item_id, e.event_id, e.timestamp) for e in body.events]
    res = await state.event_batcher.submit(events)
    return json_bytes({"applied": res.applied, "duplicate": res.duplicate, "unknown": len(res.unknown_items), "unknown_items": res.unknown_items})


async def recommendations(state: State, api_key: str | None, user_id: str, query: Mapping[str, str]) -> bytes:
    """GET /recommend/{user_id} from its headers, path parameter and query to the JSON answer (as apply_events)."""
    settings: Settings = state.settings
    check_api_key(api_key, settings)
    check_user_id(user_id, settings)
    engine = loaded_engine(state)
    try:
        q = RECOMMEND_QUERY.validate_python(query) if query else DEFAULT_QUERY
    except ValidationError as e:
        raise _invalid(e, "query") from None
    if q.attribute is not None and engine.attribute_mask(q.attribute) is None:
        raise HTTPException(422, [{"loc": ["query", "attribute"], "msg": "unknown attribute: not one this checkpoint's items carry", "type": "value_error"}])
    ids = [x for x in (q.exclude or "").split(",") if x]
    res = await state.rec_batcher.submit(RecQuery(user_id, q.k, q.exclude_seen, ids, q.attribute))
    return recommendation_json(user_id, res.items, engine.version, res.source)


router = APIRouter()
secured = [Depends(require_api_key)]


# The two routes below are served by service/hot.py before FastAPI sees the request (a streamed body excepted);
# declared here for the OpenAPI schema and as that fallback.
@router.post("/events", response_model=EventsOut, responses={**REFUSALS, 415: {"description": "the body is not declared JSON"}},
             openapi_extra={"parameters": [API_KEY_PARAM], "requestBody": {
                 "required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model="EventsIn")}}}}})
async def post_events(request: Request) -> Response:
    """Apply events in the order given per user; the write is done before this answers."""
    h = request.headers
    raw = await request.body()
    return Response(await apply_events(request.app.state, h.get("x-api-key"), h.get("content-type"), raw), media_type="application/json")


@router.get("/recommend/{user_id:path}", response_model=RecommendOut, responses=REFUSALS,
            openapi_extra={"parameters": [USER_PARAM, *query_params(), API_KEY_PARAM]})
async def recommend(request: Request) -> Response:
    body = await recommendations(request.app.state, request.headers.get("x-api-key"), request.path_params["user_id"], request.query_params)
    return Response(body, media_type="application/json")


@router.get("/users/{user_id:path}", dependencies=secured)
def get_user(user_id: Annotated[str, Depends(user_id_param)], engine: Annotated[Engine, Depends(get_engine)]) -> dict:
    """Metadata only: never the state itself."""
    meta = engine.user_meta(user_id)
    if meta is None:
        raise HTTPException(404, f"no state for user {user_id!r}")
    return meta


@router.delete("/users/{user_id:path}", dependencies=secured)
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
