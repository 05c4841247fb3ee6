"""SGLang-native endpoints: /generate, /abort_request, /health, /health_generate, /metrics, info."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from disagg.common.engine.request import SamplingParams
from disagg.common.server.ipc import StrOut
from disagg.common.server.protocol import (
    AbortRequest,
    APIError,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from disagg.common.server.serving import (
    IS_ADMIN,
    ChoiceAcc,
    ServerState,
    admin_required,
    check_lengths,
    check_model,
    check_token_ids,
    duplicate_rid,
    engine_error,
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
)
from disagg.common.server.tokenizer_manager import ANY_OWNER
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()

HEALTH_TIMEOUT_S = 10.0  # a CPU step with a long prefill chunk can take seconds
STATS_TIMEOUT_S = 2.0
EPLB_TIMEOUT_S = 120.0  # moving the replicated experts' weights of every MoE layer between the ranks
_SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)} - {
    "return_logprob", "top_logprobs_num", "logit_bias"}  # fmt: skip
# SGLang parameters we accept only at their neutral value
_NEUTRAL = {"n": 1, "min_new_tokens": 0, "repetition_penalty": 1.0, "no_stop_trim": False,
            "spaces_between_special_tokens": True}  # fmt: skip


def native_sampling(req: GenerateRequest) -> dict:
    """SamplingParams keyword arguments from SGLang's `sampling_params` (types already checked)."""
    sp = req.sampling_params
    for key, neutral in _NEUTRAL.items():
        if getattr(sp, key) != neutral:
            raise APIError(400, f"sampling parameter {key} is not supported (only {neutral!r}), got "
                           f"{getattr(sp, key)!r}", f"sampling_params.{key}")  # fmt: skip
    params = sp.model_dump(include=_SAMPLING_KEYS)
    if sp.sampling_seed is not None:
        params["seed"] = sp.sampling_seed
    if isinstance(params["stop"], str):
        params["stop"] = [params["stop"]]
    return params


async def native_prompts(state: ServerState, req: GenerateRequest) -> tuple[list[list[int]], bool]:
    """(token ids per prompt, whether the body was a batch)."""
    if (req.text is None) == (req.input_ids is None):
        raise APIError(400, "give exactly one of `text` and `input_ids`", "text")
    if req.text is not None:
        texts = req.text if isinstance(req.text, list) else [req.text]
        if not texts:
            raise APIError(400, "the prompt is empty", "text")
        for t in texts:
            state.tm.check_size(len(t), "text")
        return [await state.tm.tokenize(t, "text") for t in texts], isinstance(req.text, list)
    if req.input_ids and isinstance(req.input_ids[0], list):
        return check_token_ids([list(p) for p in req.input_ids], "input_ids"), True
    return check_token_ids([list(req.input_ids)], "input_ids"), False


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request) -> Response:
    state = state_of(request)
    params = native_sampling(req)  # the cheap checks first: a bad parameter costs no tokenization
    prompts, batch = await native_prompts(state, req)
    samplings = []
    for ids in prompts:
        max_new = check_lengths(state, len(ids), params["max_new_tokens"], "max_new_tokens")
        samplings.append(make_sampling(**{**params, "max_new_tokens": max_new},
                                       return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num))  # fmt: skip
    rids = req.rid if isinstance(req.rid, list) else [req.rid] if req.rid else None
    if rids is None:
        rids = [new_rid("gen") for _ in prompts]
    if len(rids) != len(prompts):
        raise APIError(400, f"{len(rids)} rids for {len(prompts)} prompts", "rid")
    gens = [
        state.tm.generate(r, ids, sp, pd_for(req.pd_fields(), i), owner_of(request))
        for i, (r, ids, sp) in enumerate(zip(rids, prompts, samplings, strict=True))
    ]
    prompt_ids = prompts if req.return_prompt_ids else None
    start = time.perf_counter()
    if req.stream:
        opened = await open_stream(request, gens)
        if opened is None:
            return Response(status_code=499)
        return StreamingResponse(
            native_stream(*opened, rids, batch, start, prompt_ids), media_type="text/event-stream"
        )
    accs = await until_disconnect(request, collect(gens))
    if accs is None:
        return Response(status_code=499)
    for acc in accs:
        acc.raise_if_rejected()
    bodies = [
        native_body(acc, rid, start, prompt_ids and prompt_ids[i])
        for i, (acc, rid) in enumerate(zip(accs, rids, strict=True))
    ]
    return JSONResponse(bodies if batch else bodies[0])


