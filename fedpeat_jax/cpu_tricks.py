"""The CPU-specific speed tricks of the environment and the agent, each beside its plain version.

On a CPU, XLA runs the small arrays of an RL environment step and a PPO update in ways that make
a few textbook choices slow; these replacements bought real speed there (measured in
``benchmarks/results/env_throughput.md`` and ``ppo_throughput.md``). Everything that uses them
goes through this module, and every trick has a plain reference path that is what the algorithm
means:

======================  =====================================  ==================================
trick                   what it does                           plain path
======================  =====================================  ==================================
``uniforms``,           a counter-based hash of the key's      ``jax.random.uniform`` /
``permutation``         bits (two rounds of MurmurHash3's      ``jax.random.permutation``
                        finalizer) instead of threefry (run
                        as a rolled loop on a CPU)
``batch_trailing``      ``jax.vmap(f)`` of a function written  plain ``jax.vmap``
                        for trailing batch axes runs it once
                        on the whole batch (custom vmap rule)
``materialize``         an exact identity matmul that XLA      the identity
                        cannot fuse through, so cheap
                        producers are computed once instead
                        of inside every consumer
``compiler_options``    XLA's YNNPACK fusions off for the      no options
                        agent's small matmuls
======================  =====================================  ==================================

``enabled()`` says which path is taken: the environment variable ``FEDPEAT_CPU_TRICKS`` = "1"
(always), "0" (never, the plain path) or "auto" (default: on when JAX's default backend is the
CPU). It is read when a function is traced, so set it before building environments and trainers.
Both paths draw from the same distributions and give the same results up to the random streams
(``tests/test_cpu_tricks.py``); the hash generator is of simulation quality, not cryptographic.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

ENV_VAR = "FEDPEAT_CPU_TRICKS"


def enabled() -> bool:
    """Whether the CPU tricks are on (see the module docstring)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    if mode in ("1", "true", "on"):
        return True
    if mode in ("0", "false", "off"):
        return False
    if mode != "auto":
        raise ValueError(f"{ENV_VAR} must be '1', '0' or 'auto', got {mode!r}")
    return jax.default_backend() == "cpu"


def typed_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key array: raw uint32 keys of shape (..., 2) are wrapped (threefry layout)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------
def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _key_seeds(key: jax.Array):
    """Two uint32 seed words per key (arrays of the key array's shape) from the key's own bits."""
    data = jax.random.key_data(typed_key(key)).astype(jnp.uint32)
    if data.shape[-1] == 2:
        return data[..., 0], data[..., 1]
    s0 = jnp.full(data.shape[:-1], 0x243F6A88, jnp.uint32)
    s1 = jnp.full(data.shape[:-1], 0x85A308D3, jnp.uint32)
    for i in range(data.shape[-1]):
        s0 = _fmix32(s0 ^ data[..., i])
        s1 = _fmix32(s1 + data[..., i] * jnp.uint32(0x9E3779B9))
    return s0, s1


def hash_bits(key: jax.Array, shape, rolled: bool = True) -> jax.Array:
    """uint32 random words of shape ``shape + key.shape``: word i is f(f(i G + s1) ^ s0).

    (s0, s1) are the key's bits (keys from ``jax.random.split`` are already pseudorandom),
    G = 0x9E3779B9 and f = MurmurHash3's fmix32, a bijection, so no two counters of a call
    collide. A batch of keys (shape B) gives words of shape ``shape + B`` (batch axes trailing).
    ``rolled``: the two rounds run as a two-iteration loop, so XLA materializes the words once
    instead of fusing the hash into every consumer; ``rolled=False`` writes them out, for words
    that feed a single consumer.
    """
    s0, s1 = _key_seeds(key)
    shape = tuple(shape)
    full = shape + (1,) * s0.ndim
    counter = jnp.zeros(full, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):  # row-major counter from iotas (no reshape)
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, full, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    h = counter * jnp.uint32(0x9E3779B9) + s1
    if not rolled:
        return _fmix32(_fmix32(h) ^ s0)
    seeds = jnp.stack([jnp.zeros_like(s0), s0])
    return jax.lax.fori_loop(0, 2, lambda i, h: _fmix32(h ^ seeds[i]), h)


def uniforms(key: jax.Array, shape, rolled: bool = True) -> jax.Array:
    """U[0, 1) float32 numbers of shape ``shape + key.shape`` (batch axes of the keys trail).

    Tricks: 24 random bits of :func:`hash_bits`; plain: ``jax.random.uniform`` per key.
    """
    key = typed_key(key)
    shape = tuple(int(s) for s in shape)
    if enabled():
        return (hash_bits(key, shape, rolled) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    if key.ndim == 0:
        return jax.random.uniform(key, shape, jnp.float32)
    flat = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32))(key.reshape(-1))
    return jnp.moveaxis(flat, 0, -1).reshape(shape + key.shape)


