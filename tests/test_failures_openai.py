"""OpenAI streams that move (docs/failures.md), in-process and fast: a scripted loopback worker breaks
a chat or completions stream; the router continues it as a /v1/completions request on token ids and
the client sees one stream. The same with real servers: test_failures_pd.py."""

from __future__ import annotations

import asyncio
import json

from disagg.router.openai_streams import OpenAIStreamState, can_move

from tests.test_failures_router import STREAM_HEAD, Upstream, chunk, sse, through_router


def chat_chunk(content: str | None, ids: list[int] | None = None, finish=None, **extra) -> dict:
    delta = {"role": "assistant", "content": ""} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 11, "model": "m",
            "choices": [choice], "usage": None, **extra}  # fmt: skip


def cmpl_chunk(text: str, ids: list[int], finish=None, offsets=None, **choice_extra) -> dict:
    lp = None
    if offsets is not None:
        toks = [f"<{i}>" for i in ids]
        lp = {"tokens": toks, "token_logprobs": [-0.5] * len(ids), "top_logprobs": [{t: -0.5} for t in toks],
              "text_offset": offsets}  # fmt: skip
    choice = {
        "index": 0,
        "text": text,
        "logprobs": lp,
        "finish_reason": finish,
        "token_ids": ids,
        **choice_extra,
    }
    return {"id": "cmpl-9", "object": "text_completion", "created": 22, "model": "m", "choices": [choice],
            "usage": None}  # fmt: skip


def usage_chunk(prompt: int, completion: int) -> dict:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {"id": "cmpl-9", "object": "text_completion", "created": 22, "model": "m", "choices": [],
            "usage": usage}  # fmt: skip


def whole(*events) -> bytes:
    return STREAM_HEAD + chunk(b"".join(sse(e) for e in events)) + b"0\r\n\r\n"


