"""Benchmarks behind `holorec bench WHICH`; each module has `run(args) -> dict` and writes bench/results/."""
from __future__ import annotations

import argparse
import importlib

from pathlib import Path

MODULES = {"step": "bench.step", "accuracy": "bench.accuracy", "train": "bench.train_speed", "serve": "bench.serve", "faults": "bench.faults", "warm": "bench.ingest", "memory": "bench.memory"}


def run(args: argparse.Namespace) -> None:
    """Run the named bench (or all), then redraw the pictures from whatever results the folder holds."""
    from bench.plots import write_all

    names = list(MODULES) if args.which == "all" else [] if args.which == "plots" else [args.which]
    for name in names:
        importlib.import_module(MODULES[name]).run(args)
    if not getattr(args, "quick", False):
        write_all(Path(args.out))
