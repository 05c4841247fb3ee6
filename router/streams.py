"""What the router tracks of a client stream so that it never ends silently.

A stream ends in one of two ways the client can tell apart: the worker's own end (`data: [DONE]`)
or an error event the router writes (`data: {"error": {..., "code": ...}}` then `data: [DONE]`).
`StreamState` cuts the worker's bytes into whole SSE events (a broken worker may leave half an
event: it is dropped, not sent), notes `[DONE]` and, for SGLang-native `/generate` streams, the
last event sent (cumulative `text` and `output_ids`): what a continuation on another worker needs
(`continuation`) and what its events are merged onto (`merge`).
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

DONE = b"data: [DONE]\n\n"
_DONE_EVENT = b"data: [DONE]"
DEFAULT_MAX_NEW_TOKENS = 128  # the servers' default for /generate


def error_object(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def error_event(message: str, code: str) -> bytes:
    return b"data: " + orjson.dumps(error_object(message, code)) + b"\n\n" + DONE


def failure_status(code: str) -> int:
    return 504 if code == "worker_timeout" else 502


def failure_response(code: str, message: str) -> Response:
    """An infrastructure failure as an OpenAI-style error object with a typed `code`."""
    return Response(
        orjson.dumps(error_object(message, code)), failure_status(code), media_type="application/json"
    )


def answer_failure(response: Response) -> tuple[str, str]:
    """(code, message) of an error response, for an error event."""
    try:
        error = orjson.loads(response.body)["error"]
        message = str(error.get("message"))
        code = error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        message, code = f"HTTP {response.status_code}", None
    if not isinstance(code, str):
        code = "worker_timeout" if response.status_code == 504 else "upstream_unavailable"
    return code, message


def split_events(tail: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """(the complete SSE events of `tail + chunk`, blank line included; the incomplete rest to keep)."""
    data = tail + chunk if tail else chunk
    cut = data.rfind(b"\n\n")
    if cut < 0:
        return b"", data
    return data[: cut + 2], data[cut + 2 :]


class StreamState:
    def __init__(self, native: bool):
        self.native = native  # SGLang /generate: each event carries the text and output ids so far
        self.tail = b""  # an event not complete yet
        self.done = False  # `[DONE]` was sent
        self.base: dict | None = None  # native: what the client had before the current worker
        # NOTE: native events repeat every id so far: the last one is kept raw and parsed only when
        # a failure needs it (parsing each would cost O(n^2) in the output length)
        self._last_raw = b""  # the last data event sent, without "data: "
        self._last: dict | None = None  # parsed from _last_raw (after a migration: kept merged)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in `chunk` (after what was kept of the previous one), to send on."""
        complete, self.tail = split_events(self.tail, chunk)
        if not complete:
            return b""
        if not self.native:
            # NOTE: JSON escapes newlines, so "\n\ndata: [DONE]\n\n" cannot come from inside an event
            if complete == DONE or complete.endswith(b"\n\n" + DONE):
                self.done = True
            return complete
        if self.base is None:  # pass through, remember the last event
            for event in complete.split(b"\n\n")[-2::-1]:
                if event == _DONE_EVENT:
                    self.done = True
                elif event.startswith(b"data: {"):
                    self._last_raw, self._last = event[6:], None
                    break
            return complete
        return b"".join(self._merged_event(e) for e in complete.split(b"\n\n")[:-1])

    def _merged_event(self, event: bytes) -> bytes:
        """After a migration: the continuation's event rewritten onto what the client already has."""
        if event == _DONE_EVENT:
            self.done = True
        elif event.startswith(b"data: {"):
            body = _parse(event[6:])
            if body is not None and "output_ids" in body:
                body = merge(self.base, body)
                event = b"data: " + orjson.dumps(body)
                self._last_raw, self._last = event[6:], body
            else:
                self._last_raw, self._last = event[6:], body
        return event + b"\n\n"

    @property
    def last(self) -> dict | None:
        """The last event sent (merged), parsed; None if there was none."""
        if self._last is None and self._last_raw:
            self._last = _parse(self._last_raw)
        return self._last

    @property
    def finished(self) -> bool:
        """The last event sent ends the answer (a finish_reason, or an error) of a one-prompt stream:
        only `[DONE]` can be missing. (A batch's events carry `index`: one prompt's end is not all.)"""
        last = self.last if self.native else None
        if not last or "index" in last:
            return False
        return "error" in last or bool((last.get("meta_info") or {}).get("finish_reason"))

    @property
    def sent_ids(self) -> list[int]:
        last = self.last
        return list(last["output_ids"]) if last and "output_ids" in last else []


def _parse(raw: bytes) -> dict | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def is_batch(parsed: dict) -> bool:
    """Several prompts (or rids) in one body: the server answers each under its own index."""
    ids = parsed.get("input_ids")
    return (
        isinstance(parsed.get("text"), list)
        or isinstance(parsed.get("rid"), list)
        or (isinstance(ids, list) and bool(ids) and isinstance(ids[0], list))
    )


def continuation(parsed: dict, state: StreamState) -> dict | None:
    """The /generate body that goes on from what the client got, or None when that is impossible.

    The prompt is the original prompt + the tokens sent: exactly (token ids) when the client sent
    `input_ids`, else its text + the text sent (re-tokenized by the server: the tokens at the seam
    may differ from the ids the model produced, see docs/failures.md)."""
    if not state.native or is_batch(parsed) or (state.last is not None and "output_ids" not in state.last):
        return None
    sent = state.sent_ids
    params = dict(parsed.get("sampling_params") or {})
    left = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS) - len(sent)
    if left <= 0:
        return None
    body = {k: v for k, v in parsed.items() if k not in ("text", "input_ids", "rid", "stream")}
    body.pop("bootstrap_host", None), body.pop("bootstrap_port", None), body.pop("bootstrap_room", None)
    if isinstance(parsed.get("input_ids"), list):
        body["input_ids"] = list(parsed["input_ids"]) + sent
    elif isinstance(parsed.get("text"), str):
        body["text"] = parsed["text"] + (state.last.get("text", "") if state.last else "")
    else:
        return None
    body["sampling_params"] = {**params, "max_new_tokens": left}
    body["stream"] = True
    state.base = state.last
    return body


def merge(base: dict, body: dict) -> dict:
    """A continuation's event as the client expects it: ids and text after what it already had."""
    meta = dict(body.get("meta_info") or {})
    old = base.get("meta_info") or {}
    ids = list(base["output_ids"]) + list(body.get("output_ids") or [])
    for key in ("id", "prompt_tokens"):
        if key in old:
            meta[key] = old[key]
    meta["completion_tokens"] = len(ids)
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "length":
        meta["finish_reason"] = {**finish, "length": len(ids)}
    for key in ("output_token_logprobs", "output_top_logprobs"):
        if key in meta:
            meta[key] = list(old.get(key) or []) + list(meta[key])
    return {**body, "text": base.get("text", "") + body.get("text", ""), "output_ids": ids, "meta_info": meta}
