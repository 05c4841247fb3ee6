"""MLA through PD (issue 20): the prefill ships latent pages (one latent per token, the same on every
rank), so a decode at another --tp takes them as a replica; greedy tokens equal transformers'."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.conftest import hf_greedy
from tests.pd_helpers import PD_ARGS, assert_pool_free, start_all
from tests.procs import free_port
from tests.server_helpers import ServerProcess
from tests.test_common_deepseek import make_tiny_deepseek

pytestmark = pytest.mark.slow


def test_deepseek_v2_prefill_tp1_to_decode_tp2_gives_transformers_tokens(tmp_path, default_model_path):
    path = make_tiny_deepseek(tmp_path / "v2", "v2")
    args = ["--model-path", path, "--tokenizer-path", default_model_path, "--page-size", "4", *PD_ARGS]
    bootstrap = free_port()
    prefill = ServerProcess(
        "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap), *args
    )
    decode = ServerProcess("--disaggregation-mode", "decode", "--tp", "2", *args)
    try:
        start_all([prefill, decode])
        assert httpx.get(decode.url + "/server_info").json()["pd_identity"]["num_kv_heads_total"] == 1
        prompts = [[1, 2, 3, 4, 5], list(range(7, 100))]  # the second crosses chunks and pages
        for room, prompt in enumerate(prompts):
            body = {"input_ids": prompt, "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap,
                    "bootstrap_room": 1000 + room,
                    "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}  # fmt: skip
            with cf.ThreadPoolExecutor(2) as pool:
                legs = [
                    pool.submit(httpx.post, s.url + "/generate", json=body, timeout=120)
                    for s in (prefill, decode)
                ]
                p, d = (f.result() for f in legs)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
            assert d.json()["output_ids"] == hf_greedy(path, prompt, 12)
        assert_pool_free(prefill)
        assert_pool_free(decode)
    finally:
        for s in (prefill, decode):
            s.stop()
