"""Split-KV decode attention for small batches in Triton: paged GQA and MLA's absorbed form.

Why: at batch 1 on an H200, FlashInfer's decode for Qwen3-30B-A3B's GQA (32 q heads, 4 KV heads,
dim 128, ctx 1024) took 9.5 µs + a 2.4 µs merge a layer for ~0.5 µs of KV bytes, and its MLA decode
(DeepSeek: 16 or 128 heads, latent 512 + rope 64) 12-19 µs for 0.3 µs. With one new token a
request there is little work, so it has to be spread over many SMs: each request's KV is cut into
`num_splits` chunks, one program a (head block, chunk, request), as SGLang's
`decode_attention_fwd_grouped`.

Launch 1 (`_gqa_partial_kernel`, `_mla_partial_kernel`): a program takes the up to BLOCK_H q heads
that share its KV (a GQA group, or a block of MLA heads: all read the one latent), padded to 16
rows for tl.dot, and walks its chunk BLOCK_N tokens at a time with the online softmax in float32
(running max, sum and output; exp2 with log2(e) folded into the scale). Token t of request b lives
at page page_table[b, t // page_size], slot t % page_size, looked up token by token (page sizes
and BLOCK_N need not divide each other). It writes the chunk's normalised output and its
log-sum-exp (base 2) to the float32 workspace: part_out [B, H, S, D], part_lse [B, H, S].
Launch 2 (`_merge_kernel`): one program a (request, head, block of D) weighs the chunks by their
lse and sums them.

CUDA-graph capturable: no host sync; the grids depend on the batch size, the head counts and the
split count (a launch parameter chosen from static shapes, `choose_splits`) only. The chunks are cut
on the device from kv_lens: ceil(kv_len / S) tokens rounded up to BLOCK_N, so a short request
leaves its last chunks empty. An empty chunk writes lse = -inf (its output is neither written nor
read), and the merge gives it weight 0; a request with kv_len 0 (a padded row) gets 0.

The torch references (`gqa_decode_reference`, `mla_decode_reference`: pages gathered, float32
math, host reads of kv_lens) are the tests' and `check_decode_attention`'s reference, and what runs
where Triton cannot (a CPU tensor outside Triton's interpreter).

MLA's launch-1 parameters (tokens an iteration, warps, pipeline stages) come from
this device's tune where it has one (`mla_launch`: `common/models/decode_attention_configs.json`,
written by `python -m disagg.common.bench.decode_attention --mla v2lite --sweep-triton --tune` on
the device, one entry a batch bucket at the engine's chunk count), else the defaults below. None
is checked in: on an H100 (twenty-ninth session) and an H200 (thirtieth) the tune, timed at ctx 1024
alone, picked 16 tokens an iteration (0.5-0.8 µs a layer faster there) and lost 20-80 µs a step in the
engine, whose decode steps run just past 1024 tokens, where 16 takes two iterations a chunk (the
likely reason; docs/benchmarks.md): the tune now times several lengths (bench/decode_attention.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from disagg.common.config import triton_interpret
from disagg.common.models.fused_rope_kv import check_randn, start_up_check
from disagg.common.models.pdl import pdl_args, pdl_begin

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the torch references run
    triton = None

BLOCK_H = 16  # q heads a program (tl.dot's smallest M): a GQA group of up to 16, or a block of MLA heads
BLOCK_N = 32  # tokens an iteration of launch 1
MIN_SPLIT_TOKENS = 64  # choose_splits: the shortest chunk worth a program of its own
MAX_SPLITS = 64  # choose_splits: bounds the merge's [splits, BLOCK_D] tile
LOG2E = 1.4426950408889634
CONFIGS = Path(__file__).with_name("decode_attention_configs.json")
MLA_DEFAULT_LAUNCH = {"block_n": BLOCK_N, "num_warps": 4, "num_stages": 2}


def mla_config_key(num_heads: int, rank: int, rope: int, page_size: int, device: str) -> str:
    return f"MLA,H={num_heads},R={rank},P={rope},page={page_size},device={device}"


def launch_bucket(batch: int) -> str:
    """A batch's tuned entry: its next power of two."""
    return str(1 << max(0, batch - 1).bit_length())


