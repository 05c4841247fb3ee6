"""PD against colocated on the same GPUs: the serving benchmark at several Poisson rates, and TTFT alone.

    source common/bench/gpu_env.sh
    python3 -m disagg.common.bench.pd_sweep --out-dir /tmp/sweep --model-path Llama-3.1-8B --load-format dummy \\
        --request-rates 2,4,8,12 --num-prompts 48 --input-len 2048 --output-len 256
    python -m disagg.common.bench.pd_sweep --device cpu --out-dir /tmp/sweep   # tiny lengths and rates

Two deployments, one after the other (they share the GPUs):
- `pd`: our router (`--pd-disaggregation`) in front of `launch_prefill` on GPU 0 and `launch_decode`
  on GPU 1; KV moves over UCX between the GPUs.
- `colocated`: two `launch_server` replicas (GPU 0 and GPU 1) behind our router in regular mode.
For each: a warm-up, the TTFT probe (sequential single requests of --input-len tokens, 2 output
tokens, on the idle deployment), then `disagg.common.bench.serving` at every --request-rates. Prompts are
random token ids sent as `prompt` of /v1/completions, so exactly --input-len tokens reach the server
whatever its tokenizer; both deployments get the same prompts. Writes into --out-dir: `pd_sweep.json`
(after every rate, so a cut-off run keeps what it measured), `pd_sweep.md` (also printed),
`pd_sweep.png` (goodput against rate) and `logs/<deployment>-<process>.log`. `--report-only` redoes
the table and plot from the JSON of a run that was cut off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from disagg.common.bench import serving
from disagg.common.config import env_cpu_threads
from disagg.common.net import free_port
from disagg.common.server.mps import MpsDaemon

DEPLOYMENTS = ("pd", "colocated")
# serving's goodput limits: TTFT and E2E per request, ITL and TPOT as the request's mean
SLO_NAMES = {"ttft": "TTFT", "itl": "mean ITL", "tpot": "TPOT", "e2e": "E2E"}
# per --device: what an unset flag means (cpu: the default model, a run of a few seconds per rate)
PRESETS = {
    "cuda": {"request_rates": "2,4,8,12", "num_prompts": "48", "input_len": 2048, "output_len": 256,
             "ttft_probes": 10, "server_args": "", "ready_timeout": 600.0, "request_timeout": 180.0, "goodput": ["ttft:1000", "itl:50"]},
    "cpu": {"request_rates": "1,2", "num_prompts": "3", "input_len": 48, "output_len": 6, "ttft_probes": 3,
            "server_args": "--max-total-tokens 4096 --context-length 512", "ready_timeout": 180.0,
            "request_timeout": 60.0, "goodput": ["ttft:2000", "itl:500"]},
}  # fmt: skip


@dataclass(frozen=True)
class SweepOptions:
    """One sweep, from the command line (`parse_args`): the --device preset fills what was not given."""

    out_dir: Path
    device: str  # cuda | cpu
    deployments: tuple[str, ...]  # run in this order
    request_rates: tuple[float, ...]  # req/s, Poisson arrivals
    num_prompts: tuple[int, ...]  # requests at each rate
    input_len: int
    output_len: int
    goodput: tuple[str, ...]  # serving's --goodput SLOs, e.g. ("ttft:1000", "itl:50")
    ttft_probes: int
    warmup_requests: int
    ready_timeout: float  # s, for a deployment to start
    request_timeout: float  # s, per request
    server_args: str  # extra flags for every server
    model_path: str | None = None
    load_format: str | None = None
    tokenizer: str | None = None
    pd_server_args: str = ""
    gpus: tuple[str, ...] = ("0", "1")
    mps: bool = False
    prefill_sm_percent: int | None = None
    decode_sm_percent: int | None = None
    prefill_below_normal: bool = False  # the PD prefill an MPS client of below-normal priority
    colocated_replicas: int = 2
    router_policy: str = "round_robin"
    max_total_s: float = float("inf")
    log_level: str = "warning"
    seed: int = 0
    report_only: bool = False

    def tokenizer_path(self) -> str:
        """Where prompt token ids come from. NOTE: a preset (e.g. Llama-3.1-8B with dummy weights) has
        no tokenizer; its server borrows the default model's, and so does the sweep."""
        from disagg.common.models.model_files import resolve_model_path
        from disagg.common.models.weights import PRESETS as MODEL_PRESETS

        if self.tokenizer:
            return self.tokenizer
        return resolve_model_path(None if self.model_path in MODEL_PRESETS else self.model_path)

    def as_record(self) -> dict:
        """The options as the report's `config` (goodput as its limits in ms)."""
        limits = {k: v * 1000 for k, v in serving.parse_goodput(list(self.goodput)).items()}
        return dataclasses.asdict(self) | {"out_dir": str(self.out_dir), "goodput": limits}


