"""Rank 0's view of a TP server's transfers: a room is done when every rank reported it."""

from __future__ import annotations

import select
import threading
import types

from disagg.prefill.scheduler import PrefillScheduler
from disagg.transfer import TransferResult
from disagg.transfer.base import TransferBase
from disagg.transfer.coordinator import AbortRoomOp, RankTransfer, TransferCoordinator


class FakeEngine:
    def __init__(self):
        self.calls, self.results = [], []

    def send(self, room, pages, offset, is_last=False, metadata=None, fingerprint=0):
        self.calls.append(("send", room, list(pages), offset, is_last, fingerprint))

    def expect(self, room, host, port, pages, fingerprint=0):
        if room == 13:
            raise ValueError("room 13 is already expected")
        self.calls.append(("expect", room))

    def abort(self, room):
        self.calls.append(("abort", room))

    def poll(self):
        out, self.results = self.results, []
        return out

    def wait(self, timeout=None):
        threading.Event().wait(timeout)  # never any result: the waker thread just waits
        return False


def R(room, ok, reason="", metadata=None, nbytes=0, seconds=0.0):  # noqa: N802 - a result row
    return TransferResult(room, ok, reason, metadata or {}, nbytes, seconds)


def coordinator(tp: int = 3) -> TransferCoordinator:
    return TransferCoordinator(RankTransfer(FakeEngine()), tp)


def test_a_room_finishes_only_when_every_rank_reported_it():
    c = coordinator()
    c.send(7, [1, 2], 0, True, {"first_token": 42})
    assert c._merge([[R(7, True, "", {"first_token": 42}, 100, 0.5)], [], []]) == []
    done = c._merge([[], [R(7, True, "", {}, 100, 0.25)], [R(7, True, "", {}, 100, 0.75)]])
    assert [(r.room, r.ok, r.metadata, r.nbytes, r.seconds) for r in done] == [
        (7, True, {"first_token": 42}, 300, 0.75)
    ]
    assert c.open_rooms == set()


def test_a_failure_on_one_rank_fails_the_room_and_aborts_it_elsewhere():
    c = coordinator()
    c.expect(8, "h", 1, [3])
    c.ops.clear()
    assert c._merge([[], [R(8, False, "peer_died: x")], []]) == []
    assert c.ops == [AbortRoomOp(8)]  # the ranks still waiting stop now
    done = c._merge([[R(8, False, "aborted: by the decode side")], [], [R(8, True, "", {}, 5, 0.1)]])
    assert len(done) == 1 and not done[0].ok and done[0].reason == "peer_died: x"


def test_stale_rooms_are_ignored_and_refused_operations_fail_their_room():
    c = coordinator(tp=1)
    assert c.flush() == []  # nothing open: no work
    c.expect(13, "h", 1, [0])  # the engine refuses it
    done = c.flush()
    assert [(r.room, r.ok) for r in done] == [(13, False)] and "already expected" in done[0].reason
    c.local.engine.results.append(R(99, True))
    c.send(5, [], 0, False)
    assert c.flush() == []  # room 99 was never ours
    assert c.open_rooms == {5}


class WaitableEngine(FakeEngine):
    """The transfer engine's poll()/notify contract (TransferBase's own signalling): the first
    result after a poll() writes notify_fd."""

    def __init__(self):
        super().__init__()
        self._results_ready = threading.Event()
        self.notify_fd = None

    def finish(self, room):
        self.results.append(R(room, True))
        TransferBase._notify(self)

    def poll(self):
        self._results_ready.clear()
        return super().poll()


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_finished_transfer_wakes_the_scheduler_once_per_poll():
    engine = WaitableEngine()
    c = TransferCoordinator(RankTransfer(engine), 1)
    c.send(5, [1], 0, True)
    assert c.flush() == [] and not readable(c.wake_fd, 0.05)  # nothing finished: the loop may sleep
    engine.finish(5)
    assert readable(c.wake_fd, 2.0)  # at once, not at the loop's next tick
    c.on_wake()
    assert not readable(c.wake_fd, 0.05)  # one wake-up until the scheduler polled
    assert [r.room for r in c.flush()] == [5]
    c.send(6, [1], 0, True)
    c.flush()
    engine.finish(6)
    assert readable(c.wake_fd, 2.0)
    assert TransferCoordinator(RankTransfer(engine), 2).wake_fd is None  # tp > 1: results come by gather


def test_prefill_starts_at_once_unless_open_rooms_would_fill_half_the_pool():
    def req(tokens: int):
        return types.SimpleNamespace(input_ids=[1] * tokens)

    sched = types.SimpleNamespace(
        bootstrap=[], rooms={}, page_size=16, pool=types.SimpleNamespace(num_pages=10)
    )
    sched.rooms[1] = req(80)  # 5 pages: exactly half the pool
    assert PrefillScheduler._may_start_now(sched, sched.rooms[1])
    sched.rooms[2] = req(1)  # one page more
    assert not PrefillScheduler._may_start_now(sched, sched.rooms[2])
    del sched.rooms[1]
    sched.bootstrap.append(req(1))  # an older request waits for its decode side: keep the order
    assert not PrefillScheduler._may_start_now(sched, sched.rooms[2])


