"""OpenAI streams that can move to another worker when theirs dies (docs/failures.md).

A streamed /v1/chat/completions or /v1/completions of one prompt and one choice is sent to the
workers with `return_token_ids: true` (vLLM's spelling): the chunks then carry the prompt's token
ids (chat: rendered by the chat template) and each chunk's output token ids. `OpenAIStreamState`
tracks them (and strips them again when the client did not ask for them); on a break the stream
continues as a /v1/completions request whose prompt is those token ids + every output id sent, and
the continuation's chunks are rewritten into the client's stream: same id, object, created, choice
index; text offsets, logprobs and usage continue the old ones.

Not movable (they end with an error event as before): n > 1 or several prompts, and requests whose
output so far changes what comes next in a way a fresh request would not rebuild (frequency or
presence penalties, response_format / regex / ebnf grammars, tool calls).
"""

from __future__ import annotations

import orjson
from disagg.router.streams import split_events

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")
_DONE_EVENT = b"data: [DONE]"
# the client's sampling fields a continuation keeps (both routes accept them alike)
_KEPT = ("model", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
         "skip_special_tokens", "seed", "user", "logit_bias")  # fmt: skip


def can_move(path: str, parsed: dict | None) -> bool:
    """A streamed OpenAI request the router can continue on another worker."""
    if path not in OPENAI_PATHS or not isinstance(parsed, dict) or parsed.get("stream") is not True:
        return False
    if parsed.get("n") not in (None, 1) or parsed.get("frequency_penalty") or parsed.get("presence_penalty"):
        return False
    fmt = parsed.get("response_format")
    if (
        (isinstance(fmt, dict) and fmt.get("type") not in (None, "text"))
        or parsed.get("regex")
        or parsed.get("ebnf")
    ):
        return False
    if parsed.get("tools") and parsed.get("tool_choice") != "none":
        return False
    if path == "/v1/completions":
        prompt = parsed.get("prompt")
        return isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) >= 1 and
                                           (isinstance(prompt[0], int) or len(prompt) == 1))  # fmt: skip
    return True


def with_token_ids(parsed: dict) -> dict:
    """The body to send: the same request, its chunks carrying token ids."""
    return {**parsed, "return_token_ids": True}