async def collect(gens: list[AsyncIterator[StrOut]]) -> list[ChoiceAcc]:
    accs = [ChoiceAcc() for _ in gens]
    try:
        async for i, out in merge_streams(gens):
            accs[i].add(out)
    except ValueError as e:
        raise duplicate_rid(e) from None
    return accs


async def native_stream(
    head, outputs, rids: list[str], batch: bool, start: float, prompt_ids: list[list[int]] | None
) -> AsyncIterator[str]:
    """SGLang's stream shape: each event carries the text and output ids so far; [DONE] at the end."""
    accs = [ChoiceAcc() for _ in rids]
    try:
        async for i, out in replay_head(head, outputs):
            accs[i].add(out)
            if out.finished and out.error and not accs[i].output_ids:
                yield sse(engine_error(out.error).body())
                continue
            body = native_body(accs[i], rids[i], start, prompt_ids and prompt_ids[i])
            yield sse({**body, "index": i} if batch else body)
    except Exception as e:  # noqa: BLE001 - a bug: the client still gets an error event, then [DONE]
        yield stream_crash(e)
    yield sse("[DONE]")


def finish_reason_body(last: StrOut | None) -> dict | None:
    if last is None or not last.finished:
        return None
    if last.finish_reason == "stop":
        return {"type": "stop", "matched": last.matched_stop}
    if last.finish_reason == "length":
        return {"type": "length", "length": last.completion_tokens}
    return {"type": last.finish_reason or "abort", "message": last.error or "aborted"}


def native_body(acc: ChoiceAcc, rid: str, start: float, prompt_ids: list[int] | None = None) -> dict:
    last = acc.last
    meta = {
        "id": rid,
        "finish_reason": finish_reason_body(last),
        "prompt_tokens": last.prompt_tokens if last else 0,
        "completion_tokens": len(acc.output_ids),
        "cached_tokens": last.cached_tokens if last else 0,
        "e2e_latency": time.perf_counter() - start,
    }
    if prompt_ids is not None:
        meta["prompt_ids"] = prompt_ids
    if acc.logprobs:
        meta["output_token_logprobs"] = [
            [lp, tid, None] for lp, tid in zip(acc.logprobs, acc.output_ids, strict=False)
        ]
        if acc.top_logprobs:
            meta["output_top_logprobs"] = [
                [[lp, tid, None] for _, tid, lp in top] for top in acc.top_logprobs
            ]
    return {"text": acc.text, "output_ids": list(acc.output_ids), "meta_info": meta}


@router.post("/abort_request")
async def abort_request(req: AbortRequest, request: Request) -> dict:
    """Abort one request by the id its client got back (only its own, unless the admin asks), or
    every request (`abort_all`: the admin only)."""
    if not req.abort_all and not req.rid:
        raise APIError(400, "give `rid` or `abort_all: true`", "rid")
    tm, is_admin = state_of(request).tm, request.scope.get(IS_ADMIN, True)
    if req.abort_all:
        if not is_admin:
            raise admin_required("abort_all")
        return {"aborted": tm.abort(None)}
    return {"aborted": tm.abort(req.rid, ANY_OWNER if is_admin else owner_of(request))}


