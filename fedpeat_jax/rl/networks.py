"""SABPPO's actor-critic networks: a shared trunk, one categorical head per action branch, a value head.

* :class:`ActorCritic` (``SABPPOConfig.network="mlp"``): an MLP trunk over the flat observation;
  all branch logits come from one Dense layer, split by ``nvec``. Works for any gymnax
  environment.
* :class:`DeviceActorCritic` (``"devices"``): the trunk is shared by the devices. Each device's
  features (with the global ones) go through the same encoder; a pooled context (mean and max
  over the devices) lets each device's heads compare it with the others; every device's branches
  (participate, emulator level, bandwidth) come from the same head applied to [its encoding,
  the context]; the global branches (the server) and the value come from [context, globals]. The
  weights do not depend on N, so what is learned about one device is learned about all of them
  and decisions like "the few fastest devices" are a comparison with the context. It needs the
  environment's :class:`~fedpeat_jax.mec.spaces.AgentLayout` (``FedPEATMEC.agent_layout()``).

Both return (logits (..., sum nvec) in the environment's flat branch order, value (...)).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.mec.spaces import AgentLayout

ACTIVATIONS = ("tanh", "relu")


def _act(name: str):
    return nn.tanh if name == "tanh" else nn.relu


def orthogonal(scale: float = 1.0):
    """Flax's orthogonal initializer, the same values, but one matrix at a time under ``jax.vmap``.

    Vmapped, flax's initializer is one batched LAPACK QR, and XLA:CPU (jaxlib 0.10.2) deadlocks
    when two of them run at once on a small machine: each runs on a worker of the intra-op pool
    and waits there for batch tasks queued on that same pool (seen on 2 cores at 2 seeds of the
    default networks). A ``lax.map`` over the batch keeps every QR unbatched; init runs once,
    so the loop costs nothing that matters."""
    base = nn.initializers.orthogonal(scale)

    def init(key, shape, dtype=jnp.float32):
        @jax.custom_batching.custom_vmap
        def one(key):
            return base(key, shape, dtype)

        @one.def_vmap
        def _one_at_a_time(axis_size, in_batched, key):
            if not in_batched[0]:
                return one(key), False
            return jax.lax.map(one, key), True

        return one(key)

    return init


def _dense(width: int, scale: float, name=None):
    return nn.Dense(width, kernel_init=orthogonal(scale), bias_init=nn.initializers.zeros, name=name)


def _trunk(x: jax.Array, hidden_sizes: tuple, activation: str) -> jax.Array:
    """The MLP layers (called inside a compact module: the Dense layers are that module's)."""
    act = _act(activation)
    for width in hidden_sizes:
        x = act(_dense(width, math.sqrt(2.0))(x))
    return x


class ActorCritic(nn.Module):
    """Shared MLP trunk -> (branch logits (..., sum nvec), value (...))."""

    nvec: tuple
    hidden_sizes: tuple = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs: jax.Array):
        x = _trunk(obs, self.hidden_sizes, self.activation)
        logits = _dense(int(sum(self.nvec)), 0.01, name="branch_logits")(x)
        value = _dense(1, 1.0, name="value")(x)
        return logits, value[..., 0]


class DeviceActorCritic(nn.Module):
    """Device-shared trunk and heads (module docstring) -> (branch logits (..., sum nvec), value (...))."""

    layout: AgentLayout
    hidden_sizes: tuple = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs: jax.Array):
        act = _act(self.activation)
        lay = self.layout
        n, f = lay.n_devices, lay.device_features
        lead = obs.shape[:-1]
        dev = jnp.swapaxes(obs[..., : f * n].reshape(lead + (f, n)), -1, -2)  # (..., N, F)
        glob = obs[..., f * n :]  # (..., G)
        x = jnp.concatenate([dev, jnp.broadcast_to(glob[..., None, :], lead + (n, glob.shape[-1]))], axis=-1)
        x = _trunk(x, self.hidden_sizes, self.activation)  # the device encoder, shared by the devices
        context = jnp.concatenate([jnp.mean(x, axis=-2), jnp.max(x, axis=-2)], axis=-1)  # (..., 2H)
        width = self.hidden_sizes[-1]
        h = act(
            _dense(width, math.sqrt(2.0), name="device_head")(
                jnp.concatenate([x, jnp.broadcast_to(context[..., None, :], lead + (n, context.shape[-1]))], axis=-1)
            )
        )
        dev_logits = _dense(int(sum(lay.device_branches)), 0.01, name="device_logits")(
            h
        )  # (..., N, sum device branches)
        g = act(_dense(width, math.sqrt(2.0), name="global_head")(jnp.concatenate([context, glob], axis=-1)))
        parts = [_dense(int(sum(lay.global_branches)), 0.01, name="global_logits")(g)]
        offsets = np.concatenate([[0], np.cumsum(lay.device_branches)])
        for b, size in enumerate(lay.device_branches):  # branch-major: all devices' branch b, device by device
            parts.append(dev_logits[..., offsets[b] : offsets[b] + size].reshape(lead + (n * size,)))
        value = _dense(1, 1.0, name="value")(g)
        return jnp.concatenate(parts, axis=-1), value[..., 0]


def make_network(kind: str, nvec: tuple, hidden_sizes: tuple, activation: str, layout=None) -> nn.Module:
    """The network of ``SABPPOConfig.network``: "mlp", "devices" (needs ``layout``), or "auto"
    ("devices" when the environment gives a layout whose branches are ``nvec``, else "mlp")."""
    if kind == "auto":
        kind = "devices" if layout is not None else "mlp"
    if kind == "mlp":
        return ActorCritic(nvec=tuple(nvec), hidden_sizes=tuple(hidden_sizes), activation=activation)
    if layout is None:
        raise ValueError("SABPPOConfig.network='devices' needs an environment with agent_layout() (e.g. FedPEATMEC)")
    if tuple(layout.nvec()) != tuple(nvec):
        raise ValueError(
            f"the environment's agent_layout() gives branches {layout.nvec()}, its action space {tuple(nvec)}"
        )
    return DeviceActorCritic(layout=layout, hidden_sizes=tuple(hidden_sizes), activation=activation)


__all__ = ["ACTIVATIONS", "ActorCritic", "AgentLayout", "DeviceActorCritic", "make_network"]
