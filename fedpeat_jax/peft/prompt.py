"""Prompt tuning (Lester et al. 2021): n trainable soft tokens before the input embeddings.

As in peft, the soft tokens are prepended to the token embeddings and then take position
embeddings 0..n-1, shifting the real tokens' positions by n. They are initialized from the
embeddings of randomly sampled vocabulary tokens, which trains better than random vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedpeat_jax.config import PeftConfig


def init(rng: jax.Array, wte: jax.Array, peft: PeftConfig) -> jax.Array:
    ids = jax.random.randint(rng, (peft.n_prompt_tokens,), 0, wte.shape[0])
    return jnp.take(wte, ids, axis=0)


def prepend(prompt: jax.Array, h: jax.Array) -> jax.Array:
    """(n, d) soft tokens in front of (B, T, d) embeddings -> (B, n + T, d)."""
    soft = jnp.broadcast_to(prompt.astype(h.dtype), (h.shape[0],) + prompt.shape)
    return jnp.concatenate([soft, h], axis=1)
