"""State stores: where user records live. Redis in production; an in-process dict embedded.

Both give the same semantics: `cas_many` writes a record only if the stored revision equals the
expected one (0 = no record), atomically per key, so concurrent updates of one user from any
number of workers or replicas are never lost: the loser re-reads and retries.

Keys: `holorec:{ns}:{u:<user id>}`. The braces are a Redis Cluster hash tag, so every key of one
user maps to one slot. Beside the records: `holorec:{ns}:vocab:{model version}` (a model's item ids)
and `holorec:{ns}:users` (the user counter). The functions below build every key the service uses;
no other module spells one. TTL policy is explicit on every write: with a TTL each write sets a
fresh EX (idle users expire), without one a plain SET (records never expire).

Failure policy (RedisStore): every round trip is bounded by `timeout_s`; a refused connection, a
timeout, a Redis that is loading its AOF, out of memory (noeviction), read-only or busy raises
StoreUnavailable, which the API answers with 503 + Retry-After. redis-py's own retries are off:
a compare-and-set whose reply was lost may have been applied, and only the caller's event ids can
make its retry safe, so the decision goes back to the client. Reads alone are retried once on a
connection error, which is what a pooled connection left over from before a Redis restart gives;
the pool reconnects by itself on the next command. After a timeout (a hung Redis) the store fails
fast for a quarter second, so requests queued behind the timed-out batch are not held a second
timeout each.
"""
from __future__ import annotations

import fnmatch
import struct
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager, suppress
from typing import Iterator, Protocol

import hiredis
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.cache import RecordCache
from service.metrics import REDIS_LATENCY, USERS_SEEN, labelled
from service.record import REVISION_OFFSET, stored_revision

# KEYS: n records, then optionally a counter; ARGV[1] TTL s (0: none); then per record i, ARGV[2i] the 8 revision bytes
# expected at the record's REVISION_OFFSET (all zero: absent or revision 0; empty: a value too short to hold them, i.e.
# corrupt) and ARGV[2i+1] the new value. -> 1 (written) or 0 per record, then the counter's new value after adding the
# records this call created, or -1 if there is no counter, nothing was created, or the counter is not a number (the
# writes stand: a broken counter only leaves the users_seen gauge where it was). Each record is
# compared and set on its own: atomically per user, as the whole script runs without interruption. Revisions are
# compared as bytes: Lua numbers are doubles, exact only to 2^53, and a corrupt record can hold any 64-bit revision.
# Lua strings and tables count from 1.
CAS_SCRIPT = f"""
local ttl, absent, out = tonumber(ARGV[1]), string.rep(string.char(0), 8), {{}}
local n, created = (#ARGV - 1) / 2, 0
for i = 1, n do
  local key = KEYS[i]
  local cur, rev = redis.call('GET', key), absent
  if cur then
    if string.len(cur) < {REVISION_OFFSET + 8} then rev = '' else rev = string.sub(cur, {REVISION_OFFSET + 1}, {REVISION_OFFSET + 8}) end
  end
  out[i] = 0
  if rev == ARGV[2 * i] then
    if ttl > 0 then redis.call('SET', key, ARGV[2 * i + 1], 'EX', ttl) else redis.call('SET', key, ARGV[2 * i + 1]) end
    out[i] = 1
    if not cur then created = created + 1 end
  end
end
out[n + 1] = -1
if #KEYS > n and created > 0 then
  local users = redis.pcall('INCRBY', KEYS[n + 1], created)
  if type(users) == 'number' then out[n + 1] = users end
end
return out
"""


# Replies that mean "not now" rather than "wrong request" (LOADING arrives as BusyLoadingError, a ConnectionError)
UNAVAILABLE = (redis.exceptions.ClusterDownError, redis.exceptions.SlotNotCoveredError, redis.exceptions.TryAgainError,
               redis.exceptions.MasterDownError, redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)


class StoreUnavailable(RuntimeError):
    """The state store did not answer in time; the API turns this into 503 + Retry-After."""


class StateStore(Protocol):
    kind: str

    def get_many(self, keys: Sequence[str], cached: bool = False, ours: bool = False) -> list[bytes | None]: ...
    def cas_many(self, writes: Sequence[tuple[str, int, bytes]], ttl_s: int | None, cached: bool = False, users_key: str | None = None) -> list[bool]: ...
    def delete(self, key: str) -> bool: ...
    def get(self, key: str) -> bytes | None: ...
    def set(self, key: str, value: bytes) -> None: ...
    def incr(self, key: str, by: int = 1) -> int: ...
    def exists(self, key: str) -> bool: ...
    def ping(self) -> bool: ...
    def scan(self, match: str) -> Iterator[str]: ...


def user_key(namespace: str, user_id: str) -> str:
    return f"{user_key_prefix(namespace)}{user_id}}}"


def user_key_prefix(namespace: str) -> str:
    """What every user record's key of a namespace starts with."""
    return f"holorec:{namespace}:{{u:"


def user_keys(namespace: str) -> str:
    """The glob matching every user record of a namespace (for `scan`)."""
    return f"holorec:{namespace}:{{u:*}}"


