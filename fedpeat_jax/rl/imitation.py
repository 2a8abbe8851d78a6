"""Behaviour cloning: start SABPPO where a teacher policy is, then let PPO improve on it.

PPO from a random network can settle in a worse optimum than a simple rule (on the live
environment's refitted surrogate it took ~3 devices a round where the best rule takes 6, and scored
lower). Cloning the rule first starts PPO from the rule's behaviour, so what PPO adds is an
improvement on it, not a search from scratch:

    data = teacher_data(rule_policy, env, env_params, episodes=512, num_steps=T, gamma=0.99, rng=key)
    state = clone(trainer, trainer.init(key), data, epochs=20)       # then trainer.run_updates(state, n)

``teacher_data`` runs the teacher for whole episodes (jitted, vmapped over episodes) and keeps every
round's observation, action and discounted return to go; ``clone`` sets the state's observation
normalizer to those observations and fits the network by Adam: the actor to the teacher's actions
(cross-entropy, the sum over branches of -log pi), the critic to the returns (so PPO's first
advantages are not the noise of a random critic; not with ``normalize_reward``, whose scaled
targets PPO learns itself). The optimizer state is the fresh one of ``state``: PPO starts its own
Adam moments. Both are pure functions of their arguments; over seeds' stacked states,
``jax.vmap(partial(clone, trainer), in_axes=(0, None))(states, data)`` (as ``train_controller`` does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedpeat_jax import cpu_tricks
from fedpeat_jax.rl.distributions import branch_softmax, mode_branches
from fedpeat_jax.rl.normalize import normalize_obs, rms_init, rms_update
from fedpeat_jax.rl.rollout import as_policy, record_episodes


class TeacherData(NamedTuple):
    """A teacher's rounds, flattened over (rounds, episodes)."""

    obs: jax.Array  # (S, D) raw observations
    action: jax.Array  # (S, n_branches) int32
    returns: jax.Array  # (S,) discounted return to go within the episode


def teacher_data(teacher, env, env_params, episodes: int, num_steps: int, gamma: float, rng) -> TeacherData:
    """``episodes`` fresh episodes of ``num_steps`` rounds of ``teacher`` (a Policy or a plain function),
    on the draws of :func:`~fedpeat_jax.rl.rollout.rollout_episodes` for the same ``rng``."""
    policy = as_policy(teacher)
    rounds = record_episodes(
        policy.apply, env, int(episodes), int(num_steps), policy.params, env_params, rng, _teacher_round
    )
    return _with_returns(rounds, jnp.asarray(gamma, jnp.float32))


def _teacher_round(obs, state, action, reward, done, info):
    return obs.astype(jnp.float32), action.astype(jnp.int32), reward.astype(jnp.float32), done.astype(jnp.float32)


@jax.jit
def _with_returns(rounds, gamma) -> TeacherData:
    obs, action, reward, done = rounds  # (rounds, episodes, ...)

    def to_go(following, xs):  # reverse scan; an episode's end stops the sum (auto-reset starts a new one)
        r, d = xs
        g = r + gamma * following * (1.0 - d)
        return g, g

    _, returns = jax.lax.scan(to_go, jnp.zeros_like(reward[0]), (reward, done), reverse=True)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    return TeacherData(flat(obs), flat(action), flat(returns))


def clone(trainer, state, data: TeacherData, epochs: int = 20, minibatch_size: int = 256, lr: float = 1e-3):
    """``state`` (one run's fresh ``TrainState``) with its network fitted to ``data`` (see the module
    docstring): ``epochs`` shuffled passes of ``minibatch_size`` rounds, Adam at ``lr``. Jittable; the
    last partial minibatch of an epoch is left out (fewer rounds than ``minibatch_size``: one batch of all)."""
    cfg = trainer.config
    rms = rms_update(rms_init(data.obs.shape[1:]), data.obs) if cfg.normalize_obs else state.obs_rms
    obs = normalize_obs(data.obs, rms if cfg.normalize_obs else None, cfg.obs_clip)
    size = data.obs.shape[0]
    minibatch_size = min(int(minibatch_size), size)
    batches = size // minibatch_size
    opt = optax.adam(lr)
    # the critic learns raw returns; with reward scaling PPO's targets are scaled ones, so it is left to PPO
    value_weight = 0.0 if cfg.normalize_reward else state.hparams.vf_coef

    def loss_fn(params, mb_obs, mb_action, mb_returns):
        logits, value = trainer.network.apply(params, mb_obs)
        nll = -jnp.mean(branch_softmax(logits, trainer.nvec).joint_log_prob(mb_action))
        return nll + value_weight * 0.5 * jnp.mean(jnp.square(value - mb_returns))

    def epoch(carry, key):
        perm = cpu_tricks.permutation(key, size)[: batches * minibatch_size].reshape(batches, minibatch_size)

        def minibatch(carry, idx):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, obs[idx], data.action[idx], data.returns[idx])
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(minibatch, carry, perm)[0], None

    rng, key = jax.random.split(state.rng)
    (params, _), _ = jax.lax.scan(epoch, (state.params, opt.init(state.params)), jax.random.split(key, int(epochs)))
    return state.replace(params=params, obs_rms=rms, rng=rng)


def action_agreement(trainer, state, data: TeacherData) -> jax.Array:
    """Fraction of ``data``'s rounds whose every branch the state's most likely action matches."""
    logits, _ = trainer.policy_logits(state, data.obs)
    return jnp.mean(jnp.all(mode_branches(logits, trainer.nvec) == data.action, axis=-1))


__all__ = ["TeacherData", "action_agreement", "clone", "teacher_data"]
