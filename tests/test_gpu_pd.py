"""On 2 CUDA GPUs: launch_local puts prefill on one and decode on the other, KV moves GPU to GPU,
and the answers are the colocated engine's (float32 on both sides: no bf16 near-tie flips)."""

from __future__ import annotations

import signal
import sys

import httpx
import pytest
import torch

from tests.procs import Process, free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

PROMPTS = ["The capital of France is", "Explain the water cycle in simple words. " * 20]


def test_pd_on_two_gpus_gives_the_engine_tokens(engines):
    server_flags = ["--dtype", "float32", "--max-total-tokens", "65536", "--attention-backend", "torch"]
    engine = engines.get(dtype="float32", max_total_tokens=65536, attention_backend="torch")
    want = [o["output_ids"] for o in engine.generate(PROMPTS, {"max_new_tokens": 32, "temperature": 0})]
    del engine
    engines.close()
    torch.cuda.empty_cache()
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "disagg.common.server.launch_local",
        "--port",
        str(port),
        "--",
        *server_flags,
    ]
    launcher = Process(cmd, env={"CUDA_VISIBLE_DEVICES": "0,1"}, pipe=True).launch()
    try:
        launcher.wait_for_line("ready", timeout=600)
        url = f"http://127.0.0.1:{port}"
        for prompt, ids in zip(PROMPTS, want, strict=True):
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 32, "temperature": 0}}
            assert httpx.post(url + "/generate", json=body, timeout=120).json()["output_ids"] == ids
    finally:
        launcher.stop(signal.SIGTERM, grace=60)
