"""The record's bytes (service/record.py): what each field costs, old formats still read, odd values survived."""
from __future__ import annotations

import hashlib
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from service import record as rec


def _record(window_slots: int = 50, dedup_slots: int = 64, seen: int = 512, d: int = 64, codec: str = "int8") -> rec.Record:
    r = rec.empty("v1", codec, window_slots, dedup_slots, seen, d, bytes(range(200)))
    r.revision, r.applied, r.last_event_ts = 7, 12, 1.7e9
    for i in range(1, 13):
        r.push(i * 5000)
        r.remember(rec.event_hash(f"e{i}"))
    r.seen_filter[:3] = [1, 2, 3]
    r.vector = np.linspace(-1, 1, d, dtype=np.float32)
    return r


@pytest.mark.parametrize("id_bytes", [2, 4])
def test_round_trip_and_the_bytes_each_field_takes(id_bytes: int) -> None:
    r = _record()
    blob = rec.encode(r, id_bytes)
    assert len(blob) == rec.HEADER.size + 50 * id_bytes + 64 * 4 + 512 + 64 * 2 + 200  # float16 vector off float32
    back = rec.decode(blob, "v1")
    assert np.array_equal(back.window, r.window) and np.array_equal(back.dedup, r.dedup) and back.state == r.state
    assert np.array_equal(back.seen_filter, r.seen_filter) and np.allclose(back.vector, r.vector, atol=1e-3)
    assert (back.revision, back.applied, back.dedup_pos, back.codec) == (7, 12, 12, "int8")
    assert rec.decode(blob, "another version").state == b""  # another model's reader skips vector and state


def test_a_float32_record_keeps_its_vector_exact() -> None:
    r = _record(codec="float32")
    assert np.array_equal(rec.decode(rec.encode(r), "v1").vector, r.vector)


def test_a_wrong_length_in_the_header_is_corrupt_not_misread() -> None:
    blob = rec.encode(_record())
    with pytest.raises(rec.CorruptRecord):
        rec.decode(blob[:-1], "v1")


def test_revision_past_2_64_wraps_to_1() -> None:
    r = _record()
    r.revision = 2**64  # one past a corrupt record's 0xFF..FF
    assert rec.decode(rec.encode(r), "v1").revision == 1


def test_a_format_3_record_is_read_and_its_dedup_ring_still_matches() -> None:
    """Format 3: int32 window, 8-byte hashes, float32 vector; its hashes' low 4 bytes are today's hashes."""
    window = np.arange(1, 9, dtype=np.int32)
    old_hash = int.from_bytes(hashlib.blake2b(b"evt-1", digest_size=8).digest(), "little")
    dedup = np.array([old_hash, 0, 0, 0], np.uint64)
    seen, vector, state = np.full(16, 7, np.uint8), np.ones(4, np.float32), b"\x01\x02\x03\x04"
    body = window.astype("<i4").tobytes() + dedup.astype("<u8").tobytes() + seen.tobytes() + vector.astype("<f4").tobytes() + state
    head = rec.OLD_HEADERS[3].pack(rec.MAGIC, 3, 0, 5, 8, 0.0, math.nan, b"v1".ljust(16, b"\0"), 8, 4, 1, 16, 0)[:-4]
    r = rec.decode(head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body, "v1", old_vector_dim=4)
    assert r.history() == list(range(1, 9)) and r.seen(rec.event_hash("evt-1")) and not r.seen(rec.event_hash("evt-2"))
    assert np.array_equal(r.vector, vector) and r.state == state and np.array_equal(r.seen_filter, seen)


def test_resize_keeps_the_newest_items_and_event_ids() -> None:
    r = _record(window_slots=50, dedup_slots=64)
    r.resize(5, 4)
    assert r.history() == [i * 5000 for i in range(8, 13)]
    assert all(r.seen(rec.event_hash(f"e{i}")) for i in range(9, 13)) and not r.seen(rec.event_hash("e8"))
    r.remember(rec.event_hash("e13"))  # the ring goes on overwriting the oldest
    assert r.seen(rec.event_hash("e13")) and not r.seen(rec.event_hash("e9"))


