"""Engine configuration: one frozen dataclass, its argparse flags (SGLang names), env vars.

Entry points call `add_engine_args(parser)` and `EngineConfig.from_args(args)`; everything else
takes an `EngineConfig`. Environment variables live under the DISAGG_ prefix, parsed here only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

# ---- environment variables ----------------------------------------------------------------------
# Every variable the engine, the servers and transfer/ read is parsed below, nowhere else:
#   DISAGG_CPU_THREADS      torch threads of a CPU rank (default: this node's cores / its ranks)
#   DISAGG_FUSED_KERNELS    0: no fused element-wise kernels on CUDA (FlashInfer norms/SiLU/RoPE, the Triton
#                           RoPE + K/V write of fused_rope_kv.py; A/B runs)
#   DISAGG_CACHE_DIR        disagg's cache (default: $XDG_CACHE_HOME/disagg, else ~/.cache/disagg)
#   DISAGG_TRANSFER_TRACE   1: record when each KV transfer room passes each hop (transfer.bench --trace)
#   DISAGG_DP_REPLICA       "i/N": set by the --dp-size controller for replica i of N (its ranks inherit it)
#   DISAGG_FP8_GEMM         FP8 block-quantized checkpoints: auto (Triton FP8 GEMMs on Hopper, dequantized
#                           at load elsewhere) | torch (the block-scaled math in torch, any device) | off
#   DISAGG_MLA_PREFILL      MLA prefill/mixed batches on the FlashInfer MLA backend: auto (default: each batch
#                           in the form of fewer attention FLOPs) | absorbed (its MLA kernel) | expanded
#                           (its ragged prefill kernel) | torch (expanded form, torch SDPA); A/B runs
#   DISAGG_RAGGED_PREFILL   1 (default): a batch of fresh prompts (no cached prefix) attends on FlashInfer's ragged
#                           prefill kernel over the step's own K/V (Qwen3-30B-A3B's 2048-token prefill ~1 ms
#                           faster on an H100, docs/benchmarks.md) | 0: on its paged kernel over the pool (A/B runs)
#   DISAGG_MOE_COMBINE      the fused MoE's grouped path adds a token's k expert rows by: sum (a stored row a pair,
#                           then a summing launch) | atomic (the down GEMM's atomic adds, model dtype) | atomic_fp32;
#                           unset: the tuned config's choice (common/models/fused_moe.py; A/B runs)
#   DISAGG_MLA_KERNEL       FlashInfer's MLA kernel family: auto (FlashInfer's pick: FA3 on Hopper) | fa2 | fa3
#   DISAGG_PDL              1 (default): the Triton kernels launch with Programmatic Dependent Launch on Hopper
#                           or newer (common/models/pdl.py; the H200 A/B of docs/benchmarks.md, eleventh
#                           session) | 0: plain launches
#   DISAGG_PERSISTENT_MOE   0 (default) | 1: a decode batch of one token runs each layer's post-attention norm and MoE
#                           block as one persistent launch where it applies (common/models/persistent_moe.py; A/B runs)
#   DISAGG_GIL_SWITCH_INTERVAL_MS  Python's switch interval in a process with a transfer engine (default 0.2;
#                           Python's own is 5): the longest its UCX loop thread waits for the GIL beside a busy
#                           scheduler thread (transfer/ucx.py; A/B runs)
#   DISAGG_STEP_DELAY_S     tests only: every forward of the server's scheduler takes this many seconds
#                           longer, as on a slow device (tests/test_first_token.py: long decode steps)
# and the standard ones we honour: XDG_CACHE_HOME, CUDA_VISIBLE_DEVICES (launch_local splits the
# GPUs), CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (an SM cap: the model's GEMMs are checked at start-up,
# common/engine/gemm_check.py), TRITON_INTERPRET, UCXPY_ENABLE_PYTHON_FUTURE and the UCX_* defaults set in
# configure_ucx_env (the user's win).

CPU_THREADS_VAR = "DISAGG_CPU_THREADS"
TRANSFER_TRACE_VAR = "DISAGG_TRANSFER_TRACE"


def cpu_threads() -> int | None:
    """DISAGG_CPU_THREADS, or None: the rank takes its share of the cores."""
    value = os.environ.get(CPU_THREADS_VAR)
    return int(value) if value else None


def share_of_cores(ranks: int) -> int:
    """Cores per rank when `ranks` CPU ranks share this machine."""
    return max(1, (os.cpu_count() or 1) // ranks)


def env_cpu_threads(threads: int) -> dict[str, str]:
    """The environment entry that gives a child process `threads` torch threads."""
    return {CPU_THREADS_VAR: str(threads)}


def set_default_cpu_threads(ranks: int) -> None:
    """Unless the user chose: this process and its children split the cores `ranks` ways."""
    os.environ.setdefault(CPU_THREADS_VAR, str(share_of_cores(ranks)))


def fused_kernels_enabled() -> bool:
    return os.environ.get("DISAGG_FUSED_KERNELS", "1") != "0"


def cache_dir() -> Path:
    """Root of disagg's cache (DISAGG_CACHE_DIR, else $XDG_CACHE_HOME/disagg, else ~/.cache/disagg)."""
    env = os.environ.get("DISAGG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "disagg" if xdg else Path.home() / ".cache" / "disagg"


def transfer_trace() -> bool:
    return os.environ.get(TRANSFER_TRACE_VAR, "0") not in ("", "0")


def set_transfer_trace() -> None:
    """Trace transfers in this process's children too (they inherit the environment)."""
    os.environ[TRANSFER_TRACE_VAR] = "1"


def cuda_visible_devices() -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names, or None when it is unset (every GPU is visible)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d for d in value.split(",") if d.strip()]


