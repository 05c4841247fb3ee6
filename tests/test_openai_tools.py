"""Tool-call parsers (common/server/tool_parsers.py) and tool_choice plans (tool_choice.py) on hand-written model outputs: each family's
format read whole and streamed in pieces of every size, with the streamed deltas reassembling to the
same calls. The server side (tools through the openai client) is in test_openai_client.py."""

from __future__ import annotations

import json

import pytest
from disagg.common.server.protocol import APIError, ChatCompletionRequest
from disagg.common.server.tool_choice import FALLBACK_TOOL_TEMPLATE, parser_for, plan_tools
from disagg.common.server.tool_parsers import (
    HERMES,
    LLAMA3,
    MISTRAL,
    REQUIRED,
    ToolCallStreamer,
    parse_tool_calls,
)

WEATHER = '{"city": "Paris \\"Ville\\" {", "days": [1, 2]}'

CASES = [
    # (format, model output, content, [(name, arguments text)])
    (HERMES, f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
     "Let me look.\n", [("get_weather", WEATHER)]),
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
             '{"arguments": {"x": 1}, "name": "b"}\n</tool_call>', None, [("a", "{}"), ("b", '{"x": 1}')]),
    (LLAMA3, f'{{"name": "get_weather", "parameters": {WEATHER}}}; {{"name": "now"}}', None,
     [("get_weather", WEATHER), ("now", "{}")]),
    (LLAMA3, 'Sure.<|python_tag|>{"name": "now", "parameters": {"tz": "UTC"}}', "Sure.",
     [("now", '{"tz": "UTC"}')]),
    (MISTRAL, f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, {{"name": "now", '
              '"arguments": {"tz": 1.5}}]', None, [("get_weather", WEATHER), ("now", '{"tz": 1.5}')]),
    (REQUIRED, '[{"name": "now", "parameters": {"tz": -2}}]', None, [("now", '{"tz": -2}')]),
    # Mistral v11+: name[ARGS]{...} per call (an optional [CALL_ID] skipped)
    (MISTRAL, f'Sure![TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]now[CALL_ID]a1b2[ARGS]{{}}', "Sure!",
     [("get_weather", WEATHER), ("now", "{}")]),
    # no call: all of it is content, including what looked like the start of a marker
    (HERMES, "Paris is <tool in France", "Paris is <tool in France", []),
    (LLAMA3, "  The answer: {not a call}", "  The answer: {not a call}", []),
    # a call, then text that is none: the call stands, the rest is dropped
    (HERMES, '<tool_call>{"name": "a", "arguments": {}}</tool_call> and then <oops', None, [("a", "{}")]),
    # a marker followed by no call: the text comes back as content (vLLM does the same)
    (HERMES, "<tool_call> I cannot", "<tool_call> I cannot", []),
]  # fmt: skip


def _reassemble(deltas: list[dict]) -> list[tuple[str, str]]:
    """OpenAI's client-side rule: the first delta of an index has id and name, the rest append."""
    calls: dict[int, list] = {}
    for d in deltas:
        if "id" in d:
            assert d["index"] not in calls and d["type"] == "function" and d["id"].startswith("call_")
            calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
        else:
            calls[d["index"]][1] += d["function"]["arguments"]
    return [tuple(calls[i]) for i in sorted(calls)]


def _stream(fmt, text: str, step: int, named: str | None = None) -> tuple[str, list, int]:
    streamer, content, deltas = ToolCallStreamer(fmt, named), "", []
    for i in range(0, len(text), step):
        got = streamer.feed(text[i : i + step])
        content += got.content
        deltas += got.tool_calls
    tail = streamer.finish()
    return content + tail.content, deltas + tail.tool_calls, sum("id" not in d for d in deltas)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parsers_read_whole_outputs(fmt, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, ToolCallStreamer(fmt))
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        json.loads(c["function"]["arguments"])
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_streamed_deltas_reassemble_to_the_same_calls(fmt, text, content, calls, step):
    got_content, deltas, _ = _stream(fmt, text, step)
    assert (got_content if got_content.strip() else None) == content
    assert _reassemble(deltas) == calls


def test_arguments_stream_in_fragments_and_markers_never_leak():
    text = f'Checking.<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    content, deltas, fragments = _stream(HERMES, text, 1)
    assert content == "Checking." and "<" not in content
    assert fragments > 10, "arguments must stream as they are written, not in one piece at the end"
    # cut off mid-call (finish_reason length): the client has what was written so far
    content, deltas, _ = _stream(HERMES, text[:-30], 3)
    ((name, args),) = _reassemble(deltas)
    assert name == "get_weather" and WEATHER.startswith(args) and args


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = CASES[1][1]  # two hermes calls
    for step in (1, 1000):
        streamer, deltas = ToolCallStreamer(HERMES, max_calls=1), []
        for i in range(0, len(text), step):
            deltas += streamer.feed(text[i : i + step]).tool_calls
        assert streamer.finish().content == "" and _reassemble(deltas) == [("a", "{}")]


def test_plan_parse_keeps_one_call_without_parallel_calls():
    plan = _plan(tools=[TOOL], parallel_tool_calls=False)
    assert plan.parse(CASES[1][1])[1][0]["function"]["name"] == "a" and len(plan.parse(CASES[1][1])[1]) == 1
    assert len(_plan(tools=[TOOL]).parse(CASES[1][1])[1]) == 2


def test_named_choice_output_is_the_arguments():
    content, calls = parse_tool_calls('{"city": "Paris"}', ToolCallStreamer(None, named="get_weather"))
    assert content is None and calls[0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    _, deltas, _ = _stream(None, '{"city": "Paris"}', 4, named="get_weather")
    assert _reassemble(deltas) == [("get_weather", '{"city": "Paris"}')]


class _Tokenizer:
    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"  # no tool format, like SmolLM2's
    added_tokens_decoder: dict = {}


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


def _plan(**body):
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **body})
    return plan_tools(req, _Tokenizer(), None)


