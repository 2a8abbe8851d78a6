"""The pretrained model a run starts from: a local Hugging Face GPT-2 directory (real GPT-2
weights, or a foundation model `fedpeat pretrain` wrote), or one of the project's foundation
presets (pretrained on first use, or shipped).

    config = model_config("default", None)               # the shape only: checks run before loading
    params, config, tokenizer = load_model("default", None)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fedpeat_jax.config import GPT2Config


def model_config(preset: str, model_dir: Optional[str] = None) -> GPT2Config:
    """The GPT2Config a run will use, read without loading (or pretraining) any weights."""
    if not model_dir:
        return GPT2Config.preset(preset)
    from fedpeat_jax.model import hf

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (expected a Hugging Face GPT-2 directory: config.json, weights, tokenizer)"
        )
    config_file = path / hf.CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found (a Hugging Face GPT-2 directory needs config.json and weights)"
        )
    return hf.config_from_hf(hf.read_json(config_file))


def load_model(preset: str, model_dir: Optional[str] = None, cache_dir=None) -> tuple:
    """(params, model config, tokenizer) of a local Hugging Face GPT-2 directory, or of the
    foundation model of `preset` (pretrained and cached on first use)."""
    if model_dir:
        from fedpeat_jax.model import hf

        path = Path(model_dir).expanduser()
        params, config = hf.load_pretrained(path)
        tokenizer = hf.load_tokenizer(path)
        if len(tokenizer) > config.vocab_size:  # ids past the embedding table would be clamped silently
            raise ValueError(
                f"the tokenizer in {path} has {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}"
            )
        return params, config, tokenizer
    from fedpeat_jax.peat import foundation

    found = foundation.load_foundation(preset, cache_dir=cache_dir)
    return found.params, found.config, found.tokenizer


def open_model_dir(model_dir):
    """A local model directory as a `foundation.Foundation`: one `fedpeat pretrain` wrote (with its
    foundation.json), or any Hugging Face GPT-2 directory (with an empty info dict)."""
    from fedpeat_jax.peat import foundation

    path = Path(model_dir).expanduser()
    if (path / foundation.INFO_FILE).is_file():
        return foundation.open_foundation(path)
    params, config, tokenizer = load_model("", path)
    return foundation.Foundation(params, config, tokenizer, path, {})


__all__ = ["model_config", "load_model", "open_model_dir"]
