"""PD with different --tp on the two sides: KV heads are re-split on the way, tokens stay the engine's."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.pd_helpers import PDCluster, assert_pool_free
from tests.test_pd_e2e import LONG, generate

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", LONG + "In one sentence, the main benefit is"]


@pytest.fixture(scope="module")
def want(default_model_path) -> list[list[int]]:
    from disagg.common.engine import Engine

    engine = Engine(max_total_tokens=4096, context_length=512)
    try:
        outs = engine.generate(PROMPTS, {"max_new_tokens": 12, "temperature": 0})
    finally:
        engine.shutdown()
    return [o["output_ids"] for o in outs]


@pytest.mark.parametrize("prefill_tp, decode_tp", [(1, 3), (3, 1)])
def test_heterogeneous_tp_gives_the_engine_tokens(want, prefill_tp, decode_tp):
    with PDCluster(prefill_args=["--tp", str(prefill_tp)], decode_args=["--tp", str(decode_tp)]) as pd:
        with pd.client() as client, cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(generate, client, p, stream) for p in PROMPTS for stream in (False, True)]
            got = [f.result() for f in futs]
        assert got == [w for w in want for _ in (0, 1)]
        assert_pool_free(pd.prefill)
        assert_pool_free(pd.decode)
