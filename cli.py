"""`holorec`: the one command. train, evaluate, serve, warm, consume, data, bench.

Each subcommand turns its arguments into calls of typed functions in model/, service/ and bench/ (and
its errors into one line and an exit status); everything is imported lazily so `holorec --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(a: argparse.Namespace) -> None:
    """Per-dataset defaults for max_len, lr and dropout, then model.train.train(), which saves the checkpoint.
    Interrupted (Ctrl-C, a closed laptop), the same command again carries on from the last finished epoch."""
    from model import MODELS, ModelConfig
    from model.data import DEFAULT_MAX_LEN, DataError, load
    from model.train import CONFIG_FIELDS, hyper, train

    if a.model not in MODELS:
        sys.exit(f"holorec train: unknown model {a.model!r}; choose from {', '.join(MODELS)}")
    try:
        ds = load(a.data, a.attributes)
    except DataError as e:
        sys.exit(f"holorec train: {e}")
    h = hyper(a.model, ds.kind)
    given = {k: getattr(a, k) for k in CONFIG_FIELDS if getattr(a, k) is not None}  # --weight-decay, --ema, ... as given
    config = ModelConfig(model=a.model, d_model=a.d_model, n_layers=a.layers, dropout=a.dropout if a.dropout is not None else h["dropout"],
                         **({k: h[k] for k in CONFIG_FIELDS} | given),
                         max_len=a.max_len or DEFAULT_MAX_LEN[ds.kind], **({"d_state": a.d_state} if a.d_state else {}))
    progress = Path(a.out) / "progress.safetensors"  # the last epoch: the same command, interrupted, carries on from it
    budget = {k: getattr(a, k) for k in ("epochs", "patience") if getattr(a, k) is not None}  # else train()'s defaults
    ckpt, report = train(ds, config, lr=a.lr if a.lr is not None else h["lr"], batch_size=a.batch_size or h["batch_size"], seed=a.seed, device=a.device,
                         patience_steps=a.patience_steps, out=Path(a.out), progress_file=progress, **budget)
    progress.unlink(missing_ok=True)
    print(f"checkpoint: {a.out} (version {ckpt.version}; best epoch {report['best_epoch']} of {report['epochs_run']}, "
          f"{report['train_seconds']:.1f} s)")
    print(json.dumps({"test": report["test"], "popularity_test": report["popularity_test"]}, indent=2))


def _evaluate(a: argparse.Namespace) -> None:
    """Reload the checkpoint's dataset (or --data), re-split, print the metrics as JSON."""
    from model.checkpoint import CheckpointError, load as load_checkpoint
    from model.data import DataError, load
    from model.split import split
    from model.evaluate import evaluate
    from model.seen import SeenFilter
    from model.train import set_threads

    set_threads()
    try:
        ckpt = load_checkpoint(a.checkpoint)
        data = a.data or ckpt.provenance.get("data")
        if not data:
            sys.exit("holorec evaluate: the checkpoint records no dataset; pass --data")
        ds = load(data, None if a.data else ckpt.provenance.get("attributes"))
    except (CheckpointError, DataError) as e:
        sys.exit(f"holorec evaluate: {e}")
    if ds.items != ckpt.items:
        sys.exit(f"holorec evaluate: {data} has a different item vocabulary ({ds.n_items} items) from the checkpoint ({len(ckpt.items)})")
    histories, targets = split(ds, ckpt.model.config.max_len).eval_set(a.split)
    seen_filter = SeenFilter(ds.items, a.seen_filter_bytes) if a.exclude_seen and a.seen_filter_bytes else None
    m = evaluate(ckpt.model.to(a.device), histories, targets, exclude_seen=a.exclude_seen, seen_filter=seen_filter, device=a.device)
    print(json.dumps({"checkpoint": str(a.checkpoint), "version": ckpt.version, "data": data, "split": a.split, "exclude_seen": a.exclude_seen,
                      "seen_filter_bytes": a.seen_filter_bytes if seen_filter else 0, "users": len(targets), "metrics": m}, indent=2))


