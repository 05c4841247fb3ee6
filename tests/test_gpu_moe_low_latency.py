"""On 2+ CUDA GPUs: `--moe-a2a-backend all_to_all --deepep-mode low_latency` at --tp 2 --ep 2 over
NCCL captures its decode steps in CUDA graphs (fixed-size all-to-all buffers, no host sync) and
gives the bf16 greedy tokens of the all-reduce layout within the logprob-closeness check of
tests/test_gpu_fused_moe.py; `auto` does the same; float32 with the torch attention backend (eager)
gives transformers' tokens."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per EP rank)"),
]
PROMPTS = [[i + 1, 2 * i + 3, 5, 7 * i + 11, 13] for i in range(12)]


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    from tests.conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpu-ll") / "m", "qwen3_moe")


def _generate(path: str, params: dict, **kw) -> list[dict]:
    from disagg.common.engine.offline import Engine

    engine = Engine(model_path=path, page_size=4, max_total_tokens=4096, tp=2, ep=2, device="cuda", **kw)
    try:
        if kw.get("attention_backend") == "flashinfer":
            assert engine.scheduler.runner.graph_runner is not None  # decode replays graphs
        return engine.generate(PROMPTS, params)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("mode", ["low_latency", "auto"])
def test_low_latency_under_cuda_graphs_keeps_the_tokens(moe_path, mode):
    pytest.importorskip("flashinfer")
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}
    common = dict(attention_backend="flashinfer", dtype="bfloat16")
    plain = _generate(moe_path, params, **common)
    ll = _generate(moe_path, params, moe_a2a_backend="all_to_all", deepep_mode=mode, **common)
    exact = 0
    for a_out, b_out in zip(plain, ll, strict=True):
        a, b = a_out["output_ids"], b_out["output_ids"]
        k = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if k is None:
            exact += 1
            continue
        assert b[k] in {t for t, _ in a_out["meta_info"]["output_top_logprobs"][k]}
        assert a[k] in {t for t, _ in b_out["meta_info"]["output_top_logprobs"][k]}
    assert exact >= len(PROMPTS) // 2


def test_low_latency_float32_gives_transformers_tokens(moe_path):
    from tests.conftest import hf_greedy

    params = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    outs = _generate(moe_path, params, attention_backend="torch", dtype="float32",
                     moe_a2a_backend="all_to_all", deepep_mode="low_latency")  # fmt: skip
    assert [o["output_ids"] for o in outs] == [hf_greedy(moe_path, p, 10) for p in PROMPTS]
