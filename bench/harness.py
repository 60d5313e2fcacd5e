"""The real processes tests and benches run against, written once: free ports, readiness waits,
`redis-server` and Redis Cluster processes, the service under uvicorn, `holorec consume`, random-weight checkpoints,
/metrics read through prometheus_client's parser, and the machine a result was measured on.

Everything binds to loopback; every process started here is stopped by its `stop()` (or `with`).
"""
from __future__ import annotations

import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import redis
import redis.cluster

ROOT = Path(__file__).resolve().parent.parent


# --- ports and waiting ----------------------------------------------------------------------------
def free_port(span: int = 0) -> int:
    """A free loopback port; with span, port + span must be free too (the Redis Cluster bus port)."""
    for _ in range(200):
        port = random.randint(20000, 30000) if span else 0
        try:
            with socket.socket() as a:
                a.bind(("127.0.0.1", port))
                port = a.getsockname()[1]
                if span:
                    with socket.socket() as b:
                        b.bind(("127.0.0.1", port + span))
            return port
        except OSError:
            continue
    raise RuntimeError("no free loopback port")


def wait_for(what: str, ok: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll `ok` until it returns something true (exceptions count as not yet); -> that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = ok()
            if got:
                return got
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(step)
    raise TimeoutError(f"{what} not within {timeout:.0f} s")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH: these tests need real Redis binaries (Debian: apt-get install redis-server)")
    return path


# --- Redis ----------------------------------------------------------------------------------------
class RedisServer:
    """One `redis-server` on a loopback port, its data and log in `workdir`; restartable in place."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None) -> None:
        self.dir, self.args = Path(workdir), list(args)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self, wait: bool = True) -> None:
        cmd = [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--logfile", "redis.log", "--daemonize", "no", "--protected-mode", "yes", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:  # PING answers LOADING while an AOF is replayed: wait for a real PONG
            wait_for(f"redis-server on port {self.port}", lambda: self.proc.poll() is None and self.client().ping(), 20)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen one must be able to die
            self.proc.kill()
            self.proc.wait(10)

    stop = kill


class RedisClusterServers:
    """A Redis Cluster of `masters` primaries (no replicas) on loopback ports, made by redis-cli."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(masters):
                self.nodes.append(RedisServer(Path(workdir) / f"node{i}", "--cluster-enabled", "yes",
                                              "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                                              "--appendonly", "no", port=free_port(span=10000)))
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            out = subprocess.run([binary("redis-cli"), "--cluster", "create", *addrs, "--cluster-replicas", "0",
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            for n in self.nodes:
                wait_for("cluster_state:ok", lambda n=n: n.client().cluster("info")["cluster_state"] == "ok", 30)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


# --- the service ------------------------------------------------------------------------------------
def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET url/metrics -> {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a sample's values over every label set that includes `labels` (all workers summed)."""
    return sum(v for (n, ls), v in metrics(url).items() if n == name and set(labels.items()) <= set(ls))


def side_settings(pairs: list[list[str]]) -> list[dict[str, str]]:
    """`--set a|b NAME=VALUE` pairs of bench/ab_floor.py and bench/ab_load.py -> the settings of side a and side b."""
    sides: list[dict[str, str]] = [{}, {}]
    for side, pair in pairs:
        if side not in ("a", "b") or "=" not in pair:
            raise SystemExit(f"--set takes a or b and NAME=VALUE, got {side} {pair}")
        name, value = pair.split("=", 1)
        sides["ab".index(side)][name] = value
    return sides


def split_cpus() -> tuple[set[int], set[int]] | None:
    """A CPU for the service and another for the client timing it one request at a time; None with fewer than two.
    Left to the scheduler, the two share a CPU in some runs and not in others: on a 2-CPU VM, bench/ab_floor.py's two
    services answered GET /livez, the same code on both sides, in 0.107 and 0.177 ms in one run
    (bench/results/cpu-2026-12-07j-serve). Apart, as a client on another machine would be, every run measures the same."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else None


@contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """The calling thread (and processes it starts) on `cpus` meanwhile; None: as it is."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Service:
    """holorec's app under real uvicorn in a subprocess (its own process group), configured by HOLOREC_*
    variables: `settings` become HOLOREC_<NAME>. /metrics sums every worker (PROMETHEUS_MULTIPROC_DIR). `root`: the
    checkout whose service runs (bench/ab_floor.py runs two). `cpus`: the service's processes run on these only."""

    def __init__(self, checkpoint: Path, redis_url: str | None, namespace: str, *, workers: int = 1, log: Path | None = None,
                 wait: bool = True, root: Path = ROOT, cpus: set[int] | None = None, **settings: object) -> None:
        self.port, self.workers = free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = tempfile.mkdtemp(prefix="holorec-metrics-")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir, "HOLOREC_CHECKPOINT": str(checkpoint),
               "HOLOREC_NAMESPACE": namespace, **({"HOLOREC_REDIS_URL": redis_url} if redis_url else {}),
               **{f"HOLOREC_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}}
        cmd = [sys.executable, "-m", "uvicorn", "service.app:app_from_env", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(workers), "--log-level", "info",
               *([] if str(settings.get("access_log")).lower() in ("true", "1") else ["--no-access-log"])]  # log level and access log as `holorec serve` runs them
        self.log: IO[Any] | int = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        """Until /readyz answers 200 several times in a row (every worker up, not just the first)."""
        deadline, ok = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}")
            try:
                ok = ok + 1 if httpx.get(self.url + "/readyz", timeout=2).status_code == 200 else 0
            except httpx.HTTPError:
                ok = 0
            if ok >= (1 if self.workers == 1 else 3 * self.workers):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"service on {self.url} not ready within {timeout:.0f} s")

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not isinstance(self.log, int):
            self.log.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ConsumerProcess:
    """`holorec consume` in a subprocess, configured by HOLOREC_* variables."""

    def __init__(self, checkpoint: Path, redis_url: str, namespace: str, stream: str, group: str, name: str, *,
                 log: Path | None = None, metrics_port: int | None = None, **settings: object) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOLOREC_REDIS_URL": redis_url, "HOLOREC_NAMESPACE": namespace,
               "HOLOREC_THREADS": os.environ.get("HOLOREC_THREADS", "1"),
               **{f"HOLOREC_{k.upper()}": str(v) for k, v in settings.items()}}
        cmd = [sys.executable, "-m", "cli", "consume", "--checkpoint", str(checkpoint), "--stream", stream,
               "--group", group, "--consumer", name, *(["--metrics-port", str(metrics_port)] if metrics_port else [])]
        self.log: IO[Any] | int = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if not isinstance(self.log, int):
            self.log.close()


# --- checkpoints ------------------------------------------------------------------------------------
def make_checkpoint(path: Path, *, n_items: int = 40, n_attrs: int = 4, max_attrs: int = 2, model: str = "holomamba",
                    d_model: int = 16, max_len: int = 50, seed: int = 0, items: Sequence[str] | None = None, **config: int) -> Path:
    """Random (untrained) weights over items item-1..item-N (or these `items`) with attributes genre-1..genre-M: for
    everything that tests bookkeeping, bytes or speed rather than accuracy. `config`: other ModelConfig fields."""
    import torch

    from model import ModelConfig, build_model
    from model.checkpoint import Checkpoint, save

    names = list(items) if items is not None else [f"item-{i}" for i in range(1, n_items + 1)]
    n_items = len(names)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    attrs = torch.randint(1, n_attrs + 1, (n_items + 1, max_attrs), generator=g) if n_attrs else torch.zeros(n_items + 1, 0, dtype=torch.long)
    attrs[0] = 0
    cfg = ModelConfig(model=model, n_items=n_items, n_attrs=n_attrs, max_attrs=max_attrs if n_attrs else 0, d_model=d_model,
                      max_len=max_len, dropout=0.0, **config)
    save(Checkpoint(build_model(cfg, attrs).eval(), names,
                    [f"genre-{j}" for j in range(1, n_attrs + 1)], list(range(1, min(n_items, 100) + 1)),
                    {"dataset": "none: random weights"}), path)
    return path


# --- the machine --------------------------------------------------------------------------------------
def hardware(device: str = "cpu") -> dict[str, Any]:
    """CPU, cores, torch threads and version, load average: a result is only as quiet as its machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": device, "torch": torch.__version__, "python": platform.python_version(),
                          "load_average_at_start": os.getloadavg()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def command() -> str:
    """The command line as typed, with HOLOREC_THREADS if set."""
    env = f"HOLOREC_THREADS={os.environ['HOLOREC_THREADS']} " if os.environ.get("HOLOREC_THREADS") else ""
    prog = {"holorec": "holorec", "cli.py": "python -m cli"}.get(Path(sys.argv[0]).name, "python " + sys.argv[0])
    return env + " ".join([prog, *sys.argv[1:]])
