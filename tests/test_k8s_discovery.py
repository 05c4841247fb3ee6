"""The router, started with the exact arguments of our rendered Deployment, discovers the pods our
manifests create: every prefill/decode leader (rank 0) with its HTTP port and, for prefill, the KV
bootstrap port from its annotation, and none of the non-leader ranks (they serve no HTTP).
The Kubernetes API is a stand-in that filters pods by label selector, as the API server does."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import pytest

from tests.k8s_helpers import K8S, render

router_launch = pytest.importorskip("disagg.router.launch")
discovery = pytest.importorskip("disagg.router.discovery")
from disagg.router.workers import Role  # noqa: E402


def _router_config(objs: list[dict]):
    deploy = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "disagg-router")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("$(POD_NAMESPACE)", deploy["metadata"]["namespace"]) for a in container["args"]]
    parser = argparse.ArgumentParser()
    router_launch.add_router_args(parser)
    return router_launch.config_from_args(parser.parse_args(args))


def _pod(name: str, ip: str, template: dict, extra_labels: dict[str, str]):
    meta = template["metadata"]
    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=name,
            namespace="disagg",
            labels={**meta.get("labels", {}), **extra_labels},
            annotations=meta.get("annotations", {}),
            deletion_timestamp=None,
        ),
        status=SimpleNamespace(
            pod_ip=ip, phase="Running", conditions=[SimpleNamespace(type="Ready", status="True")]
        ),
    )


def _lws_pods(objs: list[dict], replicas: int = 2) -> list:
    """The pods the LWS controller would create: per group a leader (worker-index 0) and size-1 workers."""
    pods, n = [], 0
    for lws in (o for o in objs if o["kind"] == "LeaderWorkerSet"):
        lwt, name = lws["spec"]["leaderWorkerTemplate"], lws["metadata"]["name"]
        for group in range(replicas):
            for index in range(max(2, lwt["size"])):  # at least one worker rank, even where size is 1
                n += 1
                template = lwt["leaderTemplate"] if index == 0 else lwt["workerTemplate"]
                pod_name = f"{name}-{group}" + (f"-{index}" if index else "")
                labels = {"leaderworkerset.sigs.k8s.io/worker-index": str(index)}
                pods.append(_pod(pod_name, f"10.0.0.{n}", template, labels))
    return pods


def _sts_pods(objs: list[dict]) -> list:
    pods, n = [], 100
    for sts in (o for o in objs if o["kind"] == "StatefulSet"):
        for index in range(max(2, sts["spec"]["replicas"])):  # as if NNODES were 2
            n += 1
            name = f"{sts['metadata']['name']}-{index}"
            pods.append(
                _pod(
                    name, f"10.0.0.{n}", sts["spec"]["template"], {"apps.kubernetes.io/pod-index": str(index)}
                )
            )
    return pods


class _Registry:
    def __init__(self):
        self.workers: dict[str, tuple[Role, int | None]] = {}

    def get(self, url):
        return self.workers.get(url)


class _State:
    def __init__(self):
        self.registry = _Registry()

    async def add_worker(self, url, role, bootstrap_port=None):
        self.registry.workers[url] = (role, bootstrap_port)


def _discover(config, pods) -> dict[str, tuple[Role, int | None]]:
    state = _State()
    d = discovery.PodDiscovery(config, state, api=object(), watch_factory=object)

    async def run():
        for role, labels in d.watches():
            # the API server's label-selector match on `selector_string(labels)`
            wanted = dict(pair.split("=", 1) for pair in discovery.selector_string(labels).split(","))
            for pod in pods:
                if all(pod.metadata.labels.get(k) == v for k, v in wanted.items()):
                    await d.apply("ADDED", pod, role)

    asyncio.run(run())
    return state.registry.workers


@pytest.mark.parametrize("overlay", ["lws", "rdma", "cpu-dev"])
def test_router_discovers_lws_leaders_only(overlay):
    objs = render(K8S / "overlays" / overlay)
    config = _router_config(objs)
    assert config.pd_disaggregation and config.service_discovery
    assert config.service_discovery_namespace == "disagg"
    pods = _lws_pods(objs, replicas=2)
    found = _discover(config, pods)
    leaders = {
        p.metadata.name: p
        for p in pods
        if p.metadata.labels["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    }
    expected = {
        f"http://{p.status.pod_ip}:30000": (Role.PREFILL if "prefill" in name else Role.DECODE,
                                            8998 if "prefill" in name else None)
        for name, p in leaders.items()
    }  # fmt: skip
    assert found == expected
    assert len(found) == 4  # 2 prefill + 2 decode servers; their worker ranks are not routed to


def test_router_discovers_statefulset_pod_zero_only():
    objs = render(K8S / "overlays" / "statefulset")
    pods = _sts_pods(objs)
    found = _discover(_router_config(objs), pods)
    zero = [p for p in pods if p.metadata.labels["apps.kubernetes.io/pod-index"] == "0"]
    assert sorted(found) == sorted(f"http://{p.status.pod_ip}:30000" for p in zero)
    assert sorted(found.values(), key=str) == [(Role.DECODE, None), (Role.PREFILL, 8998)]
