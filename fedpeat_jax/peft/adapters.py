"""Bottleneck adapters (Houlsby et al. 2019) after attention's and the MLP's output projection.

y = x + up(relu(down(x))), with `up` zero-initialized so a fresh adapter is the identity.
State: {"attn": {"down": {"kernel": (n, d, s), "bias": (n, s)}, "up": {"kernel": (n, s, d), "bias": (n, d)}},
        "mlp": {...same...}} with a leading axis over the PEFT's blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedpeat_jax.config import GPT2Config, PeftConfig

INIT_STD = 0.02


def init(rng: jax.Array, model: GPT2Config, peft: PeftConfig, n_blocks: int) -> dict:
    d, s = model.n_embd, peft.adapter_size

    def one(key):
        return {
            "down": {"kernel": INIT_STD * jax.random.normal(key, (n_blocks, d, s)), "bias": jnp.zeros((n_blocks, s))},
            "up": {"kernel": jnp.zeros((n_blocks, s, d)), "bias": jnp.zeros((n_blocks, d))},
        }

    k_attn, k_mlp = jax.random.split(rng)
    return {"attn": one(k_attn), "mlp": one(k_mlp)}


def apply(p: dict, x: jax.Array) -> jax.Array:
    """One adapter of one block (leaves without the block axis)."""
    hidden = jax.nn.relu(x @ p["down"]["kernel"].astype(x.dtype) + p["down"]["bias"].astype(x.dtype))
    return x + hidden @ p["up"]["kernel"].astype(x.dtype) + p["up"]["bias"].astype(x.dtype)