def test_tool_choice_plans():
    assert _plan() is None and _plan(tools=[TOOL], tool_choice="none") is None
    auto = _plan(tools=[TOOL])
    assert auto.template == FALLBACK_TOOL_TEMPLATE and auto.fmt is HERMES and not auto.grammar
    pytest.importorskip("xgrammar")
    named = _plan(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.named == "get_weather" and json.loads(named.grammar[1]) == TOOL["function"]["parameters"]
    required = _plan(tools=[TOOL], tool_choice="required")
    assert required.fmt is REQUIRED and json.loads(required.grammar[1])["minItems"] == 1
    for body, param in (
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
          "tool_choice": "required"}, "tools"),
    ):  # fmt: skip
        with pytest.raises(APIError) as e:
            _plan(**body)
        assert e.value.status == 400 and e.value.param == param


def test_default_parser_follows_the_chat_template():
    assert parser_for(None, "... [TOOL_CALLS] ...") is MISTRAL
    assert parser_for(None, "... <|python_tag|> ...") is LLAMA3
    assert parser_for(None, "... <tool_call> ...") is HERMES and parser_for(None, None) is HERMES
    assert parser_for("llama3", "<tool_call>") is LLAMA3 and parser_for("qwen25", None) is HERMES


def test_fallback_template_renders_tools_and_history(default_model_path):
    """SmolLM2's template has no tool format: the fallback shows the tools, past calls and results."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - only this test needs the real tokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    req = ChatCompletionRequest.model_validate({"tools": [TOOL], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]})  # fmt: skip
    plan = plan_tools(req, tok, None)
    text = tok.apply_chat_template([m.for_template() for m in req.messages], tools=plan.tools,
                                   chat_template=plan.template, add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and json.dumps(TOOL) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
