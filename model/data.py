"""Interaction data: the public raw formats in, one `Dataset` out (model/split.py splits it).

    load(path)      recognises, by shape, a MovieLens-100K or -1M folder, an S3-Rec NAME.txt
                    (+ NAME_item2attributes.json), a CSV/Parquet table (user,item,timestamp),
                    or the word `synthetic`; malformed lines raise DataError(file, line)

Item and attribute indices start at 1 (0 is padding) and follow the natural order of the
external ids ("2" before "10"), so S3-Rec's already-numbered items keep their numbers.
Only items that occur in the interactions get an index.
Shape letters: u users, l max_len, v n_items + 1, m max_attrs.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_MAX_LEN = {"movielens": 200, "s3rec": 50, "synthetic": 50}
# Every tuned default was chosen on ML-100K (106 interactions a user) or Amazon Beauty (8.9), so a plain table takes the
# defaults of the one it resembles: MovieLens's from this many interactions a user on average, Amazon's (S3-Rec) below.
DENSE_PER_USER = 30



def train_part(seq: list[int]) -> list[int]:
    """The items of a user's sequence that training sees: all but the validation and test targets."""
    return seq[:-2] if len(seq) >= 3 else seq


class DataError(ValueError):
    """Input that cannot be read as a dataset; the message names the file and, where it can, the line."""


@dataclass
class Dataset:
    name: str
    users: list[str]  # external user ids
    sequences: list[list[int]]  # per user, item indices 1..n_items in time order
    items: list[str]  # external id of item index i + 1
    attributes: list[str] = field(default_factory=list)  # name of attribute index j + 1
    item_attrs: list[list[int]] = field(default_factory=list)  # n_items + 1 rows, row 0 empty
    kind: str = "s3rec"  # movielens | s3rec | synthetic: the logs whose defaults it takes (max_len, lr, dropout, ...; table_kind)
    source: str = ""  # what `load` needs to read it again (recorded in checkpoints)
    attributes_source: str | None = None
    timestamps: list[list[float]] = field(default_factory=list)  # per user, beside sequences; empty: the format has none

    def __post_init__(self) -> None:
        if not self.item_attrs:
            self.item_attrs = [[] for _ in range(self.n_items + 1)]

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_attrs(self) -> int:
        return len(self.attributes)

    @property
    def max_attrs(self) -> int:
        return max((len(a) for a in self.item_attrs), default=0)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def item_attr_tensor(self) -> Tensor:  # (v, m), zero-padded
        t = torch.zeros(self.n_items + 1, self.max_attrs, dtype=torch.long)
        for i, attrs in enumerate(self.item_attrs):
            t[i, : len(attrs)] = torch.tensor(attrs, dtype=torch.long)
        return t

    def train_counts(self) -> list[int]:
        """Interactions per item index over training positions only (all but each user's last two)."""
        counts = [0] * (self.n_items + 1)
        for seq in self.sequences:
            for i in train_part(seq):
                counts[i] += 1
        return counts

    def popularity(self) -> list[int]:
        """Every item index, most training interactions first (ties: lower index first).

        Counted on training positions only, so the popularity baseline never sees the
        validation or test item it is scored on.
        """
        counts = self.train_counts()
        return sorted(range(1, self.n_items + 1), key=lambda i: (-counts[i], i))

    def summary(self) -> str:
        return f"{self.name}: {len(self.users)} users, {self.n_items} items, {self.n_interactions} interactions, {self.n_attrs} attributes"


def load(path: str, attributes: str | None = None) -> Dataset:
    """Read a dataset, recognised by its shape (see the module docstring)."""
    if path == "synthetic" or path.startswith("synthetic:"):
        from model.synthetic import synthetic, synthetic_params

        return synthetic(**synthetic_params(path))
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or directory (expected a MovieLens folder, an S3-Rec NAME.txt, a .csv, .tsv or .parquet table, or 'synthetic')")
    if p.is_dir():
        if (p / "ml-1m" / "ratings.dat").is_file():  # the folder the GroupLens zip extracts to
            p = p / "ml-1m"
        if (p / "u.data").is_file():
            ds = _load_ml100k(p)
        elif (p / "ratings.dat").is_file():
            ds = _load_ml1m(p)
        else:
            raise DataError(f"{p}: folder holds neither u.data (MovieLens-100K) nor ratings.dat (MovieLens-1M)")
        if attributes:
            _attach_attributes(ds, Path(attributes))
        return ds
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return _load_s3rec(p, Path(attributes) if attributes else None)
    if suffix in (".csv", ".tsv", ".parquet", ".pq"):
        rows = _read_parquet(p) if suffix in (".parquet", ".pq") else _read_csv(p)
        ds = _from_rows(p.stem, rows, kind=table_kind(rows), source=str(p.resolve()))
        if attributes:
            _attach_attributes(ds, Path(attributes))
        return ds
    raise DataError(f"{p}: unrecognised file type {suffix!r} (expected .txt, .csv, .tsv, .parquet)")


