"""The OpenAI surface users call (issue 23) through the real `openai` client against a colocated
server: n choices and prompt lists with OpenAI's usage, logit_bias, return_token_ids, /tokenize and
/detokenize, `usage: null` on chunks, structured outputs (json_schema, json_object, regex), tool calls
(named / required / none, streamed deltas) and a clear 400 for what the server cannot honour."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from disagg.common.engine.request import Req, SamplingParams
from disagg.common.engine.sampling import Sampler
from disagg.common.server.ipc import StrOut
from disagg.common.server.metrics import ServerMetrics
from disagg.common.server.shared_prompt import SharedPrompts
from disagg.common.server.tokenizer_manager import ReqState, TokenizerManager

from tests.server_helpers import SMALL_SERVER_ARGS, ServerProcess, metric_value

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


# ---- the sampler, in process (fast) ----


def _req(rid: str, seed: int | None, n_out: int, **kw) -> Req:
    return Req(rid, [1, 2, 3], SamplingParams(temperature=1.0, seed=seed, **kw), output_ids=[7] * n_out)


def test_seeded_draw_depends_on_seed_and_position_only():
    """A PD decode samples token n with a fresh Sampler: it must draw what the colocated one drew."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    long_lived = Sampler(torch.device("cpu"), seed=123)
    drawn = [long_lived.sample(logits, [_req("a", 42, pos)]).token_ids[0] for pos in range(12)]
    fresh = [
        Sampler(torch.device("cpu"), seed=9).sample(logits, [_req("b", 42, pos)]).token_ids[0]
        for pos in range(12)
    ]
    assert drawn == fresh
    assert len(set(drawn)) > 1, "positions must not all draw the same token"
    other = [
        Sampler(torch.device("cpu")).sample(logits, [_req("c", 43, pos)]).token_ids[0] for pos in range(12)
    ]
    assert other != drawn


def test_logit_bias_bans_and_forces_in_the_sampler():
    logits = torch.zeros(2, 20)
    logits[:, 5] = 50.0  # the model's overwhelming favourite
    reqs = [_req("ban", None, 0, logit_bias=[[5, -100.0]]), _req("force", None, 0, logit_bias=[[11, 100.0]])]
    sampler = Sampler(torch.device("cpu"))
    for _ in range(20):
        ban, force = sampler.sample(logits, reqs).token_ids
        assert ban != 5 and force == 11


def _helper_then_choice(helper_reason: str) -> tuple[list, list[str], dict]:
    """Run one choice of a shared prompt against a fake tokenizer manager whose helper request ends
    with `helper_reason`: (the choice's outputs, the rids started, the call's usage)."""
    started: list[str] = []

    async def generate(rid, ids, sampling, pd, owner):
        started.append(rid)
        yield StrOut(rid, "x", [5], finished=True, finish_reason=helper_reason if "prompt" in rid else "length",
                     error="aborted" if helper_reason == "abort" else None, cached_tokens=7)  # fmt: skip

    shared = SharedPrompts(SimpleNamespace(tm=SimpleNamespace(generate=generate)), "r", [[1] * 40], None)

    async def run():
        return [out async for out in shared.after(0, generate("r-0", [1] * 40, None, None, None))]

    outs = asyncio.run(run())
    return outs, started, shared.usage({"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 39}})


def test_shared_prompt_runs_once_then_its_choices():
    outs, started, usage = _helper_then_choice("length")
    assert started == ["r-prompt0", "r-0"] and [o.rid for o in outs] == ["r-0"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 7  # what the helper found, not the choices


def test_abort_during_the_shared_prompt_ends_the_choices_unstarted():
    """/abort_request reaches the helper (a sibling rid): its choices answer abort without running."""
    outs, started, _ = _helper_then_choice("abort")
    assert started == ["r-prompt0"] and [(o.finished, o.finish_reason) for o in outs] == [(True, "abort")]


def test_abort_request_reaches_the_shared_prompt_helper():
    tm = TokenizerManager(SimpleNamespace(get_vocab=lambda: {"a": 1}), None, 100, ServerMetrics())
    sent: list = []
    tm._send = sent.append
    for rid in ("cmpl-1-prompt0", "cmpl-1-0", "cmpl-12-prompt0"):
        tm.reqs[rid] = ReqState()
    assert tm.abort("cmpl-1") == 2 and sorted(m.rid for m in sent) == ["cmpl-1-0", "cmpl-1-prompt0"]


# ---- a colocated server through the openai client ----


@pytest.fixture(scope="module")
def server(default_model_path):
    with ServerProcess(*SMALL_SERVER_ARGS) as srv:
        yield srv.start()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.slow
def test_n_choices_and_usage(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                          max_tokens=6, temperature=1.0, seed=5,
                                          extra_body={"return_token_ids": True})  # fmt: skip
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    u, prompt_ids = chat.usage, chat.model_extra["prompt_token_ids"]
    assert u.prompt_tokens == len(prompt_ids)  # the shared prompt once, not n times
    assert u.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in chat.choices)
    assert u.prompt_tokens_details.cached_tokens <= u.prompt_tokens  # issue 23: was 3x the prompt
    assert len({c.message.content for c in chat.choices}) > 1, "seed+index: the n samples differ"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                            max_tokens=6, temperature=1.0, seed=5, stream=True)  # fmt: skip
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {c.index: c.message.content for c in chat.choices}


@pytest.mark.slow
def test_n_choices_compute_the_prompt_once(server, client):
    """The n choices share the prompt's KV pages: /metrics counts the prompt computed once (plus each
    choice's last partial page), not n times; usage reports nothing cached for a new prompt."""
    http = httpx.Client(base_url=server.url, timeout=60)

    def computed() -> float:
        text = http.get("/metrics").text
        return metric_value(text, "disagg_prompt_tokens_total") - metric_value(
            text, "disagg_cached_prompt_tokens_total"
        )

    prompt = "Count the sheep: " + ", ".join(f"sheep {i}" for i in range(60))  # new to the cache
    before = computed()
    comp = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=3, temperature=1.0, seed=2)
    length, n, page = comp.usage.prompt_tokens, 4, 16
    assert length > 4 * page and comp.usage.prompt_tokens_details.cached_tokens == 0
    assert length <= computed() - before <= length + n * (page + 1)  # was n * length
    assert sorted(c.index for c in comp.choices) == [0, 1, 2, 3] and comp.usage.completion_tokens == 12
    streamed = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=3, temperature=1.0, seed=2,
                                         stream=True, stream_options={"include_usage": True})  # fmt: skip
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in comp.choices}  # seeded: the same samples
    assert chunk.usage.prompt_tokens_details.cached_tokens > length - 2 * page  # cached by the first call


