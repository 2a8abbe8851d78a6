"""BitFit (Ben Zaken et al. 2022): train every 1-D parameter of the chosen blocks.

The state is a copy of those blocks' biases and LayerNorm parameters in the blocks' own tree
layout, so the forward simply overwrites the frozen leaves with it (`peft.overwrite`).
"""

from __future__ import annotations

import jax.numpy as jnp

VECTOR_LEAVES = ("bias", "scale")  # per block these are the 1-D parameters


def init(blocks: dict) -> dict:
    """Copy of the biases and LayerNorm scales/biases of `blocks` (already selected)."""
    out = {}
    for key, value in blocks.items():
        if isinstance(value, dict):
            sub = init(value)
            if sub:
                out[key] = sub
        elif key in VECTOR_LEAVES:
            out[key] = jnp.array(value, copy=True)
    return out
