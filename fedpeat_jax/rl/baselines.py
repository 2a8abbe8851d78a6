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

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.rl import sabppo as _sabppo  # noqa: F401  (type hints)
from fedpeat_jax.rl.distributions import mode_branches, sample_branches
from fedpeat_jax.rl.normalize import normalize_obs

PyTree = Any


# =============================================================================================
# Policies
# =============================================================================================
class Policy(NamedTuple):
    """``apply(params, obs, state, env_params, rng) -> action`` (hashable) with its ``params``."""

    apply: Callable
    params: PyTree = None
    name: str = "policy"


@dataclass(frozen=True)
class _Plain:
    """Adapts ``fn(obs, state, env_params, rng)`` to the :class:`Policy` signature (hashable by ``fn``)."""

    fn: Callable

    def __call__(self, _params, obs, state, env_params, rng):
        return self.fn(obs, state, env_params, rng)


def as_policy(policy, name: Optional[str] = None) -> Policy:
    """A :class:`Policy` from a Policy or a plain ``fn(obs, state, env_params, rng)``."""
    if isinstance(policy, Policy):
        return policy if name is None else policy._replace(name=name)
    if callable(policy):
        return Policy(apply=_Plain(policy), params=None, name=name or getattr(policy, "__name__", "policy"))
    raise TypeError(f"a policy must be a Policy or a callable (obs, state, env_params, rng) -> action, got {type(policy).__name__}")


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
    return _rules().rule_policy(env, _rules().Rule.of(1, "channel", 0, int(env.n_levels)), "server_only")


def all_devices_policy(env, server: bool = True) -> Policy:
    """Every device at the largest emulator that fits its memory, equal bandwidth; the server if ``server``."""
    rule = _rules().Rule.of(int(bool(server)), "channel", int(env.n_devices), int(env.n_levels))
    return _rules().rule_policy(env, rule, "all_devices" if server else "all_devices_no_server")


def greedy_policy(env, n_select: Optional[int] = None) -> Policy:
    """The ``n_select`` best-channel devices (default ceil(N/2)) among those that fit some emulator,
    each with the largest emulator that fits its memory capacity; equal bandwidth; server on."""
    n = int(env.n_devices)
    k_sel = _rules().greedy_n(n) if n_select is None else int(n_select)
    if not 1 <= k_sel <= n:
        raise ValueError(f"greedy n_select must be in 1..{n} (the number of devices), got {n_select}")
    return _rules().rule_policy(env, _rules().Rule.of(1, "channel", k_sel, int(env.n_levels)), f"greedy_{k_sel}")


def _rules():
    from fedpeat_jax.rl import rules  # rules builds Policy objects of this module

    return rules


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


def sabppo_policy(trainer: "_sabppo.Trainer", state: "_sabppo.TrainState", deterministic: bool = True,
                  name: str = "sabppo") -> Policy:
    """The policy of a trained SABPPO ``state`` (one run, not a vmapped batch): the network with the
    state's frozen observation normalizer; ``deterministic`` takes the most likely choice per branch."""
    cfg = trainer.config
    if jnp.ndim(state.update) != 0:
        raise ValueError("sabppo_policy needs the state of ONE run; slice a vmapped state first, "
                         "e.g. jax.tree.map(lambda x: x[i], states)")
    apply = _SABPPOApply(network=trainer.network, nvec=tuple(trainer.nvec), normalize_obs=cfg.normalize_obs,
                         obs_clip=cfg.obs_clip, deterministic=bool(deterministic))
    return Policy(apply=apply, params=(state.params, state.obs_rms), name=name)


# =============================================================================================
# Evaluation
# =============================================================================================
EPISODE_METRICS = ("return", "perplexity", "final_perplexity", "latency", "total_latency", "memory", "violations",
                   "stragglers", "participants", "data_fraction", "bytes", "empty_rounds")


