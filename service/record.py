"""One user's record: the binary value of their single Redis key. Never pickle.

    header (70 bytes, little-endian)
      magic "HREC" | format u16 | codec u8 | pad | revision u64 (offset 8) | events applied u64
      | updated_at f64 | last event timestamp f64 (NaN = none) | model version 16s
      | window slots u16 | dedup slots u16 | dedup cursor u32 | seen filter bytes u16
      | crc32 of the header before it and the body u32
    body
      window   int32[window slots]  last item indices, oldest first, left-padded with 0
      dedup    uint64[dedup slots]  hashes of the most recent event ids (a ring; 0 = empty)
      seen     uint8[seen bytes]    Bloom filter of every item id ever applied (model/seen.py)
      vector   float32[d]           the user vector recommendations are scored with
      state    the packed recurrent state (model/state.py, in the header's codec)

Format 2 (before the seen filter: a 68-byte header without its field) is still read, with an
empty filter that the engine fills from the window. The window, dedup ring and seen filter come
first so a record written by another model version can still be read for re-warming; the vector
and state are only read when the version matches. The Redis CAS
script reads the revision at offset 8. Every size is fixed by the model and settings, never by
the number of events: 10 events or 100,000 take the same bytes.
"""
from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from model.state import CODECS

MAGIC, FORMAT = b"HREC", 3  # 2: the checksum covers the header too; 3: the seen filter
HEADER = struct.Struct("<4sHBxQQdd16sHHIHI")
HEADER_V2 = struct.Struct("<4sHBxQQdd16sHHII")
REVISION_OFFSET = 8  # the Lua CAS script depends on this


class CorruptRecord(ValueError):
    """A stored record that cannot be trusted (truncated, wrong magic or format, bad checksum)."""


@dataclass
class Record:
    revision: int  # 0 = not stored yet; each write stores revision + 1
    applied: int
    updated_at: float
    last_event_ts: float
    model_version: str
    codec: str
    window: np.ndarray  # (max_len,) int32
    dedup: np.ndarray  # (dedup slots,) uint64
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


def event_hash(event_id: str) -> int:
    """64-bit hash of an event id for the dedup ring; never 0, which marks an empty slot."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little") or 1


def encode(r: Record) -> bytes:
    body = b"".join([
        r.window.astype("<i4").tobytes(),
        r.dedup.astype("<u8").tobytes(),
        r.seen_filter.tobytes(),
        r.vector.astype("<f4").tobytes(),
        r.state,
    ])
    version = r.model_version.encode()[:16].ljust(16, b"\0")
    head = HEADER.pack(MAGIC, FORMAT, CODECS[r.codec], r.revision, r.applied, r.updated_at, r.last_event_ts,
                       version, len(r.window), len(r.dedup), r.dedup_pos, len(r.seen_filter), 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def decode(blob: bytes, model_version: str, vector_dim: int) -> Record:
    """Parse a record; vector and state are read only when it was written by `model_version`."""
    fmt = struct.unpack_from("<H", blob, 4)[0] if len(blob) >= 6 else -1
    head = HEADER_V2 if fmt == 2 else HEADER
    if len(blob) < head.size:
        raise CorruptRecord(f"record of {len(blob)} bytes is shorter than its {head.size}-byte header")
    if fmt == 2:
        magic, fmt, codec, rev, applied, updated, last_ts, version, n_win, n_dedup, dpos, crc = head.unpack_from(blob)
        n_seen = 0
    else:
        magic, fmt, codec, rev, applied, updated, last_ts, version, n_win, n_dedup, dpos, n_seen, crc = head.unpack_from(blob)
    names = {i: name for name, i in CODECS.items()}
    if magic != MAGIC or fmt not in (2, FORMAT) or codec not in names:
        raise CorruptRecord(f"bad header (magic {magic!r}, format {fmt}, codec {codec})")
    body = memoryview(blob)[head.size :]
    if zlib.crc32(body, zlib.crc32(memoryview(blob)[: head.size - 4])) != crc:
        raise CorruptRecord("checksum mismatch (truncated or overwritten)")
    off = 4 * n_win + 8 * n_dedup + n_seen
    if len(body) < off:
        raise CorruptRecord("body shorter than its window, dedup ring and seen filter")
    window = np.frombuffer(body[: 4 * n_win], dtype="<i4").astype(np.int32)
    dedup = np.frombuffer(body[4 * n_win : 4 * n_win + 8 * n_dedup], dtype="<u8").astype(np.uint64)
    seen = np.frombuffer(body[off - n_seen : off], dtype=np.uint8).copy()
    ver = version.rstrip(b"\0").decode(errors="replace")
    vector, state = np.zeros(0, np.float32), b""
    if ver == model_version:
        vector = np.frombuffer(body[off : off + 4 * vector_dim], dtype="<f4").astype(np.float32)
        state = bytes(body[off + 4 * vector_dim :])
        if len(vector) != vector_dim:
            raise CorruptRecord("body shorter than its user vector")
    return Record(rev, applied, updated, last_ts, ver, names[codec], window, dedup, dpos, seen, vector, state)


def stored_revision(blob: bytes) -> int:
    """The revision the CAS script will read from a (possibly corrupt) stored value; -1 if too short."""
    return struct.unpack_from("<Q", blob, REVISION_OFFSET)[0] if len(blob) >= REVISION_OFFSET + 8 else -1


def empty(model_version: str, codec: str, max_len: int, dedup_slots: int, seen_bytes: int, vector_dim: int, state: bytes) -> Record:
    return Record(0, 0, 0.0, math.nan, model_version, codec, np.zeros(max_len, np.int32),
                  np.zeros(dedup_slots, np.uint64), 0, np.zeros(seen_bytes, np.uint8), np.zeros(vector_dim, np.float32), state)
