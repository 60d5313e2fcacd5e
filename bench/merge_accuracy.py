"""Merge finished runs from several `bench accuracy` JSONs into one table, so runs made by separate processes (each
with its own --out) or under an older row name become one row; then `holorec bench accuracy` with the same row names,
--seeds and --out finds every run finished, trains nothing and writes the table.

    python -m bench.merge_accuracy DEST.json SRC.json@ROW[@NEWROW] [SRC.json@ROW[@NEWROW] ...]

Each source adds its ROW's runs as NEWROW (default ROW), a later source replacing an earlier one's seed; each run's
settings are completed as `bench accuracy` reads them (a run recorded before settings held the weight decay trained at
its row name's), so renaming a row never changes what a run says it trained with. Used for
bench/results/cpu-2026-12-03/accuracy_Beauty_200ep.json (that folder's README has the command)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.accuracy import _settings


def merge(dest: Path, sources: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for spec in sources:
        path, _, rows = spec.partition("@")  # row names hold ':' and '='
        row, _, new = rows.partition("@")
        src = json.loads(Path(path).read_text())
        out = out or {k: v for k, v in src.items() if k not in ("runs", "summary")}
        out["commands"] = list(dict.fromkeys(out.get("commands", []) + src.get("commands", [])))
        for r in src["runs"][row]:
            runs.setdefault(new or row, {})[r["seed"]] = r | {"settings": _settings(row, r)}
    out["runs"] = {name: [rs[s] for s in sorted(rs)] for name, rs in runs.items()}
    out["seeds"] = max(len(rs) for rs in runs.values())
    out["wall_seconds"] = sum(r["train_seconds"] for rs in out["runs"].values() for r in rs)
    dest.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for name, rs in merge(Path(sys.argv[1]), sys.argv[2:])["runs"].items():
        print(name, [(r["seed"], r["settings"]["weight_decay"], round(r["test"]["NDCG@10"], 4)) for r in rs])
