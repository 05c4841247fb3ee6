"""`--dp-size N` replicas behind one server: the dispatcher's methods, aborts and a dead replica
(in-process, fake replicas), then real servers: transformers' tokens, both replicas busy, a replica
killed, and PD with a decode of two replicas."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest
from disagg.common.config import EngineConfig
from disagg.common.engine.request import SamplingParams, SchedulerStats, TokenOut
from disagg.common.messages import decode
from disagg.common.server.data_parallel import REPLICA_FAILED, DataParallelController, Replica, replica_gpus
from disagg.common.server.ipc import AbortReqMsg, BatchTokenOutMsg, GenerateReqMsg, IpcNames, PingMsg, PongMsg
from disagg.common.server.serving import engine_error

from tests.conftest import REFERENCE_ENGINE, hf_greedy
from tests.pd_helpers import SERVER_ENV, PDCluster, assert_pool_free, generate_ids
from tests.procs import wait_until
from tests.server_helpers import SMALL_SERVER_ARGS, ServerProcess


# ---- the dispatcher, with fake replicas ----
class FakeSocket:
    def __init__(self):
        self.sent = []

    def send(self, data: bytes) -> None:
        self.sent.append(decode(data))


class FakeProcess:
    def __init__(self, pid: int):
        self.pid, self.alive, self.exitcode = pid, True, None

    def is_alive(self) -> bool:
        return self.alive


def make_controller(method: str, n: int = 2) -> DataParallelController:
    c = DataParallelController(
        EngineConfig(dp_size=n), IpcNames("ipc://a", "ipc://b", "ipc://c"), None, method
    )
    c.replicas = [Replica(i, FakeProcess(1000 + i), FakeSocket()) for i in range(n)]
    c.to_detok = FakeSocket()
    return c


def send(c: DataParallelController, rid: str, num_tokens: int = 4) -> int:
    """A new request; the dp rank it went to."""
    c.on_http_msg(GenerateReqMsg(rid, list(range(num_tokens)), SamplingParams()))
    return next(r.dp_rank for r in c.replicas if r.sock.sent and r.sock.sent[-1].rid == rid)


def output(c: DataParallelController, rid: str, new_tokens: int = 1, finished: bool = False) -> None:
    c.on_replica_msg(BatchTokenOutMsg([], [TokenOut(rid, [7] * new_tokens, finished=finished)]))


def test_round_robin_takes_replicas_in_turn_and_skips_a_dead_one():
    c = make_controller("round_robin", n=3)
    assert [send(c, f"r{i}") for i in range(6)] == [0, 1, 2, 0, 1, 2]
    c.replicas[1].proc.alive = False
    c.check_replicas()
    assert [send(c, f"s{i}") for i in range(4)] == [0, 2, 0, 2]


def test_shortest_queue_picks_the_replica_holding_fewest_requests():
    c = make_controller("shortest_queue")
    assert [send(c, r) for r in ("a", "b", "c", "d")] == [0, 1, 0, 1]  # ties: in turn
    assert send(c, "e") == 0
    output(c, "a", finished=True)
    output(c, "c", finished=True)
    output(c, "e", finished=True)  # replica 0 holds nothing now, replica 1 holds b and d
    assert [send(c, r) for r in ("f", "g")] == [0, 0]
    assert send(c, "h") == 1  # 2 each: in turn


def test_minimum_tokens_picks_the_replica_holding_fewest_tokens():
    c = make_controller("minimum_tokens")
    assert send(c, "long", num_tokens=100) == 0
    assert [send(c, r, num_tokens=10) for r in ("a", "b")] == [1, 1]  # 10, then 20 tokens < 100
    output(c, "a", new_tokens=90)  # replica 1 generated: it holds 110 tokens now
    assert send(c, "c", num_tokens=10) == 0
    output(c, "a", finished=True)
    assert send(c, "d", num_tokens=10) == 1  # 10 (b) + 0 < 110


def test_an_abort_reaches_only_the_replica_holding_the_request():
    c = make_controller("round_robin")
    send(c, "a"), send(c, "b")
    c.on_http_msg(AbortReqMsg("b"))
    assert isinstance(c.replicas[1].sock.sent[-1], AbortReqMsg) and c.replicas[1].sock.sent[-1].rid == "b"
    assert not isinstance(c.replicas[0].sock.sent[-1], AbortReqMsg)
    output(c, "a", finished=True)
    c.on_http_msg(AbortReqMsg("a"))  # finished already: nothing to free anywhere
    assert not any(isinstance(m, AbortReqMsg) and m.rid == "a" for r in c.replicas for m in r.sock.sent)


def test_a_dead_replica_fails_its_requests_with_a_typed_502():
    c = make_controller("round_robin")
    assert [send(c, r) for r in ("a", "b", "c")] == [0, 1, 0]
    c.replicas[0].proc.alive, c.replicas[0].proc.exitcode = False, -9
    c.check_replicas()
    (failed,) = c.to_detok.sent
    assert sorted(o.rid for o in failed.outs) == ["a", "c"]
    assert all(o.finished and o.error.startswith(REPLICA_FAILED) for o in failed.outs)
    err = engine_error(failed.outs[0].error)  # what a client gets for a request with no output yet
    assert (err.status, err.code) == (502, "replica_failed")
    assert send(c, "d") == 1 and c.replicas[1].reqs.keys() == {"b", "d"}


def stats(running: int, free: int) -> SchedulerStats:
    return SchedulerStats(running, 0, 10, free, 10 - free, 10 - free, 0, (10 - free) / 10, 0.0, 0)


def test_stats_are_merged_per_replica_and_a_dead_replica_does_not_hold_the_answer():
    c = make_controller("round_robin", n=3)
    c.on_http_msg(PingMsg(42, want_stats=True))
    pings = [r.sock.sent[-1] for r in c.replicas]
    assert len({p.ping_id for p in pings}) == 3
    c.on_replica_msg(PongMsg(pings[2].ping_id, stats(1, 4)))  # answers come in any order
    c.on_replica_msg(PongMsg(pings[0].ping_id, stats(2, 8)))
    assert not c.to_detok.sent
    c.replicas[1].proc.alive = False
    c.check_replicas()
    (pong,) = c.to_detok.sent
    assert pong.ping_id == 42 and pong.stats.num_running == 3 and pong.stats.num_free_pages == 12
    assert [(e["dp_rank"], e["alive"], e["stats"] and e["stats"].num_running) for e in pong.stats.dp_replicas] == [
        (0, True, 2), (1, False, None), (2, True, 1)]  # fmt: skip


# ---- real servers ----
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "1, 2, 3, 4,", "The three primary colors are", "Water boils at a temperature of"]  # fmt: skip
MAX_TOKENS = 12


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def prompt_ids(default_model_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def dp_server():
    server = ServerProcess("--dp-size", "2", *SMALL_SERVER_ARGS, env=SERVER_ENV).start()
    yield server
    server.stop()


def replicas(server: ServerProcess) -> list[dict]:
    return httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"][0]["dp_replicas"]


def generate(
    client: httpx.Client, ids: list[int], max_tokens: int = MAX_TOKENS, **sampling
) -> httpx.Response:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, **sampling}}
    return client.post("/generate", json=body)


@pytest.mark.slow
def test_dp2_gives_transformers_tokens_and_both_replicas_serve(dp_server, prompt_ids, default_model_path):
    want = [hf_greedy(default_model_path, ids, MAX_TOKENS) for ids in prompt_ids]
    with dp_server.client() as client, cf.ThreadPoolExecutor(len(prompt_ids)) as pool:
        got = list(pool.map(lambda ids: generate(client, ids).json()["output_ids"], prompt_ids))
        text = client.get("/metrics").text
    assert got == want
    for dp_rank in (0, 1):  # round robin: half each, each replica with its own pool
        assert metric(text, "disagg_dp_dispatched_requests_total", dp_rank=dp_rank) == len(PROMPTS) / 2
        assert metric(text, "disagg_num_total_pages", dp_rank=dp_rank) == 4096 // 16
        assert metric(text, "disagg_dp_replica_up", dp_rank=dp_rank) == 1
    assert [(r["dp_rank"], r["alive"], r["num_in_flight"]) for r in replicas(dp_server)] == [
        (0, True, 0),
        (1, True, 0),
    ]


@pytest.mark.slow
def test_a_killed_replica_fails_its_request_at_once_and_the_other_serves_on(dp_server, prompt_ids):
    # last in this file: it leaves the server with one replica
    with dp_server.client() as client, cf.ThreadPoolExecutor(2) as pool:
        futs = [
            pool.submit(generate, client, prompt_ids[0], 300, ignore_eos=True) for _ in range(2)
        ]  # one per replica
        assert wait_until(lambda: [r["num_in_flight"] for r in replicas(dp_server)] == [1, 1], timeout=30)
        os.kill(replicas(dp_server)[1]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        done, _ = cf.wait(futs, return_when=cf.FIRST_COMPLETED)
        failed_after = time.monotonic() - killed
        first = done.pop().result()  # the killed replica's request: an abort with the reason, or a 502
        if first.status_code == 200:
            reason = first.json()["meta_info"]["finish_reason"]
            assert reason["type"] == "abort" and reason["message"].startswith(REPLICA_FAILED), reason
        else:
            assert (first.status_code, first.json()["error"]["code"]) == (502, "replica_failed")
        assert failed_after < 5, failed_after
        (survivor,) = [f.result() for f in futs if f.result() is not first]
        assert survivor.json()["meta_info"]["finish_reason"]["type"] == "length"
        after = [generate(client, ids).status_code for ids in prompt_ids[:3]]
        assert after == [200, 200, 200]
        assert client.get("/health").status_code == 200
        assert metric(client.get("/metrics").text, "disagg_dp_replica_up", dp_rank=1) == 0


@pytest.mark.slow
def test_pd_decode_with_two_replicas_gives_the_colocated_tokens(engines):
    try:
        outs = engines.get(**REFERENCE_ENGINE).generate(
            PROMPTS[:4], {"max_new_tokens": MAX_TOKENS, "temperature": 0}
        )
    finally:
        engines.close()  # freed before the servers start
    want = [o["output_ids"] for o in outs]
    with (
        PDCluster(decode_args=["--dp-size", "2"]) as pd,
        pd.client() as client,
        cf.ThreadPoolExecutor(4) as pool,
    ):
        got = list(pool.map(lambda p: generate_ids(client, p, False, MAX_TOKENS), PROMPTS[:4]))
        assert got == want
        text = httpx.get(pd.decode.url + "/metrics", timeout=10).text
        assert [metric(text, "disagg_dp_dispatched_requests_total", dp_rank=i) for i in (0, 1)] == [2, 2]
        assert_pool_free(pd.prefill)
        assert_pool_free(pd.decode)


def test_each_replica_gets_its_own_gpus_from_base_gpu_id(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    engine = EngineConfig(device="cuda", tp=2, dp_size=3)
    assert [replica_gpus(engine, 1, i) for i in range(3)] == [["1", "2"], ["3", "4"], ["5", "6"]]
    assert replica_gpus(engine.replace(dp_size=4), 0, 3) == ["6", "7"]
    with pytest.raises(ValueError, match="need 10 GPUs; 8 are visible"):
        replica_gpus(engine.replace(dp_size=4), 2, 3)
    assert replica_gpus(engine.replace(device="cpu"), 0, 0) is None


def test_a_prefill_controller_sends_each_room_to_replica_room_mod_n():
    """Where the decode looks for it (SGLang's rule); a request without a room is load-balanced, and a
    room whose replica died fails at once with the typed 502 (no other replica can serve it)."""
    c = make_controller("round_robin", n=2)
    c.route_by_room = True
    for rid, room in (("a", 7), ("b", 9), ("c", 4)):
        c.on_http_msg(GenerateReqMsg(rid, [1, 2], SamplingParams(), "127.0.0.1", 8998, room))
    assert [[m.rid for m in r.sock.sent] for r in c.replicas] == [["c"], ["a", "b"]]
    assert send(c, "health") == 0  # no room: round robin
    c.replicas[1].proc.alive = False
    c.check_replicas()
    c.on_http_msg(GenerateReqMsg("d", [1, 2], SamplingParams(), "127.0.0.1", 8998, 11))
    out = c.to_detok.sent[-1].outs[0]
    assert out.rid == "d" and engine_error(out.error).status == 502
