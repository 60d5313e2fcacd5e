"""The deployment files, read for the tests of them (test_compose.py, test_dashboard.py, test_dockerfile.py):
paths, and helpers that parse docker-compose.yml and the Dockerfile. Docker's engine is not needed."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy/grafana/provisioning"
DASHBOARD = ROOT / "deploy/grafana/dashboards/holorec.json"
# The settings compose must expose; all must be real Settings fields and set or passed by compose.
REQUIRED_SETTINGS = {"HOLOREC_CHECKPOINT", "HOLOREC_REDIS_URL", "HOLOREC_API_KEY", "HOLOREC_STATE_TTL_S", "HOLOREC_NAMESPACE", "HOLOREC_WORKERS"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict) -> dict[str, str | None]:
    """A compose service's environment, list or mapping form, as a dict (None: passed through from the shell)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {k: v for k, _, v in (e.partition("=") for e in env)} | {e: None for e in env if "=" not in e}
    return {k: None if v is None else str(v) for k, v in env.items()}


def command_text(cmd: str | list[str] | None) -> str:
    return cmd if isinstance(cmd, str) else " ".join(cmd or [])


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume in short syntax; source is a named volume or a ./path."""
    out = []
    for v in service.get("volumes", []):
        src, _, rest = v.partition(":")
        out.append((src, rest.split(":")[0]))
    return out


def dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Instructions as (KEYWORD, arguments) with continuations joined, and heredoc bodies by target path."""
    instructions, heredocs = [], {}
    lines = DOCKERFILE.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                continue
            line = line.rstrip()[:-1] + " " + nxt.strip()
        keyword, _, args = line.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        m = re.search(r"<<-?'?\"?(\w+)'?\"?\s*(\S*)", args)
        if m:  # a heredoc: the body runs until the delimiter line
            body = []
            while lines[i] != m.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            heredocs[m.group(2)] = "\n".join(body) + "\n"
    return instructions, heredocs
