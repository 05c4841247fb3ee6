"""On 2 CUDA GPUs: `--dp-size 2` puts one replica on each GPU, each replica answers with the
engine's tokens (float32: no bf16 near-tie flips), and both GPUs hold a model."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch

from tests.server_helpers import ServerProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

PROMPTS = ["The capital of France is", "Explain the water cycle in simple words. " * 20] * 4
FLAGS = ["--dtype", "float32", "--max-total-tokens", "65536", "--attention-backend", "torch"]


def test_two_replicas_on_two_gpus_give_the_engine_tokens(engines):
    engine = engines.get(dtype="float32", max_total_tokens=65536, attention_backend="torch")
    want = [o["output_ids"] for o in engine.generate(PROMPTS, {"max_new_tokens": 32, "temperature": 0})]
    del engine
    engines.close()
    torch.cuda.empty_cache()
    server = ServerProcess("--dp-size", "2", *FLAGS, env={"CUDA_VISIBLE_DEVICES": "0,1"}).start(timeout=600)
    try:
        with server.client() as client, cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            bodies = [
                {"text": p, "sampling_params": {"max_new_tokens": 32, "temperature": 0}} for p in PROMPTS
            ]
            got = list(pool.map(lambda b: client.post("/generate", json=b).json()["output_ids"], bodies))
        assert got == want
        info = httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"][0]
        replicas = [(r["gpus"], r["num_dispatched"]) for r in info["dp_replicas"]]
        assert replicas == [(["0"], len(PROMPTS) // 2), (["1"], len(PROMPTS) // 2)]
    finally:
        server.stop()