def _die_with_us() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_url: str  # 200 once it serves
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# ---- deployments -------------------------------------------------------------------------------------


def server_flags(opts: SweepOptions) -> list[str]:
    model = ["--model-path", opts.model_path] if opts.model_path else []
    load = ["--load-format", opts.load_format] if opts.load_format else []
    return [*model, *load, "--device", opts.device, "--host", "127.0.0.1", "--log-level", opts.log_level,
            *shlex.split(opts.server_args)]  # fmt: skip


def gpu_env(
    opts: SweepOptions, index: int, sm_percent: int | None = None, below_normal: bool = False
) -> dict[str, str]:
    """A server's environment: its GPU, and under --mps the daemon's pipe, its SM share and its
    client priority (below normal: the other clients' kernels are scheduled first, as a low stream
    priority within a process, while it may still fill every SM the others leave)."""
    if opts.device == "cpu":
        return env_cpu_threads(1)  # NOTE: several servers share the cores
    env = {"CUDA_VISIBLE_DEVICES": opts.gpus[index % len(opts.gpus)]}
    if opts.mps:
        env |= mps_daemon(opts).client_env(sm_percent)
        if below_normal:
            env["CUDA_MPS_CLIENT_PRIORITY"] = "1"  # 0 normal (the default), 1 below normal
    return env


def mps_daemon(opts: SweepOptions) -> MpsDaemon:
    """The sweep's own MPS daemon (started around the runs under --mps)."""
    return MpsDaemon(Path(opts.out_dir) / "mps")


def router_child(opts: SweepOptions, legs: list[str]) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "disagg.router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", opts.router_policy, "--log-level", opts.log_level, *legs]  # fmt: skip
    return Child("router", argv, f"http://127.0.0.1:{port}/readiness", {"CUDA_VISIBLE_DEVICES": ""})


def pd_children(opts: SweepOptions) -> list[Child]:
    py, flags = sys.executable, server_flags(opts)
    p_port, d_port, bootstrap = free_port(), free_port(), free_port()
    prefill = [py, "-m", "disagg.prefill.launch", "--port", str(p_port), "--disaggregation-bootstrap-port",
               str(bootstrap), *flags, *shlex.split(opts.pd_server_args)]  # fmt: skip
    decode = [
        py,
        "-m",
        "disagg.decode.launch",
        "--port",
        str(d_port),
        *flags,
        *shlex.split(opts.pd_server_args),
    ]
    p_url, d_url = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
    legs = ["--pd-disaggregation", "--prefill", p_url, str(bootstrap), "--decode", d_url]
    p_env = gpu_env(opts, 0, opts.prefill_sm_percent, opts.prefill_below_normal)
    return [Child("prefill", prefill, p_url + "/health", p_env),
            Child("decode", decode, d_url + "/health", gpu_env(opts, 1, opts.decode_sm_percent)),
            router_child(opts, legs)]  # fmt: skip


def colocated_children(opts: SweepOptions) -> list[Child]:
    children = []
    for i in range(opts.colocated_replicas):
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "disagg.common.server.launch_server",
            "--port",
            str(port),
            *server_flags(opts),
        ]
        children.append(Child(f"server{i}", argv, f"http://127.0.0.1:{port}/health", gpu_env(opts, i)))
    urls = [c.ready_url.removesuffix("/health") for c in children]
    return [*children, router_child(opts, ["--worker-urls", *urls])]


BUILDERS = {"pd": pd_children, "colocated": colocated_children}


