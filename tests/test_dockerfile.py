"""The Dockerfile: its stages, user, healthcheck and CPU-only torch, the files it copies; and its entrypoint (a
heredoc in the Dockerfile) run for real with a stand-in `holorec` command."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib

import pytest

from tests.deployfiles import ROOT, dockerfile


def test_dockerfile_stages_user_healthcheck_and_cpu_torch():
    ins, _ = dockerfile()
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all(a.split()[0] == "python:3.11-slim" for a in froms)
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/livez" in health[0] and "urllib" in health[0]
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("torch"))
    torch_runs = [a for k, a in ins if k == "RUN" and re.search(r"pip install\b.*\btorch==", a)]
    assert len(torch_runs) == 1
    assert re.search(r"--index-url\s+https://download\.pytorch\.org/whl/cpu\b", torch_runs[0])
    assert pin.split(";")[0].split("#")[0].strip().replace(" ", "") in torch_runs[0].replace(" ", ""), \
        f"the image's torch is pyproject.toml's pin {pin!r}"
    assert any(k == "RUN" and re.search(r"pip install\b.*\s/src\b", a) for k, a in ins), "holorec itself: pip install ."
    assert any(k == "RUN" and re.search(r"apt-get install\b.*\bgcc\b", a) for k, a in ins), "a C compiler for model/native.c"
    assert any(k == "RUN" and "library()" in a for k, a in ins), "the build fails if model/native.c was not built"
    assert any(k == "EXPOSE" and "8000" in a.split() for k, a in ins)
    envs = " ".join(a for k, a in ins if k == "ENV")
    assert re.search(r"\bPROMETHEUS_MULTIPROC_DIR=/\S+", envs)
    assert re.search(r"\bHOLOREC_WORKERS=\d+", envs)
    assert any(k == "ARG" and a.split("=")[0] == "CHECKPOINT" for k, a in ins), "a checkpoint can be baked with --build-arg CHECKPOINT="


def test_dockerfile_copies_only_files_that_exist():
    ins, _ = dockerfile()
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for k, args in ins:
        if k not in ("COPY", "ADD") or "<<" in args:
            continue
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert src.rstrip("/").split("/")[0] not in ignored, f"COPY {src}: excluded by .dockerignore"


FAKE_HOLOREC = """#!/bin/sh
echo "$*" >> "$HOLOREC_TEST_LOG"
if [ "$1" = train ]; then
  while [ "$#" -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done
  mkdir -p "$out" && echo '{}' > "$out/checkpoint.json" && echo w > "$out/model.safetensors"
fi
"""


@pytest.fixture
def entrypoint(tmp_path):
    _, heredocs = dockerfile()
    script = heredocs["/usr/local/bin/holorec-entrypoint"]
    baked = tmp_path / "baked"
    (tmp_path / "entrypoint").write_text(script.replace("/opt/holorec/checkpoint", str(baked)))
    assert subprocess.run(["sh", "-n", str(tmp_path / "entrypoint")]).returncode == 0
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "holorec").write_text(FAKE_HOLOREC)
    (bindir / "holorec").chmod(0o755)
    ckpt, metrics_dir, log = tmp_path / "ckpt", tmp_path / "metrics", tmp_path / "log"
    ckpt.mkdir()
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOLOREC_CHECKPOINT": str(ckpt), "HOLOREC_WORKERS": "3",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "HOLOREC_TEST_LOG": str(log)}

    def run(*args: str) -> list[str]:
        log.write_text("")
        r = subprocess.run(["sh", str(tmp_path / "entrypoint"), *args], env=env, capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        return log.read_text().splitlines()

    return run, ckpt, baked, metrics_dir


def test_entrypoint_trains_a_demo_once_then_serves_it(entrypoint):
    run, ckpt, baked, metrics_dir = entrypoint
    metrics_dir.mkdir()
    (metrics_dir / "counter_123.db").write_text("stale")
    calls = run()
    assert calls[0] == f"train --data synthetic --model holomamba --epochs 3 --out {ckpt}/.demo-training"
    assert calls[1] == f"serve --checkpoint {ckpt} --host 0.0.0.0 --port 8000 --workers 3"
    assert sorted(p.name for p in ckpt.iterdir()) == [".holorec-demo", "checkpoint.json", "model.safetensors"]
    assert list(metrics_dir.iterdir()) == [], "stale multiprocess metric files are cleared"
    assert run() == [f"serve --checkpoint {ckpt} --host 0.0.0.0 --port 8000 --workers 3"], "trained once"


def test_entrypoint_prefers_mounted_then_baked_then_demo(entrypoint):
    run, ckpt, baked, _ = entrypoint
    baked.mkdir()
    (baked / "checkpoint.json").write_text("{}")
    assert run() == [f"serve --checkpoint {baked} --host 0.0.0.0 --port 8000 --workers 3"], "baked beats an empty volume"
    (ckpt / "checkpoint.json").write_text("{}")
    (ckpt / ".holorec-demo").write_text("")
    assert run()[0].startswith(f"serve --checkpoint {baked} "), "baked beats a demo trained earlier"
    (ckpt / ".holorec-demo").unlink()
    assert run()[0].startswith(f"serve --checkpoint {ckpt} "), "a mounted checkpoint beats the baked one"
    assert run("holorec", "evaluate", "/checkpoint") == ["evaluate /checkpoint"], "arguments run instead"