@pytest.mark.slow
def test_prompt_list_counts_each_prompt_once(client):
    one = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
        for p in (PROMPT, "1, 2, 3,")
    ]
    both = client.completions.create(
        model=MODEL, prompt=[PROMPT, "1, 2, 3,"], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [one[0].choices[0].text] * 2 + [one[1].choices[0].text] * 2
    assert both.usage.prompt_tokens == one[0].usage.prompt_tokens + one[1].usage.prompt_tokens
    assert both.usage.completion_tokens == 16
    assert both.usage.prompt_tokens_details.cached_tokens <= both.usage.prompt_tokens


@pytest.mark.slow
def test_logit_bias_bans_the_greedy_token(client):
    kw = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"return_token_ids": True},
    }
    free = client.completions.create(**kw).model_extra or {}
    ids = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    assert len(ids) == 8, free
    banned = {str(t): -100 for t in set(ids)}
    biased = client.completions.create(**kw, logit_bias=banned).choices[0].model_extra["token_ids"]
    assert biased and not set(biased) & set(ids)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logit_bias={"99999999": -100})


@pytest.mark.slow
def test_return_token_ids_match_tokenize(server, client):
    http = httpx.Client(base_url=server.url, timeout=60)
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    comp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                     extra_body={"return_token_ids": True})  # fmt: skip
    choice = comp.choices[0].model_extra
    assert choice["prompt_token_ids"] == prompt_ids
    assert (
        http.post("/detokenize", json={"tokens": choice["token_ids"]}).json()["prompt"]
        == comp.choices[0].text
    )
    # streamed: the prompt ids once, the token ids of every chunk add up to the whole output
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            extra_body={"return_token_ids": True}))  # fmt: skip
    assert [c.choices[0].model_extra.get("prompt_token_ids") for c in chunks][0] == prompt_ids
    assert sum((c.choices[0].model_extra["token_ids"] for c in chunks), []) == choice["token_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    chat_ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"return_token_ids": True})  # fmt: skip
    assert (
        chat.model_extra["prompt_token_ids"] == chat_ids
        and len(chat.choices[0].model_extra["token_ids"]) == 4
    )
    native = http.post("/generate", json={"text": PROMPT, "return_prompt_ids": True,
                                          "sampling_params": {"max_new_tokens": 2}}).json()  # fmt: skip
    assert native["meta_info"]["prompt_ids"] == prompt_ids


@pytest.mark.slow
def test_stream_chunks_carry_null_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


@pytest.mark.slow
def test_streamed_echo_with_logprobs_starts_with_the_prompt(client):
    """As vLLM streams it: the first chunk carries the echoed prompt with its logprobs (tests/test_pd_echo.py
    compares the whole stream, colocated and through PD)."""
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1,
                                            temperature=0, stream=True))  # fmt: skip
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPT) and "".join(first.logprobs.tokens).startswith(PROMPT)
    assert first.logprobs.token_logprobs[0] is None and all(
        isinstance(x, float) for x in first.logprobs.token_logprobs[1:]
    )