def test_a_broken_chat_stream_continues_as_one_stream_on_token_ids():
    first = STREAM_HEAD + chunk(
        sse(chat_chunk(None, prompt_token_ids=[1, 2, 3]))
        + sse(chat_chunk(" a", [7]))
        + sse(chat_chunk(" b", [8]))
    )  # then the socket closes
    rest = whole(
        cmpl_chunk(" c", [9], prompt_token_ids=[1, 2, 3, 7, 8]),
        cmpl_chunk(" d", [10], "length"),
        usage_chunk(5, 2),
        "[DONE]",
    )
    upstream = Upstream([first, rest])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    status, data = asyncio.run(through_router(upstream, "/v1/chat/completions", body))
    assert status == 200 and data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    # one stream: the chat's id and object throughout, the text in order, no token ids (not asked for)
    assert {(e["id"], e["object"], e["created"]) for e in events} == {
        ("chatcmpl-1", "chat.completion.chunk", 11)
    }
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(c["delta"].get("content", "") for c in choices) == " a b c d"
    assert all(c["index"] == 0 and "token_ids" not in c for c in choices)
    assert "prompt_token_ids" not in events[0] and choices[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    # the workers were asked for token ids; the continuation: the rendered prompt + what was sent
    assert upstream.bodies[0]["return_token_ids"] is True and "messages" in upstream.bodies[0]
    again = upstream.bodies[1]
    assert again["prompt"] == [1, 2, 3, 7, 8] and again["max_tokens"] == 2 and again["temperature"] == 0
    assert again["stream"] and again["stream_options"] == {"include_usage": True} and "messages" not in again


def test_a_broken_completions_stream_keeps_ids_offsets_and_logprobs():
    first = STREAM_HEAD + chunk(
        sse(cmpl_chunk("ab", [7, 8], offsets=[0, 1], prompt_token_ids=[1, 2])) + b'data: {"choi'
    )  # cut mid-event
    rest = whole(cmpl_chunk("cd", [9, 10], "length", offsets=[0, 1], prompt_token_ids=[1, 2, 7, 8]), "[DONE]")
    upstream = Upstream([first, rest])
    body = {"prompt": [1, 2], "max_tokens": 4, "logprobs": 1, "stream": True, "return_token_ids": True}
    _, data = asyncio.run(through_router(upstream, "/v1/completions", body))
    choices = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert [c["text"] for c in choices] == ["ab", "cd"] and data[-1] == "[DONE]"
    # asked for: the ids of each chunk, the prompt's ids once (the client's prompt, not the continuation's)
    assert [c["token_ids"] for c in choices] == [[7, 8], [9, 10]]
    assert choices[0]["prompt_token_ids"] == [1, 2] and "prompt_token_ids" not in choices[1]
    assert choices[1]["logprobs"]["text_offset"] == [2, 3] and json.loads(data[1])["id"] == "cmpl-9"
    assert upstream.bodies[1]["prompt"] == [1, 2, 7, 8] and upstream.bodies[1]["logprobs"] == 1


def test_streams_that_cannot_move_end_with_an_error_event():
    first = STREAM_HEAD + chunk(sse(chat_chunk(None, prompt_token_ids=[1])) + sse(chat_chunk(" a", [7])))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    upstream = Upstream([first])
    _, data = asyncio.run(through_router(upstream, "/v1/chat/completions", body, max_migrations=0))
    assert json.loads(data[-2])["error"]["code"] == "upstream_unavailable" and data[-1] == "[DONE]"
    assert "return_token_ids" not in upstream.bodies[0]  # nothing asked when nothing can move
    chat = {"messages": [], "stream": True}
    assert can_move("/v1/chat/completions", chat)
    for extra in ({"n": 2}, {"frequency_penalty": 0.5}, {"response_format": {"type": "json_object"}},
                  {"stream": False}):  # fmt: skip
        assert not can_move("/v1/chat/completions", {**chat, **extra}), extra
    assert not can_move("/v1/completions", {"prompt": ["a", "b"], "stream": True})
    assert can_move("/v1/completions", {"prompt": "a", "stream": True})


def test_text_the_old_worker_held_back_comes_first():
    state = OpenAIStreamState("/v1/completions", {"prompt": "x", "stream": True})
    state.feed(sse(cmpl_chunk("Hello", [5], prompt_token_ids=[1])))
    # " wor" was held back (the start of a stop string " world"?): the continuation sends it first
    assert state.held_text("Hello wor", [" world"]) == " wor"
    assert state.held_text("Hello<|im_end|>", [" world"]) == ""  # skipped special tokens are not text
    assert state.held_text("Hell\ufffd", [" world"]) == ""  # decoded otherwise: nothing is invented
    state.prefix = " wor"
    assert state.resume({"prompt": "x", "max_tokens": 4}) == (
        "/v1/completions",
        {"prompt": [1, 5], "max_tokens": 3, "stream": True, "return_token_ids": True},
    )
    out = state.feed(sse(cmpl_chunk("ld", [6, 7], "length")))
    assert json.loads(out[6:])["choices"][0]["text"] == " world"


def test_a_continuation_that_fails_ends_the_stream_with_a_typed_error():
    first = STREAM_HEAD + chunk(sse(chat_chunk(None, prompt_token_ids=[1])) + sse(chat_chunk(" a", [7])))
    error = json.dumps({"error": {"message": "busy", "type": "server_error", "code": "kv_transfer_failed"}})
    refused = (
        f"HTTP/1.1 503 OK\r\ncontent-type: application/json\r\ncontent-length: {len(error)}\r\n\r\n{error}"
    )
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    upstream = Upstream([first, refused.encode()])
    _, data = asyncio.run(through_router(upstream, "/v1/chat/completions", body, retry_max_retries=1))
    assert json.loads(data[1])["choices"][0]["delta"]["content"] == " a"
    error = json.loads(data[-2])["error"]  # why the stream broke, and why it could not go on
    assert (
        error["code"] == "upstream_unavailable"
        and "failed: busy" in error["message"]
        and data[-1] == "[DONE]"
    )
