"""Shared fixtures: the default model, tiny random HF models, in-process engines and a transformers
reference. Memory: a test module holds at most one engine and the reference models it used; both
are freed when the module ends (servers the tests start are processes of their own: tests/procs.py).
"""

from __future__ import annotations

import functools
import gc
import re

import pytest
import torch

# the settings of the engine PD and server tests compare against (default model, small pool)
REFERENCE_ENGINE = dict(max_total_tokens=4096, context_length=512)


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from disagg.common.models.model_files import ensure_default_model

    return str(ensure_default_model())


class EngineCache:
    """In-process engines, at most one alive at a time: each holds its own weights and KV pool
    (~1 GB for the default model), so tests asking for the same settings share one and asking for
    other settings shuts the previous one down first."""

    def __init__(self):
        self._key: tuple | None = None
        self._engine = None

    def get(self, **kw):
        from disagg.common.engine.offline import Engine

        key = tuple(sorted((k, repr(v)) for k, v in kw.items()))
        if key != self._key:
            self.close()
            self._engine, self._key = Engine(**kw), key
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
        self._engine = self._key = None
        gc.collect()


@pytest.fixture(scope="module")
def engines(default_model_path):
    cache = EngineCache()
    yield cache
    cache.close()


@pytest.fixture
def reference_engine(engines):
    """The default model at REFERENCE_ENGINE's settings (shared within the module)."""
    return engines.get(**REFERENCE_ENGINE)


@pytest.fixture(scope="module", autouse=True)
def _free_reference_models():
    yield
    _hf_model.cache_clear()  # a 135M model is ~0.5 GB in float32: not kept for the next module
    gc.collect()


@functools.lru_cache(maxsize=2)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference: transformers `generate`, greedy, float32, one prompt at a time (no padding)."""
    model = _hf_model(path)
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(input_ids) :].tolist()


TINY_CONFIGS = {
    "llama": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    "qwen3": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], tie_word_embeddings=False, head_dim=16
    ),
}


# tiny MoE families: made where a test asks (make_tiny_model), not by the tiny_models fixture
TINY_MOE_CONFIGS = {
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "mixtral": dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
}


def make_tiny_model(path, family: str, seed: int = 0, **overrides) -> str:
    """A random HF model at tiny shapes (a TINY_CONFIGS or TINY_MOE_CONFIGS family), saved as a
    safetensors folder (no tokenizer)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_id=None,
        bos_token_id=None,
    )
    spec.update(TINY_CONFIGS.get(family) or TINY_MOE_CONFIGS[family])
    spec.update(overrides)
    config = CONFIG_MAPPING[spec.pop("model_type")](**spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger random weights than the default init: sharper, tie-free logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(root / family, family) for family in TINY_CONFIGS}


def fresh_prompts_plan(q_lens, page_size: int, vocab: int, seed: int = 0, first_page: int = 0):
    """A BatchPlan of fresh prompts (no cached prefix) of these lengths, random ids, on consecutive
    pages from `first_page` on, each prompt's last row sampled (the prefill CUDA graphs' batches)."""
    from disagg.common.engine.model_runner import BatchPlan

    gen = torch.Generator().manual_seed(seed)
    ids, positions, pages, offsets, logits_index, tables, page = [], [], [], [], [], [], first_page
    for q in q_lens:
        table = list(range(page, page + (q + page_size - 1) // page_size))
        page += len(table)
        ids += torch.randint(0, vocab, (q,), generator=gen).tolist()
        positions += range(q)
        pages += [table[p // page_size] for p in range(q)]
        offsets += [p % page_size for p in range(q)]
        logits_index.append(len(ids) - 1)
        tables.append(table)
    return BatchPlan(ids, positions, pages, offsets, logits_index, list(q_lens), list(q_lens), tables)


def assert_pool_clean(scheduler) -> None:
    """Every page is free or held by the prefix cache; after dropping the cache, all are free."""
    assert not scheduler.running and not scheduler.waiting
    assert scheduler.pool.num_free_pages + scheduler.cache.num_cached_pages == scheduler.pool.num_pages
    scheduler.cache.reset()
    assert scheduler.pool.num_free_pages == scheduler.pool.num_pages


def assert_logprobs_close(a: list[dict], b: list[dict]) -> None:
    """vLLM's check_logprobs_close on two Engine.generate results (top_logprobs_num >= 5): up to
    the first difference the tokens are equal; at it each side's token is in the other's top 5
    (two bf16 computations of random-weight logits may flip a near tie, not pick a wrong token)."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        xs, ys = x["output_ids"], y["output_ids"]
        k = next((j for j, (s, t) in enumerate(zip(xs, ys, strict=True)) if s != t), None)
        if k is None:
            continue
        assert xs[k] in {t for t, _ in y["meta_info"]["output_top_logprobs"][k]}, (i, k)
        assert ys[k] in {t for t, _ in x["meta_info"]["output_top_logprobs"][k]}, (i, k)


def compile_for_hopper(kernel, types: dict[str, str], consts: dict):
    """Compile a Triton kernel for sm_90 on this CPU machine (no GPU: Triton's own ptxas), as the H200
    would: the compiler's checks that Triton's interpreter skips (a name typed differently in two
    branches, a bad cast). `types`: Triton types of the pointer and float arguments by name; the
    rest are int32 (`stride*`: int64) but for the constexprs in `consts`. A PDL-aware kernel (a `PDL`
    argument, common/models/pdl.py) is compiled with PDL=True unless `consts` say otherwise (the
    plain variant's code and more), and its PTX must wait for its predecessor before its first
    global memory access. Returns the compiled kernel (`.asm["ptx"]`, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    if "PDL" in names:
        consts = {"PDL": True, **consts}
    signature = {
        n: types.get(n) or ("constexpr" if n in consts else "i64" if n.startswith("stride") else "i32")
        for n in names
    }
    src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    if consts.get("PDL"):
        assert_waits_before_memory(compiled.asm["ptx"], kernel.__name__)
    return compiled


# PTX instructions that touch global memory (loads, stores, atomics, reductions, async copies, TMA)
_GLOBAL_ACCESS = re.compile(r"\b(ld\.global|st\.global|atom\.|red\.|cp\.async|cp\.reduce\.async)")


def assert_waits_before_memory(ptx: str, name: str) -> None:
    """The kernel's PTX waits for its predecessor (griddepcontrol.wait) before any global memory
    access (a PDL launch with a load above the wait reads stale memory, silently) and lets its
    successor launch (griddepcontrol.launch_dependents)."""
    wait = ptx.find("griddepcontrol.wait")
    assert wait >= 0, f"{name}: no griddepcontrol.wait in its PTX"
    assert "griddepcontrol.launch_dependents" in ptx, f"{name}: no griddepcontrol.launch_dependents"
    first = _GLOBAL_ACCESS.search(ptx)
    assert first is not None and wait < first.start(), f"{name}: {first and first.group(0)} before the wait"
