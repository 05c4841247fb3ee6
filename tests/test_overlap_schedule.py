"""The overlap scheduler (--enable-overlap-schedule on the CPU): step n+1 is launched before step n's
tokens are read, and the client sees exactly what the plain loop gives: transformers' greedy tokens,
stop strings, max_tokens, aborts, seeded sampling and logprobs; every page back in the pool."""

from __future__ import annotations

import concurrent.futures as cf
import random

import pytest

from tests.conftest import REFERENCE_ENGINE, assert_pool_clean, hf_greedy
from tests.pd_helpers import PDCluster, assert_pool_free, generate_ids

LONG = "In 1905, Albert Einstein published four papers that changed physics. The first one " * 2
GREEDY = {"temperature": 0, "ignore_eos": True}


def _stop_string(tokenizer, ref: list[int]) -> str:
    """A stop string the greedy output reaches after a few tokens (the text of one of its tokens)."""
    for k in range(4, len(ref)):
        text = tokenizer.decode(ref[k : k + 1]).strip()
        if len(text) >= 2:
            return text
    raise AssertionError("no usable stop string in the reference output")


def _scenario(tokenizer, path: str) -> tuple[dict, dict]:
    """{step: [(rid, prompt ids, sampling params)]} and the transformers references."""
    ids = {name: tokenizer.encode(text) for name, text in
           dict(a="The capital of France is", b=LONG + "In one sentence,", c="Q: What is 17 times 3?\nA:",
                d="def fibonacci(n):\n    ", e="Write a haiku about the sea.", f="Once upon a time",
                g="ha ha ha ha ha ha ha ha").items()}  # fmt: skip
    ref = {rid: hf_greedy(path, ids[rid], 24) for rid in "abcde"}
    arrivals = {
        0: [("a", ids["a"], {**GREEDY, "max_new_tokens": 16}),
            ("c", ids["c"], {"temperature": 0, "max_new_tokens": 24, "stop": [_stop_string(tokenizer, ref["c"])]})],
        1: [("f", ids["f"], {"temperature": 0.8, "seed": 11, "max_new_tokens": 10, "return_logprob": True,
                             "top_logprobs_num": 2})],
        2: [("b", ids["b"], {**GREEDY, "max_new_tokens": 12})],  # several chunks of 16 beside decodes
        3: [("d", ids["d"], {**GREEDY, "max_new_tokens": 30})],  # aborted after its third token
        4: [("e", ids["e"], {"temperature": 0, "max_new_tokens": 4})],
        # a penalty strong enough that missing the token still on the device changes the output
        5: [("g", ids["g"], {**GREEDY, "max_new_tokens": 8, "frequency_penalty": 2.0})],
    }  # fmt: skip
    return arrivals, ref


def _run(engine, arrivals: dict, overlap: bool) -> tuple[dict, int]:
    """Stream the scenario through the scheduler: per request its streamed tokens, logprobs and
    finish; and how many forwards took an input token still on the device."""
    from disagg.common.engine.offline import to_sampling_params
    from disagg.common.engine.request import Req

    sched, runner = engine.scheduler, engine.scheduler.runner
    sched.cache.reset()
    sched.overlap = overlap
    futures, forward = [0], runner.forward

    def counting_forward(scheduled, pending=None, future=None):
        futures[0] += bool(pending)
        return forward(scheduled, pending, future)

    seen: dict[str, dict] = {}
    runner.forward = counting_forward
    try:
        for step in range(400):
            for rid, prompt, params in arrivals.get(step, []):
                sched.add_request(Req(rid, list(prompt), to_sampling_params(params)))
                seen[rid] = {"ids": [], "logprobs": [], "finish": None}
            for out in sched.step():
                s = seen[out.rid]
                s["ids"] += out.new_token_ids
                s["logprobs"] += out.logprobs or []
                if out.finished:
                    s["finish"] = (out.finish_reason, out.matched_stop)
            d = seen.get("d")
            if d and len(d["ids"]) == 3 and d["finish"] is None:
                sched.abort_request("d")  # overlap: its fourth token may be in flight already (dropped)
            if step > max(arrivals) and not sched.has_work():
                break
    finally:
        runner.forward = forward
    return seen, futures[0]


