"""PD with different --tp on the two sides: KV heads are re-split on the way, tokens stay the engine's."""

from __future__ import annotations

import concurrent.futures as cf
import sys

import pytest

from tests.conftest import REFERENCE_ENGINE
from tests.pd_helpers import PD_ARGS, SERVER_ENV, PDCluster, assert_pool_free
from tests.procs import Process, free_port
from tests.test_pd_e2e import LONG, generate

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", LONG + "In one sentence, the main benefit is"]


@pytest.fixture(scope="module")
def want(engines) -> list[list[int]]:
    try:
        outs = engines.get(**REFERENCE_ENGINE).generate(PROMPTS, {"max_new_tokens": 12, "temperature": 0})
    finally:
        engines.close()  # freed before the servers start
    return [o["output_ids"] for o in outs]


def check_tokens(pd: PDCluster, want: list[list[int]]) -> None:
    with pd.client() as client, cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(generate, client, p, stream) for p in PROMPTS for stream in (False, True)]
        got = [f.result() for f in futs]
    assert got == [w for w in want for _ in (0, 1)]
    assert_pool_free(pd.prefill)
    assert_pool_free(pd.decode)


def test_prefill_tp1_to_decode_tp3(want):
    # the decode server's rank 0 spawns ranks 1 and 2; each receives its own KV head
    with PDCluster(decode_args=["--tp", "3"]) as pd:
        check_tokens(pd, want)


def test_prefill_tp3_over_three_nodes_to_decode_tp1(want, tmp_path):
    # prefill rank 0 serves HTTP and the bootstrap; ranks 1 and 2 run as "nodes" of their own
    # (`launch_prefill --node-rank N`) and send their KV heads to the one decode rank
    nodes = [
        "--tp",
        "3",
        "--nnodes",
        "3",
        "--dist-init-addr",
        f"127.0.0.1:{free_port()}",
        "--dist-timeout",
        "300",
    ]
    pd = PDCluster(prefill_args=[*nodes, "--node-rank", "0"])
    others = []
    try:
        for rank in (1, 2):
            cmd = [sys.executable, "-m", "disagg.prefill.launch", *nodes, "--node-rank", str(rank),
                   "--disaggregation-bootstrap-port", str(pd.bootstrap_port), *PD_ARGS]  # fmt: skip
            others.append(Process(cmd, env=SERVER_ENV, log=tmp_path / f"node{rank}.log").launch())
        try:
            pd.start(attempts=1)  # the other nodes already know its bootstrap port: no retry elsewhere
        except RuntimeError as e:
            logs = "\n".join((tmp_path / f"node{r}.log").read_text()[-2000:] for r in (1, 2))
            raise RuntimeError(f"{e}\n--- other nodes ---\n{logs}") from None
        check_tokens(pd, want)
    finally:
        pd.stop()
        for proc in others:
            proc.stop()
