"""Tool calls in model output: one parser per model family, streamed as OpenAI's tool_call deltas.

Every family we serve writes its calls as JSON objects `{"name": ..., "arguments": {...}}` inside a
region of the output that a marker (or a bare `{` / `[`) opens; only the marker and the glue between
calls differ (`--tool-call-parser`, SGLang's names):

- `hermes` / `qwen25`: `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, repeated
- `llama3`: `<|python_tag|>` or a bare `{"name": ..., "parameters": ...}`, calls separated by `;`
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]`, or v11+'s `[TOOL_CALLS]name[ARGS]{...}`

Text before the region is the message's content; text after it is dropped. `ToolCallStreamer` reads
the output as it arrives and yields OpenAI's deltas: content text (holding back what could be the
start of a marker), then per call one delta with index, id and name and then fragments of the
arguments' JSON text as the model writes it. The non-streamed answer is the same streamer run over
the whole text, so both give the same calls. `tool_choice` `required` or a named function is
enforced by a grammar (tool_choice.py): the output is then plain JSON read by `REQUIRED` (an array of
`{"name", "parameters"}`) or a `named` streamer (the arguments object itself).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from disagg.common.server.detokenizer import held_back

_WS = " \t\r\n"


@dataclass(frozen=True)
class CallFormat:
    """How one family writes tool calls: JSON call objects in a region opened by a marker."""

    name: str
    starts: tuple[str, ...]  # markers that open the region (text before them is content)
    glue: tuple[str, ...]  # what may stand between and around the call objects (besides whitespace)
    bare_opener: str = ""  # a region may also open with this character as the first one of the output
    args_keys: tuple[str, ...] = ("arguments", "parameters")
    args_marker: str = ""  # Mistral v11+: a call may also be `name[ARGS]{...}` (no JSON object around it)


HERMES = CallFormat("hermes", ("<tool_call>",), ("<tool_call>", "</tool_call>"))
LLAMA3 = CallFormat("llama3", ("<|python_tag|>",), ("<|python_tag|>", ";"), bare_opener="{")
MISTRAL = CallFormat("mistral", ("[TOOL_CALLS]",), ("[TOOL_CALLS]", "[", "]", ","), args_marker="[ARGS]")
# tool_choice "required": the grammar makes the whole output a JSON array of calls
REQUIRED = CallFormat("required", (), ("[", "]", ","), bare_opener="[", args_keys=("parameters",))

PARSERS = {"hermes": HERMES, "qwen25": HERMES, "qwen": HERMES, "llama3": LLAMA3, "mistral": MISTRAL}


# ---- a forgiving scanner of JSON that is still being written ----


def _string_end(text: str, i: int) -> int | None:
    """Index past the JSON string opening at text[i] ('"'), or None when the text ends inside it."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index past the JSON value starting at text[i], or None when the text ends first (a number at
    the very end may still grow). Malformed JSON is caught later, by json.loads of the whole call."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}]" + _WS:
            j += 1
        return j if j < len(text) else None
    depth, j = 0, i
    while j < len(text):
        if text[j] == '"':
            end = _string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        depth += text[j] in "{["
        depth -= text[j] in "}]"
        if depth == 0:
            return j + 1
        j += 1
    return None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


@dataclass
class PartialCall:
    """What the text shows so far of one call object starting at `start`."""

    start: int
    name: str | None = None
    args: tuple[int, int | None] | None = None  # span of the arguments' JSON text (end None: unfinished)
    end: int | None = None  # past the closing brace, once the object is complete


def scan_call(text: str, start: int, fmt: CallFormat) -> PartialCall:
    """Read the call object at text[start] ('{') as far as the text goes; ValueError if it is not one."""
    call, i = PartialCall(start), start + 1
    while True:
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        if i >= len(text):
            return call
        if text[i] == "}":
            call.end = i + 1
            return call
        if text[i] != '"':
            raise ValueError(f"expected a key at {i}")
        key_end = _string_end(text, i)
        colon = _skip_ws(text, key_end) if key_end else len(text)
        value = _skip_ws(text, colon + 1)
        if value >= len(text):
            return call
        if text[colon] != ":":
            raise ValueError(f"expected ':' at {colon}")
        key, end = json.loads(text[i:key_end]), value_end(text, value)
        if key in fmt.args_keys:
            call.args = (value, end)
        elif key == "name" and end is not None:
            call.name = json.loads(text[value:end])
        if end is None:
            return call
        i = end


