"""Hyperparameter sweep of SABPPO: a grid (default lr x ent_coef x seeds) trained as ONE jitted,
vmapped call, then every run's policy evaluated against the baselines.

    python scripts/sweep.py                                        # lr x ent_coef x 3 seeds
    python scripts/sweep.py --grid lr=1e-4,3e-4,1e-3 --grid w_latency=0.5,1,2 --seeds 5

``--grid NAME=v1,v2,...`` takes any SABPPO hyperparameter (lr, ent_coef, clip_eps, vf_coef,
max_grad_norm, gamma, gae_lambda) or any numeric EnvParams field (reward weights w_ppl,
w_latency, w_memory, w_violation, w_empty, or physics such as cell_radius); the grid is their
Cartesian product, each point run with ``--seeds`` seeds. All runs share the static settings
(envs, rollout, network, steps) and therefore one compile.

Evaluation: each run's deterministic policy over ``--eval-episodes`` episodes with the same
draws, under the environment parameters it was trained with (returns of runs with different
reward weights are in different units); the baselines under the default parameters.
Writes benchmarks/results/sweep.json, sweep.md and sweep.png. Environment: the 'default' preset
with the shipped calibration table or, while there is none, the SYNTHETIC placeholder table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, machine_info, write_json, write_markdown  # noqa: E402
from fedpeat_jax.config import GPT2Config  # noqa: E402
from fedpeat_jax.io.plots import pyplot  # noqa: E402
from fedpeat_jax.mec import PRESETS, CalibrationMissingError, EnvParams, FedPEATMEC, preset_params, synthetic_table  # noqa: E402
from fedpeat_jax.rl import baselines as B  # noqa: E402
from fedpeat_jax.rl import sabppo  # noqa: E402
from fedpeat_jax.rl.sabppo import HParams, SABPPOConfig, make_trainer, stack_hparams  # noqa: E402

NAME = "sweep"
AGENT_FIELDS = ("lr", "ent_coef", "clip_eps", "vf_coef", "max_grad_norm", "gamma", "gae_lambda")


def parse_grid(items) -> dict:
    """['lr=1e-4,3e-4', ...] -> {'lr': [1e-4, 3e-4], ...} with the names checked."""
    env_fields = {f for f in EnvParams.__dataclass_fields__ if f != "n_devices"}
    grid = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid expects NAME=v1,v2,..., got {item!r}")
        name, values = item.split("=", 1)
        name = name.strip()
        if name not in AGENT_FIELDS and name not in env_fields:
            raise ValueError(
                f"--grid {name!r} is neither an SABPPO hyperparameter {AGENT_FIELDS} nor an EnvParams field"
            )
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid {name}: values must be numbers, got {values!r}") from None
        if not vals:
            raise ValueError(f"--grid {name} has no values")
        grid[name] = vals
    return grid


def point_hparams(base: HParams, point: dict) -> HParams:
    agent = {k: jnp.float32(v) for k, v in point.items() if k in AGENT_FIELDS}
    env = {k: v for k, v in point.items() if k not in AGENT_FIELDS}
    hp = base.replace(**agent)
    return hp.replace(env_params=hp.env_params.replace(**env)) if env else hp


def _env_params(preset):
    try:
        return preset_params(preset), "shipped calibration table"
    except CalibrationMissingError:
        table = synthetic_table(GPT2Config.preset(PRESETS[preset]["model"]))
        return preset_params(preset, calibration=table), "SYNTHETIC placeholder table (no calibrated table yet)"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    configs = result["configs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    steps = np.asarray(result["env_steps"])
    for i, c in enumerate(configs):
        curve = np.asarray(c["training_return_curve"], dtype=float)
        ax1.plot(steps, curve, lw=1.2, color=plt.cm.viridis(i / max(1, len(configs) - 1)), label=c["label"])
    ax1.set_xlabel("environment steps per run")
    ax1.set_ylabel("training episode return (mean over seeds)")
    ax1.set_title("learning curves")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)

    labels = [c["label"] for c in configs]
    means = [c["eval_return_mean"] for c in configs]
    stds = [c["eval_return_std_across_seeds"] for c in configs]
    ax2.bar(
        range(len(configs)),
        means,
        yerr=stds,
        capsize=3,
        color=[plt.cm.viridis(i / max(1, len(configs) - 1)) for i in range(len(configs))],
    )
    for j, (name, b) in enumerate(result["baselines"].items()):
        ax2.axhline(b["return_mean"], ls="--", lw=1, color=f"C{j + 1}", label=f"{name} ({b['return_mean']:.1f})")
    ax2.set_xticks(range(len(configs)))
    ax2.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax2.set_ylabel(f"eval return (mean over {result['settings']['seeds']} seeds, error: std)")
    ax2.set_title("final deterministic policies vs baselines")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument(
        "--grid",
        action="append",
        default=None,
        help="NAME=v1,v2,... (repeatable); default: lr=1e-4,3e-4,1e-3 and ent_coef=0,0.01,0.03",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--total-timesteps", type=int, default=160_000)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eval-episodes", type=int, default=512)
    parser.add_argument("--eval-seed", type=int, default=12345)
    parser.add_argument("--name", default=NAME, help="result file name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    grid = parse_grid(args.grid or ["lr=1e-4,3e-4,1e-3", "ent_coef=0,0.01,0.03"])

    env_params, table = _env_params(args.preset)
    env = FedPEATMEC(env_params)
    cfg = SABPPOConfig(
        num_envs=args.num_envs,
        num_steps=args.num_steps,
        total_timesteps=args.total_timesteps,
        num_minibatches=args.minibatches,
        update_epochs=args.epochs,
    )
    trainer = make_trainer(cfg, env, env_params)
    names = list(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    runs = [(p, s) for p in points for s in range(args.seeds)]
    base = trainer.default_hparams()
    hps = stack_hparams([point_hparams(base, p) for p, _ in runs])
    keys = jax.random.split(jax.random.key(args.seed), args.seeds)
    run_keys = jnp.stack([keys[s] for _, s in runs])
    print(
        f"{len(points)} grid points x {args.seeds} seeds = {len(runs)} runs of {cfg.num_updates * cfg.batch_size} "
        f"env steps, one compiled call; environment: {table}"
    )

    train = sabppo.jit(jax.vmap(trainer.train))
    t0 = time.perf_counter()
    compiled = train.lower(run_keys, hps).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    states, metrics = jax.block_until_ready(compiled(run_keys, hps))
    train_s = time.perf_counter() - t0
    total_steps = len(runs) * cfg.num_updates * cfg.batch_size
    print(
        f"compile {compile_s:.1f} s, training {train_s:.1f} s ({total_steps / train_s:,.0f} env-steps/s over all runs)"
    )

    metrics = jax.device_get(metrics)
    evals, evals_sampled = [], []
    for r in range(len(runs)):
        state = jax.tree.map(lambda x: x[r], states)
        kw = dict(env=env, env_params=state.hparams.env_params, episodes=args.eval_episodes, rng=args.eval_seed)
        evals.append(B.evaluate(B.sabppo_policy(trainer, state), **kw))
        evals_sampled.append(B.evaluate(B.sabppo_policy(trainer, state, deterministic=False), **kw))
    baselines = {
        name: B.evaluate(p, env, env_params, episodes=args.eval_episodes, rng=args.eval_seed)
        for name, p in B.baseline_policies(env).items()
    }

    configs = []
    ret = np.asarray(metrics["episode_return"], dtype=np.float64)  # (runs, updates)
    for _i, point in enumerate(points):
        idx = [r for r, (p, _) in enumerate(runs) if p is point]
        er = np.array([evals[r]["return_mean"] for r in idx])
        tail = max(1, cfg.num_updates // 10)
        configs.append(
            {
                "point": point,
                "label": ", ".join(f"{k}={v:g}" for k, v in point.items()),
                "eval_return_per_seed": er.tolist(),
                "eval_return_mean": float(er.mean()),
                "eval_return_std_across_seeds": float(er.std()),
                "eval_return_sampled_mean": float(np.mean([evals_sampled[r]["return_mean"] for r in idx])),
                "eval_perplexity_mean": float(np.mean([evals[r]["perplexity_mean"] for r in idx])),
                "eval_latency_mean": float(np.mean([evals[r]["latency_mean"] for r in idx])),
                "eval_participants_mean": float(np.mean([evals[r]["participants_mean"] for r in idx])),
                "final_training_return": float(np.nanmean(ret[idx, -tail:])),
                "training_return_curve": np.nanmean(ret[idx], axis=0).tolist(),
                "beats_every_baseline": bool(all(er.mean() > b["return_mean"] for b in baselines.values())),
            }
        )
    env_grid = any(n not in AGENT_FIELDS for n in names)
    result = {
        "machine": machine_info(),
        "settings": vars(args) | {"grid": grid},
        "environment_table": table,
        "sabppo_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "runs": len(runs),
        "compile_s": compile_s,
        "train_s": train_s,
        "env_steps_per_s_all_runs": total_steps / train_s,
        "env_steps": (np.arange(1, cfg.num_updates + 1) * cfg.batch_size).tolist(),
        "configs": configs,
        "baselines": baselines,
    }
    write_json(args.name, result)
    best = max(configs, key=lambda c: c["eval_return_mean"])
    rows = [
        [
            c["label"],
            f"{c['eval_return_mean']:.2f} ± {c['eval_return_std_across_seeds']:.2f}",
            c["eval_return_sampled_mean"],
            c["final_training_return"],
            c["eval_perplexity_mean"],
            c["eval_latency_mean"],
            c["eval_participants_mean"],
            "yes" if c["beats_every_baseline"] else "no",
        ]
        for c in configs
    ]
    rows += [
        [
            f"baseline: {name}",
            f"{b['return_mean']:.2f} (episode std {b['return_std']:.2f})",
            "-",
            "-",
            b["perplexity_mean"],
            b["latency_mean"],
            b["participants_mean"],
            "-",
        ]
        for name, b in baselines.items()
    ]
    notes = [
        f"{len(runs)} runs ({len(points)} grid points x {args.seeds} seeds) trained in ONE jitted vmapped call: "
        f"compile {compile_s:.1f} s, training {train_s:.1f} s, {total_steps / train_s:,.0f} env-steps/s over all runs",
        f"each run: {args.num_envs} envs x {args.num_steps} steps x {cfg.num_updates} updates = "
        f"{cfg.num_updates * cfg.batch_size} env steps; {args.epochs} epochs x {args.minibatches} minibatches; "
        "other settings SABPPOConfig defaults",
        f"eval: deterministic policy (most likely choice per branch), {args.eval_episodes} episodes, same draws "
        f"(seed {args.eval_seed}) for every run and baseline; ± is the std of the per-seed means; 'sampled' evaluates "
        "the stochastic policy on the same episodes. Perplexity, latency and participants columns: deterministic policy",
        "a half-trained factorized policy can be much worse deterministic than sampled: when every participation "
        "branch is just below 1/2, the per-branch argmax switches everyone off (empty rounds, penalty w_empty)",
        f"best: {best['label']} ({best['eval_return_mean']:.2f})",
        f"environment: preset {args.preset!r} with the {table}",
    ]
    if env_grid:
        notes.append(
            "environment parameters vary in this grid: returns of different points are in different units; "
            "baselines use the default parameters"
        )
    write_markdown(
        args.name,
        "SABPPO hyperparameter sweep",
        [
            "config",
            "eval return (mean ± std over seeds)",
            "eval return, sampled actions",
            "last training return",
            "perplexity",
            "latency [s]",
            "participants",
            "beats every baseline",
        ],
        rows,
        notes,
    )
    plot(result, RESULTS_DIR / f"{args.name}.png")
    print(f"best {best['label']}: {best['eval_return_mean']:.2f}; wrote benchmarks/results/{args.name}.json/.md/.png")
    return result


if __name__ == "__main__":
    main()
