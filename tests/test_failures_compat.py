"""Compatibility is checked once, up front (issue 18): a prefill and a decode serving the same model
name with different weights are never paired. Each PD server publishes its KV layout identity (model
fingerprint, page size, dtype, ...) in /server_info; the router reads it when the worker turns
healthy, logs and counts incompatible pairs, and routes only to compatible ones."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from tests.conftest import make_tiny_model
from tests.pd_helpers import PD_ARGS, start_all
from tests.procs import free_port, router
from tests.server_helpers import ServerProcess, metric_value

pytestmark = pytest.mark.slow


def _server(mode: str, model: str, tokenizer: str, *extra: str) -> ServerProcess:
    return ServerProcess("--disaggregation-mode", mode, "--model-path", model, "--tokenizer-path", tokenizer,
                         *PD_ARGS, *extra)  # fmt: skip


def test_router_never_pairs_a_prefill_and_a_decode_with_different_weights(tmp_path, default_model_path):
    # one name ("tiny"), two checkpoints: a/ and its copy c/ hold the same weights, b/ other ones
    good = make_tiny_model(tmp_path / "a" / "tiny", "llama", seed=0)
    other = make_tiny_model(tmp_path / "b" / "tiny", "llama", seed=1)
    same = shutil.copytree(good, tmp_path / "c" / "tiny")
    bootstrap = free_port()
    prefill = _server("prefill", good, default_model_path, "--disaggregation-bootstrap-port", str(bootstrap))
    wrong, right = (
        _server("decode", other, default_model_path),
        _server("decode", str(same), default_model_path),
    )
    servers = [prefill, wrong, right]
    routers = []
    try:
        start_all(servers)
        ids = [httpx.get(s.url + "/server_info", timeout=10).json()["pd_identity"] for s in servers]
        assert ids[0] == ids[2] and ids[0]["model_fingerprint"] != ids[1]["model_fingerprint"]
        assert ids[0]["model_name"] == ids[1]["model_name"] == "tiny"

        legs = ["--pd-disaggregation", "--prefill", prefill.url, str(bootstrap), "--decode", wrong.url, "--decode", right.url,
                "--decode-policy", "round_robin"]  # fmt: skip
        routers.append(router(legs).start(timeout=60))
        body = {"input_ids": [1, 2, 3, 4, 5], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        for _ in range(6):  # round robin would send every other one to the wrong decode
            r = httpx.post(routers[0].url + "/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
        assert metric_value(httpx.get(wrong.url + "/metrics").text, "disagg_requests_total") == 0
        assert metric_value(httpx.get(right.url + "/metrics").text, "disagg_requests_total") == 6
        text = httpx.get(routers[0].url + "/metrics").text
        assert metric_value(text, "disagg_router_incompatible_pairs") == 1

        only_wrong = ["--pd-disaggregation", "--prefill", prefill.url, str(bootstrap), "--decode", wrong.url]
        routers.append(router(only_wrong).start(timeout=60))
        start = time.monotonic()
        r = httpx.post(routers[1].url + "/generate", json=body, timeout=60)
        assert r.status_code == 503 and "compatible" in r.json()["error"]["message"], r.text
        assert time.monotonic() - start < 2  # refused up front: no room waits for a transfer timeout
    finally:
        for p in routers:
            p.stop()
        for s in servers:
            s.stop()