@pytest.mark.slow
def test_echo_with_logprobs_gives_the_prompt_logprobs_of_transformers(client, default_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - the reference, here only

    tok = AutoTokenizer.from_pretrained(default_model_path)
    ids, n_out = tok.encode(PROMPT), 3
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for _ in range(2):  # the second time the prompt is in the prefix cache: computed again all the same
        choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n_out, temperature=0, echo=True,
                                           logprobs=2).choices[0]  # fmt: skip
        lp, n = choice.logprobs, len(ids)
        assert choice.text.startswith(PROMPT) and len(lp.tokens) == len(lp.token_logprobs) == n + n_out
        assert "".join(lp.tokens[:n]) == PROMPT and "".join(lp.tokens) == choice.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first
        assert lp.token_logprobs[1:n] == pytest.approx(
            [ref[i, ids[i + 1]].item() for i in range(n - 1)], abs=2e-3
        )
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(n + n_out)]
        for i in range(1, n):
            assert (
                tok.decode([ref[i - 1].argmax().item()]) in lp.top_logprobs[i]
                and len(lp.top_logprobs[i]) <= 2
            )


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                     "enum": ["Paris", "Tokyo"]}}, "required": ["city"]}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


def _reassembled(chunks) -> tuple[list[tuple[str, str]], str | None]:
    """The calls a streaming client rebuilds from OpenAI's tool_call deltas, and the finish reason."""
    calls: dict[int, list] = {}
    reason = None
    for chunk in chunks:
        for c in chunk.choices:
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or []:
                if d.id:
                    assert d.index not in calls and d.function.arguments == ""
                    calls[d.index] = [d.function.name, ""]
                else:
                    calls[d.index][1] += d.function.arguments
    return [tuple(calls[i]) for i in sorted(calls)], reason


@pytest.mark.slow
def test_tool_choice_named_and_required_give_calls_that_validate(client):
    import jsonschema  # noqa: PLC0415 - a test dependency

    pytest.importorskip("xgrammar")
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
    chat = client.chat.completions.create(**kw, tool_choice=named)
    choice = chat.choices[0]
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert choice.message.content is None and choice.finish_reason == "stop"  # OpenAI's, for a forced call
    streamed = _reassembled(client.chat.completions.create(**kw, tool_choice=named, stream=True))
    assert streamed == ([("get_weather", call.function.arguments)], "stop")

    # NOTE: a 135M model sampled at temperature 1 may list calls until max_tokens: one call at most
    kw["parallel_tool_calls"] = False
    chat = client.chat.completions.create(**{**kw, "temperature": 1.0}, tool_choice="required", n=2, seed=7)
    for choice in chat.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    whole = client.chat.completions.create(**kw, tool_choice="required").choices[0]
    streamed = _reassembled(client.chat.completions.create(**kw, tool_choice="required", stream=True))
    assert streamed == (
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls],
        "tool_calls",
    )


@pytest.mark.slow
def test_tool_choice_none_and_tool_history_give_text(client):
    kw = {"model": MODEL, "tools": TOOLS, "max_tokens": 8, "temperature": 0}
    none = client.chat.completions.create(**kw, messages=ASK, tool_choice="none").choices[0]
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0).choices[0]
    assert none.message.tool_calls is None and none.message.content == plain.message.content
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]  # fmt: skip
    after = client.chat.completions.create(**kw, messages=history, tool_choice="none").choices[0]
    assert after.message.content and after.message.tool_calls is None
    auto = client.chat.completions.create(**kw, messages=ASK)  # OpenAI's default with tools: auto
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            **kw, messages=ASK, tool_choice={"type": "function", "function": {"name": "x"}}
        )
    assert e.value.param == "tool_choice"


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "capital"],
    "additionalProperties": False,
}


def matches_schema(text: str) -> bool:
    obj = json.loads(text)
    return (
        set(obj) == {"city", "capital"}
        and obj["city"] in ("Paris", "Lyon", "Nice")
        and isinstance(obj["capital"], bool)
    )


@pytest.mark.slow
def test_structured_outputs(client):
    pytest.importorskip("xgrammar")  # optional: without it response_format is a 400 "unsupported"
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, n=2, temperature=1.0,
                                          seed=3, response_format=fmt)  # fmt: skip
    for choice in chat.choices:
        assert choice.finish_reason == "stop" and matches_schema(choice.message.content), choice
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, response_format=fmt, stream=True) if c.choices)  # fmt: skip
    assert matches_schema(streamed)
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    with contextlib.suppress(ValueError):  # the grammar, not the model, made it match (it omits "capital")
        assert not matches_schema(free.choices[0].message.content)
    obj = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})  # fmt: skip
    assert obj.choices[0].finish_reason == "stop" and isinstance(
        json.loads(obj.choices[0].message.content), dict
    )
    digits = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=12, temperature=0,
                                       extra_body={"regex": "[0-9]{3}-[0-9]{4}"})  # fmt: skip
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", digits.choices[0].text)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, response_format=bad)