@router.get("/health")
async def health(request: Request) -> Response:
    ok = await state_of(request).tm.ping(HEALTH_TIMEOUT_S) is not None
    if not ok:
        raise APIError(503, "the scheduler did not answer", type="service_unavailable")
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    state = state_of(request)
    bos = state.tm.tokenizer.bos_token_id or 0
    gen = state.tm.generate(new_rid("health"), [bos], SamplingParams(max_new_tokens=1, temperature=0.0))
    accs = await until_disconnect(request, collect([gen]))
    if not accs or not accs[0].last or accs[0].last.error:
        raise APIError(503, "health generation failed", type="service_unavailable")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    pong = await state.tm.ping(STATS_TIMEOUT_S, want_stats=True)
    if pong:
        state.metrics.set_stats(pong.stats)
    return Response(state.metrics.render(), media_type=state.metrics.CONTENT_TYPE)


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(request: Request) -> dict:
    state = state_of(request)
    pong = await state.tm.ping(STATS_TIMEOUT_S, want_stats=True)
    if pong:
        stats = pong.stats
    elif state.tm.last_stats is not None:  # busy in a long step: the last stats, and how old they are
        age = round(time.monotonic() - state.tm.last_stats_at, 3)
        stats = {**dataclasses.asdict(state.tm.last_stats), "stale_for_s": age}
    else:
        stats = {}
    return {**state.server_info, "context_length": state.context_length, "internal_states": [stats],
            "num_in_flight": state.tm.num_in_flight, "draining": state.draining}  # fmt: skip


@router.post("/flush_cache")
async def flush_cache(request: Request) -> Response:
    """Drop the prefix cache (SGLang's endpoint); 400 while requests are running."""
    pong = await state_of(request).tm.ping(HEALTH_TIMEOUT_S, flush_cache=True)
    if pong is None:
        raise APIError(503, "the scheduler did not answer", type="service_unavailable")
    if not pong.ok:
        raise APIError(400, "cannot flush the cache while requests are running")
    return Response("Cache flushed.\n", status_code=200)


@router.post("/eplb_rebalance")
async def eplb_rebalance(request: Request) -> dict:
    """MoE (admin): re-place the experts from the load counted since the last placement, on every
    rank between two steps (common/models/eplb.py). Answers the placement summary: per layer the new
    physical -> logical map and each EP rank's load under the old and the new placement."""
    pong = await state_of(request).tm.ping(EPLB_TIMEOUT_S, eplb_rebalance=True)
    if pong is None:
        raise APIError(503, "the scheduler did not answer", type="service_unavailable")
    if pong.eplb is None:
        raise APIError(503, "the scheduler did not answer the rebalance", type="service_unavailable")
    if "error" in pong.eplb:
        raise APIError(400, f"cannot rebalance the experts: {pong.eplb['error']}")
    moved = pong.eplb["num_layers_moved"]
    return {
        "success": True,
        "message": f"{moved} of {pong.eplb['num_layers']} MoE layers re-placed",
        **pong.eplb,
    }


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(request: Request) -> dict:
    state = state_of(request)
    return {"model_path": state.model_path, "tokenizer_path": state.model_path, "is_generation": True,
            "served_model_name": state.model_name, "context_length": state.context_length}  # fmt: skip


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict:
    """vLLM's and SGLang's shape: {"tokens", "count", "max_model_len"} (a list of prompts: lists)."""
    state = state_of(request)
    check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", "prompt")
    if req.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        _, tokens = await state.tm.chat_prompt(messages)  # the ids a chat request would send
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.context_length}
    texts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
    lists = [await encode(state, t, req.add_special_tokens) for t in texts]
    tokens = lists if isinstance(req.prompt, list) else lists[0]
    count = [len(t) for t in lists] if isinstance(req.prompt, list) else len(lists[0])
    return {"tokens": tokens, "count": count, "max_model_len": state.context_length}


async def encode(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    if add_special_tokens:
        return await state.tm.tokenize(text)
    state.tm.check_size(len(text), "prompt")
    return await state.tm._in_thread(len(text), lambda tok, t: tok.encode(t, add_special_tokens=False), text)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    """vLLM answers {"prompt"}, SGLang {"text"}: both."""
    state = state_of(request)
    check_model(state, req.model)
    check_token_ids([req.tokens], "tokens")
    if any(t >= len(state.tm.tokenizer) for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {len(state.tm.tokenizer)})", "tokens")
    text = await state.tm.detokenize(req.tokens)
    return {"prompt": text, "text": text}
