"""Service configuration: every field is an environment variable HOLOREC_<NAME> (case-insensitive)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOLOREC_", extra="ignore")

    checkpoint: str = Field("demo/checkpoint", description="checkpoint directory (holorec train --out)")
    redis_url: str | None = Field(None, description="redis://host:port/db; unset = embedded in-process store")
    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{v!r} has no scheme: write redis://{v} (or rediss://, unix://)")
        return v or None

    redis_cluster: bool = Field(False, description="treat redis_url as a Redis Cluster seed node")
    namespace: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="key prefix part: holorec:<ns>:...")
    api_key: SecretStr | None = Field(None, description="when set, X-API-Key is required on /events, /recommend and /users (health, metrics and the docs stay open)")
    state_ttl_s: int | None = Field(None, ge=1, description="expire a user's state after this many idle seconds; unset = never")
    state_codec: Literal["float32", "float16", "int8", "int8-rows"] = Field("int8", description="how the recurrent state is packed")
    history_slots: int = Field(50, ge=1, le=65535, description="most recent item ids kept per user: replayed by a new checkpoint, "
                               "and excluded by exclude_seen when the seen filter is off")
    dedup_slots: int = Field(256, ge=1, le=65535, description="recent event ids remembered per user for deduplication")
    seen_filter_bytes: int = Field(384, ge=0, le=65535, description="per-user Bloom filter of every item seen, for exclude_seen "
                                   "(384 bytes: 1.1% of unseen items hidden at 300 seen, 28% at 1,000; 1,024 bytes: 2.2% at 1,000); "
                                   "0 = the last history_slots items only")
    max_events: int = Field(1000, ge=1, description="most events in one POST /events")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="larger request bodies get 413")
    max_user_id_len: int = Field(256, ge=1, le=4096, description="longer user ids get 422")
    batch_window_ms: float = Field(2.0, ge=0, description="micro-batch gathering window")
    max_batch: int = Field(256, ge=1, description="requests per micro-batch; 1 turns micro-batching off")
    ann_lists: int = Field(0, ge=0, description="approximate top-k over this many k-means clusters of the items (IVF); 0 = exact")
    ann_probe: int = Field(32, ge=1, description="clusters scored per request when ann_lists > 0")
    graph_cache_dir: str = Field("~/.cache/holorec", description="where the compiled serving step (ONNX graphs) is kept for the next start with the same "
                                 "checkpoint and code, which then skips exporting it; empty = off")
    native: bool = Field(True, description="run one event's step and one user's top-k in C (model/native.c) where the install built "
                         "it; false = ONNX Runtime and torch, as on a machine without a C compiler")
    threads: int = Field(1, ge=1, description="torch intra-op threads per process (every holorec command reads HOLOREC_THREADS)")
    client_cache_entries: int = Field(10000, ge=0, description="user records each process keeps for GET /recommend until Redis reports "
                                      "a write to them (client-side caching, CLIENT TRACKING), so a repeated read needs no round trip; "
                                      "as many again of its own last writes, from which the user's next event starts; "
                                      "0 = off; not on a Redis Cluster")
    store_timeout_s: float = Field(1.0, gt=0, description="Redis socket timeout; past it requests get 503")
    cas_retries: int = Field(50, ge=1, description="compare-and-set attempts per user before giving up with 503")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503s")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (holorec serve --workers)")
    access_log: bool = Field(False, description="holorec serve: uvicorn's line per request on stdout; off by default, as /metrics counts and times "
                             "every request by route and status, and the line costs each request a formatted write")
    stream_batch: int = Field(500, ge=1, description="holorec consume: stream entries read and applied per batch")
    stream_block_ms: int = Field(1000, ge=1, description="holorec consume: how long one read waits for new entries")
    stream_claim_idle_ms: int = Field(30000, ge=1, description="holorec consume: entries unacknowledged this long by another consumer are claimed")


def setting_problems(e: ValidationError) -> list[str]:
    """One "HOLOREC_NAME: what is wrong" per bad setting."""
    return [f"HOLOREC_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors()]