def _rollout(apply, env, episodes: int, num_steps: int, policy_params, env_params, rng):
    """Run ``episodes`` fresh episodes of ``num_steps`` rounds in parallel; per-episode metrics (episodes,).

    Quantities are reduced inside the scan (sums over rounds), nothing per step is kept:
    return, mean perplexity, final perplexity, mean and total round latency, mean memory ratio
    (participants' M/Mcap), violations (sum), mean participants, bytes moved, empty rounds, and
    ``completed`` (1 when the episode ended exactly at the last round).
    """
    k_reset, k_run = jax.random.split(rng)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, episodes), env_params)
    zeros = jnp.zeros((episodes,), jnp.float32)
    sums0 = {"return": zeros, "perplexity": zeros, "latency": zeros, "memory": zeros, "violations": zeros,
             "stragglers": zeros, "participants": zeros, "data_fraction": zeros, "bytes": zeros, "empty_rounds": zeros}

    def step(carry, key):
        obs, state, sums, _, _ = carry
        k_pol, k_env = jax.random.split(key)
        action = jax.vmap(apply, in_axes=(None, 0, 0, None, 0))(
            policy_params, obs, state, env_params, jax.random.split(k_pol, episodes))
        obs, state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_env, episodes), state, action, env_params)
        f = lambda name: info[name].astype(jnp.float32) if name in info else zeros  # noqa: E731
        sums = {
            "return": sums["return"] + reward.astype(jnp.float32),
            "perplexity": sums["perplexity"] + f("perplexity"),
            "latency": sums["latency"] + f("latency"),
            "memory": sums["memory"] + f("memory"),
            "violations": sums["violations"] + f("violations"),
            "stragglers": sums["stragglers"] + f("stragglers"),
            "participants": sums["participants"] + f("n_participants"),
            "data_fraction": sums["data_fraction"] + f("data_fraction"),
            "bytes": sums["bytes"] + f("bytes"),
            "empty_rounds": sums["empty_rounds"] + f("empty_round"),
        }
        done = jnp.logical_or(terminated, truncated).astype(jnp.float32)
        return (obs, state, sums, f("perplexity"), done), None

    (_, _, sums, last_ppl, last_done), _ = jax.lax.scan(
        step, (obs, state, sums0, zeros, zeros), jax.random.split(k_run, num_steps))
    return {
        "return": sums["return"],
        "perplexity": sums["perplexity"] / num_steps,
        "final_perplexity": last_ppl,
        "latency": sums["latency"] / num_steps,
        "total_latency": sums["latency"],
        "memory": sums["memory"] / num_steps,
        "violations": sums["violations"],
        "stragglers": sums["stragglers"],
        "participants": sums["participants"] / num_steps,
        "data_fraction": sums["data_fraction"] / num_steps,
        "bytes": sums["bytes"],
        "empty_rounds": sums["empty_rounds"],
        "completed": last_done,
    }


rollout_episodes = jax.jit(_rollout, static_argnames=("apply", "env", "episodes", "num_steps"))
rollout_episodes.__doc__ = _rollout.__doc__


@partial(jax.jit, static_argnames=("apply", "env", "episodes", "num_steps"))
def rollout_many(apply, env, episodes: int, num_steps: int, policy_params_batch, env_params, rng):
    """:func:`rollout_episodes` for a stack of policy parameters (leading axis), on the same draws:
    per-episode metrics of shape (policies, episodes), in one compiled call."""
    return jax.vmap(lambda pp: _rollout(apply, env, episodes, num_steps, pp, env_params, rng))(policy_params_batch)


def evaluate(policy, env, env_params=None, episodes: int = 64, rng=0, num_steps: Optional[int] = None) -> dict:
    """Mean and std over ``episodes`` full episodes of ``policy``, jitted (one compile per policy kind).

    Returns floats: ``<metric>_mean`` and ``<metric>_std`` for every metric in
    :data:`EPISODE_METRICS` (return, mean perplexity over rounds, final perplexity, mean and total
    round latency [s], memory ratio, violations per episode, participants per round, bytes per
    episode, empty rounds), plus ``episodes`` and ``policy``. ``num_steps`` defaults to the
    episode length ``env_params.max_steps_in_episode`` (every episode runs from reset to its end).
    """
    p = as_policy(policy)
    env_params = env.default_params if env_params is None else env_params
    if num_steps is None:
        num_steps = int(np.asarray(env_params.max_steps_in_episode))
    if not (isinstance(episodes, (int, np.integer)) and episodes >= 1):
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    if not num_steps >= 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    key = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
    per_episode = rollout_episodes(p.apply, env, int(episodes), int(num_steps), p.params, env_params, key)
    per_episode = jax.tree.map(np.asarray, per_episode)
    out = {"policy": p.name, "episodes": int(episodes), "num_steps": int(num_steps),
           "completed_fraction": float(per_episode["completed"].mean())}
    for name in EPISODE_METRICS:
        values = per_episode[name].astype(np.float64)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_std"] = float(values.std())
    return out


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