def _data(a: argparse.Namespace) -> None:
    """MovieLens-1M into --dest, from GroupLens (md5-checked) or --from a zip or folder."""
    from model.data import DataError
    from model.fetch import fetch_ml1m

    try:
        fetch_ml1m(Path(a.dest), a.from_path)
    except DataError as e:
        sys.exit(f"holorec data: {e}")


def _settings_or_exit(command: str):  # -> service.settings.Settings (imported lazily)
    """Settings from the environment, or one line per bad HOLOREC_* variable and exit 2 (no traceback)."""
    from pydantic import ValidationError

    from service.settings import Settings, setting_problems

    try:
        return Settings()
    except ValidationError as e:
        for problem in setting_problems(e):
            print(f"holorec {command}: {problem}", file=sys.stderr)
        sys.exit(2)


def _serve(a: argparse.Namespace) -> None:
    """Bad settings and a taken port fail here, in one line, before torch and the model load; then the
    checkpoint (its own error, before any worker starts), the lines to try, and uvicorn."""
    import os
    import shlex
    import socket
    import tempfile

    s = _settings_or_exit("serve")
    try:
        with socket.create_server((a.host, a.port)):
            pass
    except OSError as e:
        sys.exit(f"holorec serve: cannot listen on {a.host}:{a.port}: {os.strerror(e.errno) if e.errno else e} (choose another with --port)")
    import uvicorn

    from model.checkpoint import CheckpointError, load

    workers = a.workers or s.workers
    os.environ["HOLOREC_CHECKPOINT"] = a.checkpoint
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="holorec-metrics-")
    try:
        ckpt = load(a.checkpoint)
    except CheckpointError as e:
        print(f"holorec serve: checkpoint refused: {e}", file=sys.stderr)
        sys.exit(2)
    base = f"http://{a.host}:{a.port}"
    ids = [ckpt.items[i - 1] for i in (ckpt.popular or range(1, len(ckpt.items) + 1))[:2]]  # two popular items: works as printed
    events = json.dumps({"events": [{"user_id": "alice", "item_id": i} for i in ids]})
    print(f"holorec serving {a.checkpoint} on {base}  (API docs: {base}/docs)")
    print(f"  try: curl -s -X POST {base}/events -H 'Content-Type: application/json' -d {shlex.quote(events)}")
    print(f"       curl -s '{base}/recommend/alice?k=5'")
    uvicorn.run("service.app:app_from_env", factory=True, host=a.host, port=a.port, workers=workers, log_level="info", access_log=s.access_log)


def _warm(a: argparse.Namespace) -> None:
    """Write every user's state from a log into Redis (service/warm.py), and/or re-warm another checkpoint's."""
    import torch

    from model.checkpoint import CheckpointError, load
    from model.data import DataError, load as load_data
    from service.app import make_store
    from service.engine import Engine
    from service.warm import rewarm, warm

    s = _settings_or_exit("warm")
    if not s.redis_url:
        sys.exit("holorec warm: HOLOREC_REDIS_URL is not set; warm writes the states `holorec serve` reads from Redis")
    if not a.rewarm and not a.data:
        sys.exit("holorec warm: --data is required (or --rewarm to re-warm the stored records for this checkpoint)")
    torch.set_num_threads(s.threads)
    try:
        engine = Engine(load(a.checkpoint), make_store(s), s)
        ds = load_data(a.data, a.attributes) if a.data else None
    except (CheckpointError, DataError) as e:
        sys.exit(f"holorec warm: {e}")
    progress = sys.stderr.isatty()
    out = {}
    if a.rewarm:
        out["rewarm"] = rewarm(engine, progress=progress)
    if ds is not None:
        out["warm"] = warm(engine, ds, overwrite=a.overwrite, progress=progress)
    print(json.dumps(out))


