"""PD with data parallelism on either side (CPU, gloo): a decode at `--tp 2 --dp-size 2
--enable-dp-attention --ep 2` picks each request's DP rank and that rank's pool receives the pages;
a prefill with the same DP attention prefills room r on DP rank `r % 2`, whose rank sends the pages;
a prefill at `--dp-size 2` (replicas) serves each room from replica `room % 2` behind one bootstrap
port, served by the replicas' controller so that one replica's death leaves the other serving.
Greedy tokens equal transformers' float32 ones token for token, and every pool is free after."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest

from tests.conftest import hf_greedy, make_tiny_model
from tests.pd_helpers import PDCluster, assert_pool_free
from tests.server_helpers import metric_value
from tests.test_parallel_dp_attention import QWEN3_MOE

MAX_TOKENS = 8
FIRST = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # alone: DP rank 1 of the decode runs idle steps only
THEN = [[20, 21, 22], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300, 301]]  # uneven: 2 + 1
DP_ATTENTION = ["--tp", "2", "--dp-size", "2", "--ep", "2", "--moe-a2a-backend", "all_to_all",
                "--enable-dp-attention"]  # fmt: skip


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory) -> str:
    from tests.conftest import TINY_CONFIGS

    added = "qwen3_moe" not in TINY_CONFIGS
    TINY_CONFIGS.setdefault("qwen3_moe", QWEN3_MOE)
    try:
        return make_tiny_model(tmp_path_factory.mktemp("pd-dp") / "qwen3_moe", "qwen3_moe", **QWEN3_MOE)
    finally:  # NOTE: other modules build their own tiny model per TINY_CONFIGS entry
        if added:
            del TINY_CONFIGS["qwen3_moe"]


def test_a_dp_rank_room_runs_and_finishes_on_that_dp_rank_only():
    """Decode, DP attention (tp 2, dp 2: one rank per DP rank): the room's operations carry its DP rank,
    the other DP rank's ranks skip them, and only its own ranks' results finish it."""
    from disagg.transfer.coordinator import AbortRoomOp, DPRankTransfer, RankTransfer, TransferCoordinator

    from tests.test_pd_units import FakeEngine, R

    shared = TransferCoordinator(RankTransfer(FakeEngine()), 2)
    shared.ranks_per_dp = 1  # (this test process has no DP attention groups)
    views = [DPRankTransfer(shared, d) for d in (0, 1)]
    views[1].expect(5, "h", 1, [0, 1])
    views[1].abort(5)
    assert [(op.room, op.dp_rank) for op in shared.ops] == [(5, 1), (5, 1)]
    assert isinstance(shared.ops[1], AbortRoomOp)
    skipped = RankTransfer(FakeEngine())  # a rank of DP rank 0 (this process's attn_dp_rank)
    skipped.run(shared.ops)
    assert skipped.engine.calls == []
    assert shared._merge([[R(5, True)], []]) == []  # rank 0 is not DP rank 1's: ignored
    done = shared._merge([[], [R(5, True, "", {"first_token": 3})]])
    for view in views:
        view.deliver(done)
    assert views[0].flush() == [] and [r.metadata for r in views[1].flush()] == [{"first_token": 3}]
    assert shared.open_rooms == set() and views[1].open_rooms == set()


class FakeDPRank:
    """One DP rank's scheduler: records what it was given."""

    def __init__(self):
        self.reqs, self.transfer = [], DPRankTransferStub()

    def add_request(self, req) -> None:
        self.reqs.append(req.rid)

    def schedule_batch(self) -> list:
        return []

    def finish_step(self) -> list:
        return []

    def has_work(self) -> bool:
        return bool(self.reqs)


class DPRankTransferStub:
    def deliver(self, results) -> None:
        pass

    def flush(self) -> list:
        return []