def table_kind(rows: list[Row]) -> str:
    """The kind of log a plain table's defaults come from: "movielens" when dense (DENSE_PER_USER), else "s3rec"."""
    return "movielens" if len(rows) >= DENSE_PER_USER * len({r[0] for r in rows}) else "s3rec"


def _natural(x: str) -> tuple[int, int, str]:
    return (0, int(x), x) if x.isdigit() else (1, 0, x)


def _index(ids: set[str] | list[str]) -> tuple[list[str], dict[str, int]]:
    ordered = sorted(set(ids), key=_natural)
    return ordered, {x: i + 1 for i, x in enumerate(ordered)}


Row = tuple[str, str, float]  # (user, item, timestamp)


def _from_rows(name: str, rows: list[Row], *, kind: str, source: str) -> Dataset:
    """Group interactions by user; within a user, sort by timestamp, ties in file order (stable)."""
    if not rows:
        raise DataError(f"{source}: no interactions")
    items, item_index = _index([r[1] for r in rows])
    by_user: dict[str, list[tuple[float, int]]] = {}
    for user, item, ts in rows:
        by_user.setdefault(user, []).append((ts, item_index[item]))
    users = sorted(by_user, key=_natural)
    ordered = [sorted(by_user[u], key=lambda e: e[0]) for u in users]  # sorted() is stable
    return Dataset(name, users, [[i for _, i in evs] for evs in ordered], items, kind=kind, source=source,
                   timestamps=[[t for t, _ in evs] for evs in ordered])


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, stripped line) for every non-blank line."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line:
                    yield n, line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not {encoding} text ({e})") from e


def _number(path: Path, n: int, field_name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}:{n}: {field_name} {value!r} is not a number") from None


def _ratings(path: Path, sep: str, layout: str) -> list[Row]:
    """GroupLens ratings: user, item, rating, timestamp per line; every rating counts as an interaction."""
    rows: list[Row] = []
    for n, line in _lines(path, "latin-1"):
        parts = line.split(sep)
        if len(parts) != 4:
            raise DataError(f"{path}:{n}: expected 4 {layout}, got {len(parts)} fields")
        user, item, rating, ts = parts
        _number(path, n, "rating", rating)
        rows.append((user, item, _number(path, n, "timestamp", ts)))
    return rows


def _load_ml100k(folder: Path) -> Dataset:
    rows = _ratings(folder / "u.data", "\t", "tab-separated fields (user item rating timestamp)")
    ds = _from_rows("ml-100k", rows, kind="movielens", source=str(folder.resolve()))
    genres = _ml100k_genres(folder)
    item_file = folder / "u.item"
    if item_file.is_file():
        names = genres or [f"genre{j}" for j in range(19)]
        attrs_of: dict[str, list[str]] = {}
        for n, line in _lines(item_file, "latin-1"):
            parts = line.split("|")
            if len(parts) < 5 + len(names):
                raise DataError(f"{item_file}:{n}: expected {5 + len(names)} '|'-separated fields, got {len(parts)}")
            flags = parts[-len(names) :]
            if any(f not in ("0", "1") for f in flags):
                raise DataError(f"{item_file}:{n}: genre flags must be 0 or 1, got {flags}")
            attrs_of[parts[0]] = [g for g, f in zip(names, flags) if f == "1"]
        _set_attributes(ds, attrs_of)
    return ds


def _ml100k_genres(folder: Path) -> list[str]:
    f = folder / "u.genre"
    if not f.is_file():
        return []
    by_index: dict[int, str] = {}
    for n, line in _lines(f, "latin-1"):
        name, _, idx = line.rpartition("|")
        if not name or not idx.isdigit():
            raise DataError(f"{f}:{n}: expected 'name|index', got {line!r}")
        by_index[int(idx)] = name
    return [by_index[i] for i in sorted(by_index)]


def _load_ml1m(folder: Path) -> Dataset:
    rows = _ratings(folder / "ratings.dat", "::", "'::'-separated fields (user::movie::rating::timestamp)")
    ds = _from_rows("ml-1m", rows, kind="movielens", source=str(folder.resolve()))
    movies = folder / "movies.dat"
    if movies.is_file():
        attrs_of: dict[str, list[str]] = {}
        for n, line in _lines(movies, "latin-1"):  # GroupLens ships movies.dat in latin-1
            parts = line.split("::")
            if len(parts) != 3:
                raise DataError(f"{movies}:{n}: expected movie::title::genres, got {len(parts)} fields")
            attrs_of[parts[0]] = [g for g in parts[2].split("|") if g and g != "(no genres listed)"]
        _set_attributes(ds, attrs_of)
    return ds


