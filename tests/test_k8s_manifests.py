"""Every k8s/ overlay renders with kustomize and each object is valid against the Kubernetes schemas
(kubernetes-validate, strict) or the vendored CRD schemas (k8s/schemas/); and the wiring a user
relies on holds: the router discovers exactly the leaders, ranks find the rendezvous, the probes
hit the HTTP port, generated names resolve, every flag exists in our entry points."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s_helpers import K8S, assert_flags_accepted, flags_in, render

K8S_VERSION = "1.37.0"
OVERLAYS = ["lws", "statefulset", "cpu-dev", "rdma"]
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_v1_leaderworkerset.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.yaml",
}
# set by the LWS controller / kubelet in every LWS pod
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX", "LWS_NAME", "LWS_GROUP_INDEX"}


def _with_api_key(overlay: str, tmp_path: Path) -> Path:
    """An overlay plus the optional api-key component, as a user would compose them."""
    here = tmp_path / f"{overlay}-api-key"
    here.mkdir()
    rel = lambda p: os.path.relpath(p, here)  # noqa: E731  (kustomize wants relative paths)
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [rel(K8S / "overlays" / overlay)],
                "components": [rel(K8S / "components" / "api-key")],
            }
        )
    )
    return here


@pytest.fixture(scope="module", params=OVERLAYS + ["lws+api-key", "statefulset+api-key", "monitoring"])
def rendered(request, tmp_path_factory) -> tuple[str, list[dict]]:
    name = request.param
    if name == "monitoring":
        path = K8S / "monitoring"
    elif name.endswith("+api-key"):
        path = _with_api_key(name.split("+")[0], tmp_path_factory.mktemp("k"))
    else:
        path = K8S / "overlays" / name
    return name, render(path)


def _validate_k8s(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {str(e).splitlines()[0]}")


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(which, PodTemplateSpec) of a workload."""
    if obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        return [(w, lwt[w]) for w in ("leaderTemplate", "workerTemplate") if w in lwt]
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [("template", obj["spec"]["template"])]
    return []


def test_every_object_is_valid(rendered):
    name, objs = rendered
    assert objs, f"{name} rendered nothing"
    for obj in objs:
        schema_file = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema_file is None:
            _validate_k8s(obj)
            continue
        schema = yaml.safe_load((K8S / "schemas" / schema_file).read_text())
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
        assert not errors, f"{name}: {obj['kind']}/{obj['metadata']['name']}: {errors[0].message}"
        for which, template in _pod_templates(obj):  # LWS pod templates: full Kubernetes schema
            _validate_k8s({"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{obj['metadata']['name']}-{which.lower()}"},
                           "template": template})  # fmt: skip


def test_names_and_variables_resolve(rendered):
    """Generated ConfigMap names (hash suffix) reach every pod template, and every $(VAR) in the
    arguments is defined, so no pod starts with a literal `$(MODEL_PATH)`."""
    name, objs = rendered
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for obj in objs:
        assert obj["kind"] == "Namespace" or obj["metadata"].get("namespace") == "disagg", obj["metadata"]
        for which, template in _pod_templates(obj):
            for c in template["spec"]["containers"]:
                defined = {e["name"] for e in c.get("env", [])}
                for source in c.get("envFrom", []):
                    ref = source["configMapRef"]["name"]
                    assert ref in config_maps, (
                        f"{name}: {obj['metadata']['name']} refers to missing ConfigMap {ref}"
                    )
                    defined |= set(config_maps[ref])
                if obj["kind"] == "LeaderWorkerSet":
                    defined |= LWS_ENV
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(c.get("args", []))):
                    assert var in defined, f"{name}: {obj['metadata']['name']}/{which}: $({var}) is undefined"
                for secret in c.get("env", []):
                    ref = secret.get("valueFrom", {}).get("secretKeyRef")
                    assert ref is None or ref["name"] == "disagg-api-key"


