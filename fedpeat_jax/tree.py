"""Small pytree helpers shared by the model, PEFT and emulator code."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select_blocks(blocks: dict, ids) -> dict:
    """The stack of blocks `ids` (a static sequence of indices) in that order.

    A contiguous run is a slice (no copy under jit); anything else is a gather.
    """
    ids = tuple(int(i) for i in ids)
    if ids and ids == tuple(range(ids[0], ids[0] + len(ids))):
        return jax.tree.map(lambda x: x[ids[0] : ids[0] + len(ids)], blocks)
    index = jnp.asarray(ids, jnp.int32)
    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), blocks)


def write_blocks(blocks: dict, ids, part: dict) -> dict:
    """`blocks` with rows `ids` of the leaves present in `part` replaced by `part`'s rows."""
    index = jnp.asarray(tuple(int(i) for i in ids), jnp.int32)
    written = jax.tree.map(lambda base, new: base.at[index].set(new.astype(base.dtype)), subtree(blocks, part), part)
    return overwrite(blocks, written)


def overwrite(tree: dict, part: dict) -> dict:
    """`tree` with the leaves present in `part` replaced."""
    out = dict(tree)
    for key, value in part.items():
        out[key] = overwrite(tree[key], value) if isinstance(value, dict) else value
    return out


def subtree(tree: dict, like: dict) -> dict:
    """The part of `tree` with the keys of `like`."""
    return {k: subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def n_blocks(params: dict) -> int:
    """Depth of a GPT-2 params tree (or of a bare stack of blocks)."""
    blocks = params.get("blocks", params)
    return blocks["ln_1"]["scale"].shape[0]
