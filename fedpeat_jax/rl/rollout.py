"""Policies and their jitted evaluation on the FedPEAT MEC environment.

A policy maps ONE environment's ``(obs, state, env_params, rng)`` to its flat int32 action. It is
either a plain function ``fn(obs, state, env_params, rng) -> action`` or a :class:`Policy`: a
hashable ``apply(policy_params, obs, state, env_params, rng)`` plus its parameter pytree, which
stays a traced argument, so evaluating new parameters does not recompile. :func:`evaluate` runs
fresh episodes of any policy in parallel on the same draws; :func:`rollout_many` evaluates a
stack of parameters at once (the rule search uses it); :func:`record_episodes` keeps a record of
every round instead of sums (what a policy does, ``rl.behaviour``; a teacher's rounds to clone,
``rl.imitation``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


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
    raise TypeError(
        f"a policy must be a Policy or a callable (obs, state, env_params, rng) -> action, got {type(policy).__name__}"
    )


# =============================================================================================
# Evaluation
# =============================================================================================
EPISODE_METRICS = (
    "return",
    "perplexity",
    "final_perplexity",
    "latency",
    "total_latency",
    "memory",
    "violations",
    "stragglers",
    "participants",
    "data_fraction",
    "bytes",
    "empty_rounds",
)


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
    sums0 = {
        "return": zeros,
        "perplexity": zeros,
        "latency": zeros,
        "memory": zeros,
        "violations": zeros,
        "stragglers": zeros,
        "participants": zeros,
        "data_fraction": zeros,
        "bytes": zeros,
        "empty_rounds": zeros,
    }

    def step(carry, key):
        obs, state, sums, _, _ = carry
        k_pol, k_env = jax.random.split(key)
        action = jax.vmap(apply, in_axes=(None, 0, 0, None, 0))(
            policy_params, obs, state, env_params, jax.random.split(k_pol, episodes)
        )
        obs, state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_env, episodes), state, action, env_params
        )
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
        step, (obs, state, sums0, zeros, zeros), jax.random.split(k_run, num_steps)
    )
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


@partial(jax.jit, static_argnames=("apply", "env", "episodes", "num_steps", "record"))
def record_episodes(apply, env, episodes: int, num_steps: int, policy_params, env_params, rng, record: Callable):
    """:func:`rollout_episodes`' episodes (the same draws for the same ``rng``), keeping every round's
    ``record(obs, state, action, reward, done, info)`` (obs and state before the round; ``record``
    hashable, e.g. a module-level function): a pytree of arrays (rounds, episodes, ...)."""
    k_reset, k_run = jax.random.split(rng)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, episodes), env_params)

    def step(carry, key):
        obs, state = carry
        k_pol, k_env = jax.random.split(key)
        action = jax.vmap(apply, in_axes=(None, 0, 0, None, 0))(
            policy_params, obs, state, env_params, jax.random.split(k_pol, episodes)
        )
        next_obs, next_state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_env, episodes), state, action, env_params
        )
        return (next_obs, next_state), record(obs, state, action, reward, jnp.logical_or(terminated, truncated), info)

    return jax.lax.scan(step, (obs, state), jax.random.split(k_run, num_steps))[1]


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
    out = {
        "policy": p.name,
        "episodes": int(episodes),
        "num_steps": int(num_steps),
        "completed_fraction": float(per_episode["completed"].mean()),
    }
    for name in EPISODE_METRICS:
        values = per_episode[name].astype(np.float64)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_std"] = float(values.std())
    return out
