"""LoRA (Hu et al. 2021) on GPT-2's dense layers: W x + (alpha / r) B A x.

Kernels here are (in, out), so the low-rank factors are `a: (in, r)` and `b: (r, out)` and the
update of the kernel is `a @ b * scale` (peft's `lora_A.weight` is `a.T`, `lora_B.weight` is
`b.T`). A is Kaiming-uniform as in peft (bound 1/sqrt(in)), B is zero, so a fresh LoRA leaves
the model unchanged. FFA-LoRA (Sun et al. 2024) keeps A at its shared random init: the forward
stops its gradient and `trainable_mask` marks it frozen.

State layout, every leaf with a leading axis over the PEFT's blocks::

    {"attn": {"c_attn": {"a": (n, d, r), "b": (n, r, 3d)}, "c_proj": ...}, "mlp": {"c_fc": ..., "c_proj": ...}}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedpeat_jax.config import GPT2Config, PeftConfig


def target_shapes(model: GPT2Config) -> dict:
    d, m = model.n_embd, model.d_mlp
    return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, m), "mlp.c_proj": (m, d)}


def init(rng: jax.Array, model: GPT2Config, peft: PeftConfig, n_blocks: int) -> dict:
    shapes = target_shapes(model)
    state: dict = {}
    for key, target in zip(jax.random.split(rng, len(peft.lora_targets)), peft.lora_targets):
        d_in, d_out = shapes[target]
        bound = 1.0 / jnp.sqrt(d_in)
        group, name = target.split(".")
        state.setdefault(group, {})[name] = {
            "a": jax.random.uniform(key, (n_blocks, d_in, peft.lora_rank), jnp.float32, -bound, bound),
            "b": jnp.zeros((n_blocks, peft.lora_rank, d_out), jnp.float32),
        }
    return state


def delta(p: dict, x: jax.Array, peft: PeftConfig, rng) -> jax.Array:
    """The LoRA branch (alpha / r) * dropout(x) @ a @ b for one block's dense layer."""
    a = jax.lax.stop_gradient(p["a"]) if peft.lora_freeze_a else p["a"]
    if rng is not None and peft.lora_dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - peft.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - peft.lora_dropout), 0).astype(x.dtype)
    return low_rank(x, a.astype(x.dtype), p["b"].astype(x.dtype)) * jnp.asarray(peft.lora_scale, x.dtype)


@jax.custom_vjp
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a) @ b for x (N, in), a (in, r), b (r, out), with a hand-written backward pass."""
    return (x @ a) @ b


def _low_rank_fwd(x, a, b):
    u = x @ a
    return u @ b, (x, a, b, u)


def _low_rank_bwd(res, g):
    # Autodiff forms a's gradient as x^T du, an (in, r) product: with r = 8 columns XLA's CPU
    # kernels run it at about a twentieth of their speed, and far worse vmapped over clients
    # (7.3 vs 0.6 ms for 16 clients' c_proj on one core). du^T x, an (r, in) product, runs at full
    # speed; the barrier keeps XLA from folding the small transpose back into the product.
    x, a, b, u = res
    du = g @ b.T
    a_grad = jax.lax.optimization_barrier(jnp.einsum("nr,ni->ri", du, x)).T
    return du @ a.T, a_grad.astype(a.dtype), jnp.einsum("nr,no->ro", u, g).astype(b.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def products(state: dict, scale: float) -> dict:
    """Dense kernel updates scale * a @ b, {group: {name: (n, in, out)}}."""
    return {
        g: {n: jnp.einsum("nir,nro->nio", p["a"], p["b"]) * scale for n, p in layers.items()}
        for g, layers in state.items()
    }


def add_to_kernels(blocks: dict, updates: dict, ids) -> dict:
    """Blocks with dense `updates` ({group: {name: (len(ids), in, out)}}) added to the kernels of
    blocks `ids`."""
    index = jnp.asarray(tuple(ids), jnp.int32)
    out = dict(blocks)
    for group, layers in updates.items():
        out[group] = dict(out[group])
        for name, update in layers.items():
            kernel = jnp.asarray(out[group][name]["kernel"])  # weights loaded from disk may be numpy
            out[group][name] = dict(out[group][name], kernel=kernel.at[index].add(update.astype(kernel.dtype)))
    return out


def merge(blocks: dict, state: dict, peft: PeftConfig, ids) -> dict:
    """Blocks with each LoRA product added into its kernel: W + scale * a @ b."""
    return add_to_kernels(blocks, products(state, peft.lora_scale), ids)


def trainable_mask(state: dict, peft: PeftConfig) -> dict:
    return (
        jax.tree.map(lambda _: True, state)
        if not peft.lora_freeze_a
        else {g: {n: {"a": False, "b": True} for n in layers} for g, layers in state.items()}
    )
