"""Tensor and expert parallelism over gloo: the same greedy tokens as tp=1 and transformers."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from disagg.common.engine.offline import Engine

from tests.conftest import hf_greedy, make_tiny_model
from tests.procs import Process, free_port, join_or_kill, spawn

pytestmark = pytest.mark.slow
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300]]


def _run(model_path, prompts, **kw):
    engine = Engine(model_path=model_path, page_size=4, chunked_prefill_size=8, **kw)
    try:
        return [o["output_ids"] for o in engine.generate(prompts, GREEDY)], engine.scheduler.runner.model_path
    finally:
        engine.shutdown()


def test_tp3_default_model_matches_tp1_and_transformers(default_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    prompts = [tok.encode(p) for p in ("The capital of France is", "def add(a, b):", "Three colors:")]
    tp3, path = _run(None, prompts, tp=3)
    tp1, _ = _run(None, prompts)
    assert tp3 == tp1 == [hf_greedy(path, p, 12) for p in prompts]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"qwen3_moe": make_tiny_model(root / "qwen3_moe", "qwen3_moe", num_experts=4, num_experts_per_tok=2),
            "mixtral": make_tiny_model(root / "mixtral", "mixtral")}  # fmt: skip


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(tp=2)),
        ("qwen3_moe", dict(tp=2, ep=2)),
        ("qwen3_moe", dict(tp=2, ep=1)),
        ("mixtral", dict(tp=2, ep=2)),
    ],
    ids=["llama-tp2", "qwen3moe-tp2-ep2", "qwen3moe-tp2-ep1", "mixtral-tp2-ep2"],
)
def test_tiny_tp_ep_match_transformers(tiny_models, moe_models, family, kw):
    path = {**tiny_models, **moe_models}[family]
    out, _ = _run(path, PROMPTS, **kw)
    assert out == [hf_greedy(path, p, 12) for p in PROMPTS]


def test_two_nodes_on_one_machine(tiny_models):
    path = tiny_models["llama"]
    addr = f"127.0.0.1:{free_port()}"
    node1 = Process(
        [
            sys.executable,
            "-m",
            "disagg.common.parallel.ranks",
            "--model-path",
            path,
            "--tp",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--dist-init-addr",
            addr,
            "--page-size",
            "4",
            "--chunked-prefill-size",
            "8",
        ],
    ).launch()
    try:
        out, _ = _run(path, PROMPTS, tp=2, nnodes=2, node_rank=0, dist_init_addr=addr)
        assert out == [hf_greedy(path, p, 12) for p in PROMPTS]
        code = node1.proc.wait(timeout=60)
        assert code == 0, node1.output()  # node 1's ranks stop cleanly with the group
    finally:
        node1.stop()


def _late_leaver(addr: str, delay: float) -> None:
    """Rank 1 of a 2-rank gloo group: take plans until the stop, wait `delay`, leave as worker_main does."""
    import torch.distributed as dist
    from disagg.common.messages import StopMsg
    from disagg.common.parallel import ranks
    from disagg.common.parallel.state import ParallelState, set_parallel

    dist.init_process_group("gloo", init_method=f"tcp://{addr}", rank=1, world_size=2)
    set_parallel(ParallelState(tp_rank=1, tp_size=2, cpu_group=dist.group.WORLD))
    while not isinstance(ranks.broadcast_plan(None), StopMsg):
        pass
    time.sleep(delay)
    ranks._leave_group()


def test_rank0_leaves_the_group_only_after_the_other_ranks():
    """Rank 0 closes its connections last (both ends closing at once aborted a rank with SIGABRT)."""
    import torch.distributed as dist
    from disagg.common.parallel import ranks
    from disagg.common.parallel.state import ParallelState, set_parallel

    addr = f"127.0.0.1:{free_port()}"
    worker = spawn(_late_leaver, addr, 1.0)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{addr}", rank=0, world_size=2)
        set_parallel(ParallelState(tp_rank=0, tp_size=2, cpu_group=dist.group.WORLD))
        start = time.monotonic()
        ranks.stop_workers()
        waited = time.monotonic() - start
        left = dist.distributed_c10d._get_default_store().add(ranks._LEFT_KEY, 0)
        assert left == 1 and waited >= 1.0, (left, waited)
        worker.join(timeout=10)
        assert worker.exitcode == 0
    finally:
        set_parallel(ParallelState())
        if dist.is_initialized():
            dist.destroy_process_group()
        join_or_kill([worker])


def test_impossible_layouts_fail_clearly(tiny_models, moe_models):
    with pytest.raises(ValueError, match="attention heads"):
        Engine(model_path=tiny_models["llama"], tp=3)
    with pytest.raises(ValueError, match="4 experts are not divisible by 8"):
        Engine(model_path=moe_models["qwen3_moe"], tp=4, ep=8)
    with pytest.raises(ValueError, match="--ep"):
        Engine(model_path=moe_models["qwen3_moe"], tp=2, ep=4)


def test_ranks_that_never_arrive_time_out(tiny_models):
    # in a child process: a failed rendezvous leaves torch.distributed's global state behind
    addr = f"127.0.0.1:{free_port()}"
    code = (
        "from disagg.common.engine.offline import Engine\n"
        f"Engine(model_path={tiny_models['llama']!r}, tp=2, nnodes=2, dist_init_addr={addr!r}, dist_timeout=3)"
    )
    # node 1 never starts: rank 0 gives up after --dist-timeout with a clear error
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "did not form within --dist-timeout 3" in out.stderr


def test_a_dead_rank_fails_the_group_instead_of_hanging(tiny_models):
    engine = Engine(model_path=tiny_models["llama"], tp=2, page_size=4)
    try:
        assert engine.generate([[1, 2, 3]], GREEDY)[0]["output_ids"]
        worker = engine._workers[0]
        worker.kill()
        worker.join(timeout=10)
        with pytest.raises(RuntimeError):  # gloo reports the closed connection: an error, not a hang
            engine.generate([[4, 5, 6]], GREEDY)
    finally:
        engine._workers = []
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        from disagg.common.parallel.state import ParallelState, set_parallel

        set_parallel(ParallelState())