def test_the_decode_picks_a_dp_rank_or_the_one_asked_for_and_refuses_bad_ones():
    import types

    import torch
    from disagg.common.config import EngineConfig
    from disagg.common.engine.request import Req, SamplingParams
    from disagg.common.parallel.dp_attention import DPAttentionScheduler
    from disagg.common.server.serving import engine_error

    pool = types.SimpleNamespace(num_pages=8, page_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    runner = types.SimpleNamespace(pool=pool, device=torch.device("cpu"), tokenizer=None, hf_config=None,
                                   model_path="m", context_length=64)  # fmt: skip
    config = EngineConfig(tp=2, dp_size=2, enable_dp_attention=True)
    s = DPAttentionScheduler(config, runner, lambda view, d: FakeDPRank(), transfer=DPRankTransferStub())

    def add(rid: str, room: int, dp_rank: int | None = None) -> None:
        s.add_request(Req(rid, [1, 2], SamplingParams(), bootstrap_host="h", bootstrap_port=1, bootstrap_room=room,
                          data_parallel_rank=dp_rank))  # fmt: skip

    add("a", 10), add("b", 11), add("c", 12, dp_rank=1), add("d", 13)
    add("twice", 10, dp_rank=1), add("far", 14, dp_rank=2)
    assert [r.reqs for r in s.schedulers] == [["a", "d"], ["b", "c"]]  # least loaded, ties in turn; c pinned
    errors = {out.rid: engine_error(out.error) for out in s.step()}
    assert errors["twice"].status == 409 and "bootstrap_room 10" in errors["twice"].message
    assert errors["far"].status == 400 and "data_parallel_rank 2" in errors["far"].message


def test_one_bootstrap_port_answers_for_every_prefill_replica():
    """Replicas register under their dp_rank; a decode asks for one replica's ranks (ready once all of
    that replica's ranks registered) and learns how many replicas there are."""
    from disagg.transfer.bootstrap import (
        BootstrapError,
        BootstrapServer,
        query_prefill_dp_size,
        query_prefill_ranks,
        register_prefill_rank,
    )
    from disagg.transfer.layout import KVLayout
    from disagg.transfer.protocol import RegisterPrefillRankMsg

    server = BootstrapServer(host="127.0.0.1")
    try:
        for dp_rank, tp_rank in ((1, 0), (1, 1), (0, 0)):
            layout = KVLayout(2, 4, 2, 16, "float32", tp_rank=tp_rank, tp_size=2)
            msg = RegisterPrefillRankMsg(layout, "127.0.0.1", 9000 + 10 * dp_rank + tp_rank, dp_rank, 2)
            register_prefill_rank("127.0.0.1", server.port, msg)
        assert query_prefill_dp_size("127.0.0.1", server.port) == 2
        ranks = query_prefill_ranks("127.0.0.1", server.port, dp_rank=1)
        assert [(r.dp_rank, r.layout.tp_rank, r.port) for r in ranks] == [(1, 0, 9010), (1, 1, 9011)]
        with pytest.raises(BootstrapError, match="replica 0"):  # its rank 1 never registered
            query_prefill_ranks("127.0.0.1", server.port, timeout_s=0.5, dp_rank=0)
    finally:
        server.close()


def test_the_prefill_dp_rank_of_a_room_is_room_mod_d_whatever_data_parallel_rank_says():
    """A DP-attention prefill places room r on DP rank r % D (where the decode asks for it): the
    body's data_parallel_rank is the decode's choice, neither used nor range-checked here; a request
    without a room (a health check) goes to the least loaded DP rank. Its SendPagesOps carry the DP
    rank, so only that DP rank's ranks (which hold the pages) send them."""
    import types

    import torch
    from disagg.common.config import EngineConfig
    from disagg.common.engine.request import Req, SamplingParams
    from disagg.common.parallel.dp_attention import DPAttentionScheduler
    from disagg.transfer.coordinator import DPRankTransfer, RankTransfer, TransferCoordinator

    from tests.test_pd_units import FakeEngine

    pool = types.SimpleNamespace(num_pages=8, page_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    runner = types.SimpleNamespace(pool=pool, device=torch.device("cpu"), tokenizer=None, hf_config=None,
                                   model_path="m", context_length=64)  # fmt: skip
    config = EngineConfig(tp=2, dp_size=2, enable_dp_attention=True)
    s = DPAttentionScheduler(config, runner, lambda view, d: FakeDPRank(), transfer=DPRankTransferStub(),
                             by_room=True)  # fmt: skip
    for rid, room, dp_rank in (("a", 11, 0), ("b", 13, None), ("c", 4, 7), ("d", None, None), ("e", None, 9)):
        s.add_request(Req(rid, [1, 2], SamplingParams(), bootstrap_room=room, data_parallel_rank=dp_rank,
                          bootstrap_host=None if room is None else "h", bootstrap_port=None if room is None else 1))  # fmt: skip
    assert [r.reqs for r in s.schedulers] == [
        ["c", "d"],
        ["a", "b", "e"],
    ]  # d, then e (a tie, in turn): least loaded
    assert s.step() == []  # nothing refused

    shared = TransferCoordinator(RankTransfer(FakeEngine()), 2)
    shared.ranks_per_dp = 1  # (this test process has no DP attention groups)
    DPRankTransfer(shared, 1).send(13, [2, 3], 0, False, fingerprint=9)
    assert [(op.room, op.dp_rank) for op in shared.ops] == [(13, 1)]
    skipped = RankTransfer(FakeEngine())  # a rank of DP rank 0 (this process's attn_dp_rank)
    skipped.run(shared.ops)
    assert skipped.engine.calls == []
    # another DP rank's rooms count as asked for: rank 0's sender never hears of them
    assert DPRankTransfer(shared, 1).requested_rooms([13]) == {13}


def test_the_bootstrap_answers_a_dead_replicas_rooms_with_an_error_at_once():
    """With --dp-size replicas the controller serves the bootstrap and marks a replica that died:
    a decode asking for its ranks gets an error at once (not a wait for ranks that never come), the
    other replica is still answered and the replica count still known."""
    from disagg.transfer.bootstrap import (
        BootstrapError,
        query_prefill_dp_size,
        query_prefill_ranks,
        register_prefill_rank,
        serve_for_replicas,
    )
    from disagg.transfer.layout import KVLayout
    from disagg.transfer.protocol import RegisterPrefillRankMsg

    server = serve_for_replicas(0)
    try:
        for dp_rank in (0, 1):
            layout = KVLayout(2, 4, 2, 16, "float32", tp_rank=0, tp_size=1)
            msg = RegisterPrefillRankMsg(layout, "127.0.0.1", 9000 + dp_rank, dp_rank, 2)
            register_prefill_rank("127.0.0.1", server.port, msg)
        server.replica_died(0)
        start = time.monotonic()
        with pytest.raises(BootstrapError, match="replica 0 is down"):
            query_prefill_ranks("127.0.0.1", server.port, timeout_s=30, dp_rank=0)
        assert time.monotonic() - start < 10  # not the 30 s wait for ranks
        assert [r.port for r in query_prefill_ranks("127.0.0.1", server.port, dp_rank=1)] == [9001]
        assert query_prefill_dp_size("127.0.0.1", server.port) == 2
    finally:
        server.close()


def model_args(path: str, tokenizer: str) -> list[str]:
    return ["--model-path", path, "--tokenizer-path", tokenizer, "--page-size", "4"]


def generate(client: httpx.Client, ids: list[int], **extra) -> httpx.Response:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0,
                                                  "ignore_eos": True}, **extra}  # fmt: skip
    return client.post("/generate", json=body)


