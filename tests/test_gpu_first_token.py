"""On one CUDA GPU shared by prefill and decode: a PD request's first token leaves the decode while
its running step is still on the device (the step's event polled beside the transfer wake fd,
common/engine/device_wait.py), on the engine as it serves: bf16, FlashInfer, CUDA graphs.

NOTE: not the eager engine. An eager step of the default model is ~1200 kernel launches; with the
overlap schedule the next step's launches fill CUDA's launch queue behind the step in flight, so the
scheduler thread sits in a kernel launch until that step drains (H200, 2026-12-04: every launch
waited ~4 s for the slowed step, `faulthandler` showed it in an elementwise op) and cannot take a
room's result mid-step. A graph replay is one launch a step."""

from __future__ import annotations

import pytest
import torch

from tests.test_first_token import (
    PROBE,
    RUNNING,
    SlowDecodeCluster,
    check_first_token_leaves_mid_step,
    greedy_ids,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FLAGS = ["--device", "cuda"]  # bf16, FlashInfer, CUDA graphs, the overlap schedule


def test_first_token_leaves_while_the_decode_step_runs_on_the_gpu(engines):
    engine = engines.get(max_total_tokens=4096, context_length=512)
    # each prompt alone: the prefill server computes each one's first token alone too
    want = [greedy_ids(engine, [prompt], 4)[0] for prompt in (RUNNING, PROBE)]
    del engine
    engines.close()
    torch.cuda.empty_cache()
    # the decode's steps are slowed on the device (sleep kernels after each forward), not on its host
    # DISAGG_TRANSFER_TRACE + info logs: the decode logs when each room was expected, when its result
    # was taken (mid-step or at a step's end) and how each step's launch and wait went; shown on a failure
    env = {"CUDA_VISIBLE_DEVICES": "0", "DISAGG_TRANSFER_TRACE": "1"}
    with SlowDecodeCluster(FLAGS, [*FLAGS, "--log-level", "info"], env=env) as pd:
        try:
            # bf16: the decode batches the two requests (other GEMM shapes than each alone), so only
            # the first tokens (the prefill's, each prompt alone on both sides) must be equal
            check_first_token_leaves_mid_step(pd, want, exact=False)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- decode log (tail) ---\n{pd.decode.output()[-8000:]}") from None
