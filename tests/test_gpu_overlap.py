"""On a CUDA GPU the overlap scheduler is on by default: it must give the same tokens as
--disable-overlap-schedule, through CUDA graph replays (the future input ids are written into the
graph's static inputs on the device) and eager steps alike, and leave every page free."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOPICS = ["gravity", "a hash table", "inflation", "recursion", "TCP", "DNA", "compilers", "vaccines",
          "volcanoes", "encryption", "democracy", "sorting"]  # fmt: skip


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(f"Question {i}: explain {t} in simple words.") for i, t in enumerate(TOPICS)]


def _generate(engine, prompts, params, overlap: bool) -> tuple[list[list[int]], float]:
    sched = engine.scheduler
    sched.cache.reset()
    sched.overlap = overlap
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    assert not sched.has_work()
    sched.cache.reset()
    assert sched.pool.num_free_pages == sched.pool.num_pages
    return [o["output_ids"] for o in outs], seconds


def test_graphs_give_the_same_greedy_tokens_with_and_without_overlap(default_model_path):
    """bf16, FlashInfer, CUDA graphs: each request ends by length at its own step (lengths 8..63),
    so both loops run the same batches and the tokens must be equal, not just close."""
    pytest.importorskip("flashinfer")
    from disagg.common.engine.offline import Engine

    engine = Engine(attention_backend="flashinfer", dtype="bfloat16", max_total_tokens=65536)
    assert engine.scheduler.runner.graph_runner is not None and engine.scheduler.overlap
    prompts = _prompts(engine.tokenizer)
    params = [
        {"max_new_tokens": 8 + 5 * i, "temperature": 0, "ignore_eos": True} for i in range(len(prompts))
    ]
    plain, t_plain = _generate(engine, prompts, params, overlap=False)
    overlapped, t_overlap = _generate(engine, prompts, params, overlap=True)
    assert overlapped == plain
    print(f"generate {len(prompts)} prompts: overlap off {t_plain:.3f}s, on {t_overlap:.3f}s")
    engine.shutdown()


def test_float32_overlap_matches_transformers_with_stops_and_aborts(default_model_path):
    """float32 eager (torch attention): transformers' tokens with overlap on, requests ending by
    a stop token id at different steps, one aborted mid-way; pages all free."""
    from disagg.common.engine.offline import Engine, to_sampling_params
    from disagg.common.engine.request import Req

    from tests.conftest import hf_greedy

    engine = Engine(attention_backend="torch", dtype="float32", max_total_tokens=16384)
    sched = engine.scheduler
    assert sched.overlap
    prompts = _prompts(engine.tokenizer)[:6]
    refs = [hf_greedy(default_model_path, p, 32) for p in prompts]

    # request i < 5 stops at the first occurrence of its reference's token i + 3 (a stop token id);
    # request 5 is aborted after its fourth token
    def params(i: int) -> dict:
        stop = {"stop_token_ids": [refs[i][i + 3]]} if i < 5 else {}
        return {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True, **stop}

    reqs = [Req(f"r{i}", p, to_sampling_params(params(i))) for i, p in enumerate(prompts)]
    for req in reqs:
        sched.add_request(req)
    streamed = {req.rid: [] for req in reqs}
    while sched.has_work():
        for out in sched.step():
            streamed[out.rid] += out.new_token_ids
        if len(streamed["r5"]) == 4 and not reqs[5].is_finished:
            sched.abort_request("r5")
    for i, (req, ref) in enumerate(zip(reqs[:5], refs[:5], strict=True)):
        stop_at = ref.index(ref[i + 3]) + 1  # its stop token ends it (and is its last token)
        assert streamed[req.rid] == req.output_ids == ref[:stop_at], req.rid
        assert req.finish_reason == "stop"
    assert reqs[5].finish_reason == "abort" and streamed["r5"] == refs[5][:4]
    sched.cache.reset()
    assert sched.pool.num_free_pages == sched.pool.num_pages
    engine.shutdown()
