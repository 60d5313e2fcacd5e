"""Would less popularity help? NDCG@10 of checkpoints on validation and test with each score lowered by tau times
the log of the item's training count plus one (logit adjustment, Menon et al., ICLR 2021), for a grid of tau.

HoloMambaRec recommends more popular items than SASRec and trails it on targets seen 1-4 times in training
(bench/buckets.py); test's targets are colder than validation's. tau = 0 is the model as trained; a tau > 0 would be
kept only if validation chose it (the protocol), and it would cost serving nothing (one fixed bias per item).

    python -m bench.pop_adjust CKPT [CKPT ...] [--taus -0.1,0,0.1] > FILE.md
"""
from __future__ import annotations

import argparse

import torch

from model.checkpoint import load as load_checkpoint
from model.data import load
from model.evaluate import metrics_from_ranks, ranks
from model.protocol import SeqRecModel
from model.split import left_pad, split
from model.train import set_threads


@torch.no_grad()
def ndcg_by_tau(model: SeqRecModel, histories: list[list[int]], targets: list[int], log_count: torch.Tensor,
                taus: list[float], batch_size: int = 512) -> list[float]:
    """NDCG@10 at each tau; the user vectors are computed once, the adjustment is applied to their scores."""
    model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in taus]
    for s in range(0, len(targets), batch_size):
        scores = model.score(model.user_vector(left_pad(histories[s : s + batch_size], model.config.max_len))).float()  # (b, v)
        tgt = torch.tensor(targets[s : s + batch_size], dtype=torch.long)
        for i, tau in enumerate(taus):
            out[i].append(ranks(scores - tau * log_count, tgt))
    return [metrics_from_ranks(torch.cat(r))["NDCG@10"] for r in out]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pop_adjust", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--taus", default="-0.1,-0.05,0,0.05,0.1,0.15,0.2,0.3,0.4")
    a = p.parse_args()
    set_threads()
    taus = [float(t) for t in a.taus.split(",")]
    print("Command: `python -m bench.pop_adjust " + " ".join(a.checkpoints) + f" --taus {a.taus}`\n")
    print("| checkpoint | split | " + " | ".join(f"tau {t:g}" for t in taus) + " |\n|" + "---|" * (2 + len(taus)))
    for path in a.checkpoints:
        ck = load_checkpoint(path)
        ds = load(ck.provenance["data"], ck.provenance.get("attributes"))
        sp = split(ds, 1)  # whole histories: user_vector reads each model's own window
        log_count = torch.log1p(torch.tensor(ds.train_counts(), dtype=torch.float))  # (v,)
        for s in ("valid", "test"):
            row = ndcg_by_tau(ck.model, *sp.eval_set(s), log_count, taus)
            best = max(range(len(taus)), key=row.__getitem__)
            print(f"| {path} | {s} | " + " | ".join(f"**{v:.4f}**" if i == best else f"{v:.4f}" for i, v in enumerate(row)) + " |", flush=True)


if __name__ == "__main__":
    main()