class Deployment:
    """The processes of one deployment: `with Deployment(...) as d: d.url`; every process group dies at exit."""

    def __init__(self, name: str, children: list[Child], log_dir: Path, ready_timeout: float):
        self.name, self.children, self.ready_timeout = name, children, ready_timeout
        for c in children:
            c.log = log_dir / f"{name}-{c.name}.log"
        self.url = children[-1].ready_url.removesuffix("/readiness")  # the router, started last

    def __enter__(self) -> Deployment:
        try:
            servers, router = self.children[:-1], self.children[-1]
            for c in servers:
                self._spawn(c)
            self._wait_ready(servers)
            self._spawn(router)
            self._wait_ready([router])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, c: Child) -> None:
        print(f"[{self.name}] starting {c.name}: {shlex.join(c.argv)}  (log {c.log})", flush=True)
        with open(c.log, "w") as log:
            c.proc = subprocess.Popen(c.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **c.env},
                                      start_new_session=True, preexec_fn=_die_with_us)  # fmt: skip

    def _wait_ready(self, waiting: list[Child]) -> None:
        start = time.monotonic()
        pending = list(waiting)
        while pending:
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None:
                    raise RuntimeError(f"[{self.name}] {c.name} exited with code {c.proc.returncode} during "
                                       f"start-up; its log {c.log} ends:\n{c.log_tail()}")  # fmt: skip
            if time.monotonic() - start > self.ready_timeout:
                c = pending[0]
                raise RuntimeError(f"[{self.name}] {c.name} not ready after {self.ready_timeout:.0f}s "
                                   f"({c.ready_url}); its log {c.log} ends:\n{c.log_tail()}")  # fmt: skip
            try:
                if httpx.get(pending[0].ready_url, timeout=5).status_code == 200:
                    print(
                        f"[{self.name}] {pending[0].name} ready after {time.monotonic() - start:.1f}s",
                        flush=True,
                    )
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to every process group (the servers' own children included), SIGKILL after 15 s."""
        started = [c for c in self.children if c.proc is not None]
        for c in started:
            signal_group(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for c in started:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            signal_group(c.proc.pid, signal.SIGKILL)  # NOTE: also the group's stragglers (scheduler, ranks)
            c.proc.wait()
        # NOTE: the next deployment takes the same GPUs: wait until their memory holders are gone
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and live_groups() & {c.proc.pid for c in started}:
            time.sleep(0.2)


def live_groups() -> set[int]:
    """Process group ids of every running (not zombie) process, from /proc."""
    groups = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            groups.add(int(fields[2]))
    return groups


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- measurements ------------------------------------------------------------------------------------


def token_prompts(tokenizer, n: int, input_len: int, output_len: int, seed: int) -> list[tuple]:
    """(token ids, prompt tokens, output tokens) per request: random non-special ids, exactly input_len."""
    rng, special = random.Random(seed), set(tokenizer.all_special_ids)
    vocab = [t for t in range(tokenizer.vocab_size) if t not in special]
    return [([rng.choice(vocab) for _ in range(input_len)], input_len, output_len) for _ in range(n)]


def bench_args(opts: SweepOptions, url: str, rate: float, n: int, output_len: int, concurrency: int = 0):
    """The serving benchmark's own CLI namespace for one run (its defaults, our lengths and limits)."""
    argv = ["--base-url", url, "--num-prompts", str(n), "--request-rate", str(rate), "--input-len",
            str(opts.input_len), "--output-len", str(output_len), "--warmup-requests", "0", "--timeout",
            str(opts.request_timeout), "--seed", str(opts.seed), "--goodput", *opts.goodput]  # fmt: skip
    return serving.parse_args(argv + (["--max-concurrency", str(concurrency)] if concurrency else []))


def run_bench(bargs, prompts: list[tuple], limits: dict[str, float], deadline: float) -> dict:
    """serving.run on these prompts, cut off (TimeoutError) at `deadline` (time.monotonic())."""
    timeout = None if deadline == float("inf") else max(1.0, deadline - time.monotonic())
    results, duration = asyncio.run(asyncio.wait_for(serving.run(bargs, prompts), timeout))
    summary = serving.summarize(results, duration, limits)
    # NOTE: serving's goodput is good requests per second; the figure is their share of all sent
    good = sum(serving.is_good(r, limits) for r in results)
    summary["goodput_share"] = good / len(results) if results else 0.0
    summary["requests"] = [{"ok": r.ok, "ttft_ms": r.ttft * 1000, "e2e_ms": r.e2e * 1000, "prompt_len": r.prompt_len,
                            "output_len": r.output_len, "mean_itl_ms": 1000 * sum(r.itls) / max(1, len(r.itls)),
                            "error": r.error} for r in results]  # fmt: skip
    return summary


def rate_line(rate: float, n: int, s: dict) -> str:
    return (f"  rate {rate:g}/s: {s['completed']}/{n} ok, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, ITL p50 "
            f"{s['itl_ms']['p50']:.1f} ms, goodput {s.get('goodput', 0):.2f} req/s ({100 * s['goodput_share']:.0f}%)")  # fmt: skip


class Sweep:
    """One run: each deployment in turn started, measured and stopped. `report` fills as it goes and
    is saved after every measurement, so a run cut off (--max-total-s, SIGTERM) keeps what it measured."""

    def __init__(self, opts: SweepOptions, tokenizer, deadline: float):
        self.opts, self.tokenizer, self.deadline = opts, tokenizer, deadline  # deadline: time.monotonic()
        self.report: dict = {"config": opts.as_record(), "deployments": {}}

    def save(self) -> None:
        (self.opts.out_dir / "pd_sweep.json").write_text(json.dumps(self.report, indent=1))

    def run(self) -> None:
        try:
            for k, name in enumerate(self.opts.deployments):
                # NOTE: each deployment gets an equal share of what is left of --max-total-s, start-up included
                left = len(self.opts.deployments) - k
                self.run_deployment(name, time.monotonic() + (self.deadline - time.monotonic()) / left)
        except KeyboardInterrupt:
            self.report["interrupted"] = True
            print("interrupted: writing what was measured", file=sys.stderr, flush=True)

    def run_deployment(self, name: str, deadline: float) -> None:
        """Start `name`, measure it until `deadline`, stop it; a failure is recorded, not raised."""
        record = self.report["deployments"][name] = {"rates": []}
        print(f"\n== {name} ==", flush=True)
        t0 = time.monotonic()
        try:
            children = BUILDERS[name](self.opts)
            with Deployment(name, children, self.opts.out_dir / "logs", self.opts.ready_timeout) as dep:
                record["start_s"] = time.monotonic() - t0
                record["processes"] = {c.name: {"pid": c.proc.pid, "argv": c.argv, "log": str(c.log)}
                                       for c in dep.children}  # fmt: skip
                record["ttft_probe"] = self.probe_ttft(dep.url, deadline)
                self.save()
                servers = {c.name: c.ready_url.removesuffix("/health") for c in dep.children[:-1]}
                self.measure_rates(dep.url, record, deadline, servers, pd=name == "pd")
        except RuntimeError as e:
            record["error"] = str(e)
            print(f"[{name}] failed: {e}", file=sys.stderr, flush=True)
        record["total_s"] = time.monotonic() - t0
        self.save()

    def probe_ttft(self, url: str, deadline: float) -> dict:
        """Warm the deployment up, then time sequential single requests (2 output tokens) on it idle."""
        opts, tokenizer = self.opts, self.tokenizer
        warm = token_prompts(tokenizer, opts.warmup_requests, opts.input_len, 8, opts.seed + 7)
        probes = token_prompts(tokenizer, opts.ttft_probes, opts.input_len, 2, opts.seed + 11)
        try:
            warm_sum = run_bench(bench_args(opts, url, float("inf"), len(warm), 8, 1), warm, {}, deadline)
            if warm_sum["failed"]:
                raise RuntimeError(f"warm-up failed: {warm_sum['first_errors'][0]}")
            probe = run_bench(bench_args(opts, url, float("inf"), len(probes), 2, 1), probes, {}, deadline)
        except TimeoutError:
            raise RuntimeError(
                "--max-total-s: this deployment's share ran out during the warm-up or TTFT probe"
            ) from None
        print(
            f"  TTFT probe: p50 {probe['ttft_ms']['p50']:.1f} ms, p90 {probe['ttft_ms']['p90']:.1f} ms",
            flush=True,
        )
        return {k: probe[k] for k in ("completed", "failed", "ttft_ms")} | {"output_len": 2}

    def measure_rates(
        self, url: str, record: dict, deadline: float, servers: dict[str, str], pd: bool
    ) -> None:
        """The serving benchmark at every --request-rates until `deadline`; the rest are recorded as skipped.
        Each rate: every server's peak queues and KV use (its /metrics, sampled while the rate runs), and
        from every server's /metrics before and after it, the requests' time to first token by stage (and
        each server's own TTFT); PD: the KV hand-off by step too."""
        urls = list(servers.values())
        opts, limits = self.opts, serving.parse_goodput(list(self.opts.goodput))
        for i, (rate, n) in enumerate(zip(opts.request_rates, opts.num_prompts, strict=True)):
            prompts = token_prompts(
                self.tokenizer, n, opts.input_len, opts.output_len, opts.seed + 100 * (i + 1)
            )
            try:
                if time.monotonic() >= deadline:
                    raise TimeoutError
                before = server_histograms(urls)
                with GaugePeaks(servers) as peaks:
                    s = run_bench(bench_args(opts, url, rate, n, opts.output_len), prompts, limits, deadline)
                s["peaks"], s["peak_samples"] = peaks.result(), peaks.samples
            except TimeoutError:
                record["skipped_rates"] = list(opts.request_rates[i:])
                print(f"  --max-total-s: this deployment's share ran out; rates {record['skipped_rates']} "
                      "not measured (or cut off)", flush=True)  # fmt: skip
                return
            time.sleep(STATS_LAG_S)
            added = handoff_steps(before, server_histograms(urls))
            s["stages"] = {k: v for k, v in added.items() if k.split()[1] in STAGE_KEYS}
            if pd:
                s["handoff"] = {k: v for k, v in added.items() if k.split()[1] not in STAGE_KEYS}
            record["rates"].append({"request_rate": rate, "num_prompts": n, **s})
            print(rate_line(rate, n, s), flush=True)
            print("    peaks: " + "; ".join(f"{name} " + ", ".join(f"{k} {v:g}" for k, v in p.items())
                                          for name, p in s["peaks"].items()), flush=True)  # fmt: skip
            for what, key in (("hand-off", "handoff"), ("first token by stage", "stages")):
                if s.get(key):
                    print(f"    {what} (mean / p90 bucket, ms): " + ", ".join(
                        f"{k} {v['mean_ms']:.2f}/{v['p90_le_ms']:g}" for k, v in s[key].items()), flush=True)  # fmt: skip
            self.save()


class GaugePeaks:
    """While a rate runs: each server's /metrics every PERIOD_S on a thread, keeping the peak of its
    KV use, running batch and each queue stage (`with GaugePeaks(servers) as p: ...; p.result()`),
    so a rate's latency can be told apart from a full pool or a queue (e.g. a decode's prealloc)."""

    PERIOD_S = 0.25

    def __init__(self, servers: dict[str, str]):
        self.servers, self.peaks = servers, {name: {} for name in servers}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GaugePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        with httpx.Client(timeout=5) as client:
            while True:
                for name, url in self.servers.items():
                    try:
                        text = client.get(url + "/metrics").text
                    except httpx.HTTPError:
                        continue
                    peak = self.peaks[name]
                    for family in text_string_to_metric_families(text):
                        for sample in family.samples:
                            key = PEAK_GAUGES.get(sample.name)
                            if key is None:
                                continue
                            if "stage" in sample.labels:
                                key = f"queue {sample.labels['stage']}"
                            peak[key] = max(peak.get(key, 0.0), sample.value)
                self.samples += 1
                if self._stop.wait(self.PERIOD_S):
                    return

    def result(self) -> dict:
        return {name: dict(sorted(p.items())) for name, p in self.peaks.items()}


PEAK_GAUGES = {"disagg_kv_usage_ratio": "kv_usage", "disagg_num_running_requests": "running",
               "disagg_queue_requests": "queue"}  # fmt: skip
STATS_LAG_S = 2.0  # a server's /metrics shows its scheduler's transfer series as of its last stats report
# the histograms read from each server's /metrics: family -> the label naming its series (else the key)
HISTOGRAMS = {"disagg_kv_transfer_duration_seconds": "total", "disagg_kv_transfer_step_seconds": "step",
              "disagg_per_stage_req_latency_seconds": "stage", "disagg_time_to_first_token_seconds": "ttft"}  # fmt: skip
# the series of a request's way to its first token (common/engine/request_stages.py; "ttft": the
# server's own, from its HTTP front end's arrival to the first token out)
STAGE_KEYS = (
    "tokenize",
    "receive",
    "bootstrap_queue",
    "prealloc_queue",
    "wait_queue",
    "forward",
    "transfer_queue",
    "ttft",
)


def server_histograms(urls: list[str]) -> dict[str, dict]:
    """The hand-off, request-stage and TTFT histograms on these servers' /metrics, as {"role name":
    {"sum", "count", "buckets": {le: cumulative count}}} (name: the step or stage; the transfer's
    duration is "total", the server's TTFT "ttft")."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {}
    for url in urls:
        try:
            text = httpx.get(url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            name = HISTOGRAMS.get(family.name)
            if name is None:
                continue
            for sample in family.samples:
                labels = sample.labels
                key = f"{labels.get('role', '?')} {labels.get(name, name)}"
                h = out.setdefault(key, {"sum": 0.0, "count": 0.0, "buckets": {}})
                if sample.name.endswith("_sum"):
                    h["sum"] += sample.value
                elif sample.name.endswith("_count"):
                    h["count"] += sample.value
                elif sample.name.endswith("_bucket"):
                    le = float(labels["le"])
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + sample.value
    return out


def handoff_steps(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """What the rooms of one rate added to each hand-off histogram: their count, mean (ms) and the
    upper bound of the bucket that holds their 90th percentile (ms)."""
    steps = {}
    for key, h in sorted(after.items()):
        b = before.get(key, {"sum": 0.0, "count": 0.0, "buckets": {}})
        n = h["count"] - b["count"]
        if n <= 0:
            continue
        p90 = next((le for le, c in sorted(h["buckets"].items()) if c - b["buckets"].get(le, 0.0) >= 0.9 * n),
                   float("inf"))  # fmt: skip
        steps[key] = {"n": int(n), "mean_ms": 1000 * (h["sum"] - b["sum"]) / n, "p90_le_ms": 1000 * p90}
    return steps


# ---- report ------------------------------------------------------------------------------------------

ROWS = [("completed / sent", lambda s: f"{s['completed']} / {s['num_prompts']}")]
ROWS += [(f"{name} {p} (ms)", lambda s, k=key, p=p: f"{s[k][p]:.1f}")
         for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms")) for p in ("p50", "p90", "p99")]  # fmt: skip
ROWS += [
    ("output throughput (tok/s)", lambda s: f"{s['output_throughput']:.1f}"),
    ("request throughput (req/s)", lambda s: f"{s['request_throughput']:.2f}"),
    ("goodput (req/s)", lambda s: f"{s.get('goodput', 0.0):.2f}"),
    ("goodput share", lambda s: f"{100 * s['goodput_share']:.1f}%"),
]
# PD: the KV hand-off of the rate's requests (mean ms), from the servers' /metrics
HANDOFF_ROWS = [("hand-off: prefill, chunk posted to done (ms)", "prefill total"),
                ("hand-off: prefill, waiting for its forward (ms)", "prefill wait_ready"),
                ("hand-off: copy into the decode's pages (ms; CUDA: its GPU time)", "prefill copy"),
                ("hand-off: decode, done to its scheduler (ms)", "decode to_scheduler"),
                ("hand-off: decode, done to first token out (ms)", "decode first_token")]  # fmt: skip
ROWS += [(name, lambda s, k=key: f"{s['handoff'][k]['mean_ms']:.2f}" if k in s.get("handoff", {}) else "–")
         for name, key in HANDOFF_ROWS]  # fmt: skip
# every deployment: where the requests' time to first token went (mean ms), from the servers' /metrics
STAGE_ROWS = [("first token: the server's TTFT (its HTTP arrival to first token out)", ("server ttft", "decode ttft")),
              ("... parsed and tokenized by its front end (tokenize)", ("server tokenize", "prefill tokenize")),
              ("... sent by its front end until its scheduler took it (receive)", ("server receive", "prefill receive")),
              ("... prefill: held until the decode asked (bootstrap_queue)", ("prefill bootstrap_queue",)),
              ("... queued until scheduled (wait_queue)", ("server wait_queue", "prefill wait_queue")),
              ("... scheduled to first token sampled (forward)", ("server forward", "prefill forward")),
              ("... decode: parsed and tokenized by its front end (tokenize)", ("decode tokenize",)),
              ("... decode: sent by its front end until its scheduler took it (receive)", ("decode receive",)),
              ("... decode: pages reserved (prealloc_queue)", ("decode prealloc_queue",)),
              ("... decode: pages reserved to KV and first token in (transfer_queue)", ("decode transfer_queue",))]  # fmt: skip


def _stage_cell(s: dict, keys: tuple[str, ...]) -> str:
    found = [s["stages"][k]["mean_ms"] for k in keys if k in s.get("stages", {})]
    return f"{found[0]:.2f}" if found else "–"


ROWS += [(name, lambda s, k=keys: _stage_cell(s, k)) for name, keys in STAGE_ROWS]


def markdown(report: dict) -> str:
    cols = [(d, s) for d, rec in report["deployments"].items() for s in rec["rates"]]
    limits = " and ".join(f"{SLO_NAMES[k]} <= {v:g} ms" for k, v in report["config"]["goodput"].items())
    lines = [f"Serving sweep ({report['config']['input_len']}-token prompts, {report['config']['output_len']}-token "
             f"outputs, Poisson arrivals; goodput: requests with {limits})", ""]  # fmt: skip
    if cols:
        lines += ["| metric | " + " | ".join(f"{d} @ {s['request_rate']:g}/s" for d, s in cols) + " |",
                  "| --- |" + " ---: |" * len(cols)]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(cell(s) for _, s in cols) + " |" for name, cell in ROWS]
    lines += ["", f"TTFT alone ({report['config']['input_len']}-token prompt, 2 output tokens, sequential):", "",
              "| deployment | n | p50 (ms) | p90 (ms) | mean (ms) |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for d, rec in report["deployments"].items():
        if "ttft_probe" in rec:
            p = rec["ttft_probe"]
            lines.append(f"| {d} | {p['completed']} | {p['ttft_ms']['p50']:.1f} | {p['ttft_ms']['p90']:.1f} | "
                         f"{p['ttft_ms']['mean']:.1f} |")  # fmt: skip
    if "ttft_pd_over_colocated_p50" in report:
        lines.append(f"\nPD / colocated TTFT (p50): {report['ttft_pd_over_colocated_p50']:.3f}")
    for d, rec in report["deployments"].items():
        if rec.get("skipped_rates"):
            lines.append(f"\n{d}: rates {rec['skipped_rates']} not measured (--max-total-s)")
        if rec.get("error"):
            lines.append(f"\n**{d} failed**: {rec['error'].splitlines()[0]}")
    return "\n".join(lines)


TTFT_PARTS = ("tokenized and queued", "prefill forward", "hand-off and way out")


def ttft_parts(s: dict) -> list[float] | None:
    """A rate's mean server TTFT (ms) in three parts, from its stages: tokenized and queued (parsed,
    tokenized, taken in, held, queued until scheduled), the prefill's forward, and the rest (PD: the
    hand-off, the decode's emission and the way to the HTTP front end; colocated: the way out). None
    without the stage series."""
    got = {k: v["mean_ms"] for k, v in s.get("stages", {}).items()}
    role = "prefill" if "prefill forward" in got else "server"
    ttft = got.get("decode ttft" if role == "prefill" else "server ttft")
    if ttft is None or f"{role} forward" not in got:
        return None
    queued = sum(
        got.get(f"{role} {k}", 0.0) for k in ("tokenize", "receive", "bootstrap_queue", "wait_queue")
    )
    forward = got[f"{role} forward"]
    # NOTE: PD's TTFT is the decode's, from when the decode received the request: the router sends it
    # to both servers, and the decode's copy can arrive ms after the prefill's, so the prefill's stages
    # may add up to more than that TTFT (3.3 ms over in one CI run). The bar stays the TTFT: the queued
    # part is cut to what the forward leaves of it
    queued = min(queued, max(0.0, ttft - forward))
    return [queued, forward, max(0.0, ttft - queued - forward)]


def _plot_ttft_parts(ax, report: dict) -> None:
    """Stacked bars: each deployment's server TTFT by part at each rate (side by side)."""
    deployments = list(report["deployments"].items())
    width = 0.8 / max(1, len(deployments))
    colors = ("tab:gray", "tab:blue", "tab:orange")
    for j, (d, rec) in enumerate(deployments):
        for i, s in enumerate(rec["rates"]):
            parts = ttft_parts(s)
            if parts is None:
                continue
            bottom = 0.0
            for k, (part, color) in enumerate(zip(parts, colors, strict=True)):
                label = TTFT_PARTS[k] if i == 0 and j == 0 else None
                ax.bar(i + (j - (len(deployments) - 1) / 2) * width, part, width, bottom=bottom, color=color,
                       edgecolor="black" if d == "pd" else "none", label=label)  # fmt: skip
                bottom += part
    rates = [s["request_rate"] for s in deployments[0][1]["rates"]] if deployments else []
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set(xlabel="request rate (req/s); bars: " + " | ".join(d for d, _ in deployments) + " (PD outlined)",
           ylabel="mean server TTFT (ms)", title="time to first token by part")  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_parts = any(ttft_parts(s) for rec in report["deployments"].values() for s in rec["rates"])
    fig, axes = plt.subplots(1, 3 + with_parts, figsize=(15 + 5 * with_parts, 4))
    share_ax, rate_ax, ttft_ax = axes[:3]
    if with_parts:
        _plot_ttft_parts(axes[3], report)
    for d, rec in report["deployments"].items():
        rates = [s["request_rate"] for s in rec["rates"]]
        share_ax.plot(rates, [100 * s["goodput_share"] for s in rec["rates"]], marker="o", label=d)
        rate_ax.plot(rates, [s.get("goodput", 0.0) for s in rec["rates"]], marker="o", label=d)
        line = ttft_ax.plot(rates, [s["ttft_ms"]["p50"] for s in rec["rates"]], marker="o", label=f"{d} p50")
        ttft_ax.plot(rates, [s["ttft_ms"]["p99"] for s in rec["rates"]], marker="x", linestyle="--",
                     color=line[0].get_color(), label=f"{d} p99")  # fmt: skip
    limits = ", ".join(f"{SLO_NAMES[k]} ≤ {v:g} ms" for k, v in report["config"]["goodput"].items())
    share_ax.set(xlabel="request rate (req/s)", ylabel="requests within SLO (%)", ylim=(0, 105),
                 title=f"goodput share ({limits})")  # fmt: skip
    rate_ax.set(xlabel="request rate (req/s)", ylabel="goodput (req/s)", title="goodput")
    rate_ax.set_ylim(bottom=0)
    ttft_ax.set(xlabel="request rate (req/s)", ylabel="TTFT (ms)", title="time to first token")
    ttft_ax.set_ylim(bottom=0)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out_dir: Path) -> None:
    pd_probe = report["deployments"].get("pd", {}).get("ttft_probe")
    co_probe = report["deployments"].get("colocated", {}).get("ttft_probe")
    if pd_probe and co_probe and co_probe["ttft_ms"]["p50"] > 0:
        report["ttft_pd_over_colocated_p50"] = pd_probe["ttft_ms"]["p50"] / co_probe["ttft_ms"]["p50"]
    (out_dir / "pd_sweep.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out_dir / "pd_sweep.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    try:
        plot(report, out_dir / "pd_sweep.png")
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)