def output_ids(client: httpx.Client, ids: list[int], **extra) -> list[int]:
    r = generate(client, ids, **extra)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def uneven_requests(client: httpx.Client) -> tuple[list[int], list[list[int]]]:
    """FIRST alone, then THEN concurrently (spread over both DP ranks / replicas)."""
    first = output_ids(client, FIRST)
    with cf.ThreadPoolExecutor(len(THEN)) as pool:
        then = list(pool.map(lambda ids: output_ids(client, ids), THEN))
    return first, then


@pytest.mark.slow
def test_pd_decode_with_dp_attention_gives_transformers_tokens(moe_path, default_model_path):
    args = model_args(moe_path, default_model_path)
    with PDCluster(prefill_args=args, decode_args=[*args, *DP_ATTENTION]) as pd, pd.client() as client:
        first, then = uneven_requests(client)
        # SGLang's data_parallel_rank pins a request to a DP rank of the decode; out of range: a 400
        pinned = output_ids(client, THEN[1], data_parallel_rank=1)
        bad = generate(client, FIRST, data_parallel_rank=2)
        assert bad.status_code == 400 and "data_parallel_rank" in bad.text, bad.text
        assert_pool_free(pd.prefill)
        assert_pool_free(pd.decode)  # both DP ranks' pools
    assert first == hf_greedy(moe_path, FIRST, MAX_TOKENS)
    assert then == [hf_greedy(moe_path, ids, MAX_TOKENS) for ids in THEN]
    assert pinned == then[1]


def post_pd(pd: PDCluster, ids: list[int], room: int) -> list[int]:
    """One request straight to both servers (no router) in the chosen bootstrap room."""
    pd_fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port, "bootstrap_room": room}
    with cf.ThreadPoolExecutor(2) as pool, pd.prefill.client() as p, pd.decode.client() as d:
        prefill = pool.submit(generate, p, ids, **pd_fields)
        decode = pool.submit(output_ids, d, ids, **pd_fields)
        out = decode.result()
        assert prefill.result().status_code == 200
    return out


def uneven_rooms(pd: PDCluster) -> tuple[list[int], list[list[int]]]:
    """FIRST alone in room 1 (DP rank / replica 1; 0 idle), then THEN concurrently in rooms 2, 4
    (DP rank / replica 0) and 5 (1)."""
    first = post_pd(pd, FIRST, room=1)
    with cf.ThreadPoolExecutor(len(THEN)) as pool:
        then = list(pool.map(lambda a: post_pd(pd, *a), zip(THEN, [2, 4, 5], strict=True)))
    return first, then


