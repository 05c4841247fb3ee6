"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from disagg.common.engine.request import SamplingParams
from disagg.common.server.ipc import StrOut
from disagg.common.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, OpenAISampling
from disagg.common.server.serving import (
    ChoiceAcc,
    ServerState,
    check_lengths,
    check_model,
    check_token_ids,
    duplicate_rid,
    engine_error,
    has_room,
    make_sampling,
    merge_streams,
    new_rid,
    open_stream,
    owner_of,
    pd_for,
    replay_head,
    sse,
    state_of,
    stream_crash,
    until_disconnect,
    usage,
    with_seed,
    without_room,
)
from disagg.common.server.shared_prompt import SharedPrompts, worth_sharing
from disagg.common.server.tool_choice import ToolPlan, plan_tools
from disagg.common.server.tool_parsers import ToolCallStreamer
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()


@dataclass
class Job:
    """One API call fanned out into len(prompts) * n engine requests (choice i = prompt i // n)."""

    kind: str  # "chat" | "completion"
    rid: str
    model: str
    prompts: list[list[int]]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo_texts: list[str] | None = None  # completions with echo=True
    owner: str | None = None  # the key that sent it (see serving.owner_of)
    return_token_ids: bool = False  # vLLM's prompt_token_ids / token_ids
    tools: ToolPlan | None = None  # chat with tool_choice other than none: the output is parsed for calls
    shared: SharedPrompts | None = None  # n > 1: each prompt computed once (set by start)
    echo_tokens: list[list[str]] | None = None  # echo with logprobs: each prompt's token texts

    def start(self, state: ServerState, pd: dict) -> list[AsyncIterator[StrOut]]:
        if self.n > 1 and has_room(pd) and state.server_info.get("role") == "prefill":
            # NOTE: through PD the prefill server computes and sends each prompt once, in the prompt's
            # room; the decode server forks it into the n choices (shared_prompt.py). This answer,
            # one choice per prompt, is the router's to drop
            self.n = 1
        # colocated, prompt logprobs compute the whole prompt anyway; through PD the prefill computes
        # them, the helper brings them and the choices start from the prefix cache as usual
        shareable = not self.sampling.prompt_logprobs or has_room(pd)
        if shareable and worth_sharing(state, pd, self.n, min(len(p) for p in self.prompts)):
            wanted = self.sampling.top_logprobs_num if self.sampling.prompt_logprobs else None
            self.shared = SharedPrompts(state, self.rid, self.prompts, self.owner, pd, wanted)
            pd = without_room(pd)  # the choices start from this server's prefix cache
            self.sampling = dataclasses.replace(self.sampling, prompt_logprobs=False)  # the helper's job
        gens = self._generators(state, pd)
        return [self.shared.after(i // self.n, g) for i, g in enumerate(gens)] if self.shared else gens

    def usage(self, accs: list[ChoiceAcc]) -> dict:
        body = usage(accs, [len(p) for p in self.prompts])
        return self.shared.usage(body) if self.shared else body

    def _generators(self, state: ServerState, pd: dict) -> list[AsyncIterator[StrOut]]:
        single = len(self.prompts) * self.n == 1
        return [
            state.tm.generate(
                self.rid if single else f"{self.rid}-{i}",
                self.prompts[i // self.n],
                with_seed(self.sampling, i % self.n),
                pd_for(pd, i // self.n),  # the room of its prompt
                self.owner,
            )  # fmt: skip
            for i in range(len(self.prompts) * self.n)
        ]


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = state_of(request)
    card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "disagg",
            "root": state.model_path, "max_model_len": state.context_length}  # fmt: skip
    return {"object": "list", "data": [card]}


def grammar_from(req: OpenAISampling) -> list[str]:
    """[kind, spec] for the sampler from response_format (or SGLang's regex / ebnf), checked here
    (a bad schema is the client's 400, not a failure inside the scheduler's step)."""
    fmt = dict(req.response_format or {"type": "text"})
    kind = fmt.get("type")
    given = [
        k for k, v in (("response_format", kind != "text"), ("regex", req.regex), ("ebnf", req.ebnf)) if v
    ]
    if len(given) > 1:
        raise APIError(400, f"give at most one of {', '.join(given)}", given[1])
    if not given:
        return []
    if kind not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                       "response_format")  # fmt: skip
    try:
        import xgrammar as xgr  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise APIError(400, "structured output needs the xgrammar package, not installed on this server",
                       given[0], code="unsupported") from None  # fmt: skip
    if kind == "json_object":
        return ["json_object", ""]
    if kind == "json_schema":
        schema = (
            (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        )
        if not isinstance(schema, dict):
            raise APIError(
                400, "response_format json_schema needs json_schema.schema (an object)", "response_format"
            )
        spec, build, param = json.dumps(schema), xgr.Grammar.from_json_schema, "response_format"
        kind = "json_schema"
    elif req.regex:
        spec, build, param, kind = req.regex, xgr.Grammar.from_regex, "regex", "regex"
    else:
        spec, build, param, kind = req.ebnf, xgr.Grammar.from_ebnf, "ebnf", "ebnf"
    try:
        build(spec)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError for bad input
        raise APIError(400, f"invalid {param}: {e}", param) from None
    return [kind, spec]


def logit_bias_from(req: OpenAISampling, vocab_size: int) -> list[list]:
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(
                400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", "logit_bias"
            )
        if not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")
        pairs.append([int(key), float(bias)])
    return pairs


def sampling_from(
    req: OpenAISampling, max_new_tokens: int, return_logprob: bool, top_n: int, vocab_size: int,
    tools: ToolPlan | None = None,
) -> SamplingParams:  # fmt: skip
    """`tools`: a tool_choice required / named brings its grammar; markers that are special tokens
    must stay in the text for the parser."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return make_sampling(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=req.min_p or 0.0,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        return_logprob=return_logprob,
        top_logprobs_num=top_n,
        skip_special_tokens=req.skip_special_tokens and not (tools and tools.keep_special_tokens),
        logit_bias=logit_bias_from(req, vocab_size),
        grammar=list(tools.grammar) if tools and tools.grammar else grammar_from(req),
    )


def check_n(n: int) -> None:
    if not 1 <= n <= 64:
        raise APIError(400, f"n must be in [1, 64], got {n}", "n")


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    state = state_of(request)
    check_model(state, req.model)
    check_n(req.n)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    tools = plan_tools(req, state.tm.tokenizer, state.server_info.get("tool_call_parser"))
    messages = [m.for_template() for m in req.messages]
    _, ids = await state.tm.chat_prompt(messages, *((tools.tools, tools.template) if tools else ()))
    if req.max_completion_tokens is not None:
        param, max_tokens = "max_completion_tokens", req.max_completion_tokens
    else:
        param, max_tokens = "max_tokens", req.max_tokens
    max_new = check_lengths(state, len(ids), max_tokens, param)
    sampling = sampling_from(
        req, max_new, req.logprobs, req.top_logprobs or 0, len(state.tm.tokenizer), tools
    )
    job = Job("chat", req.rid or new_rid("chatcmpl"), req.model or state.model_name, [ids], sampling,
              req.n, req.stream, req.include_usage, owner=owner_of(request),
              return_token_ids=req.return_token_ids, tools=tools if tools and tools.parses else None)  # fmt: skip
    return await respond(job, state, request, req.pd_fields())


async def completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await state.tm.tokenize(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return check_token_ids([list(prompt)], "prompt")
    if isinstance(prompt[0], str):
        for p in prompt:
            state.tm.check_size(len(p), "prompt")
        return [await state.tm.tokenize(p) for p in prompt]
    return check_token_ids([list(p) for p in prompt], "prompt")


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    state = state_of(request)
    check_model(state, req.model)
    check_n(req.n)
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError(400, f"logprobs must be in [0, 20], got {req.logprobs}", "logprobs")
    prompt_logprobs = req.echo and req.logprobs is not None
    prompts = await completion_prompts(state, req.prompt)
    if prompt_logprobs and state.server_info.get("role", "server") != "server":
        check_pd_prompt_logprobs(prompts, req.logprobs)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    max_new = min(check_lengths(state, len(p), max_tokens, "max_tokens") for p in prompts)
    sampling = sampling_from(
        req, max_new, req.logprobs is not None, req.logprobs or 0, len(state.tm.tokenizer)
    )
    sampling.prompt_logprobs = prompt_logprobs
    echo = [await state.tm.detokenize(p) for p in prompts] if req.echo else None
    job = Job("completion", req.rid or new_rid("cmpl"), req.model or state.model_name, prompts, sampling,
              req.n, req.stream, req.include_usage, echo, owner_of(request), req.return_token_ids)  # fmt: skip
    if prompt_logprobs:
        job.echo_tokens = [await state.tm.token_texts(p) for p in prompts]
    return await respond(job, state, request, req.pd_fields())


# NOTE: through PD the prompt's logprobs travel in the transfer's control message (transfer/ucx.py
# MAX_CONTROL_BYTES, 4 MiB); an entry (a logprob or a top alternative) packs into at most ~16 bytes
PD_PROMPT_LOGPROB_ENTRIES = 150_000


def check_pd_prompt_logprobs(prompts: list[list[int]], top: int) -> None:
    """echo + logprobs through PD: refuse a prompt whose logprobs the transfer cannot carry (400)."""
    longest = max(len(p) for p in prompts)
    if longest * (1 + top) > PD_PROMPT_LOGPROB_ENTRIES:
        raise APIError(400, f"echo with logprobs={top} through PD is limited to prompts of "
                       f"{PD_PROMPT_LOGPROB_ENTRIES // (1 + top)} tokens, got {longest}", "echo",
                       code="unsupported")  # fmt: skip


async def respond(job: Job, state: ServerState, request: Request, pd: dict) -> Response:
    if job.stream:
        opened = await open_stream(request, job.start(state, pd))
        if opened is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return StreamingResponse(stream_chunks(job, *opened), media_type="text/event-stream")
    accs = await until_disconnect(request, collect(job, state, pd))
    if accs is None:
        return Response(status_code=499)
    for acc in accs:
        acc.raise_if_rejected()
    choices = [choice_body(job, i, acc) for i, acc in enumerate(accs)]
    body = {"id": job.rid, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": choices,
            "usage": job.usage(accs)}  # fmt: skip
    if job.return_token_ids and job.kind == "chat":
        body["prompt_token_ids"] = job.prompts[0]
    return JSONResponse(body)


async def collect(job: Job, state: ServerState, pd: dict) -> list[ChoiceAcc]:
    gens = job.start(state, pd)  # first: it may change job.n (the prefill server of a PD pair)
    accs = [ChoiceAcc() for _ in range(len(job.prompts) * job.n)]
    try:
        async for i, out in merge_streams(gens):
            accs[i].add(out)
    except ValueError as e:  # a duplicate rid
        raise duplicate_rid(e) from None
    return accs


def choice_body(job: Job, i: int, acc: ChoiceAcc) -> dict:
    last = acc.last
    reason = last.finish_reason if last else "abort"
    ids = {"token_ids": list(acc.output_ids)} if job.return_token_ids else {}
    if job.kind == "chat":
        lp = {"content": chat_logprobs(acc)} if job.sampling.return_logprob else None
        message = {"role": "assistant", "content": acc.text}
        if job.tools:
            message["content"], calls = job.tools.parse(acc.text)
            message["tool_calls"] = calls or None
            reason = job.tools.finish_reason(bool(calls), reason)
        return {"index": i, "message": message, "logprobs": lp, "finish_reason": reason,
                "matched_stop": last.matched_stop if last else None, **ids}  # fmt: skip
    text = (job.echo_texts[i // job.n] if job.echo_texts else "") + acc.text
    lp = completion_logprobs(acc) if job.sampling.return_logprob else None
    if lp is not None and job.echo_tokens:
        lp = with_prompt_logprobs(job.echo_tokens[i // job.n], acc, lp, len(job.echo_texts[i // job.n]))
    if job.return_token_ids:
        ids["prompt_token_ids"] = job.prompts[i // job.n]
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason,
            "matched_stop": last.matched_stop if last else None, **ids}  # fmt: skip


def chat_logprobs(acc: ChoiceAcc) -> list[dict]:
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    tops = acc.top_logprobs or [[] for _ in acc.logprobs]
    return [{**entry(tok, lp), "top_logprobs": [entry(t, tlp) for t, _, tlp in top]}
            for tok, lp, top in zip(acc.token_texts, acc.logprobs, tops, strict=False)]  # fmt: skip


def completion_logprobs(acc: ChoiceAcc, pos: int = 0) -> dict:
    """`pos`: where acc's text starts in the choice's text (OpenAI's offsets are into the whole text)."""
    offsets = []
    for tok in acc.token_texts:
        offsets.append(pos)
        pos += len(tok)
    tops = [{t: tlp for t, _, tlp in top} for top in acc.top_logprobs] if acc.top_logprobs else None
    return {
        "tokens": acc.token_texts,
        "token_logprobs": acc.logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def with_prompt_logprobs(tokens: list[str], acc: ChoiceAcc, lp: dict, echo_len: int) -> dict:
    """echo with logprobs, as vLLM answers it: the prompt's tokens first (the first one without a
    logprob), every text_offset into the echoed text."""
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    prompt_lps = acc.prompt_logprobs or [None] * len(tokens)
    body = {"tokens": tokens + lp["tokens"], "token_logprobs": list(prompt_lps) + lp["token_logprobs"],
            "top_logprobs": None, "text_offset": offsets + [echo_len + o for o in lp["text_offset"]]}  # fmt: skip
    if lp["top_logprobs"] is not None:
        tops = acc.prompt_top_logprobs or [None] * len(tokens)
        body["top_logprobs"] = [None if t is None else {text: v for text, _, v in t} for t in tops] + lp[
            "top_logprobs"
        ]
    return body


async def stream_chunks(job: Job, head: tuple[int, StrOut], outputs) -> AsyncIterator[str]:
    """SSE chunks in OpenAI's format; a client that disconnects cancels this, which aborts the requests.
    Ends with [DONE] after the last chunk or after an error event."""
    stream = ChunkStream(job)
    for chunk in stream.opening():
        yield chunk
    try:
        async for i, out in replay_head(head, outputs):
            if chunk := stream.on_output(i, out):
                yield chunk
        if job.include_usage:
            yield stream.chunk([], usage=job.usage(stream.accs))
    except Exception as e:  # noqa: BLE001 - a bug: the client still gets an error event, then [DONE]
        yield stream_crash(e)
    yield sse("[DONE]")


class ChunkStream:
    """One streamed answer: every choice's text so far (`accs`), its tool-call streamer, and what
    a choice's first chunk still owes (the prompt's ids, the echoed prompt)."""

    def __init__(self, job: Job):
        self.job, self.total = job, len(job.prompts) * job.n
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self.accs = [ChoiceAcc() for _ in range(self.total)]
        self.streamers = (
            [job.tools.streamer() for _ in range(self.total)] if job.tools else [None] * self.total
        )
        # OpenAI: with include_usage every chunk carries `usage: null`, the last one (no choices) the usage
        self.null_usage = {"usage": None} if job.include_usage else {}
        # return_token_ids: the prompt's ids come once, first (chat: top level; completions: in each choice)
        completion_ids = job.return_token_ids and job.kind == "completion"
        self.prompt_ids_due = set(range(self.total)) if completion_ids else set()
        # echo + logprobs, as vLLM streams it: a choice's first chunk carries the prompt and its
        # logprobs (they come with the first token)
        self.echo_due = set(range(self.total)) if job.echo_tokens else set()

    def chunk(self, choices: list[dict], **extra) -> str:
        job = self.job
        return sse({"id": job.rid, "object": self.object, "created": self.created, "model": job.model,
                    "choices": choices, **self.null_usage, **extra})  # fmt: skip

    def opening(self) -> list[str]:
        """What comes before any token: chat's assistant role; a completion's echoed prompts (with
        logprobs each choice's first chunk echoes instead, see on_output)."""
        job, total = self.job, self.total
        if job.kind == "chat":
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(total)]  # fmt: skip
            return [
                self.chunk(first, **({"prompt_token_ids": job.prompts[0]} if job.return_token_ids else {}))
            ]
        if not job.echo_texts or job.echo_tokens:
            return []
        choices = [{"index": i, "text": job.echo_texts[i // job.n], "logprobs": None, "finish_reason": None}
                   for i in range(total)]  # fmt: skip
        if job.return_token_ids:
            for c in choices:
                c["prompt_token_ids"], c["token_ids"] = job.prompts[c["index"] // job.n], []
            self.prompt_ids_due.clear()
        return [self.chunk(choices)]

    def on_output(self, i: int, out: StrOut) -> str | None:
        """Choice i's next output as a chunk (an error event if it failed before any token)."""
        job, acc = self.job, self.accs[i]
        delta = ChoiceAcc()
        delta.add(out)
        pos = len(acc.text) + (len(job.echo_texts[i // job.n]) if job.echo_texts else 0)
        acc.add(out)
        if out.finished and out.error and not acc.output_ids:
            return sse(engine_error(out.error).body())
        if not (out.output_ids or out.finished):
            return None
        # NOTE: a chunk also when the text is held back: clients see the token timing
        body = delta_body(job, i, delta, out, pos, self.streamers[i])
        if i in self.echo_due:
            self.echo_due.discard(i)
            echoed_first_chunk(job, i, body, delta, acc)
        if i in self.prompt_ids_due:
            self.prompt_ids_due.discard(i)
            body["prompt_token_ids"] = job.prompts[i // job.n]
        return self.chunk([body])


def echoed_first_chunk(job: Job, i: int, body: dict, delta: ChoiceAcc, acc: ChoiceAcc) -> None:
    """Put the echoed prompt, with its logprobs (`acc`: the choice so far), before the first delta."""
    echo = job.echo_texts[i // job.n]
    delta.prompt_logprobs, delta.prompt_top_logprobs = acc.prompt_logprobs, acc.prompt_top_logprobs
    body["text"] = echo + body["text"]
    body["logprobs"] = with_prompt_logprobs(job.echo_tokens[i // job.n], delta, completion_logprobs(delta),
                                            len(echo))  # fmt: skip


def delta_body(
    job: Job, i: int, delta: ChoiceAcc, out: StrOut, pos: int, streamer: ToolCallStreamer | None = None
) -> dict:
    reason = out.finish_reason if out.finished else None
    ids = {"token_ids": list(delta.output_ids)} if job.return_token_ids else {}
    if job.kind == "chat":
        lp = {"content": chat_logprobs(delta)} if job.sampling.return_logprob else None
        body = {"content": delta.text}
        if streamer is not None:
            body, reason = tool_delta(job.tools, streamer, delta.text, reason)
        return {"index": i, "delta": body, "logprobs": lp, "finish_reason": reason, **ids}
    lp = completion_logprobs(delta, pos) if job.sampling.return_logprob else None
    return {"index": i, "text": delta.text, "logprobs": lp, "finish_reason": reason, **ids}


def tool_delta(
    plan: ToolPlan, streamer: ToolCallStreamer, text: str, reason: str | None
) -> tuple[dict, str | None]:
    """A chunk's delta when the output is read for tool calls: content and OpenAI's tool_call deltas
    (`reason` not None: the last chunk, which also carries what the streamer held back)."""
    got = streamer.feed(text)
    if reason is not None:
        tail = streamer.finish()
        got.content += tail.content
        got.tool_calls += tail.tool_calls
        reason = plan.finish_reason(streamer.called, reason)
    body: dict = {"content": got.content if got.content or not got.tool_calls else None}
    if got.tool_calls:
        body["tool_calls"] = got.tool_calls
    return body, reason
