"""On a CUDA GPU: `--decode-attention-backend triton` (the Triton split-KV decode kernels inside the
decode CUDA graphs) decodes the tokens FlashInfer's graphs decode, for a GQA model (a tiny Qwen3 at
head_dim 128, 4 query heads a KV head) and an MLA one (a small DeepSeek-V3 shape), over prompts of
several lengths in one batch, with chunked prefill (bf16: vLLM's check_logprobs_close), and leaves no
page behind; `auto` (the default) runs Triton's in the buckets of up to 8 requests, FlashInfer's
above. Skipped without CUDA or flashinfer."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 6, 7], list(range(100, 140)), list(range(200, 330)), [(7 * i) % 500 for i in range(300)]]
PARAMS = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}


def _generate(kernel: str, max_bs: int = 8, **model) -> list[dict]:
    from disagg.common.engine.cuda_graph import _GraphTritonDecodeBackend
    from disagg.common.engine.offline import Engine

    engine = Engine(decode_attention_backend=kernel, dtype="bfloat16", chunked_prefill_size=64,
                    max_total_tokens=8192, cuda_graph_max_bs=max_bs, **model)  # fmt: skip
    try:
        graphs = engine.scheduler.runner.graph_runner
        assert graphs is not None
        triton = {bs: isinstance(b, _GraphTritonDecodeBackend) for bs, b in graphs.backends.items()}
        want = {"triton": lambda bs: True, "flashinfer": lambda bs: False, "auto": lambda bs: bs <= 8}[kernel]
        assert triton == {bs: want(bs) for bs in triton}, triton
        outs = engine.generate(PROMPTS, PARAMS)
        engine.scheduler.cache.reset()
        assert engine.scheduler.pool.num_free_pages == engine.scheduler.pool.num_pages
        return outs
    finally:
        engine.shutdown()


def test_gqa_triton_decode_graphs_follow_flashinfer(tmp_path):
    pytest.importorskip("flashinfer")
    from tests.conftest import assert_logprobs_close, make_tiny_model

    path = make_tiny_model(tmp_path / "q3", "qwen3", hidden_size=256, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=128)  # fmt: skip
    assert_logprobs_close(_generate("triton", model_path=path), _generate("flashinfer", model_path=path))
    # auto: buckets 1-8 Triton's, 16 FlashInfer's (the four prompts run in the bucket of 4)
    assert_logprobs_close(_generate("auto", 16, model_path=path), _generate("flashinfer", model_path=path))


def test_mla_triton_decode_graphs_follow_flashinfer():
    pytest.importorskip("flashinfer")
    from tests.conftest import assert_logprobs_close
    from tests.test_gpu_mla import SMALL_V3

    model = dict(model_path="DeepSeek-V3", load_format="dummy", json_model_override_args=json.dumps(SMALL_V3))
    assert_logprobs_close(_generate("triton", **model), _generate("flashinfer", **model))
