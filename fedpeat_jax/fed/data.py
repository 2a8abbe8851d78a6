"""Client data with a leading client axis, on one device, a mesh, or a mesh spanning processes."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class FedData(NamedTuple):
    """Client data with a leading client axis (padded, masked).

    A client whose `levels` entry is -1 holds no emulator and is never sampled: padding clients
    (to split the client axis evenly over devices) are such clients.
    """

    tokens: jax.Array  # (C, N, T) int32
    mask: jax.Array  # (C, N, T) float32, 1 on real tokens
    counts: jax.Array  # (C,) int32, real examples per client
    levels: jax.Array  # (C,) int32, index into FedConfig.emulator_levels of the emulator each holds

    @classmethod
    def from_arrays(cls, tokens, mask, counts, levels=None) -> FedData:
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 3:
            raise ValueError(f"client tokens must be (clients, examples, seq_len), got shape {tokens.shape}")
        counts = jnp.asarray(counts, jnp.int32)
        levels = jnp.zeros(tokens.shape[0], jnp.int32) if levels is None else jnp.asarray(levels, jnp.int32)
        return cls(tokens, jnp.asarray(mask, jnp.float32), counts, levels)

    @property
    def n_clients(self) -> int:
        return int(self.tokens.shape[0])


def pad_clients(data: FedData, multiple: int) -> FedData:
    """`data` with empty, never-sampled clients appended so the client count is a multiple of
    `multiple` (e.g. the number of devices the client axis is split over)."""
    extra = (-data.n_clients) % multiple
    if extra == 0:
        return data

    def grow(x, fill):
        x = np.asarray(x)
        return np.concatenate([x, np.full((extra,) + x.shape[1:], fill, x.dtype)])

    return FedData(grow(data.tokens, 0), grow(data.mask, 0), grow(data.counts, 0), grow(data.levels, -1))


def process_slice(n_clients: int, process_index: Optional[int] = None, process_count: Optional[int] = None) -> slice:
    """The clients this process holds when `n_clients` are split evenly over the processes."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if n_clients % n:
        raise ValueError(
            f"{n_clients} clients do not split evenly over {n} processes; pad them first (fed.data.pad_clients)"
        )
    per = n_clients // n
    return slice(p * per, (p + 1) * per)


def from_process_local(local: FedData, n_clients: int, mesh) -> FedData:
    """The global client data of a run spanning processes, from this process's own clients only.

    Each process passes its contiguous slice of clients (`process_slice`); the result is one
    global array per field, split over the mesh's "clients" axis, whose shards live on the devices
    of the process that holds those clients. Works in a single process too (then `local` is
    everything)."""
    from fedpeat_jax.fed.sharding import client_sharding

    sharding = client_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (n_clients,) + x.shape[1:])

    return FedData(*(put(x) for x in local))
