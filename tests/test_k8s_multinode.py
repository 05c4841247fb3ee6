"""One multi-node server exactly as the LWS manifests start it, on this machine: the leader's and the
workers' rendered arguments, with the LWS environment filled in (LWS_LEADER_ADDRESS = 127.0.0.1,
LWS_GROUP_SIZE = 3 "nodes" of one CPU rank each), answer a completion through the leader's HTTP port."""

from __future__ import annotations

import re
import signal
import sys
import time

import httpx
import pytest

from tests.k8s_helpers import K8S, entry_points, render
from tests.procs import Process, free_port, kill_group

NODES = 3  # the default model's 9 heads / 3 KV heads split 3 ways


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _stop(procs: list[Process]) -> None:
    for p in procs:  # all groups at once: the ranks of one server stop together
        kill_group(p.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        p.stop(signal.SIGTERM, grace=max(0.1, deadline - time.monotonic()))


def _run_group(role: str, default_model_path: str, tmp_path) -> str:
    script = f"launch_{role}"
    module, func = entry_points()[script].split(":")
    lws = next(o for o in render(K8S / "overlays" / "lws") if o["metadata"]["name"] == f"disagg-{role}")
    config = next(o for o in render(K8S / "overlays" / "lws") if o["kind"] == "ConfigMap")["data"]
    http, dist = free_port(), free_port()
    env = {**config, "MODEL_PATH": default_model_path, f"{role.upper()}_TP": str(NODES),
           "LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": str(NODES), "DIST_INIT_PORT": str(dist)}  # fmt: skip
    lwt = lws["spec"]["leaderWorkerTemplate"]
    procs = []
    try:
        for rank in range(NODES):
            template = lwt["leaderTemplate"] if rank == 0 else lwt["workerTemplate"]
            args = _expand(template["spec"]["containers"][0]["args"], {**env, "LWS_WORKER_INDEX": str(rank)})
            # on one host: loopback, free ports, a small KV pool, a short rendezvous timeout
            args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=30000", f"--port={http}")
                    for a in args if not a.startswith("--disaggregation-bootstrap-port")]  # fmt: skip
            args += ["--max-total-tokens=2048", "--dist-timeout=60"]
            if role == "prefill":
                args.append(f"--disaggregation-bootstrap-port={free_port()}")
            code = f"from {module} import {func}; {func}()"
            procs.append(
                Process([sys.executable, "-c", code, *args], log=tmp_path / f"{role}-rank{rank}.log").launch()
            )
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if any(p.proc.poll() is not None for p in procs):
                break
            try:
                if httpx.get(f"http://127.0.0.1:{http}/health", timeout=2).status_code == 200:
                    return f"http://127.0.0.1:{http}"
            except httpx.HTTPError:
                pass
            time.sleep(1)
        logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob(f"{role}-rank*.log")))
        raise AssertionError(f"the {NODES}-node {role} group did not come up:\n{logs}")
    finally:
        _stop(procs)


@pytest.mark.slow
def test_colocated_server_with_lws_style_args_forms_one_group(default_model_path, tmp_path):
    """The same leader/worker argument pattern (--dist-init-addr leader:port, --nnodes, --node-rank i)
    with launch_server: the group forms and the leader serves."""
    http, dist = free_port(), free_port()
    procs = []
    try:
        for rank in range(NODES):
            args = [f"--model-path={default_model_path}", f"--tp={NODES}", f"--nnodes={NODES}",
                    f"--node-rank={rank}", f"--dist-init-addr=127.0.0.1:{dist}", "--host=127.0.0.1",
                    f"--port={http}", "--max-total-tokens=2048", "--dist-timeout=60"]  # fmt: skip
            argv = [sys.executable, "-m", "disagg.common.server.launch_server", *args]
            procs.append(Process(argv, log=tmp_path / f"server-rank{rank}.log").launch())
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert all(p.proc.poll() is None for p in procs), "a rank exited"
            try:
                r = httpx.post(f"{url}/v1/completions", json={"prompt": "The capital of France is",
                               "max_tokens": 4, "temperature": 0}, timeout=30)  # fmt: skip
                if r.status_code == 200:
                    assert "Paris" in r.json()["choices"][0]["text"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail("the group did not serve")
    finally:
        _stop(procs)


@pytest.mark.slow
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_pd_server_group_from_rendered_lws_args(role, default_model_path, tmp_path):
    assert _run_group(role, default_model_path, tmp_path)