def test_overlap_gives_the_plain_loops_tokens(engines, default_model_path):
    engine = engines.get(page_size=4, chunked_prefill_size=16, enable_overlap_schedule=True)
    assert engine.scheduler.overlap
    arrivals, ref = _scenario(engine.tokenizer, default_model_path)
    got, overlapped = _run(engine, arrivals, overlap=True)
    assert_pool_clean(engine.scheduler)
    assert overlapped >= 15  # steps decoded from tokens still on the device
    want, plain = _run(engine, arrivals, overlap=False)
    assert_pool_clean(engine.scheduler)
    assert plain == 0

    for rid, n in (("a", 16), ("b", 12)):
        assert got[rid]["ids"] == ref[rid][:n] and got[rid]["finish"] == ("length", None), rid
    stop = arrivals[0][1][2]["stop"][0]
    assert got["c"]["finish"] == ("stop", stop)
    assert got["c"]["ids"] == ref["c"][: len(got["c"]["ids"])] and len(got["c"]["ids"]) < 24
    assert stop in engine.tokenizer.decode(got["c"]["ids"])
    assert got["d"]["ids"] == ref["d"][:3] and got["d"]["finish"][0] == "abort"  # no token after the abort
    assert got["e"]["ids"] == ref["e"][: len(got["e"]["ids"])] and got["e"]["finish"][0] in ("length", "stop")
    assert len(got["f"]["logprobs"]) == len(got["f"]["ids"]) == 10
    for rid in arrivals_ids(arrivals):
        assert got[rid]["ids"] == want[rid]["ids"] and got[rid]["finish"] == want[rid]["finish"], rid
        assert got[rid]["logprobs"] == pytest.approx(want[rid]["logprobs"], abs=1e-4), rid


def arrivals_ids(arrivals: dict) -> list[str]:
    return [rid for batch in arrivals.values() for rid, _, _ in batch]


def test_overlap_with_retractions_matches_transformers(engines, tiny_models):
    # 6 requests x (~15 prompt + 30 output) tokens need ~70 pages of 4; the pool has 32: the
    # scheduler reads the step in flight before it retracts (no page of a queued step is freed)
    path = tiny_models["llama"]
    engine = engines.get(model_path=path, page_size=4, max_total_tokens=128, chunked_prefill_size=16,
                         enable_overlap_schedule=True)  # fmt: skip
    rng = random.Random(3)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (10, 12, 14, 16, 18, 20)]
    outs = engine.generate(prompts, {**GREEDY, "max_new_tokens": 30})
    assert engine.scheduler.num_retractions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(path, prompt, 30)
    assert_pool_clean(engine.scheduler)


def test_overlap_flags(tiny_models):
    from disagg.common.engine.offline import Engine

    path = tiny_models["qwen2"]
    assert not Engine(model_path=path).scheduler.overlap  # CPU default: off (nothing to overlap)
    assert not Engine(
        model_path=path, enable_overlap_schedule=True, disable_overlap_schedule=True
    ).scheduler.overlap


@pytest.mark.slow
def test_pd_decode_with_overlap_gives_colocated_tokens(engines):
    reference = engines.get(**REFERENCE_ENGINE)
    prompts = ["The capital of France is", LONG + "In one sentence,", "def fibonacci(n):"]
    want = [o["output_ids"] for o in reference.generate(prompts, {"max_new_tokens": 12, "temperature": 0})]
    flag = ["--enable-overlap-schedule"]  # the prefill role ignores it (its steps never overlap)
    with PDCluster(prefill_args=flag, decode_args=flag) as pd, pd.client() as client:
        with cf.ThreadPoolExecutor(len(prompts)) as pool:  # decoded side by side in one batch
            got = list(pool.map(lambda p: generate_ids(client, p, True, 12), prompts))
        assert got == want
        assert generate_ids(client, prompts[1], False, 12) == want[1]
        assert_pool_free(pd.decode)
