"""`holorec bench memory --quick`: a real redis-server, the service over HTTP, the warm path, and a frontier
table from a real (tiny) `bench accuracy --codecs` run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from model.state import CODECS


def test_quick_memory_bench_measures_every_codec_and_joins_the_frontier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import accuracy, memory
    from bench.plots import write_all

    accuracy.run(argparse.Namespace(out=str(tmp_path / "frontier"), quick=True, data=None, epochs=1, seeds=1,
                                    models="holomamba:d_state=4", codecs=",".join(CODECS), device="cpu"))
    monkeypatch.delenv("HOLOREC_THREADS", raising=False)
    torch.set_num_threads(2)  # torch's own default on this machine: the bench must put HOLOREC_THREADS's (1) in its place
    res = memory.run(argparse.Namespace(out=str(tmp_path), quick=True))
    assert torch.get_num_threads() == 1
    rows = res["rows"]
    assert [r["written_by"] for r in rows[:2]] == ["POST /events (service over HTTP)", "holorec warm (engine)"]
    assert [(r["model"], r["codec"]) for r in rows[2:]] == [("holomamba:d_state=4", c) for c in CODECS]
    for r in rows:  # Redis holds at least the record, plus a key and an entry per user
        assert sum(r["parts"].values()) == r["record_bytes"] < r["used_memory_per_user"] < r["record_bytes"] + 4096
    by = {r["written_by"]: r["record_bytes"] for r in rows[2:]}  # the codec, on these rows
    assert by["float32"] > by["float16"] > by["int8-rows"] > by["int8"] == rows[0]["record_bytes"] <= 4096  # defaults: d_state 4, int8
    assert len(res["frontier"]) == 4 and all(0 <= f["ndcg10"] <= 1 for f in res["frontier"])
    assert "## The accuracy-bytes frontier" in (tmp_path / "memory.md").read_text()
    assert json.loads((tmp_path / "memory.json").read_text())["rows"] == rows
    assert tmp_path / "memory_frontier.png" in write_all(tmp_path)
