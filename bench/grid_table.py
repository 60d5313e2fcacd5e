"""The lr x dropout grid from separate `bench accuracy` runs (one JSON per point, as a lent device or two CPU lanes
run them), one table per model, and the point each model's validation NDCG@10 chooses. Test scores are not shown:
the choice is made on validation alone (each JSON still holds its test figures).

    python -m bench.grid_table RESULTS.json[@ROW] [RESULTS.json[@ROW] ...]

ROW picks one row of a JSON holding several (default: every row); a point's lr and dropout are read from its run's
settings, seed 0 only."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def points(specs: list[str]) -> dict[str, dict[tuple[float, float], dict[str, Any]]]:
    """{model: {(lr, dropout): {valid, best_epoch, epochs_run, budget, source}}}; a later spec replaces an earlier one."""
    grid: dict[str, dict[tuple[float, float], dict[str, Any]]] = {}
    for spec in specs:
        path, _, only = spec.partition("@")
        res = json.loads(Path(path).read_text())
        for row, runs in res["runs"].items():
            if only and row != only:
                continue
            for r in runs:
                s = r["settings"]
                if r["seed"] != 0:
                    continue
                grid.setdefault(row.partition(":")[0], {})[(s["lr"], s["dropout"])] = {
                    "valid": r["valid"]["NDCG@10"], "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                    "budget": s["epochs"], "source": path}
    return grid


def table(grid: dict[str, dict[tuple[float, float], dict[str, Any]]]) -> str:
    lines = ["| model | lr | dropout | valid NDCG@10 | best epoch / run (budget) | source |", "|---|---:|---:|---:|---|---|"]
    chosen = []
    for model, pts in grid.items():
        best = max(pts, key=lambda k: pts[k]["valid"])
        for (lr, dropout), p in sorted(pts.items()):
            mark = "**" if (lr, dropout) == best else ""
            lines.append(f"| {model} | {lr:g} | {dropout:g} | {mark}{p['valid']:.4f}{mark} | {p['best_epoch']}/{p['epochs_run']} "
                         f"({p['budget']}) | {p['source']} |")
        chosen.append(f"{model}: lr {best[0]:g}, dropout {best[1]:g} (of {len(pts)} points)")
    return "\n".join(lines + ["", "Chosen on validation NDCG@10: " + "; ".join(chosen)])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table(points(sys.argv[1:])))
