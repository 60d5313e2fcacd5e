"""Loaders for every raw format, malformed input, the leave-one-out split, synthetic data, `holorec data --from`."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from model.data import DataError, Dataset, load
from model.fetch import fetch_ml1m
from model.split import left_pad, split
from model.synthetic import synthetic

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def write_ml100k(folder: Path, data_lines: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = data_lines or ["1\t10\t4\t300", "1\t20\t3\t100", "2\t10\t5\t50", "1\t30\t2\t200", "2\t30\t1\t50"]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    def flags(*on: int) -> str:
        return "|".join("1" if i in on else "0" for i in range(19))
    (folder / "u.item").write_bytes(
        f"10|Caf\xe9 (1995)|01-Jan-1995||http://x|{flags(1, 2)}\n".encode("latin-1")
        + f"20|B (1995)|01-Jan-1995||http://y|{flags(8)}\n".encode()
        + f"30|C (1996)|01-Jan-1996||http://z|{flags()}\n".encode()
        + f"40|Never rated|01-Jan-1996||http://w|{flags(5)}\n".encode()
    )
    return folder


def write_ml1m(folder: Path, ratings: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text(ratings or "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300000\n"
                                        "1::914::3::978301968\n2::661::2::978300000\n1::3408::4::978300760\n")
    (folder / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "914::My Fair Lady (1964)::Musical|Romance\n3408::Am\xe9lie (2001)::Comedy|Romance\n".encode("latin-1")
    )
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return folder


# --- MovieLens ---------------------------------------------------------------------------


def test_ml100k_sequences_items_and_genres(tmp_path: Path) -> None:
    ds = load(str(write_ml100k(tmp_path / "ml-100k")))
    assert ds.name == "ml-100k" and ds.kind == "movielens"
    assert ds.users == ["1", "2"] and ds.items == ["10", "20", "30"]  # item 40 is never rated: no index
    # user 1: 20 (t=100), 30 (t=200), 10 (t=300); user 2: 10 and 30 tie at t=50 -> file order
    assert ds.sequences == [[2, 3, 1], [1, 3]]
    assert ds.attributes == sorted({"Action", "Adventure", "Drama"})
    names = {x: [ds.attributes[j - 1] for j in ds.item_attrs[i + 1]] for i, x in enumerate(ds.items)}
    assert names == {"10": ["Action", "Adventure"], "20": ["Drama"], "30": []}
    assert ds.item_attrs[0] == [] and ds.max_attrs == 2
    t = ds.item_attr_tensor()
    assert t.shape == (4, 2) and t[0].tolist() == [0, 0] and t[3].tolist() == [0, 0]


def test_ml1m_latin1_multigenre_stable_time_order(tmp_path: Path) -> None:
    ds = load(str(write_ml1m(tmp_path / "ml-1m")))
    assert ds.name == "ml-1m" and ds.items == ["661", "914", "1193", "3408"]  # natural order, not string order
    # user 1 by timestamp: 1193 (978300760), 3408 (978300760, later in file), 914, 661
    assert ds.sequences[0] == [3, 4, 2, 1]
    assert ds.sequences[1] == [3, 1]  # equal timestamps keep file order
    assert "Children's" in ds.attributes and len(ds.item_attrs[1]) == 3  # 661 has three genres
    amelie = ds.items.index("3408") + 1
    assert sorted(ds.attributes[j - 1] for j in ds.item_attrs[amelie]) == ["Comedy", "Romance"]
    # the folder the GroupLens zip extracts to is found one level down too
    assert load(str(tmp_path)).sequences == ds.sequences


@pytest.mark.parametrize("line,where", [("1::661::3", "ratings.dat:2"), ("1::661::x::978302109", "ratings.dat:2")])
def test_ml1m_malformed_line_names_file_and_line(tmp_path: Path, line: str, where: str) -> None:
    folder = write_ml1m(tmp_path / "ml-1m", ratings=f"1::1193::5::978300760\n{line}\n")
    with pytest.raises(DataError, match=where):
        load(str(folder))


def test_ml100k_malformed_line(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "m", ["1\t10\t4\t300", "1\t20\t3\t100", "1 30 2 200"])
    with pytest.raises(DataError, match=r"u\.data:3: expected 4 tab-separated"):
        load(str(folder))


# --- S3-Rec ------------------------------------------------------------------------------


def test_s3rec_txt_with_attributes_json(tmp_path: Path) -> None:
    (tmp_path / "Toy.txt").write_text("1 1 2 3 4 5\n2 6 7 2\n10 3 1\n")
    (tmp_path / "Toy_item2attributes.json").write_text(json.dumps({"1": [1, 2], "2": [3], "6": [2], "99": [7]}))
    ds = load(str(tmp_path / "Toy.txt"))
    assert ds.name == "Toy" and ds.kind == "s3rec"
    assert ds.items == [str(i) for i in range(1, 8)] and ds.users == ["1", "2", "10"]
    assert ds.sequences == [[1, 2, 3, 4, 5], [6, 7, 2], [3, 1]]  # already-numbered items keep their numbers
    assert ds.attributes == ["1", "2", "3"]  # attribute 7 belongs to an item never seen
    assert ds.item_attrs[1] == [1, 2] and ds.item_attrs[6] == [2] and ds.item_attrs[7] == []


def test_s3rec_malformed_and_duplicate_user(tmp_path: Path) -> None:
    (tmp_path / "Bad.txt").write_text("1 1 2\n2\n")
    with pytest.raises(DataError, match=r"Bad\.txt:2"):
        load(str(tmp_path / "Bad.txt"))
    (tmp_path / "Dup.txt").write_text("1 1 2\n\n1 3 4\n")
    with pytest.raises(DataError, match=r"Dup\.txt:3: user '1' appears on more than one line"):
        load(str(tmp_path / "Dup.txt"))


# --- CSV / Parquet -----------------------------------------------------------------------


def test_csv_aliases_iso_times_and_attribute_csv(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp,extra\nu1,b,2024-01-02T00:00:00,x\nu1,a,2024-01-01,x\nu2,a,5,y\n")
    (tmp_path / "attrs.csv").write_text("item,attribute\na,red\na,big\nb,red\nzz,blue\n")
    ds = load(str(tmp_path / "log.csv"), attributes=str(tmp_path / "attrs.csv"))
    assert ds.name == "log" and ds.items == ["a", "b"] and ds.sequences == [[1, 2], [1]]
    assert ds.attributes == ["big", "red"] and ds.item_attrs == [[], [1, 2], [2]]
    assert ds.attributes_source and ds.attributes_source.endswith("attrs.csv")


def test_a_plain_table_takes_the_defaults_of_the_logs_it_resembles(tmp_path: Path) -> None:
    """Defaults were tuned on ML-100K (dense) and Amazon Beauty (sparse): a table with DENSE_PER_USER or more
    interactions a user on average takes MovieLens's (max_len 200, ...), a sparser one Amazon's."""
    from model.data import DEFAULT_MAX_LEN, DENSE_PER_USER

    for per_user, kind in ((DENSE_PER_USER, "movielens"), (DENSE_PER_USER - 1, "s3rec"), (3, "s3rec")):
        rows = "".join(f"u{u},i{(u + t) % 50},{t}\n" for u in range(4) for t in range(per_user))
        (tmp_path / "log.csv").write_text("user,item,timestamp\n" + rows)
        ds = load(str(tmp_path / "log.csv"))
        assert ds.kind == kind and ds.kind in DEFAULT_MAX_LEN, (per_user, ds.kind)


def test_csv_malformed_lines(tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("user,item,timestamp\n1,2,3\n1,2\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 3 fields"):
        load(str(f))
    f.write_text("user,item,timestamp\n1,2,3\n\n1,2,yesterday\n")
    with pytest.raises(DataError, match=r"bad\.csv:4: timestamp 'yesterday'"):
        load(str(f))
    f.write_text("who,item,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match="lacks a 'user' column"):
        load(str(f))


def test_parquet_with_json_attributes(tmp_path: Path) -> None:
    pd.DataFrame({"user": [7, 7, 8, 7], "item": [30, 10, 10, 20], "timestamp": [3, 1, 9, 2]}).to_parquet(tmp_path / "log.parquet")
    (tmp_path / "attrs.json").write_text(json.dumps({"10": ["x"], "30": ["y", "x"]}))
    ds = load(str(tmp_path / "log.parquet"), attributes=str(tmp_path / "attrs.json"))
    assert ds.users == ["7", "8"] and ds.items == ["10", "20", "30"]
    assert ds.sequences == [[1, 2, 3], [1]]
    assert ds.attributes == ["x", "y"] and ds.item_attrs == [[], [1], [], [1, 2]]


def test_attribute_file_malformed_and_unknown_inputs(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("user,item,timestamp\n1,a,1\n")
    (tmp_path / "attrs.csv").write_text("a,red\na,red,extra\n")
    with pytest.raises(DataError, match=r"attrs\.csv:2"):
        load(str(tmp_path / "log.csv"), attributes=str(tmp_path / "attrs.csv"))
    with pytest.raises(DataError, match=r"no such file.*\.tsv"):
        load(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="neither u.data"):
        load(str(tmp_path))
    (tmp_path / "x.bin").write_text("")
    with pytest.raises(DataError, match="unrecognised file type"):
        load(str(tmp_path / "x.bin"))


# --- split -------------------------------------------------------------------------------


def test_split_by_hand() -> None:
    ds = Dataset("t", ["u", "short"], [[1, 2, 3, 4, 5], [6, 7]], [str(i) for i in range(1, 8)])
    sp = split(ds, max_len=4)
    # user u: train [1, 2, 3] -> inputs [1, 2], targets [2, 3]; valid 3 -> 4; test 3+4 -> 5
    assert sp.inputs.tolist() == [[0, 0, 1, 2], [0, 0, 0, 6]]
    assert sp.targets.tolist() == [[0, 0, 2, 3], [0, 0, 0, 7]]
    assert sp.valid_histories == [[1, 2, 3]] and sp.valid_targets == [4]  # the short user only trains
    assert sp.test_histories == [[1, 2, 3, 4]] and sp.test_targets == [5]
    assert sp.eval_set("test") == ([[1, 2, 3, 4]], [5])
    assert ds.popularity()[:3] == [1, 2, 3] and ds.train_counts()[4:6] == [0, 0]  # 4 and 5 are not training items


def test_unfitted_valid_leaves_the_last_training_item_out_of_training_only() -> None:
    ds = Dataset("t", ["u", "short"], [[1, 2, 3, 4, 5, 6], [6, 7]], [str(i) for i in range(1, 8)])
    sp = split(ds, max_len=4, unfitted_valid=True)
    # user u: training would be [1, 2, 3, 4]; 4 is left out, so validation's newest input item (4) was never a target
    assert sp.inputs.tolist() == [[0, 0, 1, 2], [0, 0, 0, 6]] and sp.targets.tolist() == [[0, 0, 2, 3], [0, 0, 0, 7]]
    plain = split(ds, max_len=4)
    assert sp.eval_set("valid") == plain.eval_set("valid") == ([[1, 2, 3, 4]], [5])
    assert sp.eval_set("test") == plain.eval_set("test")
    assert 4 in plain.targets[0].tolist() and 4 not in sp.targets[0].tolist()


def test_split_truncates_to_most_recent() -> None:
    seq = list(range(1, 13))  # train = 1..10
    sp = split(Dataset("t", ["u"], [seq], [str(i) for i in range(1, 13)]), max_len=3)
    assert sp.inputs.tolist() == [[7, 8, 9]] and sp.targets.tolist() == [[8, 9, 10]]
    assert left_pad([[1, 2, 3, 4], [5], []], 3).tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]]


# --- synthetic ---------------------------------------------------------------------------


def test_synthetic_deterministic_and_reloadable() -> None:
    ds = synthetic()
    assert (len(ds.users), ds.n_items, ds.n_attrs, ds.max_attrs) == (600, 300, 12, 1)
    assert synthetic().sequences == ds.sequences and synthetic(seed=1).sequences != ds.sequences
    assert all(8 <= len(s) <= 40 and min(s) >= 1 and max(s) <= 300 for s in ds.sequences)
    small = synthetic(n_users=50, n_items=40, n_attrs=4, seed=3, seq_len=(5, 9))
    assert load(small.source).sequences == small.sequences and load("synthetic").sequences == ds.sequences
    with pytest.raises(DataError, match="bad synthetic parameter"):
        load("synthetic:users=3")


# --- holorec data --from -----------------------------------------------------------------


def test_fetch_ml1m_from_zip_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_ml1m(tmp_path / "src" / "ml-1m")
    archive = tmp_path / "movielens-copy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.iterdir():
            z.write(f, f"ml-1m/{f.name}")
    fetch_ml1m(tmp_path / "a", str(archive))
    assert "2 users, 4 items" in capsys.readouterr().out
    assert load(str(tmp_path / "a")).sequences == load(str(src)).sequences
    fetch_ml1m(tmp_path / "b", str(tmp_path / "src"))
    assert (tmp_path / "b" / "movies.dat").read_bytes() == (src / "movies.dat").read_bytes()
    # a file called ml-1m.zip must carry the published checksum
    named = tmp_path / "ml-1m.zip"
    named.write_bytes(archive.read_bytes())
    with pytest.raises(DataError, match="does not match the published"):
        fetch_ml1m(tmp_path / "c", str(named))
    bad = tmp_path / "other.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("ml-1m/ratings.dat", "1::2::3::4\n")
    with pytest.raises(DataError, match="not a MovieLens-1M archive"):
        fetch_ml1m(tmp_path / "d", str(bad))
