"""SABPPO: single-agent action-branching PPO for the FedPEAT MEC environment, PureJaxRL style.

The whole training run is one pure function of a PRNG key and a hyperparameter pytree, so it can
be ``jax.jit``-ed whole and ``jax.vmap``-ed over seeds *and* hyperparameters in one compile:

    trainer = make_trainer(SABPPOConfig(), env, env_params)
    state, metrics = jit(trainer.train)(jax.random.key(0))                # one run
    hps = stack_hparams([trainer.default_hparams().replace(lr=lr) for lr in (1e-4, 3e-4)])
    keys = jax.random.split(jax.random.key(0), 2)
    states, metrics = jit(jax.vmap(trainer.train))(keys, hps)             # a sweep, one compile

(``jit`` is ``jax.jit`` with ``cpu_tricks.compiler_options()``; the settings live in
:mod:`fedpeat_jax.rl.sabppo_config` and are re-exported here.) The branch distribution is
:class:`fedpeat_jax.rl.distributions.MultiCategorical`'s machinery; the running normalizers are
:mod:`fedpeat_jax.rl.normalize`.

``train`` is ``init`` followed by ``run_updates(state, num_updates)``; a host loop can call
``run_updates`` in chunks and checkpoint the :class:`TrainState` between them (see
:mod:`fedpeat_jax.rl.controller`), and the chunked run equals the unchunked one.

The agent (mec_model.md, "SABPPO")
----------------------------------
* A shared MLP trunk; one categorical head per action branch (all branch logits come from one
  Dense layer, split by ``nvec``: a factorized categorical, :mod:`fedpeat_jax.rl.distributions`);
  one value head.
* log pi(a|s) = sum of the branch log-probs; entropy = sum of the branch entropies.
* PPO clipping on the joint ratio pi(a|s)/pi_old(a|s) (``clip_mode="joint"``) or on each
  branch's ratio with the branch surrogates averaged (``clip_mode="branch"``, the action-branching
  variant); the two agree when there is a single branch.
* GAE by a reverse ``lax.scan``; ``update_epochs`` passes over the rollout, each in
  ``num_minibatches`` shuffled minibatches; Adam with global-norm clipping and linear LR annealing.
* Optional running observation normalization and return-based reward scaling, both kept inside the
  scanned training state (so they are checkpointed and resumed with it).

Episodes and bootstrapping: the MEC environment truncates every episode after T rounds and the
observation contains t/T, so the task is a finite-horizon one and the episode end is treated as
terminal in GAE (no bootstrap across it). Returns reported in the metrics are the raw
(unnormalized) episodic returns of the episodes that finished during the update.

Sweepable hyperparameters (:class:`HParams`, traced, vmappable): lr, ent_coef, clip_eps, vf_coef,
max_grad_norm, gamma, gae_lambda and the whole ``EnvParams`` (reward weights w_ppl, w_latency,
w_memory, w_violation, w_empty and every physical parameter). Everything that fixes an array
shape or a loop length (number of envs, rollout length, network sizes, epochs, minibatches, the
options) is in the static :class:`SABPPOConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fedpeat_jax import cpu_tricks
from fedpeat_jax.cpu_tricks import compiler_options
from fedpeat_jax.rl.distributions import branch_softmax, sample_with_log_probs
from fedpeat_jax.rl.networks import ActorCritic, make_network
from fedpeat_jax.rl.normalize import RunningMeanStd, normalize_obs, rms_init, rms_update
from fedpeat_jax.rl.sabppo_config import CLIP_MODES, HParams, SABPPOConfig, default_hparams, stack_hparams
from fedpeat_jax.rl.vec_env import env_nvec, vec_env

PyTree = Any


# =============================================================================================
# Losses and advantages
# =============================================================================================
def compute_gae(rewards, values, dones, last_value, gamma, gae_lambda):
    """Generalized advantage estimates by a reverse scan over time (time-major arrays (T, ...)).

    ``dones[t]`` says the episode ended with step t, so neither the value nor the advantage of
    the following (reset) observation flows back into step t. Returns (advantages, returns).
    """

    def step(carry, xs):
        gae, next_value = carry
        reward, value, done = xs
        not_done = 1.0 - done
        delta = reward + gamma * next_value * not_done - value
        gae = delta + gamma * gae_lambda * not_done * gae
        return (gae, value), gae

    _, adv = jax.lax.scan(
        step, (jnp.zeros_like(last_value), last_value), (rewards, values, dones.astype(values.dtype)), reverse=True
    )
    return adv, adv + values


def clipped_policy_loss(logp_b, old_logp_b, advantages, clip_eps, mode: str = "joint"):
    """PPO clipped surrogate (to minimize) from branch log-probs (..., n_branches).

    joint:  -E[min(r A, clip(r, 1-eps, 1+eps) A)] with r = exp(sum_b logp_b - sum_b old_logp_b)
    branch: the same per branch with r_b = exp(logp_b - old_logp_b), averaged over branches.
    Returns (loss, clip_fraction).
    """
    if mode == "joint":
        ratio = jnp.exp(jnp.sum(logp_b, -1) - jnp.sum(old_logp_b, -1))
        adv = advantages
    elif mode == "branch":
        ratio = jnp.exp(logp_b - old_logp_b)
        adv = advantages[..., None]
    else:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -jnp.mean(jnp.minimum(unclipped, clipped))
    clip_frac = jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32))
    return loss, clip_frac


# =============================================================================================
# Training state
# =============================================================================================
@struct.dataclass
class TrainState:
    """Everything a run carries from one update to the next (a pytree: checkpoint it as is)."""

    params: PyTree  # network parameters
    opt_state: PyTree
    env_state: PyTree  # batched environment state (FedPEATMEC: env axis trailing)
    obs: jax.Array  # (E, D) raw observations of the coming step
    obs_rms: RunningMeanStd
    ret_rms: RunningMeanStd  # running variance of the discounted return (reward scaling)
    disc_return: jax.Array  # (E,) discounted return accumulator for reward scaling
    ep_return: jax.Array  # (E,) raw return of the running episodes
    ep_length: jax.Array  # (E,) int32
    rng: jax.Array  # typed PRNG key
    update: jax.Array  # () int32 updates done
    hparams: HParams


class Transition(NamedTuple):
    obs: jax.Array  # normalized observation fed to the network
    action: jax.Array
    logp_b: jax.Array  # per-branch log-probs under the behaviour policy
    value: jax.Array
    reward: jax.Array  # scaled reward used for learning
    done: jax.Array


class Trainer(NamedTuple):
    """The pure functions of one SABPPO setup (all jittable, all vmappable over seeds/hparams)."""

    config: SABPPOConfig
    network: Any  # the flax module (networks.ActorCritic or networks.DeviceActorCritic)
    nvec: tuple
    default_hparams: Callable  # () -> HParams
    init: Callable  # (rng, hparams=None) -> TrainState
    run_updates: Callable  # (state, num_updates: static int) -> (state, metrics of shape (num_updates,))
    train: Callable  # (rng, hparams=None) -> (state, metrics)
    policy_logits: Callable  # (state, obs (..., D)) -> (logits, value) with the state's normalizer


# =============================================================================================
# Compiling
# =============================================================================================
def jit(fun: Callable, **kwargs) -> Callable:
    """``jax.jit`` with ``cpu_tricks.compiler_options``: use it for ``train``/``run_updates`` and vmaps of them.

    Only for a top-level call: jax refuses compiler options on a jit nested inside another trace
    (inside your own ``jax.jit``, use ``train`` directly).
    """
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


# =============================================================================================
# make_trainer / make_train
# =============================================================================================
def make_trainer(config: SABPPOConfig, env, env_params=None) -> Trainer:
    """Build the pure SABPPO functions for ``env`` (a gymnax env; FedPEATMEC uses its fused batch API).

    ``env_params`` are the default environment parameters of :class:`HParams` (default:
    ``env.default_params``); ``train`` can be given others, batched, in its ``hparams``.
    """
    if not isinstance(config, SABPPOConfig):
        raise TypeError(f"config must be an SABPPOConfig, got {type(config).__name__}")
    env_params = env.default_params if env_params is None else env_params
    nvec = env_nvec(env, env_params)
    n_branches = len(nvec)
    layout = env.agent_layout(env_params) if hasattr(env, "agent_layout") else None
    network = make_network(config.network, nvec, config.hidden_sizes, config.activation, layout)
    space = env.action_space(env_params)
    venv = vec_env(env, config.num_envs, scalar_action=not hasattr(space, "nvec") and hasattr(space, "n"))
    num_updates_total = config.num_updates
    E, T = config.num_envs, config.num_steps

    def default():
        return default_hparams(config, env_params)

    def learning_rate(hp: HParams, update):
        """The learning rate during update ``update`` (0-based): linear annealing to 0 over the run."""
        if not config.anneal_lr:
            return hp.lr
        return hp.lr * jnp.maximum(1.0 - jnp.asarray(update).astype(jnp.float32) / num_updates_total, 0.0)

    def optimizer(hp: HParams):
        steps_per_update = config.update_epochs * config.num_minibatches
        return optax.chain(
            optax.clip_by_global_norm(hp.max_grad_norm),
            optax.adam(learning_rate=lambda count: learning_rate(hp, count // steps_per_update), eps=config.adam_eps),
        )

    def obs_normalizer(state: TrainState):
        return state.obs_rms if config.normalize_obs else None

    def policy_logits(state: TrainState, obs):
        return network.apply(state.params, normalize_obs(obs, obs_normalizer(state), config.obs_clip))

    # ----------------------------------------------------------------------------------- INIT
    def init(rng, hparams: Optional[HParams] = None) -> TrainState:
        hp = default() if hparams is None else hparams
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        rng, k_net, k_env = jax.random.split(rng, 3)
        obs, env_state = venv.reset(k_env, hp.env_params)
        obs = obs.astype(jnp.float32)
        params = network.init(k_net, jnp.zeros(obs.shape[1:], jnp.float32))
        obs_rms = rms_init(obs.shape[1:])
        if config.normalize_obs:
            obs_rms = rms_update(obs_rms, obs)
        return TrainState(
            params=params,
            opt_state=optimizer(hp).init(params),
            env_state=env_state,
            obs=obs,
            obs_rms=obs_rms,
            ret_rms=rms_init(),
            disc_return=jnp.zeros((E,), jnp.float32),
            ep_return=jnp.zeros((E,), jnp.float32),
            ep_length=jnp.zeros((E,), jnp.int32),
            rng=rng,
            update=jnp.zeros((), jnp.int32),
            hparams=hp,
        )

    # ------------------------------------------------------------------------------ ROLLOUT
    def env_step(carry, step_keys):
        state, stats = carry
        hp = state.hparams
        k_act, k_env = step_keys
        obs_n = normalize_obs(state.obs, obs_normalizer(state), config.obs_clip)
        logits, value = network.apply(state.params, obs_n)
        action, logp_b = sample_with_log_probs(k_act, logits, nvec)

        obs, env_state, reward, done, info = venv.step(k_env, state.env_state, action, hp.env_params)
        obs = obs.astype(jnp.float32)
        reward = reward.astype(jnp.float32)
        done = done.astype(bool)

        # reward scaling by the running std of the discounted return (SB3 VecNormalize style)
        disc_return, ret_rms, learn_reward = state.disc_return, state.ret_rms, reward
        if config.normalize_reward:
            disc_return = disc_return * hp.gamma + reward
            ret_rms = rms_update(ret_rms, disc_return)
            learn_reward = jnp.clip(reward / jnp.sqrt(ret_rms.var + 1e-8), -config.reward_clip, config.reward_clip)
            disc_return = jnp.where(done, 0.0, disc_return)
        obs_rms = rms_update(state.obs_rms, obs) if config.normalize_obs else state.obs_rms

        # episode bookkeeping, reduced on the fly (no per-step info is kept)
        ep_return = state.ep_return + reward
        ep_length = state.ep_length + 1
        d = done.astype(jnp.float32)
        keys = [k for k, v in info.items() if jnp.shape(v) == (E,) and k not in ("terminated", "truncated")]
        means = jnp.mean(jnp.stack([info[k].astype(jnp.float32) for k in keys]), axis=1)  # one reduction
        info_means = {k: means[i] for i, k in enumerate(keys)}
        stats = {
            "episodes": stats["episodes"] + jnp.sum(d),
            "episode_return_sum": stats["episode_return_sum"] + jnp.sum(d * ep_return),
            "episode_length_sum": stats["episode_length_sum"] + jnp.sum(d * ep_length),
            "reward_sum": stats["reward_sum"] + jnp.mean(reward),
            "info_sum": jax.tree.map(jnp.add, stats["info_sum"], info_means),
        }
        state = state.replace(
            env_state=env_state,
            obs=obs,
            obs_rms=obs_rms,
            ret_rms=ret_rms,
            disc_return=disc_return,
            ep_return=jnp.where(done, 0.0, ep_return),
            ep_length=jnp.where(done, 0, ep_length),
        )
        return (state, stats), Transition(obs_n, action, logp_b, value, learn_reward, done)

    def info_template(state: TrainState):
        """Zeros for the per-update means of the env's (E,)-shaped info entries."""
        action = jnp.zeros((E, n_branches), jnp.int32)
        out = jax.eval_shape(venv.step, state.rng, state.env_state, action, state.hparams.env_params)
        info = out[4]
        return {
            k: jnp.zeros((), jnp.float32)
            for k, v in info.items()
            if v.shape == (E,) and k not in ("terminated", "truncated")
        }

    # ------------------------------------------------------------------------------- UPDATE
    def loss_fn(params, batch, adv, targets, hp: HParams):
        obs, action, old_logp_b, old_value = batch
        logits, value = network.apply(params, obs)
        sm = branch_softmax(logits, nvec)  # shared by the log-probs and the entropy
        if config.clip_mode == "joint":  # only the sum over branches is needed: cheaper
            logp_b, old_logp_b = sm.joint_log_prob(action)[..., None], jnp.sum(old_logp_b, -1, keepdims=True)
        else:
            logp_b = sm.log_probs(action)
        entropy = jnp.mean(jnp.sum(sm.entropies(), axis=-1))
        if config.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss, clip_frac = clipped_policy_loss(logp_b, old_logp_b, adv, hp.clip_eps, config.clip_mode)
        if config.clip_value:
            v_clipped = old_value + jnp.clip(value - old_value, -hp.clip_eps, hp.clip_eps)
            v_loss = 0.5 * jnp.mean(jnp.maximum(jnp.square(value - targets), jnp.square(v_clipped - targets)))
        else:
            v_loss = 0.5 * jnp.mean(jnp.square(value - targets))
        total = pg_loss + hp.vf_coef * v_loss - hp.ent_coef * entropy
        log_ratio = jnp.sum(logp_b - old_logp_b, axis=-1)
        approx_kl = jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio)
        return total, {
            "loss": total,
            "policy_loss": pg_loss,
            "value_loss": v_loss,
            "entropy": entropy,
            "approx_kl": approx_kl,
            "clip_frac": clip_frac,
        }

    def update_epoch(carry, key):
        params, opt_state, traj, adv, targets, hp = carry
        opt = optimizer(hp)
        flat = lambda x: x.reshape((config.batch_size,) + x.shape[2:])  # noqa: E731
        data = jax.tree.map(flat, ((traj.obs, traj.action, traj.logp_b, traj.value), adv, targets))
        perm = cpu_tricks.permutation(key, config.batch_size)
        mbs = jax.tree.map(
            lambda x: x[perm].reshape((config.num_minibatches, config.minibatch_size) + x.shape[1:]), data
        )

        def minibatch(carry, mb):
            params, opt_state = carry
            batch, mb_adv, mb_targets = mb
            grads, aux = jax.grad(loss_fn, has_aux=True)(params, batch, mb_adv, mb_targets, hp)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), aux

        (params, opt_state), aux = jax.lax.scan(minibatch, (params, opt_state), mbs)
        return (params, opt_state, traj, adv, targets, hp), aux

    def one_update(state: TrainState, _):
        hp = state.hparams
        zero = jnp.zeros((), jnp.float32)
        stats0 = {
            "episodes": zero,
            "episode_return_sum": zero,
            "episode_length_sum": zero,
            "reward_sum": zero,
            "info_sum": info_template(state),
        }
        rng, k_rollout, k_epochs = jax.random.split(state.rng, 3)
        # every step's (action, env) keys drawn at once: one threefry call per update, not per step
        (state, stats), traj = jax.lax.scan(env_step, (state, stats0), jax.random.split(k_rollout, (T, 2)))

        # ----- advantages (reverse scan)
        _, last_value = policy_logits(state, state.obs)
        adv, targets = compute_gae(traj.reward, traj.value, traj.done, last_value, hp.gamma, hp.gae_lambda)

        # ----- epochs x minibatches
        lr_now = learning_rate(hp, state.update)
        (params, opt_state, *_), aux = jax.lax.scan(
            update_epoch,
            (state.params, state.opt_state, traj, adv, targets, hp),
            jax.random.split(k_epochs, config.update_epochs),
        )
        state = state.replace(params=params, opt_state=opt_state, rng=rng, update=state.update + 1)

        # ----- metrics of this update (scalars)
        n_ep = stats["episodes"]
        metrics = {
            "update": state.update,
            "env_steps": state.update * config.batch_size,
            "episodes": n_ep,
            "episode_return": jnp.where(n_ep > 0, stats["episode_return_sum"] / jnp.maximum(n_ep, 1.0), jnp.nan),
            "episode_length": jnp.where(n_ep > 0, stats["episode_length_sum"] / jnp.maximum(n_ep, 1.0), jnp.nan),
            "reward": stats["reward_sum"] / T,
            "value_mean": jnp.mean(traj.value),
            "lr": lr_now,
            **{k: jnp.mean(v) for k, v in aux.items()},
            **{f"env/{k}": v / T for k, v in stats["info_sum"].items()},
        }
        return state, metrics

    def run_updates(state: TrainState, num_updates: int):
        """``num_updates`` PPO updates (a static int): (state, metrics with a leading update axis)."""
        return jax.lax.scan(one_update, state, None, length=int(num_updates))

    def train(rng, hparams: Optional[HParams] = None):
        """A whole run: ``init`` then ``config.num_updates`` updates."""
        return run_updates(init(rng, hparams), num_updates_total)

    return Trainer(
        config=config,
        network=network,
        nvec=nvec,
        default_hparams=default,
        init=init,
        run_updates=run_updates,
        train=train,
        policy_logits=policy_logits,
    )


def make_train(config: SABPPOConfig, env, env_params=None) -> Callable:
    """PureJaxRL entry point: a pure ``train(rng, hparams=None) -> (TrainState, metrics)``."""
    return make_trainer(config, env, env_params).train


__all__ = [
    "ActorCritic",
    "HParams",
    "SABPPOConfig",
    "TrainState",
    "Trainer",
    "clipped_policy_loss",
    "compiler_options",
    "compute_gae",
    "default_hparams",
    "jit",
    "make_train",
    "make_trainer",
    "stack_hparams",
]