def _consume(a: argparse.Namespace) -> None:
    """Apply a Redis Stream's events through a consumer group until SIGTERM/SIGINT (service/consume.py)."""
    import logging
    import os
    import signal
    import socket
    import threading

    import torch
    from prometheus_client import start_http_server

    from model.checkpoint import CheckpointError, load
    from service.app import make_store
    from service.consume import Consumer, stream_client
    from service.engine import Engine
    from service.metrics import registry

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings_or_exit("consume")
    if not s.redis_url:
        sys.exit("holorec consume: HOLOREC_REDIS_URL is not set; the stream and the states live in Redis")
    torch.set_num_threads(s.threads)
    try:
        engine = Engine(load(a.checkpoint), make_store(s), s)
    except CheckpointError as e:
        sys.exit(f"holorec consume: checkpoint refused: {e}")
    name = a.consumer or f"{socket.gethostname()}-{os.getpid()}"
    consumer = Consumer(engine, stream_client(s), a.stream, a.group, name, a.dead_letter or f"{a.stream}:dead")
    if a.metrics_port is not None:
        start_http_server(a.metrics_port, a.metrics_host, registry=registry())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch in hand, acknowledge it, then exit
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("holorec").info("holorec consume: stream %s, group %s, consumer %s, dead letters to %s",
                                      a.stream, a.group, name, consumer.dead_letter)
    consumer.run(stop, new_only=a.new_only)


