"""``FedPEATVectorEnv``: a ``gymnasium.vector.VectorEnv`` of N environments stepped by ONE jitted call.

For PyTorch and numpy agents written against gymnasium's vector API (CleanRL's
``ppo_multidiscrete.py`` pattern): actions are a ``MultiDiscrete`` batch (num_envs, 3N + 1),
observations a float32 ``Box`` batch (num_envs, 7N + 4), rewards / terminations / truncations
arrays of shape (num_envs,). Every ``step`` is one call of the jitted native batch step of
:class:`~fedpeat_jax.mec.env.FedPEATMEC` (``step_batch``), so the environments run at jitted
speed instead of one Python environment at a time.

Autoreset, as gymnasium documents it (https://farama.org/Vector-Autoreset-Mode), in either mode:

* ``"next_step"`` (gymnasium's default): the step that ends an episode returns its last
  observation; the next ``step`` resets that environment, ignoring its action, and returns the
  first observation of the new episode with reward 0 and terminated = truncated = False.
* ``"same_step"``: the step that ends an episode returns the first observation of the new one;
  ``info["final_obs"]`` (object array, ``None`` elsewhere) and ``info["final_info"]`` hold the
  last observation and info, masked by ``info["_final_obs"]`` / ``info["_final_info"]`` (the
  finished environments' entries of the step's own info are masked out, as in ``SyncVectorEnv``).

Every info entry is an array of shape (num_envs,) with a boolean mask ``info["_<key>"]`` (False
for environments that were reset instead of stepped). Seeding: ``reset(seed=s)`` draws every
environment from one key; episodes are reproducible given the seed and the actions.
"""

from __future__ import annotations

from typing import Optional

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from fedpeat_jax.mec.env import FedPEATMEC
from fedpeat_jax.mec.params import EnvParams
from fedpeat_jax.mec.spaces import check_action_shape

MODES = (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP)


def _mode(mode) -> AutoresetMode:
    """An AutoresetMode from itself, its value ("NextStep") or a snake-case name ("next_step")."""
    if isinstance(mode, AutoresetMode):
        return mode
    names = {m.value.lower(): m for m in AutoresetMode}
    key = str(mode).replace("_", "").replace("-", "").lower()
    if key not in names:
        raise ValueError(f"autoreset_mode must be one of {[m.value for m in MODES]}, got {mode!r}")
    return names[key]


class FedPEATVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` FedPEAT MEC environments behind gymnasium's vector API (see the module docstring).

    FedPEATVectorEnv(64)                                     'default' preset, the shipped table
    FedPEATVectorEnv(64, params)                             explicit EnvParams
    FedPEATVectorEnv(64, preset=..., calibration=..., **overrides)
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        params: Optional[EnvParams] = None,
        *,
        autoreset_mode="next_step",
        preset: str = "default",
        calibration=None,
        **overrides,
    ):
        if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        mode = _mode(autoreset_mode)
        if mode not in MODES:
            raise ValueError(
                f"autoreset_mode must be one of {[m.value for m in MODES]}: the jitted environment always "
                f"resets a finished episode, got {mode.value!r}"
            )
        self.env = FedPEATMEC(params, preset=preset, calibration=calibration, **overrides)
        self.params = self.env.default_params
        self.num_envs = int(num_envs)
        self.autoreset_mode = mode
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.single_action_space = self.env.action_space().to_gymnasium()
        self.single_observation_space = gymnasium.spaces.Box(-np.inf, np.inf, self.env.obs_shape, np.float32)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._reset_fn = jax.jit(lambda key, params: self.env.reset_batch(key, self.num_envs, params))
        self._step_fn = jax.jit(self._native_step)
        self._key = jax.random.key(0)
        self._state = None
        self._pending = np.zeros(self.num_envs, bool)  # next_step mode: reset these on the next step

    def _native_step(self, key, state, actions, pending, params):
        """One jitted batch step; environments in ``pending`` are not stepped (already reset)."""
        obs, new_state, reward, terminated, truncated, info = self.env.step_batch(key, state, actions.T, params)
        keep = lambda old, new: jnp.where(pending, old, new)  # noqa: E731
        new_state = jax.tree.map(keep, state, new_state)
        fresh_obs = self.env.get_obs(state, params)
        return {
            "obs": keep(fresh_obs, obs).T,
            "final_obs": info.pop("final_observation").T,
            "state": new_state,
            "reward": jnp.where(pending, 0.0, reward),
            "terminated": jnp.logical_and(~pending, terminated),
            "truncated": jnp.logical_and(~pending, truncated),
            "info": info,
        }

    def reset(self, *, seed=None, options: Optional[dict] = None):
        if seed is not None:
            seeds = np.atleast_1d(np.asarray(seed))
            if seeds.size > 1 and not np.all(seeds == seeds[0]):
                raise ValueError("FedPEATVectorEnv draws every environment from one key: pass one int seed, not a list")
            self._key = jax.random.key(int(seeds[0]))
        self._key, k_reset = jax.random.split(self._key)
        obs, self._state = self._reset_fn(k_reset, self.params)
        self._pending[:] = False
        return np.asarray(obs.T), {}

    def step(self, actions):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        check_action_shape(actions.shape[::-1], self.env.nvec, batch_ndim=1)
        if actions.shape[0] != self.num_envs:
            raise ValueError(
                f"actions must have shape (num_envs={self.num_envs}, {len(self.env.nvec)}), got {actions.shape}"
            )
        self._key, k_step = jax.random.split(self._key)
        pending = self._pending if self.autoreset_mode == AutoresetMode.NEXT_STEP else np.zeros(self.num_envs, bool)
        out = jax.device_get(
            self._step_fn(k_step, self._state, jnp.asarray(actions, jnp.int32), jnp.asarray(pending), self.params)
        )
        self._state = out.pop("state")
        terminated, truncated = np.asarray(out["terminated"]), np.asarray(out["truncated"])
        done = terminated | truncated
        stepped = ~pending
        infos = {}
        for key, value in out["info"].items():
            infos[key] = np.asarray(value)
            infos[f"_{key}"] = stepped.copy()
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            obs = np.where(done[:, None], out["final_obs"], out["obs"])
            self._pending = done
        else:
            obs = np.asarray(out["obs"])
            if done.any():  # a finished episode's info moves to final_info (its env has been reset)
                final = np.full(self.num_envs, None, dtype=object)
                for i in np.flatnonzero(done):
                    final[i] = np.asarray(out["final_obs"][i])
                infos["final_info"] = {k: (v.copy() if k.startswith("_") else v) for k, v in infos.items()}
                for key in out["info"]:
                    infos["final_info"][f"_{key}"] &= done
                    infos[f"_{key}"] &= ~done
                infos["final_obs"], infos["_final_obs"] = final, done.copy()
                infos["_final_info"] = done.copy()
        return (obs.astype(np.float32), np.asarray(out["reward"], np.float64), terminated, truncated, infos)

    def close_extras(self, **kwargs):
        self._state = None


__all__ = ["FedPEATVectorEnv"]
