"""How much of each model's validation NDCG@10 its test NDCG@10 keeps, over every converged run committed.

Early stopping and every tuning choice read validation; the comparison is made on test. If one kind of model keeps
less of its validation score on test than another, choosing on validation favours it. Reads every
`accuracy_*_{200,400}ep.json` under the folder (default bench/results); a run that several merged tables hold counts
once (same dataset, model, seed and test and validation scores, under whatever row name); runs trained with --unfitted-valid are their own rows. Beside them, the popularity baseline's ratio on each dataset (from the
data a table names, where it is on this machine): how much easier or harder the test targets are by popularity alone.
`python -m bench.valid_test [FOLDER]`."""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

from model.data import DEFAULT_MAX_LEN, load
from model.evaluate import evaluate_popularity
from model.split import split


def ratios(root: Path) -> tuple[dict[tuple[str, str], list[float]], dict[str, str]]:
    """(dataset, model) -> test / validation NDCG@10 of each distinct finished run; and dataset -> its data's path."""
    seen: set[tuple] = set()
    out: dict[tuple[str, str], list[float]] = {}
    data: dict[str, str] = {}
    for f in sorted(root.rglob("accuracy_*ep.json")):
        if not f.name.endswith(("_200ep.json", "_400ep.json")):
            continue
        d = json.loads(f.read_text())
        if Path(d.get("data", "")).exists():  # tables run elsewhere (a lent GPU) name paths of that machine
            data[d["dataset"]] = d["data"]
        for row, runs in d.get("runs", {}).items():
            for r in runs:
                if "valid" not in r or "test" not in r:
                    continue
                model = row.split(":")[0] + (" (--unfitted-valid)" if r.get("settings", {}).get("unfitted_valid") else "")
                key = (d["dataset"], model, r["seed"], round(r["test"]["NDCG@10"], 6), round(r["valid"]["NDCG@10"], 6))
                if key not in seen:  # by model, not row: a merged table may hold a run under a new row name
                    seen.add(key)
                    out.setdefault((d["dataset"], model), []).append(r["test"]["NDCG@10"] / r["valid"]["NDCG@10"])
    return out, data


def popularity_ratio(path: str) -> float:
    """The popularity baseline's test / validation NDCG@10 on that data."""
    ds = load(path)
    sp = split(ds, DEFAULT_MAX_LEN[ds.kind])
    valid, test = (evaluate_popularity(ds.train_counts(), *sp.eval_set(w))["NDCG@10"] for w in ("valid", "test"))
    return test / valid


if __name__ == "__main__":
    print("| dataset | model | runs | test / valid NDCG@10, mean | min | max |\n|---|---|---:|---:|---:|---:|")
    runs, data = ratios(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results"))
    for (ds, model), v in sorted(runs.items()):
        print(f"| {ds} | {model} | {len(v)} | {st.fmean(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    for ds, path in sorted(data.items()):
        print(f"| {ds} | popularity baseline | - | {popularity_ratio(path):.3f} | - | - |")
