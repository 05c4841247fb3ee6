"""The real server (launch_server, default model) through httpx and the openai client: outputs equal
to the offline engine, streaming, n/seed/stop/logprobs, every bad input a 4xx with an error object,
aborts and disconnects giving every page back, /metrics moving."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import REFERENCE_ENGINE
from tests.procs import wait_until
from tests.server_helpers import SMALL_SERVER_ARGS, ServerProcess, metric_value

pytestmark = pytest.mark.slow

API_KEY = "test-key"
BODY_LIMIT = 65536
PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(default_model_path):
    with ServerProcess(
        *SMALL_SERVER_ARGS, "--max-request-body-size", str(BODY_LIMIT), api_key=API_KEY
    ) as srv:
        yield srv.start()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def engine(engines):
    return engines.get(**REFERENCE_ENGINE)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def scheduler_stats(http) -> dict:
    return http.get("/server_info").json()["internal_states"][0]


def pages_released(http) -> bool:
    s = scheduler_stats(http)
    if "stale_for_s" in s:  # the scheduler was busy past the stats timeout: these are older figures
        return False
    return s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_used_pages"] == s["num_cached_pages"]


def test_health_is_open_everything_else_needs_the_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200  # scrapers carry no key
    for path in ("/v1/models", "/server_info"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": PROMPT}, headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=server.headers).status_code == 200


def test_models_and_info(http):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert http.get("/model_info").json()["is_generation"] is True
    info = http.get("/server_info").json()
    assert info["context_length"] == 512 and info["api_key"] is None  # the key is never shown


def test_greedy_equals_offline_engine(http, engine):
    ids = engine.tokenizer.encode(PROMPT)
    want = engine.generate([ids], {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})[0]
    native = http.post("/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}).json()  # fmt: skip
    assert native["output_ids"] == want["output_ids"]
    assert native["text"] == want["text"]
    assert native["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    comp = http.post("/v1/completions", json={"prompt": PROMPT, **GREEDY}).json()
    assert comp["choices"][0]["text"] == want["text"]
    assert comp["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6,
                             "prompt_tokens_details": comp["usage"]["prompt_tokens_details"]}  # fmt: skip


def test_chat_equals_offline_engine(http, engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    want = engine.generate([ids], {"max_new_tokens": 8, "temperature": 0})[0]
    got = http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}
    ).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": want["text"]}
    assert got["choices"][0]["finish_reason"] == want["finish_reason"]
    assert got["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_stream_equals_non_stream(http, kind):
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi"}], **GREEDY}
    else:
        path, body = "/v1/completions", {"prompt": PROMPT, **GREEDY}
    full = http.post(path, json=body).json()
    with http.stream(
        "POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):  # cached_tokens: the prefix cache grew
        assert usage_chunk["usage"][key] == full["usage"][key]
    chunks = [e for e in events[:-2]]
    if kind == "chat":
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == full["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_echo_prepends_the_prompt(http):
    body = {"prompt": PROMPT, **GREEDY, "max_tokens": 2, "echo": True}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert full.startswith(PROMPT) and len(full) > len(PROMPT)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)[:-1]
    assert "".join(e["choices"][0]["text"] for e in events) == full


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 5
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    parts, last_usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        last_usage = chunk.usage or last_usage
    assert "".join(parts) == chat.choices[0].message.content
    assert last_usage.completion_tokens == chat.usage.completion_tokens
    comp = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4, temperature=0
    )
    assert comp.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))  # fmt: skip
    assert streamed == comp.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)


def test_n_with_seed_is_reproducible(http):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "temperature": 1.0,
        "n": 3,
        "seed": 7,
        "ignore_eos": True,
    }
    a = http.post("/v1/completions", json=body).json()
    b = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1  # different seeds per sample
    assert a["usage"]["completion_tokens"] == 18


def test_stop_string_is_cut(http):
    full = http.post("/v1/completions", json={"prompt": PROMPT, **GREEDY, "max_tokens": 8}).json()["choices"][
        0
    ]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    want = full[: full.index(stop)]
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8, "stop": [stop]}
    got = http.post("/v1/completions", json=body).json()["choices"][0]
    assert (got["text"], got["finish_reason"], got["matched_stop"]) == (want, "stop", stop)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)[:-1]
    assert "".join(e["choices"][0]["text"] for e in events) == want  # no piece of the stop string leaks


def test_logprobs(http):
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                     "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()  # fmt: skip
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    comp = http.post(
        "/v1/completions", json={"prompt": PROMPT, **GREEDY, "max_tokens": 3, "logprobs": 1}
    ).json()
    lp = comp["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == comp["choices"][0]["text"] and len(lp["token_logprobs"]) == 3
    assert all(len(t) == 1 for t in lp["top_logprobs"])


def test_generate_native_shape_and_pd_fields(http):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "rid": "native-1",
            "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 2**63 - 5,
            "log_metrics": True, "return_hidden_states": False}  # fmt: skip
    out = http.post("/generate", json=body).json()
    assert out["meta_info"]["id"] == "native-1"
    assert set(out["meta_info"]) >= {"finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"}
    batch = http.post(
        "/generate", json={"text": [PROMPT, "Hello"], "sampling_params": {"max_new_tokens": 2}}
    ).json()
    assert len(batch) == 2 and all(b["meta_info"]["completion_tokens"] <= 2 for b in batch)
    with http.stream("POST", "/generate", json={**body, "rid": "native-2", "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["text"] == out["text"]  # cumulative text, SGLang's shape


LONG = "hello " * 600
BAD_INPUTS = [
    ("invalid-json", "/v1/completions", b"{bad", 400, None),
    ("array-body", "/v1/completions", [1, 2], 400, None),
    ("wrong-type", "/v1/completions", {"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("wrong-type-messages", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("unknown-model", "/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("empty-text", "/generate", {"text": ""}, 400, "prompt"),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("chat-too-long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "prompt"),
    ("max-tokens-zero", "/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("max-tokens-past-context", "/v1/completions", {"prompt": PROMPT, "max_tokens": 600}, 400, "max_tokens"),
    ("negative-temperature", "/v1/completions", {"prompt": PROMPT, "temperature": -0.5}, 400, "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ("n-zero", "/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n"),
    ("seed-too-big", "/v1/completions", {"prompt": PROMPT, "seed": 2**70}, 400, "seed"),
    ("top-k-too-big", "/v1/completions", {"prompt": PROMPT, "top_k": 10**20}, 400, "top_k"),
    ("unknown-sampling-param", "/generate", {"text": PROMPT, "sampling_params": {"bogus": 1}}, 400, "sampling_params.bogus"),
    ("text-and-ids", "/generate", {"text": PROMPT, "input_ids": [1, 2]}, 400, "text"),
    ("token-out-of-vocab", "/generate", {"input_ids": [10**9]}, 400, None),
    ("token-id-overflow", "/v1/completions", {"prompt": [2**70]}, 400, "prompt"),
    ("negative-token-id", "/generate", {"input_ids": [-5]}, 400, "input_ids"),
    ("abort-without-rid", "/abort_request", {}, 400, "rid"),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,status,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_error_object(http, name, path, body, status, param):
    r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_unknown_route_and_oversized_bodies(http):
    r = http.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    big = {"prompt": "x" * (BODY_LIMIT + 10)}
    r = http.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b" " * 1000

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_server_survives_bad_inputs_and_holds_no_pages(http):
    assert http.get("/health").status_code == 200
    assert wait_until(lambda: pages_released(http))


def long_generate_body(rid: str) -> dict:
    return {"text": PROMPT, "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}  # fmt: skip


def test_abort_request_frees_pages(http):
    with http.stream("POST", "/generate", json=long_generate_body("to-abort")) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["meta_info"]["finish_reason"] is None
        assert http.post("/abort_request", json={"rid": "to-abort"}).json() == {"aborted": 1}
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-1]["meta_info"]["completion_tokens"] < 400
    assert wait_until(lambda: pages_released(http))
    assert http.post("/flush_cache").status_code == 200
    assert scheduler_stats(http)["num_used_pages"] == 0  # all pages free


def test_client_disconnect_frees_pages(http, server):
    with server.client() as other:
        with other.stream("POST", "/generate", json=long_generate_body("to-drop")) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
    # the stream is closed mid-generation: the server must abort it
    assert wait_until(lambda: pages_released(http), timeout=20)
    with pytest.raises(httpx.ReadTimeout), server.client(timeout=1.5) as other:
        other.post("/generate", json={**long_generate_body("to-drop-2"), "stream": False})
    assert wait_until(lambda: pages_released(http), timeout=20)
    assert http.post("/flush_cache").status_code == 200
    assert scheduler_stats(http)["num_used_pages"] == 0


def test_metrics_move(http):
    def scrape() -> str:
        return http.get("/metrics").text

    before = scrape()
    http.post("/v1/completions", json={"prompt": PROMPT, **GREEDY, "max_tokens": 4})
    after = scrape()
    for name, delta in [("disagg_generation_tokens_total", 4), ("disagg_time_to_first_token_seconds_count", 1),
                        ("disagg_e2e_request_latency_seconds_count", 1), ("disagg_inter_token_latency_seconds_count", 3),
                        ("disagg_prompt_tokens_total", 5)]:  # fmt: skip
        assert (
            metric_value(after, name, role="server") - metric_value(before, name, role="server") == delta
        ), name
    # its time to first token by stage: one more request tokenized, taken in, queued, computed to its first token
    for stage in ("tokenize", "receive", "wait_queue", "forward"):
        name = "disagg_per_stage_req_latency_seconds_count"
        assert (
            metric_value(after, name, role="server", stage=stage)
            - metric_value(before, name, role="server", stage=stage)
            == 1
        ), stage
    assert metric_value(after, "disagg_requests_total", finish_reason="length") >= 1
    assert metric_value(after, "disagg_num_total_pages", role="server") == 4096 // 16
    # a running request shows up in the gauges, its abort in the counter
    with http.stream("POST", "/generate", json=long_generate_body("gauge")) as r:
        lines = r.iter_lines()  # NOTE: keep the iterator: dropping it closes the stream (a disconnect)
        next(line for line in lines if line.startswith("data: "))
        running = wait_until(
            lambda: metric_value(scrape(), "disagg_num_running_requests", role="server") == 1
        )
        during = scrape()
        assert http.post("/abort_request", json={"rid": "gauge"}).json() == {"aborted": 1}
    assert running and metric_value(during, "disagg_kv_usage_ratio", role="server") > 0
    aborts = metric_value(after, "disagg_requests_total", finish_reason="abort")
    assert wait_until(
        lambda: metric_value(scrape(), "disagg_requests_total", finish_reason="abort") == aborts + 1
    )


def test_serving_benchmark_against_the_server(server, tmp_path):
    from disagg.common.bench.serving import main

    out = tmp_path / "bench.json"
    main(["--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "3", "--max-concurrency", "2",
          "--input-len", "16", "--output-len", "4", "--goodput", "ttft:60000", "itl:60000",
          "--output-json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["failed"] == 0
    assert result["total_output_tokens"] == 12  # ignore_eos: exactly the asked lengths
    assert result["goodput"] == pytest.approx(result["request_throughput"])
    assert result["ttft_ms"]["p50"] > 0 and result["itl_ms"]["p99"] >= result["itl_ms"]["p50"]
