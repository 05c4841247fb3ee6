"""`n > 1` and prompt lists through PD: which requests each server starts, then router + prefill +
decode as real processes (marked slow). The prefill server computes a prompt once, the decode server
forks its KV into the n choices (common/server/shared_prompt.py); the choices equal a colocated
server's, greedy and seeded; prompt lists are independent requests; a failed transfer fails every
choice with a typed error; no page or room is left held."""

from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import httpx
import pytest
from disagg.common.engine.request import SamplingParams
from disagg.common.server.ipc import StrOut
from disagg.common.server.openai_api import Job
from disagg.common.server.serving import merge_streams

from tests.pd_helpers import assert_pool_free, is_idle, pd_fixtures, stats
from tests.procs import wait_until
from tests.server_helpers import ServerProcess, metric_value

# longer than two pages (16 tokens): the choices share whole pages and compute the last one each
PROMPT = "Count the sheep: " + ", ".join(f"sheep {i}" for i in range(12))
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat. One day"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
GREEDY = {"max_tokens": 8, "temperature": 0}
SEEDED = {"max_tokens": 8, "temperature": 1.0, "seed": 77}


def complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def texts(answer: dict) -> list[str]:
    assert [c["index"] for c in answer["choices"]] == list(range(len(answer["choices"])))
    return [c["text"] for c in answer["choices"]]


def stream_events(url: str, **body) -> list[str]:
    """The `data:` payloads of a streamed completion, [DONE] included."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def started(role: str, n: int, num_prompts: int) -> set[tuple]:
    """The engine requests a PD call of `num_prompts` prompts x `n` starts on a `role` server (room 100):
    {(rid, room, max_new_tokens, seed, keep_prompt_cached)}."""
    calls = set()

    async def generate(rid, ids, sampling, pd, owner):
        calls.add(
            (
                rid,
                pd["bootstrap_room"],
                sampling.max_new_tokens,
                sampling.seed,
                pd.get("keep_prompt_cached", False),
            )
        )
        yield StrOut(rid, "x", [5], finished=True, finish_reason="length")

    state = SimpleNamespace(tm=SimpleNamespace(generate=generate), server_info={"role": role})
    job = Job("completion", "r", "m", [[1] * 40] * num_prompts, SamplingParams(max_new_tokens=4, seed=9), n,
              False, False)  # fmt: skip
    gens = job.start(state, {"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 100})

    async def drain():
        async for _ in merge_streams(gens):
            pass

    asyncio.run(drain())
    return calls


def test_prefill_sends_each_prompt_once_and_decode_forks_it():
    """Both servers see the same body: the prefill starts one request per prompt in the prompt's room;
    the decode receives that room with a one-token helper, its n choices carry no room (they start
    from its prefix cache) and seeds seed + k."""
    assert started("prefill", 3, 2) == {("r-0", 100, 4, 9, False), ("r-1", 101, 4, 9, False)}
    # only the helpers' pages stay in the decode's prefix cache (keep_prompt_cached)
    helpers = {("r-prompt0", 100, 1, None, True), ("r-prompt1", 101, 1, None, True)}
    choices = {(f"r-{i}", None, 4, 9 + i % 3, False) for i in range(6)}
    assert started("decode", 3, 2) == helpers | choices
    a_list = {("r-0", 100, 4, 9, False), ("r-1", 101, 4, 9, False)}  # a room per prompt
    assert started("decode", 1, 2) == a_list


def colocated_answers(url: str) -> dict:
    return {
        "greedy": texts(complete(url, prompt=PROMPT, **GREEDY))[0],
        "seeded": texts(complete(url, prompt=STORY, n=3, **SEEDED)),
    }


colocated, pd = pd_fixtures(colocated_answers)


def computed(server: ServerProcess) -> float:
    """Prompt tokens of finished requests not taken from the prefix cache (on the decode server a PD
    request counts as computed what the prefill computed for it)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return metric_value(text, "disagg_prompt_tokens_total") - metric_value(
        text, "disagg_cached_prompt_tokens_total"
    )


@pytest.mark.slow
def test_a_one_token_request_leaves_nothing_cached_on_the_decode(pd):
    """Only a shared prompt's helper fills the decode's prefix cache: a PD request of one token (a
    TTFT benchmark's) frees its pages, or the idle decode would look as if it leaked them."""
    assert_pool_free(pd.decode)  # and its cache flushed
    goats = "Tally the goats: " + ", ".join(f"goat {i}" for i in range(12))  # shares no page with PROMPT
    complete(pd.url, prompt=goats, max_tokens=1, temperature=0)
    assert wait_until(lambda: is_idle(pd.decode), timeout=30)
    assert stats(pd.decode)["num_cached_pages"] == 0