# ---- entry point -------------------------------------------------------------------------------------


def _stop_on_sigterm(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run(opts: SweepOptions) -> int:
    from transformers import AutoTokenizer

    started = time.monotonic()
    (opts.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    # NOTE: the token ids only need to be valid for the server's tokenizer (a dummy preset borrows this one)
    sweep = Sweep(opts, AutoTokenizer.from_pretrained(opts.tokenizer_path()), started + opts.max_total_s)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with mps_daemon(opts) if opts.mps else contextlib.nullcontext():
        sweep.run()
    report = sweep.report
    report["total_s"] = time.monotonic() - started
    write_outputs(report, opts.out_dir)
    failed = report.get("interrupted") or any(rec.get("error") for rec in report["deployments"].values())
    return 1 if failed else 0


# what an option left out means, where it is the same on every --device
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SweepOptions)}


def add_deployment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deployments", default="pd,colocated", help="comma list of pd, colocated (run in order)")
    p.add_argument("--model-path", default=None, help="default: the embedded default model")
    p.add_argument("--load-format", default=None, help="e.g. dummy (random weights of a preset)")
    p.add_argument("--tokenizer", default=None, help="for prompt token ids (default: the server's)")
    p.add_argument("--server-args", default=None,
                   help='extra flags for every server, e.g. "--mem-fraction-static 0.8"')  # fmt: skip
    p.add_argument("--pd-server-args", default=DEFAULTS["pd_server_args"],
                   help="extra flags for the prefill and decode servers only")  # fmt: skip
    p.add_argument("--gpus", default=",".join(DEFAULTS["gpus"]),
                   help="PD: prefill on the first, decode on the second; colocated: one replica each")  # fmt: skip
    p.add_argument("--mps", action="store_true",
                   help="run the servers under an NVIDIA MPS daemon of the sweep's own (several servers on one GPU)")  # fmt: skip
    p.add_argument("--prefill-sm-percent", type=int, default=None, help="--mps: the PD prefill's SM share")
    p.add_argument("--decode-sm-percent", type=int, default=None, help="--mps: the PD decode's SM share")
    p.add_argument("--prefill-below-normal", action="store_true",
                   help="--mps: the PD prefill a below-normal priority client (CUDA_MPS_CLIENT_PRIORITY=1): the "
                        "decode's kernels go first, the prefill takes the SMs they leave")  # fmt: skip
    p.add_argument("--colocated-replicas", type=int, default=DEFAULTS["colocated_replicas"])
    p.add_argument("--router-policy", default=DEFAULTS["router_policy"])
    p.add_argument("--ready-timeout", type=float, default=None, help="seconds for a deployment to start")
    p.add_argument(
        "--log-level", default=DEFAULTS["log_level"], choices=["debug", "info", "warning", "error"]
    )


