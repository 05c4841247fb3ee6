"""On 2+ CUDA GPUs: PD with a decode at `--tp 2 --dp-size 2 --enable-dp-attention --ep 2` (one GPU per DP
rank; the tp-1 prefill shares GPU 0) gives transformers' float32 greedy tokens with an idle DP rank, the
pages copied into the picked DP rank's device pool; a prefill at `--dp-size 2` (a GPU per replica); and
a prefill with that DP attention (room r prefilled and sent by the GPU of DP rank r % 2) → a tp-1 decode.
Not run yet: no multi-GPU machine was lent when it was written."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_greedy
from tests.pd_helpers import PDCluster, assert_pool_free
from tests.test_pd_dp_attention import (
    DP_ATTENTION,
    FIRST,
    MAX_TOKENS,
    THEN,
    model_args,
    moe_path,
    uneven_requests,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per DP rank)"),
]
GPU = ["--device", "cuda", "--dtype", "float32", "--attention-backend", "torch"]
__all__ = ["moe_path"]  # the fixture, shared with the CPU tests


@pytest.mark.parametrize("side", ["decode-dp-attention", "prefill-replicas", "prefill-dp-attention"])
def test_gpu_pd_with_dp_gives_transformers_tokens(moe_path, default_model_path, side):
    args = [*model_args(moe_path, default_model_path), *GPU]
    prefill, decode = {
        "decode-dp-attention": (args, [*args, *DP_ATTENTION]),
        "prefill-replicas": ([*args, "--dp-size", "2"], args),
        "prefill-dp-attention": ([*args, *DP_ATTENTION], args),
    }[side]
    with PDCluster(prefill_args=prefill, decode_args=decode) as pd, pd.client() as client:
        first, then = uneven_requests(client)
        assert_pool_free(pd.prefill)
        assert_pool_free(pd.decode)
    assert first == hf_greedy(moe_path, FIRST, MAX_TOKENS)
    assert then == [hf_greedy(moe_path, ids, MAX_TOKENS) for ids in THEN]
