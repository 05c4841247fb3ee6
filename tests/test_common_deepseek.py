"""DeepSeek-V2/V3 (MLA over a latent KV pool, DeepSeekMoE) give transformers' greedy tokens on tiny
random checkpoints, through chunked prefill, the prefix cache and batches; the pool holds one
latent per token (not per-head K and V) and ends with every page free."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_pool_clean, hf_greedy

_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    routed_scaling_factor=2.5,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    eos_token_id=None,
    bos_token_id=None,
    tie_word_embeddings=False,
)
TINY = {
    # V2-Lite-like: no q compression, softmax gate with group-limited greedy top-k, all layers MoE
    "v2": dict(
        _COMMON,
        q_lora_rank=None,
        first_k_dense_replace=0,
        topk_method="group_limited_greedy",
        topk_group=1,  # both experts from the best group: the limit changes the choice
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    # V3: q compression, sigmoid gate + correction bias, grouped top-k, a dense first layer, YaRN
    "v3": dict(
        _COMMON,
        q_lora_rank=32,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=8.0,
            original_max_position_embeddings=64,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
}


def make_tiny_deepseek(path, version: str, seed: int = 0, **overrides) -> str:
    """A tiny DeepSeek V2/V3 with random weights (TINY[version] + overrides), saved at `path`."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config_cls, model_cls = {
        "v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
        "v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    }[version]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY[version], **overrides})).float()
    with torch.no_grad():  # sharper logits than the default init, and a bias that changes routing
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08 if "mlp.gate" not in name else 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("deepseek")
    return {v: make_tiny_deepseek(root / v, v) for v in TINY}


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_tiny_deepseek_matches_transformers(engines, tiny_deepseek, version):
    path = tiny_deepseek[version]
    engine = engines.get(model_path=path, page_size=4, chunked_prefill_size=16, max_total_tokens=2048)
    rng = random.Random(version)
    # 40 and 57 tokens cross the 16-token chunks; five prompts decode as one batch
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 5, 17, 40, 57)]
    outs = engine.generate(prompts, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(path, prompt, 16)
    assert_pool_clean(engine.scheduler)


def test_prefix_cache_reuses_latent_pages(engines, tiny_deepseek):
    path = tiny_deepseek["v3"]
    engine = engines.get(model_path=path, page_size=4, chunked_prefill_size=16, max_total_tokens=2048)
    rng = random.Random(1)
    shared = [rng.randrange(512) for _ in range(33)]
    prompts = [shared + [rng.randrange(512) for _ in range(n)] for n in (3, 9)]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    first = engine.generate(prompts[:1], params)[0]
    second = engine.generate(prompts[1:], params)[0]
    assert second["meta_info"]["cached_tokens"] >= 32
    for prompt, out in zip(prompts, (first, second), strict=True):
        assert out["output_ids"] == hf_greedy(path, prompt, 12)
    assert_pool_clean(engine.scheduler)


def test_pool_holds_one_latent_per_token(engines, tiny_deepseek):
    """kv_lora_rank + qk_rope_head_dim values per token per layer, not 2 x heads x head_dim."""
    engine = engines.get(model_path=tiny_deepseek["v3"], page_size=4, max_total_tokens=256)
    pool = engine.scheduler.runner.pool
    c = TINY["v3"]
    latent = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    assert pool.bytes_per_page == c["num_hidden_layers"] * 4 * latent * 4  # float32
    assert pool.num_pages == 256 // 4


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_x_projections_load_into_one_gemm(engines, tiny_deepseek, version):
    """At tp 1 q (V2's q_proj, V3's q_a_proj) and kv_a are one GEMM whose rows hold the two
    checkpoint tensors as they are (the tokens above come from this layout)."""
    from safetensors import safe_open

    path = tiny_deepseek[version]
    engine = engines.get(model_path=path, page_size=4, chunked_prefill_size=16, max_total_tokens=2048)
    attn = engine.scheduler.runner.model.layers[1].self_attn
    assert attn.fused_qkv_a and not hasattr(attn, "kv_a_proj_with_mqa")
    q_name = "q_a_proj" if version == "v3" else "q_proj"
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        want = torch.cat(
            [f.get_tensor(f"model.layers.1.self_attn.{n}.weight") for n in (q_name, "kv_a_proj_with_mqa")]
        )
    assert torch.equal(attn.qkv_a_proj.weight.float(), want.float())


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_gate_picks_transformers_experts(version):
    """Same experts and weights as transformers' router, on scores where the groups and the
    correction bias change the choice."""
    from disagg.common.models.deepseek import DeepseekGate
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config_cls, router_cls = {
        "v2": (DeepseekV2Config, DeepseekV2TopkRouter),
        "v3": (DeepseekV3Config, DeepseekV3TopkRouter),
    }[version]
    config = config_cls(**TINY[version])
    torch.manual_seed(0)
    ref = router_cls(config)
    ref.weight.data.normal_(0, 1.0)
    gate = DeepseekGate(config, config.n_routed_experts)
    gate.weight.data.copy_(ref.weight)
    if version == "v3":
        ref.e_score_correction_bias.normal_(0, 0.5)
        gate.e_score_correction_bias.data.copy_(ref.e_score_correction_bias)
    x = torch.randn(64, config.hidden_size)
    _, ref_w, ref_ids = ref(x)
    w, ids = gate(x)
    ref_ids, order = ref_ids.sort(dim=-1)
    ids, mine = ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.gather(1, mine), ref_w.gather(1, order))
    # the group limit matters on these scores: plain top-k would pick other experts for some tokens
    plain = (torch.sigmoid if version == "v3" else lambda t: t.softmax(-1))(x @ ref.weight.T)
    assert not torch.equal(plain.topk(config.num_experts_per_tok, dim=-1)[1].sort(-1)[0], ids)


