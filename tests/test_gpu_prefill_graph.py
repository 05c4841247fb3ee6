"""On a CUDA GPU: prefill batches of fresh prompts replay CUDA graphs (the default;
cuda_graph.PrefillGraphRunner) and give the eager forward's logits and K/V: one prompt, several,
a bucket's exact size and padded ones; a cached prefix takes the paged set; batches the graphs do
not take (past the largest bucket, more requests or pages than they hold) run eagerly; and an
engine's greedy tokens with the graphs stay close to the eager engine's (a tiny Qwen3-MoE: the
fused MoE kernels inside the graph). An MLA model (a 2-layer DeepSeek-V3 shape, FP8 on Hopper)
runs its expanded form in the graph: the same logits and latents as its eager prefill."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(
    head_dim=128, num_attention_heads=8, num_key_value_heads=2, hidden_size=256, moe_intermediate_size=128
)


def _plan(runner, q_lens, seed):
    """Fresh prompts of these lengths on pages from 1 on (free: the engine is idle)."""
    from tests.conftest import fresh_prompts_plan

    return fresh_prompts_plan(q_lens, runner.pool.page_size, runner.hf_config.vocab_size, seed, first_page=1)


def _kv_rows(runner, plan) -> torch.Tensor:
    """The K and V the forward wrote for the plan's tokens, every layer: [T, layers, 2, Hkv, D]."""
    kv = runner.pool.kv_buffer  # [layers, pages, 2, page_size, Hkv, D]
    pages = torch.tensor(plan.pages, device=kv.device)
    offsets = torch.tensor(plan.offsets, device=kv.device)
    return kv.permute(1, 3, 0, 2, 4, 5)[pages, offsets].float().clone()


def _latent_rows(runner, plan) -> torch.Tensor:
    """An MLA model's latents the forward wrote for the plan's tokens, every layer: [layers, T, latent]
    (a page holds one contiguous latent per token, not the per-head view's K and V halves)."""
    from disagg.common.models.deepseek import latent_pages

    rows = torch.tensor(plan.pages, device="cuda") * runner.pool.page_size + torch.tensor(
        plan.offsets, device="cuda"
    )
    return torch.stack([latent_pages(kv).flatten(0, 1)[rows].float() for kv in runner.pool.kv_buffer])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("flashinfer")
    from disagg.common.engine.offline import Engine

    from tests.conftest import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("q3moe") / "m", "qwen3_moe", **SHAPE)
    engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16", max_total_tokens=16384,
                    page_size=16, chunked_prefill_size=4096,
                    prefill_cuda_graph_max_tokens=512)  # fmt: skip
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("q_lens", [[300], [100, 37, 200], [16], [5], [40, 1], [512], [3] * 16])
def test_graph_prefill_equals_eager(engine, q_lens):
    from disagg.common.engine.cuda_graph import prefill_buckets

    runner = engine.scheduler.runner
    graphs = runner.prefill_graphs
    assert graphs is not None and graphs.buckets == prefill_buckets(512)
    plan = _plan(runner, q_lens, sum(q_lens))
    assert graphs.can_run(plan)
    eager = runner.model(runner.make_batch(plan), runner.pool.kv_buffer, runner.backend).clone()
    eager_kv = _kv_rows(runner, plan)
    runner.pool.kv_buffer.zero_()  # the graph must write every K/V the eager forward wrote
    graphed = graphs.run(plan).clone()
    assert graphed.shape == eager.shape == (len(q_lens), runner.hf_config.vocab_size)
    torch.testing.assert_close(graphed, eager, atol=5e-2, rtol=5e-2)
    assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9  # random weights: rare near-ties
    torch.testing.assert_close(_kv_rows(runner, plan), eager_kv, atol=2e-2, rtol=2e-2)


def test_batches_the_graphs_do_not_take(engine):
    runner = engine.scheduler.runner
    graphs = runner.prefill_graphs
    assert not graphs.can_run(_plan(runner, [513], 0))  # past the largest bucket
    assert not graphs.can_run(_plan(runner, [2] * 17, 0))  # more requests than the graphs hold
    assert not graphs.can_run(_plan(runner, [1, 1], 0))  # decode-sized: the decode graphs'
    cached = _plan(runner, [40], 0)
    cached.kv_lens = [72]  # 32 tokens of cached prefix: attention over the pool, not the step's K/V
    assert graphs.graph_kind(cached) == "paged"  # the paged set, captured by default
    cached.tables = [list(range(1, graphs.request_pages + 2))]  # more pages than that set holds
    assert not graphs.can_run(cached)


PARAMS = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True, "top_logprobs_num": 5}


