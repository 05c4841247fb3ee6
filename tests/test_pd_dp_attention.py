"""PD with data parallelism on either side (CPU, gloo): a decode at `--tp 2 --dp-size 2
--enable-dp-attention --ep 2` picks each request's DP rank and that rank's pool receives the pages;
a prefill at `--dp-size 2` (replicas) serves each room from replica `room % 2` behind one bootstrap
port. Greedy tokens equal transformers' float32 ones token for token, and every pool is free after."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.conftest import hf_greedy, make_tiny_model
from tests.pd_helpers import PDCluster, assert_pool_free
from tests.test_parallel_dp_attention import QWEN3_MOE

MAX_TOKENS = 8
FIRST = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # alone: DP rank 1 of the decode runs idle steps only
THEN = [[20, 21, 22], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300, 301]]  # uneven: 2 + 1
DP_ATTENTION = ["--tp", "2", "--dp-size", "2", "--ep", "2", "--moe-a2a-backend", "all_to_all",
                "--enable-dp-attention"]  # fmt: skip


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory) -> str:
    from tests.conftest import TINY_CONFIGS

    added = "qwen3_moe" not in TINY_CONFIGS
    TINY_CONFIGS.setdefault("qwen3_moe", QWEN3_MOE)
    try:
        return make_tiny_model(tmp_path_factory.mktemp("pd-dp") / "qwen3_moe", "qwen3_moe", **QWEN3_MOE)
    finally:  # NOTE: other modules build their own tiny model per TINY_CONFIGS entry
        if added:
            del TINY_CONFIGS["qwen3_moe"]


def model_args(path: str, tokenizer: str) -> list[str]:
    return ["--model-path", path, "--tokenizer-path", tokenizer, "--page-size", "4"]


def generate(client: httpx.Client, ids: list[int], **extra) -> httpx.Response:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0,
                                                  "ignore_eos": True}, **extra}  # fmt: skip
    return client.post("/generate", json=body)


def output_ids(client: httpx.Client, ids: list[int], **extra) -> list[int]:
    r = generate(client, ids, **extra)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def uneven_requests(client: httpx.Client) -> tuple[list[int], list[list[int]]]:
    """FIRST alone, then THEN concurrently (spread over both DP ranks / replicas)."""
    first = output_ids(client, FIRST)
    with cf.ThreadPoolExecutor(len(THEN)) as pool:
        then = list(pool.map(lambda ids: output_ids(client, ids), THEN))
    return first, then


@pytest.mark.slow
def test_pd_decode_with_dp_attention_gives_transformers_tokens(moe_path, default_model_path):
    args = model_args(moe_path, default_model_path)
    with PDCluster(prefill_args=args, decode_args=[*args, *DP_ATTENTION]) as pd, pd.client() as client:
        first, then = uneven_requests(client)
        # SGLang's data_parallel_rank pins a request to a DP rank of the decode; out of range: a 400
        pinned = output_ids(client, THEN[1], data_parallel_rank=1)
        bad = generate(client, FIRST, data_parallel_rank=2)
        assert bad.status_code == 400 and "data_parallel_rank" in bad.text, bad.text
        assert_pool_free(pd.prefill)
        assert_pool_free(pd.decode)  # both DP ranks' pools
    assert first == hf_greedy(moe_path, FIRST, MAX_TOKENS)
    assert then == [hf_greedy(moe_path, ids, MAX_TOKENS) for ids in THEN]
    assert pinned == then[1]