@pytest.fixture(scope="module")
def two_shared(tmp_path_factory) -> str:
    """The tiny V2 with two shared experts (the shared MLP is two routed experts wide)."""
    return make_tiny_deepseek(tmp_path_factory.mktemp("shared2") / "v2", "v2", n_shared_experts=2)


@pytest.mark.parametrize("version", ["v2-two-shared", "v3", "v3-unfused"])
def test_shared_experts_fused_into_the_routed_ones_keep_transformers_tokens(
    engines, tiny_deepseek, two_shared, version
):
    """The default: each MoE layer's shared MLP becomes one expert slot a routed expert's width (two
    for the two-shared V2), appended to the stack, that every token routes to with weight 1; the
    shared MLP is gone. --disable-shared-experts-fusion keeps the shared MLP. Transformers' tokens
    through chunks and a batch either way."""
    from disagg.common.models.deepseek import DeepseekMoE

    path = two_shared if version == "v2-two-shared" else tiny_deepseek["v3"]
    unfused = version == "v3-unfused"
    engine = engines.get(model_path=path, page_size=4, chunked_prefill_size=16, max_total_tokens=1536,
                         disable_shared_experts_fusion=unfused)  # fmt: skip
    moes = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, DeepseekMoE)]
    shared = 0 if unfused else 2 if version == "v2-two-shared" else 1
    assert moes and all((m.shared_experts is None) != unfused and m.num_shared_fused == shared for m in moes)
    assert all(m.experts.w13.shape[0] == m.num_experts + shared for m in moes)
    # the stacks were allocated with room for the shared slots: fusing copied none (the load's peak)
    assert all(m.fused_in_place for m in moes)
    rng = random.Random(version)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 5, 17, 40)]
    outs = engine.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(path, prompt, 12)
    assert_pool_clean(engine.scheduler)
    engines.close()  # the fusion is decided at load: no later test gets this engine


@pytest.mark.slow
@pytest.mark.parametrize(
    "version,kw",
    [("v2", dict(tp=2)), ("v3-fp8", dict(tp=2)), ("v3-fp8", dict(tp=2, ep=2))],
    ids=["v2-tp2", "v3-fp8-tp2", "v3-fp8-tp2-ep2"],
)
def test_tiny_deepseek_tp_matches_transformers(tiny_deepseek, fp8_deepseek, version, kw):
    """Heads split across ranks, the latent replicated on each (its pool is the same on every rank);
    the FP8 block-quantized V3 checkpoint dequantized per rank (each rank copies its slice, and with
    --ep 2 only its experts) gives the tokens of transformers on the dequantized weights."""
    from disagg.common.engine.offline import Engine

    path, ref_path = (tiny_deepseek[version],) * 2 if version == "v2" else fp8_deepseek
    prompts = [[1, 2, 3, 4, 5], list(range(7, 30)), [300]]
    engine = Engine(model_path=path, page_size=4, chunked_prefill_size=8, max_total_tokens=1024, **kw)
    try:
        outs = engine.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    finally:
        engine.shutdown()
    assert [o["output_ids"] for o in outs] == [hf_greedy(ref_path, p, 12) for p in prompts]