def _load_s3rec(txt: Path, attributes: Path | None) -> Dataset:
    rows: list[Row] = []
    seen: set[str] = set()
    for n, line in _lines(txt):
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"{txt}:{n}: expected 'user item item ...', got {line[:80]!r}")
        user = parts[0]
        if user in seen:
            raise DataError(f"{txt}:{n}: user {user!r} appears on more than one line")
        seen.add(user)
        rows.extend((user, item, float(t)) for t, item in enumerate(parts[1:]))
    ds = _from_rows(txt.stem, rows, kind="s3rec", source=str(txt.resolve()))
    ds.timestamps = []  # line positions stood in for them
    beside = txt.with_name(f"{txt.stem}_item2attributes.json")
    attr_file = attributes or (beside if beside.is_file() else None)
    if attr_file is not None:
        _attach_attributes(ds, attr_file)
    return ds


def _read_csv(path: Path) -> list[Row]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (a header user,item,timestamp is required)")
        cols = _columns(path, [h.strip() for h in header])
        rows: list[Row] = []
        try:
            for record in reader:
                n = reader.line_num
                if not record or all(not c.strip() for c in record):
                    continue
                if len(record) != len(header):
                    raise DataError(f"{path}:{n}: expected {len(header)} fields, got {len(record)}")
                user, item, ts = (record[cols[c]].strip() for c in ("user", "item", "timestamp"))
                if not user or not item:
                    raise DataError(f"{path}:{n}: empty user or item")
                rows.append((user, item, _timestamp(path, n, ts)))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from e
    cols = _columns(path, [str(c) for c in df.columns])
    names = {c: df.columns[cols[c]] for c in ("user", "item", "timestamp")}
    rows: list[Row] = []
    for r, (user, item, ts) in enumerate(zip(df[names["user"]], df[names["item"]], df[names["timestamp"]])):
        if pd.isna(user) or pd.isna(item) or pd.isna(ts):
            raise DataError(f"{path}: row {r + 1}: missing user, item or timestamp")
        ts = ts.timestamp() if hasattr(ts, "timestamp") else ts
        rows.append((_id(user), _id(item), _timestamp(path, r + 1, str(ts))))
    return rows


def _id(x: object) -> str:
    """External ids as strings; integral floats (a Parquet int column with nulls) lose the '.0'."""
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return str(int(x))
    return str(x)


def _columns(path: Path, header: list[str]) -> dict[str, int]:
    aliases = {"user": ("user", "user_id", "userid"), "item": ("item", "item_id", "itemid"), "timestamp": ("timestamp", "time", "ts")}
    lower = [h.lower() for h in header]
    cols: dict[str, int] = {}
    for want, names in aliases.items():
        found = [lower.index(a) for a in names if a in lower]
        if not found:
            raise DataError(f"{path}: header {header} lacks a {want!r} column (accepted: {', '.join(names)})")
        cols[want] = found[0]
    return cols


def _timestamp(path: Path, n: int, value: str) -> float:
    """A number (epoch seconds or any sortable number) or an ISO-8601 date/time."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise DataError(f"{path}:{n}: timestamp {value!r} is neither a number nor an ISO-8601 date") from None


def _attach_attributes(ds: Dataset, path: Path) -> None:
    """Attributes from JSON {item: [attr, ...]} or CSV rows `item,attribute` (optional header)."""
    if not path.is_file():
        raise DataError(f"{path}: attributes file not found")
    attrs_of: dict[str, list[str]] = {}
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise DataError(f"{path}: expected a JSON object mapping item id -> list of attributes")
        attrs_of = {str(k): [str(a) for a in v] for k, v in raw.items()}
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for record in reader:
                n = reader.line_num
                if not record:
                    continue
                if len(record) != 2:
                    raise DataError(f"{path}:{n}: expected 'item,attribute', got {len(record)} fields")
                item, attr = record[0].strip(), record[1].strip()
                if n == 1 and item.lower() in ("item", "item_id", "itemid"):
                    continue  # header
                if not item or not attr:
                    raise DataError(f"{path}:{n}: empty item or attribute")
                attrs_of.setdefault(item, []).append(attr)
    _set_attributes(ds, attrs_of)
    ds.attributes_source = str(path.resolve())


def _set_attributes(ds: Dataset, attrs_of: dict[str, list[str]]) -> None:
    """Index the attributes of items that occur in the interactions; others are ignored."""
    wanted = {x for x in ds.items if x in attrs_of}
    ds.attributes, attr_index = _index({a for x in wanted for a in attrs_of[x]})
    ds.item_attrs = [[]] + [sorted({attr_index[a] for a in attrs_of.get(x, [])}) for x in ds.items]
