"""One user's record: the binary value of their single Redis key. Never pickle.

    header (74 bytes, little-endian)
      magic "HREC" | format u16 | codec id u8 (model/state.py CODECS) | item id bytes u8 (2 or 4)
      | revision u64 (offset 8) | events applied u64 | updated_at f64 | last event timestamp f64 (NaN = none)
      | model version 16s | window slots u16 | dedup slots u16 | dedup cursor u16 | seen filter bytes u16
      | vector dim u16 | state bytes u32 | crc32 of the header before it and the body u32
    body
      window   u16 or i32[window slots]  last item indices, oldest first, left-padded with 0
      dedup    u32[dedup slots]          hashes of the most recent event ids (a ring; 0 = empty)
      seen     u8[seen bytes]            Bloom filter of every item id ever applied (model/seen.py)
      vector   f32[d] under the float32 codec, else f16[d]: the user vector recommendations are scored with
      state    the packed recurrent state (model/state.py, in the header's codec)

Every length is in the header, so a reader needs no model to walk a record. Item ids take 2 bytes when the
catalogue has fewer than 65,536 items. A dedup hash takes 4 bytes: a new event is taken for a duplicate only
when its hash equals one of the ring's, odds of (dedup slots) / 2^32 per event (1 in 67 million at 64 slots).

Formats 2 and 3 (8-byte dedup hashes, int32 window, f32 vector, no lengths; format 2 without the seen
filter) are still read: their dedup hashes keep their low 4 bytes, which are the new hashes of the same ids.
The window, dedup ring and seen filter come first so a record another model version wrote can still be read
for re-warming; the vector and state are only read when the version matches. The Redis compare-and-set
script (service/store.py) reads the revision at REVISION_OFFSET. Every size is fixed by the model and
settings, never by the number of events: 10 events or 100,000 take the same bytes.
"""
from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from model.state import CODECS

MAGIC, FORMAT = b"HREC", 4  # 2: the checksum covers the header too; 3: the seen filter; 4: lengths in the header, compact fields
HEADER = struct.Struct("<4sHBBQQdd16sHHHHHII")
OLD_HEADERS = {2: struct.Struct("<4sHBxQQdd16sHHII"), 3: struct.Struct("<4sHBxQQdd16sHHIHI")}
REVISION_OFFSET = 8  # the Lua CAS script depends on this
CODEC_NAMES = {i: name for name, i in CODECS.items()}


class CorruptRecord(ValueError):
    """A stored record that cannot be trusted (truncated, wrong magic or format, bad checksum)."""


@dataclass
class Record:
    revision: int  # 0 = not stored yet; each write stores next_revision(the one it read)
    applied: int
    updated_at: float
    last_event_ts: float
    model_version: str
    codec: str
    window: np.ndarray  # (window slots,) int32
    dedup: np.ndarray  # (dedup slots,) uint32
    dedup_pos: int
    seen_filter: np.ndarray  # (seen bytes,) uint8; empty in a format-2 record
    vector: np.ndarray  # (d,) float32; empty when the version differs from the reader's model
    state: bytes

    def seen(self, event_hash: int) -> bool:
        return bool((self.dedup == event_hash).any())

    def remember(self, event_hash: int) -> None:
        self.dedup[self.dedup_pos % len(self.dedup)] = event_hash
        self.dedup_pos = (self.dedup_pos + 1) % len(self.dedup)

    def push(self, item: int) -> None:
        self.window[:-1] = self.window[1:]
        self.window[-1] = item

    def history(self) -> list[int]:
        return [int(i) for i in self.window if i > 0]

    def resize(self, window_slots: int, dedup_slots: int) -> None:
        """Keep the newest items and event hashes when a setting changed the sizes."""
        if len(self.window) != window_slots:
            kept = self.window[-window_slots:] if window_slots else self.window[:0]
            self.window = np.concatenate([np.zeros(window_slots - len(kept), np.int32), kept])
        if len(self.dedup) != dedup_slots:
            newest = np.roll(self.dedup, -self.dedup_pos)  # oldest first
            newest = newest[newest > 0][-dedup_slots:]
            self.dedup = np.zeros(dedup_slots, np.uint32)
            self.dedup[: len(newest)] = newest
            self.dedup_pos = len(newest) % dedup_slots


def event_hash(event_id: str) -> int:
    """32-bit hash of an event id for the dedup ring; never 0, which marks an empty slot."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest()[:4], "little") or 1


U2, I4, U4, U8, F2, F4 = (np.dtype(t) for t in ("<u2", "<i4", "<u4", "<u8", "<f2", "<f4"))  # built once: decode runs per record


def _vector_dtype(codec: str) -> np.dtype:
    return F4 if codec == "float32" else F2


def next_revision(expected: int) -> int:
    """The revision a write over revision `expected` stores: the next one, or a random start where nothing (or nothing
    readable) was stored. A user deleted (or expired) and written again must not pass through revisions an old
    reader of the user may still hold (another replica between its read and its compare-and-set, or its cached
    guess), or that reader's compare-and-set would succeed on a record it never read."""
    return expected + 1 if expected > 0 else random.getrandbits(62) + 1


