"""SABPPO's settings: the static `SABPPOConfig` (shapes, loop lengths, options) and the traced
`HParams` that `jax.vmap(trainer.train)` sweeps (lr, entropy and value coefficients, clipping,
discounting and the whole `EnvParams`). The trainer is `fedpeat_jax.rl.sabppo`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedpeat_jax.config import Config, require
from fedpeat_jax.rl.networks import ACTIVATIONS

CLIP_MODES = ("joint", "branch")
NETWORKS = ("auto", "mlp", "devices")


# =============================================================================================
# Configuration
# =============================================================================================
@dataclass(frozen=True)
class SABPPOConfig(Config):
    """Static settings of an SABPPO run (shapes, loop lengths, options) and hyperparameter defaults.

    ``lr``, ``ent_coef``, ``clip_eps``, ``vf_coef``, ``max_grad_norm``, ``gamma`` and
    ``gae_lambda`` here are only the defaults of :class:`HParams`; a sweep overrides them per run.
    One update collects ``num_envs * num_steps`` environment steps.
    """

    num_envs: int = 64
    """Parallel environments per update."""
    num_steps: int = 50  # rollout length per update (env steps per environment)
    total_timesteps: int = 1_000_000
    """Environment steps per run; updates = total_timesteps // (num_envs * num_steps)."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 16  # minibatches of 200 at the default sizes: learned faster than 4 on the MEC env
    lr: float = 3e-4
    """Adam learning rate (default of `HParams.lr`)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to 0 over the run."""
    gamma: float = 0.99
    """Discount (default of `HParams.gamma`)."""
    gae_lambda: float = 0.95
    """GAE lambda (default of `HParams.gae_lambda`)."""
    clip_eps: float = 0.2
    """PPO clip range (default of `HParams.clip_eps`); also clips the value update."""
    clip_mode: str = "joint"  # "joint": clip pi/pi_old of the whole action; "branch": per branch
    clip_value: bool = True  # PPO-style clipping of the value update
    ent_coef: float = 0.01
    """Entropy bonus weight on the sum of branch entropies (default of `HParams.ent_coef`)."""
    vf_coef: float = 0.5
    """Value-loss weight (default of `HParams.vf_coef`)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip (default of `HParams.max_grad_norm`)."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    network: str = "auto"
    """'mlp' (trunk over the flat observation), 'devices' (trunk and heads shared by the devices; needs env.agent_layout()), 'auto' (devices where the env allows)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Widths of the shared trunk (the per-device encoder with network='devices')."""
    activation: str = "tanh"
    """Trunk activation: 'tanh' or 'relu'."""
    normalize_obs: bool = True
    """Running mean/variance observation normalization (kept in the training state)."""
    # Off by default: the MEC rewards are of order 1 per round by design (docs/system_model.md), and
    # return-scaled rewards learned more slowly there in our runs.
    normalize_reward: bool = False
    normalize_advantages: bool = True
    """Normalize advantages per minibatch."""
    obs_clip: float = 10.0
    """Clip of the normalized observation."""
    reward_clip: float = 10.0
    """Clip of the scaled reward (normalize_reward only)."""

    def validate(self) -> None:
        for name in ("num_envs", "num_steps", "total_timesteps", "update_epochs", "num_minibatches"):
            v = getattr(self, name)
            require(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1,
                f"SABPPOConfig.{name} must be an integer >= 1, got {v!r}",
            )
        require(
            self.total_timesteps >= self.batch_size,
            f"SABPPOConfig.total_timesteps ({self.total_timesteps}) must be at least one update of "
            f"num_envs * num_steps = {self.batch_size} env steps",
        )
        require(
            self.batch_size % self.num_minibatches == 0,
            f"SABPPOConfig.num_minibatches ({self.num_minibatches}) must divide num_envs * num_steps "
            f"({self.batch_size})",
        )
        require(self.lr > 0 and math.isfinite(self.lr), f"SABPPOConfig.lr must be finite and > 0, got {self.lr}")
        require(0 <= self.gamma <= 1, f"SABPPOConfig.gamma must be in [0, 1], got {self.gamma}")
        require(0 <= self.gae_lambda <= 1, f"SABPPOConfig.gae_lambda must be in [0, 1], got {self.gae_lambda}")
        require(self.clip_eps > 0, f"SABPPOConfig.clip_eps must be > 0, got {self.clip_eps}")
        require(
            self.clip_mode in CLIP_MODES, f"SABPPOConfig.clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}"
        )
        require(self.ent_coef >= 0, f"SABPPOConfig.ent_coef must be >= 0, got {self.ent_coef}")
        require(self.vf_coef >= 0, f"SABPPOConfig.vf_coef must be >= 0, got {self.vf_coef}")
        require(self.max_grad_norm > 0, f"SABPPOConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")
        require(self.adam_eps > 0, f"SABPPOConfig.adam_eps must be > 0, got {self.adam_eps}")
        require(
            len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
            f"SABPPOConfig.hidden_sizes must be one or more layer widths >= 1, got {self.hidden_sizes}",
        )
        require(self.network in NETWORKS, f"SABPPOConfig.network must be one of {NETWORKS}, got {self.network!r}")
        require(
            self.activation in ACTIVATIONS,
            f"SABPPOConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}",
        )
        require(self.obs_clip > 0, f"SABPPOConfig.obs_clip must be > 0, got {self.obs_clip}")
        require(self.reward_clip > 0, f"SABPPOConfig.reward_clip must be > 0, got {self.reward_clip}")

    @property
    def batch_size(self) -> int:
        """Environment steps per update (num_envs * num_steps)."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        """PPO updates in a full run: total_timesteps // (num_envs * num_steps)."""
        return self.total_timesteps // self.batch_size


@struct.dataclass
class HParams:
    """Traced hyperparameters of one run; a batch of them (leading axis) is vmapped in a sweep."""

    lr: jax.Array
    ent_coef: jax.Array
    clip_eps: jax.Array
    vf_coef: jax.Array
    max_grad_norm: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    env_params: Any  # fedpeat_jax.mec.EnvParams (reward weights, physics), or any gymnax params


def default_hparams(config: SABPPOConfig, env_params) -> HParams:
    """The config's hyperparameter defaults together with ``env_params``."""
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return HParams(
        lr=f(config.lr),
        ent_coef=f(config.ent_coef),
        clip_eps=f(config.clip_eps),
        vf_coef=f(config.vf_coef),
        max_grad_norm=f(config.max_grad_norm),
        gamma=f(config.gamma),
        gae_lambda=f(config.gae_lambda),
        env_params=env_params,
    )


def stack_hparams(hparams: Sequence[HParams]) -> HParams:
    """Stack runs' hyperparameters along a new leading axis (for ``jax.vmap(train)``).

    Every leaf is converted to an array first, so Python-number fields of ``EnvParams`` stack too.
    """
    if not hparams:
        raise ValueError("stack_hparams needs at least one HParams")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *hparams)
