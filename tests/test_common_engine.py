"""The engine gives transformers' greedy tokens for batches that mix lengths, cross chunk
boundaries, hit the prefix cache and get retracted; the pool always ends with every page free."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from disagg.common.engine.attention import TorchBackend

from tests.conftest import assert_pool_clean, hf_greedy

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    ",
    "In 1905, Albert Einstein published four papers that changed physics. The first one",
    "Q: What is 17 times 3?\nA:",
]
GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize(
    "kw",
    [
        dict(page_size=16),
        dict(page_size=4, chunked_prefill_size=7),
        dict(page_size=1, chunked_prefill_size=32),
    ],
    ids=["page16", "page4-chunk7", "page1-chunk32"],
)
def test_default_model_matches_transformers(engines, default_model_path, kw):
    engine = engines.get(**kw)
    outs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = engine.tokenizer.encode(prompt)
        assert out["output_ids"] == hf_greedy(default_model_path, ids, 24), prompt
        assert out["finish_reason"] == "length"
    assert_pool_clean(engine.scheduler)


def test_prefix_cache_hit_gives_same_tokens(engines, default_model_path):
    engine = engines.get(page_size=4)
    system = "You are a careful assistant who answers in one short sentence. " * 3
    prompts = [system + q for q in ("Why is the sky blue?", "What is a prime number?", "Name a color.")]
    first = engine.generate(prompts[:1], GREEDY)[0]
    rest = engine.generate(prompts[1:], GREEDY)
    assert all(o["meta_info"]["cached_tokens"] >= 32 for o in rest)
    assert engine.scheduler.cache.hit_rate > 0
    for prompt, out in zip(prompts, [first, *rest], strict=True):
        assert out["output_ids"] == hf_greedy(default_model_path, engine.tokenizer.encode(prompt), 24)
    assert_pool_clean(engine.scheduler)


def test_retraction_when_pages_run_out(engines, default_model_path):
    # 12 requests x (~20 prompt + 40 output) tokens need ~180 pages of 4; the pool has 64.
    engine = engines.get(page_size=4, max_total_tokens=256, chunked_prefill_size=64)
    prompts = [f"Count from {i} to {i + 30}:" for i in range(12)]
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    outs = engine.generate(prompts, params)
    assert engine.scheduler.num_retractions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(default_model_path, engine.tokenizer.encode(prompt), 40)
    assert_pool_clean(engine.scheduler)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(engines, tiny_models, family):
    path = tiny_models[family]
    engine = engines.get(model_path=path, page_size=4, chunked_prefill_size=16)
    rng = random.Random(family)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 5, 17, 40, 9)]
    outs = engine.generate(prompts, {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True})
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(path, prompt, 20)
    assert_pool_clean(engine.scheduler)


def test_abort_at_any_point_frees_pages(engines):
    engine = engines.get(page_size=4, chunked_prefill_size=8)
    sched = engine.scheduler
    from disagg.common.engine.offline import to_sampling_params
    from disagg.common.engine.request import Req

    long_prompt = engine.tokenizer.encode("word " * 60)
    reqs = [
        Req(f"abort-{i}", list(long_prompt), to_sampling_params({"max_new_tokens": 50})) for i in range(3)
    ]
    for r in reqs:
        sched.add_request(r)
    sched.add_request(Req("abort-waiting", [1, 2, 3], to_sampling_params({})))
    sched.abort_request("abort-waiting")  # still waiting
    finished = {}

    def step():
        outs = sched.step()
        finished.update({o.rid: o.finish_reason for o in outs if o.finished})
        return outs

    step()
    sched.abort_request("abort-0")  # mid-prefill (chunk of 8 of 60 tokens)
    for _ in range(12):
        step()
    sched.abort_request("abort-1")  # decoding
    while sched.has_work():
        for out in step():
            if out.rid == "abort-2" and not out.finished:
                sched.abort_request("abort-2")
    assert finished == {"abort-waiting": "abort", "abort-0": "abort", "abort-1": "abort", "abort-2": "abort"}
    assert_pool_clean(sched)


def test_sampling_controls(engines):
    engine = engines.get(page_size=16)
    prompt = "Once upon a time"
    a = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 1.0, "seed": 7})[0]
    b = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 1.0, "seed": 7})[0]
    c = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 1.0, "seed": 8})[0]
    assert a["output_ids"] == b["output_ids"] != c["output_ids"]
    greedy = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})[0]
    top1 = engine.generate(
        prompt, {"max_new_tokens": 16, "temperature": 0.8, "top_k": 1, "ignore_eos": True}
    )[0]
    assert top1["output_ids"] == greedy["output_ids"]
    # stop token id and stop string end the request with reason "stop"
    stop_id = greedy["output_ids"][3]
    out = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 0, "stop_token_ids": [stop_id]})[0]
    assert out["finish_reason"] == "stop" and out["output_ids"][-1] == stop_id
    word = greedy["text"].split()[2]
    out = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 0, "stop": [word]})[0]
    assert out["finish_reason"] == "stop" and word not in out["text"]
    assert greedy["text"].startswith(out["text"])
    # logprobs of the chosen greedy tokens are the maximum, so close to 0 or negative
    out = engine.generate(prompt, {"max_new_tokens": 4, "temperature": 0, "return_logprob": True})[0]
    assert len(out["meta_info"]["output_logprobs"]) == 4 and all(
        lp <= 0 for lp in out["meta_info"]["output_logprobs"]
    )
    assert_pool_clean(engine.scheduler)


def test_bad_requests_end_with_an_error(engines):
    engine = engines.get(page_size=16)
    out = engine.generate([[]], {"max_new_tokens": 4})[0]
    assert out["finish_reason"] == "abort" and "empty" in out["meta_info"]["error"]
    out = engine.generate([[10**9]], {"max_new_tokens": 4})[0]
    assert out["finish_reason"] == "abort" and "token ids" in out["meta_info"]["error"]
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("hi", {"top_p": 0})
    assert_pool_clean(engine.scheduler)


def test_non_finite_logits_end_only_their_request(engines, monkeypatch):
    """A numerical fault of the model (NaN or +inf logits) in one request's row, greedy or sampled, at
    its first token or mid-decode: that request ends with a typed error after the tokens it had, its
    batch mates go on with the tokens they would have had, and every page comes back. (torch's
    multinomial raised on such a row here, and on CUDA its device-side assert ended the server.)"""
    import math

    engine = engines.get(page_size=16)
    sched = engine.scheduler
    prompts = ["The capital of France is", "Write a haiku about the sea.", "Q: What is 17 times 3?\nA:",
               "def fibonacci(n):\n    "]  # fmt: skip
    params = [
        dict(GREEDY),
        dict(GREEDY),
        {**GREEDY, "temperature": 1.0, "seed": 3},
        {**GREEDY, "temperature": 0.7, "seed": 5},
    ]
    want = [engine.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    # prompt -> (the output length at which its logits go bad, the bad value)
    faults = {1: (3, math.nan), 2: (0, math.nan), 3: (2, math.inf)}
    ids = {tuple(engine.tokenizer.encode(prompts[i])): fault for i, fault in faults.items()}
    sample = sched.sampler.sample_on_device

    def poisoned(logits, reqs, *args, **kw):
        logits = logits.clone()
        for row, req in enumerate(reqs):
            at, value = ids.get(tuple(req.input_ids), (None, None))
            if at == len(req.output_ids):
                logits[row, 5] = value  # one bad logit: +inf or NaN spoils the whole distribution
        return sample(logits, reqs, *args, **kw)

    monkeypatch.setattr(sched.sampler, "sample_on_device", poisoned)
    got = [engine.generate([p], q) for p, q in zip(prompts, params, strict=True)]  # one at a time
    together = engine.generate(prompts, params)  # and in one batch
    for outs in (sum(got, []), together):
        assert outs[0]["output_ids"] == want[0]["output_ids"] and outs[0]["finish_reason"] == "length"
        for i, (at, _) in faults.items():
            assert outs[i]["finish_reason"] == "abort", outs[i]
            assert "not finite" in outs[i]["meta_info"]["error"]
            assert outs[i]["output_ids"] == want[i]["output_ids"][:at]
    assert_pool_clean(sched)


def test_the_sampler_flags_rows_that_are_not_distributions():
    import torch
    from disagg.common.engine.offline import to_sampling_params
    from disagg.common.engine.request import Req
    from disagg.common.engine.sampling import Sampler

    logits = torch.randn(5, 50)
    logits[1, 7] = float("nan")  # greedy: NaN ranks first
    logits[2, 3] = float("inf")  # sampled: softmax is NaN
    logits[3] = float("-inf")  # sampled: nothing left to draw
    logits[4, 9] = float("nan")  # sampled with top-k and a seed
    kinds = [{"temperature": 0}, {"temperature": 0}, {"temperature": 1.0}, {"temperature": 1.0},
             {"temperature": 0.5, "top_k": 4, "seed": 1}]  # fmt: skip
    reqs = [Req(f"r{i}", [1], to_sampling_params(k)) for i, k in enumerate(kinds)]
    result = Sampler(torch.device("cpu")).sample(logits, reqs)
    assert result.bad == [False, True, True, True, True]
    assert result.token_ids[0] == int(logits[0].argmax())


def test_disabled_radix_cache_returns_every_page(engines, default_model_path):
    """--disable-radix-cache: finished requests give all their pages back to the pool."""
    engine = engines.get(page_size=4, disable_radix_cache=True)
    prompts = PROMPTS[:2]
    outs = engine.generate(prompts, {**GREEDY, "max_new_tokens": 6})
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(default_model_path, engine.tokenizer.encode(prompt), 6)
    pool = engine.scheduler.pool
    assert pool.num_free_pages == pool.num_pages  # nothing parked in a cache that is off


def test_start_up_warm_up_leaves_no_trace(engines, tiny_models):
    """The warm-up forwards a GPU server runs before it is ready (kernels built then, not on the
    first request) write only pages no request holds: the next requests, which get exactly those
    pages first, still give transformers' tokens, and every page is free again afterwards."""
    path = tiny_models["llama"]
    engine = engines.get(model_path=path, page_size=4, chunked_prefill_size=16)
    engine.scheduler.runner._warm_up()  # runs by itself at start-up on CUDA only
    pool = engine.scheduler.pool
    assert pool.num_free_pages == pool.num_pages
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8]]
    outs = engine.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(path, prompt, 12)
    assert_pool_clean(engine.scheduler)