@pytest.mark.slow
@pytest.mark.parametrize("decode", [[], DP_ATTENTION], ids=["decode-tp1", "decode-dp-attention"])
def test_pd_prefill_with_dp_attention_gives_transformers_tokens(moe_path, default_model_path, decode):
    """Prefill `--tp 2 --dp-size 2 --enable-dp-attention --ep 2` -> decode `--tp 1`, or a decode with
    the same DP attention (which picks its own DP rank: room 1 lands on its DP rank 0): room r is
    prefilled on DP rank r % 2 (the other runs idle steps), whose rank sends the pages."""
    args = model_args(moe_path, default_model_path)
    with PDCluster(prefill_args=[*args, *DP_ATTENTION], decode_args=[*args, *decode], router=None) as pd:
        first, then = uneven_rooms(pd)
        assert_pool_free(pd.prefill)  # both DP ranks' pools
        assert_pool_free(pd.decode)
    assert first == hf_greedy(moe_path, FIRST, MAX_TOKENS)
    assert then == [hf_greedy(moe_path, ids, MAX_TOKENS) for ids in THEN]


def replica_pid(server, dp_rank: int) -> int:
    info = httpx.get(server.url + "/server_info", timeout=10).json()
    return next(r["pid"] for r in info["internal_states"][0]["dp_replicas"] if r["dp_rank"] == dp_rank)


def kill_replica_and_check_the_other_serves(pd: PDCluster, expected: list[int]) -> None:
    """SIGKILL replica 0's scheduler process (not the server; it used to carry the bootstrap): a
    room of replica 0 ends with typed errors on both legs within seconds; a room of replica 1 still
    gives the tokens."""
    os.kill(replica_pid(pd.prefill, 0), signal.SIGKILL)  # a process this test's server started
    killed = time.monotonic()
    up = lambda: metric_value(httpx.get(pd.prefill.url + "/metrics", timeout=10).text,  # noqa: E731
                              "disagg_dp_replica_up", dp_rank="0")  # fmt: skip
    while up() != 0 and time.monotonic() < killed + 30:
        time.sleep(0.2)
    assert up() == 0
    assert httpx.get(pd.prefill.url + "/health", timeout=10).status_code == 200  # replica 1 still serves
    # NOTE: past the decode's heartbeat timeout (5 s) it has dropped its connection to replica 0 and
    # must ask the bootstrap again (replica 0's used to be gone with it: no answer for 10 s)
    time.sleep(max(0.0, killed + 9 - time.monotonic()))
    pd_fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port, "bootstrap_room": 8}
    start = time.monotonic()
    with cf.ThreadPoolExecutor(2) as pool, pd.prefill.client() as p, pd.decode.client() as d:
        prefill, decode = (pool.submit(generate, c, THEN[0], **pd_fields) for c in (p, d))
        prefill, decode = prefill.result(), decode.result()
    took = time.monotonic() - start
    assert prefill.status_code == 502 and prefill.json()["error"]["code"] == "replica_failed", prefill.text
    assert decode.status_code == 502 and decode.json()["error"]["code"] == "kv_transfer_failed", decode.text
    assert "replica 0 is down" in decode.text, decode.text  # the bootstrap (the controller's) said so
    assert took < 8, took  # at once, not after the room timeout (10 s)
    assert post_pd(pd, THEN[0], room=7) == expected  # replica 1


@pytest.mark.slow
def test_pd_prefill_with_two_replicas_gives_transformers_tokens_and_survives_one_dying(
    moe_path, default_model_path
):
    """Room r is prefilled by replica r % 2 and its pages reach the decode from that replica. Then
    replica 0 dies: the bootstrap (the controller's) still answers for replica 1."""
    args = model_args(moe_path, default_model_path)
    with PDCluster(prefill_args=[*args, "--dp-size", "2"], decode_args=args, router=None) as pd:
        first, then = uneven_rooms(pd)
        text = httpx.get(pd.prefill.url + "/metrics", timeout=10).text
        dispatched = [
            metric_value(text, "disagg_dp_dispatched_requests_total", dp_rank=str(i)) for i in (0, 1)
        ]
        assert_pool_free(pd.prefill)  # every replica's pool
        assert_pool_free(pd.decode)
        kill_replica_and_check_the_other_serves(pd, then[0])
        assert_pool_free(pd.decode)
    assert dispatched[0] >= 2 and dispatched[1] >= 2  # (plus the health checks, placed by round robin)
    assert first == hf_greedy(moe_path, FIRST, MAX_TOKENS)
    assert then == [hf_greedy(moe_path, ids, MAX_TOKENS) for ids in THEN]
