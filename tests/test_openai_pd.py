"""The OpenAI surface through a PD deployment (prefill + decode + our router, real processes) with the
`openai` client: n choices and prompt lists (one room per sub-request), seeded sampling identical to a
colocated server, logit_bias applied on both sides, return_token_ids, json_schema, a tool call; every
page back."""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest

from tests.pd_helpers import assert_pool_free, pd_fixtures

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
HAS_XGRAMMAR = importlib.util.find_spec("xgrammar") is not None
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def seeded_chat(client: openai.OpenAI, stream: bool) -> dict[int, str]:
    kw = {"model": MODEL, "messages": MESSAGES, "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    if not stream:
        return {c.index: c.message.content for c in client.chat.completions.create(**kw).choices}
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    return texts


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}, "capital": {"type": "boolean"}},
    "required": ["city", "capital"],
    "additionalProperties": False,
}


def structured(client: openai.OpenAI) -> str:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                          response_format=fmt)  # fmt: skip
    assert chat.choices[0].finish_reason == "stop"
    return chat.choices[0].message.content


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
    "required": ["city"], "additionalProperties": False}}}  # fmt: skip


def tool_call(client: openai.OpenAI) -> tuple[str, str]:
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, tools=[TOOL],
                                          tool_choice="required", parallel_tool_calls=False)  # fmt: skip
    assert chat.choices[0].finish_reason == "tool_calls"
    (call,) = chat.choices[0].message.tool_calls
    return call.function.name, call.function.arguments


def greedy_list(client: openai.OpenAI) -> list[str]:
    comp = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, max_tokens=6, temperature=0)
    return [c.text for c in sorted(comp.choices, key=lambda c: c.index)]


def colocated_answers(url: str) -> dict:
    client = _client(url)
    return {
        "seeded": seeded_chat(client, stream=False),
        "list": greedy_list(client),
        "json": structured(client) if HAS_XGRAMMAR else None,
        "tool": tool_call(client) if HAS_XGRAMMAR else None,
    }


colocated, pd = pd_fixtures(colocated_answers)


def test_n_choices_through_pd_sample_as_colocated(pd, colocated):
    client = _client(pd.url)
    assert seeded_chat(client, stream=False) == colocated["seeded"]
    assert seeded_chat(client, stream=True) == colocated["seeded"]  # every choice streamed with its index
    assert colocated["seeded"][0] != colocated["seeded"][1]


def test_prompt_list_through_pd(pd, colocated):
    client = _client(pd.url)
    assert greedy_list(client) == colocated["list"]
    comp = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, max_tokens=6, temperature=0)
    assert comp.usage.prompt_tokens_details.cached_tokens <= comp.usage.prompt_tokens


def test_logit_bias_and_token_ids_through_pd(pd):
    client = _client(pd.url)
    kw = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0,
        "extra_body": {"return_token_ids": True},
    }
    free = client.chat.completions.create(**kw)
    ids = free.choices[0].model_extra["token_ids"]
    assert len(ids) == 6 and free.model_extra["prompt_token_ids"]
    # the first token is sampled on the prefill, the rest on the decode: both must apply the bias
    banned = client.chat.completions.create(**kw, logit_bias={str(t): -100 for t in ids})
    assert not set(banned.choices[0].model_extra["token_ids"]) & set(ids)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].model_extra["prompt_token_ids"] == free.model_extra["prompt_token_ids"]
    assert sum((c.choices[0].model_extra.get("token_ids", []) for c in chunks if c.choices), []) == ids


@pytest.mark.skipif(not HAS_XGRAMMAR, reason="xgrammar is not installed")
def test_json_schema_through_pd(pd, colocated):
    """The prefill samples the first token under the grammar; the decode's matcher catches up past it."""
    text = structured(_client(pd.url))
    assert text == colocated["json"]
    obj = json.loads(text)
    assert set(obj) == {"city", "capital"} and isinstance(obj["capital"], bool)


@pytest.mark.skipif(not HAS_XGRAMMAR, reason="xgrammar is not installed")
def test_tool_call_through_pd(pd, colocated):
    """tool_choice required: the call's grammar on both sides, the decode's front end parses the call."""
    name, arguments = tool_call(_client(pd.url))
    assert (name, arguments) == colocated["tool"] and json.loads(arguments)["city"] in ("Paris", "Lyon")


def test_pd_holds_no_pages_afterwards(pd):
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)
