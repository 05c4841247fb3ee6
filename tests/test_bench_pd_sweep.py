"""`python -m disagg.common.bench.pd_sweep --device cpu`: both deployments start, serve the sweep, and stop;
the JSON, the table and the plot are written, and no server is left running."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from disagg.common.bench.pd_sweep import live_groups, ttft_parts

pytestmark = pytest.mark.slow


def test_pd_sweep_measures_both_deployments(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    # one colocated replica: each deployment's start-up (servers loading the model) is most of the run
    cmd = [sys.executable, "-m", "disagg.common.bench.pd_sweep", "--device", "cpu", "--out-dir", str(out),
           "--colocated-replicas", "1", "--request-rates", "4", "--num-prompts", "2", "--input-len", "24",
           "--output-len", "4", "--ttft-probes", "2", "--warmup-requests", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "pd_sweep.json").read_text())
    assert set(report["deployments"]) == {"pd", "colocated"}
    for rec in report["deployments"].values():
        assert "error" not in rec
        assert rec["ttft_probe"]["completed"] == 2 and rec["ttft_probe"]["ttft_ms"]["p50"] > 0
        (point,) = rec["rates"]
        assert point["request_rate"] == 4 and point["completed"] == 2 and point["failed"] == 0
        # exactly the asked prompt length reached the server (token ids, not re-tokenized text)
        assert all(r["prompt_len"] == 24 and r["output_len"] == 4 for r in point["requests"])
        assert 0.0 <= point["goodput_share"] <= 1.0 and point["itl_ms"]["p50"] > 0
    # PD's hand-off of that rate's two requests, from the servers' /metrics (colocated has none)
    handoff = report["deployments"]["pd"]["rates"][0]["handoff"]
    assert handoff["decode total"]["n"] == 2 and handoff["prefill total"]["n"] == 2, handoff
    assert 0 < handoff["decode total"]["mean_ms"] <= handoff["decode total"]["p90_le_ms"]
    assert "handoff" not in report["deployments"]["colocated"]["rates"][0]
    # each deployment's time to first token by stage, the rate's two requests in every one of its stages
    stages = {"pd": ("prefill tokenize", "prefill receive", "prefill bootstrap_queue", "prefill forward",
                     "prefill wait_queue", "decode tokenize", "decode receive", "decode prealloc_queue",
                     "decode transfer_queue", "decode ttft"),
              "colocated": ("server tokenize", "server receive", "server forward", "server wait_queue",
                            "server ttft")}  # fmt: skip
    for name, keys in stages.items():
        got = report["deployments"][name]["rates"][0]["stages"]
        assert all(got[k]["n"] == 2 for k in keys), (name, got)
        # the server's TTFT holds its forward (and its queue): a stage is part of it, not all of it
        ttft, forward = got[keys[-1]]["mean_ms"], got[f"{keys[0].split()[0]} forward"]["mean_ms"]
        assert 0 < forward < ttft, (name, got)
        # the plot's parts of it: tokenized and queued, the prefill's forward, the rest: the server's TTFT
        parts = ttft_parts(report["deployments"][name]["rates"][0])
        assert parts[1] == forward and abs(sum(parts) - ttft) < 1e-6, (name, parts, ttft)
    # every server's /metrics sampled while the rate ran: peak KV use, running batch, queues
    for name, rec in report["deployments"].items():
        point = rec["rates"][0]
        servers = {"pd": {"prefill", "decode"}, "colocated": {"server0"}}[name]
        assert point["peak_samples"] >= 1 and set(point["peaks"]) == servers, point["peaks"]
        assert all(0.0 <= p["kv_usage"] <= 1.0 and "running" in p for p in point["peaks"].values())
    assert "queue prealloc" in report["deployments"]["pd"]["rates"][0]["peaks"]["decode"]
    assert report["ttft_pd_over_colocated_p50"] > 0
    assert (out / "pd_sweep.png").stat().st_size > 0
    assert "| TTFT p50 (ms) |" in (out / "pd_sweep.md").read_text()
    assert "| hand-off: decode, done to its scheduler (ms) |" in (out / "pd_sweep.md").read_text()
    assert "| ... scheduled to first token sampled (forward) |" in (out / "pd_sweep.md").read_text()
    assert "| TTFT p50 (ms) |" in proc.stdout
    for name in ("pd-prefill", "pd-decode", "pd-router", "colocated-server0", "colocated-router"):
        assert (out / "logs" / f"{name}.log").exists()
    # every process group the sweep started (servers with their scheduler children, routers) is gone
    groups = {p["pid"] for rec in report["deployments"].values() for p in rec["processes"].values()}
    assert len(groups) == 5 and not groups & live_groups()


def test_an_sm_split_runs_the_pd_servers_under_the_sweeps_own_mps_daemon(tmp_path):
    from disagg.common.bench.pd_sweep import parse_args, pd_children

    args = parse_args(["--out-dir", str(tmp_path), "--gpus", "0", "--decode-sm-percent", "40"])
    assert args.mps  # an SM share means MPS
    prefill, decode, router = pd_children(args)
    pipe = str(tmp_path.resolve() / "mps" / "pipe")
    assert prefill.env["CUDA_MPS_PIPE_DIRECTORY"] == decode.env["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert decode.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in prefill.env
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == decode.env["CUDA_VISIBLE_DEVICES"] == "0"
    with pytest.raises(SystemExit):  # MPS is NVIDIA's: refused on the CPU before anything starts
        parse_args(["--out-dir", str(tmp_path), "--device", "cpu", "--mps"])


def test_a_below_normal_prefill_is_an_mps_client_of_lower_priority(tmp_path):
    """--prefill-below-normal: the prefill's kernels yield to the decode's under the sweep's MPS
    daemon (CUDA_MPS_CLIENT_PRIORITY=1 for the prefill only), with no SM share for either."""
    from disagg.common.bench.pd_sweep import parse_args, pd_children

    args = parse_args(["--out-dir", str(tmp_path), "--gpus", "0", "--prefill-below-normal"])
    assert args.mps
    prefill, decode, _ = pd_children(args)
    assert prefill.env["CUDA_MPS_CLIENT_PRIORITY"] == "1" and "CUDA_MPS_CLIENT_PRIORITY" not in decode.env
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in prefill.env | decode.env
    with pytest.raises(SystemExit):
        parse_args(["--out-dir", str(tmp_path), "--device", "cpu", "--prefill-below-normal"])


def test_ttft_parts_make_up_the_ttft_when_the_decode_heard_of_the_request_late():
    """The plot's TTFT bar is the server TTFT in three parts. In PD that TTFT is the decode's (from when
    the decode received the request), and the prefill's queued stages can add up past it when the
    router's copy reached the decode a few ms after the prefill's (a CI run: 145.0 against 141.8 ms):
    the queued part is then cut, the forward kept, and the bar still ends at the TTFT."""

    def rate(**stages):
        return {"stages": {k.replace("_", " ", 1): {"mean_ms": v} for k, v in stages.items()}}

    late = rate(prefill_tokenize=1.0, prefill_receive=20.0, prefill_wait_queue=6.1, prefill_forward=117.9,
                decode_ttft=141.8)  # fmt: skip
    parts = ttft_parts(late)
    assert parts[1] == 117.9 and abs(sum(parts) - 141.8) < 1e-9 and parts[2] == 0.0
    assert abs(parts[0] - (141.8 - 117.9)) < 1e-9
    on_time = rate(server_tokenize=1.0, server_wait_queue=2.0, server_forward=30.0, server_ttft=40.0)
    assert ttft_parts(on_time) == [3.0, 30.0, 7.0]
