"""Pipeline parallelism (--pp-size) over gloo: transformers' greedy tokens, stages that overlap."""

from __future__ import annotations

import pytest
from disagg.common.engine.model_runner import BatchPlan
from disagg.common.engine.offline import Engine
from disagg.common.parallel.pipeline import layer_range, split_plan

from tests.conftest import hf_greedy, make_tiny_model

GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
# several requests per step (so a step splits into micro-batches), a prompt longer than a chunk
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300], [42] * 6]


def _generate(path: str, **kw) -> list[list[int]]:
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=16, **kw)
    try:
        return [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.shutdown()


def test_layers_split_into_contiguous_stages():
    assert [layer_range(3, s, 2) for s in range(2)] == [(0, 1), (1, 3)]
    assert [layer_range(30, s, 4) for s in range(4)] == [(0, 7), (7, 15), (15, 22), (22, 30)]


def test_a_plan_splits_into_micro_batches_of_about_equal_tokens():
    q_lens, kv_lens, ps = [5, 1, 1, 8, 1], [5, 9, 3, 8, 4], 4
    ids = list(range(16))
    tables = [list(range(10 * r, 10 * r + 3)) for r in range(5)]
    plan = BatchPlan(ids=ids, positions=ids, pages=ids, offsets=[0] * 16, logits_index=[4, 5, 6, 15],
                     q_lens=q_lens, kv_lens=kv_lens, tables=tables)  # fmt: skip
    parts = split_plan(plan, 3, ps)
    assert [len(p.ids) for p in parts] == [5, 5, 6] and sum((p.ids for p in parts), []) == ids
    # request 3 (8 new tokens) is cut 3 + 5: its first part sees only its own 3 tokens in the pool
    assert parts[1].q_lens == [1, 1, 3] and parts[1].kv_lens == [9, 3, 3] and parts[1].tables[2] == [30]
    assert parts[2].q_lens == [5, 1] and parts[2].kv_lens == [8, 4] and parts[2].tables[0] == [30, 31]
    # the logits rows, renumbered inside each micro-batch, still name the same tokens in order
    assert [p.ids[i] for p in parts for i in p.logits_index] == [ids[i] for i in plan.logits_index]
    assert split_plan(plan, 1, ps) == [plan]


@pytest.fixture(scope="module")
def pp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    moe = {"num_experts": 4, "num_experts_per_tok": 2}
    # 3 layers: the stages are uneven (1 + 2); qwen2 ties the LM head to the embedding (both ends need it)
    return {
        name: make_tiny_model(root / name, name, num_hidden_layers=3, **moe if name == "qwen3_moe" else {})
        for name in ("llama", "qwen2", "qwen3_moe")
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(pp_size=2)),
        ("qwen2", dict(pp_size=3)),
        ("qwen3_moe", dict(pp_size=2)),
        ("qwen3_moe", dict(pp_size=2, tp=2, ep=2)),
    ],
    ids=["llama-pp2", "qwen2-tied-pp3", "qwen3moe-pp2", "qwen3moe-pp2-tp2-ep2"],
)
def test_pipeline_matches_transformers(pp_models, family, kw):
    path = pp_models[family]
    assert _generate(path, **kw) == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in PROMPTS]


@pytest.mark.slow
def test_pp2_tp2_dense_matches_transformers(pp_models):
    path = pp_models["llama"]
    assert _generate(path, pp_size=2, tp=2) == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in PROMPTS]


def test_impossible_pipeline_fails_clearly(pp_models):
    with pytest.raises(ValueError, match="--pp-size 4: the model has 3 layers"):
        Engine(model_path=pp_models["llama"], pp_size=4)


