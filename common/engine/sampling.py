"""Batched sampling on the device: logit bias, penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

A seeded request draws its n-th output token from a generator seeded with (seed, n): the draw depends
on the request and the position only, never on which process samples it or what ran before, so a PD
deployment (the prefill samples token 0, the decode the rest) samples exactly as a colocated server.

Structured output (`SamplingParams.grammar`): a request's xgrammar matcher lives here, keyed by rid,
and is advanced lazily through the request's output ids before each draw, so the decode side of a PD
pair catches up past the prefill's first token by itself. The mask is applied to the logits on the
device; compiled grammars are cached by xgrammar's GrammarCompiler (one per sampler).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from disagg.common.engine.device_wait import to_device
from disagg.common.engine.request import Req
from disagg.common.models.argmax import argmax_finite

logger = logging.getLogger(__name__)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None = None  # of each chosen token (model distribution), when any row asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # per row: its logits were not a distribution (NaN, +inf, or nothing finite): its token is noise
    bad: list[bool] | None = None


@dataclass
class DeviceSample:
    """A batch's draws where they were made (the device), before any host sync: the overlap
    scheduler feeds `tokens` to the next step's forward and reads the host copy a step later."""

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32, when any row asked
    top_vals: torch.Tensor | None = None  # [B, k] float32, k the largest top_logprobs_num
    top_ids: torch.Tensor | None = None  # [B, k] int64
    top_nums: list[int] | None = None  # per row: its own top_logprobs_num
    finite: torch.Tensor | None = None  # [B] bool: False where the row's logits were not a distribution

    def to_host(self) -> DeviceSample:
        """Start copying to the host without waiting (pinned memory on CUDA): the copy is only
        valid after a CUDA event recorded behind it completed (on the CPU it is the same tensors)."""

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)

        return DeviceSample(copy(self.tokens), copy(self.logprobs), copy(self.top_vals), copy(self.top_ids),
                            self.top_nums, copy(self.finite))  # fmt: skip

    def result(self) -> SampleResult:
        """The draws as lists (a host sync when the tensors are on the device)."""
        result = SampleResult(self.tokens.tolist())
        if self.finite is not None:
            result.bad = [not f for f in self.finite.tolist()]
        if self.logprobs is not None:
            result.logprobs = self.logprobs.tolist()
        if self.top_vals is not None:
            result.top_logprobs = [
                list(zip(i[:k], v[:k], strict=True))
                for i, v, k in zip(self.top_ids.tolist(), self.top_vals.tolist(), self.top_nums, strict=True)
            ]
        return result


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, tokenizer=None):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.tokenizer = tokenizer  # for grammars (None: a request with a grammar is sampled unconstrained)
        self._compiler = None  # xgrammar.GrammarCompiler, made on the first grammar (it caches compilations)
        self._matchers: dict[str, list] = {}  # rid -> [GrammarMatcher, output tokens it has accepted]

    def forget(self, rid: str) -> None:
        """Drop a finished request's grammar matcher (seeded draws keep no state)."""
        self._matchers.pop(rid, None)

    def sample(self, logits: torch.Tensor, reqs: list[Req]) -> SampleResult:
        """logits: [B, V] float32 on the device, one row per request."""
        return self.sample_on_device(logits, reqs).result()

    def sample_on_device(
        self,
        logits: torch.Tensor,
        reqs: list[Req],
        num_pending: list[int] | None = None,
        pending_tokens: torch.Tensor | None = None,
    ) -> DeviceSample:
        """As `sample`, without the host sync. num_pending: per row, the request's sampled tokens
        not yet in its output_ids (0 or 1: the overlap scheduler's token still on the device); a
        seeded draw's position counts it, and penalties count pending_tokens[row] ([B] int64 on the
        device) as an output token. A grammar's matcher reads output_ids on the host, so a request
        with one must have none pending (the scheduler does not overlap its steps)."""
        num_pending = num_pending or [0] * len(reqs)
        logits = self._apply_logit_bias(logits, reqs)
        logits = self._apply_penalties(logits, reqs, num_pending, pending_tokens)
        logits = self._apply_grammars(logits, reqs)
        want_logprobs = any(r.sampling.return_logprob or r.sampling.top_logprobs_num for r in reqs)
        logprobs_all = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        # a NaN or +inf logit (a numerical fault of the model) makes the chosen token's logit non-finite
        # (argmax ranks NaN first): flagged per row on the device, no sync (on CUDA by the argmax's own
        # second launch); the scheduler fails such a row
        tokens, finite = argmax_finite(logits)
        # NOTE: decided on the host: a device-side `greedy.all()` would cost a sync every step
        if not all(r.sampling.is_greedy for r in reqs):
            greedy = to_device([r.sampling.is_greedy for r in reqs], torch.bool, self.device)
            sampled, valid = self._sample_random(logits, reqs, num_pending)
            tokens = torch.where(greedy, tokens, sampled)
            finite = torch.where(greedy, finite, valid)  # a sampled row: its probabilities a distribution
        out = DeviceSample(tokens, finite=finite)
        if logprobs_all is not None:
            out.logprobs = logprobs_all.gather(1, tokens[:, None]).squeeze(1)
            k = max(r.sampling.top_logprobs_num for r in reqs)
            if k:
                out.top_vals, out.top_ids = logprobs_all.topk(k, dim=-1)
                out.top_nums = [r.sampling.top_logprobs_num for r in reqs]
        return out

    def _apply_logit_bias(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """OpenAI's logit_bias, added to the logits (so logprobs see it too, as in vLLM); a bias of
        -100 or less bans the token outright (-inf): a large logit gap must not let it through."""
        rows = [i for i, r in enumerate(reqs) if r.sampling.logit_bias]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            # NOTE: the server checks ids against the tokenizer; ids past the logits are dropped, not a crash
            pairs = [(t, b) for t, b in reqs[i].sampling.logit_bias if 0 <= t < logits.shape[1]]
            if not pairs:
                continue
            ids = to_device([int(t) for t, _ in pairs], torch.long, self.device)
            bias = to_device([float(b) for _, b in pairs], logits.dtype, self.device)
            bias = bias.masked_fill(bias <= BAN_BIAS, float("-inf"))
            logits[i].index_add_(0, ids, bias)
        return logits

    def _apply_grammars(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        rows = [i for i, r in enumerate(reqs) if r.sampling.grammar]
        if not rows or self.tokenizer is None:
            return logits
        import xgrammar as xgr  # noqa: PLC0415 - optional: only requests with a grammar need it

        bitmask = xgr.allocate_token_bitmask(len(reqs), logits.shape[1])  # all allowed
        for i in rows:
            matcher = self._matcher(reqs[i], logits.shape[1])
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, i)
        logits = logits.clone()
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
        return logits

    def _matcher(self, req: Req, vocab_size: int):
        """The request's matcher, advanced through every output token it has not seen yet."""
        import xgrammar as xgr  # noqa: PLC0415

        entry = self._matchers.get(req.rid)
        if entry is None:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
            entry = self._matchers[req.rid] = [
                xgr.GrammarMatcher(compile_grammar(self._compiler, *req.sampling.grammar)),
                0,
            ]
        matcher, seen = entry
        for token in req.output_ids[seen:]:
            if not matcher.accept_token(token):
                logger.warning("request %s: token %d is outside its grammar", req.rid, token)
        entry[1] = len(req.output_ids)
        return matcher

    def _apply_penalties(
        self,
        logits: torch.Tensor,
        reqs: list[Req],
        num_pending: list[int],
        pending_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        rows = [
            i
            for i, r in enumerate(reqs)
            if (r.sampling.frequency_penalty or r.sampling.presence_penalty)
            and (r.output_ids or num_pending[i])
        ]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            s = reqs[i].sampling
            ids = to_device(reqs[i].output_ids, torch.long, self.device)
            if num_pending[i]:  # the token the host has not read yet counts too (on the device, no sync)
                ids = torch.cat([ids, pending_tokens[i : i + 1]])
            counts = torch.zeros(logits.shape[1], device=self.device).scatter_add_(
                0, ids, torch.ones_like(ids, dtype=torch.float)
            )
            logits[i] -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()
        return logits

    def _sample_random(
        self, logits: torch.Tensor, reqs: list[Req], num_pending: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a draw per row, whether the row's probabilities were a distribution). A row that was not
        (NaN from NaN or +inf logits, or all zero) is drawn uniformly instead: torch.multinomial would
        fail on it, on CUDA with a device-side assert that ends the process (the caller fails the row)."""
        temps = to_device([max(r.sampling.temperature, 1e-5) for r in reqs], torch.float32, self.device)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        probs = _filter_probs(probs, reqs, self.device)
        valid = probs.sum(dim=-1) > 0  # False for NaN too
        probs = torch.where(valid[:, None], probs, 1.0)
        out = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        for i, r in enumerate(reqs):
            if r.sampling.seed is not None and not r.sampling.is_greedy:
                gen = torch.Generator(device=self.device).manual_seed(
                    position_seed(r.sampling.seed, len(r.output_ids) + num_pending[i])
                )
                out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        return out, valid


def compile_grammar(compiler, kind: str, spec: str):
    if kind == "json_object":
        return compiler.compile_builtin_json_grammar()
    if kind == "json_schema":
        # NOTE: no free whitespace: small models otherwise pad a JSON value with newlines up to max_tokens
        return compiler.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
    if kind == "regex":
        return compiler.compile_regex(spec)
    return compiler.compile_grammar(spec)  # ebnf


BAN_BIAS = -100.0  # OpenAI: "-100 should result in a ban"
_MASK64 = 2**64 - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of a request's position-th draw: a splitmix64 mix of both, so neighbouring seeds and
    positions give unrelated streams."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _filter_probs(probs: torch.Tensor, reqs: list[Req], device: torch.device) -> torch.Tensor:
    """Zero the tokens outside top-k / top-p / min-p, per row."""
    top_k = [r.sampling.top_k for r in reqs]
    top_p = [r.sampling.top_p for r in reqs]
    min_p = [r.sampling.min_p for r in reqs]
    if all(k == -1 for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=device)[None, :]
    k = to_device([k if k > 0 else probs.shape[1] for k in top_k], torch.long, device)[:, None]
    p = to_device(top_p, torch.float32, device)[:, None]
    mp = to_device(min_p, torch.float32, device)[:, None]
    cum = sorted_probs.cumsum(dim=-1)
    drop = (rank >= k) | ((cum - sorted_probs) > p) | (sorted_probs < mp * sorted_probs[:, :1])
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
