"""What a chat request's `tools` and `tool_choice` mean here: how the prompt is rendered, how the
output is constrained and how it is read back (the parsers are in tool_parsers.py).

- `auto`: the tools go to the chat template; the output is read by the `--tool-call-parser` (default:
  the one whose markers the template writes).
- `required` / a named function: the same prompt, and a grammar (xgrammar, JSON schema of the call)
  makes the output the call itself, which the server reads back without any marker.
- `none`: as if there were no tools (vLLM's default): the model answers in text.

A model whose chat template has no tool format (the embedded SmolLM2's) gets FALLBACK_TOOL_TEMPLATE
for requests that carry tools or tool messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from disagg.common.server.protocol import APIError, ChatCompletionRequest, NamedToolChoice
from disagg.common.server.tool_parsers import (
    HERMES,
    LLAMA3,
    MISTRAL,
    PARSERS,
    REQUIRED,
    CallFormat,
    ToolCallStreamer,
    parse_tool_calls,
)

# The template used for requests with tools when the model's own has no tool format (SmolLM2's has
# none): ChatML with Qwen2.5's Hermes-style tool prompt, read back by the `hermes` parser. Tool results
# go back as <tool_response> blocks in a user turn, as Qwen2.5 does.
FALLBACK_TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}{%- set call = tool_call.function %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{{- call.arguments if call.arguments is string else call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def parser_for(name: str | None, chat_template: str | None) -> CallFormat:
    """The --tool-call-parser named, else the one whose markers the chat template writes (hermes when
    it writes none of them, e.g. FALLBACK_TOOL_TEMPLATE)."""
    if name:
        if name not in PARSERS:
            raise ValueError(f"unknown tool call parser {name!r} (choose from {', '.join(PARSERS)})")
        return PARSERS[name]
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


def supports_tools(chat_template: str | None) -> bool:
    return "tools" in (chat_template or "")


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request is rendered, constrained and read back."""

    tools: list[dict] | None  # what the chat template shows the model (None: tool_choice none)
    template: str | None  # FALLBACK_TOOL_TEMPLATE, or None: the model's own
    fmt: CallFormat | None = None  # how the output is read (None with named None: not at all)
    named: str | None = None  # tool_choice named this function
    grammar: tuple[str, ...] = ()  # (kind, spec) of the call for the sampler: required / named
    keep_special_tokens: bool = False  # the parser's markers are special tokens: keep them in the text
    max_calls: int | None = None  # parallel_tool_calls false: 1 (auto: later calls are dropped)

    @property
    def parses(self) -> bool:
        return self.fmt is not None or self.named is not None

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self.fmt, self.named, self.max_calls)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a whole output: the streamer, run over it at once."""
        return parse_tool_calls(text, self.streamer())

    def finish_reason(self, called: bool, reason: str) -> str:
        """OpenAI's: "tool_calls" when the model chose to call (auto, required); a call forced by
        naming the function finishes with "stop"; a cut-off output stays "length"."""
        return "tool_calls" if called and reason == "stop" and self.named is None else reason


def plan_tools(req: ChatCompletionRequest, tokenizer, parser_name: str | None) -> ToolPlan | None:
    """The ToolPlan of a chat request (None: no tools anywhere in it); a 400 for what makes no sense."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if choice != "none" and not req.tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    template = None if supports_tools(own) else FALLBACK_TOOL_TEMPLATE
    if choice == "none":  # as if no tools were given (vLLM's default): the model answers in text
        history = any(m.role == "tool" or m.tool_calls for m in req.messages)
        return ToolPlan(None, template) if history else None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    fmt = parser_for(parser_name, template or own)
    if choice == "auto":
        return ToolPlan(tools, template, fmt, keep_special_tokens=_special(tokenizer, fmt.starts),
                        max_calls=None if req.parallel_tool_calls else 1)  # fmt: skip
    if req.response_format or req.regex or req.ebnf:
        raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} "
                       "constrains the output already: no response_format, regex or ebnf with it", "tool_choice")  # fmt: skip
    if isinstance(choice, NamedToolChoice):
        fn = next((t.function for t in req.tools if t.function.name == choice.function.name), None)
        if fn is None:
            raise APIError(
                400, f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice"
            )
        schema = fn.parameters or {"type": "object"}
        return ToolPlan(tools, template, None, fn.name, ("json_schema", _checked_schema(schema)))
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
              "parameters": t.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"]} for t in req.tools]  # fmt: skip
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return ToolPlan(tools, template, REQUIRED, grammar=("json_schema", _checked_schema(schema)))


def _checked_schema(schema: dict) -> str:
    """The call's JSON schema as the sampler takes it; the client's 400 when xgrammar refuses it."""
    try:
        import xgrammar as xgr  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise APIError(400, "tool_choice required or naming a function needs the xgrammar package, not "
                       "installed on this server", "tool_choice", code="unsupported") from None  # fmt: skip
    spec = json.dumps(schema)
    try:
        xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError for bad input
        raise APIError(400, f"invalid parameters schema in tools: {e}", "tools") from None
    return spec


def _special(tokenizer, markers: tuple[str, ...]) -> bool:
    """Whether any marker is a special token (Llama's <|python_tag|>, Mistral's [TOOL_CALLS]): decoding
    with skip_special_tokens would drop it and the call would read as text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return any(t.special and t.content in markers for t in added.values())