@pytest.mark.slow
def test_greedy_n_is_the_colocated_answer_n_times_from_one_prefill(pd, colocated):
    before = computed(pd.prefill), computed(pd.decode)
    answer = complete(pd.url, prompt=PROMPT + " and more", n=3, **GREEDY)  # new to both caches
    usage, length = answer["usage"], answer["usage"]["prompt_tokens"]
    # the prefill's request ends when the decode side acknowledged its pages: long before the answer
    assert wait_until(lambda: computed(pd.prefill) - before[0] >= length, timeout=30)
    assert computed(pd.prefill) - before[0] == length  # once, not 3 times
    # the decode server: the shipped prompt, then each choice its last partial page (16 tokens) only
    assert length <= computed(pd.decode) - before[1] <= length + 3 * 16
    assert usage["completion_tokens"] == 3 * 8 and usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert texts(complete(pd.url, prompt=PROMPT, n=3, **GREEDY)) == [colocated["greedy"]] * 3


@pytest.mark.slow
def test_seeded_n_samples_as_colocated(pd, colocated):
    got = texts(complete(pd.url, prompt=STORY, n=3, **SEEDED))
    assert got == colocated["seeded"]
    assert len(set(got)) == 3  # each choice sampled on its own (seed + index)


@pytest.mark.slow
def test_prompt_list_equals_separate_requests(pd):
    alone = [texts(complete(pd.url, prompt=p, **GREEDY))[0] for p in PROMPTS]
    both = complete(pd.url, prompt=PROMPTS, n=2, **GREEDY)
    assert texts(both) == [t for t in alone for _ in range(2)]
    usage = both["usage"]
    assert usage["completion_tokens"] == 6 * 8
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    streamed: dict[int, str] = {}
    for chunk in map(json.loads, stream_events(pd.url, prompt=PROMPTS, **GREEDY)[:-1]):
        for c in chunk["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert [streamed[i] for i in range(3)] == alone
    batch = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    r = httpx.post(pd.url + "/generate", json=batch, timeout=120)
    assert r.status_code == 200, r.text
    assert [a["text"] for a in r.json()] == alone


@pytest.mark.slow
def test_stream_carries_every_index_and_one_done(pd, colocated):
    events = stream_events(pd.url, prompt=STORY, n=3, stream_options={"include_usage": True}, **SEEDED)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    got: dict[int, str] = {}
    for chunk in map(json.loads, events[:-1]):
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            got[c["index"]] = got.get(c["index"], "") + c["text"]
    assert [got[i] for i in range(3)] == colocated["seeded"]
    assert chunk["usage"]["completion_tokens"] == 3 * 8


@pytest.mark.slow
def test_client_leaving_mid_stream_frees_everything(pd):
    body = {
        "prompt": PROMPT,
        "n": 3,
        "max_tokens": 200,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", pd.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the choices are decoding; leave
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


@pytest.mark.slow
def test_abort_request_ends_every_choice(pd):
    rid = f"pd-n-{random.getrandbits(32)}"
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 200, "temperature": 1.0, "ignore_eos": True, "rid": rid}
    reasons: dict[int, str] = {}
    with httpx.stream("POST", pd.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        lines = r.iter_lines()
        next(x for x in lines if x.startswith("data: {"))  # decoding
        assert httpx.post(pd.url + "/abort_request", json={"rid": rid}, timeout=10).status_code == 200
        for line in lines:
            if line.startswith("data: {"):
                reasons.update({c["index"]: c["finish_reason"] for c in json.loads(line[6:])["choices"]})
    assert reasons == {0: "abort", 1: "abort", 2: "abort"}
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


@pytest.mark.slow
def test_failed_transfer_fails_every_choice(pd):
    """A room the prefill never fills (no prefill leg): all n choices end with one typed 504."""
    room = {"bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port,
            "bootstrap_room": random.getrandbits(62)}  # fmt: skip
    r = httpx.post(
        pd.decode.url + "/v1/completions", json={"prompt": PROMPT, "n": 3, **GREEDY, **room}, timeout=120
    )
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "kv_transfer_failed"
    assert_pool_free(pd.decode)


@pytest.mark.slow
def test_pools_free_afterwards(pd):
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)
