"""The HTTP process's side of a request, without a model (common/server/tokenizer_manager.py): a
consumer that fell behind takes the outputs queued meanwhile as one (the tokens, text and logprobs of
all of them, in order, the last one's ending), one that keeps up gets them one by one; and the
request's TTFT counts from its HTTP arrival (tokenizing included), its messages carry both times."""

from __future__ import annotations

import asyncio
import time

from disagg.common.engine.request import SamplingParams
from disagg.common.server.ipc import GenerateReqMsg, StrOut
from disagg.common.server.metrics import ServerMetrics
from disagg.common.server.tokenizer_manager import REQUEST_ARRIVAL, TokenizerManager

from tests.server_helpers import metric_value
from tests.test_isolation_units import FakeTokenizer


def manager() -> tuple[TokenizerManager, list]:
    tm = TokenizerManager(FakeTokenizer(), None, context_length=100, metrics=ServerMetrics())
    sent: list = []
    tm._send = sent.append
    return tm, sent


def outputs(rid: str) -> list[StrOut]:
    def top(text: str, tid: int, lp: float) -> list:
        return [[[text, tid, lp]]]

    return [
        StrOut(rid, "He", [5], logprobs=[-0.1], token_texts=["He"], top_logprobs=top("He", 5, -0.1),
               prompt_logprobs=[None, -1.5]),
        StrOut(rid, "llo", [6], logprobs=[-0.2], token_texts=["llo"], top_logprobs=top("llo", 6, -0.2)),
        StrOut(rid, "!", [7], finished=True, finish_reason="stop", matched_stop=7, prompt_tokens=2,
               completion_tokens=3, logprobs=[-0.3], token_texts=["!"], top_logprobs=top("!", 7, -0.3)),
    ]  # fmt: skip


async def stream(tm: TokenizerManager, rid: str, keep_up: bool) -> list[StrOut]:
    gen = tm.generate(rid, [1, 2], SamplingParams())
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0)  # generate() registered the request and waits for its first output
    got = []
    for out in outputs(rid):
        tm._dispatch(out, time.monotonic())
        if keep_up:
            got.append(await first if not got else await anext(gen))
    if not keep_up:
        got = [await first] + [o async for o in gen]
    return got


def test_a_consumer_behind_takes_what_queued_as_one_output():
    tm, _ = manager()
    (out,) = asyncio.run(stream(tm, "r1", keep_up=False))
    assert (out.text, out.output_ids) == ("Hello!", [5, 6, 7])
    assert out.logprobs == [-0.1, -0.2, -0.3] and out.token_texts == ["He", "llo", "!"]
    assert [t[0][1] for t in out.top_logprobs] == [5, 6, 7]
    assert out.prompt_logprobs == [None, -1.5]  # only the first output had them
    assert (out.finished, out.finish_reason, out.matched_stop) == (True, "stop", 7)
    assert (out.prompt_tokens, out.completion_tokens) == (2, 3)
    # the metrics saw every token as it came (counted before the queue)
    text = tm.metrics.render().decode()
    assert metric_value(text, "disagg_generation_tokens_total") == 3
    assert metric_value(text, "disagg_inter_token_latency_seconds_count") == 2


def test_a_consumer_keeping_up_gets_each_output():
    tm, _ = manager()
    got = asyncio.run(stream(tm, "r2", keep_up=True))
    assert [o.output_ids for o in got] == [[5], [6], [7]] and [o.text for o in got] == ["He", "llo", "!"]
    assert got[0].prompt_logprobs == [None, -1.5] and got[1].prompt_logprobs is None


def test_ttft_counts_from_the_http_arrival():
    """A request that arrived 0.5 s before it was tokenized and sent: its TTFT holds that half second,
    and its message carries both times (the scheduler's tokenize stage)."""
    tm, sent = manager()

    async def run() -> None:
        REQUEST_ARRIVAL.set(time.monotonic() - 0.5)
        await stream(tm, "r3", keep_up=False)

    asyncio.run(run())
    (msg,) = [m for m in sent if isinstance(m, GenerateReqMsg)]
    assert 0.45 < msg.sent_at - msg.received_at < 1.0
    text = tm.metrics.render().decode()
    assert metric_value(text, "disagg_time_to_first_token_seconds_sum") >= 0.5
    assert metric_value(text, "disagg_e2e_request_latency_seconds_sum") >= 0.5