DP_REPLICA_VAR = "DISAGG_DP_REPLICA"


def dp_replica() -> tuple[int, int]:
    """(replica, replicas) of this process under --dp-size (a prefill's ranks register with it); (0, 1) alone."""
    rank, _, size = os.environ.get(DP_REPLICA_VAR, "0/1").partition("/")
    return int(rank), int(size or 1)


@contextlib.contextmanager
def dp_replica_for_children(dp_rank: int, dp_size: int):
    """Processes started inside the block are replica dp_rank of dp_size (DISAGG_DP_REPLICA)."""
    saved = os.environ.get(DP_REPLICA_VAR)
    os.environ[DP_REPLICA_VAR] = f"{dp_rank}/{dp_size}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(DP_REPLICA_VAR, None)
        else:
            os.environ[DP_REPLICA_VAR] = saved


@contextlib.contextmanager
def cuda_visible_devices_for_children(devices: list[str] | None):
    """Processes started inside the block see only `devices` (None: unchanged); restored after.
    (CUDA reads the variable when a child first uses it: --dp-size replicas, --base-gpu-id.)"""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def flashinfer_jit_disabled() -> bool:
    """FLASHINFER_DISABLE_JIT (FlashInfer's own): no kernel builds, only shipped ones (kernel_prebuild)."""
    return bool(os.environ.get("FLASHINFER_DISABLE_JIT"))


