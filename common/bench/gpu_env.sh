# Source on the lent GPU machine (repo root). The image has no package index: wheels travel in
# .gpu/<set>/*.whl and are installed once per machine into /tmp/site; `disagg.*` is made importable
# without pip-installing the project; a carried FlashInfer JIT cache (.gpu/fi_cache.tgz) skips
# minutes of kernel builds. The sets (cp312 manylinux wheels, `pip download --no-deps`; .gpu/ is
# git-ignored, so a new checkout builds them again: `bash common/bench/gpu_sets.sh`):
#   fi:     flashinfer-python 0.7.2.post1, apache-tvm-ffi                           (34 MB)
#   base:   pyzmq, gguf, fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types,
#           annotated-doc, typing-inspection, opentelemetry-api                     (4 MB)
#   router: orjson, httptools                                                      (0.5 MB)
#   ucx:    ucxx-cu13, libucxx-cu13, libucx-cu13, rmm-cu13, librmm-cu13, rapids-logger (23 MB)
#   tokcache: a tokenizer-only copy of the default model's folder (presets borrow its tokenizer)
#   gg_a, gg_b: the default model's GGUF split in two (98 MB; one call carries at most 64 MiB)
# One call's carry is at most 64 MiB: fi + base + fi_cache.tgz in one call, then ucx + router +
# tokcache in the next while the machine is warm (30 s). A kernel cache too large to travel beside fi
# (the sixteenth session's, 27 MB with the 8B's H100 prefill modules) goes as two pieces, .gpu/kcp1
# and .gpu/kcp2, over two calls: gpu_runs.sh's kc-parts step joins them.
for _d in .gpu/*/; do
  _whl=("$_d"*.whl)
  _name=$(basename "$_d")
  if [ -e "${_whl[0]}" ] && [ ! -e "/tmp/site/.installed-$_name" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${_whl[@]}" \
      >/dev/null 2>&1 && touch "/tmp/site/.installed-$_name" && echo "installed wheels: $_name"
  fi
done
_kc=.gpu/kc.txz; [ -f "$_kc" ] || _kc=.gpu/kc.tgz; [ -f "$_kc" ] || _kc=.gpu/fi_cache.tgz
if [ -f "$_kc" ] && [ ! -e /tmp/.fi_cache_done ]; then
  # Kernel caches of an earlier machine (FlashInfer's JIT builds, and in kc.tgz Triton's too).
  # NOTE: ninja rebuilds an object when any input (source, header: the CUDA and system headers
  # too) is newer than it. So the extracted objects keep their build-time mtimes (no --touch) and
  # only the inputs that travel with us are dated back: the wheels in /tmp/site and FlashInfer's
  # generated sources. Dating the objects back as well (as this script did until the fifth
  # session) made them older than the image's headers: every module was rebuilt (~200 s).
  # kc.txz (xz, a quarter of the gzip size: 5.9 MB against 25) goes through Python's lzma where xz is missing
  if [ "${_kc##*.}" = txz ]; then
    { command -v xz >/dev/null && tar xJf "$_kc" -C /; } 2>/dev/null \
      || python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall('/')" "$_kc"
  else tar xzf "$_kc" -C / 2>/dev/null; fi && touch /tmp/.fi_cache_done
  find /tmp/site /root/.cache/flashinfer/*/*/generated -exec touch -h -d '2000-01-01 00:00:00' {} + 2>/dev/null
fi
mkdir -p /tmp/shim/disagg
touch /tmp/shim/disagg/__init__.py
for d in common prefill decode router transfer; do ln -sfn "$PWD/$d" /tmp/shim/disagg/$d; done
ln -sfn "$PWD/common/bench" /tmp/shim/disagg/bench
export PYTHONPATH=/tmp/site:/tmp/shim:/tmp/gg:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DISAGG_CACHE_DIR=/tmp/disagg-cache
# a dummy preset borrows the default model's tokenizer: a tokenizer-only copy of its folder will do
# (.gpu/tokcache/models, 3.4 MB, or the same folder as .gpu/tokz/tok.tgz, 0.8 MB: with it and
# .gpu/base2 = base without gguf, fi + ucx + base2 + tokz fit one call's 64 MiB, all a PD server needs)
if [ ! -e "$DISAGG_CACHE_DIR/models/SmolLM2-135M-Instruct" ]; then
  mkdir -p "$DISAGG_CACHE_DIR"
  if [ -d .gpu/tokcache/models ]; then cp -r .gpu/tokcache/models "$DISAGG_CACHE_DIR/"
  elif [ -f .gpu/tokz/tok.tgz ]; then tar xzf .gpu/tokz/tok.tgz -C "$DISAGG_CACHE_DIR"; fi
fi
# NOTE: with the kernel caches carried as above a fresh H200 starts an 8B dummy server in ~30 s
# (fifth session); without them its first start builds FlashInfer's modules for ~200 s.