@pytest.mark.slow
def test_pd_prefill_pp2_to_decode_tp2_gives_colocated_tokens(pp_models, default_model_path):
    """Each prefill stage ships its own layers' KV pages; each decode rank takes its KV heads of
    every layer from both stages. Tokens equal the colocated engine's (and transformers')."""
    import concurrent.futures as cf

    import httpx

    from tests.pd_helpers import PD_ARGS, assert_pool_free, start_all
    from tests.procs import free_port
    from tests.server_helpers import ServerProcess

    path = pp_models["llama"]
    args = ["--model-path", path, "--tokenizer-path", default_model_path, "--page-size", "4", *PD_ARGS]
    bootstrap = free_port()
    prefill = ServerProcess("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap),
                            "--pp-size", "2", *args)  # fmt: skip
    decode = ServerProcess("--disaggregation-mode", "decode", "--tp", "2", *args)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 100))]  # the second crosses chunks (64 tokens) and pages
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    try:
        start_all([prefill, decode])
        got = []
        for room, prompt in enumerate(prompts):
            body = {"input_ids": prompt, "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap,
                    "bootstrap_room": 2000 + room, "sampling_params": params}  # fmt: skip
            with cf.ThreadPoolExecutor(2) as pool:
                legs = [
                    pool.submit(httpx.post, s.url + "/generate", json=body, timeout=120)
                    for s in (prefill, decode)
                ]
                p, d = (f.result() for f in legs)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
            got.append(d.json()["output_ids"])
        assert_pool_free(prefill)
        assert_pool_free(decode)
    finally:
        for s in (prefill, decode):
            s.stop()
    engine = Engine(model_path=path, page_size=4)
    try:
        colocated = [o["output_ids"] for o in engine.generate(prompts, params)]
    finally:
        engine.shutdown()
    assert got == colocated == [hf_greedy(path, p, 12) for p in prompts]


def _stage_layout(pp_rank: int, pp_size: int, tp_rank: int = 0, tp_size: int = 1):
    from disagg.transfer import KVLayout

    start, end = layer_range(3, pp_rank, pp_size)
    return KVLayout(num_layers=3, page_size=4, num_kv_heads_total=4, head_dim=8, dtype="bfloat16", tp_rank=tp_rank,
                    tp_size=tp_size, model_name="m", pp_rank=pp_rank, pp_size=pp_size, layer_start=start,
                    layer_end=end)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("direct", [False, True], ids=["ucx", "direct"])
def test_each_stage_sends_its_layers_to_every_decode_rank(direct):
    """Transfer level: prefill stages [0, 1) and [1, 3) (pp 2), decode tp 2: every decode page
    holds the prefill's bytes of every layer (over UCX, and copied straight into a same-host pool)."""
    import torch
    from disagg.transfer import BootstrapServer
    from disagg.transfer.testing import (
        decode_rank_main,
        full_pool,
        make_requests,
        prefill_rank_main,
        rank_slice,
        tensor_from_bytes,
    )

    from tests.procs import SPAWN, join_or_kill, spawn

    src_pages, dst_pages, sentinel, seed = 60, 50, -7.0, 99
    plans = make_requests(8, src_pages, dst_pages, max_pages=5, seed=3)
    out, stop, bootstrap, procs = SPAWN.Queue(), SPAWN.Event(), BootstrapServer(port=0), []
    try:
        for stage in range(2):
            args = (_stage_layout(stage, 2), bootstrap.port, src_pages, seed, plans, out, stop, 10.0)
            procs.append(spawn(prefill_rank_main, *args))
        for r in range(2):
            layout = _stage_layout(0, 1, r, 2)
            procs.append(spawn(decode_rank_main, layout, bootstrap.port, dst_pages, sentinel, plans, out, 10.0,
                               "cpu", direct))  # fmt: skip
        reports = [out.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        join_or_kill(procs)
        bootstrap.close()
    full = full_pool(_stage_layout(0, 1), src_pages, seed)
    for role, rank, results, active, pool_bytes, direct_peers in reports:
        assert sorted(results) == sorted(p.room for p in plans) and all(ok for ok, _, _ in results.values())
        assert active == 0
        if role == "decode":
            assert direct_peers == (2 if direct else 0)
            pool, want = tensor_from_bytes(pool_bytes), rank_slice(full, _stage_layout(0, 1, rank, 2))
            for p in plans:
                assert torch.equal(pool[:, p.dst_pages], want[:, p.src_pages]), f"room {p.room} differs"


@pytest.mark.slow
def test_one_stage_per_node(pp_models):
    """--pp-size 2 --nnodes 2: node 1 (`python -m disagg.common.parallel.ranks`) runs stage 1."""
    import sys

    from tests.procs import Process, free_port

    path, addr = pp_models["llama"], f"127.0.0.1:{free_port()}"
    flags = [
        "--model-path",
        path,
        "--pp-size",
        "2",
        "--nnodes",
        "2",
        "--dist-init-addr",
        addr,
        "--page-size",
        "4",
    ]
    node1 = Process(
        [sys.executable, "-m", "disagg.common.parallel.ranks", *flags, "--node-rank", "1"]
    ).launch()
    try:
        got = _generate(path, pp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr)
        assert got == [hf_greedy(path, p, GREEDY["max_new_tokens"]) for p in PROMPTS]
        assert node1.proc.wait(timeout=60) == 0  # node 1's stage stops cleanly with the group
    finally:
        node1.stop()
