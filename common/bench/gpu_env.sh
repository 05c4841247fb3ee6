# Source on the lent GPU machine (repo root): installs the carried wheels and makes `disagg.*`
# importable without pip-installing the project (the GPU image has no package index).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl .gpu/whl/*.whl 2>/dev/null) >/dev/null 2>&1 || true
mkdir -p /tmp/shim/disagg
touch /tmp/shim/disagg/__init__.py
for d in common prefill decode router transfer; do ln -sfn "$PWD/$d" /tmp/shim/disagg/$d; done
ln -sfn "$PWD/common/bench" /tmp/shim/disagg/bench
export PYTHONPATH=/tmp/site:/tmp/shim:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
set +e
