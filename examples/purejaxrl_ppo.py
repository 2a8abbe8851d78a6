"""PPO on the FedPEAT MEC environment, PureJaxRL style, written only against the public API.

The whole run (rollouts, GAE, minibatch epochs) is one jitted function of a PRNG key. The
environment is the plain gymnax object (``FedPEATMEC``) wrapped in gymnax's own ``LogWrapper``;
the multi-discrete policy is ``MultiCategorical``, which has the methods of ``distrax.Categorical``
(sample / log_prob / entropy), so this is PureJaxRL's ``ppo.py`` with that one class swapped in.

    python examples/purejaxrl_ppo.py                         # 1M steps, about a minute on 2 CPU cores
    python examples/purejaxrl_ppo.py --total-timesteps 50000 --seeds 3

The project's own agent (SABPPO: the same algorithm with observation normalization, checkpoints,
sweeps and the baselines) is ``fedpeat train-controller``.
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from gymnax.wrappers.purerl import LogWrapper

from fedpeat_jax.mec import FedPEATMEC
from fedpeat_jax.rl.distributions import MultiCategorical
from fedpeat_jax.rl.networks import orthogonal


class ActorCritic(nn.Module):
    n_logits: int  # sum(nvec): every branch's logits, concatenated

    @nn.compact
    def __call__(self, x):
        ortho = orthogonal  # flax's values; vmap-safe on XLA:CPU (see its docstring)
        h = nn.tanh(nn.Dense(64, kernel_init=ortho(np.sqrt(2)))(x))
        h = nn.tanh(nn.Dense(64, kernel_init=ortho(np.sqrt(2)))(h))
        logits = nn.Dense(self.n_logits, kernel_init=ortho(0.01))(h)
        value = nn.Dense(1, kernel_init=ortho(1.0))(h)
        return logits, value[..., 0]


class Transition(NamedTuple):
    done: jax.Array
    action: jax.Array
    value: jax.Array
    reward: jax.Array
    log_prob: jax.Array
    obs: jax.Array
    info: dict


def make_train(config: dict):
    env = FedPEATMEC()
    env_params = env.default_params
    nvec = env.action_space(env_params).nvec
    env = LogWrapper(env)
    num_updates = config["TOTAL_TIMESTEPS"] // config["NUM_STEPS"] // config["NUM_ENVS"]
    minibatch_size = config["NUM_ENVS"] * config["NUM_STEPS"] // config["NUM_MINIBATCHES"]
    # The rewards of this environment are of order 1 per round by design (docs/system_model.md),
    # so PPO runs on them unscaled; the observations are scaled by the environment too.

    def linear_schedule(count):
        frac = 1.0 - (count // (config["NUM_MINIBATCHES"] * config["UPDATE_EPOCHS"])) / num_updates
        return config["LR"] * frac

    def train(rng):
        network = ActorCritic(int(np.sum(nvec)))
        rng, k_init, k_reset = jax.random.split(rng, 3)
        obs_dim = env.observation_space(env_params).shape[0]
        params = network.init(k_init, jnp.zeros((obs_dim,)))
        tx = optax.chain(
            optax.clip_by_global_norm(config["MAX_GRAD_NORM"]), optax.adam(learning_rate=linear_schedule, eps=1e-5)
        )
        state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_reset, config["NUM_ENVS"]), env_params
        )

        def update_step(runner, _):
            def env_step(runner, _):
                state, env_state, obs, rng = runner
                rng, k_act, k_step = jax.random.split(rng, 3)
                logits, value = network.apply(state.params, obs)
                pi = MultiCategorical(logits, nvec)
                action = pi.sample(seed=k_act)
                log_prob = pi.log_prob(action)
                obs2, env_state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                    jax.random.split(k_step, config["NUM_ENVS"]), env_state, action, env_params
                )
                done = jnp.logical_or(terminated, truncated)  # finite horizon: t/T is in the observation
                return (state, env_state, obs2, rng), Transition(done, action, value, reward, log_prob, obs, info)

            runner, traj = jax.lax.scan(env_step, runner, None, config["NUM_STEPS"])
            state, env_state, obs, rng = runner
            _, last_value = network.apply(state.params, obs)

            def gae(carry, t):
                adv, next_value = carry
                delta = t.reward + config["GAMMA"] * next_value * (1 - t.done) - t.value
                adv = delta + config["GAMMA"] * config["GAE_LAMBDA"] * (1 - t.done) * adv
                return (adv, t.value), adv

            _, advantages = jax.lax.scan(gae, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
            targets = advantages + traj.value

            def epoch(carry, _):
                state, rng = carry
                rng, k_perm = jax.random.split(rng)
                batch = (traj, advantages, targets)
                flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
                perm = jax.random.permutation(k_perm, config["NUM_ENVS"] * config["NUM_STEPS"])
                mbs = jax.tree.map(
                    lambda x: x[perm].reshape((config["NUM_MINIBATCHES"], minibatch_size) + x.shape[1:]), flat
                )

                def minibatch(state, mb):
                    t, adv, target = mb

                    def loss_fn(params):
                        logits, value = network.apply(params, t.obs)
                        pi = MultiCategorical(logits, nvec)
                        ratio = jnp.exp(pi.log_prob(t.action) - t.log_prob)
                        a = (adv - adv.mean()) / (adv.std() + 1e-8)
                        actor = -jnp.minimum(
                            ratio * a, jnp.clip(ratio, 1 - config["CLIP_EPS"], 1 + config["CLIP_EPS"]) * a
                        ).mean()
                        v_clip = t.value + jnp.clip(value - t.value, -config["CLIP_EPS"], config["CLIP_EPS"])
                        critic = 0.5 * jnp.maximum(jnp.square(value - target), jnp.square(v_clip - target)).mean()
                        return actor + config["VF_COEF"] * critic - config["ENT_COEF"] * pi.entropy().mean()

                    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params)), None

                state, _ = jax.lax.scan(minibatch, state, mbs)
                return (state, rng), None

            (state, rng), _ = jax.lax.scan(epoch, (state, rng), None, config["UPDATE_EPOCHS"])
            ended = traj.info["returned_episode"]
            ret = jnp.sum(traj.info["returned_episode_returns"] * ended) / jnp.maximum(jnp.sum(ended), 1)
            return (state, env_state, obs, rng), ret

        rng, k_run = jax.random.split(rng)
        runner, returns = jax.lax.scan(update_step, (state, env_state, obs, k_run), None, num_updates)
        return runner[0], returns

    return train


CONFIG = {
    "LR": 3e-4,
    "NUM_ENVS": 64,
    "NUM_STEPS": 50,
    "TOTAL_TIMESTEPS": 1_000_000,
    "UPDATE_EPOCHS": 4,
    "NUM_MINIBATCHES": 16,
    "GAMMA": 0.99,
    "GAE_LAMBDA": 0.95,
    "CLIP_EPS": 0.2,
    "ENT_COEF": 0.01,
    "VF_COEF": 0.5,
    "MAX_GRAD_NORM": 0.5,
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-timesteps", type=int, default=CONFIG["TOTAL_TIMESTEPS"])
    parser.add_argument("--num-envs", type=int, default=CONFIG["NUM_ENVS"])
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args(argv)
    config = {**CONFIG, "TOTAL_TIMESTEPS": args.total_timesteps, "NUM_ENVS": args.num_envs}
    train = jax.jit(jax.vmap(make_train(config)))
    started = time.time()
    _, returns = jax.block_until_ready(train(jax.random.split(jax.random.key(0), args.seeds)))
    seconds = time.time() - started
    returns = np.asarray(returns)  # (seeds, updates): mean return of the episodes that ended in each update
    print(f"{args.seeds} seed(s) x {args.total_timesteps:,} steps in {seconds:.1f} s (compile included)")
    print(f"episode return: first update {returns[:, 0].mean():.2f}, last update {returns[:, -1].mean():.2f}")
    return {"returns": returns, "seconds": seconds}


if __name__ == "__main__":
    main()
