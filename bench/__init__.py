"""Benchmarks behind `holorec bench WHICH`; each module has `run(args) -> dict` and writes bench/results/."""
from __future__ import annotations

import argparse
import importlib

MODULES = {"step": "bench.step", "accuracy": "bench.accuracy", "train": "bench.train_speed", "serve": "bench.serve", "faults": "bench.faults", "warm": "bench.ingest"}


def run(args: argparse.Namespace) -> None:
    names = list(MODULES) if args.which == "all" else [args.which]
    for name in names:
        importlib.import_module(MODULES[name]).run(args)
