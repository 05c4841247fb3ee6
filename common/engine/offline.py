"""Offline Python API: `Engine(model_path=..., tp=1).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from dataclasses import fields

import torch
from disagg.common.config import EngineConfig
from disagg.common.engine.request import Req, SamplingParams
from disagg.common.parallel.dp_attention import create_scheduler
from disagg.common.parallel.ranks import (
    check_layout,
    cpu_threads_env,
    init_distributed,
    local_ranks,
    spawn_workers,
    stop_workers,
    with_local_init_addr,
)
from disagg.common.parallel.state import ParallelState, set_parallel

_rid = itertools.count()


def to_sampling_params(params: SamplingParams | dict | None) -> SamplingParams:
    if isinstance(params, SamplingParams):
        return params
    params = dict(params or {})
    known = {f.name for f in fields(SamplingParams)}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
    sp = SamplingParams(**params)
    sp.validate()
    return sp


class Engine:
    """Runs the scheduler in this process (tp == 1). Used by tests and benchmarks."""

    def __init__(self, model_path: str | None = None, **kwargs):
        self.config = EngineConfig(model_path=model_path, **kwargs)
        self._workers = []
        if self.config.world_size > 1:
            if self.config.node_rank != 0:
                raise ValueError(
                    "the offline Engine runs on node rank 0 (run other nodes with python -m disagg.common.parallel.ranks)"
                )
            check_layout(self.config)
            self.config = with_local_init_addr(self.config)
            cpu_threads_env(self.config)
            self._workers = spawn_workers(self.config, local_ranks(self.config)[1:])
            init_distributed(self.config, 0)
        self.scheduler = create_scheduler(self.config)  # DP attention: one scheduler per DP rank
        self.tokenizer = self.scheduler.tokenizer

    def generate(self, prompts, sampling_params=None) -> list[dict]:
        """prompts: a string, a list of strings, or lists of token ids. sampling_params: a dict /
        SamplingParams, or a list of them (one per prompt). Returns one dict per prompt:
        {"text", "output_ids", "finish_reason", "meta_info"}."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        reqs = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            reqs.append(Req(rid=f"offline-{next(_rid)}", input_ids=ids, sampling=to_sampling_params(p)))
        for req in reqs:
            self.scheduler.add_request(req)
        results = {req.rid: None for req in reqs}
        errors = {}
        while any(v is None for v in results.values()):
            for out in self.scheduler.step():
                if out.finished and out.rid in results:
                    results[out.rid] = out
                    errors[out.rid] = out.error
        return [self._result(req, results[req.rid]) for req in reqs]

    def _result(self, req: Req, out) -> dict:
        text = None
        if self.tokenizer is not None:
            ids = req.output_ids
            if out.finish_reason == "stop" and isinstance(out.matched_stop, int):
                ids = ids[:-1]
            text = self.tokenizer.decode(ids, skip_special_tokens=req.sampling.skip_special_tokens)
            if isinstance(out.matched_stop, str):
                text = text[: text.find(out.matched_stop)] if out.matched_stop in text else text
        return {
            "text": text,
            "output_ids": list(req.output_ids),
            "finish_reason": out.finish_reason,
            "meta_info": {
                "prompt_tokens": len(req.input_ids),
                "completion_tokens": len(req.output_ids),
                "cached_tokens": out.cached_tokens,
                "error": out.error,
                "output_logprobs": list(req.output_logprobs),
                "output_top_logprobs": [[list(t) for t in top] for top in req.output_top_logprobs],
            },
        }

    def stats(self) -> dict:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        """Stop the other ranks (tp > 1) and leave the process group."""
        if self.config.world_size > 1 and torch.distributed.is_initialized():
            stop_workers()
            for p in self._workers:
                p.join(timeout=30)
            torch.distributed.destroy_process_group()
            set_parallel(ParallelState())
            self._workers = []