def build_jobs() -> int | None:
    """MAX_JOBS (FlashInfer's and torch's extension builds' knob), else None: the cores."""
    value = os.environ.get("MAX_JOBS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def fp8_gemm_mode() -> str:
    """DISAGG_FP8_GEMM: auto | torch | off (common/models/fp8.py)."""
    mode = os.environ.get("DISAGG_FP8_GEMM", "auto") or "auto"
    if mode not in ("auto", "torch", "off"):
        raise ValueError(f"DISAGG_FP8_GEMM={mode!r}: expected auto, torch or off")
    return mode


def mla_kernel() -> str:
    """DISAGG_MLA_KERNEL: auto | fa2 | fa3 (the `backend` of FlashInfer's MLA wrappers)."""
    kernel = os.environ.get("DISAGG_MLA_KERNEL", "auto") or "auto"
    if kernel not in ("auto", "fa2", "fa3"):
        raise ValueError(f"DISAGG_MLA_KERNEL={kernel!r}: expected auto, fa2 or fa3")
    return kernel


def mla_prefill_mode() -> str:
    """DISAGG_MLA_PREFILL: auto | absorbed | expanded | torch (common/engine/attention_flashinfer.py)."""
    mode = os.environ.get("DISAGG_MLA_PREFILL", "auto") or "auto"
    if mode not in ("auto", "absorbed", "expanded", "torch"):
        raise ValueError(f"DISAGG_MLA_PREFILL={mode!r}: expected auto, absorbed, expanded or torch")
    return mode


def _switch(name: str, default: bool) -> bool:
    """A 0 / 1 variable (unset or empty: `default`); anything else is refused, not read as either."""
    value = os.environ.get(name) or ("1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def ragged_prefill() -> bool:
    """DISAGG_RAGGED_PREFILL: 1 (default) | 0 (common/engine/attention_flashinfer.py)."""
    return _switch("DISAGG_RAGGED_PREFILL", True)


def moe_combine() -> str | None:
    """DISAGG_MOE_COMBINE: sum | atomic | atomic_fp32, or None (the tuned config decides;
    common/models/fused_moe.py checks the value)."""
    return os.environ.get("DISAGG_MOE_COMBINE") or None


def mla_prefill_graph() -> bool:
    """DISAGG_MLA_PREFILL_GRAPH: 1 (default) | 0: MLA models' fresh prompts prefill in CUDA graphs too
    (cuda_graph.PrefillGraphRunner's expanded form; 0 keeps their prefill eager)."""
    return _switch("DISAGG_MLA_PREFILL_GRAPH", True)


def paged_prefill_graph() -> bool:
    """DISAGG_PAGED_PREFILL_GRAPH: 1 (default) | 0: prefill batches that attend over the pool (a cached
    prefix, a later chunk, decode rows beside a prompt) replay CUDA graphs too (cuda_graph.
    PrefillGraphRunner's paged set: a second set of captures; on an H100, 512 new tokens after 1536
    cached ones 14.8 ms against 35-53 ms eager for Qwen3-30B-A3B, docs/benchmarks.md; 0: eager)."""
    return _switch("DISAGG_PAGED_PREFILL_GRAPH", True)


def step_delay_s() -> float:
    """DISAGG_STEP_DELAY_S (tests only): seconds added to every forward; 0 unless set."""
    return float(os.environ.get("DISAGG_STEP_DELAY_S") or 0)


def pdl_requested() -> bool:
    """DISAGG_PDL: 1 (default) | 0: the Triton kernels launch with PDL where the device allows
    (common/models/pdl.py)."""
    return _switch("DISAGG_PDL", True)


def persistent_moe_requested() -> bool:
    """DISAGG_PERSISTENT_MOE: 0 (default) | 1: one token's post-attention norm and MoE block as one
    persistent launch where it applies (common/models/moe.py, SparseMoE.persistent_block; an
    experiment, not measured yet)."""
    return _switch("DISAGG_PERSISTENT_MOE", False)


MPS_SM_PERCENT_VAR = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def mps_sm_percent() -> int | None:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (NVIDIA MPS: this process's share of the SMs) below 100, else None."""
    value = os.environ.get(MPS_SM_PERCENT_VAR, "")
    try:
        percent = int(float(value))
    except ValueError:
        return None
    return percent if 0 < percent < 100 else None


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in Triton's CPU interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def gil_switch_interval_s(default: float) -> float:
    """DISAGG_GIL_SWITCH_INTERVAL_MS in seconds, else `default` (the transfer engine's)."""
    value = os.environ.get("DISAGG_GIL_SWITCH_INTERVAL_MS", "")
    if not value:
        return default
    ms = float(value)
    if ms <= 0:
        raise ValueError(f"DISAGG_GIL_SWITCH_INTERVAL_MS must be > 0, got {value!r}")
    return ms / 1000


def ucx_python_futures() -> bool:
    """ucxx's Python futures (UCXPY_ENABLE_PYTHON_FUTURE=0 turns them off, e.g. to compare)."""
    return os.environ.get("UCXPY_ENABLE_PYTHON_FUTURE", "1") != "0"


def configure_ucx_env(cpu: bool, ib_device: str | None = None) -> None:
    """Sensible UCX defaults, set before ucxx creates its context (the user's env wins).

    CPU: TCP + shared memory (cma/posix) + loopback. GPU: let UCX choose (cuda_ipc over NVLink,
    rc/ud on InfiniBand, tcp otherwise). `ib_device` (--disaggregation-ib-device, e.g. "mlx5_0")
    pins the network device: UCX_NET_DEVICES=mlx5_0:1.
    """
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if cpu:
        os.environ.setdefault("UCX_TLS", "tcp,sm,self")
    if ib_device:
        devices = ",".join(d if ":" in d else f"{d}:1" for d in ib_device.split(","))
        os.environ.setdefault("UCX_NET_DEVICES", devices)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str | None = None  # None: the embedded default model
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights at the config's shapes)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda
    tp: int = 1
    ep: int = 1
    # data parallel: --dp-size replicas of the whole TP group behind one server (launch_server's
    # dispatcher), or, with DP attention, attention ranks inside one TP group
    dp_size: int = 1
    # pipeline parallel: layers split into pp_size contiguous stages, each stage a TP group of tp ranks
    pp_size: int = 1
    page_size: int = 16
    # KV pool size; default: from mem_fraction_static (GPU), from the memory available (CPU, <= 512 MiB)
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    chunked_prefill_size: int = 2048  # <= 0: no chunking
    max_running_requests: int = 256
    max_prefill_tokens: int = 8192  # token budget of one prefill batch
    context_length: int | None = None  # default: the model's max_position_embeddings
    attention_backend: str = "auto"  # auto | torch | flashinfer
    # the attention kernel of CUDA-graph decode batches: flashinfer | triton (split-KV,
    # common/models/decode_attention.py) | auto (triton for small batches, cuda_graph.AUTO_TRITON_PROGRAMS)
    decode_attention_backend: str = "auto"
    disable_radix_cache: bool = False
    cuda_graph_max_bs: int = 64  # decode batches up to this size replay captured CUDA graphs
    disable_cuda_graph: bool = False
    # prefill batches of fresh prompts up to prefill_cuda_graph_max_tokens replay captured CUDA graphs
    # (cuda_graph.PrefillGraphRunner; GQA models on FlashInfer); 0 or disable_prefill_cuda_graph: eager
    disable_prefill_cuda_graph: bool = False
    prefill_cuda_graph_max_tokens: int = 4096
    # the overlap scheduler (common/engine/scheduler.py): step n+1 is launched before step n's tokens
    # reach the host. Default: on with CUDA, off on the CPU (torch's CPU ops run synchronously, so
    # nothing overlaps); enable_overlap_schedule (ours, not SGLang's) runs that loop on the CPU too
    disable_overlap_schedule: bool = False
    enable_overlap_schedule: bool = False
    # MoE expert parallelism: none (every rank sees every token; an all-reduce combines the experts'
    # outputs) | all_to_all (--ep == --tp: each token only to its experts' ranks and back)
    moe_a2a_backend: str = "none"
    # all_to_all exchange (common/models/moe_a2a.py): normal (sizes exchanged first) | low_latency
    # (fixed-size buffers, CUDA-graph capturable) | auto (low_latency for decode batches)
    deepep_mode: str = "auto"
    # DP attention: inside the TP group, dp_size attention ranks each own their requests and KV
    # pages; MoE/dense layers still span all tp ranks (common/parallel/dp_attention.py)
    enable_dp_attention: bool = False
    enable_dp_lm_head: bool = False  # with DP attention: the LM head split over the attention TP group only
    # EPLB (common/models/eplb.py): N extra physical expert slots holding replicas of hot experts, the
    # placement from a load file at start and/or recomputed every N forward steps (0: never);
    # per-expert routed-token counters on /metrics (layers x experts series)
    ep_num_redundant_experts: int = 0
    init_expert_location: str | None = None
    eplb_rebalance_num_iterations: int = 0
    # DeepSeek's shared experts as more slots of the routed experts' kernels (SGLang's shared-experts
    # fusion; deepseek.DeepseekMoE.fuse_shared_experts) unless this is set
    disable_shared_experts_fusion: bool = False
    enable_eplb: bool = False  # count the expert load and route through a placement (/eplb_rebalance)
    enable_expert_distribution_metrics: bool = False
    random_seed: int = 0
    # JSON object merged into the model's HF config before it is built (SGLang's flag), e.g.
    # '{"num_hidden_layers": 4}': a real model's shape with fewer layers
    json_model_override_args: str = "{}"
    # distributed (one process per rank)
    dist_init_addr: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    dist_timeout: float = 120.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @property
    def world_size(self) -> int:
        """Ranks of one engine: tp per pipeline stage, pp_size stages."""
        return self.tp * self.pp_size

    @property
    def attn_tp_size(self) -> int:
        """Ranks attention is split over: tp, or with DP attention tp / dp_size."""
        return self.tp // self.dp_size if self.enable_dp_attention and self.dp_size > 0 else self.tp

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, SGLang spelling, defaults from EngineConfig."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model-path", default=d.model_path, help="HF folder (default: embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "dummy"])
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g.add_argument("--tp", "--tp-size", "--tensor-parallel-size", dest="tp", type=int, default=d.tp)
    g.add_argument("--ep", "--ep-size", "--expert-parallel-size", dest="ep", type=int, default=d.ep)
    g.add_argument("--dp-size", "--dp", "--data-parallel-size", dest="dp_size", type=int, default=d.dp_size,
                   help="data parallel replicas of the TP group behind one server (docs/parallelism.md)")  # fmt: skip
    g.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=d.pp_size,
                   help="pipeline stages (contiguous layer ranges), each of --tp ranks (docs/parallelism.md)")  # fmt: skip
    g.add_argument("--page-size", type=int, default=d.page_size)
    g.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                   help="KV pool size in tokens (default: GPU from --mem-fraction-static; CPU from the memory "
                        "available, at most 512 MiB)")  # fmt: skip
    g.add_argument("--mem-fraction-static", type=float, default=d.mem_fraction_static,
                   help="share of the whole GPU this server may hold: weights + KV pool + workspace (the pool "
                   "gets what is left of it after the weights), so two servers at 0.4 each share one GPU")  # fmt: skip
    g.add_argument("--chunked-prefill-size", type=int, default=d.chunked_prefill_size)
    g.add_argument("--max-running-requests", type=int, default=d.max_running_requests)
    g.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens)
    g.add_argument("--context-length", type=int, default=d.context_length)
    g.add_argument(
        "--attention-backend", default=d.attention_backend, choices=["auto", "torch", "flashinfer"]
    )
    g.add_argument("--decode-attention-backend", default=d.decode_attention_backend,
                   choices=["auto", "flashinfer", "triton"],
                   help="attention kernel of CUDA-graph decode batches (GPU): FlashInfer's, or the Triton "
                   "split-KV kernels of common/models/decode_attention.py; auto: Triton's at small batches "
                   "(up to 8 requests; MLA: 8 / ceil(heads / 16)), FlashInfer's above")  # fmt: skip
    g.add_argument("--disable-radix-cache", action="store_true")
    g.add_argument("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs)
    g.add_argument("--disable-prefill-cuda-graph", action="store_true",
                   help="GPU: prefill every batch eagerly (by default prefill batches of fresh prompts, no cached "
                   "prefix and at most 16 requests, replay CUDA graphs captured per token bucket: GQA models on FlashInfer)")  # fmt: skip
    g.add_argument("--enable-piecewise-cuda-graph", action="store_true", dest="enable_piecewise_cuda_graph",
                   help="accepted for SGLang's command lines: the prefill graphs are on by default here")  # fmt: skip
    g.add_argument("--prefill-cuda-graph-max-tokens", "--piecewise-cuda-graph-max-tokens", type=int,
                   dest="prefill_cuda_graph_max_tokens", default=d.prefill_cuda_graph_max_tokens,
                   help="the largest prefill batch (tokens) a CUDA graph is captured for (0: none)")  # fmt: skip
    g.add_argument("--moe-a2a-backend", default=d.moe_a2a_backend, choices=["none", "all_to_all"])
    g.add_argument("--deepep-mode", default=d.deepep_mode, choices=["auto", "normal", "low_latency"],
                   help="all_to_all MoE exchange: normal (packed, sizes exchanged), low_latency (fixed-size "
                        "buffers, CUDA-graph capturable), auto (low_latency for decode batches)")  # fmt: skip
    g.add_argument("--enable-dp-attention", action="store_true",
                   help="attention and KV cache data parallel over --dp-size groups of the TP ranks (docs/parallelism.md)")  # fmt: skip
    g.add_argument("--enable-dp-lm-head", action="store_true",
                   help="with DP attention: LM head vocab-parallel within each attention group (no gather across DP ranks)")  # fmt: skip
    g.add_argument("--ep-num-redundant-experts", type=int, default=d.ep_num_redundant_experts,
                   help="MoE: extra expert slots per layer for replicas of the most loaded experts (EPLB)")  # fmt: skip
    g.add_argument("--disable-shared-experts-fusion", action="store_true",
                   help="DeepSeek: run the shared experts as their own MLP, not as slots of the routed experts' kernels")  # fmt: skip
    g.add_argument("--init-expert-location", default=d.init_expert_location,
                   help="MoE: expert load file (python -m disagg.common.models.eplb) the start-up placement is computed from")  # fmt: skip
    g.add_argument("--eplb-rebalance-num-iterations", type=int, default=d.eplb_rebalance_num_iterations,
                   help="MoE: re-place the experts from the recorded load every N forward steps (0: never)")  # fmt: skip
    g.add_argument("--enable-eplb", action="store_true",
                   help="MoE: count the expert load so POST /eplb_rebalance can re-place the experts from it")  # fmt: skip
    g.add_argument("--enable-expert-distribution-metrics", action="store_true",
                   help="MoE: routed tokens per layer and expert on /metrics (disagg_moe_expert_tokens_total)")  # fmt: skip
    g.add_argument("--disable-cuda-graph", action="store_true")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="process each step's tokens before launching the next step (overlap is on by default with CUDA)")  # fmt: skip
    g.add_argument("--enable-overlap-schedule", action="store_true",
                   help="run the overlap scheduler on the CPU too (off there by default: nothing overlaps)")  # fmt: skip
    g.add_argument("--random-seed", type=int, default=d.random_seed)
    g.add_argument("--json-model-override-args", default=d.json_model_override_args,
                   help='JSON merged into the model config, e.g. \'{"num_hidden_layers": 4}\'')  # fmt: skip
    g.add_argument("--dist-init-addr", default=d.dist_init_addr, help="HOST:PORT of rank 0 (multi-node)")
    g.add_argument("--nnodes", type=int, default=d.nnodes)
    g.add_argument("--node-rank", type=int, default=d.node_rank)
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout, help="seconds to wait for all ranks")