def test_host_tensors_are_torch_tensor_of_the_same_values():
    """A batch's host lists (ids, positions, page tables, sampling parameters) reach the device through
    numpy (device_wait.host_tensor): the same values, dtype and shape as torch.tensor gives, for every
    dtype the engine sends (bfloat16, which numpy lacks, included), nested rows and empty lists."""
    import torch
    from disagg.common.engine.device_wait import host_tensor, to_device

    cpu = torch.device("cpu")
    cases = [
        (list(range(2048)), torch.long),
        ([[1, 2, 3], [4, 5, 6]], torch.int32),
        ([True, False, True], torch.bool),
        ([0.5, 1e-5, 2.0], torch.float32),
        ([0.5, -3.25], torch.bfloat16),
        ([], torch.long),
        ([2**40, -1], torch.int64),
    ]
    for values, dtype in cases:
        want = torch.tensor(values, dtype=dtype)
        for got in (host_tensor(values, dtype, cpu), to_device(values, dtype, cpu)):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (
                values,
                dtype,
            )


class _NewKVBackend(TorchBackend):
    """TorchBackend that attends fresh prompts over the step's own rotated K and V (as FlashInfer's
    ragged prefill does on the GPU), each request causal on its own; counts those batches."""

    fresh_batches = 0

    def attends_new_kv(self, batch) -> bool:
        return not batch.is_decode_only and batch.kv_lens == batch.q_lens

    def forward_new_kv(self, q, k, v, batch):
        type(self).fresh_batches += 1
        # each request on its own: TorchBackend's lone-prompt path over its rows
        rows = [
            slice(end - n, end)
            for n, end in zip(batch.q_lens, itertools.accumulate(batch.q_lens), strict=True)
        ]
        return torch.cat([TorchBackend.forward_new_kv(self, q[r], k[r], v[r], batch) for r in rows])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_over_the_steps_own_kv_gives_transformers_tokens(tiny_models, family, monkeypatch):
    """The decoder hands a backend that asks for it (attends_new_kv: FlashInfer's ragged prefill on
    the GPU) the rotated K (Qwen3: q/k-normalised) and V of a batch of fresh prompts: transformers'
    float32 tokens; a prompt that hits the prefix cache, prefill chunks after the first and decode
    steps read the pool as before."""
    from disagg.common.engine import model_runner
    from disagg.common.engine.offline import Engine

    monkeypatch.setattr(model_runner, "create_attention_backend", lambda *a, **kw: _NewKVBackend())
    path = tiny_models[family]
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=32, max_total_tokens=2048)
    try:
        rng = random.Random(family)
        prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 5, 17, 40, 9)]  # 40: two chunks
        prompts.append(prompts[3][:24] + [7, 8, 9])  # its first 24 tokens cached by then
        params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
        _NewKVBackend.fresh_batches = 0
        outs = engine.generate(prompts[:5], params) + engine.generate(prompts[5:], params)
        assert _NewKVBackend.fresh_batches > 0
        assert outs[5]["meta_info"]["cached_tokens"] > 0
        for prompt, out in zip(prompts, outs, strict=True):
            assert out["output_ids"] == hf_greedy(path, prompt, 12)
        assert_pool_clean(engine.scheduler)
    finally:
        engine.shutdown()


def test_a_lone_fresh_prompt_attends_over_its_own_kv(engines, default_model_path, monkeypatch):
    """The torch backend's fresh-prompt path (one causal SDPA over the step's rotated K/V, no gather,
    no mask) serves a lone prompt without a cached prefix: transformers' float32 tokens; the same
    prompt again (a prefix hit) and its decode steps read the pool."""
    calls = []
    original = TorchBackend.forward_new_kv
    monkeypatch.setattr(
        TorchBackend, "forward_new_kv", lambda self, *a: calls.append(1) or original(self, *a)
    )
    engine = engines.get(page_size=4, chunked_prefill_size=256)
    prompt = engine.tokenizer.encode(PROMPTS[3])
    for expect_fresh in (True, False):
        before = len(calls)
        out = engine.generate([prompt], GREEDY)[0]
        assert out["output_ids"] == hf_greedy(default_model_path, prompt, 24)
        assert (len(calls) > before) == expect_fresh  # the second time its first pages are cached
    assert_pool_clean(engine.scheduler)