def test_launch_local_gives_each_server_its_own_gpus(monkeypatch):
    import argparse

    import pytest
    from disagg.common.server.launch_local import gpu_envs

    args = argparse.Namespace(prefill_tp=1, decode_tp=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gpu_envs(args) == {
        "prefill": {"CUDA_VISIBLE_DEVICES": "4"},
        "decode": {"CUDA_VISIBLE_DEVICES": "5,6"},
    }
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # fewer than 3: decode shares the prefill's GPU 0
    assert gpu_envs(args) == {
        "prefill": {"CUDA_VISIBLE_DEVICES": "0"},
        "decode": {"CUDA_VISIBLE_DEVICES": "0,1"},
    }
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match="need 2 GPUs, 1 visible"):
        gpu_envs(args)  # decode's TP 2 cannot fit one GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_envs(args) == {"prefill": {}, "decode": {}}  # a CPU machine


def test_launch_local_shares_one_gpu_with_a_budget_and_mps(monkeypatch, tmp_path):
    """One GPU: both servers on it, each told to hold 0.4 of it unless the arguments set a budget,
    both clients of a private MPS daemon, the prefill on --prefill-sm-percent of the SMs; without
    the daemon's binary the servers still start (time-sliced) unless an SM share needs MPS."""
    import argparse

    import pytest
    from disagg.common.server import launch_local as L
    from disagg.common.server import mps

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    args = argparse.Namespace(prefill_tp=1, decode_tp=1, no_mps=False, prefill_sm_percent=85)
    envs = L.gpu_envs(args)
    assert L.shared_gpus(envs) == ["3"]
    assert L.with_memory_budget(["--page-size", "16"]) == [
        "--page-size",
        "16",
        "--mem-fraction-static",
        "0.4",
    ]
    for given in (
        ["--mem-fraction-static", "0.3"],
        ["--mem-fraction-static=0.3"],
        ["--max-total-tokens", "4096"],
    ):
        assert L.with_memory_budget(given) == given  # the user's budget stands
    started = []
    monkeypatch.setattr(mps.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(mps.subprocess, "run", lambda argv, **kw: started.append((argv, kw["env"])))
    daemon = L.share(args, envs, tmp_path)
    assert daemon is not None and started[0][0] == ["nvidia-cuda-mps-control", "-d"]
    pipe = started[0][1]["CUDA_MPS_PIPE_DIRECTORY"]
    assert pipe.startswith(str(tmp_path)) and envs["decode"]["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert envs["prefill"]["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert envs["prefill"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "85"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in envs["decode"]
    daemon.stop()
    assert started[1][0] == ["nvidia-cuda-mps-control"]  # quit sent to our daemon
    # no MPS on this machine: time-sliced without an SM share, an error with one
    monkeypatch.setattr(mps.shutil, "which", lambda name: None)
    envs = L.gpu_envs(args)
    with pytest.raises(FileNotFoundError):
        L.share(args, envs, tmp_path)
    args.prefill_sm_percent = None
    assert L.share(args, envs, tmp_path) is None and "CUDA_MPS_PIPE_DIRECTORY" not in envs["prefill"]
    args.no_mps, args.prefill_sm_percent = True, 85
    with pytest.raises(RuntimeError, match="needs MPS"):
        L.share(args, envs, tmp_path)


def test_launch_local_refuses_an_sm_share_without_a_shared_gpu(monkeypatch, capsys):
    import argparse
    import signal

    from disagg.common.server import launch_local as L

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # each server its own GPU
    args = argparse.Namespace(prefill_tp=1, decode_tp=1, no_mps=False, prefill_sm_percent=85, host="127.0.0.1",
                              port=0, model_path=None, log_level="warning")  # fmt: skip
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert L.run(args, []) == 1
    finally:
        signal.signal(signal.SIGTERM, handler)  # run() installs its own
    assert "do not share a GPU" in capsys.readouterr().err


def test_prefill_fails_a_pd_request_by_aborting_its_room():
    """A PD request the prefill must fail after its forward (its logits not finite): it leaves every
    queue, its room is aborted (the decode side hears of it; the pages are freed when the room's
    result comes), and the client gets the error."""
    from disagg.common.engine.request import Req, ReqStatus, SamplingParams
    from disagg.common.engine.scheduler import Scheduler

    req = Req("r", [1, 2, 3], SamplingParams())
    req.bootstrap_room, req.page_table = 7, [4, 5]
    aborted, forgotten = [], []
    sched = types.SimpleNamespace(
        rooms={7: req}, bootstrap=[], waiting=[], running=[req], _pending_outs=[],
        transfer=types.SimpleNamespace(abort=aborted.append), sampler=types.SimpleNamespace(forget=forgotten.append),
    )  # fmt: skip
    sched._drop = lambda r: PrefillScheduler._drop(sched, r)
    sched._finish = lambda *a, **kw: Scheduler._finish(sched, *a, **kw)
    sched._fill_usage = lambda out, r: Scheduler._fill_usage(sched, out, r)
    PrefillScheduler._fail_request(sched, req, "numerical error: boom")
    assert aborted == [7] and not sched.running and req.status == ReqStatus.ABORTED
    assert req.page_table == [4, 5]  # freed with the room's result, not twice
    (out,) = sched._pending_outs
    assert out.finished and out.finish_reason == "abort" and out.error == "numerical error: boom"
