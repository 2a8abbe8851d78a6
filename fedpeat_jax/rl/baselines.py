"""Baseline controllers for the FedPEAT MEC environment and a jitted evaluator for any policy.

A policy maps ONE environment's ``(obs, state, env_params, rng)`` to its flat int32 action
(layout in :mod:`fedpeat_jax.mec.spaces`: [server] + participate (N) + emulator level (N) +
bandwidth level (N)); :func:`evaluate` vmaps it over episodes. A policy is either

* a plain function ``fn(obs, state, env_params, rng) -> action``, or
* a :class:`Policy`: a hashable ``apply(policy_params, obs, state, env_params, rng)`` plus its
  parameter pytree, which stays a traced argument (a trained SABPPO network is one:
  :func:`sabppo_policy`; a simple rule is one: :mod:`fedpeat_jax.rl.rules`), so evaluating new
  parameters does not recompile.

Baselines (:func:`baseline_policies`):

* :func:`random_policy`        every branch uniformly at random
* :func:`server_only_policy`   only the server takes part (no radio, no device)
* :func:`all_devices_policy`   the server and every device, each at the largest emulator that fits
                               its memory, equal bandwidth
* :func:`greedy_policy`        the ``n_select`` best-channel devices (default ceil(N/2)) among those
                               that fit some emulator, largest fitting emulator, equal bandwidth,
                               server on
* ``best_rule``                the best of a search over simple fixed rules (:mod:`.rules`),
                               added by :func:`fedpeat_jax.rl.controller.evaluate_controller`

:func:`without_server` turns the server off in any policy. The rules read the device state
(channel gain, memory capacity, ...) and compute memory needs with the environment's own formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.rl import rules
from fedpeat_jax.rl import sabppo as _sabppo  # noqa: F401  (type hints)
from fedpeat_jax.rl.distributions import mode_branches, sample_branches
from fedpeat_jax.rl.normalize import normalize_obs
from fedpeat_jax.rl.rollout import EPISODE_METRICS, Policy, as_policy, evaluate, rollout_episodes, rollout_many

PyTree = Any


# =============================================================================================
# Policies
# =============================================================================================
def _nvec(env) -> np.ndarray:
    return np.asarray(env.nvec if hasattr(env, "nvec") else env.action_space(env.default_params).nvec)


# Policies are frozen dataclasses (hashable by value), so ``evaluate`` compiles each kind once per
# environment, however often a policy object is rebuilt.
@dataclass(frozen=True)
class _Random:
    nvec: tuple

    def __call__(self, _params, obs, state, env_params, rng):
        return jax.random.randint(rng, (len(self.nvec),), 0, jnp.asarray(self.nvec, jnp.int32)).astype(jnp.int32)


def random_policy(env) -> Policy:
    """Every branch uniform over its choices."""
    return Policy(apply=_Random(tuple(int(n) for n in _nvec(env))), name="random")


def server_only_policy(env) -> Policy:
    """Only the server takes part (its own data, no radio cost)."""
    return rules.rule_policy(env, rules.Rule.of(1, "channel", 0, int(env.n_levels)), "server_only")


def all_devices_policy(env, server: bool = True) -> Policy:
    """Every device at the largest emulator that fits its memory, equal bandwidth; the server if ``server``."""
    rule = rules.Rule.of(int(bool(server)), "channel", int(env.n_devices), int(env.n_levels))
    return rules.rule_policy(env, rule, "all_devices" if server else "all_devices_no_server")


def greedy_policy(env, n_select: Optional[int] = None) -> Policy:
    """The ``n_select`` best-channel devices (default ceil(N/2)) among those that fit some emulator,
    each with the largest emulator that fits its memory capacity; equal bandwidth; server on."""
    n = int(env.n_devices)
    k_sel = rules.greedy_n(n) if n_select is None else int(n_select)
    if not 1 <= k_sel <= n:
        raise ValueError(f"greedy n_select must be in 1..{n} (the number of devices), got {n_select}")
    return rules.rule_policy(env, rules.Rule.of(1, "channel", k_sel, int(env.n_levels)), f"greedy_{k_sel}")


@dataclass(frozen=True)
class _WithoutServer:
    apply: Callable

    def __call__(self, params, obs, state, env_params, rng):
        return self.apply(params, obs, state, env_params, rng).at[0].set(0)


def without_server(policy) -> Policy:
    """The same policy with the server never taking part (action[0] = 0)."""
    p = as_policy(policy)
    return Policy(apply=_WithoutServer(p.apply), params=p.params, name=f"{p.name}_no_server")


# =============================================================================================
# A trained SABPPO agent as a policy
# =============================================================================================
@dataclass(frozen=True)
class _SABPPOApply:
    network: Any  # the trainer's flax module (hashable)
    nvec: tuple
    normalize_obs: bool
    obs_clip: float
    deterministic: bool

    def __call__(self, params, obs, state, env_params, rng):
        net_params, obs_rms = params
        x = normalize_obs(obs.astype(jnp.float32), obs_rms if self.normalize_obs else None, self.obs_clip)
        logits, _ = self.network.apply(net_params, x)
        if self.deterministic:
            return mode_branches(logits, self.nvec)
        return sample_branches(rng, logits, self.nvec)


def sabppo_policy(
    trainer: _sabppo.Trainer, state: _sabppo.TrainState, deterministic: bool = True, name: str = "sabppo"
) -> Policy:
    """The policy of a trained SABPPO ``state`` (one run, not a vmapped batch): the network with the
    state's frozen observation normalizer; ``deterministic`` takes the most likely choice per branch."""
    cfg = trainer.config
    if jnp.ndim(state.update) != 0:
        raise ValueError(
            "sabppo_policy needs the state of ONE run; slice a vmapped state first, "
            "e.g. jax.tree.map(lambda x: x[i], states)"
        )
    apply = _SABPPOApply(
        network=trainer.network,
        nvec=tuple(trainer.nvec),
        normalize_obs=cfg.normalize_obs,
        obs_clip=cfg.obs_clip,
        deterministic=bool(deterministic),
    )
    return Policy(apply=apply, params=(state.params, state.obs_rms), name=name)


def baseline_policies(env, greedy_n_select: Optional[int] = None) -> dict:
    """The named baselines: random, server_only, all_devices, greedy (the searched best rule is added
    by ``evaluate_controller``)."""
    return {
        "random": random_policy(env),
        "server_only": server_only_policy(env),
        "all_devices": all_devices_policy(env),
        "greedy": greedy_policy(env, greedy_n_select)._replace(name="greedy"),
    }


__all__ = [
    "EPISODE_METRICS",
    "Policy",
    "all_devices_policy",
    "as_policy",
    "baseline_policies",
    "evaluate",
    "greedy_policy",
    "random_policy",
    "rollout_episodes",
    "rollout_many",
    "sabppo_policy",
    "server_only_policy",
    "without_server",
]