def test_a_new_codec_or_window_setting_keeps_the_users_state(tmp_path) -> None:
    """A changed HOLOREC_STATE_CODEC re-packs the stored state (no replay: the whole history stays in it), and a
    changed HOLOREC_HISTORY_SLOTS keeps the newest items; the next event goes on from there."""
    from bench.harness import make_checkpoint
    from model.checkpoint import load
    from model.state import unpack
    from service.engine import Engine, Event
    from service.settings import Settings
    from service.store import MemoryStore

    ckpt, store = load(make_checkpoint(tmp_path / "ckpt", n_items=40)), MemoryStore()
    items = [f"item-{1 + i % 40}" for i in range(120)]
    before = Engine(ckpt, store, Settings(history_slots=50))
    before.apply([[Event("u", i) for i in items]])
    after = Engine(ckpt, store, Settings(state_codec="int8-rows", history_slots=10))
    after.apply([[Event("u", "item-3")]])
    r = rec.decode(store.get(after.key("u")), ckpt.version)
    assert r.codec == "int8-rows" and r.applied == 121 and len(r.window) == 10
    assert r.history() == [ckpt.item_index[i] for i in items[-9:]] + [ckpt.item_index["item-3"]]
    with torch.no_grad():
        _, whole = ckpt.model.replay([ckpt.item_index[i] for i in items + ["item-3"]])
        _, last_10 = ckpt.model.replay([ckpt.item_index[i] for i in items[-9:] + ["item-3"]])
    got = unpack([r.state], ckpt.model.init_state(1), "int8-rows")
    for k in ("ssm0", "ssm1"):  # the SSM states remember more than 10 events: a replay of the window is far off
        assert (got[k] - whole[k]).abs().max() < 1e-3 < 5e-3 < (got[k] - last_10[k]).abs().max()


def test_one_compare_and_set_script_writes_a_batch_key_by_key(namespace: str, counting_redis_url: str) -> None:
    """RedisStore.cas_many on plain Redis: one EVAL for the whole batch, each key compared on its own revision bytes
    (absent = 0, a value too short to hold a revision matches nothing), the TTL set on each written key."""
    import redis

    from service.store import RedisStore, user_key

    r, store = redis.Redis.from_url(counting_redis_url), RedisStore(counting_redis_url)
    keys = [user_key(namespace, u) for u in ("new", "current", "stale", "short", "huge")]

    def value(rev: int, body: bytes) -> bytes:
        return b"HREC" + bytes(rec.REVISION_OFFSET - 4) + rev.to_bytes(8, "little") + body

    r.set(keys[1], value(3, b"a")), r.set(keys[2], value(5, b"b")), r.set(keys[3], b"HR"), r.set(keys[4], value(2**64 - 1, b"c"))
    evals = int(r.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))
    writes = [(keys[0], 0, value(1, b"n")), (keys[1], 3, value(4, b"a2")), (keys[2], 4, value(5, b"b2")),
              (keys[3], 0, value(1, b"s")), (keys[4], 2**64 - 1, value(1, b"c2"))]
    assert store.cas_many(writes, 100) == [True, True, False, False, True]
    assert int(r.info("commandstats")["cmdstat_eval"]["calls"]) == evals + 1
    assert [r.get(k) for k in keys] == [value(1, b"n"), value(4, b"a2"), value(5, b"b"), b"HR", value(1, b"c2")]
    assert [0 < r.ttl(k) <= 100 for k in keys] == [True, True, False, False, True]
    assert store.cas_many([(keys[0], 1, value(2, b"n2"))], None) == [True] and r.ttl(keys[0]) == -1  # no TTL: none kept


