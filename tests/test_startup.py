"""`holorec serve` at start-up: a bad setting, a taken port or a silent Redis each get one clear line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from bench.harness import ROOT, free_port, wait_for

HOLOREC = str(Path(sys.executable).parent / "holorec")


def serve(ckpt: Path, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOLOREC, "serve", "--checkpoint", str(ckpt), "--port", str(port)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HOLOREC_THREADS": "1", **env})


def test_a_redis_url_without_scheme_names_the_variable(ckpt_dir: Path) -> None:
    r = serve(ckpt_dir, free_port(), HOLOREC_REDIS_URL="127.0.0.1:6379")
    assert r.returncode == 2 and "serving" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("holorec serve: HOLOREC_REDIS_URL: ") and "redis://127.0.0.1:6379" in lines[0]


def test_a_taken_port_fails_in_one_line_before_the_banner(ckpt_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = serve(ckpt_dir, port)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"holorec serve: cannot listen on 127.0.0.1:{port}: Address already in use (choose another with --port)"


def test_an_unreachable_redis_is_warned_about_at_start(ckpt_dir: Path, tmp_path: Path) -> None:
    """And HOLOREC_ACCESS_LOG=true turns uvicorn's access log on (off by default: tests/test_service.py's curl test)."""
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "HOLOREC_THREADS": "1", "HOLOREC_REDIS_URL": "redis://127.0.0.1:1/0", "HOLOREC_STORE_TIMEOUT_S": "0.2",
           "HOLOREC_ACCESS_LOG": "true"}
    with open(log, "w") as out:
        proc = subprocess.Popen([HOLOREC, "serve", "--checkpoint", str(ckpt_dir), "--port", str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("/livez answering (or the server gone)",  # /readyz, below, is what the test checks
                 lambda: proc.poll() is not None or httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200, 60, 0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503
        text = log.read_text()
        assert "127.0.0.1:1/0 is not answering (HOLOREC_REDIS_URL)" in text
        assert text.index("not answering") < text.index("holorec ready")
        assert "one event's step: C (model/native.c), top-k: C (model/native.c)" in text  # the start-up log says which paths serve
        assert '"GET /readyz HTTP/1.1" 503' in text
    finally:
        proc.terminate()
        proc.wait(10)
