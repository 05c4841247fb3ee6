"""Request bodies of the HTTP API (OpenAI-compatible and SGLang-native), as pydantic models.

Unknown fields are accepted and ignored (clients and routers add their own, e.g. SGLang's router
adds `bootstrap_*`, `log_metrics`, `separate_reasoning`); fields that are present are type-checked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error a client caused or must see: becomes {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 404: "not_found",
                             413: "request_too_large", 503: "service_unavailable"}.get(status)  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class PDFields(BaseModel):
    """Set by a PD router on both the prefill and the decode request; passed through to the scheduler."""

    model_config = ConfigDict(extra="allow")
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    def pd_fields(self) -> dict:
        return {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": self.bootstrap_room}  # fmt: skip


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(PDFields):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM/SGLang)
    min_p: float | None = None  # extension
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    skip_special_tokens: bool = True  # extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    rid: str | None = None  # extension: request id, usable with /abort_request

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise APIError(400, "only text content parts are supported", "messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class GenerateRequest(PDFields):
    """SGLang's native /generate body."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0


class AbortRequest(BaseModel):
    rid: str | None = None
    abort_all: bool = False
