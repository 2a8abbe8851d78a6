"""Hugging Face GPT-2 interop: configs, state dicts, local checkpoint directories.

HF's GPT-2 keeps its dense weights in `Conv1D` modules laid out (in, out), the same layout as our
kernels, so conversion is renaming plus stacking the per-block tensors on a leading layer axis:

    transformer.h.{i}.attn.c_attn.weight  <->  params["blocks"]["attn"]["c_attn"]["kernel"][i]
    transformer.ln_f.weight               <->  params["ln_f"]["scale"]

The LM head is tied to `wte` on both sides. `transformers` and `torch` are imported lazily, so
importing this module (and `fedpeat_jax.model`) stays cheap and torch is needed only for
`pytorch_model.bin` files and `from_torch_model`.

    params, cfg = load_pretrained("path/to/gpt2")            # config.json + model.safetensors
    save_pretrained(params, cfg, "out", peft_state=s, peft_config=pc)   # GPT2LMHeadModel loads "out"
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.model import gpt2

PREFIX = "transformer."
# Non-parameter buffers some checkpoints carry (the causal mask and its fill value), as the last
# two components of a key: "h.3.attn.bias" is a buffer, "h.3.attn.c_attn.bias" is not.
BUFFERS = (("attn", "bias"), ("attn", "masked_bias"))
HEAD_KEY = "lm_head.weight"

# HF name (without prefix) -> path in our params tree; block names are relative to `h.{i}.`.
TOP_LEVEL = {
    "wte.weight": ("wte",),
    "wpe.weight": ("wpe",),
    "ln_f.weight": ("ln_f", "scale"),
    "ln_f.bias": ("ln_f", "bias"),
}
PER_BLOCK = {
    "ln_1.weight": ("ln_1", "scale"),
    "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"),
    "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"),
    "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}

# Weight files we read, in order of preference (the index files list shards of big checkpoints).
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

# Dtypes weights may be saved in (numpy has no bfloat16).
WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16}

# GELU variants equal to GPT-2's tanh approximation (what gpt2.block computes).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def config_from_hf(hf_config, **overrides) -> GPT2Config:
    """Our GPT2Config from a `transformers.GPT2Config` (or its dict, e.g. a parsed config.json).

    `overrides` set fields HF does not carry (e.g. `dtype="bfloat16"`, the compute dtype) or
    replace dropout rates. Architectural options our GPT-2 does not implement raise ValueError.
    """
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    model_type = get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"expected a GPT-2 config (model_type 'gpt2'), got model_type {model_type!r}")
    unsupported = {
        "activation_function": (get("activation_function", "gelu_new"), lambda v: v in TANH_GELUS),
        "scale_attn_weights": (get("scale_attn_weights", True), lambda v: v is True),
        "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx", False), lambda v: not v),
        "add_cross_attention": (get("add_cross_attention", False), lambda v: not v),
        "tie_word_embeddings": (get("tie_word_embeddings", True), lambda v: v is not False),
    }
    bad = {name: value for name, (value, ok) in unsupported.items() if not ok(value)}
    if bad:
        raise ValueError(
            f"this GPT-2 config uses options fedpeat_jax's GPT-2 does not implement: {bad} "
            f"(supported: activation_function in {TANH_GELUS}, scale_attn_weights=True, "
            "scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tied word embeddings)"
        )
    fields = dict(
        vocab_size=get("vocab_size"),
        n_positions=get("n_positions"),
        n_embd=get("n_embd"),
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        n_inner=get("n_inner"),
        layer_norm_epsilon=get("layer_norm_epsilon", 1e-5),
        embd_pdrop=get("embd_pdrop", 0.1),
        attn_pdrop=get("attn_pdrop", 0.1),
        resid_pdrop=get("resid_pdrop", 0.1),
        initializer_range=get("initializer_range", 0.02),
    )
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if fields[k] is None]
    if missing:
        raise ValueError(f"the GPT-2 config lacks required field(s) {missing}")
    fields.update(overrides)
    return GPT2Config(**fields)


def to_hf_config(config: GPT2Config, **overrides):
    """A `transformers.GPT2Config` with our shape and dropout rates.

    Token ids (bos/eos/pad) are not part of our config: they keep transformers' defaults (50256)
    when the vocabulary holds that id, else None, unless given in `overrides`. The compute dtype
    is not exported: weights are saved in float32 unless `save_pretrained(weights_dtype=...)` says otherwise.
    """
    from transformers import GPT2Config as HFGPT2Config

    fields = dict(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function="gelu_new",
        layer_norm_epsilon=config.layer_norm_epsilon,
        embd_pdrop=config.embd_pdrop,
        attn_pdrop=config.attn_pdrop,
        resid_pdrop=config.resid_pdrop,
        initializer_range=config.initializer_range,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )
    if config.vocab_size <= HFGPT2Config().eos_token_id:  # GPT-2's <|endoftext|> id is not in this vocabulary
        fields.update(bos_token_id=None, eos_token_id=None)
    fields.update(overrides)
    return HFGPT2Config(**fields)


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------
def _expected_shapes(config: GPT2Config) -> dict:
    """HF tensor name (no prefix) -> the shape `config` needs, read off `gpt2.init` itself."""
    ref = jax.eval_shape(lambda: gpt2.init(jax.random.key(0), config))
    shapes = {name: _get(ref, path).shape for name, path in TOP_LEVEL.items()}
    for i in range(config.n_layer):
        for name, path in PER_BLOCK.items():
            shapes[f"h.{i}.{name}"] = _get(ref["blocks"], path).shape[1:]
    return shapes


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _describe(config: GPT2Config) -> str:
    return (
        f"vocab_size={config.vocab_size}, n_positions={config.n_positions}, n_embd={config.n_embd}, "
        f"n_layer={config.n_layer}, n_head={config.n_head}, d_mlp={config.d_mlp}"
    )


def params_from_state_dict(state_dict: Mapping[str, Any], config: GPT2Config) -> dict:
    """Our params tree from a GPT-2 state dict of numpy arrays (GPT2LMHeadModel or GPT2Model keys).

    Keys may carry the `transformer.` prefix or not; the `attn.bias` / `attn.masked_bias` buffers
    are skipped; `lm_head.weight` must equal `wte` (GPT-2 ties them) and stands in for a missing
    `wte`. Missing, unexpected or wrongly shaped tensors raise a ValueError naming them.
    """
    tensors = {}
    for key, value in state_dict.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if tuple(name.split(".")[-2:]) not in BUFFERS:
            tensors[name] = value
    head = tensors.pop(HEAD_KEY, None)
    if head is not None and "wte.weight" not in tensors:
        tensors["wte.weight"] = head  # some exports keep only the head of the tied pair

    expected = _expected_shapes(config)
    unexpected = sorted(set(tensors) - set(expected), key=_natural)
    missing = sorted(set(expected) - set(tensors), key=_natural)
    if unexpected or missing:
        depth = len({name.split(".")[1] for name in tensors if name.startswith("h.")})
        hint = (
            f"the weights have {depth} blocks, the config n_layer={config.n_layer}; " if depth != config.n_layer else ""
        )
        raise ValueError(
            f"GPT-2 weights do not match the config ({_describe(config)}): {hint}"
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, shape in expected.items():
        got = tuple(np.shape(tensors[name]))
        if got != tuple(shape):
            raise ValueError(
                f"GPT-2 weight {name!r} has shape {got}, but the config ({_describe(config)}) needs {tuple(shape)}"
            )
    if head is not None and head is not tensors["wte.weight"]:
        if np.shape(head) != np.shape(tensors["wte.weight"]) or not np.array_equal(head, tensors["wte.weight"]):
            raise ValueError(
                "lm_head.weight differs from wte.weight: an untied LM head cannot be represented "
                "(fedpeat_jax's GPT-2 ties the head to the token embeddings)"
            )

    params: dict = {}
    for name, path in TOP_LEVEL.items():
        _set(params, path, jnp.asarray(tensors[name], jnp.float32))
    for name, path in PER_BLOCK.items():
        stacked = np.stack([np.asarray(tensors[f"h.{i}.{name}"], np.float32) for i in range(config.n_layer)])
        _set(params, ("blocks",) + path, jnp.asarray(stacked))
    gpt2.check_params(params, config)  # guards the assembly itself
    return params


def _natural(name: str):
    """Sort h.10 after h.9."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def state_dict_from_params(params, prefix: str = PREFIX, dtype=np.float32) -> dict:
    """A GPT2LMHeadModel state dict (numpy in `dtype`, `transformer.` keys, no tied `lm_head`)."""
    out = {}
    for name, path in TOP_LEVEL.items():
        out[prefix + name] = np.asarray(_get(params, path), np.float32).astype(dtype)
    stacked = {
        name: np.asarray(_get(params["blocks"], path), np.float32).astype(dtype) for name, path in PER_BLOCK.items()
    }
    for i in range(stacked["ln_1.weight"].shape[0]):
        for name, value in stacked.items():
            out[f"{prefix}h.{i}.{name}"] = np.ascontiguousarray(value[i])
    return out


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------
def _expect_dir(path: Path) -> None:
    what = f"a Hugging Face GPT-2 directory with {CONFIG_FILE} and {SAFETENSORS} or {TORCH_BIN}"
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {str(path)!r} (expected {what})")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is not a directory (expected {what})")