def permutation(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of ``arange(n)`` (int32) for one key, e.g. a PPO minibatch shuffle.

    Tricks: the index sits in the low bits of a random word and the words are sorted alone (XLA's
    CPU sort is several times faster on one operand than on the (key, index) pair of an argsort);
    equal random parts keep index order, so above 2**16 elements it falls back to an argsort.
    Plain: ``jax.random.permutation``.
    """
    n = int(n)
    if not enabled():
        return jax.random.permutation(typed_key(key), n).astype(jnp.int32)
    bits = hash_bits(key, (n,), rolled=False)
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 16:
        return jnp.argsort(bits).astype(jnp.int32)
    mask = jnp.uint32((1 << index_bits) - 1)
    packed = (bits & ~mask) | jnp.arange(n, dtype=jnp.uint32)
    return (jnp.sort(packed) & mask).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Batching and fusion
# ---------------------------------------------------------------------------------------------
def batch_trailing(native, per_env):
    """``native`` (written for trailing batch axes), such that ``jax.vmap`` runs it once, natively.

    Tricks: under ``jax.vmap`` (batch axis 0) a custom vmap rule moves each batched input's batch
    axis to the end, runs ``native`` once on the whole batch and moves the outputs' batch axis back
    to the front, instead of letting vmap batch every primitive with the environment axis leading
    (slower on a CPU: ``benchmarks/env_throughput.py`` times both). ``per_env[i]`` says whether argument i is per
    environment (an unbatched one is shared by the whole batch and broadcast) or may stay
    unbatched (parameters broadcast by themselves). Plain: ``native`` itself (ordinary vmap).
    """
    if not enabled():
        return native

    @jax.custom_batching.custom_vmap
    def fn(*args):
        return native(*args)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        in_batched = tuple(in_batched)
        one_env = jax.tree.map(
            lambda x, b: jax.ShapeDtypeStruct(x.shape[1:] if b else x.shape, x.dtype), args, in_batched
        )
        out_struct = jax.eval_shape(native, *one_env)

        def to_trailing(x, b, shared):
            if b:
                return jnp.moveaxis(x, 0, -1) if x.ndim > 1 else x
            if shared:
                return (
                    jnp.broadcast_to(x[..., None], x.shape + (axis_size,))
                    if x.ndim
                    else jnp.broadcast_to(x, (axis_size,))
                )
            return x

        moved = tuple(
            jax.tree.map(lambda x, b, s=shared: to_trailing(x, b, s), arg, batched)
            for arg, batched, shared in zip(args, in_batched, per_env)
        )
        out = native(*moved)
        out = jax.tree.map(
            lambda o, s: jnp.moveaxis(jnp.broadcast_to(o, s.shape + (axis_size,)), -1, 0), out, out_struct
        )
        return out, jax.tree.map(lambda _: True, out)

    return fn


def materialize(x: jax.Array) -> jax.Array:
    """``x``, computed once.

    Tricks: XLA's CPU fusion copies cheap elementwise producers into every consumer (the
    environment step reads the sampled actions in a dozen fusions, each of which would redo the
    sampling); no fusion crosses a matmul, so an exact identity matmul of the small integers pins
    them down. Plain: ``x``.
    """
    if not enabled():
        return x
    eye = np.eye(x.shape[-1], dtype=np.float32)
    y = jnp.matmul(x.astype(jnp.float32), eye, precision=jax.lax.Precision.HIGHEST)
    return jnp.round(y).astype(x.dtype)


def compiler_options() -> dict:
    """XLA options for compiling the agent's training (SABPPO).

    Tricks (on a CPU backend): XLA's YNNPACK library fusions, on by default in jax 0.10, run the
    agent's small matmuls (a few hundred rows by 64) slower than XLA's own kernels; the federated
    rounds' larger matmuls are faster with them, so the option is given per compile, never
    process-wide. Plain: no options.
    """
    return {"xla_cpu_experimental_ynn_fusion_type": ""} if enabled() and jax.default_backend() == "cpu" else {}


__all__ = [
    "ENV_VAR",
    "batch_trailing",
    "compiler_options",
    "enabled",
    "hash_bits",
    "materialize",
    "permutation",
    "typed_key",
    "uniforms",
]
