"""Baseline controllers for the FedPEAT MEC environment and a jitted evaluator for any policy.

A policy maps ONE environment's ``(obs, state, env_params, rng)`` to its flat int32 action
(layout in :mod:`fedpeat_jax.mec.env`: [server] + participate (N) + emulator level (N) +
bandwidth level (N)); :func:`evaluate` vmaps it over episodes. A policy is either

* a plain function ``fn(obs, state, env_params, rng) -> action``, or
* a :class:`Policy`: a hashable ``apply(policy_params, obs, state, env_params, rng)`` plus its
  parameter pytree, which stays a traced argument (a trained SABPPO network is one:
  :func:`sabppo_policy`), so evaluating new parameters does not recompile.

Baselines (mec_model.md):

* :func:`random_policy`        every branch uniformly at random
* :func:`all_largest_policy`   server and all devices take part, largest emulator, equal bandwidth
* :func:`greedy_policy`        the ``n_select`` devices with the best channel whose memory fits some
                               emulator, each with the largest emulator that fits its memory,
                               equal bandwidth, server on
* :func:`no_server_policy`     FedPEAT without server participation: all devices, largest emulator,
                               equal bandwidth, server off (:func:`without_server` turns the server
                               off in any policy, e.g. a trained SABPPO)

The rule-based baselines read the device state (channel gain, memory capacity) and compute memory
needs from ``env_params`` with the environment's own formula (``system.device_memory_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.mec import system
from fedpeat_jax.rl import sabppo as _sabppo

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


def _action(server, participate, level, bandwidth) -> jax.Array:
    s = jnp.reshape(jnp.asarray(server, jnp.int32), (1,))
    return jnp.concatenate([s, participate.astype(jnp.int32), level.astype(jnp.int32), bandwidth.astype(jnp.int32)])


# The rule-based policies are frozen dataclasses (hashable by value), so ``evaluate`` compiles each
# kind once per environment, however often a policy object is rebuilt.
@dataclass(frozen=True)
class _Random:
    nvec: tuple

    def __call__(self, _params, obs, state, env_params, rng):
        return jax.random.randint(rng, (len(self.nvec),), 0, jnp.asarray(self.nvec, jnp.int32)).astype(jnp.int32)


def random_policy(env) -> Policy:
    """Every branch uniform over its choices."""
    return Policy(apply=_Random(tuple(int(n) for n in _nvec(env))), name="random")


def _largest_level(env_params) -> jax.Array:
    """Index of the emulator level with the most middle blocks."""
    return jnp.argmax(jnp.asarray(env_params.level_k))


@dataclass(frozen=True)
class _AllLargest:
    n_devices: int
    server: int

    def __call__(self, _params, obs, state, env_params, rng):
        n = self.n_devices
        level = jnp.full((n,), _largest_level(env_params))
        return _action(self.server, jnp.ones((n,)), level, jnp.zeros((n,)))


def all_largest_policy(env, server: bool = True) -> Policy:
    """Server (if ``server``) and every device take part with the largest emulator and equal bandwidth."""
    return Policy(apply=_AllLargest(int(env.n_devices), int(bool(server))),
                  name="all_largest" if server else "no_server")


def no_server_policy(env) -> Policy:
    """FedPEAT without server participation: all devices, largest emulator, equal bandwidth, server off."""
    return all_largest_policy(env, server=False)


def level_memory_bytes(env_params) -> jax.Array:
    """Device memory need of every emulator level (m,), bytes (the environment's formula)."""
    p = env_params
    return system.device_memory_bytes(jnp.asarray(p.level_k), p.p_emb, p.p_blk, p.n_adapter, p.p_peft, p.q_bits,
                                      p.batch_size, p.seq_len, p.n_embd, p.n_head)


@dataclass(frozen=True)
class _Greedy:
    n_devices: int
    n_select: int

    def __call__(self, _params, obs, state, env_params, rng):
        n = self.n_devices
        level_k = jnp.asarray(env_params.level_k)
        fits = level_memory_bytes(env_params)[None, :] <= state.mem_capacity[:, None]  # (N, m)
        level = jnp.argmax(jnp.where(fits, level_k[None, :], -jnp.inf), axis=1)  # largest k that fits
        can = jnp.any(fits, axis=1)
        score = jnp.where(can, state.gain, -jnp.inf)
        chosen = jnp.argsort(-score)[: self.n_select]
        participate = jnp.zeros((n,), jnp.int32).at[chosen].set(1) * can
        return _action(1, participate, level, jnp.zeros((n,)))


def greedy_policy(env, n_select: Optional[int] = None) -> Policy:
    """The ``n_select`` best-channel devices (default ceil(N/2)) among those that fit some emulator,
    each with the largest emulator that fits its memory capacity; equal bandwidth; server on."""
    n = int(env.n_devices)
    k_sel = int(math.ceil(n / 2)) if n_select is None else int(n_select)
    if not 1 <= k_sel <= n:
        raise ValueError(f"greedy n_select must be in 1..{n} (the number of devices), got {n_select}")
    return Policy(apply=_Greedy(n, k_sel), name=f"greedy_{k_sel}")


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
    nvec: tuple
    hidden_sizes: tuple
    activation: str
    normalize_obs: bool
    obs_clip: float
    deterministic: bool

    def __call__(self, params, obs, state, env_params, rng):
        net_params, obs_rms = params
        network = _sabppo.ActorCritic(nvec=self.nvec, hidden_sizes=self.hidden_sizes, activation=self.activation)
        x = _sabppo.normalize_obs(obs.astype(jnp.float32), obs_rms if self.normalize_obs else None, self.obs_clip)
        logits, _ = network.apply(net_params, x)
        if self.deterministic:
            return _sabppo.mode_branches(logits, self.nvec)
        return _sabppo.sample_branches(rng, logits, self.nvec)


def sabppo_policy(trainer: "_sabppo.Trainer", state: "_sabppo.TrainState", deterministic: bool = True,
                  name: str = "sabppo") -> Policy:
    """The policy of a trained SABPPO ``state`` (one run, not a vmapped batch): the network with the
    state's frozen observation normalizer; ``deterministic`` takes the most likely choice per branch."""
    cfg = trainer.config
    if jnp.ndim(state.update) != 0:
        raise ValueError("sabppo_policy needs the state of ONE run; slice a vmapped state first, "
                         "e.g. jax.tree.map(lambda x: x[i], states)")
    apply = _SABPPOApply(nvec=tuple(trainer.nvec), hidden_sizes=cfg.hidden_sizes, activation=cfg.activation,
                         normalize_obs=cfg.normalize_obs, obs_clip=cfg.obs_clip, deterministic=bool(deterministic))
    return Policy(apply=apply, params=(state.params, state.obs_rms), name=name)


# =============================================================================================
# Evaluation
# =============================================================================================
EPISODE_METRICS = ("return", "perplexity", "final_perplexity", "latency", "total_latency", "memory", "violations",
                   "participants", "bytes", "empty_rounds")


@partial(jax.jit, static_argnames=("apply", "env", "episodes", "num_steps"))
def rollout_episodes(apply, env, episodes: int, num_steps: int, policy_params, env_params, rng):
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
             "participants": zeros, "bytes": zeros, "empty_rounds": zeros}

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
            "participants": sums["participants"] + f("n_participants"),
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
        "participants": sums["participants"] / num_steps,
        "bytes": sums["bytes"],
        "empty_rounds": sums["empty_rounds"],
        "completed": last_done,
    }


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
    """The four baselines by name: random, all_largest, greedy, no_server."""
    return {
        "random": random_policy(env),
        "all_largest": all_largest_policy(env),
        "greedy": greedy_policy(env, greedy_n_select)._replace(name="greedy"),
        "no_server": no_server_policy(env),
    }


__all__ = [
    "EPISODE_METRICS",
    "Policy",
    "all_largest_policy",
    "as_policy",
    "baseline_policies",
    "evaluate",
    "greedy_policy",
    "level_memory_bytes",
    "no_server_policy",
    "random_policy",
    "rollout_episodes",
    "sabppo_policy",
    "without_server",
]