def _quantize_fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's checkpoint format: float8_e4m3fn weights, one float32 scale_inv per block."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[: w.shape[0], : w.shape[1]] = w
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3's largest value
    q = (blocks / scale[:, None, :, None]).view_as(padded)[: w.shape[0], : w.shape[1]]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


@pytest.fixture(scope="module")
def fp8_deepseek(tmp_path_factory, tiny_deepseek):
    """The tiny V3 as an FP8 block-quantized checkpoint, and the same weights dequantized (the reference)."""
    import json

    from safetensors.torch import load_file, save_file

    root, block = tmp_path_factory.mktemp("fp8"), 16
    src = Path(tiny_deepseek["v3"])
    state = load_file(src / "model.safetensors")
    fp8, dequant = {}, {}
    for name, w in state.items():
        if w.dim() == 2 and name.endswith("proj.weight"):  # attention, MLP and experts; not gate/embeddings
            q, scale = _quantize_fp8_blocks(w, block)
            fp8[name], fp8[f"{name}_scale_inv"] = q, scale
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            dequant[name] = q.float() * full[: w.shape[0], : w.shape[1]]
        else:
            fp8[name] = dequant[name] = w
    for folder, tensors in (("fp8", fp8), ("ref", dequant)):
        (root / folder).mkdir()
        save_file(tensors, root / folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((src / "config.json").read_text())
        if folder == "fp8":
            config["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [block, block],
            }
        (root / folder / "config.json").write_text(json.dumps(config))
    return str(root / "fp8"), str(root / "ref")


def test_fp8_block_quantized_checkpoint_loads(engines, fp8_deepseek):
    """FP8 weights with block scales are dequantized at load: the tokens of the dequantized model."""
    fp8_path, ref_path = fp8_deepseek
    engine = engines.get(model_path=fp8_path, page_size=4, chunked_prefill_size=16, max_total_tokens=1024)
    rng = random.Random(8)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 21)]
    outs = engine.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == hf_greedy(ref_path, prompt, 12)
    assert_pool_clean(engine.scheduler)


