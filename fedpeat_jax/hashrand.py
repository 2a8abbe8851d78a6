"""Cheap counter-based random numbers for hot loops (environment steps, action sampling).

``jax.random`` runs the 20-round threefry cipher, on a CPU as a rolled loop: for the few dozen
numbers of one environment step or one action sample that costs more than the rest of the step.
:func:`hash_bits` derives the words from the key's own bits with two rounds of a 32-bit mixer.
Simulation quality, not cryptographic; deterministic in the key; pass a fresh key per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def typed_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key array: raw uint32 keys of shape (..., 2) are wrapped (threefry layout)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


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
    """uint32 random words of shape ``shape + key.shape``: a counter-based hash of the key's bits.

    ``jax.random`` runs the 20-round threefry cipher once per two words (on a CPU as a rolled
    loop): for the ~50 numbers of one step that alone costs more than the rest of the environment
    step. Keys given to ``step`` are already pseudorandom 64-bit values (outputs of
    ``jax.random.split``), so word i is h_i = f(f(i G + s1) ^ s0) with (s0, s1) the key's bits,
    G = 0x9E3779B9 and f = MurmurHash3's fmix32 (a bijection, so no two counters collide within
    a call). A generator of simulation quality (not cryptographic), deterministic in the key;
    pass a fresh key per call as with ``jax.random``.

    A batch of keys (shape B) gives words of shape ``shape + B`` (batch axes trailing). The two
    mixing rounds run as a two-iteration loop on purpose: XLA then materializes the words once
    instead of fusing the hash into (and recomputing it in) every consumer, which in earlier
    versions of the step cost up to half of the step time. ``rolled=False`` writes the two rounds
    out, for words that feed a single consumer (a loop costs a few microseconds per call).
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
    """U[0, 1) float32 numbers of shape ``shape + key.shape`` with 24 random bits (``hash_bits``)."""
    return (hash_bits(key, shape, rolled) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def permutation(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of ``arange(n)`` (int32) for one key, e.g. a PPO minibatch shuffle.

    The index sits in the low bits of a random word and the words are sorted alone: XLA's CPU
    sort is several times faster on one operand than on the (key, index) pair of an argsort.
    Equal random parts (1 in 2**(32 - ceil(log2 n)) per pair) keep index order; above 2**16
    elements that would be common, so larger n fall back to an argsort of the full words.
    """
    n = int(n)
    bits = hash_bits(key, (n,), rolled=False)
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 16:
        return jnp.argsort(bits).astype(jnp.int32)
    mask = jnp.uint32((1 << index_bits) - 1)
    packed = (bits & ~mask) | jnp.arange(n, dtype=jnp.uint32)
    return (jnp.sort(packed) & mask).astype(jnp.int32)


__all__ = ["hash_bits", "permutation", "typed_key", "uniforms"]
