"""One line per (dataset, model) from a folder of `bench accuracy` logs named <dataset>_<model>_seed<N>.log (as
bench/accuracy_all.sh writes them): test NDCG@10 over the finished seeds, and the best validation NDCG@10 of runs cut
off before they finished. `python3 bench/summarise_logs.py bench/results/gpu-2026-12-01`."""
import re
import statistics as st
import sys
from pathlib import Path

rows: dict = {}
for f in sorted(Path(sys.argv[1] if len(sys.argv) > 1 else ".").glob("*.log")):
    name = re.match(r"(.+?)_(.+)_seed(\d)\.log", f.name)
    if not name:  # another log in the folder
        continue
    ds, model, seed = name.groups()
    text = f.read_text()
    m = re.search(r"test NDCG@10 ([\d.]+) HR@10 ([\d.]+) \(valid ([\d.]+); best epoch (\d+)/(\d+), (\d+) s\)", text)
    vals = [float(v) for v in re.findall(r"^epoch \d+:.* NDCG@10=([\d.]+)", text, re.M)]
    rows.setdefault((ds, model), []).append((int(seed), m.groups() if m else None, vals))
for (ds, model), rs in rows.items():
    done = [r for r in rs if r[1]]
    cut = [r for r in rs if not r[1] and r[2]]
    line = f"{ds} {model}:"
    if done:
        nd = [float(r[1][0]) for r in done]
        line += f" test NDCG@10 {st.fmean(nd):.4f} ± {st.stdev(nd) if len(nd) > 1 else 0:.4f} over seeds {[r[0] for r in done]} ({', '.join(r[1][0] + ' best ' + r[1][3] + '/' + r[1][4] for r in done)})"
    if cut:
        line += " | cut off: " + ", ".join(f"seed {r[0]} after {len(r[2])} epochs, best valid {max(r[2]):.4f} at epoch {r[2].index(max(r[2])) + 1}" for r in cut)
    print(line)
