"""How a prefill CUDA graph's batch is padded (cuda_graph.prefill_buckets / prefill_rows), on the CPU:
the buckets, and a padded batch run eagerly gives the unpadded batch's logits and K/V, its pad rows
writing no page but the pool's pad page. (The graphs themselves: tests/test_gpu_prefill_graph.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch
from disagg.common.engine.cuda_graph import padded_tables, prefill_buckets, prefill_rows

from tests.conftest import fresh_prompts_plan


def test_buckets():
    buckets = prefill_buckets(4096)
    assert buckets[:7] == [16, 32, 64, 128, 256, 320, 384] and buckets[-1] == 4096 and len(buckets) == 41
    # past 256 tokens a batch pads by at most 1/4 of its size, past 1024 by at most 1/8
    for small, large in itertools.pairwise(buckets):
        assert large - small <= (small // 4 if small >= 256 else small) and (
            small < 1024 or large - small <= small // 8
        )
    assert prefill_buckets(1000) == [
        16,
        32,
        64,
        128,
        256,
        320,
        384,
        448,
        512,
        576,
        640,
        704,
        768,
        832,
        896,
        960,
        1000,
    ]
    assert prefill_buckets(100) == [16, 32, 64, 100]


def _plan(q_lens, ps, vocab):
    return fresh_prompts_plan(q_lens, ps, vocab, seed=len(q_lens))


def test_rows_and_indptr():
    plan = _plan([5, 3], 4, 100)
    rows, indptr = prefill_rows(plan, 16, 4, pad_page=99, page_size=4)
    assert indptr == [0, 5, 8, 16, 16, 16]  # the two prompts, the pad request, two empty ones (5 in all)
    ids, positions, pages, offsets, key_rows, logits = rows
    assert ids[:8] == plan.ids and ids[8:] == [0] * 8
    assert positions == plan.positions + [0] * 8
    assert pages == plan.pages + [99] * 8 and offsets == plan.offsets + [0] * 8
    assert key_rows == [p * 4 + o for p, o in zip(plan.pages, plan.offsets, strict=True)] + [99 * 4] * 8
    assert key_rows[:5] == [0, 1, 2, 3, 4] and key_rows[5:8] == [8, 9, 10]  # each prompt's own pages
    assert logits == [4, 7, 0, 0]
    _, indptr = prefill_rows(_plan([16], 4, 100), 16, 4, pad_page=99, page_size=4)
    assert indptr == [0, 16, 16, 16, 16, 16]  # no padding: the pad request is empty
    with pytest.raises(AssertionError):
        prefill_rows(_plan([2] * 5, 4, 100), 16, 4, pad_page=99, page_size=4)  # more requests than it holds


def test_padded_batch_gives_the_unpadded_logits_and_kv(tiny_models):
    """The padded batch as the graph runs it (pad rows as one extra request), here eagerly on the CPU's
    torch attention: the real rows' logits and K/V are the unpadded batch's; the pad rows write only
    the pad page."""
    from disagg.common.engine.model_runner import BatchPlan
    from disagg.common.engine.offline import Engine

    engine = Engine(
        model_path=tiny_models["llama"], page_size=4, max_total_tokens=512, chunked_prefill_size=64
    )
    try:
        runner = engine.scheduler.runner
        pool, ps = runner.pool, runner.pool.page_size
        plan = _plan([9, 4, 13], ps, runner.hf_config.vocab_size)

        def forward(p):
            pool.kv_buffer.zero_()
            logits = runner.model(runner.make_batch(p), pool.kv_buffer, runner.backend)
            return logits, pool.kv_buffer.clone()

        want, want_kv = forward(plan)
        rows, indptr = prefill_rows(plan, 32, 4, pool.pad_page, ps)
        lens = [b - a for a, b in itertools.pairwise(indptr) if b > a]
        pad_table = [pool.pad_page] * ((lens[-1] + ps - 1) // ps)
        padded = BatchPlan(*rows[:4], rows[5], lens, lens, plan.tables + [pad_table])
        got, got_kv = forward(padded)
        assert got.shape[0] == 4  # the fixed logits rows: the plan's, then row 0
        torch.testing.assert_close(got[:3], want)
        real = torch.ones(got_kv.shape[1], dtype=torch.bool)
        real[pool.pad_page] = False
        torch.testing.assert_close(got_kv[:, real], want_kv[:, real])
        assert got_kv[:, pool.pad_page].abs().sum() > 0 and want_kv[:, pool.pad_page].abs().sum() == 0
    finally:
        engine.shutdown()


def test_flags():
    """On by default; --disable-prefill-cuda-graph turns them off; SGLang's piecewise flags are accepted
    (its max-tokens flag as ours, its enable flag as the default it asks for)."""
    import argparse

    from disagg.common.config import EngineConfig, add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = EngineConfig.from_args(parser.parse_args([]))
    assert not config.disable_prefill_cuda_graph and config.prefill_cuda_graph_max_tokens == 4096
    assert EngineConfig.from_args(
        parser.parse_args(["--disable-prefill-cuda-graph"])
    ).disable_prefill_cuda_graph
    args = ["--enable-piecewise-cuda-graph", "--piecewise-cuda-graph-max-tokens", "2048"]
    config = EngineConfig.from_args(parser.parse_args(args))
    assert not config.disable_prefill_cuda_graph and config.prefill_cuda_graph_max_tokens == 2048


def _extend(plan, extra: int, ps: int, vocab: int, seed: int = 1):
    """The plan's requests each given `extra` more tokens after their prompt (a cached prefix: the
    prompt's pages, then fresh ones past every page the plan holds)."""
    from disagg.common.engine.model_runner import BatchPlan

    gen = torch.Generator().manual_seed(seed)
    ids, positions, pages, offsets, logits_index, tables = [], [], [], [], [], []
    next_page = max(p for t in plan.tables for p in t) + 1
    for q, table in zip(plan.q_lens, plan.tables, strict=True):
        table = list(table)
        while len(table) * ps < q + extra:
            table.append(next_page)
            next_page += 1
        ids += torch.randint(0, vocab, (extra,), generator=gen).tolist()
        positions += range(q, q + extra)
        pages += [table[p // ps] for p in range(q, q + extra)]
        offsets += [p % ps for p in range(q, q + extra)]
        logits_index.append(len(ids) - 1)
        tables.append(table)
    kv_lens = [q + extra for q in plan.q_lens]
    return BatchPlan(ids, positions, pages, offsets, logits_index, [extra] * len(kv_lens), kv_lens, tables)


def test_padded_tables():
    plan = _extend(_plan([5, 3], 4, 100), 2, 4, 100)
    assert plan.kv_lens == [7, 5] and plan.tables == [[0, 1], [2, 3]]
    kv_lens, tables = padded_tables(plan, 12, 4, pad_page=99, page_size=4)
    assert kv_lens == [7, 5, 12, 0, 0] and tables == [[0, 1], [2, 3], [99, 99, 99], [], []]


def test_padded_cached_prefix_batch_gives_the_unpadded_logits_and_kv(tiny_models):
    """A batch over cached prefixes (a paged graph's), padded as the graph pads it, run eagerly on the
    CPU: the real rows' logits and K/V are the unpadded batch's; the pad request reads its pad pages."""
    from disagg.common.engine.model_runner import BatchPlan
    from disagg.common.engine.offline import Engine

    engine = Engine(
        model_path=tiny_models["llama"], page_size=4, max_total_tokens=512, chunked_prefill_size=64
    )
    try:
        runner = engine.scheduler.runner
        pool, ps, vocab = runner.pool, runner.pool.page_size, runner.hf_config.vocab_size
        prompts = _plan([9, 4, 13], ps, vocab)
        plan = _extend(prompts, 6, ps, vocab)
        plan.q_lens[1], plan.kv_lens[1] = 1, 5  # the second request: a decode row beside the chunks
        keep = [i for i in range(18) if not 7 <= i < 12]  # its first new token (position 4) only
        plan = BatchPlan(*([r[i] for i in keep] for r in (plan.ids, plan.positions, plan.pages, plan.offsets)),
                         [5, 6, 12], plan.q_lens, plan.kv_lens, plan.tables)  # fmt: skip
        runner.model(runner.make_batch(prompts), pool.kv_buffer, runner.backend)  # the prefixes' K/V

        def forward(p):
            kv = pool.kv_buffer.clone()
            logits = runner.model(runner.make_batch(p), pool.kv_buffer, runner.backend)
            out = pool.kv_buffer.clone()
            pool.kv_buffer.copy_(kv)
            return logits, out

        want, want_kv = forward(plan)
        rows, indptr = prefill_rows(plan, 32, 4, pool.pad_page, ps)
        kv_lens, tables = padded_tables(plan, 32 - len(plan.ids), 4, pool.pad_page, ps)
        q_lens = [b - a for a, b in itertools.pairwise(indptr)]
        real = [i for i, q in enumerate(q_lens) if q]
        padded = BatchPlan(*rows[:4], rows[5], [q_lens[i] for i in real], [kv_lens[i] for i in real],
                           [tables[i] for i in real])  # fmt: skip
        got, got_kv = forward(padded)
        assert got.shape[0] == 4
        torch.testing.assert_close(got[:3], want)
        others = torch.ones(got_kv.shape[1], dtype=torch.bool)
        others[pool.pad_page] = False
        torch.testing.assert_close(got_kv[:, others], want_kv[:, others])
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("name", "default"), [("DISAGG_MLA_PREFILL_GRAPH", True), ("DISAGG_PAGED_PREFILL_GRAPH", True)]
)
def test_switches_of_the_mla_and_paged_graph_sets(name, default, monkeypatch):
    """MLA's set and the paged set: on unless their variable is 0; nonsense refused."""
    from disagg.common import config

    read = {
        "DISAGG_MLA_PREFILL_GRAPH": config.mla_prefill_graph,
        "DISAGG_PAGED_PREFILL_GRAPH": config.paged_prefill_graph,
    }
    monkeypatch.delenv(name, raising=False)
    assert read[name]() is default
    monkeypatch.setenv(name, "0" if default else "1")
    assert read[name]() is not default
    monkeypatch.setenv(name, "on")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        read[name]()
