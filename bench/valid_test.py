"""How much of each model's validation NDCG@10 its test NDCG@10 keeps, over every converged run committed.

Early stopping and every tuning choice read validation; the comparison is made on test. If one kind of model keeps
less of its validation score on test than another, choosing on validation favours it. Reads every
`accuracy_*_{200,400}ep.json` under the folder (default bench/results); a run that several merged tables hold counts
once (same dataset, row, seed and test score). `python -m bench.valid_test [FOLDER]`."""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def ratios(root: Path) -> dict[tuple[str, str], list[float]]:
    """(dataset, model) -> test / validation NDCG@10 of each distinct finished run."""
    seen: set[tuple] = set()
    out: dict[tuple[str, str], list[float]] = {}
    for f in sorted(root.rglob("accuracy_*ep.json")):
        if not f.name.endswith(("_200ep.json", "_400ep.json")):
            continue
        d = json.loads(f.read_text())
        for row, runs in d.get("runs", {}).items():
            for r in runs:
                if "valid" not in r or "test" not in r:
                    continue
                key = (d["dataset"], row, r["seed"], round(r["test"]["NDCG@10"], 6))
                if key not in seen:
                    seen.add(key)
                    out.setdefault((d["dataset"], row.split(":")[0]), []).append(r["test"]["NDCG@10"] / r["valid"]["NDCG@10"])
    return out


if __name__ == "__main__":
    print("| dataset | model | runs | test / valid NDCG@10, mean | min | max |\n|---|---|---:|---:|---:|---:|")
    for (ds, model), v in sorted(ratios(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")).items()):
        print(f"| {ds} | {model} | {len(v)} | {st.fmean(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
