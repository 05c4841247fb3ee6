"""On one CUDA GPU shared by prefill and decode: a PD request's first token leaves the decode while
its running step is still on the device (the step's event polled beside the transfer wake fd,
common/engine/device_wait.py), and the tokens are the engine's (float32, torch attention)."""

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

FLAGS = ["--device", "cuda", "--dtype", "float32", "--attention-backend", "torch", "--disable-cuda-graph"]


def test_first_token_leaves_while_the_decode_step_runs_on_the_gpu(engines):
    engine = engines.get(
        dtype="float32", attention_backend="torch", max_total_tokens=4096, context_length=512
    )
    want = greedy_ids(engine, [RUNNING, PROBE], 4)
    del engine
    engines.close()
    torch.cuda.empty_cache()
    # the decode's steps are slowed on the device (a sleep kernel per forward), not on its host thread
    # DISAGG_TRANSFER_TRACE + info logs: the decode logs when each room was expected, when its result
    # was taken (mid-step or at a step's end) and how each step's wait went; shown on a failure
    env = {"CUDA_VISIBLE_DEVICES": "0", "DISAGG_TRANSFER_TRACE": "1"}
    with SlowDecodeCluster(FLAGS, [*FLAGS, "--log-level", "info"], env=env) as pd:
        try:
            check_first_token_leaves_mid_step(pd, want)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- decode log (tail) ---\n{pd.decode.output()[-8000:]}") from None