def user_of_key(namespace: str, key: str) -> str:
    return key[len(user_key(namespace, "")) - 1 : -1]


def vocab_key(namespace: str, version: str) -> str:
    """The item id list (JSON) of model `version`: a later model re-warms that model's records through it."""
    return f"holorec:{namespace}:vocab:{version}"


def user_count_key(namespace: str) -> str:
    """The counter of users with a record in a namespace (the users_seen gauge)."""
    return f"holorec:{namespace}:users"


class RedisStore:
    """Redis or Redis Cluster: one pipelined round trip per batch (per node on a cluster).

    The CAS goes as EVAL with the script's text, not EVALSHA: one round trip, and nothing to
    reload after a Redis restart (NOSCRIPT), failover or resharding; Redis caches the compiled
    script by its hash either way. A batch's writes are one EVAL over all its keys (one script
    text sent, one command parsed); on a cluster, where keys of other slots cannot share a
    script, one EVAL per key in a pipeline, and pipelined reads rather than one MGET, which
    redis-py routes by slot.
    """

    kind = "redis"

    def __init__(self, url: str, *, cluster: bool = False, timeout_s: float = 1.0, cache: RecordCache | None = None) -> None:
        self.url, self.cluster, self.cache = url, cluster, cache
        self.opts = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10,
                         retry=Retry(NoBackoff(), 0))
        self._client: redis.Redis | redis.cluster.RedisCluster | None = None
        # after a timeout, fail fast for a moment: requests queued behind a timed-out batch get their 503 at once
        # instead of each waiting out a timeout of its own, so none waits much past timeout_s
        self.cooldown_s, self.failing_until = min(timeout_s, 0.25), 0.0
        self.conns = threading.local()  # each thread's own connection for the hot path's single commands (_command)
        if not cluster:  # a plain client connects lazily by itself; a cluster client reads the topology here
            self._client = redis.Redis.from_url(url, **self.opts)

    @property
    def r(self) -> redis.Redis | redis.cluster.RedisCluster:
        """The client; a cluster one is made on first use, so the service starts while the cluster is down."""
        if self._client is None:
            self._client = redis.cluster.RedisCluster.from_url(self.url, **self.opts)
        return self._client

    @contextmanager
    def _op(self, op: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if time.monotonic() < self.failing_until:
            raise StoreUnavailable(f"redis {op} not tried: the store timed out less than {self.cooldown_s} s ago")
        try:
            yield
        except redis.TimeoutError as e:
            self.failing_until = time.monotonic() + self.cooldown_s
            raise StoreUnavailable(f"redis {op} failed: {type(e).__name__}: {e}") from e
        except (redis.ConnectionError, *UNAVAILABLE) as e:
            raise StoreUnavailable(f"redis {op} failed: {type(e).__name__}: {e}") from e
        except redis.exceptions.RedisClusterException as e:
            if "connect" not in str(e).lower():  # "Redis Cluster cannot be connected": no node reachable
                raise
            raise StoreUnavailable(f"redis cluster {op} failed: {e}") from e
        except redis.ResponseError as e:  # pipelines prefix the reply with the command's position
            if not any(f"{code} " in str(e) for code in ("BUSY", "NOREPLICAS", "CLUSTERDOWN", "MASTERDOWN")):
                raise
            raise StoreUnavailable(f"redis {op} refused: {e}") from e
        finally:
            labelled(REDIS_LATENCY, op).observe(time.perf_counter() - t0)

    def _command(self, *args: object) -> object:
        """One command on this thread's own connection (plain Redis), without the client's pool checkout, retry wrapper
        and reply callbacks (an event 0.05-0.06 ms cheaper: bench/results/cpu-2026-12-05b/floor_ab_command). The connection is made like the client's; redis-py closes it
        on any error (the next command reconnects) and PINGs it first after health_check_interval idle, as the client's."""
        conn = getattr(self.conns, "conn", None)
        if conn is None:
            pool = self.r.connection_pool  # type: ignore[union-attr]
            conn = self.conns.conn = pool.connection_class(**pool.connection_kwargs)
        conn.send_packed_command([hiredis.pack_command(args)])  # hiredis packs in C; redis-py's packer encodes each argument in Python first
        return conn.read_response()

    def _read(self, op: str, fn):  # type: ignore[no-untyped-def]
        """Reads are idempotent: one retry on a connection error (a stale pooled connection)."""
        with self._op(op):
            try:
                return fn()
            except redis.ConnectionError:
                return fn()

    def get_many(self, keys: Sequence[str], cached: bool = False, ours: bool = False) -> list[bytes | None]:
        """With `cached` (the serving app's reads), through the client-side cache when there is one; `ours`: and from
        this process's own last writes (the guesses events compare-and-set against)."""
        if cached and self.cache is not None:
            return self.cache.get_many(keys, self.get_many, ours)
        if len(keys) == 1:
            return [self._read("get", lambda: (self.r.get(keys[0]) if self.cluster else self._command("GET", keys[0])))]  # type: ignore[list-item]
        if not self.cluster:
            return self._read("get", lambda: list(self.r.mget(keys)))
        return self._read("get", lambda: self._pipe_get(keys))

    def _pipe_get(self, keys: Sequence[str]) -> list[bytes | None]:
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        return pipe.execute()

    def cas_many(self, writes: Sequence[tuple[str, int, bytes]], ttl_s: int | None, cached: bool = False,
                 users_key: str | None = None) -> list[bool]:
        """`cached`: what was written stays in the client-side cache as the guess for this process's next event.
        `users_key`: the namespace's user counter, to which the records this call creates are added, and the
        users_seen gauge set to its new value; on plain Redis inside the same script, so a new user's first event
        costs no round trip more than any other (on a cluster, where the counter is in another slot, one INCRBY)."""
        cache = self.cache if cached else None
        started = cache.writing([k for k, _, _ in writes]) if cache else None
        oks, users = [False] * len(writes), -1
        try:
            args = [(key, b"" if expected < 0 else struct.pack("<Q", expected), value) for key, expected, value in writes]
            with self._op("cas"):
                if not self.cluster:
                    keys, pairs = [a[0] for a in args] + ([users_key] if users_key else []), [x for a in args for x in a[1:]]
                    reply = self._command("EVAL", CAS_SCRIPT, len(keys), *keys, ttl_s or 0, *pairs)
                    oks, users = [bool(x) for x in reply[:-1]], reply[-1]  # type: ignore[index]
                else:
                    pipe = self.r.pipeline(transaction=False)
                    for key, expected_bytes, value in args:
                        pipe.execute_command("EVAL", CAS_SCRIPT, 1, key, ttl_s or 0, expected_bytes, value)
                    oks = [bool(x[0]) for x in pipe.execute()]
            if users_key and self.cluster and (created := sum(ok and expected == 0 for ok, (_, expected, _) in zip(oks, writes))):
                with suppress(redis.ResponseError):  # a counter that is not a number: the writes stand, the gauge stays
                    users = self.incr(users_key, created)
        finally:
            if cache:
                cache.written(started, [(k, v) for k, _, v in writes], oks)  # type: ignore[arg-type]
        if users >= 0:
            USERS_SEEN.set(users)
        return oks

    def delete(self, key: str) -> bool:
        with self._op("delete"):
            return bool(self.r.delete(key))

    def get(self, key: str) -> bytes | None:
        return self._read("get", lambda: self.r.get(key))

    def set(self, key: str, value: bytes) -> None:
        with self._op("set"):
            self.r.set(key, value)

    def incr(self, key: str, by: int = 1) -> int:
        with self._op("incr"):
            return int(self.r.incrby(key, by))

    def exists(self, key: str) -> bool:
        return bool(self._read("exists", lambda: self.r.exists(key)))

    def ping(self) -> bool:
        try:
            return bool(self._read("ping", lambda: self.r.ping()))
        except StoreUnavailable:
            return False

    def scan(self, match: str) -> Iterator[str]:
        """Every key matching the glob, by SCAN (a cursor: never blocks Redis); on a cluster, every primary."""
        for key in self.r.scan_iter(match=match, count=1000):
            yield key.decode()


class MemoryStore:
    """The embedded default: same interface and CAS semantics, in this process only (lost on exit)."""

    kind = "memory"

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float | None]] = {}  # key -> (value, expiry time)
        self.lock = threading.Lock()

    def _live(self, key: str) -> bytes | None:
        item = self.data.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] < time.time():
            del self.data[key]
            return None
        return item[0]

    def get_many(self, keys: Sequence[str], cached: bool = False, ours: bool = False) -> list[bytes | None]:
        with self.lock:
            return [self._live(k) for k in keys]

    def cas_many(self, writes: Sequence[tuple[str, int, bytes]], ttl_s: int | None, cached: bool = False,
                 users_key: str | None = None) -> list[bool]:
        out, created = [], 0
        with self.lock:
            for key, expected, value in writes:
                cur = self._live(key)
                rev = 0 if cur is None else stored_revision(cur)
                ok = rev == expected
                if ok:
                    self.data[key] = (value, time.time() + ttl_s if ttl_s else None)
                    created += cur is None
                out.append(ok)
        if users_key and created:
            USERS_SEEN.set(self.incr(users_key, created))
        return out

    def delete(self, key: str) -> bool:
        with self.lock:
            return self.data.pop(key, None) is not None

    def get(self, key: str) -> bytes | None:
        with self.lock:
            return self._live(key)

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self.data[key] = (value, None)

    def incr(self, key: str, by: int = 1) -> int:
        with self.lock:
            n = int(self._live(key) or 0) + by
            self.data[key] = (str(n).encode(), None)
            return n

    def exists(self, key: str) -> bool:
        with self.lock:
            return self._live(key) is not None

    def ping(self) -> bool:
        return True

    def scan(self, match: str) -> Iterator[str]:
        with self.lock:
            keys = [k for k in self.data if fnmatch.fnmatchcase(k, match)]
        yield from keys