# ---- prefill/decode servers -------------------------------------------------------------------

PD_ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class DisaggConfig:
    """The flags a prefill or decode server adds to the engine's (SGLang's names)."""

    mode: str = "prefill"  # prefill | decode
    bootstrap_port: int = 8998  # prefill: rank 0 serves the bootstrap here (SGLang's default)
    transfer_timeout: float = 30.0  # seconds a room may make no progress before it fails on both sides
    transfer_host: str | None = None  # prefill: address decode ranks reach its UCX listeners at
    ib_device: str | None = None  # InfiniBand/RoCE device(s) UCX uses, e.g. "mlx5_0" (default: UCX picks)

    @classmethod
    def from_args(cls, args: argparse.Namespace, mode: str) -> DisaggConfig:
        host = args.disaggregation_transfer_host
        if host is None and args.host not in ("0.0.0.0", "::", ""):
            host = args.host  # a server bound to one address is reachable there
        return cls(mode, args.disaggregation_bootstrap_port, args.disaggregation_transfer_timeout, host,
                   args.disaggregation_ib_device)  # fmt: skip


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    d = DisaggConfig()
    g = parser.add_argument_group("disaggregation")
    g.add_argument("--disaggregation-bootstrap-port", type=int, default=d.bootstrap_port,
                   help="prefill: port of the bootstrap server decode ranks query (the router's `--prefill URL PORT`)")  # fmt: skip
    g.add_argument("--disaggregation-transfer-timeout", type=float, default=d.transfer_timeout,
                   help="seconds without progress before a KV transfer fails on both sides")  # fmt: skip
    g.add_argument("--disaggregation-transfer-host", default=d.transfer_host,
                   help="prefill: address decode servers reach this server's KV senders at (default: --host, "
                        "or this machine's outward address)")  # fmt: skip
    g.add_argument("--disaggregation-ib-device", default=d.ib_device,
                   help="InfiniBand/RoCE device(s) for KV transfer, e.g. mlx5_0 (default: UCX chooses)")  # fmt: skip
