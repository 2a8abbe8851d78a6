"""Action and observation layout of the FedPEAT MEC environment, and its multi-discrete space.

Action (int32 vector of length 3N + 1, branch-major; ``action_nvec`` gives the branch sizes)::

    [0]              server takes part         {0, 1}
    [1 .. N]         device n takes part       {0, 1}          (index n for device n = 1..N)
    [N+1 .. 2N]      device emulator level     {0 .. m-1}      (level -> k = level_k[level])
    [2N+1 .. 3N]     device bandwidth level    {0 .. L-1}      (index b is level b + 1 of 1..L,
                                                                weight bw_weights[b])

Invalid actions (one rule, the same in the JAX environment and the numpy twin,
:func:`clip_action`): every entry is cast to an integer (``astype(int32)``, so a float is
truncated toward zero) and clipped into its branch's range [0, nvec[i] - 1]; e.g. a
participation entry of 3 counts as 1 and -1 as 0. An action of the wrong length is refused with
a ``ValueError`` naming the expected length (:func:`check_action_shape`), at trace time.

Observation (float32 vector of length 7N + 4, feature-major; ranges in docs/system_model.md)::

    [0N:1N]  channel gain (G_dB - gain_db_center) / gain_db_scale
    [1N:2N]  distance / cell_radius
    [2N:3N]  compute speed / flops_max
    [3N:4N]  memory capacity / max(mem_choices)
    [4N:5N]  data size / data_max
    [5N:6N]  stored emulator (level + 1) / m   (0: none stored)
    [6N:7N]  took part last round {0, 1}
    [7N+0]   t / T
    [7N+1]   perplexity gap (ppl - ppl_best) / (ppl_ref - ppl_best)
    [7N+2]   last round latency / latency_ref
    [7N+3]   server took part last round {0, 1}
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gymnax.environments import spaces

from fedpeat_jax import cpu_tricks

N_DEVICE_FEATURES = 7
N_GLOBAL_FEATURES = 4
DEVICE_FEATURES = ("gain", "distance", "flops", "mem_capacity", "data", "stored_level", "took_part")
GLOBAL_FEATURES = ("time", "ppl_gap", "last_latency", "server_took_part")


class AgentLayout(NamedTuple):
    """How the observation and the action branches are laid out per device (for agents that share
    weights across devices, e.g. SABPPO's ``network="devices"``).

    Observation: ``device_features`` rows of ``n_devices`` (feature-major), then ``global_features``.
    Action: the ``global_branches`` first, then for each entry of ``device_branches`` one branch of
    that size per device (branch-major): here (2,) then (2, m, L).
    """

    n_devices: int
    device_features: int
    global_features: int
    global_branches: tuple
    device_branches: tuple

    def nvec(self) -> tuple:
        return tuple(self.global_branches) + tuple(b for b in self.device_branches for _ in range(self.n_devices))


def agent_layout(params) -> AgentLayout:
    """The :class:`AgentLayout` of an environment with these parameters."""
    m, L = int(np.shape(params.level_k)[-1]), int(np.shape(params.bw_weights)[-1])
    return AgentLayout(int(params.n_devices), N_DEVICE_FEATURES, N_GLOBAL_FEATURES, (2,), (2, m, L))


def obs_size(n_devices: int) -> int:
    """Length of the flat observation: 7N + 4."""
    return N_DEVICE_FEATURES * int(n_devices) + N_GLOBAL_FEATURES


def action_nvec(params) -> np.ndarray:
    """Branch sizes of the flat action: [2] * (N + 1) + [m] * N + [L] * N (see the module docstring)."""
    n, m, L = params.n_devices, np.shape(params.level_k)[-1], np.shape(params.bw_weights)[-1]
    return np.array([2] * (n + 1) + [m] * n + [L] * n, dtype=np.int64)


def check_action_shape(shape, nvec, batch_ndim=None) -> None:
    """Refuse an action whose leading axis is not the 3N + 1 branches (``batch_ndim``: trailing batch axes
    allowed, None for any number)."""
    n_branches = len(nvec)
    n = (n_branches - 1) // 3
    shape = tuple(shape)
    ok = len(shape) >= 1 and shape[0] == n_branches and (batch_ndim is None or len(shape) == 1 + batch_ndim)
    if not ok:
        batch = (
            ""
            if batch_ndim == 0
            else " (+ trailing batch axes)"
            if batch_ndim is None
            else f" + {batch_ndim} batch axes"
        )
        raise ValueError(
            f"action must have {n_branches} entries = 3N + 1 for N = {n} devices ([server] + participate (N) + "
            f"emulator level (N) + bandwidth level (N)){batch}, got shape {shape}"
        )


def clip_action(action, nvec, xp=jnp):
    """The environment's rule for invalid actions: cast to int32, clip entry i into [0, nvec[i] - 1].

    ``action`` has shape (3N + 1, *B) (batch axes trailing); works with numpy and jax.numpy.
    """
    a = xp.asarray(action).astype(xp.int32)
    hi = np.asarray(nvec, np.int32).reshape((-1,) + (1,) * (a.ndim - 1)) - 1
    return xp.clip(a, 0, hi)


def encode_action(participate, level, bandwidth, server: int = 1):
    """Flat action from per-device choices: (N,) participate {0,1}, (N,) level, (N,) bandwidth index."""
    xp = jnp if any(isinstance(a, jax.Array) for a in (participate, level, bandwidth)) else np
    s = xp.reshape(xp.asarray(server), (1,))
    return xp.concatenate([s, xp.asarray(participate), xp.asarray(level), xp.asarray(bandwidth)]).astype(xp.int32)


def decode_action(action, n_devices: int) -> dict:
    """Split a flat action (..., 3N + 1) into server, participate (N,), level (N,), bandwidth index (N,)."""
    n = n_devices
    return {
        "server": action[..., 0],
        "participate": action[..., 1 : n + 1],
        "level": action[..., n + 1 : 2 * n + 1],
        "bandwidth": action[..., 2 * n + 1 : 3 * n + 1],
    }


class MultiDiscrete(spaces.Space):
    """Jittable multi-discrete space: one categorical per entry with sizes ``nvec`` (int32 samples).

    ``to_gymnasium()`` gives the equal ``gymnasium.spaces.MultiDiscrete``.
    """

    def __init__(self, nvec):
        self.nvec = np.asarray(nvec, dtype=np.int32)
        self.shape = self.nvec.shape
        self.dtype = jnp.int32
        # vmapped over keys, sample natively (batch axis trailing) and transpose once
        self._sample = cpu_tricks.batch_trailing(lambda key: self.sample_batch(key), per_env=(True,))

    def __repr__(self) -> str:
        return f"MultiDiscrete({self.nvec.tolist()})"

    def sample(self, key: jax.Array) -> jax.Array:
        """One uniformly random action (see ``sample_batch``); ``jax.vmap`` over keys batches natively."""
        return self._sample(cpu_tricks.typed_key(key))

    def sample_batch(self, key: jax.Array, batch_shape=()) -> jax.Array:
        """Samples of shape ``nvec.shape + batch_shape + key.shape`` (batch axes trailing) from one key.

        Branch i is floor(u n_i) of a uniform u with 24 random bits: exactly uniform when n_i is a
        power of two, otherwise within n_i / 2**24 of uniform.
        """
        batch_shape = tuple(int(b) for b in np.atleast_1d(batch_shape)) if np.ndim(batch_shape) or batch_shape else ()
        u = cpu_tricks.uniforms(key, self.shape + batch_shape)
        n = jnp.asarray(self.nvec, jnp.float32).reshape(self.shape + (1,) * (u.ndim - 1))
        return jnp.minimum(jnp.floor(u * n), n - 1).astype(jnp.int32)

    def contains(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.logical_and(jnp.all(x >= 0), jnp.all(x < self.nvec))

    def to_gymnasium(self):
        import gymnasium

        return gymnasium.spaces.MultiDiscrete(self.nvec.astype(np.int64))


__all__ = [
    "AgentLayout",
    "DEVICE_FEATURES",
    "GLOBAL_FEATURES",
    "MultiDiscrete",
    "N_DEVICE_FEATURES",
    "N_GLOBAL_FEATURES",
    "action_nvec",
    "agent_layout",
    "check_action_shape",
    "clip_action",
    "decode_action",
    "encode_action",
    "obs_size",
]