@functools.cache
def tuned_configs() -> dict:
    return json.loads(CONFIGS.read_text()) if CONFIGS.exists() else {}


def tuned_entry(num_heads: int, rank: int, rope: int, page_size: int, device: str) -> dict:
    """This device's (its name) tuned launches for an MLA shape, by batch bucket ({} if none)."""
    return tuned_configs().get(mla_config_key(num_heads, rank, rope, page_size, device), {})


def mla_launch(batch: int, num_heads: int, rank: int, rope: int, page_size: int, device: str) -> dict:
    """mla_decode's launch keywords for a batch at a shape on `device` (its name): this device's tuned
    entry for the batch's bucket, else MLA_DEFAULT_LAUNCH. Each entry was timed against the torch
    reference's output by the tune, and the engine's start-up check runs the kernel as launched."""
    entry = tuned_entry(num_heads, rank, rope, page_size, device)
    return dict(entry.get(launch_bucket(batch), MLA_DEFAULT_LAUNCH))


def choose_splits(
    batch: int, head_programs: int, max_context: int, num_sms: int = 132, programs_per_sm: int = 4
) -> int:
    """The chunks a request's KV is cut into, from static shapes (a CUDA graph's batch size, the
    longest context it serves). `head_programs`: programs a chunk of one request takes (the function
    head_programs). `programs_per_sm`: 4 for gqa_decode, 2 for mla_decode (below); model_splits
    passes both for a model's shape.

    Rule: one wave of programs (batch × head_programs × splits ≈ programs_per_sm × num_sms): decode
    at a small batch is a latency-bound stream of KV bytes, so every SM should hold as many programs
    (loads in flight) as fit at once, and no program should wait for a second wave. MLA's programs
    (210 registers a thread, 55 KB of shared memory) fit 2 an SM; GQA's (64 registers, 21 KB) more,
    and 4 was best measured. Each chunk is at least MIN_SPLIT_TOKENS tokens of max_context (two
    BLOCK_N steps; a shorter one spends more on its q load, its partial write and the merge's read
    than on its KV) and there are at most MAX_SPLITS. On the H200 (bf16, page 16/64, batches 1-64,
    ctx 1024/4096) this picked the fastest count of 1, 2, 4, ..., 64 or one within ~10%, except at
    batch 1-4 and ctx 1024 where 32-token chunks were up to 1.5 µs faster (but slower for 128 MLA
    heads). E.g. Qwen3-30B-A3B (4 KV heads) at batch 1: 16 chunks at ctx 1024 (6.0 µs a layer, both
    launches; FlashInfer 9.5 + 2.4), 64 at ctx 4096 (7.9 µs)."""
    wanted = -(-programs_per_sm * num_sms // max(1, batch * head_programs))
    return max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


def head_programs(num_heads: int, num_kv_heads: int | None = None) -> int:
    """Programs one chunk of one request takes: gqa_decode's (`num_kv_heads` given) its KV heads
    times ceil(group / BLOCK_H); mla_decode's (None: every head reads the one latent) its head blocks."""
    if num_kv_heads is None:
        return -(-num_heads // BLOCK_H)
    return num_kv_heads * -(-(num_heads // num_kv_heads) // BLOCK_H)


def model_splits(batch: int, num_heads: int, max_context: int, num_kv_heads: int | None = None) -> int:
    """choose_splits at a model's shape: gqa_decode (`num_kv_heads` given; 4 programs an SM) or
    mla_decode (None; 2 an SM)."""
    per_sm = 4 if num_kv_heads is not None else 2
    return choose_splits(batch, head_programs(num_heads, num_kv_heads), max_context, programs_per_sm=per_sm)


def decode_workspace(
    batch: int, num_heads: int, num_splits: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 buffers launch 1 writes and launch 2 reads: (part_out [B, H, S, dim], part_lse
    [B, H, S]); allocate them outside a CUDA graph capture to pass them as `workspace`."""
    part_out = torch.empty(batch, num_heads, num_splits, dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return part_out, part_lse


def gqa_decode(
    q: torch.Tensor,  # [B, Hq, D], last dim contiguous
    kv: torch.Tensor,  # [num_pages, 2, page_size, Hkv, D]: one layer's pool view (0 = K, 1 = V)
    page_table: torch.Tensor,  # [B, max_pages_per_req] int32: each request's pages in order
    kv_lens: torch.Tensor,  # [B] int32: tokens each request attends to (0: a padded row, output 0)
    sm_scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [B, Hq, D] in q's dtype, last dim contiguous
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,  # decode_workspace(B, Hq, S, D)
) -> torch.Tensor:
    """One new token a request attends to its paged K/V: softmax(q · K * sm_scale) · V, q head h
    reading KV head h // (Hq / Hkv). Returns `out` (a new tensor if not given)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = kv.shape[3]
    group = num_q_heads // num_kv_heads
    assert num_q_heads == group * num_kv_heads and kv.shape[4] == head_dim
    assert 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0, f"head dim {head_dim}"
    out = _check_io(q, out, (batch, num_q_heads, head_dim), page_table, kv_lens, kv)
    if not _runs_triton(q):
        return out.copy_(gqa_decode_reference(q, kv, page_table, kv_lens, sm_scale))
    if batch == 0:  # a grid of 0 programs fails to launch
        return out
    part_out, part_lse = _workspace(workspace, batch, num_q_heads, num_splits, head_dim, q.device)
    head_blocks = triton.cdiv(group, BLOCK_H)
    _gqa_partial_kernel[(num_kv_heads * head_blocks, num_splits, batch)](
        q, kv, page_table, kv_lens, part_out, part_lse, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        page_table.stride(0), num_q_heads, num_splits, GROUP=group, HEAD_DIM=head_dim,
        PAGE_SIZE=kv.shape[2], BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, UPCAST=triton_interpret(), num_warps=4,
        num_stages=2, **pdl_args(q.device),
    )  # fmt: skip
    return _merge(part_out, part_lse, out)


def mla_decode(
    q_nope: torch.Tensor,  # [B, H, R]: queries absorbed into the latent space (R = kv_lora_rank)
    q_pe: torch.Tensor,  # [B, H, P]: their rotary part
    pages: torch.Tensor,  # [num_pages, page_size, R + P]: one layer's latent pages (ckv | kpe)
    page_table: torch.Tensor,  # [B, max_pages_per_req] int32
    kv_lens: torch.Tensor,  # [B] int32 (0: a padded row, output 0)
    sm_scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [B, H, R] in q's dtype, last dim contiguous
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,  # decode_workspace(B, H, S, R)
    *,
    block_n: int = BLOCK_N,  # launch 1's tokens an iteration, warps and pipeline stages: the
    num_warps: int = 4,  # defaults, this device's tune (mla_launch) or the bench's --sweep-triton
    num_stages: int = 2,
) -> torch.Tensor:
    """MLA's absorbed decode: softmax((q_nope · ckv + q_pe · kpe) * sm_scale) · ckv, every head
    reading the one shared latent. Returns `out` (a new tensor if not given)."""
    batch, num_heads, rank = q_nope.shape
    rope = q_pe.shape[2]
    assert q_pe.shape[:2] == (batch, num_heads) and pages.shape[2] == rank + rope
    for dim in (rank, rope):
        assert dim >= 16 and dim & (dim - 1) == 0, f"MLA dims {rank}, {rope}: powers of two >= 16"
    assert q_pe.stride(-1) == 1 and q_pe.dtype == q_nope.dtype
    out = _check_io(q_nope, out, (batch, num_heads, rank), page_table, kv_lens, pages)
    if not _runs_triton(q_nope):
        return out.copy_(mla_decode_reference(q_nope, q_pe, pages, page_table, kv_lens, sm_scale))
    if batch == 0:
        return out
    part_out, part_lse = _workspace(workspace, batch, num_heads, num_splits, rank, q_nope.device)
    _mla_partial_kernel[(triton.cdiv(num_heads, BLOCK_H), num_splits, batch)](
        q_nope, q_pe, pages, page_table, kv_lens, part_out, part_lse, sm_scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), pages.stride(0), pages.stride(1),
        page_table.stride(0), num_heads, num_splits, RANK=rank, ROPE=rope, PAGE_SIZE=pages.shape[1],
        BLOCK_H=BLOCK_H, BLOCK_N=block_n, UPCAST=triton_interpret(), num_warps=num_warps,
        num_stages=num_stages, **pdl_args(q_nope.device),
    )  # fmt: skip
    return _merge(part_out, part_lse, out)


def _check_io(q, out, shape, page_table, kv_lens, pool) -> torch.Tensor:
    assert q.stride(-1) == 1 and pool.stride(-1) == 1 and q.dtype == pool.dtype
    assert page_table.dtype == kv_lens.dtype == torch.int32 and page_table.stride(1) == 1
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    assert out.shape == shape and out.dtype == q.dtype and out.stride(-1) == 1
    return out


def _workspace(workspace, batch, num_heads, num_splits, dim, device) -> tuple[torch.Tensor, torch.Tensor]:
    if workspace is None:
        return decode_workspace(batch, num_heads, num_splits, dim, device)
    part_out, part_lse = workspace
    assert part_out.shape == (batch, num_heads, num_splits, dim) and part_out.is_contiguous()
    assert part_lse.shape == (batch, num_heads, num_splits) and part_lse.is_contiguous()
    return workspace


def _runs_triton(q: torch.Tensor) -> bool:
    return triton is not None and (q.is_cuda or triton_interpret())


def _merge(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch 2: out[b, h] = Σ_s 2^(lse_s - lse) part_out[b, h, s], lse the chunks' combined one."""
    batch, num_heads, num_splits, dim = part_out.shape
    splits_pow2 = triton.next_power_of_2(num_splits)
    block_d = min(dim, max(16, 4096 // splits_pow2))  # a [splits, BLOCK_D] tile of <= 4096 floats
    _merge_kernel[(batch * num_heads, dim // block_d)](
        part_out, part_lse, out, out.stride(0), out.stride(1), num_heads, num_splits,
        DIM=dim, BLOCK_D=block_d, SPLITS=splits_pow2, num_warps=4, **pdl_args(out.device),
    )  # fmt: skip
    return out


def gqa_decode_reference(q, kv, page_table, kv_lens, sm_scale: float) -> torch.Tensor:
    """gqa_decode in float32 torch ops on the gathered pages; returns float32 [B, Hq, D]."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = kv.shape[3]
    k, valid = _gather_tokens(kv[:, 0], page_table, kv_lens)  # [B, T, Hkv, D], [B, T]
    v, _ = _gather_tokens(kv[:, 1], page_table, kv_lens)
    qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bkgd,btkd->bkgt", qg, k.float()) * sm_scale
    p = _softmax(scores, valid[:, None, None, :])
    return torch.einsum("bkgt,btkd->bkgd", p, v.float()).reshape(batch, num_q_heads, head_dim)


def mla_decode_reference(q_nope, q_pe, pages, page_table, kv_lens, sm_scale: float) -> torch.Tensor:
    """mla_decode in float32 torch ops on the gathered latents; returns float32 [B, H, R]."""
    rank = q_nope.shape[2]
    latent, valid = _gather_tokens(pages, page_table, kv_lens)  # [B, T, R + P], [B, T]
    ckv, kpe = latent[..., :rank].float(), latent[..., rank:].float()
    scores = torch.einsum("bhr,btr->bht", q_nope.float(), ckv) + torch.einsum(
        "bhp,btp->bht", q_pe.float(), kpe
    )
    p = _softmax(scores * sm_scale, valid[:, None, :])
    return torch.einsum("bht,btr->bhr", p, ckv)


def _gather_tokens(pages, page_table, kv_lens) -> tuple[torch.Tensor, torch.Tensor]:
    """pages [num_pages, page_size, ...] -> ([B, T, ...]: each request's tokens in order, padded to
    the longest request's T; [B, T] bool: the real ones). NOTE: reads kv_lens on the host."""
    page_size = pages.shape[1]
    longest = int(kv_lens.max()) if kv_lens.numel() else 0
    t = torch.arange(longest, device=pages.device)
    return pages[page_table[:, t // page_size].long(), t % page_size], t < kv_lens[:, None]


def _softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the valid scores; a row with none (kv_len 0) gives 0, not NaN."""
    return torch.softmax(scores.masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)


def check_decode_attention(
    device: torch.device,
    dtype: torch.dtype,
    *,
    gqa: tuple[int, int, int] | None = None,
    mla: tuple[int, int, int] | None = None,
    page_size: int = 16,
) -> bool:
    """Start-up check: the kernels against the torch reference at a model's shape, `gqa` = (q heads,
    KV heads, head dim) or `mla` = (heads, kv_lora_rank, rope dim), on a batch of requests of
    lengths 0 (a padded row), 1 and a few odd ones, with choose_splits' count and twice it (empty
    chunks). False (logged) on a mismatch or a kernel that fails to build or launch; this also
    compiles the variants the engine launches. The caller decides what to run instead."""
    if triton is None or not (device.type == "cuda" or triton_interpret()):
        return False
    name, shape = ("gqa_decode", gqa) if gqa is not None else ("mla_decode", mla)
    return start_up_check(name, "shape", shape, lambda: _agrees(device, dtype, page_size, gqa, mla))


def _agrees(device, dtype, page_size: int, gqa, mla) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    randn = check_randn(g, dtype)
    kv_lens = torch.tensor([0, 1, 37, 300, 1000], dtype=torch.int32, device=device)
    batch, max_pages = len(kv_lens), -(-1000 // page_size)
    num_pages = batch * max_pages + 1  # page 0: the pad page of the unused entries
    page_table = (1 + torch.randperm(num_pages - 1, generator=g, device=device)).view(batch, max_pages)
    page_table = page_table.int()
    if gqa is not None:
        num_q_heads, num_kv_heads, dim = gqa
        pool = randn(2, num_pages, 2, page_size, num_kv_heads, dim)[1]  # a layer's view of the pool
        args = (randn(batch, num_q_heads, dim), pool, page_table, kv_lens, dim**-0.5)
        splits = model_splits(batch, num_q_heads, 1000, num_kv_heads)
        want = gqa_decode_reference(*args)
        return all(_close(gqa_decode(*args, num_splits=s), want) for s in (splits, 2 * splits))
    num_heads, rank, rope = mla
    pool = randn(2, num_pages, page_size, rank + rope)[1]
    q_nope, q_pe = randn(batch, num_heads, rank), randn(batch, num_heads, rope)
    args = (q_nope, q_pe, pool, page_table, kv_lens, (rank + rope) ** -0.5)
    splits = model_splits(batch, num_heads, 1000)
    want = mla_decode_reference(*args)
    return all(
        _close(mla_decode(*args, num_splits=s, **launch), want)
        for launch in tuned_launches(num_heads, rank, rope, page_size, device)
        for s in (splits, 2 * splits)
    )


def tuned_launches(num_heads: int, rank: int, rope: int, page_size: int, device: torch.device) -> list[dict]:
    """The default MLA launch and every other one this device's tune holds for the shape, each once
    (all checked)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    launches = [MLA_DEFAULT_LAUNCH]
    for launch in tuned_entry(num_heads, rank, rope, page_size, name).values():
        if launch not in launches:
            launches.append(launch)
    return launches


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to rounding: float32 to 1e-5 of the largest value; 16-bit to 1/64 of it (the
    probabilities are rounded to 16 bits for the second dot, the output once)."""
    tol = 1e-5 if got.dtype == torch.float32 else 1 / 64
    return (got.float() - want).abs().max().item() <= tol * want.abs().max().item()


if triton is not None:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        """a · b in float32. UPCAST (Triton's interpreter, which multiplies bf16 tiles as their raw
        uint16 bits): the operands widened first, after the same roundings."""
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _split_range(kv_lens, b, num_splits, BLOCK_N: tl.constexpr):
        """[start, end) of this program's chunk of request b's tokens: ceil(kv_len / num_splits)
        rounded up to BLOCK_N, so a short request's last chunks are empty (start >= end)."""
        kv_len = tl.load(kv_lens + b)
        split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
        start = tl.program_id(1) * split_len
        return start, tl.minimum(start + split_len, kv_len)

    @triton.jit
    def _token_offsets(page_table, stride_table, b, tokens, valid, stride_page, stride_slot, PAGE_SIZE):
        """Offsets of tokens [BLOCK_N] of request b in the pool: page page_table[b, t // PAGE_SIZE],
        slot t % PAGE_SIZE (int64: a layer's pool view can exceed 2^31 elements)."""
        page = tl.load(page_table + b * stride_table + tokens // PAGE_SIZE, mask=valid, other=0)
        return page.to(tl.int64) * stride_page + (tokens % PAGE_SIZE) * stride_slot

    @triton.jit
    def _online_softmax(s, v, valid, row_max, row_sum, acc, UPCAST: tl.constexpr):
        """One block of base-2 scores s [BLOCK_H, BLOCK_N] and its values v [BLOCK_N, D] into the
        running max, sum and output acc [BLOCK_H, D] (rescaled to the new max): returns all three."""
        s = tl.where(valid[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))  # finite: every block holds a valid token
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        return new_max, row_sum * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _store_partial(
        part_out, part_lse, rows, row_mask, num_splits, row_max, row_sum, acc, DIM: tl.constexpr
    ):
        """The chunk's normalised output and base-2 lse for heads `rows` (b * H + h); an empty chunk
        (row_sum = 0) writes lse -inf only: the merge never reads its output."""
        idx = rows * num_splits + tl.program_id(1)
        lse = tl.where(row_sum > 0, row_max + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)), float("-inf"))
        tl.store(part_lse + idx, lse, mask=row_mask)
        d = tl.arange(0, DIM)
        o = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        tl.store(part_out + idx[:, None] * DIM + d[None, :], o, mask=(row_mask & (row_sum > 0))[:, None])

    @triton.jit
    def _gqa_partial_kernel(
        q, kv, page_table, kv_lens, part_out, part_lse, scale_log2,
        stride_qb, stride_qh, stride_page, stride_kv, stride_slot, stride_head, stride_table,
        num_q_heads, num_splits,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (kv head × head block, chunk, b): the chunk's attention for the block's q heads."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        HEAD_BLOCKS: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
        kv_head = tl.program_id(0) // HEAD_BLOCKS
        b = tl.program_id(2).to(tl.int64)
        in_group = (tl.program_id(0) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = in_group < GROUP
        heads = kv_head * GROUP + in_group
        d = tl.arange(0, HEAD_DIM)
        q_rows = tl.load(
            q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=row_mask[:, None], other=0.0
        )
        row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        k_base = kv + kv_head * stride_head + d[None, :]
        start, end = _split_range(kv_lens, b, num_splits, BLOCK_N)
        for n in range(start, end, BLOCK_N):
            tokens = n + tl.arange(0, BLOCK_N)
            valid = tokens < end
            offs = _token_offsets(
                page_table, stride_table, b, tokens, valid, stride_page, stride_slot, PAGE_SIZE
            )
            k = tl.load(k_base + offs[:, None], mask=valid[:, None], other=0.0)
            v = tl.load(k_base + stride_kv + offs[:, None], mask=valid[:, None], other=0.0)
            s = _dot(q_rows, tl.trans(k), UPCAST) * scale_log2
            row_max, row_sum, acc = _online_softmax(s, v, valid, row_max, row_sum, acc, UPCAST)
        _store_partial(
            part_out, part_lse, b * num_q_heads + heads, row_mask, num_splits, row_max, row_sum, acc, HEAD_DIM
        )

    @triton.jit
    def _mla_partial_kernel(
        q_nope, q_pe, pages, page_table, kv_lens, part_out, part_lse, scale_log2,
        stride_nb, stride_nh, stride_pb, stride_ph, stride_page, stride_slot, stride_table,
        num_heads, num_splits,
        RANK: tl.constexpr, ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (head block, chunk, b): the chunk's attention for the block's heads; the latent
        tile ckv [BLOCK_N, RANK] is loaded once for both dots (scores and output)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        b = tl.program_id(2).to(tl.int64)
        heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask = heads < num_heads
        r, e = tl.arange(0, RANK), tl.arange(0, ROPE)
        qn = tl.load(
            q_nope + b * stride_nb + heads[:, None] * stride_nh + r[None, :],
            mask=row_mask[:, None],
            other=0.0,
        )
        qp = tl.load(
            q_pe + b * stride_pb + heads[:, None] * stride_ph + e[None, :], mask=row_mask[:, None], other=0.0
        )
        row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, RANK], tl.float32)
        start, end = _split_range(kv_lens, b, num_splits, BLOCK_N)
        for n in range(start, end, BLOCK_N):
            tokens = n + tl.arange(0, BLOCK_N)
            valid = tokens < end
            row = pages + _token_offsets(
                page_table, stride_table, b, tokens, valid, stride_page, stride_slot, PAGE_SIZE
            )
            ckv = tl.load(row[:, None] + r[None, :], mask=valid[:, None], other=0.0)
            kpe = tl.load(row[:, None] + RANK + e[None, :], mask=valid[:, None], other=0.0)
            s = (_dot(qn, tl.trans(ckv), UPCAST) + _dot(qp, tl.trans(kpe), UPCAST)) * scale_log2
            row_max, row_sum, acc = _online_softmax(s, ckv, valid, row_max, row_sum, acc, UPCAST)
        _store_partial(
            part_out, part_lse, b * num_heads + heads, row_mask, num_splits, row_max, row_sum, acc, RANK
        )

    @triton.jit
    def _merge_kernel(
        part_out, part_lse, out, stride_ob, stride_oh, num_heads, num_splits,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (b * H + h, block of DIM): the chunks' outputs weighted by 2^(lse_s - max lse)."""
        pdl_begin(PDL)  # first: before any load or store (pdl.py)
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, SPLITS)
        lse = tl.load(part_lse + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # no KV at all: every weight 0, the output 0
        w = tl.exp2(lse - top)
        total = tl.sum(w, 0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        parts_ptr = part_out + (row * num_splits + s)[:, None] * DIM + d[None, :]
        parts = tl.load(parts_ptr, mask=(lse > float("-inf"))[:, None], other=0.0)  # empty chunks: unread
        o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        dst = out + (row // num_heads) * stride_ob + (row % num_heads) * stride_oh + d
        tl.store(dst, o.to(out.dtype.element_ty))
