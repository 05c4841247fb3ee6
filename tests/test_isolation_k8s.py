"""k8s/monitoring works with the api-key component: the policy is that /metrics (like /health) needs
no key on the servers and the router, so the rendered ServiceMonitor/PodMonitors and the plain
Prometheus config scrape without credentials, and they reach exactly the pods that serve HTTP in
an overlay composed with the api-key component (those pods do require the key elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.k8s_helpers import K8S, render

AUTH_FIELDS = {"authorization", "bearerTokenSecret", "bearerTokenFile", "basicAuth", "oauth2", "bearer_token"}


def _with_api_key(overlay: str, tmp_path: Path) -> list[dict]:
    here = tmp_path / f"{overlay}-api-key"
    here.mkdir()
    rel = lambda p: os.path.relpath(p, here)  # noqa: E731  (kustomize wants relative paths)
    kustomization = {
        "resources": [rel(K8S / "overlays" / overlay)],
        "components": [rel(K8S / "components" / "api-key")],
    }
    (here / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(here)


def _pods(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(pod labels, container) of every HTTP-serving container (leaders only: workers serve no HTTP)."""
    out = []
    for obj in objs:
        spec = obj.get("spec", {})
        if obj["kind"] == "LeaderWorkerSet":
            templates = [spec["leaderWorkerTemplate"]["leaderTemplate"]]
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            templates = [spec["template"]]
        else:
            continue
        for t in templates:
            for c in t["spec"]["containers"]:
                if any(p.get("name") == "http" for p in c.get("ports", [])):
                    out.append((t["metadata"].get("labels", {}), c))
    return out


def _selected(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _no_credentials(node) -> None:
    if isinstance(node, dict):
        assert not AUTH_FIELDS & set(node), f"scrape config carries credentials: {node}"
        for v in node.values():
            _no_credentials(v)
    elif isinstance(node, list):
        for v in node:
            _no_credentials(v)


@pytest.mark.parametrize("overlay", ["lws", "statefulset"])
def test_monitors_scrape_the_api_key_deployment_without_credentials(overlay, tmp_path):
    from disagg.common.server.http_server import OPEN_PATHS

    assert {"/health", "/metrics"} <= OPEN_PATHS  # the policy the manifests rely on
    objs = _with_api_key(overlay, tmp_path)
    pods = _pods(objs)
    assert {labels.get("app.kubernetes.io/component") for labels, _ in pods} == {
        "router",
        "prefill",
        "decode",
    }
    for _, container in pods:  # the component is in effect: every HTTP server checks a key
        assert "--api-key=$(API_KEY)" in container.get("args", []), container["name"]
    monitors = render(K8S / "monitoring")
    _no_credentials(monitors)
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for mon in (m for m in monitors if m["kind"] in ("ServiceMonitor", "PodMonitor")):
        endpoints = mon["spec"].get("endpoints") or mon["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics")]
        if mon["kind"] == "PodMonitor":
            targets = [c for labels, c in pods if _selected(mon["spec"]["selector"], labels)]
        else:  # through the Service whose labels match, to the pods it selects
            svcs = [
                s
                for s in services.values()
                if _selected(mon["spec"]["selector"], s["metadata"].get("labels", {}))
            ]
            assert svcs and all(any(p.get("name") == "http" for p in s["spec"]["ports"]) for s in svcs)
            targets = [
                c
                for labels, c in pods
                for s in svcs
                if _selected({"matchLabels": s["spec"]["selector"]}, labels)
            ]
        assert targets, f"{mon['metadata']['name']} selects no HTTP-serving pod"


def test_plain_prometheus_config_scrapes_without_credentials():
    config = yaml.safe_load((K8S / "monitoring" / "prometheus.yml").read_text())
    _no_credentials(config)
    assert {job["metrics_path"] for job in config["scrape_configs"]} == {"/metrics"}
