"""Prefill + decode servers behind a router, end to end on the CPU with the default model."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from tests.conftest import REFERENCE_ENGINE
from tests.pd_helpers import PDCluster, assert_pool_free, generate_ids, is_idle, stats, wait_until
from tests.server_helpers import metric_value

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
LONG = "Disaggregated serving splits the prompt phase from the token phase of a language model. " * 6
PROMPTS = [
    "The capital of France is",
    LONG + "In one sentence, the main benefit is",  # several chunks of 64 tokens
    LONG + "A second question about it:",  # shares the long prefix: prefix cache hit on prefill
    "def fibonacci(n):",
]
CHATS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": LONG + "Summarize."}],
]


@pytest.fixture(scope="module")
def engine(engines):
    return engines.get(**REFERENCE_ENGINE)


def reference_ids(engine, prompt_ids: list[list[int]]) -> list[list[int]]:
    outs = engine.generate(prompt_ids, {"max_new_tokens": MAX_TOKENS, "temperature": 0})
    return [o["output_ids"] for o in outs]


def chat_ids(engine, messages) -> list[int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def pd():
    # a decode pool of 40 pages: the concurrent mix below must wait in its prealloc queue
    with PDCluster(decode_args=["--max-total-tokens", "640"]) as cluster:
        yield cluster


class StageWatch:
    """The largest size each stage of a server's queues reached while the block ran."""

    def __init__(self, server):
        self.server, self.peak, self.done = server, {}, threading.Event()

    def __enter__(self):
        def watch():
            while not self.done.is_set():
                for stage, n in stats(self.server)["queues"].items():
                    self.peak[stage] = max(self.peak.get(stage, 0), n)
                time.sleep(0.05)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def generate(client: httpx.Client, prompt: str, stream: bool, **extra) -> list[int]:
    return generate_ids(client, prompt, stream, MAX_TOKENS, **extra)


def chat(client: httpx.Client, messages, stream: bool, model: str | None = None) -> str:
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if model:
        body["model"] = model
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text = ""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_pd_gives_the_greedy_tokens_of_the_engine(pd, engine):
    tok = engine.tokenizer
    want = reference_ids(engine, [tok.encode(p) for p in PROMPTS])
    want_chat = [tok.decode(ids, skip_special_tokens=True)
                 for ids in reference_ids(engine, [chat_ids(engine, m) for m in CHATS])]  # fmt: skip
    with pd.client() as client, cf.ThreadPoolExecutor(12) as pool, StageWatch(pd.decode) as decode:
        gens = [pool.submit(generate, client, p, stream) for p in PROMPTS for stream in (False, True)]
        chats = [pool.submit(chat, client, m, stream) for m in CHATS for stream in (False, True)]
        got = [f.result() for f in gens]
        got_chat = [f.result() for f in chats]
    assert decode.peak["prealloc"] > 0 and decode.peak["transfer"] > 0  # the decode pool was full at times
    assert got == [w for w in want for _ in (0, 1)]
    assert got_chat == [w for w in want_chat for _ in (0, 1)]
    # the prefill server served the shared prefix from its cache; KV really moved
    assert stats(pd.prefill)["cache_hit_rate"] > 0
    metrics = httpx.get(pd.decode.url + "/metrics").text
    assert 'disagg_kv_transfer_bytes_total{role="decode"}' in metrics
    assert 'disagg_queue_requests{role="decode",stage="prealloc"}' in metrics
    # where the requests' time to first token went, stage by stage (SGLang's per-stage latency): every
    # request passed every stage of both servers, and the full decode pool's wait shows as prealloc time
    name, n = "disagg_per_stage_req_latency_seconds", len(gens) + len(chats)
    prefill = httpx.get(pd.prefill.url + "/metrics").text
    for text, role, stages in [(prefill, "prefill", ("bootstrap_queue", "wait_queue", "forward", "transfer_queue")),
                               (metrics, "decode", ("prealloc_queue", "transfer_queue"))]:  # fmt: skip
        for stage in stages:
            assert metric_value(text, name + "_count", role=role, stage=stage) >= n, (role, stage, text)
    assert metric_value(metrics, name + "_sum", role="decode", stage="prealloc_queue") > 0
    assert metric_value(prefill, name + "_sum", role="prefill", stage="forward") > 0
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


