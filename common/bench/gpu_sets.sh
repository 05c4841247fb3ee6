#!/usr/bin/env bash
# Builds .gpu/ (git-ignored, so every new checkout lacks it) on the development machine: what
# gpu_env.sh installs on the lent GPU machine, which has no package index. Run from the repo root
# after the README's install (it reads the venv's versions and the default model):
#
#   bash common/bench/gpu_sets.sh        # ~1 min; then carry e.g. [".gpu/fi", ".gpu/base", ".gpu/tokz"]
#
# The sets (each well under one call's 64 MiB carry; gpu_env.sh lists them): fi and ucx from
# ../shared/tools/gpu-wheels, base and router at the versions .venv runs (a pydantic that does not
# match its pydantic-core fails at import), tokz a tokenizer-only copy of the default model's folder,
# gg_a / gg_b its GGUF in two halves (the gguf-a / gguf-b steps). The kernel cache (.gpu/kc.txz) is not
# made here: `gpu_runs.sh s30` (or any run, then `fi-cache`) builds it on the device; cat $OUT/kc_* > .gpu/kc.txz.
set -euo pipefail
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude; }
mkdir -p .gpu/fi .gpu/ucx .gpu/base .gpu/router .gpu/tokz .gpu/gg_a .gpu/gg_b
tmp=$(mktemp -d)
../shared/tools/gpu-wheels "$tmp" > /dev/null
mv "$tmp"/flashinfer_python-*.whl "$tmp"/apache_tvm_ffi-*.whl .gpu/fi/
mv "$tmp"/*.whl .gpu/ucx/
rm -rf "$tmp"
pinned() { .venv/bin/pip list --format=freeze 2>/dev/null | grep -iE "^($1)=="; }
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$1" "${@:2}" 2>&1 | grep -v "is ignored" || true
}
# shellcheck disable=SC2046 # one argument a pinned requirement
download .gpu/base $(pinned 'pyzmq|gguf|fastapi|starlette|uvicorn|pydantic|pydantic[-_]core|annotated[-_]types|annotated[-_]doc|typing[-_]inspection|opentelemetry[-_]api')
# shellcheck disable=SC2046
download .gpu/router $(pinned 'orjson|httptools')
models=$(.venv/bin/python -c "from disagg.common.config import cache_dir; print(cache_dir())")
tar czf .gpu/tokz/tok.tgz -C "$models" --exclude=model.safetensors models/SmolLM2-135M-Instruct
gguf=$(.venv/bin/python -c "from disagg.common.models.model_files import _gguf_path; print(_gguf_path())")
split -n 2 "$gguf" /tmp/gg_part_ && mv /tmp/gg_part_aa .gpu/gg_a/ && mv /tmp/gg_part_ab .gpu/gg_b/
du -sh .gpu/*