def test_a_new_users_first_event_counts_the_user_inside_the_compare_and_set(ckpt_dir, namespace: str, counting_redis_url: str) -> None:
    """The users_seen counter moves in the same script as the write that creates the record (KEYS ends with the
    counter): a new user's first event makes no round trip of its own for it (it made an INCRBY after the
    compare-and-set before), as MONITOR on a Redis of this process's own shows; a batch adds all it created at once,
    later events and lost compare-and-sets add nothing."""
    import redis

    from model.checkpoint import load
    from service.engine import Engine, Event
    from service.metrics import USERS_SEEN
    from service.settings import Settings
    from service.store import RedisStore, user_count_key, user_key

    r = redis.Redis.from_url(counting_redis_url)
    engine = Engine(load(ckpt_dir), RedisStore(counting_redis_url), Settings(checkpoint=str(ckpt_dir), namespace=namespace))
    item, users = engine.ckpt.items[0], user_count_key(namespace)
    r.set(users, 10)  # users created before

    def commands_on_counter(events: list[list[Event]]) -> list[tuple[str, str]]:
        """(client type, command) of every command that touched the counter while `events` were applied."""
        with r.monitor() as m:
            engine.apply(events)
            r.echo(f"{namespace}-done")
            seen = []
            while f"{namespace}-done" not in (c := m.next_command())["command"]:
                if users in c["command"]:
                    seen.append((c["client_type"], c["command"].split()[0].upper()))
            return seen

    in_the_script = [("tcp", "EVAL"), ("lua", "INCRBY")]  # the counter passed to the compare-and-set, and moved by it
    assert commands_on_counter([[Event("a", item)]]) == in_the_script
    assert int(r.get(users)) == 11 and USERS_SEEN._value.get() == 11
    assert commands_on_counter([[Event("a", item)]]) == [("tcp", "EVAL")]  # not new: passed, untouched
    assert commands_on_counter([[Event(u, item)] for u in ("b", "c", "a", "d")]) == in_the_script  # three new, added at once
    assert int(r.get(users)) == 14 and USERS_SEEN._value.get() == 14
    assert engine.store.cas_many([(user_key(namespace, "e"), 5, b"x" * 24)], None, users_key=users) == [False]  # lost: nothing created
    assert int(r.get(users)) == 14
    engine.delete("a")
    assert int(r.get(users)) == 13
    r.set(users, "not a number")  # a broken counter leaves the gauge where it was, never the write undone or refused
    assert engine.apply([[Event("z", item)]])[0].applied == 1 and r.get(users) == b"not a number" and USERS_SEEN._value.get() == 13
    assert r.get(user_key(namespace, "z")) is not None


def test_the_embedded_store_counts_the_records_it_creates() -> None:
    """MemoryStore.cas_many with `users_key`, as RedisStore's: created records added to the counter, nothing else."""
    from service.store import MemoryStore

    store, rev1 = MemoryStore(), b"HREC" + bytes(rec.REVISION_OFFSET - 4) + (1).to_bytes(8, "little")
    assert store.cas_many([("a", 0, rev1), ("b", 0, rev1), ("c", 3, rev1)], None, users_key="n") == [True, True, False]
    assert store.cas_many([("a", 1, rev1)], None, users_key="n") == [True] and store.incr("n", 0) == 2


def test_a_request_of_duplicates_only_writes_nothing(ckpt_dir, namespace: str, counting_redis_url: str) -> None:
    """Events whose ids the user's ring already holds leave the record as it was read: no compare-and-set is sent for
    that user (INFO commandstats on a Redis of this process's own), while other users in the same request are written."""
    import redis

    from model.checkpoint import load
    from service.engine import Engine, Event
    from service.settings import Settings
    from service.store import RedisStore, user_key

    r = redis.Redis.from_url(counting_redis_url)
    s = Settings(checkpoint=str(ckpt_dir), namespace=namespace)
    engine = Engine(load(ckpt_dir), RedisStore(counting_redis_url), s)
    item = engine.ckpt.items[0]

    def evals() -> int:
        return int(r.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))

    assert engine.apply([[Event("u", item, "e1"), Event("u", item, "e2")]])[0].applied == 2
    stored, n = r.get(user_key(namespace, "u")), evals()
    res = engine.apply([[Event("u", item, "e2")], [Event("u", item, "e1")]])  # redelivered, in two requests
    assert [(x.applied, x.duplicate) for x in res] == [(0, 1), (0, 1)]
    assert evals() == n and r.get(user_key(namespace, "u")) == stored  # not stepped, not rewritten
    res = engine.apply([[Event("u", item, "e1"), Event("v", item, "e1")]])  # a duplicate for u, a first event for v
    assert (res[0].applied, res[0].duplicate) == (1, 1) and evals() == n + 1 and r.get(user_key(namespace, "u")) == stored
    assert Engine(load(ckpt_dir), RedisStore(counting_redis_url), s).apply([[Event("v", item, "e1")]])[0].duplicate == 1  # read from Redis
