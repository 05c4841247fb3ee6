"""The Grafana dashboard imports (structure, unique ids, datasource variables), is up to date with
its generator, and every metric its queries use is exported by our real router, prefill and decode
processes (a live /metrics scrape of the SLURM script's cluster run on this machine)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s_helpers import K8S, entry_points

MONITORING = K8S / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana" / "disagg-dashboard.json").read_text())
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: ours all start with disagg_ and no label name does."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\bdisagg_[A-Za-z0-9_:]*", without_strings))


def test_dashboard_json_is_generated_from_dashboard_py():
    generator = _load(MONITORING / "dashboard.py", "disagg_dashboard")
    assert generator.render_json() == (MONITORING / "grafana" / "disagg-dashboard.json").read_text(), (
        "stale dashboard JSON: run python k8s/monitoring/dashboard.py"
    )


def test_dashboard_imports_into_grafana():
    d = DASHBOARD
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels overlap on the grid
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= set(variables) | GRAFANA_BUILTINS, (
                f"{p['title']}: undefined {used - set(variables)}"
            )
            assert t["expr"].count("(") == t["expr"].count(")") and metric_names(t["expr"]), t["expr"]


def test_dashboard_covers_what_operators_watch():
    exprs = " ".join(e for _, e in _targets())
    for needed in (
        "disagg_router_requests_total",  # request rate
        "disagg_time_to_first_token_seconds_bucket",  # TTFT percentiles
        "disagg_inter_token_latency_seconds_bucket",
        "disagg_e2e_request_latency_seconds_bucket",
        "disagg_generation_tokens_total",  # tokens/s
        "disagg_queue_requests",  # queue per stage
        "disagg_kv_usage_ratio",
        "disagg_prefix_cache_hit_rate",
        "disagg_kv_transfer_bytes_total",  # GB/s
        "disagg_kv_transfer_failures_total",
        "disagg_router_retries_total",
        "disagg_router_worker_errors_total",
        "disagg_router_circuit_breaker_state",
    ):
        assert needed in exprs, needed
    assert "by (le, role)" in exprs and "role, pod" in exprs  # by role and by pod


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_every_query_parses_as_promql(tmp_path):
    """promtool parses each expression as a recording rule (Grafana variables substituted)."""
    rules = [
        {
            "record": f"disagg:panel_{i}",
            "expr": e.replace("$namespace", ".*").replace("$__rate_interval", "1m"),
        }
        for i, (_, e) in enumerate(_targets())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exported_names(exposition: str) -> set[str]:
    """Every series name a scrape can yield: counters' _total, histograms' _bucket/_sum/_count, etc."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, []))
        names.update(s.name for s in family.samples)
    return names


def test_metric_name_extraction():
    expr = 'sum by (role) (rate(disagg_a_total{namespace=~"$namespace",x="disagg_not"}[1m])) / 1e9'
    assert metric_names(expr) == {"disagg_a_total"}
    text = "# TYPE disagg_h histogram\n# TYPE disagg_c counter\n# TYPE disagg_g gauge\n"
    assert {"disagg_h_bucket", "disagg_c_total", "disagg_g"} <= exported_names(text)


@pytest.fixture(scope="module")
def pd_cluster(tmp_path_factory):
    missing = [s for s in ("launch_prefill", "launch_decode", "launch_router") if s not in entry_points()]
    if missing:
        pytest.skip(f"entry points {missing} are not in pyproject.toml yet")
    local_cluster = _load(K8S / "slurm" / "local_cluster.py", "disagg_local_cluster")
    cluster = local_cluster.LocalPDCluster(tmp_path_factory.mktemp("pd"))
    cluster.start(timeout=420)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_script_cluster_serves_and_every_dashboard_metric_is_exported(pd_cluster):
    """The SLURM script's prefill + decode + router answer a chat request; then each metric the
    dashboard queries is in the /metrics of at least one of the three processes."""
    router = pd_cluster.url("router")
    for i in range(3):  # a little traffic, so labelled series exist
        r = httpx.post(
            f"{router}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    exported = set()
    for name in ("router", "prefill", "decode"):
        r = httpx.get(pd_cluster.url(name) + "/metrics", timeout=30)
        assert r.status_code == 200
        exported |= exported_names(r.text)
    queried = {m for _, e in _targets() for m in metric_names(e)}
    missing = sorted(queried - exported)
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"
