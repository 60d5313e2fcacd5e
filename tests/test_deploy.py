"""The deployment files hang together: Dockerfile, docker-compose.yml, deploy/prometheus, deploy/grafana.

Docker's engine is not needed: the files are parsed and cross-checked against each other and against the
service itself (the HOLOREC_* settings it reads, the metric names it exports). The container entrypoint,
a heredoc in the Dockerfile, is run with a stand-in `holorec` command. When a docker compose client is
installed, `docker compose config` validates the compose file too.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import service.metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy/grafana/provisioning"
DASHBOARD = ROOT / "deploy/grafana/dashboards/holorec.json"
# The settings compose must expose; all must be real Settings fields and set or passed by compose.
REQUIRED_SETTINGS = {"HOLOREC_CHECKPOINT", "HOLOREC_REDIS_URL", "HOLOREC_API_KEY", "HOLOREC_STATE_TTL_S", "HOLOREC_NAMESPACE", "HOLOREC_WORKERS"}


# ---------------------------------------------------------------------------------------------------
# helpers


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


def exported_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series name service/metrics.py exports -> (type, label names), from its metric objects."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"],
                "gauge": [""], "info": ["_info"]}
    out = {}
    for obj in vars(service.metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        family = obj.describe()[0]
        labels = frozenset(obj._labelnames)  # prometheus_client has no public accessor for a parent's label names
        for suffix in suffixes[family.type]:
            series = family.name + suffix
            out[series] = (family.type, labels | ({"le"} if suffix == "_bucket" else set()))
    return out


PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "delta", "deriv", "exp", "floor", "histogram_quantile", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "ln", "log2", "log10", "max_over_time", "min_over_time",
    "predict_linear", "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc",
    "sqrt", "stddev_over_time", "sum_over_time", "time", "timestamp", "vector",
    # aggregation operators
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
LABEL_LISTS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses. Grafana's $variables live in [] and "" and go with them."""
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(LABEL_LISTS, expr):
        labels |= {x.strip() for x in body.split(",") if x.strip()}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(LABEL_LISTS, " ", bare)
    metrics = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", bare):
        name, is_call = m.group(1), m.group(2)
        if is_call:
            assert name in PROMQL_FUNCTIONS, f"{name}() is not a PromQL function (in {expr!r})"
        elif name.lower() not in PROMQL_KEYWORDS:
            metrics.add(name)
    return metrics, labels


def dashboard_queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query in the dashboard, rows' nested panels included."""
    out = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"], t.get("legendFormat", "")))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return out


def check_promql_extraction() -> None:
    """The PromQL name extraction itself, on the shapes the dashboard uses."""
    assert promql_names('histogram_quantile(0.99, sum by (le, route) (rate(x_bucket{route=~"$route"}[$__rate_interval])))') == (
        {"x_bucket"}, {"le", "route"})
    assert promql_names('sum(rate(a_total[5m])) / clamp_min(sum(b_count{status=~"5.."}) by (job), 1e-9)') == (
        {"a_total", "b_count"}, {"status", "job"})


# ---------------------------------------------------------------------------------------------------
# docker-compose.yml


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


# ---------------------------------------------------------------------------------------------------
# Prometheus and Grafana


def test_prometheus_scrapes_holorec_metrics():
    c = compose()
    prom_svc = c["services"]["prometheus"]
    assert ("./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml") in mounts(prom_svc)
    assert any(str(p).startswith("9090") for p in prom_svc["ports"])
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = [j for j in cfg["scrape_configs"] if any(t == "holorec:8000" for sc in j.get("static_configs", []) for t in sc["targets"])]
    assert len(jobs) == 1, "one job scrapes the compose service holorec on its port 8000"
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", cfg.get("global", {}).get("scrape_interval")) == "5s"


def test_grafana_provisioning():
    c = compose()
    graf = c["services"]["grafana"]
    env = env_of(graf)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert any(str(p).startswith("3000") for p in graf["ports"])
    targets = {src: dst for src, dst in mounts(graf)}
    assert targets["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = targets["./deploy/grafana/dashboards"]

    ds_files = sorted((GRAFANA_PROVISIONING / "datasources").glob("*.yml"))
    assert ds_files
    datasources = [d for f in ds_files for d in yaml.safe_load(f.read_text())["datasources"]]
    prom = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["uid"] and prom[0]["url"] == "http://prometheus:9090"

    db_files = sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.yml"))
    assert db_files
    providers = [p for f in db_files for p in yaml.safe_load(f.read_text())["providers"]]
    assert any(p["type"] == "file" and p["options"]["path"] == dash_dir for p in providers), \
        "a file provider reads the folder compose mounts deploy/grafana/dashboards at"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home == f"{dash_dir}/{DASHBOARD.name}"


def test_dashboard_parses_and_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "holorec" and dash["uid"]
    uid = next(d["uid"] for f in (GRAFANA_PROVISIONING / "datasources").glob("*.yml")
               for d in yaml.safe_load(f.read_text())["datasources"] if d["type"] == "prometheus")

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                assert node["datasource"]["uid"] == uid, f"datasource {node['datasource']} is not the provisioned one"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert len(dashboard_queries(dash)) >= 12


def test_dashboard_uses_only_metrics_the_service_exports():
    check_promql_extraction()
    exported = exported_metrics()
    assert "holorec_http_request_duration_seconds_bucket" in exported and "holorec_events_total" in exported
    dash = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dash)
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        for metric, label in re.findall(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", q):
            queries.append((f"variable {var['name']}", f'{metric}{{{label}=""}}', ""))
    used = set()
    for title, expr, legend in queries:
        metrics, labels = promql_names(expr)
        assert metrics, f"{title}: no metric in {expr!r}"
        unknown = metrics - set(exported)
        assert not unknown, f"{title}: {sorted(unknown)} not exported by service/metrics.py (in {expr!r})"
        known_labels = set().union(*(exported[m][1] for m in metrics)) | {"job", "instance"}
        assert labels <= known_labels, f"{title}: labels {sorted(labels - known_labels)} are on none of {sorted(metrics)}"
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert legend_labels <= known_labels, f"{title}: legend {legend!r} names a label the series lack"
        used |= metrics
    # and the other way round: every metric the service defines is on the dashboard somewhere
    families = {re.sub(r"_(total|bucket|sum|count)$", "", s) if exported[s][0] in ("counter", "histogram") else s for s in exported}
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert shown == families, f"metrics with no panel: {sorted(families - shown)}"


# ---------------------------------------------------------------------------------------------------
# Dockerfile


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


# ---------------------------------------------------------------------------------------------------
# the entrypoint, run for real with a stand-in `holorec`

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