def test_fp8_block_gemms_follow_the_dequantized_model(engines, fp8_deepseek, monkeypatch):
    """The FP8 GEMM path (DISAGG_FP8_GEMM=torch: the Hopper kernel's math in torch) keeps the weights
    in FP8 blocks and quantizes activations per token group: its first greedy tokens are the
    dequantized model's, and its logprobs stay close to the reference's."""
    fp8_path, ref_path = fp8_deepseek
    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    engine = engines.get(model_path=fp8_path, page_size=4, max_total_tokens=512, random_seed=1)
    assert engine.scheduler.runner.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    prompt = [7, 100, 3, 256, 41, 9]
    out = engine.generate([prompt], {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True,
                                     "return_logprob": True})[0]  # fmt: skip
    assert out["output_ids"] == hf_greedy(ref_path, prompt, 4)
    ref = _hf_logprobs(ref_path, prompt + out["output_ids"])[len(prompt) - 1 :]
    ours = out["meta_info"]["output_logprobs"]
    assert max(abs(a - b) for a, b in zip(ours, ref.tolist(), strict=True)) < 0.2, (ours, ref)
    engines.close()  # the next engine of this module runs without FP8 GEMMs


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-shape", "fp8"])
def test_a_fused_layer_computes_what_the_shared_mlp_did(engines, tiny_deepseek, two_shared, fp8_deepseek,
                                                        monkeypatch, fp8):  # fmt: skip
    """One MoE layer on the same tokens before and after fuse_shared_experts: the same output (the
    two-shared V2; the FP8 V3 with DISAGG_FP8_GEMM=torch, where the shared MLP's GEMMs quantized the
    activations per group and the expert slots do not: close, not equal)."""
    from disagg.common.models.deepseek import DeepseekMoE

    if fp8:
        monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    path = fp8_deepseek[0] if fp8 else two_shared
    engine = engines.get(
        model_path=path, page_size=4, max_total_tokens=640, disable_shared_experts_fusion=True
    )
    layer = next(m for m in engine.scheduler.runner.model.modules() if isinstance(m, DeepseekMoE))
    x = torch.randn(5, layer.experts.w2.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = layer(x)
        assert layer.fuse_shared_experts()
        after = layer(x)
    engines.close()  # its model changed under it
    err = ((after - before).norm() / before.norm()).item()
    assert err < (3e-2 if fp8 else 1e-5), err


def test_benchmark_counts_fused_shared_experts_as_read_every_step(engines, two_shared):
    """offline.py's roofline: the fused shared slots stay in the bytes read every step (as the shared
    MLP was), so fusing changes no figure's roofline."""
    from disagg.common.bench.offline import weight_traffic
    from disagg.common.models.deepseek import fuse_shared_experts

    engine = engines.get(
        model_path=two_shared, page_size=4, max_total_tokens=640, disable_shared_experts_fusion=True
    )
    model = engine.scheduler.runner.model
    before = weight_traffic(model)
    assert fuse_shared_experts(model) == 3  # every layer of the tiny V2 is MoE
    engines.close()  # its model changed under it
    assert weight_traffic(model) == before


def test_fp8_shared_experts_fuse_with_their_block_scales(engines, fp8_deepseek, monkeypatch):
    """FP8 experts and an FP8 shared MLP (DISAGG_FP8_GEMM=torch keeps both in blocks): the fused slot
    takes the shared MLP's FP8 values and its block scales cut alike; the dequantized model's tokens."""
    from disagg.common.models.deepseek import DeepseekMoE

    fp8_path, ref_path = fp8_deepseek
    monkeypatch.setenv("DISAGG_FP8_GEMM", "torch")
    engine = engines.get(model_path=fp8_path, page_size=4, max_total_tokens=768, random_seed=1)
    moes = [m for m in engine.scheduler.runner.model.modules() if isinstance(m, DeepseekMoE)]
    assert moes and all(m.num_shared_fused == 1 and m.experts.w13.dtype == torch.float8_e4m3fn for m in moes)
    assert all(m.experts.w13_scale_inv.shape[0] == m.num_experts + 1 for m in moes)
    assert all(m.fused_in_place for m in moes)  # FP8 values and scales into the room left for them
    prompt = [7, 100, 3, 256, 41, 9]
    out = engine.generate([prompt], {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})[0]
    assert out["output_ids"] == hf_greedy(ref_path, prompt, 4)
    engines.close()


def _hf_logprobs(path: str, ids: list[int]) -> torch.Tensor:
    """transformers' log-probability of each next token of `ids` (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_json_model_override_args_builds_fewer_layers(engines, tiny_deepseek):
    """--json-model-override-args '{"num_hidden_layers": 2}' on a 3-layer checkpoint: a 2-layer model
    (the third layer's tensors skipped) with the tokens of transformers' 2-layer load, a 2-layer pool."""
    from transformers import AutoModelForCausalLM

    path = tiny_deepseek["v3"]
    engine = engines.get(model_path=path, page_size=4, max_total_tokens=512,
                         json_model_override_args='{"num_hidden_layers": 2}')  # fmt: skip
    assert len(engine.scheduler.runner.model.layers) == 2
    assert engine.scheduler.runner.pool.num_layers == 2
    prompt = [5, 17, 200, 3, 3, 90, 411]
    out = engine.generate([prompt], {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})[0]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=2).eval()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert out["output_ids"] == expected[0, len(prompt) :].tolist()
    assert out["output_ids"] != hf_greedy(path, prompt, 10)  # the third layer matters


def test_mla_models_pick_flashinfer_mla_where_its_kernels_fit():
    """An MLA model takes FlashInfer's MLA kernels (`_mla` backends) where they take its shapes
    (DeepSeek-V3, V2-Lite); a model they do not take (the tiny test config: kv_lora_rank 32) runs
    torch under auto and refuses an explicit flashinfer at start; torch stays torch."""
    from disagg.common.engine.attention import TorchBackend, create_attention_backend
    from disagg.common.models.deepseek import attention_backend_for
    from disagg.common.models.weights import load_config
    from transformers import DeepseekV3Config

    v3, lite, llama = load_config("DeepSeek-V3"), load_config("DeepSeek-V2-Lite"), load_config("Llama-3.1-8B")
    tiny = DeepseekV3Config(**TINY["v3"])
    assert attention_backend_for(v3, "auto") == attention_backend_for(lite, "auto") == "auto_mla"
    assert attention_backend_for(v3, "flashinfer") == "flashinfer_mla"
    assert attention_backend_for(v3, "torch") == attention_backend_for(tiny, "auto") == "torch"
    assert attention_backend_for(llama, "auto") == "auto"
    with pytest.raises(ValueError, match="kv_lora_rank 32"):
        attention_backend_for(tiny, "flashinfer")
    assert isinstance(create_attention_backend("auto_mla", torch.device("cpu")), TorchBackend)  # no GPU


@pytest.mark.parametrize("bad", ["[4]", "{num_hidden_layers: 4}"])
def test_json_model_override_args_must_be_a_json_object(bad):
    from disagg.common.models.weights import load_config

    with pytest.raises(ValueError, match="--json-model-override-args"):
        load_config("DeepSeek-V3", bad)


@pytest.mark.parametrize("preset,layers", [("DeepSeek-V3", 61), ("DeepSeek-V2-Lite", 27)])
def test_real_shapes_plan_a_latent_pool(preset, layers):
    """The pool planner's per-token size for the real shapes is the latent's (576 values per layer):
    ~70 KB per token for V3 in bf16, where per-head K and V would take ~71x more (128k tokens: 8.6 GiB
    instead of ~610 GiB)."""
    from disagg.common.models.decoder import check_tp_layout, head_dim_of, kv_heads_per_rank
    from disagg.common.models.weights import load_config

    config = load_config(preset)
    for tp in (1, 8):
        assert kv_heads_per_rank(config, tp) * head_dim_of(config) * 2 == 576
    assert config.num_hidden_layers == layers
    check_tp_layout(config, 8, 8 if preset == "DeepSeek-V3" else 1)


def test_absorbed_decode_equals_expanded_attention():
    """The decode form (queries absorbed into the latent space) computes the prefill form's attention
    over the same paged latents, for requests of different lengths."""
    from disagg.common.engine.attention import ForwardBatch, TorchBackend
    from disagg.common.models.deepseek import MLAttention, latent_half_dim
    from disagg.common.models.layers import RotaryEmbedding
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**TINY["v3"])
    torch.manual_seed(0)
    attn = MLAttention(config, 0, RotaryEmbedding(config, config.qk_rope_head_dim, 512))
    for p in attn.parameters():
        p.data.normal_(0, 0.1)
    ps, kv_lens = 4, [9, 30, 1]
    tables = [[3, 0, 7], [1, 2, 4, 5, 6, 8, 9, 10], [11]]
    kv = torch.randn(1, 12, 2, ps, 1, latent_half_dim(config))

    def t(x):
        return torch.tensor(x, dtype=torch.long)

    pos = [n - 1 for n in kv_lens]
    batch = ForwardBatch(
        input_ids=t([0, 0, 0]),
        positions=t(pos),
        out_page=t([tb[p // ps] for tb, p in zip(tables, pos, strict=True)]),
        out_offset=t([p % ps for p in pos]),
        q_lens=[1, 1, 1],
        kv_lens=kv_lens,
        page_tables=tables,
        logits_index=t([0, 1, 2]),
        page_size=ps,
    )
    batch.k_rows = batch.out_page * (2 * ps) + batch.out_offset
    TorchBackend().prepare(batch)
    q_nope = torch.randn(3, attn.num_heads, attn.nope)
    q_pe = torch.randn(3, attn.num_heads, attn.rope_dim)
    from disagg.common.models.deepseek import gather_latent

    latent = gather_latent(kv[0], batch)
    absorbed = attn.absorbed_attention(q_nope, q_pe, latent, batch)
    expanded = attn.expanded_attention(q_nope, q_pe, latent, batch)
    assert absorbed.shape == (3, attn.num_heads, attn.v_dim)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-5)


def test_expert_load_counts_deepseek_layers(engines, tiny_deepseek):
    """moe.py's expert-load counters see the DeepSeekMoE layers: every routed (token, slot) counted."""
    from disagg.common.models.moe import expert_load, set_expert_load_stats

    engine = engines.get(model_path=tiny_deepseek["v3"], page_size=4, max_total_tokens=512)
    model = engine.scheduler.runner.model
    set_expert_load_stats(model, True)
    try:
        expert_load(model, reset=True)
        engine.generate([[5, 6, 7, 8, 9]], {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
        load = expert_load(model)
    finally:
        set_expert_load_stats(model, False)
    c = TINY["v3"]
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
    # 5 prompt tokens + 2 decoded ones are forwarded (the last sampled token is not)
    assert load.shape == (moe_layers, c["n_routed_experts"])
    assert load.sum(dim=1).tolist() == [7 * c["num_experts_per_tok"]] * moe_layers
