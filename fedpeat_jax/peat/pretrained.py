"""The pretrained model a run starts from: a local Hugging Face GPT-2 directory (real GPT-2
weights, or a foundation model `fedpeat pretrain` wrote), or one of the project's foundation
presets (pretrained on first use, or shipped).

    config = model_config("default", None)               # the shape only: checks run before loading
    params, config, tokenizer = load_model("default", None)
"""

from __future__ import annotations

import json
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
        raise FileNotFoundError(f"model directory {path} does not exist (expected a Hugging Face GPT-2 directory: config.json, weights, tokenizer)")
    config_file = path / hf.CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found (a Hugging Face GPT-2 directory needs config.json and weights)")
    return hf.config_from_hf(hf.read_json(config_file))


def load_model(preset: str, model_dir: Optional[str] = None, cache_dir=None) -> tuple:
    """(params, model config, tokenizer) of a local Hugging Face GPT-2 directory, or of the
    foundation model of `preset` (pretrained and cached on first use)."""
    if model_dir:
        from fedpeat_jax.model import hf

        params, config = hf.load_pretrained(Path(model_dir).expanduser())
        return params, config, hf.load_tokenizer(Path(model_dir).expanduser())
    from fedpeat_jax.peat import foundation

    found = foundation.load_foundation(preset, cache_dir=cache_dir)
    return found.params, found.config, found.tokenizer


__all__ = ["model_config", "load_model"]
