"""Fast tests of the front end's pieces: incremental detokenization with stop strings, the benchmark's
statistics, the message types crossing process boundaries."""

from __future__ import annotations

import pytest
from disagg.common.bench.serving import RequestResult, is_good, parse_goodput, percentiles, sample_lengths
from disagg.common.engine.request import SamplingParams, TokenOut
from disagg.common.messages import decode, encode
from disagg.common.server.detokenizer import Detokenizer, held_back
from disagg.common.server.ipc import BatchTokenOutMsg, DetokReqInfo, GenerateReqMsg


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def stream_text(detok: Detokenizer, rid: str, ids: list[int], matched_stop=None, **info) -> list[str]:
    batch = BatchTokenOutMsg([DetokReqInfo(rid, **info)], [])
    detok.handle_batch(batch)
    deltas = []
    for i, tok in enumerate(ids):
        last = i == len(ids) - 1
        out = TokenOut(rid, [tok], finished=last, finish_reason="stop" if last else None,
                       matched_stop=matched_stop if last else None)  # fmt: skip
        deltas.append(detok.handle_batch(BatchTokenOutMsg([], [out])).outs[0].text)
    return deltas


def test_incremental_text_equals_full_decode(tokenizer):
    text = "Hello world, ünïcödé text and an emoji 🙂 with 中文 too."
    ids = tokenizer.encode(text)
    deltas = stream_text(Detokenizer(tokenizer), "r", ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # half a character is never sent


def test_stop_string_never_leaks_into_the_stream(tokenizer):
    ids = tokenizer.encode("The answer is 4.\n\nNext question")
    stop_at = next(i for i in range(len(ids)) if "\n\n" in tokenizer.decode(ids[: i + 1]))
    deltas = stream_text(Detokenizer(tokenizer), "r", ids[: stop_at + 1], matched_stop="\n\n", stop=["\n\n"])
    assert "".join(deltas) == "The answer is 4."
    assert all("\n" not in d for d in deltas)


def test_stop_token_text_is_dropped(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [*tokenizer.encode("Hi there"), eos]
    deltas = stream_text(Detokenizer(tokenizer), "r", ids, matched_stop=eos, skip_special_tokens=False)
    assert "".join(deltas) == "Hi there"


def test_held_back_counts_stop_prefixes():
    assert held_back("abc", ["cde"]) == 1
    assert held_back("abcd", ["cde", "zz"]) == 2
    assert held_back("abc", ["xyz"]) == 0
    assert held_back("ab", []) == 0


def test_messages_round_trip():
    msg = GenerateReqMsg(
        "r1", [1, 2, 3], SamplingParams(max_new_tokens=5, stop=["x"]), bootstrap_room=2**63 + 1
    )
    assert decode(encode(msg)) == msg


def test_bench_statistics():
    import random

    lens = sample_lengths(random.Random(0), 200, 100, 0.5)
    assert min(lens) >= 50 and max(lens) <= 100 and len(set(lens)) > 10
    assert sample_lengths(random.Random(0), 5, 64, 1.0) == [64] * 5
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert (
        p["p50"] == pytest.approx(50.5)
        and p["p99"] == pytest.approx(99.01)
        and p["mean"] == pytest.approx(50.5)
    )
    limits = parse_goodput(["ttft:100", "itl:20"])
    assert limits == {"ttft": 0.1, "itl": 0.02}
    good = RequestResult(10, 5, ok=True, ttft=0.05, itls=[0.01, 0.03], e2e=0.2)
    slow = RequestResult(10, 5, ok=True, ttft=0.5, itls=[0.01], e2e=0.6)
    assert is_good(good, limits) and not is_good(slow, limits)
    with pytest.raises(SystemExit):
        parse_goodput(["latency:5"])


class EchoScheduler:
    """The scheduler surface (SchedulerLike), minimal: echoes the prompt's first token until max_new_tokens."""

    context_length, wake_fd = 1024, None

    def __init__(self):
        self.reqs, self.aborted = {}, []

    def wait_timeout_ms(self):
        return 0

    def on_wake(self):
        pass

    def flush_cache(self):
        return not self.has_work()

    def pd_identity(self):
        return None

    def add_request(self, req):
        if req.input_ids[0] < 0:
            raise ValueError("negative token id")
        self.reqs[req.rid] = req

    def abort_request(self, rid):
        self.reqs.pop(rid)
        self.aborted.append(rid)

    def has_work(self):
        return bool(self.reqs or self.aborted)

    def stats(self):
        from disagg.common.engine.request import SchedulerStats

        return SchedulerStats(len(self.reqs), 0, 8, 8, 0, 0, 0, 0.0, 0.0, 0)

    def step(self):
        outs = [TokenOut(rid, [], finished=True, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        for rid, req in list(self.reqs.items()):
            req.output_ids.append(req.input_ids[0])
            done = len(req.output_ids) >= req.sampling.max_new_tokens
            outs.append(
                TokenOut(rid, [req.input_ids[0]], finished=done, finish_reason="length" if done else None)
            )
            if done:
                del self.reqs[rid]
        return outs


def test_scheduler_loop_drives_any_scheduler():
    import zmq
    from disagg.common.server.ipc import AbortReqMsg, IpcNames, PingMsg, PongMsg, zmq_socket
    from disagg.common.server.scheduler_process import SchedulerLoop

    ipc, ctx = IpcNames.new(), zmq.Context()
    try:
        out_sock = zmq_socket(ctx, zmq.PULL, ipc.detokenizer, bind=True)
        loop = SchedulerLoop(EchoScheduler(), ipc, ctx)
        send = zmq_socket(ctx, zmq.PUSH, ipc.scheduler, bind=False)
        for msg in [GenerateReqMsg("a", [7], SamplingParams(max_new_tokens=2)),
                    GenerateReqMsg("bad", [-1], SamplingParams()),
                    GenerateReqMsg("b", [9], SamplingParams(max_new_tokens=50)),
                    PingMsg(1, want_stats=True)]:  # fmt: skip
            send.send(encode(msg))
        received = []
        while len(received) < 3:
            loop.run_once()
            while out_sock.poll(100):
                received.append(decode(out_sock.recv()))
        pong = next(m for m in received if isinstance(m, PongMsg))
        assert pong.ping_id == 1 and pong.stats.num_running == 2
        batches = [m for m in received if isinstance(m, BatchTokenOutMsg)]
        assert [r.rid for r in batches[0].new_reqs] == ["a", "bad", "b"]
        outs = [o for b in batches for o in b.outs]
        rejected = next(o for o in outs if o.rid == "bad")
        assert rejected.finished and rejected.finish_reason == "abort" and "negative" in rejected.error
        send.send(encode(AbortReqMsg("b")))
        for _ in range(5):
            loop.run_once()
            while out_sock.poll(50):
                outs += decode(out_sock.recv()).outs
        finals = {o.rid: o.finish_reason for o in outs if o.finished}
        assert finals == {"a": "length", "bad": "abort", "b": "abort"}
    finally:
        ctx.destroy(linger=0)
        ipc.cleanup()


def test_a_dummy_preset_server_starts_its_scheduler_before_importing_torch():
    """A server's front process picks the tokenizer before it starts the scheduler process; for a
    dummy preset (no folder) that must not import torch (seconds on a GPU machine, during which the
    model could already be loading): the tokenizer is the default model's, and torch stays out."""
    import subprocess
    import sys

    code = (
        "import sys; from disagg.common.config import EngineConfig; "
        "from disagg.common.server.launch_server import ServerConfig, tokenizer_path_for; "
        "from disagg.common.models.model_files import default_model_dir; "
        "p = tokenizer_path_for(EngineConfig(model_path='Llama-3.1-8B', load_format='dummy'), ServerConfig()); "
        "assert p == str(default_model_dir()), p; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


class MidStepScheduler(EchoScheduler):
    """An EchoScheduler that takes the loop's request socket (as a PD decode does while a step runs)."""

    def set_early_input(self, fd, take):
        self.fd, self.take = fd, take


def test_requests_taken_mid_step_keep_the_loops_order():
    """While a step runs the scheduler takes new requests from the loop's socket (its fd turns readable
    for select); an abort or ping and everything after it wait for the loop, which handles them first
    next time, in order: a request is never added after an abort sent later than it."""
    import select
    import time

    import zmq
    from disagg.common.server.ipc import AbortReqMsg, IpcNames, zmq_socket
    from disagg.common.server.scheduler_process import SchedulerLoop

    ipc, ctx = IpcNames.new(), zmq.Context()
    try:
        out_sock = zmq_socket(ctx, zmq.PULL, ipc.detokenizer, bind=True)
        scheduler = MidStepScheduler()
        loop = SchedulerLoop(scheduler, ipc, ctx)
        send = zmq_socket(ctx, zmq.PUSH, ipc.scheduler, bind=False)

        def take_when_readable(want: int) -> None:
            deadline = time.monotonic() + 10
            while len(scheduler.reqs) + len(loop.deferred) < want and time.monotonic() < deadline:
                select.select([scheduler.fd], [], [], 0.05)
                scheduler.take()

        send.send(encode(GenerateReqMsg("a", [7], SamplingParams(max_new_tokens=4))))
        take_when_readable(1)
        assert list(scheduler.reqs) == ["a"] and not loop.deferred
        for msg in [AbortReqMsg("a"), GenerateReqMsg("b", [9], SamplingParams(max_new_tokens=4))]:
            send.send(encode(msg))
        take_when_readable(3)
        assert list(scheduler.reqs) == ["a"]  # b came after the abort: it waits with it
        assert [type(m).__name__ for m in loop.deferred] == ["AbortReqMsg", "GenerateReqMsg"]
        loop.run_once()  # the loop: the abort, then b, then a step
        assert list(scheduler.reqs) == ["b"] and not loop.deferred
        assert out_sock.poll(5000)
        batch = decode(out_sock.recv())
        assert [r.rid for r in batch.new_reqs] == ["a", "b"]  # each request's info before its outputs
        assert [(o.rid, o.finish_reason) for o in batch.outs] == [("a", "abort"), ("b", None)]
    finally:
        ctx.destroy(linger=0)
        ipc.cleanup()
