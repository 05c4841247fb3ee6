"""Request bodies of the HTTP API (OpenAI-compatible and SGLang-native), as pydantic models.

Unknown top-level fields are accepted and ignored (clients and routers add their own, e.g. SGLang's
router adds `log_metrics`, `separate_reasoning`); fields that are present are type-checked strictly:
`"yes"` is not a boolean, `true` is not an integer, `5` is not a stop string. A field sent as `null`
takes its documented default, as if it were absent.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# bootstrap rooms are non-negative signed 64-bit integers (SGLang's router draws them in [0, 2**63))
MAX_ROOM = 2**63

# OpenAI's types: the client's mistake vs. a failure of ours (retryable elsewhere)
CLIENT_ERROR, SERVER_ERROR = "invalid_request_error", "server_error"


class APIError(Exception):
    """An error a client caused or must see: becomes {"error": {...}} with `status`.

    4xx: the client's mistake (never retried, never counted against a worker). 5xx: the system's
    failure, with a typed `code` (a router retries it on another worker and counts it).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = CLIENT_ERROR, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 403: "admin_key_required",
                             404: "not_found", 405: "method_not_allowed", 409: "conflict",
                             413: "request_too_large", 503: "service_unavailable"}.get(status)  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _valid_unicode(text: str) -> str:
    """Lone surrogates ("\\ud800") parse as JSON but are not text: no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains an unpaired surrogate {text[e.start]!r} at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class PDFields(StrictModel):
    """Set by a PD router on both the prefill and the decode request; passed through to the scheduler."""

    bootstrap_host: Text | None = None
    bootstrap_port: int | None = Field(None, ge=1, le=65535)
    bootstrap_room: int | None = Field(None, ge=0, lt=MAX_ROOM)
    # SGLang's: the DP attention rank that serves the request (the scheduler checks the upper bound)
    data_parallel_rank: int | None = Field(None, ge=0)

    def pd_fields(self) -> dict:
        return {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": self.bootstrap_room, "data_parallel_rank": self.data_parallel_rank}  # fmt: skip


class FunctionDef(StrictModel):
    name: Text = Field(min_length=1)
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(StrictModel):
    name: Text


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(StrictModel):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCallMsg(StrictModel):
    """A call the assistant made earlier in the conversation (OpenAI's `message.tool_calls[i]`)."""

    id: Text | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class StreamOptions(StrictModel):
    include_usage: bool = False


class OpenAISampling(PDFields):
    model: Text | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM/SGLang)
    min_p: float | None = None  # extension
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    skip_special_tokens: bool = True  # extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    rid: Text | None = None  # extension: request id, usable with /abort_request
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and each choice's token_ids
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema
    regex: Text | None = None  # SGLang's structured-output extras
    ebnf: Text | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # False: at most one call

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(StrictModel):
    type: str
    text: Text | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallMsg] | None = None  # assistant messages
    tool_call_id: Text | None = None  # tool messages: the call they answer

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise APIError(400, "only text content parts are supported", "messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it: arguments as objects (Qwen's and Llama's templates
        write them with tojson), tool_call_id and name when given."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        return msg


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(OpenAISampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class NativeSampling(StrictModel):
    """SGLang's `sampling_params`: our SamplingParams' fields, plus SGLang's that we accept only at
    their neutral value (checked by the handler). Unknown keys are refused: a typo must not be ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_new_tokens: int = 128  # SGLang's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: Text | list[Text] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's name for seed
    skip_special_tokens: bool = True
    n: int = 1
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True


class GenerateRequest(PDFields):
    """SGLang's native /generate body."""

    text: Text | list[Text] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSampling = Field(default_factory=NativeSampling)
    stream: bool = False
    rid: Text | list[Text] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_prompt_ids: bool = False  # meta_info.prompt_ids (what a router needs to continue a stream)


class TokenizeRequest(StrictModel):
    """vLLM's and SGLang's /tokenize: a text (`prompt`, SGLang also a list of them) or chat `messages`."""

    model: Text | None = None
    prompt: Text | list[Text] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictModel):
    model: Text | None = None
    tokens: list[int]


class AbortRequest(StrictModel):
    rid: Text | None = None
    abort_all: bool = False
