"""The fused MoE's block sizes come from the entry tuned on the device that runs them, else the
shape's plain entry (tuned on an H200), else defaults; FP8 experts prefer their own entries."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def table(tmp_path, monkeypatch):
    from disagg.common.models import fused_moe

    path = tmp_path / "fused_moe_configs.json"
    monkeypatch.setattr(fused_moe, "_CONFIGS", path)
    fused_moe.moe_config.cache_clear()
    yield path
    fused_moe.moe_config.cache_clear()


def test_a_device_takes_its_own_entry_else_the_plain_one(table):
    from disagg.common.models.fused_moe import _DEFAULT, config_key, moe_config

    h100 = "NVIDIA H100 80GB HBM3"
    entries = {
        config_key(64, 1408, 2048): {"tag": "plain"},
        config_key(64, 1408, 2048, device=h100): {"tag": "h100"},
        config_key(64, 1408, 2048, fp8=True): {"tag": "fp8"},
        config_key(8, 32, 48, device=h100): {"tag": "h100 only"},
    }
    table.write_text(json.dumps(entries))
    assert moe_config(64, 1408, 2048, device=h100)["tag"] == "h100"
    assert moe_config(64, 1408, 2048, device="NVIDIA H200")["tag"] == "plain"
    assert moe_config(64, 1408, 2048, device="")["tag"] == "plain"  # no GPU
    assert moe_config(64, 1408, 2048, fp8=True, device=h100)["tag"] == "fp8"  # FP8's own entry first
    assert moe_config(8, 32, 48, device="NVIDIA H200") is _DEFAULT
    assert moe_config(8, 32, 48, fp8=True, device=h100)["tag"] == "h100 only"


def test_the_checked_in_table_keys_name_shapes_and_devices():
    """Every key of the checked-in table is one config_key builds, and its entry holds the paths' sizes."""
    from disagg.common.models import fused_moe

    table = json.loads(fused_moe._CONFIGS.read_text())
    for key, entry in table.items():
        parts = dict(p.split("=", 1) for p in key.split(","))
        rebuilt = fused_moe.config_key(
            int(parts["E"]), int(parts["I"]), int(parts["H"]), "dtype" in parts, parts.get("device", "")
        )
        assert rebuilt == key and {"gemv", "grouped", "gemv_max_pairs"} <= set(entry), key
        if "device" in parts:
            assert entry["device"] == parts["device"], key  # tuned where its key says


def test_the_combine_of_a_tokens_rows_follows_the_tuned_entry_unless_the_environment_says(monkeypatch):
    """A tuned grouped entry's COMBINE picks how a token's k expert rows are added (a summing launch
    by default); DISAGG_MOE_COMBINE overrides it for A/B runs; a misspelt mode is an error that names it."""
    from disagg.common.models.fused_moe import combine_mode

    monkeypatch.delenv("DISAGG_MOE_COMBINE", raising=False)
    assert combine_mode({"BLOCK_SIZE_M": 128}) == "sum"
    assert combine_mode({"COMBINE": "atomic"}) == "atomic"
    monkeypatch.setenv("DISAGG_MOE_COMBINE", "sum")
    assert combine_mode({"COMBINE": "atomic"}) == "sum"
    monkeypatch.setenv("DISAGG_MOE_COMBINE", "atomics")
    with pytest.raises(ValueError, match="atomics"):
        combine_mode({})
