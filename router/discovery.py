"""Kubernetes service discovery (--service-discovery): watch pods by label selector, register the
ready ones as workers (http://POD_IP:--service-discovery-port), drop them when they stop being ready.

In PD mode pods matching --prefill-selector become prefill workers (bootstrap port from the pod
annotation --bootstrap-port-annotation, default `sglang.ai/bootstrap-port`) and pods matching
--decode-selector decode workers; otherwise pods matching --selector are regular workers.
The official `kubernetes` client is synchronous: each watch runs in a thread and hands events to
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from disagg.router.workers import Role

logger = logging.getLogger("disagg.router")


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def pod_is_ready(pod) -> bool:
    status = pod.status
    if pod.metadata.deletion_timestamp is not None or status is None or not status.pod_ip:
        return False
    if status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())


class PodDiscovery:
    def __init__(self, config, state, api=None, watch_factory=None):
        self.config = config
        self.state = state  # RouterState: add_worker(), registry
        self._api = api
        self._watch_factory = watch_factory
        self.pods: dict[str, str] = {}  # "namespace/name" -> worker URL registered for it
        self._stop = threading.Event()

    def watches(self) -> list[tuple[Role, dict[str, str]]]:
        c = self.config
        if c.pd_disaggregation:
            return [(Role.PREFILL, c.prefill_selector), (Role.DECODE, c.decode_selector)]
        return [(Role.REGULAR, c.selector)]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        api, watch_factory = self._client()
        threads = [
            threading.Thread(
                target=self._watch_loop,
                args=(loop, api, watch_factory, role, labels),
                name=f"k8s-watch-{role.value}",
                daemon=True,
            )
            for role, labels in self.watches()
        ]
        for t in threads:
            t.start()
        try:
            await asyncio.Event().wait()  # until cancelled by the router's shutdown
        finally:
            self._stop.set()

    def _client(self):
        if self._api is not None:
            return self._api, self._watch_factory
        from kubernetes import client, config, watch

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.CoreV1Api(), watch.Watch

    def _watch_loop(self, loop, api, watch_factory, role: Role, labels: dict[str, str]) -> None:
        namespace = self.config.service_discovery_namespace
        kwargs = {"label_selector": selector_string(labels), "timeout_seconds": 300}
        while not self._stop.is_set():
            try:
                w = watch_factory()
                if namespace:
                    stream = w.stream(api.list_namespaced_pod, namespace=namespace, **kwargs)
                else:
                    stream = w.stream(api.list_pod_for_all_namespaces, **kwargs)
                for event in stream:
                    if self._stop.is_set():
                        w.stop()
                        return
                    loop.call_soon_threadsafe(self._apply_soon, event["type"], event["object"], role)
            except Exception as exc:  # API hiccups: log, wait, watch again
                logger.warning("kubernetes pod watch (%s) failed: %s; retrying", role.value, exc)
                time.sleep(2.0)

    def _apply_soon(self, event_type: str, pod, role: Role) -> None:
        task = asyncio.ensure_future(self.apply(event_type, pod, role))
        task.add_done_callback(
            lambda t: (
                t.cancelled() or t.exception() and logger.warning("discovery event failed: %s", t.exception())
            )
        )

    async def apply(self, event_type: str, pod, role: Role) -> None:
        """Register or drop the worker behind one pod event (ADDED / MODIFIED / DELETED)."""
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        ready = event_type != "DELETED" and pod_is_ready(pod)
        url = self.pods.get(key)
        if url is not None and not ready:
            del self.pods[key]
            if self.state.registry.get(url) is not None:
                logger.info("discovery: removing %s (%s)", url, key)
                self.state.registry.remove(url)
        elif url is None and ready:
            url = f"http://{pod.status.pod_ip}:{self.config.service_discovery_port}"
            self.pods[key] = url
            if self.state.registry.get(url) is None:
                logger.info("discovery: adding %s worker %s (%s)", role.value, url, key)
                await self.state.add_worker(
                    url, role, self._bootstrap_port(pod) if role is Role.PREFILL else None
                )

    def _bootstrap_port(self, pod) -> int | None:
        value = (pod.metadata.annotations or {}).get(self.config.bootstrap_port_annotation)
        try:
            return int(value) if value not in (None, "", "none") else None
        except ValueError:
            logger.warning(
                "pod %s: annotation %s=%r is not a port",
                pod.metadata.name,
                self.config.bootstrap_port_annotation,
                value,
            )
            return None
