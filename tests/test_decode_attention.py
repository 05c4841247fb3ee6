"""Split-KV decode attention (common/models/decode_attention.py) gives the attention of each
request's new token over its paged KV: against the torch reference and against plain softmax
attention over each request's K/V gathered on its own, for GQA (groups 1, 4, 8, 20) and MLA (3, 16
and 20 heads), page sizes 1, 5, 16 and 64 (smaller and larger than a BLOCK_N step, and dividing
none), requests of lengths 1, odd ones and 0 (a padded row: 0, no NaN), more splits than a request
fills (empty chunks), in float32 and bf16 — in Triton's CPU interpreter on tiny shapes, compiled for
sm_90, and on a GPU at Qwen3-30B-A3B's and DeepSeek's shapes, inside a CUDA graph too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent(
    """
    import torch
    from disagg.common.models import decode_attention as da

    def tolerance(dtype, want):
        # float32: summation order only; bf16: p and the output rounded to 8 bits of mantissa
        return (1e-5 if dtype == torch.float32 else 1 / 64) * want.abs().max().item()

    def paged(g, lens, page_size, dtype, device, *token_shape):
        '''A layer's pool view (the second of two layers: not contiguous beyond a page) holding the
        requests' tokens on shuffled pages; unused page-table entries point at pad page 0.'''
        max_pages = max(1, -(-max(lens) // page_size))
        num_pages = len(lens) * max_pages + 1
        pool = torch.randn(2, num_pages, *token_shape[:-2], page_size, *token_shape[-2:], generator=g)
        pool = pool.to(dtype).to(device)[1]
        table = torch.zeros(len(lens), max_pages, dtype=torch.int32)
        order = (1 + torch.randperm(num_pages - 1, generator=g)).int().tolist()
        for b, n in enumerate(lens):
            for i in range(-(-n // page_size)):
                table[b, i] = order.pop()
        return pool, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)

    def token_rows(pages, table, b, n):
        '''[n, ...]: request b's tokens in order, token t from page table[b, t // page_size].'''
        t = torch.arange(n, device=pages.device)
        return pages[table[b, t // pages.shape[1]].long(), t % pages.shape[1]].float()

    def plain_attention(q, k, v, scale):
        '''q [H, D], k / v [n, H, D] -> softmax(q . k * scale) . v per head, float32.'''
        p = torch.softmax(torch.einsum("hd,nhd->hn", q.float(), k) * scale, dim=-1)
        return torch.einsum("hn,nhd->hd", p, v)

    def compare(got, want, plain, lens, dtype):
        assert not got.isnan().any()
        tol = tolerance(dtype, want)
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)
        for b, n in enumerate(lens):
            if n == 0:
                assert torch.equal(got[b], torch.zeros_like(got[b]))  # a padded row
            else:
                torch.testing.assert_close(got[b].float(), plain(b, n), atol=tol, rtol=0)

    def gqa_case(lens, page_size, hq, hkv, dim, dtype, splits, device="cpu"):
        g = torch.Generator().manual_seed(sum(lens) + page_size + hq)
        kv, table, kv_lens = paged(g, lens, page_size, dtype, device, 2, hkv, dim)
        q = torch.randn(len(lens), hq + 3, dim, generator=g).to(dtype).to(device)[:, :hq]  # strided rows
        scale = dim**-0.5
        want = da.gqa_decode_reference(q, kv, table, kv_lens, scale)

        def plain(b, n):
            k = token_rows(kv[:, 0], table, b, n).repeat_interleave(hq // hkv, dim=1)
            v = token_rows(kv[:, 1], table, b, n).repeat_interleave(hq // hkv, dim=1)
            return plain_attention(q[b], k, v, scale)

        for s in splits:
            got = da.gqa_decode(q, kv, table, kv_lens, scale, s)
            assert got.shape == q.shape and got.dtype == dtype
            compare(got, want, plain, lens, dtype)
        out = torch.full((len(lens), hq, dim), float("nan"), dtype=dtype, device=device)
        work = da.decode_workspace(len(lens), hq, splits[0], dim, device)
        assert da.gqa_decode(q, kv, table, kv_lens, scale, splits[0], out=out, workspace=work) is out
        compare(out, want, plain, lens, dtype)
        print("case passed", "gqa", lens, page_size, hq, hkv, dim, dtype, splits)

    def mla_case(lens, page_size, heads, rank, rope, dtype, splits, device="cpu"):
        g = torch.Generator().manual_seed(sum(lens) + page_size + heads + rank)
        pages, table, kv_lens = paged(g, lens, page_size, dtype, device, 1, rank + rope)
        pages = pages[:, :, 0]  # [num_pages, page_size, rank + rope]
        q_nope = torch.randn(len(lens), heads, rank, generator=g).to(dtype).to(device)
        q_pe = torch.randn(len(lens), heads, rope, generator=g).to(dtype).to(device)
        scale = (rank + rope) ** -0.5
        want = da.mla_decode_reference(q_nope, q_pe, pages, table, kv_lens, scale)

        def plain(b, n):
            latent = token_rows(pages, table, b, n)[:, None].expand(n, heads, rank + rope)
            q = torch.cat([q_nope[b], q_pe[b]], dim=-1)
            return plain_attention(q, latent, latent[..., :rank], scale)

        for s in splits:
            got = da.mla_decode(q_nope, q_pe, pages, table, kv_lens, scale, s)
            assert got.shape == q_nope.shape and got.dtype == dtype
            compare(got, want, plain, lens, dtype)
        # another BLOCK_N (the bench's --sweep-triton launches): the same attention
        compare(da.mla_decode(q_nope, q_pe, pages, table, kv_lens, scale, splits[0], block_n=16), want, plain, lens, dtype)
        # a tuned launch's other parameters (mla_launch): the same attention
        got = da.mla_decode(q_nope, q_pe, pages, table, kv_lens, scale, splits[-1], block_n=64, num_warps=8, num_stages=1)
        compare(got, want, plain, lens, dtype)
        print("case passed", "mla", lens, page_size, heads, rank, rope, dtype, splits)
    """
)


def _interpret(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test checks the compiled kernels")
def test_interpreted_decode_attention_matches_the_references():
    """Lengths 1, 0 (a padded row) and odd ones; chunk counts from 1 to more than the longest request
    fills (BLOCK_N = 32 tokens a chunk at least: 8 splits of 77 tokens leave 5 empty)."""
    pytest.importorskip("triton")
    out = _interpret(
        CHECK
        + textwrap.dedent(
            """
            f32, bf16 = torch.float32, torch.bfloat16
            lens = [1, 77, 0, 40]
            gqa_case(lens, 1, 2, 2, 32, f32, (1, 8))  # group 1, one token a page
            gqa_case(lens, 16, 8, 2, 32, f32, (3,))  # group 4; pages smaller than a BLOCK_N step
            gqa_case(lens, 16, 8, 1, 64, bf16, (2, 8))  # group 8
            gqa_case([70, 1, 33], 64, 20, 1, 32, f32, (2,))  # group 20: two head blocks; pages > BLOCK_N
            gqa_case([70, 0, 33], 5, 16, 2, 32, bf16, (4,))  # a page size dividing nothing
            mla_case(lens, 1, 3, 32, 16, f32, (1, 8))
            mla_case(lens, 16, 16, 64, 16, bf16, (3,))
            mla_case([70, 1, 33], 64, 20, 32, 16, bf16, (2,))  # two head blocks, the second partial
            """
        )
    )
    assert out.count("case passed") == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test checks the compiled kernels")
def test_interpreted_start_up_check_passes_the_kernels_and_catches_a_broken_one():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from disagg.common.models import decode_attention as da
        cpu = torch.device("cpu")
        assert da.check_decode_attention(cpu, torch.bfloat16, gqa=(8, 2, 32), page_size=16)
        assert da.check_decode_attention(cpu, torch.float32, mla=(3, 32, 16), page_size=1)
        # this device's tuned launches are checked too, each once (the CPU's device name is "")
        tuned = dict(block_n=16, num_warps=4, num_stages=1)
        da.tuned_configs = lambda: {da.mla_config_key(3, 32, 16, 5, ""): {"1": tuned, "2": tuned, "8": da.MLA_DEFAULT_LAUNCH}}
        assert da.tuned_launches(3, 32, 16, 5, cpu) == [da.MLA_DEFAULT_LAUNCH, tuned]
        assert da.check_decode_attention(cpu, torch.float32, mla=(3, 32, 16), page_size=5)
        da._merge = lambda part_out, part_lse, out: out.zero_()  # a broken merge
        assert not da.check_decode_attention(cpu, torch.float32, gqa=(8, 2, 32))
        assert not da.check_decode_attention(cpu, torch.float32, mla=(3, 32, 16))
        """
    )
    _interpret(code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_gpu_triton_decode.py runs it in the engine")
def test_interpreted_graph_backend_plans_and_runs_on_the_pool():
    """cuda_graph._GraphTritonDecodeBackend (what a decode graph bucket replays): plan() fills its fixed
    page table and lengths, padded rows on the pad page; forward / run_mla read the pool in place. A
    longer batch planned first leaves stale table entries past each row's pages: unread."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from disagg.common.engine.cuda_graph import _GraphTritonDecodeBackend
        from disagg.common.engine.kv_pool import KVPagePool
        from disagg.common.models import decode_attention as da
        from disagg.common.models.deepseek import latent_pages

        torch.manual_seed(0)
        for mla in (False, True):
            # GQA: 8 q heads on 2 KV heads of dim 16; MLA: 3 heads, latent 32 + rope 16 (one "head" of 24)
            pool = KVPagePool(40, 4, 2, 1 if mla else 2, 24 if mla else 16, torch.float32, "cpu")
            pool.kv_buffer.normal_()
            heads = 3 if mla else 8
            backend = _GraphTritonDecodeBackend(pool, heads, 4, 64, mla)
            for lens in ([9, 30, 1, 1], [5, 2, 1, 1]):  # the last two: padded rows, as CudaGraphRunner.run
                tables = [pool.allocate(-(-n // 4)) for n in lens[:2]] + [[pool.pad_page]] * 2
                backend.plan(lens, tables)
                width = max(len(t) for t in tables)
                table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
                kv_lens = torch.tensor(lens, dtype=torch.int32)
                kv = pool.kv_buffer[1]
                if mla:
                    q_nope, q_pe = torch.randn(4, heads, 32), torch.randn(4, heads, 16)
                    got = backend.run_mla(q_nope, q_pe, latent_pages(kv), 0.2, None)
                    want = da.mla_decode_reference(q_nope, q_pe, latent_pages(kv), table, kv_lens, 0.2)
                else:
                    q = torch.randn(4, heads, 16)
                    got = backend.forward(q, kv, None)
                    want = da.gqa_decode_reference(q, kv, table, kv_lens, 16**-0.5)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                for t in tables[:2]:
                    pool.free(t)
        """
    )
    _interpret(code)


def test_auto_runs_triton_in_the_buckets_of_at_most_8_programs_a_chunk():
    from types import SimpleNamespace

    from disagg.common.engine.cuda_graph import CudaGraphRunner

    def buckets(kernel: str, heads: int, mla: bool) -> list[int]:
        runner = object.__new__(CudaGraphRunner)  # the rule only: no GPU, no capture
        config = SimpleNamespace(kv_lora_rank=512 if mla else None)
        runner.kernel, runner.num_qo_heads, runner.model = kernel, heads, SimpleNamespace(config=config)
        return [bs for bs in (1, 2, 4, 8, 16, 64) if runner.uses_triton(bs)]

    assert buckets("auto", 32, False) == [1, 2, 4, 8]  # GQA (Qwen3, Llama-8B): batch <= 8
    assert buckets("auto", 16, True) == [1, 2, 4, 8]  # MLA, 16 heads (V2-Lite): one head block
    assert buckets("auto", 128, True) == [1]  # V3 at tp 1: 8 head blocks
    assert buckets("triton", 128, True) == [1, 2, 4, 8, 16, 64]
    assert buckets("flashinfer", 32, False) == []


def test_the_start_up_check_runs_only_where_a_bucket_would_run_triton():
    from types import SimpleNamespace

    from disagg.common.engine.cuda_graph import CudaGraphRunner

    def choose(kernel: str, heads: int, agrees: bool = True) -> tuple[list[int], int]:
        """(the buckets that run Triton, start-up checks run)"""
        runner, checks = object.__new__(CudaGraphRunner), []
        config = SimpleNamespace(kv_lora_rank=512)  # MLA: 16 heads a program
        runner.num_qo_heads, runner.model = heads, SimpleNamespace(config=config)
        runner._triton_agrees = lambda n: checks.append(n) or agrees
        runner._set_kernel(kernel)
        return [bs for bs in (1, 2, 8, 64) if runner.uses_triton(bs)], len(checks)

    assert choose("auto", 128) == ([1], 1)  # batch 1 is 8 head blocks: Triton's, checked
    assert choose("auto", 128, agrees=False) == ([], 1)
    assert choose("auto", 144) == ([], 0)  # 9 blocks even at batch 1: no bucket, no check
    assert choose("triton", 144) == ([1, 2, 8, 64], 1)
    assert choose("flashinfer", 16) == ([], 0)


def test_choose_splits_fills_the_gpu_with_chunks_of_at_least_64_tokens():
    from disagg.common.models.decode_attention import MAX_SPLITS, choose_splits, model_splits

    assert choose_splits(1, 4, 1024) == 16  # Qwen3-30B-A3B, batch 1: 1024 / 64 tokens
    assert choose_splits(1, 4, 32768) == 64  # 4 * 132 / 4 = 132 programs' worth, at most MAX_SPLITS
    assert choose_splits(8, 4, 4096) == 17  # 4 * 132 / 32
    assert choose_splits(64, 4, 8192) == 3
    assert choose_splits(1, 8, 8192, programs_per_sm=2) == 33  # DeepSeek's 128 heads: 8 head blocks
    assert choose_splits(256, 4, 8192) == choose_splits(1, 4, 40) == 1
    assert max(choose_splits(1, 1, n) for n in (10**6, 64, 1)) == MAX_SPLITS
    # at a model's shape: Qwen3-30B-A3B (32 q heads on 4 KV heads), a group of 20 (two head blocks),
    # DeepSeek-V3's 128 MLA heads
    assert model_splits(1, 32, 1024, 4) == choose_splits(1, 4, 1024)
    assert model_splits(8, 40, 4096, 2) == choose_splits(8, 4, 4096)
    assert model_splits(1, 128, 8192) == choose_splits(1, 8, 8192, programs_per_sm=2)


def test_cpu_tensors_take_the_torch_reference():
    """Without the interpreter a CPU tensor never reaches Triton (the CPU install has none)."""
    from disagg.common.models.decode_attention import gqa_decode, gqa_decode_reference

    kv = torch.randn(4, 2, 16, 2, 64, dtype=torch.bfloat16)
    q = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    table, lens = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32), torch.tensor([20, 0], dtype=torch.int32)
    got, want = gqa_decode(q, kv, table, lens, 0.125, 4), gqa_decode_reference(q, kv, table, lens, 0.125)
    assert got.dtype == q.dtype and torch.equal(got, want.to(q.dtype))
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_decode_attention_kernels_compile_for_hopper():
    """The engine's shapes in bf16: GQA dim 128 group 8 (and 4, Qwen3-30B-A3B), MLA rank 512 rope 64,
    page sizes 1, 16, 64; the launch-1 kernels' tiles fit an SM's shared memory."""
    pytest.importorskip("triton")
    from disagg.common.models import decode_attention as da

    from tests.conftest import compile_for_hopper

    tables = {"page_table": "*i32", "kv_lens": "*i32", "part_out": "*fp32", "part_lse": "*fp32"}
    tiles = dict(BLOCK_H=da.BLOCK_H, BLOCK_N=da.BLOCK_N, UPCAST=False)
    for page_size in (1, 16, 64):
        for group in (4, 8):
            types = {"q": "*bf16", "kv": "*bf16", "scale_log2": "fp32", **tables}
            consts = dict(GROUP=group, HEAD_DIM=128, PAGE_SIZE=page_size, **tiles)
            gqa = compile_for_hopper(da._gqa_partial_kernel, types, consts)
        types = {"q_nope": "*bf16", "q_pe": "*bf16", "pages": "*bf16", "scale_log2": "fp32", **tables}
        mla = compile_for_hopper(
            da._mla_partial_kernel, types, dict(RANK=512, ROPE=64, PAGE_SIZE=page_size, **tiles)
        )
    for kernel in (gqa, mla):
        assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
    for dim, splits in ((128, 16), (512, 64)):
        block_d = min(dim, 4096 // splits)
        types = {"part_out": "*fp32", "part_lse": "*fp32", "out": "*bf16"}
        compile_for_hopper(da._merge_kernel, types, dict(DIM=dim, BLOCK_D=block_d, SPLITS=splits))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_attention_matches_the_references_at_real_shapes():
    pytest.importorskip("triton")
    exec(CHECK, scope := {})
    from disagg.common.models.decode_attention import model_splits

    bf16 = torch.bfloat16
    for lens in ([1000], [1, 4096, 0, 777], [513] * 3 + [2000] * 61):
        for page_size in (1, 16, 64):
            splits = (model_splits(len(lens), 32, 4096, 4), 64)
            scope["gqa_case"](lens, page_size, 32, 4, 128, bf16, splits, "cuda")  # Qwen3-30B-A3B
            scope["gqa_case"](lens, page_size, 64, 8, 128, torch.float32, splits[:1], "cuda")
        for heads in (16, 128):  # DeepSeek-V3 at TP 8 and TP 1
            splits = (model_splits(len(lens), heads, 4096), 64)
            scope["mla_case"](lens, 64, heads, 512, 64, bf16, splits, "cuda")
        scope["mla_case"](lens, 1, 16, 512, 64, bf16, (8,), "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_attention_replays_in_a_cuda_graph():
    """Captured once at one set of lengths, replayed at others: the chunks follow kv_lens."""
    pytest.importorskip("triton")
    from disagg.common.models import decode_attention as da

    dev, bf16, batch, splits = torch.device("cuda"), torch.bfloat16, 4, 16
    kv = torch.randn(300, 2, 16, 4, 128, dtype=bf16, device=dev)
    pages = torch.randn(300, 64, 576, dtype=bf16, device=dev)
    q = torch.randn(batch, 32, 128, dtype=bf16, device=dev)
    q_nope = torch.randn(batch, 16, 512, dtype=bf16, device=dev)
    q_pe = torch.randn(batch, 16, 64, dtype=bf16, device=dev)
    table = torch.randperm(300, device=dev)[: batch * 64].view(batch, 64).int()
    lens = torch.tensor([1, 1, 1, 1], dtype=torch.int32, device=dev)
    out_g, out_m = torch.empty_like(q), torch.empty_like(q_nope)
    work_g = da.decode_workspace(batch, 32, splits, 128, dev)
    work_m = da.decode_workspace(batch, 16, splits, 512, dev)

    def step():
        da.gqa_decode(q, kv, table, lens, 0.088, splits, out=out_g, workspace=work_g)
        da.mla_decode(q_nope, q_pe, pages, table[:, :16], lens, 0.072, splits, out=out_m, workspace=work_m)

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens in ([1000, 0, 17, 1024], [5, 1024, 333, 64]):
        lens.copy_(torch.tensor(new_lens))
        graph.replay()
        want_g = da.gqa_decode_reference(q, kv, table, lens, 0.088)
        want_m = da.mla_decode_reference(q_nope, q_pe, pages, table[:, :16], lens, 0.072)
        for got, want in ((out_g, want_g), (out_m, want_m)):
            torch.testing.assert_close(got.float(), want, atol=want.abs().max().item() / 64, rtol=0)


def test_mla_launch_takes_this_devices_entry_for_the_batch_bucket(monkeypatch):
    """mla_launch: the tuned entry of the batch's next power of two for this shape and device; any
    other batch, shape or device launches the defaults (what the engine ran before any tune)."""
    from disagg.common.models import decode_attention as da

    tuned = dict(block_n=16, num_warps=8, num_stages=1)
    key = da.mla_config_key(16, 512, 64, 16, "GPU A")
    monkeypatch.setattr(da, "tuned_configs", lambda: {key: {"8": tuned}})
    assert da.mla_launch(5, 16, 512, 64, 16, "GPU A") == tuned  # bucket 8
    assert da.mla_launch(8, 16, 512, 64, 16, "GPU A") == tuned
    for args in ((4, 16, 512, 64, 16, "GPU A"), (9, 16, 512, 64, 16, "GPU A"), (8, 16, 512, 64, 16, "GPU B"),
                 (8, 128, 512, 64, 16, "GPU A"), (8, 16, 512, 64, 64, "GPU A")):  # fmt: skip
        assert da.mla_launch(*args) == da.MLA_DEFAULT_LAUNCH