class OpenAIStreamState:
    """What the client got of one OpenAI stream: token ids, text length, finish, usage; the same
    interface as streams.StreamState (feed, done, finished, resume)."""

    native = False

    def __init__(self, path: str, parsed: dict):
        self.chat = path == "/v1/chat/completions"
        self.show_ids = parsed.get("return_token_ids") is True  # the client itself asked for them
        self.include_usage = bool((parsed.get("stream_options") or {}).get("include_usage"))
        self.tail = b""
        self.done = False
        self.head: dict = {}  # id, object, created, model of the client's stream
        self.prompt_ids: list[int] | None = None
        self.sent_ids: list[int] = []
        self.text_len = 0  # characters sent (completions: echo included; OpenAI's text_offset base)
        self.echo_due = parsed.get("echo") is True  # completions: the first chunk is the prompt's text
        self.out_text: list[str] = []  # the generated text sent
        self.finish = None  # the choice's finish_reason once sent
        self.usage_sent = False
        self.moved = False  # events now come from a continuation (a completions stream)
        self.prefix = ""  # text the old worker held back, sent before the continuation's first text
        self.why_not = ""  # why resume() found no continuation (logged)

    # ---- the client's stream ----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in `chunk`, rewritten for the client."""
        complete, self.tail = split_events(self.tail, chunk)
        return b"".join(self._event(e) for e in complete[:-2].split(b"\n\n")) if complete else b""

    def _event(self, event: bytes) -> bytes:
        if event == _DONE_EVENT:
            self.done = True
        elif event.startswith(b"data: {"):
            try:
                body = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                return event + b"\n\n"
            if isinstance(body, dict):
                return b"data: " + orjson.dumps(self._rewrite(body)) + b"\n\n"
        return event + b"\n\n"

    def _rewrite(self, body: dict) -> dict:
        if "error" in body:  # the worker's own error event ends the answer
            self.finish = self.finish or "error"
            return body
        if not self.head:
            self.head = {k: body.get(k) for k in ("id", "object", "created", "model")}
        if self.moved:
            body = {**body, **self.head}
        ids = body.pop("prompt_token_ids", None)
        if self.chat and not self.moved and ids is not None:
            self.prompt_ids = ids
            if self.show_ids:
                body["prompt_token_ids"] = ids
        if isinstance(body.get("choices"), list):
            body["choices"] = [self._choice(c) for c in body["choices"] if isinstance(c, dict)]
        if body.get("usage"):
            self.usage_sent = True
            if self.moved:
                body["usage"] = self._usage(body["usage"])
        return body

    def _choice(self, c: dict) -> dict:
        prompt_ids = c.pop("prompt_token_ids", None)
        if not self.moved and prompt_ids is not None:
            self.prompt_ids = prompt_ids
            if self.show_ids:
                c["prompt_token_ids"] = prompt_ids
        ids = c.get("token_ids") if self.show_ids else c.pop("token_ids", None)
        self.sent_ids += ids or []
        if c.get("finish_reason"):
            self.finish = c["finish_reason"]
        if self.moved:
            c = self._continued(c)
        text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
        self.text_len += len(text or "")
        if self.echo_due:
            self.echo_due = False
        elif text:
            self.out_text.append(text)
        return c

    def held_text(self, decoded: str, stops: list[str]) -> str:
        """What the old worker held back of the ids it sent (the start of a stop string, not yet ruled
        out), given those ids decoded: sent first by the continuation. Anything else the decoded text
        has more (a special token the stream skipped) is not; a character cut in two at the seam (U+FFFD)
        is not repaired."""
        sent = "".join(self.out_text)
        held = decoded[len(sent) :] if decoded.startswith(sent) else ""
        return held if held and any(stop.startswith(held) for stop in stops) else ""

    def _continued(self, c: dict) -> dict:
        """A continuation's (completions) choice as the client's stream has it."""
        text, self.prefix = self.prefix + (c.get("text") or ""), ""
        lp = c.get("logprobs")
        ids = {"token_ids": c["token_ids"]} if "token_ids" in c else {}
        if self.chat:
            lp = {"content": chat_logprobs(lp)} if lp else None
            return {"index": 0, "delta": {"content": text}, "logprobs": lp,
                    "finish_reason": c.get("finish_reason"), **ids}  # fmt: skip
        if lp and lp.get("text_offset") is not None:
            lp = {**lp, "text_offset": [o + self.text_len for o in lp["text_offset"]]}
        return {**c, "index": 0, "text": text, "logprobs": lp}

    def _usage(self, usage: dict) -> dict:
        prompt = len(self.prompt_ids or [])
        out = {**usage, "prompt_tokens": prompt, "completion_tokens": len(self.sent_ids),
               "total_tokens": prompt + len(self.sent_ids)}  # fmt: skip
        details = out.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            out["prompt_tokens_details"] = {**details, "cached_tokens": min(details["cached_tokens"], prompt)}
        return out

    @property
    def finished(self) -> bool:
        """The answer was whole (its finish_reason, and its usage when asked): only `[DONE]` is missing."""
        return self.finish is not None and (self.usage_sent or not self.include_usage)

    # ---- the continuation --------------------------------------------------------------------------

    def resume(self, parsed: dict, context_length: int | None = None) -> tuple[str, dict] | None:
        """(path, body) of the /v1/completions request that goes on from what the client got, or None.
        `context_length`: the model's, for a chat without a token budget (the rest of the context)."""
        if self.prompt_ids is None or self.finish is not None:
            self.why_not = "no prompt token ids from the worker" if self.prompt_ids is None else "finished"
            return None
        if self.chat:
            budget = parsed.get("max_completion_tokens") or parsed.get("max_tokens")
            if budget is None and context_length is not None:
                budget = context_length - len(self.prompt_ids)
            top = (parsed.get("top_logprobs") or 0) if parsed.get("logprobs") else None
        else:
            budget, top = parsed.get("max_tokens") or 16, parsed.get("logprobs")  # OpenAI's default: 16
        if not isinstance(budget, int) or budget - len(self.sent_ids) <= 0:
            self.why_not = f"no token budget left ({budget} - {len(self.sent_ids)} sent)"
            return None
        body = {k: parsed[k] for k in _KEPT if parsed.get(k) is not None}
        body |= {"prompt": self.prompt_ids + self.sent_ids, "max_tokens": budget - len(self.sent_ids),
                 "stream": True, "return_token_ids": True}  # fmt: skip
        if top is not None:
            body["logprobs"] = top
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        self.moved = True
        return "/v1/completions", body


def chat_logprobs(lp: dict) -> list[dict]:
    """Completions' logprobs ({tokens, token_logprobs, top_logprobs}) in the chat format."""

    def entry(tok: str, logprob: float) -> dict:
        return {"token": tok, "logprob": logprob, "bytes": list(tok.encode("utf-8"))}

    tops = lp.get("top_logprobs") or [{} for _ in lp.get("tokens") or []]
    return [
        {**entry(tok, logprob), "top_logprobs": [entry(t, tlp) for t, tlp in top.items()]}
        for tok, logprob, top in zip(
            lp.get("tokens") or [], lp.get("token_logprobs") or [], tops, strict=False
        )
    ]
