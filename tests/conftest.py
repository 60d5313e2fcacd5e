"""Shared fixtures: a real Redis namespace per test, a tiny trained checkpoint, live uvicorn servers (bench/harness.py)."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from bench.harness import RedisServer, Service
from model import ModelConfig, build_model
from model.checkpoint import Checkpoint, save

torch.set_num_threads(1)  # the test machine has 2 cores, shared with the uvicorn servers the tests start
REDIS_URL = os.environ.get("HOLOREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# the services and CLIs the tests start keep their compiled steps here, not in the user's ~/.cache (Settings.graph_cache_dir)
os.environ.setdefault("HOLOREC_GRAPH_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "holorec-graphs"))


def tiny_sequences(n_users: int = 60, n_items: int = 40, length: int = 20, seed: int = 0) -> list[list[int]]:
    """Users walk item -> item + 1 (mod n) with a little noise: a pattern a sequential model learns fast."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n_users):
        i = int(torch.randint(1, n_items + 1, (1,), generator=g))
        seq = []
        for _ in range(length):
            seq.append(i)
            jump = int(torch.randint(0, 10, (1,), generator=g)) == 0
            i = int(torch.randint(1, n_items + 1, (1,), generator=g)) if jump else i % n_items + 1
        seqs.append(seq)
    return seqs


def train_tiny(out: Path, *, seed: int = 0, max_len: int = 64, steps: int = 60, d_model: int = 16) -> Checkpoint:
    """A real (tiny) training run: a few AdamW steps of full-softmax cross-entropy on tiny_sequences."""
    torch.manual_seed(seed)
    n_items, n_attrs = 40, 4
    attrs = torch.tensor([[0, 0]] + [[1 + i % n_attrs, 1 + (i // 10) % n_attrs] for i in range(n_items)])
    cfg = ModelConfig(n_items=n_items, n_attrs=n_attrs, max_attrs=2, d_model=d_model, max_len=max_len, dropout=0.0)
    model = build_model(cfg, attrs)
    seqs = torch.tensor(tiny_sequences())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model.loss(seqs[:, :-1], seqs[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    counts = torch.bincount(seqs.flatten(), minlength=n_items + 1)[1:]
    popular = (torch.argsort(counts, descending=True) + 1).tolist()
    ckpt = Checkpoint(model, [f"item-{i}" for i in range(1, n_items + 1)], [f"genre-{j}" for j in range(1, n_attrs + 1)],
                      popular, {"dataset": "tiny", "steps": steps, "final_loss": loss.item()})
    save(ckpt, out)
    return ckpt


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "a"
    train_tiny(path)
    return path


@pytest.fixture(scope="session")
def ckpt_b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model (other seed, other weights) for model-swap tests."""
    path = tmp_path_factory.mktemp("ckpt") / "b"
    train_tiny(path, seed=1)
    return path


@pytest.fixture
def namespace() -> Iterator[str]:
    """A unique key namespace on the test Redis, deleted afterwards."""
    ns = "t" + uuid.uuid4().hex[:12]
    yield ns
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"holorec:{ns}:*", count=1000))
    if keys:
        r.delete(*keys)


@pytest.fixture(scope="session")
def counting_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this test process's own, for tests that count the commands a Redis has run (INFO commandstats):
    `make test` runs two test processes, and on the shared test Redis the other one's commands would count too."""
    server = RedisServer(tmp_path_factory.mktemp("counting-redis"))
    yield server.url
    server.kill()


@pytest.fixture
def server_factory(namespace: str) -> Iterator:
    """start(checkpoint, workers=1, **settings) -> a Service on the test Redis in this test's namespace."""
    servers: list[Service] = []

    def start(checkpoint: Path, workers: int = 1, **settings: object) -> Service:
        s = Service(checkpoint, REDIS_URL, namespace, workers=workers, **settings)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
