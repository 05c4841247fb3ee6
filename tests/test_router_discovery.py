"""Kubernetes service discovery against a fake pod watch (no cluster): pods in, workers out."""

from __future__ import annotations

import asyncio
import queue

import pytest

kubernetes = pytest.importorskip("kubernetes")
from disagg.router.app import RouterState  # noqa: E402
from disagg.router.config import RouterConfig  # noqa: E402
from disagg.router.discovery import PodDiscovery  # noqa: E402
from disagg.router.workers import Role  # noqa: E402
from kubernetes.client import V1ObjectMeta, V1Pod, V1PodCondition, V1PodStatus  # noqa: E402


def pod(name: str, ip: str, labels: dict, ready: bool = True, annotations: dict | None = None) -> V1Pod:
    condition = V1PodCondition(type="Ready", status="True" if ready else "False")
    return V1Pod(
        metadata=V1ObjectMeta(name=name, namespace="serving", labels=labels, annotations=annotations),
        status=V1PodStatus(phase="Running", pod_ip=ip, conditions=[condition]),
    )


class FakeCoreV1Api:
    def list_namespaced_pod(self, namespace, **kwargs):  # only its name matters to the fake watch
        raise AssertionError("the fake watch never calls the API")

    def list_pod_for_all_namespaces(self, **kwargs):
        raise AssertionError("the fake watch never calls the API")


class FakeWatch:
    """Stands in for kubernetes.watch.Watch: events per label selector, pushed by the test."""

    queues: dict[str, queue.Queue] = {}
    calls: list[tuple[str, dict]] = []

    def stream(self, func, **kwargs):
        FakeWatch.calls.append((func.__name__, kwargs))
        q = FakeWatch.queues.setdefault(kwargs["label_selector"], queue.Queue())
        while True:
            try:
                yield q.get(timeout=0.05)
            except queue.Empty:
                return  # like a watch timing out: the loop watches again

    def stop(self):
        pass


def push(selector: str, event_type: str, p: V1Pod) -> None:
    FakeWatch.queues.setdefault(selector, queue.Queue()).put({"type": event_type, "object": p})


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "discovery did not catch up"
        await asyncio.sleep(0.02)


def test_pd_discovery_adds_ready_pods_with_bootstrap_port_and_removes_them():
    config = RouterConfig(
        pd_disaggregation=True,
        service_discovery=True,
        service_discovery_namespace="serving",
        prefill_selector={"app": "disagg", "role": "prefill"},
        decode_selector={"app": "disagg", "role": "decode"},
        service_discovery_port=30000,
    )
    prefill_sel, decode_sel = "app=disagg,role=prefill", "app=disagg,role=decode"

    async def scenario():
        state = RouterState(config)
        discovery = PodDiscovery(config, state, api=FakeCoreV1Api(), watch_factory=FakeWatch)
        task = asyncio.create_task(discovery.run())
        try:
            push(
                prefill_sel,
                "ADDED",
                pod("p-0", "10.0.0.1", {"role": "prefill"}, annotations={"sglang.ai/bootstrap-port": "8998"}),
            )
            push(prefill_sel, "ADDED", pod("p-1", "10.0.0.2", {"role": "prefill"}, ready=False))
            push(decode_sel, "ADDED", pod("d-0", "10.0.1.1", {"role": "decode"}))
            await wait_for(lambda: len(state.registry.all()) == 2)
            (p,) = state.registry.all(Role.PREFILL)
            (d,) = state.registry.all(Role.DECODE)
            assert (p.url, p.bootstrap_port) == ("http://10.0.0.1:30000", 8998)
            assert d.url == "http://10.0.1.1:30000"
            # the not-ready pod turns ready; then p-0 goes away
            push(prefill_sel, "MODIFIED", pod("p-1", "10.0.0.2", {"role": "prefill"}))
            await wait_for(lambda: len(state.registry.all(Role.PREFILL)) == 2)
            assert state.registry.get("http://10.0.0.2:30000").bootstrap_port is None
            push(prefill_sel, "DELETED", pod("p-0", "10.0.0.1", {"role": "prefill"}))
            await wait_for(lambda: state.registry.get("http://10.0.0.1:30000") is None)
            push(decode_sel, "MODIFIED", pod("d-0", "10.0.1.1", {"role": "decode"}, ready=False))
            await wait_for(lambda: not state.registry.all(Role.DECODE))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    selectors = {kwargs["label_selector"] for _, kwargs in FakeWatch.calls}
    assert selectors == {prefill_sel, decode_sel}
    assert all(name == "list_namespaced_pod" and kw["namespace"] == "serving" for name, kw in FakeWatch.calls)


def test_discovery_flags_are_checked():
    with pytest.raises(ValueError, match="--prefill-selector and --decode-selector"):
        RouterConfig(pd_disaggregation=True, service_discovery=True, prefill_selector={"a": "b"}).validate()
    with pytest.raises(ValueError, match="--selector"):
        RouterConfig(service_discovery=True).validate()
