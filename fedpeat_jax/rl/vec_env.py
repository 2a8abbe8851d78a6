"""Any gymnax environment as a batch with the batch axis LEADING, the layout a policy network wants.

FedPEATMEC offers a fused native batch (``reset_batch`` / ``step_batch``, env axis trailing):
it is used directly with one transpose in and out; any other gymnax environment is vmapped with
one key per environment. Both report ``done`` = terminated or truncated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class VecEnv(NamedTuple):
    reset: Callable  # (key, params) -> obs (E, D), state
    step: Callable  # (key, state, action (E, A), params) -> obs, state, reward (E,), done (E,), info


def vec_env(env, num_envs: int, scalar_action: bool = False) -> VecEnv:
    """FedPEATMEC's fused ``reset_batch``/``step_batch`` (env axis trailing) where available,
    else ``jax.vmap`` of the gymnax six-value ``reset``/``step`` with one key per environment.
    ``scalar_action``: the env takes a scalar action (a ``Discrete`` space: the single branch)."""
    if getattr(env, "native_batch", False):

        def reset(key, params):
            obs, state = env.reset_batch(key, num_envs, params)
            return obs.T, state

        def step(key, state, action, params):
            obs, state, reward, terminated, truncated, info = env.step_batch(key, state, action.T, params)
            return obs.T, state, reward, jnp.logical_or(terminated, truncated), info

        return VecEnv(reset, step)

    def reset(key, params):
        return jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs), params)

    def step(key, state, action, params):
        action = action[:, 0] if scalar_action else action
        obs, state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(key, num_envs), state, action, params
        )
        return obs, state, reward, jnp.logical_or(terminated, truncated), info

    return VecEnv(reset, step)


def env_nvec(env, env_params) -> tuple:
    if hasattr(env, "nvec"):
        return tuple(int(n) for n in np.asarray(env.nvec))
    space = env.action_space(env_params)
    if hasattr(space, "nvec"):
        return tuple(int(n) for n in np.asarray(space.nvec))
    if hasattr(space, "n"):
        return (int(space.n),)
    raise ValueError(
        f"cannot read the action branches of {type(env).__name__}: its action space {space!r} has neither nvec nor n"
    )


__all__ = ["VecEnv", "env_nvec", "vec_env"]