def _objs(objs, kind, name=None):
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _arg(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _selector(args: list[str], flag: str) -> dict[str, str]:
    """The router's --prefill-selector/--decode-selector: the KEY=VALUE words after the flag, ANDed."""
    i = args.index(flag)
    words = []
    for a in args[i + 1 :]:
        if a.startswith("--"):
            break
        words.append(a)
    return dict(w.split("=", 1) for w in words)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", ["lws", "cpu-dev", "rdma"])
def test_lws_leader_and_workers_form_one_server(overlay):
    objs = render(K8S / "overlays" / overlay)
    router_args = _objs(objs, "Deployment", "disagg-router")[0]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    for role in ("prefill", "decode"):
        lws = _objs(objs, "LeaderWorkerSet", f"disagg-{role}")[0]
        leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
        la, wa = leader["spec"]["containers"][0]["args"], worker["spec"]["containers"][0]["args"]
        # rank 0 hosts the rendezvous at the leader's address; worker i joins as rank i
        assert _arg(la, "--node-rank") == "0" and _arg(wa, "--node-rank") == "$(LWS_WORKER_INDEX)"
        for args in (la, wa):
            assert _arg(args, "--dist-init-addr").startswith("$(LWS_LEADER_ADDRESS):")
            assert _arg(args, "--nnodes") == "$(LWS_GROUP_SIZE)"
        # the router finds leaders only (workers serve no HTTP)
        sel = _selector(router_args, f"--{role}-selector")
        assert _matches(sel, leader["metadata"]["labels"]) and not _matches(sel, worker["metadata"]["labels"])
        # probes hit the HTTP port the server listens on
        c = leader["spec"]["containers"][0]
        http = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
        assert int(_arg(la, "--port")) == http
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        # /dev/shm in RAM for NCCL
        dshm = {v["name"]: v for v in leader["spec"]["volumes"]}["dshm"]
        assert dshm["emptyDir"]["medium"] == "Memory"
        assert leader["spec"]["terminationGracePeriodSeconds"] >= 30
    prefill_leader = _objs(objs, "LeaderWorkerSet", "disagg-prefill")[0]["spec"]["leaderWorkerTemplate"][
        "leaderTemplate"
    ]
    # the router reads the KV bootstrap port from this annotation: it must be the port we serve
    assert prefill_leader["metadata"]["annotations"]["sglang.ai/bootstrap-port"] == _arg(
        prefill_leader["spec"]["containers"][0]["args"], "--disaggregation-bootstrap-port"
    )


def test_statefulset_variant_discovers_pod_zero_only():
    objs = render(K8S / "overlays" / "statefulset")
    assert not _objs(objs, "LeaderWorkerSet")
    router_args = _objs(objs, "Deployment", "disagg-router")[0]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    config = _objs(objs, "ConfigMap")[0]["data"]
    for role in ("prefill", "decode"):
        sts = _objs(objs, "StatefulSet", f"disagg-{role}")[0]
        svc = _objs(objs, "Service", f"disagg-{role}")[0]
        assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["replicas"] == int(config["NNODES"])
        labels = sts["spec"]["template"]["metadata"]["labels"]
        sel = _selector(router_args, f"--{role}-selector")
        # the StatefulSet controller adds the pod-index label to each pod
        assert _matches(sel, {**labels, "apps.kubernetes.io/pod-index": "0"})
        assert not _matches(sel, {**labels, "apps.kubernetes.io/pod-index": "1"})
        args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        assert _arg(args, "--node-rank") == "$(POD_INDEX)"
        assert _arg(args, "--dist-init-addr").startswith(f"disagg-{role}-0.disagg-{role}.")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_fits_in_the_termination_grace_period(overlay):
    """preStop sleep + the process's own drain time end before Kubernetes sends SIGKILL."""
    for obj in render(K8S / "overlays" / overlay):
        for which, template in _pod_templates(obj):
            c = template["spec"]["containers"][0]
            drain = _arg(c["args"], "--grace-period") or _arg(c["args"], "--shutdown-grace-period-secs")
            if drain is None:  # non-leader ranks: no HTTP to drain
                continue
            pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
            assert float(drain) + pre_stop < template["spec"]["terminationGracePeriodSeconds"], (
                obj["kind"],
                which,
            )


def test_gpus_match_tensor_parallel_size():
    objs = render(K8S / "overlays" / "lws")
    config = _objs(objs, "ConfigMap")[0]["data"]
    for role in ("prefill", "decode"):
        lwt = _objs(objs, "LeaderWorkerSet", f"disagg-{role}")[0]["spec"]["leaderWorkerTemplate"]
        gpus = int(lwt["leaderTemplate"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert lwt["size"] * gpus == int(config[f"{role.upper()}_TP"])


def test_cpu_dev_needs_no_gpu_and_no_volume_claim():
    objs = render(K8S / "overlays" / "cpu-dev")
    text = yaml.safe_dump_all(objs)
    assert "nvidia.com/gpu" not in text and "persistentVolumeClaim" not in text
    assert not _objs(objs, "PersistentVolumeClaim")
    for lws in _objs(objs, "LeaderWorkerSet"):
        assert lws["spec"]["leaderWorkerTemplate"]["size"] == 1


def test_rdma_overlay_uses_host_network_and_ib_devices():
    objs = render(K8S / "overlays" / "rdma")
    config = _objs(objs, "ConfigMap")[0]["data"]
    assert config["IB_DEVICES"].startswith("mlx5_") and config["NCCL_IB_DISABLE"] == "0"
    for lws in _objs(objs, "LeaderWorkerSet"):
        for which in ("leaderTemplate", "workerTemplate"):
            spec = lws["spec"]["leaderWorkerTemplate"][which]["spec"]
            assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
            c = spec["containers"][0]
            assert _arg(c["args"], "--disaggregation-ib-device") == "$(IB_DEVICES)"
            assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]


def test_router_may_list_and_watch_pods():
    objs = render(K8S / "overlays" / "lws")
    role = _objs(objs, "Role", "disagg-router")[0]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    binding = _objs(objs, "RoleBinding", "disagg-router")[0]
    assert binding["subjects"][0] == {
        "kind": "ServiceAccount",
        "name": "disagg-router",
        "namespace": "disagg",
    }
    pod = _objs(objs, "Deployment", "disagg-router")[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "disagg-router"


def test_monitors_select_the_scraped_pods():
    objs = render(K8S / "overlays" / "lws")
    monitoring = render(K8S / "monitoring")
    for role in ("prefill", "decode"):
        pm = _objs(monitoring, "PodMonitor", f"disagg-{role}")[0]
        leader = _objs(objs, "LeaderWorkerSet", f"disagg-{role}")[0]["spec"]["leaderWorkerTemplate"][
            "leaderTemplate"
        ]
        assert _matches(pm["spec"]["selector"]["matchLabels"], leader["metadata"]["labels"])
        ports = {p["name"] for p in leader["spec"]["containers"][0]["ports"]}
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports
    sm = _objs(monitoring, "ServiceMonitor", "disagg-router")[0]
    svc = _objs(objs, "Service", "disagg-router")[0]
    assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    dashboard = _objs(monitoring, "ConfigMap", "disagg-grafana-dashboard")[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.slow
def test_every_flag_exists_in_our_entry_points(tmp_path):
    """All flags in all overlays (api-key included) are accepted by launch_router/prefill/decode."""
    seen: dict[str, list[str]] = {}
    for overlay in ["lws+api-key", "statefulset+api-key", "rdma"]:
        path = (
            _with_api_key(overlay.split("+")[0], tmp_path) if "+" in overlay else K8S / "overlays" / overlay
        )
        for obj in render(path):
            for _, template in _pod_templates(obj):
                for c in template["spec"]["containers"]:
                    seen.setdefault(c["command"][0], []).extend(flags_in(c.get("args", [])))
    assert set(seen) == {"launch_router", "launch_prefill", "launch_decode"}
    for script, flags in seen.items():
        assert_flags_accepted(script, flags)


def test_image_recipe_copies_every_package():
    """k8s/Dockerfile installs the project from the copied folders: a package folder missing from
    its COPY lines (or from Dockerfile.dockerignore's allow list) would break the image."""
    import tomllib

    with open(K8S.parent / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    folders = {p.split(".")[1] for p in packages}  # disagg.common.engine lives in common/engine
    dockerfile = (K8S / "Dockerfile").read_text()
    ignore = (K8S / "Dockerfile.dockerignore").read_text().split()
    for folder in folders:
        assert f"COPY {folder} ./{folder}" in dockerfile, folder
        assert f"!{folder}/" in ignore, folder


def test_validation_rejects_broken_manifests():
    """The checks above have teeth: a misspelt LWS field, a bad enum, a bad pod template fail."""
    lws = _objs(render(K8S / "overlays" / "cpu-dev"), "LeaderWorkerSet")[0]
    schema = yaml.safe_load((K8S / "schemas" / CRD_SCHEMAS[(lws["apiVersion"], lws["kind"])]).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(lws))
    typo = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplat": {}}}
    bad_policy = yaml.safe_load(yaml.safe_dump(lws))
    bad_policy["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    assert list(validator.iter_errors(typo)) and list(validator.iter_errors(bad_policy))
    template = yaml.safe_load(yaml.safe_dump(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]))
    template["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template},
            K8S_VERSION,
            strict=True,
        )
