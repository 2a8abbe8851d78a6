"""SABPPO (JAX, jitted end to end) vs stable-baselines3 PPO on the numpy twin: training throughput and
final return at an equal number of environment steps, measured in one run.

    python -m benchmarks.ppo_throughput                       # defaults below
    python -m benchmarks.ppo_throughput --total-timesteps 320000 --num-envs 64   # longer, more envs

Both agents get the same settings: number of environments, rollout length, total steps, epochs,
minibatch size, learning rate (linearly annealed in both), gamma, GAE lambda, clip range,
entropy/value coefficients, gradient clipping, observation normalization (running mean/var, clip 10;
SB3: VecNormalize) and network: a shared tanh MLP trunk (``--hidden``) with a linear head for the
logits of every action branch and a linear value head (SB3: the trunk is a shared features
extractor with ``net_arch=[]``; its MultiDiscrete distribution is exactly SABPPO's product of
categoricals with joint-ratio clipping).

* SABPPO: ``make_train(config, FedPEATMEC)`` compiled by ``sabppo.jit`` (CPU compiler options of
  ``sabppo.compiler_options``); the compile is timed on its own, then the whole training call is
  timed ``--jax-runs`` times (median) with ``block_until_ready``.
* SB3: ``PPO("MultiDiscrete" MlpPolicy)`` on ``DummyVecEnv([FedPEATTwin] * num_envs)``: the
  fastest of ``--sb3-runs`` fresh ``learn(total_timesteps)`` calls, wall time (its speed varies
  from run to run; the fastest is the conservative choice; all times are in the JSON).
* Final return, evaluated the same way for both: ``--eval-episodes`` full episodes of the numpy
  twin (``NumpyFedPEAT``, vectorized) from the same random draws, each agent acting
  deterministically (most likely choice per branch) on its own normalized observations.

Environment: the 'default' preset with the shipped calibration table, or, while that table does
not exist yet, the SYNTHETIC placeholder table (the output says which).
Writes benchmarks/results/ppo_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

from benchmarks.common import compile_jax, machine_info, write_json, write_markdown

NAME = "ppo_throughput"


def _env_params(preset: str):
    from fedpeat_jax.config import GPT2Config
    from fedpeat_jax.mec import PRESETS, CalibrationMissingError, preset_params, synthetic_table

    try:
        return preset_params(preset), "shipped calibration table"
    except CalibrationMissingError:
        table = synthetic_table(GPT2Config.preset(PRESETS[preset]["model"]))
        return preset_params(preset, calibration=table), "SYNTHETIC placeholder table (no calibrated table yet)"


# ---------------------------------------------------------------------------------------------
# Evaluation on the numpy twin, identical for both agents
# ---------------------------------------------------------------------------------------------
def evaluate_on_twin(act, env_params, episodes: int, seed: int) -> dict:
    """Run ``episodes`` twin episodes at once; ``act(obs (B, D) float32) -> actions (B, A)``."""
    from fedpeat_jax.mec import NumpyFedPEAT

    sim = NumpyFedPEAT(env_params)
    rng = np.random.default_rng(seed)
    obs, state = sim.reset_from_draws(sim.draw(rng, (episodes,)))
    total = np.zeros(episodes)
    ppl = np.zeros(episodes)
    latency = np.zeros(episodes)
    steps = int(np.asarray(env_params.max_steps_in_episode))
    for _ in range(steps):
        action = np.asarray(act(np.ascontiguousarray(obs.T))).T  # twin layout: (A, B)
        obs, state, reward, _, _, info = sim.step_from_draws(state, action, sim.draw(rng, (episodes,)), autoreset=False)
        total += reward
        ppl += info["perplexity"]
        latency += info["latency"]
    return {
        "return_mean": float(total.mean()),
        "return_std": float(total.std()),
        "return_sem": float(total.std() / np.sqrt(episodes)),
        "perplexity_mean": float(ppl.mean() / steps),
        "latency_mean": float(latency.mean() / steps),
        "episodes": episodes,
    }


# ---------------------------------------------------------------------------------------------
# SABPPO
# ---------------------------------------------------------------------------------------------
def run_sabppo(args, env_params) -> dict:
    from fedpeat_jax.mec import FedPEATMEC
    from fedpeat_jax.rl import sabppo
    from fedpeat_jax.rl.distributions import mode_branches, sample_branches
    from fedpeat_jax.rl.normalize import normalize_obs
    from fedpeat_jax.rl.sabppo import SABPPOConfig, make_trainer

    env = FedPEATMEC(env_params)
    cfg = SABPPOConfig(
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        total_timesteps=args.total_timesteps,
        update_epochs=args.epochs,
        num_minibatches=args.minibatches,
        hidden_sizes=args.hidden,
        lr=args.lr,
        normalize_obs=True,
        normalize_reward=False,
        network="mlp",
    )  # SB3's network: an MLP over the flat observation (equal settings)
    trainer = make_trainer(cfg, env, env_params)
    key = jax.random.key(args.seed)
    train, compile_s = compile_jax(sabppo.jit(trainer.train), key)
    times, out = [], None
    for _ in range(args.jax_runs):
        start = time.perf_counter()
        out = jax.block_until_ready(train(key))
        times.append(time.perf_counter() - start)
    state, metrics = out
    steps = cfg.num_updates * cfg.batch_size

    def logits(obs):
        return trainer.network.apply(state.params, normalize_obs(obs, state.obs_rms, cfg.obs_clip))[0]

    mode = jax.jit(lambda obs: mode_branches(logits(obs), trainer.nvec))
    sample = jax.jit(lambda key, obs: sample_branches(key, logits(obs), trainer.nvec))
    keys = iter(jax.random.split(jax.random.key(args.eval_seed), 10_000))
    evaluation = evaluate_on_twin(lambda o: mode(jnp.asarray(o)), env_params, args.eval_episodes, args.eval_seed)
    evaluation_stochastic = evaluate_on_twin(
        lambda o: sample(next(keys), jnp.asarray(o)), env_params, args.eval_episodes, args.eval_seed
    )
    ret = np.asarray(metrics["episode_return"])
    return {
        "env_steps": steps,
        "compile_s": compile_s,
        "train_s_median": statistics.median(times),
        "train_s_runs": times,
        "steps_per_s": steps / statistics.median(times),
        "final_training_return": float(np.nanmean(ret[-max(1, len(ret) // 10) :])),
        "eval": evaluation,
        "eval_stochastic": evaluation_stochastic,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "compiler_options": sabppo.compiler_options(),
    }


# ---------------------------------------------------------------------------------------------
# stable-baselines3
# ---------------------------------------------------------------------------------------------
def run_sb3(args, env_params) -> dict:
    import gymnasium
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from fedpeat_jax.mec import FedPEATTwin

    class SharedTrunk(BaseFeaturesExtractor):
        """The SABPPO trunk: tanh MLP shared by the policy and value heads."""

        def __init__(self, observation_space: gymnasium.spaces.Box, hidden=(64, 64)):
            super().__init__(observation_space, features_dim=int(hidden[-1]))
            layers, width = [], int(observation_space.shape[0])
            for h in hidden:
                layers += [torch.nn.Linear(width, int(h)), torch.nn.Tanh()]
                width = int(h)
            self.net = torch.nn.Sequential(*layers)

        def forward(self, obs):
            return self.net(obs)

    def learn():
        # Monitor only records finished episodes' returns (for the training-return column)
        venv = DummyVecEnv([lambda: Monitor(FedPEATTwin(env_params)) for _ in range(args.num_envs)])
        venv.seed(args.seed)
        venv = VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=args.gamma)
        lr = args.lr
        model = PPO(
            "MlpPolicy",
            venv,
            n_steps=args.num_steps,
            batch_size=args.num_envs * args.num_steps // args.minibatches,
            n_epochs=args.epochs,
            learning_rate=lambda remaining: lr * remaining,
            gamma=args.gamma,
            gae_lambda=0.95,
            clip_range=0.2,
            ent_coef=0.01,
            vf_coef=0.5,
            max_grad_norm=0.5,
            normalize_advantage=True,
            seed=args.seed,
            device="cpu",
            verbose=0,
            policy_kwargs=dict(
                features_extractor_class=SharedTrunk,
                features_extractor_kwargs=dict(hidden=args.hidden),
                share_features_extractor=True,
                net_arch=[],
                activation_fn=torch.nn.Tanh,
                optimizer_kwargs=dict(eps=1e-5),
            ),
        )
        start = time.perf_counter()
        model.learn(total_timesteps=args.total_timesteps)
        return model, venv, time.perf_counter() - start

    # the fastest of --sb3-runs identical runs (the baseline's best; its speed varies from run to run)
    times = []
    for _ in range(args.sb3_runs):
        model, venv, seconds = learn()
        times.append(seconds)
    train_s = min(times)
    steps = int(model.num_timesteps)
    venv.training = False

    def act(obs, deterministic=True):
        action, _ = model.predict(venv.normalize_obs(obs), deterministic=deterministic)
        return action

    evaluation = evaluate_on_twin(act, env_params, args.eval_episodes, args.eval_seed)
    evaluation_stochastic = evaluate_on_twin(lambda o: act(o, False), env_params, args.eval_episodes, args.eval_seed)
    ep = [e["r"] for e in model.ep_info_buffer]
    return {
        "env_steps": steps,
        "train_s": train_s,
        "train_s_runs": times,
        "steps_per_s": steps / train_s,
        "final_training_return": float(np.mean(ep)) if ep else float("nan"),
        "eval": evaluation,
        "eval_stochastic": evaluation_stochastic,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--total-timesteps", type=int, default=96_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--hidden", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 64))
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=1024)
    parser.add_argument("--eval-seed", type=int, default=12345)
    parser.add_argument("--jax-runs", type=int, default=3)
    parser.add_argument("--sb3-runs", type=int, default=2)
    parser.add_argument("--skip-sb3", action="store_true", help="SABPPO only (no comparison is written)")
    args = parser.parse_args(argv)
    if (args.num_envs * args.num_steps) % args.minibatches:
        parser.error("--minibatches must divide num_envs * num_steps")
    if args.total_timesteps % (args.num_envs * args.num_steps):
        parser.error(
            "--total-timesteps must be a multiple of num_envs * num_steps (both agents then take exactly "
            "that many steps)"
        )

    env_params, table = _env_params(args.preset)
    machine = machine_info()
    print(f"environment: preset {args.preset!r}, {table}")
    sab = run_sabppo(args, env_params)
    print(
        f"SABPPO: {sab['steps_per_s']:,.0f} env-steps/s (compile {sab['compile_s']:.1f} s), "
        f"eval return {sab['eval']['return_mean']:.2f} (sampled {sab['eval_stochastic']['return_mean']:.2f})"
    )
    result = {
        "machine": machine,
        "settings": vars(args) | {"hidden": list(args.hidden)},
        "environment_table": table,
        "sabppo": sab,
    }
    if args.skip_sb3:
        print("SB3 skipped; nothing written")
        return result
    sb3 = run_sb3(args, env_params)
    print(
        f"SB3 PPO: {sb3['steps_per_s']:,.0f} env-steps/s, eval return {sb3['eval']['return_mean']:.2f} "
        f"(sampled {sb3['eval_stochastic']['return_mean']:.2f})"
    )
    speedup = sab["steps_per_s"] / sb3["steps_per_s"]
    diff = sab["eval"]["return_mean"] - sb3["eval"]["return_mean"]
    diff_sampled = sab["eval_stochastic"]["return_mean"] - sb3["eval_stochastic"]["return_mean"]
    se = float(np.hypot(sab["eval"]["return_sem"], sb3["eval"]["return_sem"]))
    result.update(
        {
            "sb3": sb3,
            "speedup": speedup,
            "eval_return_difference": diff,
            "eval_return_difference_se": se,
            "eval_return_difference_sampled": diff_sampled,
            "done_criterion": {"speedup_at_least_50x": bool(speedup >= 50), "return_at_least_as_good": bool(diff >= 0)},
        }
    )
    write_json(NAME, result)
    rows = [
        [
            "SABPPO (JAX, jitted)",
            sab["env_steps"],
            sab["train_s_median"],
            sab["steps_per_s"],
            sab["compile_s"],
            sab["eval"]["return_mean"],
            sab["eval"]["return_sem"],
            sab["eval_stochastic"]["return_mean"],
            sab["final_training_return"],
        ],
        [
            "SB3 PPO (DummyVecEnv, numpy twin)",
            sb3["env_steps"],
            sb3["train_s"],
            sb3["steps_per_s"],
            "-",
            sb3["eval"]["return_mean"],
            sb3["eval"]["return_sem"],
            sb3["eval_stochastic"]["return_mean"],
            sb3["final_training_return"],
        ],
    ]
    write_markdown(
        NAME,
        "SABPPO vs stable-baselines3 PPO: training throughput and final return at equal steps",
        [
            "agent",
            "env steps",
            "train s",
            "env-steps/s",
            "compile s",
            "eval return (deterministic)",
            "eval s.e.",
            "eval return (sampled)",
            "last training return",
        ],
        rows,
        notes=[
            f"speedup (SABPPO / SB3 env-steps/s): {speedup:,.1f}x; eval return difference SABPPO - SB3: "
            f"{diff:+.2f} (s.e. {se:.2f}) deterministic, {diff_sampled:+.2f} sampled",
            f"settings: {args.num_envs} envs x {args.num_steps} steps per update, {args.total_timesteps} steps, "
            f"{args.epochs} epochs x {args.minibatches} minibatches, shared tanh trunk {list(args.hidden)}, lr {args.lr} "
            "annealed, obs normalization, no reward normalization",
            f"eval: {args.eval_episodes} episodes of the numpy twin from the same draws (seed {args.eval_seed}), "
            "deterministic actions (most likely choice per branch; the criterion) and sampled actions; "
            "last training return: mean of the last finished training episodes (sampled); SABPPO train time is the median of "
            f"{args.jax_runs} runs after a separately timed compile (with `sabppo.compiler_options()`: "
            f"{sab['compiler_options']}); SB3's is the fastest of {args.sb3_runs} learn() calls",
            f"environment: preset {args.preset!r} with the {table}",
            f"machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs, load average "
            f"{machine['loadavg_1_5_15']} (a loaded machine slows both; the ratio is measured in one run), "
            f"jax {machine['jax']}, torch {machine['torch']} ({sb3['torch_threads']} threads)",
        ],
    )
    print(f"speedup {speedup:.1f}x, return difference {diff:+.2f} (s.e. {se:.2f}); wrote benchmarks/results/{NAME}.*")
    return result


if __name__ == "__main__":
    main()
