"""The detokenizer process: token ids -> incremental text, kept off the scheduler's loop.

Per request it keeps the output ids and two offsets (vLLM/SGLang's scheme): text is emitted only
once the newest tokens decode to complete characters, and a tail that could be the start of a
stop string is held back until it is known not to be one, so a stop string never leaks into a stream.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

import zmq
from disagg.common.engine.request import TokenOut
from disagg.common.messages import decode, encode
from disagg.common.server.ipc import (
    BatchStrOutMsg,
    BatchTokenOutMsg,
    DetokReqInfo,
    IpcNames,
    StrOut,
    die_with_parent,
    setup_child_logging,
    zmq_socket,
)

logger = logging.getLogger(__name__)


@dataclass
class DecodeState:
    info: DetokReqInfo
    ids: list[int] = field(default_factory=list)  # ids whose text is shown (a final stop token is not)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # decoded so far
    sent: int = 0  # characters of `text` already sent


def held_back(text: str, stops: list[str] | tuple[str, ...]) -> int:
    """How many trailing characters of `text` could begin one of `stops` (a stop string; a tool-call
    marker, tool_parsers.py): they must not be sent yet."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def _decode(self, ids: list[int], skip: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip)

    def _advance(self, st: DecodeState, new_ids: list[int], final: bool) -> None:
        st.ids.extend(new_ids)
        skip = st.info.skip_special_tokens
        prefix = self._decode(st.ids[st.prefix_offset : st.read_offset], skip)
        full = self._decode(st.ids[st.prefix_offset :], skip)
        # NOTE: a token may end inside a multi-byte character (shown as U+FFFD): wait for the rest
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            st.text += full[len(prefix) :]
            st.prefix_offset, st.read_offset = st.read_offset, len(st.ids)

    def process(self, out: TokenOut) -> StrOut:
        st = self.states.get(out.rid)
        if st is None:  # not registered (e.g. rejected before the scheduler saw it)
            st = self.states[out.rid] = DecodeState(DetokReqInfo(out.rid))
        shown = out.new_token_ids
        if out.finished and isinstance(out.matched_stop, int) and shown and shown[-1] == out.matched_stop:
            shown = shown[:-1]  # a stop token's text is not part of the answer
        self._advance(st, shown, final=out.finished)
        end = len(st.text)
        if out.finished:
            if isinstance(out.matched_stop, str) and out.matched_stop:
                cut = st.text.rfind(out.matched_stop)
                end = max(cut, st.sent) if cut >= 0 else end
            del self.states[out.rid]
        else:
            end -= held_back(st.text, st.info.stop)
        delta = st.text[st.sent : max(end, st.sent)]
        st.sent = max(end, st.sent)
        return StrOut(
            rid=out.rid,
            text=delta,
            output_ids=list(out.new_token_ids),
            finished=out.finished,
            finish_reason=out.finish_reason,
            matched_stop=out.matched_stop,
            error=out.error,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            logprobs=out.logprobs,
            token_texts=self._token_texts(out.new_token_ids) if out.logprobs is not None else None,
            top_logprobs=self._top_texts(out.top_logprobs),
            prompt_logprobs=out.prompt_logprobs,
            prompt_top_logprobs=None if out.prompt_top_logprobs is None
            else [None, *self._top_texts(out.prompt_top_logprobs[1:])],
        )  # fmt: skip

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def _top_texts(self, tops: list[list[list]] | None) -> list[list[list]] | None:
        if tops is None:
            return None
        return [
            [[self.tokenizer.decode([int(t)]), int(t), float(lp)] for t, lp in per_tok] for per_tok in tops
        ]

    def handle_batch(self, batch: BatchTokenOutMsg) -> BatchStrOutMsg:
        for info in batch.new_reqs:
            self.states[info.rid] = DecodeState(info)
        return BatchStrOutMsg([self.process_safely(out) for out in batch.outs])

    def process_safely(self, out: TokenOut) -> StrOut:
        try:
            return self.process(out)
        except Exception:  # a broken decode must end the request, not leave its client waiting
            logger.exception("detokenizing %s failed", out.rid)
            self.states.pop(out.rid, None)
            return StrOut(
                out.rid,
                "",
                list(out.new_token_ids),
                finished=True,
                finish_reason="abort",
                error="detokenization failed",
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
            )


def run_detokenizer_process(tokenizer_path: str, ipc: IpcNames, ready_conn, log_level: str = "info") -> None:
    """Spawn target: load the tokenizer, say ready, then turn token batches into text batches."""
    die_with_parent()
    setup_child_logging(log_level, "detokenizer")
    try:
        from disagg.common.server.tokenizer_manager import load_tokenizer  # noqa: PLC0415 - in the child

        detok = Detokenizer(load_tokenizer(tokenizer_path))
        ctx = zmq.Context.instance()
        recv = zmq_socket(ctx, zmq.PULL, ipc.detokenizer, bind=True)
        send = zmq_socket(ctx, zmq.PUSH, ipc.http, bind=False)
    except Exception:
        ready_conn.send({"status": "error", "error": traceback.format_exc()})
        return
    ready_conn.send({"status": "ready"})
    ready_conn.close()
    while True:
        msg = decode(recv.recv())
        if isinstance(msg, BatchTokenOutMsg):
            msg = detok.handle_batch(msg)
        send.send(encode(msg))  # other messages (pongs) pass through unchanged