_NAME = re.compile(r"[A-Za-z0-9_.:-]*")


def scan_marked_call(text: str, start: int, marker: str) -> PartialCall | None:
    """Mistral v11+'s `name[ARGS]{...}` (a `[CALL_ID]id` after the name is skipped) at text[start];
    None while the name is still being written; ValueError if it is not a call."""
    at = text.find(marker, start)
    head = text[start:] if at < 0 else text[start:at]
    name = head.split("[CALL_ID]", 1)[0]
    if at < 0:
        name = name[: len(name) - held_back(name, (marker, "[CALL_ID]"))]
    if not _NAME.fullmatch(name) or (at >= 0 and not name):
        raise ValueError("not a function name")
    if at < 0:
        return None
    call, value = PartialCall(start, name), _skip_ws(text, at + len(marker))
    if value >= len(text):
        return call
    if text[value] != "{":
        raise ValueError("arguments must be an object")
    end = value_end(text, value)
    call.args, call.end = (value, end), end
    if end is not None:
        json.loads(text[value:end])
    return call


# ---- the streamer ----


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolDelta:
    """What one piece of output adds to a choice: content text and tool_call deltas (OpenAI's shape)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class _CallState:
    id: str
    name: str
    sent: int = 0  # characters of the arguments' text already sent


class ToolCallStreamer:
    """Reads one choice's output incrementally (`feed`, then `finish`) and yields ToolDeltas.

    `named`: tool_choice named that function; the grammar made the whole output its arguments.
    `max_calls`: calls after that many are ignored (parallel_tool_calls false)."""

    def __init__(self, fmt: CallFormat | None, named: str | None = None, max_calls: int | None = None):
        self.fmt, self.named, self.max_calls = fmt, named, max_calls
        self.text = ""
        self.sent = 0  # characters of text handled: sent as content, or inside the region
        self.region: int | None = None  # where the tool-call region starts in text
        self.cursor = 0  # where the next call object (or glue) starts in text
        self.broken = False  # the region holds something that is not a call: ignore the rest
        self.calls: list[_CallState] = []
        self.open_start: int | None = None  # where the call whose header went out (still open) starts
        self.arguments: list[str] = []  # each call's full arguments text, for the non-streamed answer

    def feed(self, text: str) -> ToolDelta:
        self.text += text
        if self.named is not None:
            return self._named()
        delta = ToolDelta(content=self._content())
        if self.region is not None and not self.broken:
            try:
                self._scan(delta.tool_calls)
            except ValueError:  # what the calls before it gave stays in the delta
                self.broken = True
        return delta

    def finish(self) -> ToolDelta:
        """The end of the output: what was held back (text that turned out to be no call) is content."""
        if self.named is not None:
            return ToolDelta()
        if self.region is None:
            content, self.sent = self.text[self.sent :], len(self.text)
            return ToolDelta(content=content)
        if not self.calls:  # a marker and then no call: the model's text, as vLLM answers it
            return ToolDelta(content=self.text[self.sent :])
        return ToolDelta()

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def _named(self) -> ToolDelta:
        delta = ToolDelta()
        if not self.calls:
            self.calls.append(_CallState(new_call_id(), self.named))
            self.arguments.append("")
            delta.tool_calls.append(self._header(0))
        fragment = self.text[self.calls[0].sent :]
        if fragment:
            self.calls[0].sent, self.arguments[0] = len(self.text), self.text
            delta.tool_calls.append(_args_delta(0, fragment))
        return delta

    def _content(self) -> str:
        """Content not yet sent, up to the region (found here) or to what could start a marker."""
        if self.region is not None:
            return ""
        fmt, rest = self.fmt, self.text[self.sent :]
        head = rest.lstrip(_WS)
        if fmt.bare_opener and self.sent == 0 and not head:
            return ""  # nothing but whitespace yet: the output may still open with a bare call
        if fmt.bare_opener and self.sent == 0 and head[0] == fmt.bare_opener:
            self.region = self.cursor = len(rest) - len(head)
            return ""
        found = [p for p in (rest.find(m) for m in fmt.starts) if p >= 0]
        if found:
            p = min(found)
            self.region = self.cursor = self.sent + p
            self.sent = self.region
            return rest[:p]
        keep = len(rest) - held_back(rest, fmt.starts)
        self.sent += keep
        return rest[:keep]

    def _scan(self, out: list[dict]) -> None:
        """Append the tool-call deltas of what the region shows beyond what was sent; ValueError
        where it stops being calls."""
        while True:
            glue_end = self._skip_glue(self.cursor)
            if glue_end is None or glue_end >= len(self.text):
                return
            self.cursor = glue_end
            if len(self.calls) == self.max_calls and self.open_start is None:
                raise ValueError("one call too many: the rest is ignored")
            call = self._scan_one()
            if call is None:  # a name still being written
                return
            out += self._deltas_of(call)
            if call.end is None:
                return
            self.cursor, self.open_start = call.end, None

    def _scan_one(self) -> PartialCall | None:
        if self.text[self.cursor] == "{":
            call = scan_call(self.text, self.cursor, self.fmt)
            if call.end is not None:
                json.loads(self.text[call.start : call.end])  # a complete call must be JSON
                if call.name is None:
                    raise ValueError("a call without a name")
            return call
        if self.fmt.args_marker:
            return scan_marked_call(self.text, self.cursor, self.fmt.args_marker)
        raise ValueError("not a call: the rest is ignored")

    def _deltas_of(self, call: PartialCall) -> list[dict]:
        out = []
        if self.open_start != call.start:  # a new call: its header once the name is known
            if call.name is None:
                return out
            self.calls.append(_CallState(new_call_id(), call.name))
            self.arguments.append("")
            self.open_start = call.start
            out.append(self._header(len(self.calls) - 1))
        index = len(self.calls) - 1
        if call.args is None:
            if call.end is not None:  # a call without arguments
                out.append(self._send_args(index, "{}"))
            return out
        start, end = call.args
        fragment = self.text[start + self.calls[index].sent : end if end is not None else len(self.text)]
        if fragment:
            out.append(self._send_args(index, fragment))
        return out

    def _send_args(self, index: int, fragment: str) -> dict:
        self.calls[index].sent += len(fragment)
        self.arguments[index] += fragment
        return _args_delta(index, fragment)

    def _header(self, index: int) -> dict:
        state = self.calls[index]
        return {"index": index, "id": state.id, "type": "function",
                "function": {"name": state.name, "arguments": ""}}  # fmt: skip

    def _skip_glue(self, i: int) -> int | None:
        """Past the glue at text[i]; None while the text ends inside what may become glue."""
        while True:
            i = _skip_ws(self.text, i)
            rest = self.text[i:]
            if not rest:
                return i
            if any(len(g) > len(rest) and g.startswith(rest) for g in self.fmt.glue):
                return None  # e.g. "[TOOL" is "[" and a name, or the start of "[TOOL_CALLS]": wait
            glue = max((g for g in self.fmt.glue if rest.startswith(g)), key=len, default=None)
            if glue is None:
                return i
            i += len(glue)

    def tool_calls(self) -> list[dict]:
        """The calls of the whole output, as a non-streamed message carries them."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args}}
                for c, args in zip(self.calls, self.arguments, strict=True)]  # fmt: skip


def _args_delta(index: int, fragment: str) -> dict:
    return {"index": index, "function": {"arguments": fragment}}


def parse_tool_calls(text: str, streamer: ToolCallStreamer) -> tuple[str | None, list]:
    """(content or None, tool_calls) of a whole output: a fresh streamer run over it at once."""
    content = streamer.feed(text).content + streamer.finish().content
    return (content if content.strip() or not streamer.called else None), streamer.tool_calls()