def add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-rates", default=None, help="comma list of req/s (Poisson), e.g. 2,4,8,12")
    p.add_argument("--num-prompts", default=None, help="requests per rate: one number, or one per rate")
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--goodput", nargs="*", default=None,
                   help="SLOs in ms (serving's --goodput; cuda default ttft:1000 itl:50)")  # fmt: skip
    p.add_argument("--ttft-probes", type=int, default=None, help="sequential single requests for TTFT alone")
    p.add_argument("--warmup-requests", type=int, default=None, help="default: 2 per server")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request")
    p.add_argument("--max-total-s", type=float, default=DEFAULTS["max_total_s"],
                   help="skip the rates left after this long")  # fmt: skip
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m disagg.common.bench.pd_sweep", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out-dir", required=True)
    p.add_argument("--report-only", action="store_true", help="redo the table and plot from --out-dir's JSON")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny default lengths/rates"
    )
    add_deployment_flags(p)
    add_load_flags(p)
    return p


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def options_from(ns: argparse.Namespace) -> SweepOptions:
    """A parsed command line as options: --device's preset for what was left out, the comma lists
    parsed and checked (ValueError names the flag)."""
    values = vars(ns) | {k: v for k, v in PRESETS[ns.device].items() if getattr(ns, k) is None}
    deployments = tuple(comma_list(ns.deployments))
    if not deployments or set(deployments) - set(DEPLOYMENTS):
        raise ValueError(f"--deployments takes a comma list of {', '.join(DEPLOYMENTS)}")
    rates = tuple(float(r) for r in comma_list(values["request_rates"]))
    counts = [int(n) for n in comma_list(values["num_prompts"])]
    if len(counts) not in (1, len(rates)) or min(counts) < 1:
        raise ValueError("--num-prompts takes one count >= 1, or one per --request-rates")
    mps = ns.mps or bool(ns.prefill_sm_percent or ns.decode_sm_percent or ns.prefill_below_normal)
    if mps and ns.device == "cpu":
        raise ValueError("--mps, --*-sm-percent and --prefill-below-normal need --device cuda")
    serving.parse_goodput(values["goodput"])  # a bad SLO fails now, not after the start-up
    warmup = 2 * max(1, ns.colocated_replicas) if ns.warmup_requests is None else ns.warmup_requests
    return SweepOptions(**values | {
        "out_dir": Path(ns.out_dir), "deployments": deployments, "request_rates": rates,
        "num_prompts": tuple(counts * len(rates) if len(counts) == 1 else counts), "gpus": tuple(comma_list(ns.gpus)),
        "mps": mps, "goodput": tuple(values["goodput"]), "warmup_requests": warmup,
    })  # fmt: skip


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = build_parser()
    try:
        return options_from(p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.report_only:  # e.g. after a run cut off before its end: the JSON has every finished rate
        write_outputs(json.loads((opts.out_dir / "pd_sweep.json").read_text()), opts.out_dir)
        sys.exit(0)
    sys.exit(run(opts))


if __name__ == "__main__":
    main()
