"""FP8 checkpoints load as they are on the GPU (Hopper keeps FP8): the peak CUDA allocation of the
model load stays within a margin of the bytes kept (the previous loader built the model in
bfloat16 first: about twice the FP8 bytes), for a small DeepSeek-V3-shaped FP8 checkpoint and for
dummy FP8 weights at V3's width."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs a Hopper GPU (FP8 kept)",
    ),
]
MIB = 2**20


def _check(result: dict) -> None:
    kept = sum(result["weights"].values())
    assert result["weights"]["float8_e4m3fn"] > kept / 2, result["weights"]
    # one dummy-draw chunk (64 MiB of float32) or one tensor in flight over the kept bytes
    assert result["cuda"] < kept * 1.05 + 96 * MIB, (result["cuda"] / MIB, kept / MIB)


def test_fp8_checkpoint_peak_is_the_kept_bytes(tmp_path):
    from disagg.common.bench.load_memory import make_checkpoint, measure_load

    make_checkpoint(tmp_path / "v3", layers=3, experts=64)
    _check(measure_load(str(tmp_path / "v3"), device="cuda"))


def test_dummy_fp8_peak_is_the_kept_bytes():
    """V3's width, 3 dense layers and 1 MoE layer (256 experts): 15.9 GiB kept, 12.3 GiB of it FP8."""
    from disagg.common.bench.load_memory import measure_load

    overrides = json.dumps({"num_hidden_layers": 4})
    _check(measure_load("DeepSeek-V3", load_format="dummy", device="cuda", overrides=overrides))
