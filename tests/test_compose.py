"""docker-compose.yml hangs together: its services, Redis's persistence, paths and volumes that exist, settings the
service reads; when a docker compose client is installed, `docker compose config` validates the file too."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from service.settings import Settings
from tests.deployfiles import COMPOSE, DOCKERFILE, REQUIRED_SETTINGS, ROOT, command_text, compose, env_of, mounts



def test_compose_services_and_redis_persistence():
    c = compose()
    assert {"redis", "holorec", "prometheus", "grafana"} <= set(c["services"])
    redis = c["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = command_text(redis.get("command"))
    assert re.search(r"--appendonly\s+yes", cmd) and re.search(r"--appendfsync\s+everysec", cmd), cmd
    data = [(src, dst) for src, dst in mounts(redis) if dst == "/data"]
    assert data and data[0][0] in (c.get("volumes") or {}), "redis keeps /data in a named volume"
    assert "redis-cli" in command_text(redis["healthcheck"]["test"]) and "ping" in command_text(redis["healthcheck"]["test"])


def test_compose_holorec_service():
    c = compose()
    svc = c["services"]["holorec"]
    assert svc["build"] in (".", {"context": "."})
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    env = env_of(svc)
    assert env["HOLOREC_REDIS_URL"] == "redis://redis:6379/0"
    assert REQUIRED_SETTINGS <= set(env), f"compose sets or passes through {sorted(REQUIRED_SETTINGS)}"
    assert any(str(p).split(":")[-1] == "8000" for p in svc["ports"])
    test = command_text(svc["healthcheck"]["test"])
    assert "127.0.0.1:8000/" in test and ("/readyz" in test or "/livez" in test)
    checkpoint_mounts = [src for src, dst in mounts(svc) if dst == env.get("HOLOREC_CHECKPOINT", "/checkpoint")]
    assert checkpoint_mounts, "the checkpoint directory is a volume"


def test_compose_paths_and_volumes_exist():
    c = compose()
    named = set(c.get("volumes") or {})
    for name, svc in c["services"].items():
        for src, _ in mounts(svc):
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name}: {src} is not in the repository"
            else:
                assert src in named, f"{name}: volume {src} is not declared"
    assert c["services"]["holorec"]["build"] in (".", {"context": "."}) and DOCKERFILE.is_file()


def test_settings_env_vars_are_ones_the_service_reads():
    fields = {f"HOLOREC_{name.upper()}" for name in Settings.model_fields}
    assert REQUIRED_SETTINGS <= fields, f"service/settings.py lacks {sorted(REQUIRED_SETTINGS - fields)}"
    for f in (COMPOSE, DOCKERFILE):
        used = set(re.findall(r"\bHOLOREC_[A-Z0-9_]+", f.read_text()))
        assert used <= fields, f"{f.name} uses {sorted(used - fields)}, which service/settings.py does not read"


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=10).returncode == 0:
        return [docker, "compose"]
    return [legacy] if (legacy := shutil.which("docker-compose")) else None


def test_compose_config_validates_with_the_docker_compose_client():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose / docker-compose client here; the YAML checks above still ran")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOREC_")}
    r = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
