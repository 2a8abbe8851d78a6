"""Parameter-efficient fine-tuning: trainable state kept apart from the frozen GPT-2 params.

A PEFT state is a pytree ``{"blocks": ...}`` (per-block parts, leading axis over the blocks in
``PeftConfig.layers``) or ``{"prompt": (n, d)}``. It never aliases the frozen parameters, so a
client axis can be added with `jax.vmap` and only the state travels in federated rounds.

    state = peft.init(rng, params, model_config, peft_config)
    logits = gpt2.apply(params, ids, config=model_config, peft=state, peft_config=peft_config)
    merged = peft.merge(params, state, model_config, peft_config)   # LoRA, BitFit, full
"""

from __future__ import annotations

import jax

from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.peft import adapters, bitfit, lora, prompt
from fedpeat_jax.tree import n_blocks, overwrite, select_blocks, write_blocks


def init(rng: jax.Array, params, model: GPT2Config, peft: PeftConfig):
    """The trainable state of `peft` for a model with parameters `params` (None for kind "none")."""
    peft.validate(model)
    n_layer = n_blocks(params)
    ids = peft.block_ids(n_layer)
    if peft.kind == "none":
        return None
    if peft.kind == "prompt":
        return {"prompt": prompt.init(rng, params["wte"], peft)}
    if peft.kind == "lora":
        return {"blocks": {"lora": lora.init(rng, model, peft, len(ids))}}
    if peft.kind == "adapter":
        return {"blocks": {"adapter": adapters.init(rng, model, peft, len(ids))}}
    selected = select_blocks(params["blocks"], ids)
    if peft.kind == "bitfit":
        return {"blocks": bitfit.init(selected)}
    return {"blocks": jax.tree.map(lambda x: x.copy(), selected)}  # "full": the blocks themselves


def merge(params, state, model: GPT2Config, peft: PeftConfig):
    """Full GPT-2 params with the PEFT folded in (exportable as a plain GPT-2).

    LoRA adds its products to the kernels; BitFit and full tuning write their leaves back.
    Adapters and soft prompts change the architecture and cannot be merged.
    """
    if peft.kind == "none" or state is None:
        return params
    ids = peft.block_ids(n_blocks(params))
    if peft.kind == "lora":
        return dict(params, blocks=lora.merge(params["blocks"], state["blocks"]["lora"], peft, ids))
    if peft.kind in ("bitfit", "full"):
        return dict(params, blocks=write_blocks(params["blocks"], ids, state["blocks"]))
    raise ValueError(
        f"PEFT kind {peft.kind!r} adds modules to the architecture and cannot be merged into GPT-2 weights"
    )


def trainable_mask(state, peft: PeftConfig):
    """Boolean tree: which leaves of `state` are trained (False only for FFA-LoRA's A)."""
    if peft.kind == "lora":
        return {"blocks": {"lora": lora.trainable_mask(state["blocks"]["lora"], peft)}}
    return jax.tree.map(lambda _: True, state)


def count(state) -> int:
    """Number of scalars in a PEFT state (all leaves, frozen FFA A included)."""
    return sum(int(x.size) for x in jax.tree.leaves(state))


__all__ = ["init", "merge", "overwrite", "trainable_mask", "count", "lora", "adapters", "bitfit", "prompt"]