def test_engine_tokens_with_prefill_graphs_close_to_eager(engine, tmp_path, monkeypatch):
    """Prompts prefilled by the graphs (and one past the largest bucket, eagerly), then decoded,
    against an engine without them on the same weights; the second round of the same prompts hits
    the radix cache (a cached prefix: the paged set or eager) and gives the same tokens again."""
    from disagg.common.engine.cuda_graph import PrefillGraphRunner
    from disagg.common.engine.offline import Engine

    from tests.conftest import assert_logprobs_close

    replays = []  # the graph set each replay took
    original = PrefillGraphRunner.run
    monkeypatch.setattr(
        PrefillGraphRunner,
        "run",
        lambda self, *a: replays.append(self.graph_kind(a[0])) or original(self, *a),
    )
    prompts = [list(range(3, 300)), [5, 9, 11] * 30, list(range(7, 20)), [4] * 700]
    graphed = engine.generate(prompts[:3], PARAMS)  # one prefill batch of 400 tokens: a graph
    assert replays
    graphed += engine.generate(prompts[3:], PARAMS)  # 700 tokens: past the largest bucket, eager
    assert replays == ["ragged"]
    path = engine.config.model_path
    eager_engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16",
                          max_total_tokens=16384, page_size=16, chunked_prefill_size=4096,
                          disable_prefill_cuda_graph=True)  # fmt: skip
    try:
        assert eager_engine.scheduler.runner.prefill_graphs is None
        eager = eager_engine.generate(prompts, PARAMS)
    finally:
        eager_engine.shutdown()
    assert_logprobs_close(graphed, eager)
    again = engine.generate(prompts, PARAMS)  # cached prefixes: the paged set where a batch fits it
    assert replays.count("ragged") == 1  # never the fresh prompts' set again
    assert_logprobs_close(again, graphed)


def test_mla_graph_prefill_equals_eager(monkeypatch):
    pytest.importorskip("flashinfer")
    monkeypatch.setenv("DISAGG_MLA_PREFILL_GRAPH", "1")
    from disagg.common.engine.offline import Engine

    from tests.test_gpu_mla import SMALL_V3

    engine = Engine(model_path="DeepSeek-V3", load_format="dummy", json_model_override_args=json.dumps(SMALL_V3),
                    max_total_tokens=8192, chunked_prefill_size=4096, prefill_cuda_graph_max_tokens=512)  # fmt: skip
    try:
        runner = engine.scheduler.runner
        graphs = runner.prefill_graphs
        assert type(runner.backend).__name__ == "FlashInferMLABackend" and graphs is not None
        for q_lens in ([300], [100, 37, 200], [5], [512]):
            plan = _plan(runner, q_lens, sum(q_lens))
            assert graphs.can_run(plan)
            eager = runner.model(runner.make_batch(plan), runner.pool.kv_buffer, runner.backend).clone()
            eager_kv = _latent_rows(runner, plan)
            runner.pool.kv_buffer.zero_()
            graphed = graphs.run(plan).clone()
            assert graphed.shape == eager.shape == (len(q_lens), runner.hf_config.vocab_size)
            assert ((graphed - eager).norm() / eager.norm()).item() < 3e-2, q_lens
            assert ((_latent_rows(runner, plan) - eager_kv).norm() / eager_kv.norm()).item() < 1e-2, q_lens
    finally:
        engine.shutdown()


def test_paged_graph_prefill_equals_eager(tmp_path, monkeypatch):
    """DISAGG_PAGED_PREFILL_GRAPH=1: batches over cached prefixes (later chunks, a decode row beside
    them) replay the paged set and give the eager forward's logits and new K/V."""
    pytest.importorskip("flashinfer")
    from disagg.common.engine.model_runner import BatchPlan
    from disagg.common.engine.offline import Engine

    from tests.conftest import make_tiny_model
    from tests.test_prefill_graph_rows import _extend

    monkeypatch.setenv("DISAGG_PAGED_PREFILL_GRAPH", "1")
    path = make_tiny_model(tmp_path / "m", "qwen3_moe", **SHAPE)
    engine = Engine(model_path=path, attention_backend="flashinfer", dtype="bfloat16", max_total_tokens=16384,
                    page_size=16, chunked_prefill_size=4096, prefill_cuda_graph_max_tokens=512)  # fmt: skip
    try:
        runner = engine.scheduler.runner
        graphs, ps, vocab = runner.prefill_graphs, runner.pool.page_size, runner.hf_config.vocab_size
        assert set(graphs.backends) == {"ragged", "paged"}
        for prompt_lens, extra in (([300], 100), ([100, 37, 200], 40), ([20], 1000)):
            prompts = _plan(runner, prompt_lens, sum(prompt_lens))
            plan = _extend(prompts, extra, ps, vocab)
            if len(prompt_lens) > 1:  # the second request: one decode row (its first new token)
                first = extra + 1
                keep = list(range(first)) + list(range(2 * extra, len(plan.ids)))
                plan = BatchPlan(*([r[i] for i in keep] for r in (plan.ids, plan.positions, plan.pages, plan.offsets)),
                                 [extra - 1, extra, len(keep) - 1], plan.q_lens, plan.kv_lens, plan.tables)  # fmt: skip
                plan.q_lens[1], plan.kv_lens[1] = 1, prompt_lens[1] + 1
            if len(plan.ids) > graphs.buckets[-1]:
                assert not graphs.can_run(plan)
                continue
            assert graphs.graph_kind(plan) == "paged"
            runner.model(runner.make_batch(prompts), runner.pool.kv_buffer, runner.backend)  # the prefixes
            eager = runner.model(runner.make_batch(plan), runner.pool.kv_buffer, runner.backend).clone()
            eager_kv = _kv_rows(runner, plan)
            pages = torch.tensor(plan.pages, device="cuda")
            runner.pool.kv_buffer[:, pages, :, torch.tensor(plan.offsets, device="cuda")] = (
                0  # only the new rows
            )
            graphed = graphs.run(plan).clone()
            torch.testing.assert_close(graphed, eager, atol=5e-2, rtol=5e-2)
            torch.testing.assert_close(_kv_rows(runner, plan), eager_kv, atol=2e-2, rtol=2e-2)
    finally:
        engine.shutdown()
