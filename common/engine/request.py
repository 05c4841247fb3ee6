"""A request's state in the engine: sampling parameters, status, tokens, pages."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from disagg.common.messages import message


@message
@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    skip_special_tokens: bool = True  # detokenizer only
    logit_bias: list[list] = field(default_factory=list)  # [[token_id, bias], ...] (OpenAI's logit_bias)
    # structured output: [kind, spec], kind "json_object" | "json_schema" | "regex" | "ebnf" (see sampling.py)
    grammar: list[str] = field(default_factory=list)
    # completions echo + logprobs: the logprob of every prompt token (and top_logprobs_num alternatives),
    # sent with the first output token; such a request computes its whole prompt (no prefix cache)
    prompt_logprobs: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    def validate(self) -> None:
        """Raise ValueError (message names the parameter) for values no request may have."""
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                "max_new_tokens",
                "must be >= 1",
            ),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (off) or >= 1"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (0 <= self.top_logprobs_num <= 20, "top_logprobs", "must be in [0, 20]"),
        ]
        bias_ok = all(isinstance(t, int) and 0 <= t < 2**31 and -100 <= b <= 100 for t, b in self.logit_bias)
        checks.append((bias_ok, "logit_bias", "must map token ids to biases in [-100, 100]"))
        for ok, param, why in checks:
            if not ok:
                raise ValueError(f"{param} {why}, got {getattr(self, param, None)!r}", param)


# how the error of a request whose logits were not finite begins (the scheduler's NOT_FINITE; the HTTP
# front end maps it to a 500 numerical_error)
NUMERICAL_ERROR = "numerical error"


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"


# NOTE: eq=False: a request is an entity (identity); the generated field-by-field __eq__ compared
# whole token lists on every `req in running` / `remove(req)` (1.7 ms per step at batch 64)
@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    status: ReqStatus = ReqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | str | None = None
    # KV state: page_table[i] holds tokens [i*page_size, (i+1)*page_size) of input+output
    page_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cache_node: object | None = None  # radix-cache node locked by this request
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # sampling.prompt_logprobs: [logprob, [[token_id, logprob], ...]] of prompt tokens 1.., chunk by chunk
    prompt_logprobs: list[list] = field(default_factory=list)
    arrival_time: float = 0.0
    # the HTTP front end's time.monotonic() at the request's arrival and when it sent it here (0: none)
    received_at: float = 0.0
    sent_at: float = 0.0
    first_token_time: float | None = None
    # the stage before its first token it is in now, since when (request_stages.py; None: not timed)
    stage: str | None = None
    stage_since: float = 0.0
    # PD disaggregation: the prefill server's bootstrap address and the request's room (else None)
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    # DP attention: the DP rank asked for (SGLang's field; None: the least loaded)
    data_parallel_rank: int | None = None
    # decode: this PD request brings a shared prompt's KV (n > 1, shared_prompt.py) for the choices
    # that follow it, so its whole pages go to the prefix cache when it ends
    keep_prompt_cached: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    def ids_between(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (a decode step needs one token of a long list)."""
        n_in = len(self.input_ids)
        if end <= n_in:
            return self.input_ids[start:end]
        if start >= n_in:
            return self.output_ids[start - n_in : end - n_in]
        return self.input_ids[start:] + self.output_ids[: end - n_in]

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status in (ReqStatus.FINISHED, ReqStatus.ABORTED)


def prompt_logprob_rows(req: Req, n: int) -> int:
    """How many of the request's next `n` computed positions give a prompt token's logprob (position
    p predicts prompt token p + 1, p < len(prompt) - 1): 0 unless it asked and has no output yet."""
    if not req.sampling.prompt_logprobs or req.output_ids:
        return 0
    start = req.num_computed_tokens
    return max(0, min(start + n, len(req.input_ids) - 1) - start)


@message
@dataclass
class TokenOut:
    """What one scheduler step produced for one request (sent to the detokenizer / front end)."""

    rid: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | str | None = None
    error: str | None = None  # why an abort happened, readable by a client
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] | None = None  # one per new token
    top_logprobs: list[list[list]] | None = None  # per new token: [[token_id, logprob], ...]
    # with the first token of a prompt_logprobs request: one per prompt token, the first None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[list] | None] | None = None


@message
@dataclass
class SchedulerStats:
    """A scheduler's state at one moment (the HTTP process's gauges, /server_info's internal_states).

    Pages: num_free_pages + num_request_pages + num_cached_pages == num_total_pages, so a leak
    (request pages held with no request running) is told apart from the prefix cache."""

    num_running: int
    num_waiting: int
    num_total_pages: int
    num_free_pages: int
    num_used_pages: int  # request pages + cached pages
    num_request_pages: int  # held by requests (running, transferring, or aborted awaiting their room's end)
    num_cached_pages: int  # held by the prefix cache (evictable unless a request shares them)
    kv_usage: float  # num_used_pages / num_total_pages
    cache_hit_rate: float
    num_retractions: int
    queues: dict[str, int] = field(default_factory=dict)  # PD roles: requests per stage
    num_transferring: int = 0  # PD roles: rooms whose transfer has not ended
    num_prealloc: int = 0  # decode: requests waiting for pages
    num_open_rooms: int = 0  # PD roles: rooms the transfer engine still tracks
    metrics_text: str = ""  # the scheduler process's Prometheus series (request stages; PD: the transfer's)
    # MoE with --enable-expert-distribution-metrics: {decoder layer id: routed pairs per expert since start}
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)
    # --dp-size > 1: these stats are the replicas' sum; one entry per replica (dp_rank, alive, gpus,
    # num_dispatched, num_in_flight, num_tokens, stats) from common/server/data_parallel.py
    dp_replicas: list[dict] = field(default_factory=list)
