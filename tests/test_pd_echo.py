"""Completions with `echo` + `logprobs` (prompt logprobs) through PD and streamed: the prefill server
computes the prompt's logprobs and ships them to the decode with the room's KV (the done's metadata);
the answer equals a colocated server's (tokens, logprobs within float tolerance, text offsets). A
streamed choice's first chunk carries the echoed prompt and its logprobs, as vLLM streams it."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from disagg.common.engine.request import SamplingParams
from disagg.common.server.ipc import StrOut
from disagg.common.server.openai_api import Job, check_pd_prompt_logprobs
from disagg.common.server.protocol import APIError
from disagg.common.server.serving import merge_streams
from disagg.transfer.layout import PROTOCOL_VERSION, KVLayout, KVLayoutMismatchError

from tests.pd_helpers import assert_pool_free, pd_fixtures

PROMPT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs, then"
ECHO = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}


def complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(url: str, **body) -> tuple[list[dict], list[dict]]:
    """The choices a client rebuilds from the streamed chunks (text and logprobs concatenated), and
    each choice's first chunk."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    got: dict[int, dict] = {}
    firsts: dict[int, dict] = {}
    for chunk in map(json.loads, events[:-1]):
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            firsts.setdefault(c["index"], c)
            acc = got.setdefault(c["index"], {"text": "", "logprobs": {k: [] for k in LP_KEYS}})
            acc["text"] += c["text"]
            for k in LP_KEYS:
                acc["logprobs"][k] += (c["logprobs"] or {}).get(k) or []
    return [got[i] for i in sorted(got)], [firsts[i] for i in sorted(firsts)]


LP_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def assert_same_choice(got: dict, want: dict) -> None:
    """Same text, tokens and offsets; logprobs within float tolerance (two processes, same kernels)."""
    assert got["text"] == want["text"]
    g, w = got["logprobs"], want["logprobs"]
    assert g["tokens"] == w["tokens"] and g["text_offset"] == w["text_offset"]
    assert g["token_logprobs"][0] is None and w["token_logprobs"][0] is None
    assert g["token_logprobs"][1:] == pytest.approx(w["token_logprobs"][1:], abs=1e-4)
    assert g["top_logprobs"][0] is None
    for gt, wt in zip(g["top_logprobs"][1:], w["top_logprobs"][1:], strict=True):
        assert gt.keys() == wt.keys() and list(gt.values()) == pytest.approx(list(wt.values()), abs=1e-4)


def test_decode_helper_brings_the_prompt_logprobs_to_every_choice():
    """n > 1 through PD: the one-token helper in the room asks for the prompt's logprobs (the prefill
    computed them); the n choices, without a room, do not recompute them and still answer them."""
    calls: dict[str, SamplingParams] = {}

    async def generate(rid, ids, sampling, pd, owner):
        calls[rid] = sampling
        lps = [None, -1.0, -2.0] if sampling.prompt_logprobs else None
        yield StrOut(rid, "x", [5], finished=True, finish_reason="length", prompt_logprobs=lps)

    state = SimpleNamespace(tm=SimpleNamespace(generate=generate), server_info={"role": "decode"})
    sampling = SamplingParams(max_new_tokens=4, return_logprob=True, top_logprobs_num=2, prompt_logprobs=True)
    job = Job("completion", "r", "m", [[1, 2, 3]], sampling, 2, False, False)
    gens = job.start(state, {"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 100})

    async def drain() -> dict[int, StrOut]:
        return {i: out async for i, out in merge_streams(gens)}

    outs = asyncio.run(drain())
    helper = calls["r-prompt0"]
    assert helper.prompt_logprobs and helper.top_logprobs_num == 2 and helper.max_new_tokens == 1
    assert not calls["r-0"].prompt_logprobs and not calls["r-1"].prompt_logprobs
    assert [outs[i].prompt_logprobs for i in range(2)] == [[None, -1.0, -2.0]] * 2


def colocated_answers(url: str) -> dict:
    return {
        "one": complete(url, **ECHO)["choices"][0],
        "two": complete(url, **{**ECHO, "n": 2})["choices"],
        "stream": streamed(url, **ECHO),
    }


colocated, pd = pd_fixtures(colocated_answers)


@pytest.mark.slow
def test_colocated_stream_equals_non_stream_and_echoes_first(colocated):
    (choice,), (first,) = colocated["stream"]
    assert_same_choice(choice, colocated["one"])
    n = len(first["logprobs"]["tokens"]) - 1  # the prompt's tokens and the first output token
    assert first["text"].startswith(PROMPT) and "".join(first["logprobs"]["tokens"][:n]) == PROMPT


@pytest.mark.slow
def test_pd_echo_logprobs_equal_colocated(pd, colocated):
    answer = complete(pd.url, **ECHO)
    assert_same_choice(answer["choices"][0], colocated["one"])
    assert answer["choices"][0]["text"].startswith(PROMPT)


@pytest.mark.slow
def test_pd_stream_echo_logprobs_equal_colocated(pd, colocated):
    (choice,), (first,) = streamed(pd.url, **ECHO)
    assert_same_choice(choice, colocated["one"])
    want = colocated["stream"][1][0]  # the first chunk: the prompt, its logprobs and the first token
    assert first["text"] == want["text"] and first["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert first["logprobs"]["text_offset"] == want["logprobs"]["text_offset"]


@pytest.mark.slow
def test_pd_n_with_echo_logprobs_equals_colocated(pd, colocated):
    choices = complete(pd.url, **{**ECHO, "n": 2})["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for got, want in zip(choices, colocated["two"], strict=True):
        assert_same_choice(got, want)
    rebuilt, firsts = streamed(pd.url, **{**ECHO, "n": 2})
    for got, first, want in zip(rebuilt, firsts, colocated["two"], strict=True):
        assert_same_choice(got, want)
        assert first["text"].startswith(PROMPT)


@pytest.mark.slow
def test_pools_free_afterwards(pd):
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


def test_pd_refuses_prompt_logprobs_the_transfer_cannot_carry():
    """They travel in one control message: a prompt too long for them through PD is a 400, not a failed room."""
    check_pd_prompt_logprobs([[1] * 500, [1] * 7000], 20)  # 7000 * 21 entries fit
    with pytest.raises(APIError) as e:
        check_pd_prompt_logprobs([[1] * 500, [1] * 8000], 20)
    assert e.value.status == 400 and "7142 tokens" in str(e.value)


def test_a_peer_without_prompt_logprobs_in_its_metadata_is_refused():
    """Version 5 ships the prompt's logprobs: a version-4 peer would answer echo without them."""
    base = dict(num_layers=2, page_size=4, num_kv_heads_total=2, head_dim=8, dtype="float32", model_name="m")
    assert PROTOCOL_VERSION >= 5
    with pytest.raises(KVLayoutMismatchError, match="protocol_version"):
        KVLayout(**base).check_compatible(KVLayout(**base, protocol_version=4))
