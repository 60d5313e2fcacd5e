"""deploy/prometheus and deploy/grafana hang together with the compose file and the service: the scrape target,
the provisioned datasource and dashboard, and every dashboard query naming only metrics and labels the service
exports (tests/test_dashboard_prometheus.py runs the queries against a real Prometheus)."""
from __future__ import annotations

import json
import re

import yaml
from prometheus_client.metrics import MetricWrapperBase

import service.metrics
from tests.deployfiles import DASHBOARD, GRAFANA_PROVISIONING, PROMETHEUS, compose, env_of, mounts

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
