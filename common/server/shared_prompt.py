"""`n > 1` on a colocated server: the shared prompt is computed once, its KV pages shared by the n choices.

SGLang's scheme: before the n choices, the prompt runs alone for one greedy token; when it finishes,
its whole pages are in the prefix cache (common/engine/radix_cache.py), and each choice admitted
after it matches them there and locks the same pages: only the prompt's last partial page (and the
one token the scheduler always computes for the logits) is computed again per choice. Without this
the n choices arrive together, all miss the cache and each computes the whole prompt.

The helper request is a request like any other for the scheduler and /metrics (prompt tokens,
a finished request); the call's usage reports as cached only what the cache held before the call.

Through PD the same scheme forks one prefill into n choices: the prefill server computes each prompt
once (one room per prompt, `serving.pd_for`), the decode server's helper of that prompt receives its KV in
that room and, ending at its first token, leaves the whole pages in the decode's prefix cache
(decode/scheduler.py); the n choices then run on the decode server as plain requests that match
them, each computing its last partial page and sampling its own first token, exactly as colocated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from disagg.common.engine.request import SamplingParams
from disagg.common.server.ipc import StrOut
from disagg.common.server.serving import ServerState, has_room, pd_for


def worth_sharing(state: ServerState, pd: dict | None, n: int, prompt_len: int) -> bool:
    """Always for n > 1 through PD (the prefill server sends each prompt once: its n choices can only
    start from the decode server's prefix cache). Colocated, only where it helps: one prefix cache
    (not --dp-size replicas, not --disable-radix-cache), a prompt of a page or more."""
    info = state.server_info
    page_size = info.get("page_size", 16)
    if n > 1 and has_room(pd):
        return info.get("role") == "decode"
    return (
        n > 1
        and info.get("role", "server") == "server"
        and not info.get("disable_radix_cache")
        and info.get("dp_size", 1) <= 1
        and (prompt_len - 1) // page_size >= 1
    )


class SharedPrompts:
    """The helper requests of one call, one per prompt, started by the first choice that needs it."""

    def __init__(
        self,
        state: ServerState,
        rid: str,
        prompts: list[list[int]],
        owner: str | None,
        pd: dict | None = None,
        prompt_logprobs: int | None = None,
    ):
        self.state, self.rid, self.prompts, self.owner = state, rid, prompts, owner
        self.pd = pd  # PD: the helper of prompt p receives its KV in the room of prompt p (pd_for)
        # echo + logprobs through PD (None: not asked): the helper brings the prompt's logprobs (the
        # prefill computed them, with this many top logprobs); each choice's first output gets them
        self.prompt_logprobs = prompt_logprobs
        self.prompt_outs: dict[int, StrOut] = {}  # prompt index -> the helper's output that carried them
        self.tasks: dict[int, asyncio.Task] = {}
        self.cached_before: dict[int, int] = {}  # prompt index -> tokens the cache held before the call
        self.aborted: dict[int, StrOut] = {}  # prompt index -> the helper's final output, if it was aborted

    def after(self, p: int, gen: AsyncIterator[StrOut]) -> AsyncIterator[StrOut]:
        """`gen` (a choice of prompt p), started once prompt p is in the prefix cache."""

        async def wait_then_run():
            if p not in self.tasks:
                self.tasks[p] = asyncio.ensure_future(self._compute(p))
            # NOTE: a cancelled choice cancels the shared task too; that happens only when the whole
            # call is cancelled (the client left), which aborts the helper request with it
            await self.tasks[p]
            if p in self.aborted:  # /abort_request reached the helper: its choices end the same way
                await gen.aclose()
                yield self.aborted[p]
                return
            got = self.prompt_outs.get(p)
            async with contextlib.aclosing(gen) as g:
                async for out in g:
                    if got is not None:  # the choice's first output: it answers the prompt's logprobs
                        out.prompt_logprobs = got.prompt_logprobs
                        out.prompt_top_logprobs, got = got.prompt_top_logprobs, None
                    yield out

        return wait_then_run()

    async def _compute(self, p: int) -> None:
        last = None
        greedy_token = SamplingParams(max_new_tokens=1, temperature=0.0)
        # in PD the decode server keeps the prompt's pages in its prefix cache for the choices
        pd = {**pd_for(self.pd, p), "keep_prompt_cached": True} if self.pd else None
        if self.prompt_logprobs is not None:
            greedy_token.prompt_logprobs, greedy_token.top_logprobs_num = True, self.prompt_logprobs
        async for out in self.state.tm.generate(f"{self.rid}-prompt{p}", self.prompts[p], greedy_token, pd,
                                                self.owner):  # fmt: skip
            last = out
            if out.prompt_logprobs is not None:
                self.prompt_outs[p] = out
        # an abort, a refusal or (PD) a failed KV transfer: every choice of the prompt ends with it
        if last is not None and last.finish_reason == "abort":
            self.aborted[p] = StrOut(last.rid, "", [], finished=True, finish_reason="abort", error=last.error)
        # a refused prompt (too long for the pool, ...) is refused again for each choice, which answers it
        if last is not None and not last.error:
            self.cached_before[p] = last.cached_tokens

    def usage(self, body: dict) -> dict:
        """OpenAI's usage of the call: cached tokens as the prompts found the cache, not as the
        choices found it after the helper filled it."""
        if len(self.cached_before) == len(self.prompts):
            cached = sum(min(len(self.prompts[p]), c) for p, c in self.cached_before.items())
            body["prompt_tokens_details"] = {"cached_tokens": cached}
        return body