def test_first_token_streams_from_decode_and_finish_checks_apply(pd, engine):
    want = reference_ids(engine, [engine.tokenizer.encode(PROMPTS[0])])[0]
    with pd.client() as client:
        body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        r = client.post("/generate", json=body)
        assert r.json()["output_ids"] == want[:1]  # max_new_tokens=1: the prefill's token alone
        assert r.json()["meta_info"]["finish_reason"]["type"] == "length"
        k = next(i for i in range(1, len(want)) if want[i] not in want[:i])
        body["sampling_params"] = {"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [want[k]]}
        body["stream"] = True
        events = []
        with client.stream("POST", "/generate", json=body) as s:
            events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert events[0]["output_ids"] == want[:1]  # the first event carries the prefill's token
    assert events[-1]["output_ids"] == want[: k + 1]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": want[k]}


def test_logprobs_of_every_token_including_the_prefills(pd, engine):
    ids = engine.tokenizer.encode(PROMPTS[3])
    ref = engine.generate([ids], {"max_new_tokens": 6, "temperature": 0, "return_logprob": True})[0]
    body = {
        "text": PROMPTS[3],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        "return_logprob": True,
    }
    with pd.client() as client:
        meta = client.post("/generate", json=body).json()["meta_info"]
    got = meta["output_token_logprobs"]
    assert [tid for _, tid, _ in got] == ref["output_ids"]
    assert [lp for lp, _, _ in got] == pytest.approx(ref["meta_info"]["output_logprobs"], abs=1e-3)


def test_requests_without_the_router_fields(pd):
    # decode alone serves a plain request like the colocated server; prefill answers one token
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    assert len(httpx.post(pd.decode.url + "/generate", json=body, timeout=60).json()["output_ids"]) == 3
    assert len(httpx.post(pd.prefill.url + "/generate", json=body, timeout=60).json()["output_ids"]) == 1
    assert httpx.get(pd.prefill.url + "/health_generate", timeout=60).status_code == 200
    bad = {**body, "bootstrap_room": 5}  # a room without the prefill's address
    r = httpx.post(pd.decode.url + "/generate", json=bad, timeout=60)
    assert r.status_code == 400 and "bootstrap_host" in r.json()["error"]["message"]


def test_sglang_router_drives_our_servers(pd, engine):
    tok = engine.tokenizer
    want = reference_ids(engine, [tok.encode(PROMPTS[0]), chat_ids(engine, CHATS[0])])
    cluster = PDCluster(router="sglang")
    cluster.prefill, cluster.decode, cluster.bootstrap_port = pd.prefill, pd.decode, pd.bootstrap_port
    cluster.router = cluster._router().start(timeout=60)
    try:
        headers = {"content-type": "application/json"}
        with cluster.client(headers=headers) as client:
            assert generate(client, PROMPTS[0], False) == want[0]
            assert generate(client, PROMPTS[0], True) == want[0]
            model = client.get("/v1/models").json()["data"][0]["id"]
            assert chat(client, CHATS[0], True, model) == tok.decode(want[1], skip_special_tokens=True)
            assert chat(client, CHATS[0], False) == tok.decode(want[1], skip_special_tokens=True)  # no model
    finally:
        cluster.router.stop()
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


def test_idle_servers_tell_request_pages_from_the_prefix_cache(pd):
    """After PD requests the decode holds nothing (it never looks a prefix cache up for them, so it
    fills none); the prefill keeps the prompts in its prefix cache; /metrics shows which is which."""
    with pd.client() as client:
        for prompt in PROMPTS[:2]:
            generate_ids(client, prompt, stream=False, max_tokens=4)
    assert wait_until(lambda: is_idle(pd.decode) and is_idle(pd.prefill), timeout=30)
    d, p = stats(pd.decode), stats(pd.prefill)
    assert (d["num_request_pages"], d["num_cached_pages"], d["num_free_pages"]) == (
        0,
        0,
        d["num_total_pages"],
    )
    assert p["num_request_pages"] == 0 and p["num_cached_pages"] > 0
    assert p["num_free_pages"] + p["num_cached_pages"] == p["num_total_pages"]
    text = httpx.get(pd.decode.url + "/metrics", timeout=10).text
    assert 'disagg_num_request_pages{role="decode"} 0.0' in text
    assert 'disagg_num_cached_pages{role="decode"} 0.0' in text
    assert 'disagg_num_open_rooms{role="decode"} 0.0' in text