def _bench(a: argparse.Namespace) -> None:
    import bench

    bench.run(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="holorec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and write a checkpoint directory")
    t.add_argument("--data", required=True, help="MovieLens folder, S3-Rec NAME.txt, CSV/Parquet file, or 'synthetic'")
    t.add_argument("--attributes", help="item -> attributes file for a CSV/Parquet dataset")
    t.add_argument("--model", default="holomamba", help="holomamba, sasrec, gru4rec or elastic (model.MODELS)")
    t.add_argument("--epochs", type=int, help="at most this many passes over every training position (default: model/train.py's "
                   "EPOCHS, 200, to convergence, where the defaults were chosen; 10 is the paper's budget)")
    t.add_argument("--patience", type=int, help="stop after this many epochs without a better validation NDCG@10 (default: PATIENCE, 10) ...")
    t.add_argument("--patience-steps", type=int, default=500, help="... that also hold this many optimizer steps")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--max-len", type=int, help="most recent items kept per user (default per dataset)")
    t.add_argument("--d-model", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--d-state", type=int, help="holomamba: SSM state size per channel (default 4); the served state, and so Redis memory, "
                   "grows with it (bench/results/memory.md)")
    t.add_argument("--dropout", type=float, help="default per model and dataset")
    t.add_argument("--lr", type=float, help="default per model and dataset (1e-3 unless tuned)")
    t.add_argument("--weight-decay", type=float, help="AdamW's, on weight matrices and embeddings; default per model and dataset (0.01 unless tuned)")
    t.add_argument("--ema", type=float, help="validate, keep and serve a moving average of the weights with this decay per step "
                                             "(0 = off); default per model and dataset")
    t.add_argument("--ema-warmup", type=float, help="the average's decay at step t is min(ema, (1 + t) / (ema_warmup + t)), so it spans "
                                                    "about the last 1 / (ema_warmup - 1) of training until ema caps it; default per model and dataset (10 unless tuned)")
    t.add_argument("--item-dropout", type=float, help="holomamba, training only: drop each item's own vector with this probability, "
                                                      "its attributes kept (none dropped without attributes); default per dataset (0.2 on MovieLens, "
                                                      "Amazon and table data, 0 on synthetic data)")
    t.add_argument("--label-smoothing", type=float, help="training only: put this much of the cross-entropy's target uniformly "
                                                         "over all items; default per model and dataset (0 unless tuned)")
    t.add_argument("--adam-beta2", type=float, help="AdamW's second-moment decay; default per model and dataset (torch's 0.999 unless tuned)")
    t.add_argument("--batch-size", type=int, help="default per model and dataset (128 unless tuned)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="full-ranking HR/NDCG/MRR of a checkpoint on its dataset's test (or validation) split")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="dataset path (default: the one recorded in the checkpoint)")
    e.add_argument("--split", default="test", choices=["valid", "test"])
    e.add_argument("--exclude-seen", action="store_true", help="also remove the user's history items from the ranking")
    e.add_argument("--seen-filter-bytes", type=int, default=384,
                   help="with --exclude-seen, remove what a seen filter of this size reports, as the service does "
                        "(HOLOREC_SEEN_FILTER_BYTES); 0 = exactly the history")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_evaluate)

    d = sub.add_parser("data", help="fetch MovieLens-1M (checksum verified) or copy it from a local path")
    d.add_argument("--dest", default="data/ml-1m")
    d.add_argument("--from", dest="from_path", help="a local ml-1m.zip or extracted folder instead of downloading")
    d.set_defaults(func=_data)

    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (uvicorn)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, help="uvicorn worker processes (default: HOLOREC_WORKERS, else 1)")
    s.set_defaults(func=_serve)

    w = sub.add_parser("warm", help="write every user's state from a log into the store (HOLOREC_REDIS_URL)")
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--data", help="the log, in any format `holorec train` reads")
    w.add_argument("--attributes", help="item -> attributes file for a CSV/Parquet log")
    w.add_argument("--overwrite", action="store_true", help="also rewrite users who already have a state")
    w.add_argument("--rewarm", action="store_true", help="first re-warm every stored state another checkpoint wrote")
    w.set_defaults(func=_warm)

    c = sub.add_parser("consume", help="apply a Redis Stream's events through a consumer group (exactly-once effect)")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--stream", required=True, help="the stream's key")
    c.add_argument("--group", required=True, help="consumer group; processes with the same group share the stream")
    c.add_argument("--consumer", help="this consumer's name in the group (default: host-pid)")
    c.add_argument("--dead-letter", help="stream for entries that cannot be applied (default: STREAM:dead)")
    c.add_argument("--new-only", action="store_true", help="a new group starts at entries added from now, not the first")
    c.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    c.add_argument("--metrics-host", default="127.0.0.1", help="address of the /metrics listener (0.0.0.0 to let Prometheus in another container scrape it)")
    c.set_defaults(func=_consume)

    b = sub.add_parser("bench", help="benchmarks; results go to bench/results/")
    b.add_argument("which", choices=["step", "accuracy", "train", "serve", "faults", "warm", "memory", "plots", "all"])
    b.add_argument("--out", default="bench/results")
    b.add_argument("--quick", action="store_true", help="a small, fast version (for smoke tests)")
    b.add_argument("--data", help="dataset for `bench accuracy`")
    b.add_argument("--epochs", type=int, default=10)
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--seed", type=int, help="`bench accuracy`: run only this one of the seeds (processes can fill one table side by side)")
    b.add_argument("--models", help="comma-separated models for `bench accuracy`/`train` (default: all registered)")
    b.add_argument("--max-len", type=int, help="`bench accuracy`: training window (default per dataset)")
    b.add_argument("--batch-size", type=int, help="`bench accuracy`: training batch size (default per model and dataset: 128 unless tuned)")
    b.add_argument("--lr", type=float, help="`bench accuracy`: learning rate (default per model and dataset)")
    b.add_argument("--dropout", type=float, help="`bench accuracy`: dropout (default per model and dataset)")
    b.add_argument("--patience", type=int, default=10, help="`bench accuracy`: early stopping on validation NDCG@10")
    b.add_argument("--patience-steps", type=int, default=500, help="`bench accuracy`: ... and at least this many optimizer steps")
    b.add_argument("--unfitted-valid", action="store_true",
                   help="`bench accuracy`, a diagnostic: train without each user's last training item too, so validation's newest input item is, as test's, never fitted (model/split.py)")
    b.add_argument("--grid", action="store_true", help="`bench accuracy`: choose lr and dropout per model on validation NDCG@10")
    b.add_argument("--checkpoints", action="store_true", help="`bench accuracy`: also save each run's checkpoint under OUT/checkpoints/ "
                   "(for `python -m bench.buckets`)")
    b.add_argument("--codecs", help="`bench accuracy`: also NDCG@10 served through these state codecs (comma-separated)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