def encode(r: Record, id_bytes: int = 2) -> bytes:
    """`id_bytes` 2 needs every window index below 65,536; the engine passes 4 for larger catalogues."""
    body = b"".join([
        r.window.astype(U2 if id_bytes == 2 else I4).tobytes(),
        r.dedup.astype(U4).tobytes(),
        r.seen_filter.tobytes(),
        r.vector.astype(_vector_dtype(r.codec)).tobytes(),
        r.state,
    ])
    version = r.model_version.encode()[:16].ljust(16, b"\0")
    revision = (r.revision % 2**64 or 1) if r.revision else 0  # past 2^64 - 1 (a corrupt record's) it wraps to 1
    head = HEADER.pack(MAGIC, FORMAT, CODECS[r.codec], id_bytes, revision, r.applied,
                       r.updated_at, r.last_event_ts, version, len(r.window), len(r.dedup), r.dedup_pos, len(r.seen_filter),
                       len(r.vector), len(r.state), 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def decode(blob: bytes, model_version: str, old_vector_dim: int | None = None) -> Record:
    """Parse a record; vector and state are read only when it was written by `model_version`. A format 2 or 3
    record does not say where its vector ends: `old_vector_dim`, the reader's d_model, does."""
    fmt = struct.unpack_from("<H", blob, 4)[0] if len(blob) >= 6 else -1
    head = OLD_HEADERS.get(fmt, HEADER)
    if len(blob) < head.size:
        raise CorruptRecord(f"record of {len(blob)} bytes is shorter than its {head.size}-byte header")
    fields = head.unpack_from(blob)
    if head is not HEADER:  # formats 2, 3: a pad byte where the id width is now (4: int32)
        fields = fields[:3] + (4,) + fields[3:]
    magic, fmt, codec, id_bytes, rev, applied, updated, last_ts, version, n_win, n_dedup, dpos = fields[:12]
    if magic != MAGIC or fmt not in (2, 3, FORMAT) or codec not in CODEC_NAMES:
        raise CorruptRecord(f"bad header (magic {magic!r}, format {fmt}, codec {codec})")
    body = memoryview(blob)[head.size :]
    if zlib.crc32(body, zlib.crc32(memoryview(blob)[: head.size - 4])) != fields[-1]:
        raise CorruptRecord("checksum mismatch (truncated or overwritten)")
    if fmt == FORMAT:
        n_seen, d, n_state = fields[12:15]
        win_dt, dedup_dt, vec_dt = (U2 if id_bytes == 2 else I4), U4, _vector_dtype(CODEC_NAMES[codec])
    else:
        n_seen = fields[12] if fmt == 3 else 0
        win_dt, dedup_dt, vec_dt = I4, U8, F4
        d = old_vector_dim if old_vector_dim is not None else -1
        n_state = len(body) - sum([4 * n_win, 8 * n_dedup, n_seen]) - 4 * max(d, 0)
    at, n_body = head.size, len(body)  # offsets below are in blob, the body starting at head.size
    win_end = at + win_dt.itemsize * n_win
    dedup_end = win_end + dedup_dt.itemsize * n_dedup
    off = dedup_end + n_seen
    if n_body < off - at:
        raise CorruptRecord("body shorter than its window, dedup ring and seen filter")
    window = np.frombuffer(blob, win_dt, n_win, at).astype(np.int32)
    dedup = np.frombuffer(blob, dedup_dt, n_dedup, win_end)
    dedup = dedup.copy() if dedup_dt is U4 else (dedup & 0xFFFFFFFF).astype(np.uint32)  # old 8-byte hashes keep their low 4 bytes
    seen = np.frombuffer(blob, np.uint8, n_seen, dedup_end).copy()
    ver = version.rstrip(b"\0").decode(errors="replace")
    vector, state = np.zeros(0, np.float32), b""
    if ver == model_version:
        if d < 0:
            raise CorruptRecord("an old-format record's vector and state cannot be split without the model's d_model")
        v_bytes = vec_dt.itemsize * d
        if n_body != off - at + v_bytes + n_state:
            raise CorruptRecord(f"body of {n_body} bytes, its header says {off - at + v_bytes + n_state}")
        vector = np.frombuffer(blob, vec_dt, d, off).astype(np.float32)
        state = bytes(blob[off + v_bytes :])
    return Record(rev, applied, updated, last_ts, ver, CODEC_NAMES[codec], window, dedup, dpos, seen, vector, state)


def stored_revision(blob: bytes) -> int:
    """The revision the CAS script will read from a (possibly corrupt) stored value; -1 if too short."""
    return struct.unpack_from("<Q", blob, REVISION_OFFSET)[0] if len(blob) >= REVISION_OFFSET + 8 else -1


def empty(model_version: str, codec: str, window_slots: int, dedup_slots: int, seen_bytes: int, vector_dim: int, state: bytes) -> Record:
    return Record(0, 0, 0.0, math.nan, model_version, codec, np.zeros(window_slots, np.int32),
                  np.zeros(dedup_slots, np.uint32), 0, np.zeros(seen_bytes, np.uint8), np.zeros(vector_dim, np.float32), state)