class WeightFileError(ValueError):
    """A weight file exists but cannot be read (empty, truncated, corrupt, not a weight file)."""


def read_json(file: Path) -> dict:
    """A JSON file of a checkpoint directory; a ValueError naming the file if it is not JSON."""
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None


def _unreadable(file: Path, err: Exception) -> WeightFileError:
    size = file.stat().st_size
    what = (
        "is empty (0 bytes)"
        if size == 0
        else f"cannot be read ({size:,} bytes; {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )
    return WeightFileError(f"weight file {file} {what}: it is probably truncated or corrupt; copy or export it again")


def _load_safetensors(file: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(str(file))
        except TypeError:  # numpy has no bfloat16: read through JAX and upcast
            from safetensors.flax import load_file as load_jax

            return {k: np.asarray(v, np.float32) for k, v in load_jax(str(file)).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type from Rust
        raise _unreadable(file, e) from e


def _load_torch_bin(file: Path) -> dict:
    import torch  # only this format needs torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle and zip errors of every kind
        raise _unreadable(file, e) from e
    if not isinstance(state, Mapping):
        raise WeightFileError(f"weight file {file} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def load_state_dict(path) -> dict:
    """The raw state dict (numpy) of a local HF checkpoint directory, sharded or not."""
    path = Path(path)
    _expect_dir(path)
    for file in WEIGHT_FILES:
        if (path / file).is_file():
            break
    else:
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"no GPT-2 weights in {str(path)!r}: expected one of {list(WEIGHT_FILES)}, found {present}"
        )
    load = _load_safetensors if file.startswith("model.safetensors") else _load_torch_bin
    if not file.endswith(".index.json"):
        return load(path / file)
    index = read_json(path / file)
    if not isinstance(index.get("weight_map"), Mapping):
        raise ValueError(f"{path / file} has no 'weight_map' (not a Hugging Face weight index)")
    shards = sorted(set(index["weight_map"].values()))
    state = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise FileNotFoundError(f"{file} in {str(path)!r} lists shard {shard!r}, which is missing")
        state.update(load(path / shard))
    return state


def load_pretrained(path, **config_overrides):
    """(params, config) from a local HF GPT-2 directory: config.json + model.safetensors (read
    without torch) or pytorch_model.bin (needs torch), or their sharded `*.index.json` forms.

    `config_overrides` go to `config_from_hf` (e.g. `dtype="bfloat16"`, dropout rates).
    """
    path = Path(path)
    _expect_dir(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_FILE} (a Hugging Face GPT-2 config is required)")
    try:
        config = config_from_hf(read_json(config_file), **config_overrides)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    state = load_state_dict(path)
    try:
        return params_from_state_dict(state, config), config
    except ValueError as e:
        raise ValueError(f"the weights in {path} do not match its {CONFIG_FILE}: {e}") from None


def from_torch_model(model, **config_overrides):
    """(params, config) from an in-memory `transformers` GPT2LMHeadModel (or GPT2Model)."""
    state = {
        k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).numpy()
        for k, v in model.state_dict().items()
    }
    config = config_from_hf(model.config, **config_overrides)
    return params_from_state_dict(state, config), config


def load_tokenizer(path):
    """The tokenizer saved in a checkpoint directory (`transformers.AutoTokenizer`, local only)."""
    path = Path(path)
    _expect_dir(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {str(path)!r}: expected one of {list(TOKENIZER_FILES)}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many kinds
        raise ValueError(
            f"the tokenizer in {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "its tokenizer files may be corrupt"
        ) from e


# --------------------------------------------------------------------------------------------
# Writing checkpoints
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_directory(path: Path, overwrite: bool):
    """Yield a temporary sibling directory that replaces `path` only once the body succeeded.

    A reader never sees a half-written checkpoint: it sees the old directory or the new one.
    """
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save to {str(path)!r}: it exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(
    params,
    config: GPT2Config,
    path,
    peft_state=None,
    peft_config: Optional[PeftConfig] = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
    hf_config_overrides: Optional[dict] = None,
    weights_dtype: str = "float32",
) -> Path:
    """Write config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained(path)` loads.

    A PEFT state is merged first (LoRA, BitFit, full); adapters and soft prompts change the
    architecture, so exporting them raises ValueError. `tokenizer` (a transformers tokenizer) is
    saved alongside. The directory is written atomically (temp dir + rename); an existing
    non-empty `path` is replaced only with `overwrite=True`. `weights_dtype` "float16" halves the
    file (loading upcasts to float32 again).
    """
    from safetensors.numpy import save_file

    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"save_pretrained: weights_dtype must be one of {WEIGHT_DTYPES}, got {weights_dtype!r}")

    if peft_state is not None:
        if peft_config is None:
            raise ValueError("save_pretrained got a peft_state without its peft_config")
        if peft_config.kind in ("adapter", "prompt"):
            raise ValueError(
                f"cannot export PEFT kind {peft_config.kind!r} as a plain GPT-2 checkpoint: it adds modules "
                "that GPT2LMHeadModel does not have (merge is possible for 'lora', 'bitfit' and 'full'); "
                "save the PEFT state itself with a checkpoint instead"
            )
        params = peft_lib.merge(params, peft_state, config, peft_config)
    gpt2.check_params(params, config)
    path = Path(path)
    with _atomic_directory(path, overwrite) as tmp:
        to_hf_config(config, **(hf_config_overrides or {})).to_json_file(str(tmp / CONFIG_FILE))
        # "format": "pt" is the metadata transformers expects on safetensors files.
        save_file(
            state_dict_from_params(params, dtype=WEIGHT_DTYPES[weights_dtype]),
            str(tmp / SAFETENSORS),
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return path


__all__ = [
    "WeightFileError",
    "read_json",
    "config_from_hf",
    "to_hf_config",
    "params_from_state_dict",
    "state_dict_from_params",
    "load_state_dict",
    "load_pretrained",
    "from_torch_model",
    "load_tokenizer",
    "save_pretrained",
]
