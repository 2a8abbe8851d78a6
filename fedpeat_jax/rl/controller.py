"""Train the SABPPO controller end to end: chunked jitted training with orbax checkpoints and
TensorBoard logs, evaluation against the baselines, and learning-curve / comparison plots.

``train_controller`` is what ``fedpeat train-controller`` runs:

    summary = train_controller(SABPPOConfig(total_timesteps=2_000_000), env_params, "runs/ctl",
                               controller=ControllerConfig(seeds=5))

``ControllerConfig(warm_start="best_rule")`` starts every seed from a behaviour clone of the searched
best rule (:mod:`fedpeat_jax.rl.imitation`) instead of a random network, so PPO improves on the rule.

Layout of ``out_dir``:

    controller.json     the SABPPO and controller configs (``load_policy`` rebuilds the agent from it)
    checkpoints/<N>/    TrainState of all seeds after N updates (atomic; the newest two are kept)
    logs/               TensorBoard events and metrics.jsonl (one record per update, step = env steps)
    warm_start.json     with warm_start="best_rule": the cloned rule and how well each seed's start matches it
    summary.json        evaluation of SABPPO (every seed) and of every baseline on the same episodes
    learning_curve.png  episode return vs environment steps (each seed, their mean, baseline levels)
    comparison.png      mean return of SABPPO and the baselines
    behaviour.png       what SABPPO learned next to the best searched rule: who takes part, which
                        emulator and bandwidth, against channel, compute, data and memory, round by round

Seeds are trained together: ``jax.vmap`` over the seeds' training states in one compiled call.
A run interrupted at any point resumes from its newest checkpoint and continues the same run
(the chunked run equals an unchunked one). Run ``python -m fedpeat_jax.rl.controller --help``
for a small command line until the ``fedpeat`` CLI wires this in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from fedpeat_jax.config import Config
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.io.files import write_json_atomic
from fedpeat_jax.io.fingerprint import fingerprint as settings_fingerprint
from fedpeat_jax.io.fingerprint import tree_digest
from fedpeat_jax.io.logging import RunLogger, read_metrics
from fedpeat_jax.io.loop import restore_latest, run_chunks
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl import sabppo
from fedpeat_jax.rl.plots import plot_comparison, plot_learning_curve
from fedpeat_jax.rl.rules import Rule, rule_policy, search_rules
from fedpeat_jax.rl.sabppo import SABPPOConfig, Trainer, make_trainer, stack_hparams

CONFIG_FILE = "controller.json"
WARM_START_FILE = "warm_start.json"
WARM_STARTS = ("none", "best_rule")


@dataclass(frozen=True)
class ControllerConfig(Config):
    """How ``train_controller`` runs SABPPO (the agent itself is configured by SABPPOConfig)."""

    seeds: int = 1  # independent runs, vmapped in one compiled call
    seed: int = 0  # run i uses key i of split(key(seed), seeds)
    chunk_updates: int = 10  # PPO updates per jitted chunk (= checkpoint and log interval)
    eval_episodes: int = 1024  # episodes per policy in the final evaluation (same draws for all)
    eval_seed: int = 12345
    """Seed of the evaluation episodes (the same draws for SABPPO and every baseline)."""
    greedy_devices: int = 0  # devices the greedy baseline picks; 0: ceil(N / 2)
    rule_search_episodes: int = 64  # episodes per rule when searching the best simple fixed rule (0: no search)
    rule_finalists: int = 8  # best rules re-run on eval_episodes fresh episodes before the best is chosen
    behaviour_episodes: int = 64  # episodes behind behaviour.png (0: no plot)
    warm_start: str = "none"
    """'none': PPO from a random network; 'best_rule': behaviour-clone the searched best rule first (rl.imitation)."""
    clone_episodes: int = 512  # the teacher's episodes cloned (warm_start only; fewer clone less faithfully: warm_start.json says how well)
    clone_epochs: int = 20  # passes of the cloning fit over them
    deterministic_eval: bool = True  # evaluate SABPPO by its most likely action per branch
    keep_checkpoints: int = 2
    """Checkpoints kept in `out/checkpoints`."""

    def validate(self) -> None:
        for name in ("seeds", "chunk_updates", "eval_episodes", "keep_checkpoints"):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"ControllerConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("greedy_devices", "rule_search_episodes", "behaviour_episodes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"ControllerConfig.{name} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.rule_finalists, (int, np.integer)) and self.rule_finalists >= 1):
            raise ValueError(f"ControllerConfig.rule_finalists must be an integer >= 1, got {self.rule_finalists!r}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"ControllerConfig.warm_start must be one of {WARM_STARTS}, got {self.warm_start!r}")
        if self.warm_start == "best_rule" and not self.rule_search_episodes:
            raise ValueError(
                "ControllerConfig.warm_start 'best_rule' needs ControllerConfig.rule_search_episodes >= 1 (the rule to clone)"
            )
        for name in ("clone_episodes", "clone_epochs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"ControllerConfig.{name} must be an integer >= 1, got {v!r}")


# =============================================================================================
# Helpers
# =============================================================================================
def _env_for(env_params, env=None):
    if env is not None:
        return env
    from fedpeat_jax.mec import FedPEATMEC

    return FedPEATMEC(env_params)


def _fingerprint(config: SABPPOConfig, controller: ControllerConfig, env_params) -> str:
    settings = {
        "sabppo": config,
        "seeds": controller.seeds,
        "seed": controller.seed,
        "env_params": tree_digest(env_params),
    }
    if controller.warm_start != "none":  # what the start was cloned from (absent: runs from before warm starts resume)
        settings["warm_start"] = {
            k: getattr(controller, k)
            for k in ("warm_start", "clone_episodes", "clone_epochs", "rule_search_episodes", "rule_finalists")
        } | {"rule_seed": controller.eval_seed + 1, "rule_final_episodes": controller.eval_episodes}
    return settings_fingerprint(settings)


def init_runs(trainer: Trainer, keys, hparams):
    """The initial states of stacked runs (keys (R,), hparams stacked on R), one vmapped program."""
    return jax.jit(jax.vmap(trainer.init))(keys, hparams)


def _init_states(trainer: Trainer, controller: ControllerConfig):
    keys = jax.random.split(jax.random.key(controller.seed), controller.seeds)
    return init_runs(trainer, keys, stack_hparams([trainer.default_hparams()] * controller.seeds))


def _warm_start(trainer: Trainer, states, env, env_params, controller: ControllerConfig, rule: dict):
    """The fresh ``states`` of every seed with their networks cloned from ``rule``'s policy (rl.imitation)."""
    from fedpeat_jax.rl import imitation

    gamma = float(np.asarray(trainer.default_hparams().gamma))
    data = imitation.teacher_data(
        rule["policy"],
        env,
        env_params,
        controller.clone_episodes,
        trainer.config.num_steps,
        gamma,
        jax.random.key(controller.seed + 1),
    )
    cloned = jax.jit(jax.vmap(partial(imitation.clone, trainer, epochs=controller.clone_epochs), in_axes=(0, None)))(
        states, data
    )
    agreement = jax.vmap(partial(imitation.action_agreement, trainer), in_axes=(0, None))(cloned, data)
    report = {
        "teacher": rule["description"],
        "rounds": int(data.obs.shape[0]),
        "action_agreement": np.asarray(agreement).tolist(),  # per seed, of the teacher's rounds
    }
    return cloned, report


def select_run(tree, i: int):
    """Run ``i`` of a vmapped pytree (states, metrics)."""
    return jax.tree.map(lambda x: x[i], tree)


def vmapped_updates(trainer: Trainer):
    """``advance(states, n) -> (states, metrics (runs, n))``: n PPO updates of every run of a
    vmapped state, one compiled program per chunk length (the states are donated)."""
    compiled = {}

    def advance(states, n: int):
        if n not in compiled:
            compiled[n] = sabppo.jit(jax.vmap(partial(trainer.run_updates, num_updates=n)), donate_argnums=0)
        return compiled[n](states)

    return advance


def _is_scalar_metric(v) -> bool:
    return np.ndim(v) == 0


# =============================================================================================
# Training
# =============================================================================================
def train_controller(
    config: SABPPOConfig,
    env_params,
    out_dir,
    resume: bool = True,
    controller: Optional[ControllerConfig] = None,
    env=None,
    show_progress: bool = True,
    stop_after_chunks: Optional[int] = None,
) -> dict:
    """Train SABPPO on the MEC environment with ``env_params``; returns the summary dict.

    resume:  continue from the newest checkpoint in ``out_dir/checkpoints`` (it must belong to the
             same settings); with ``resume=False`` an ``out_dir`` that already holds checkpoints
             is an error (pick a new directory).
    env:     the environment object (default ``FedPEATMEC(env_params)``).
    stop_after_chunks: stop early after that many chunks (simulates an interruption).
    """
    controller = ControllerConfig() if controller is None else controller
    if not isinstance(config, SABPPOConfig):
        raise TypeError(f"config must be an SABPPOConfig, got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(config, controller, env_params)

    env = _env_for(env_params, env)
    trainer = make_trainer(config, env, env_params)
    manager = CheckpointManager(out / "checkpoints", max_to_keep=controller.keep_checkpoints)
    try:  # resume or refuse before compiling anything: the restore target only needs shapes
        target = jax.eval_shape(lambda: _init_states(trainer, controller))
        state, resumed_at = restore_latest(
            manager, target, fingerprint, fresh=not resume, hint="pass resume=True to continue or pick a new out_dir"
        )
    except ValueError:
        manager.close()
        raise
    resumed = resumed_at is not None
    rule = search_best_rule(env, env_params, controller) if controller.warm_start == "best_rule" else None
    if not resumed:
        state = _init_states(trainer, controller)
        if rule is not None:
            state, report = _warm_start(trainer, state, env, env_params, controller, rule)
            write_json_atomic(out / WARM_START_FILE, report)
    (out / CONFIG_FILE).write_text(
        json.dumps(
            {
                "sabppo": dataclasses.asdict(config),
                "controller": dataclasses.asdict(controller),
                "fingerprint": fingerprint,
            },
            indent=2,
        )
    )

    total = config.num_updates
    done = int(np.asarray(state.update)[0])
    run_chunk = vmapped_updates(trainer)

    def advance(s, start, n):
        s, metrics = run_chunk(s, n)
        metrics = jax.device_get(metrics)  # leaves (seeds, n)
        rows = []
        for i in range(n):
            row = {"step": int(metrics["env_steps"][0, i])}
            for k, v in metrics.items():
                if k in ("update", "env_steps"):
                    continue
                vals = np.asarray(v[:, i], np.float64)
                row[k] = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else float("nan")
                if k == "episode_return" and controller.seeds > 1:
                    row.update({f"seed{j}/episode_return": float(vals[j]) for j in range(controller.seeds)})
            rows.append(row)
        return s, rows

    logger = RunLogger(out / "logs", resume_step=done * config.batch_size if resumed else None)
    try:
        state, rows = run_chunks(
            state,
            advance,
            start=done,
            total=total,
            chunk=controller.chunk_updates,
            desc="SABPPO updates",
            logger=logger,
            log_tag=lambda name: "train/" + name,
            checkpoints=manager,
            checkpoint_meta=lambda end: {
                "fingerprint": fingerprint,
                "update": end,
                "env_steps": end * config.batch_size,
            },
            postfix=lambda row: {"ret": f"{row['episode_return']:.2f}"} if np.isfinite(row["episode_return"]) else {},
            show_progress=show_progress,
            stop_after_chunks=stop_after_chunks,
        )
    finally:
        logger.close()
        manager.close()
    done = int(np.asarray(state.update)[0])

    if done < total:  # interrupted on purpose: no evaluation yet
        return {"run_dir": str(out), "updates": done, "total_updates": total, "finished": False}

    summary = evaluate_controller(trainer, state, env, env_params, controller, rule=rule)
    if rule is not None and (out / WARM_START_FILE).is_file():
        summary["warm_start"] = json.loads((out / WARM_START_FILE).read_text())
    summary.update(
        {
            "run_dir": str(out),
            "updates": done,
            "total_updates": total,
            "finished": True,
            "env_steps_per_seed": done * config.batch_size,
            "resumed": resumed,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    history = read_metrics(out / "logs")
    plot_learning_curve(history, summary, out / "learning_curve.png", seeds=controller.seeds)
    plot_comparison(summary, out / "comparison.png")
    if controller.behaviour_episodes:
        from fedpeat_jax.rl import behaviour

        best = max(range(controller.seeds), key=lambda i: summary["sabppo"]["per_seed_return_mean"][i])
        shown = {f"SABPPO (seed {best})": B.sabppo_policy(trainer, select_run(state, best))}
        if summary.get("best_rule"):
            shown["best rule"] = rule_policy(env, Rule.of_fields(summary["best_rule"]["rule"]), "best_rule")
        records = {
            name: behaviour.collect(p, env, env_params, controller.behaviour_episodes, controller.eval_seed)
            for name, p in shown.items()
        }
        summary["behaviour"] = {name: behaviour.summarize(r, env_params) for name, r in records.items()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        behaviour.plot(records, env_params, out / "behaviour.png")
    return summary


# =============================================================================================
# Evaluation against the baselines
# =============================================================================================
def evaluate_controller(
    trainer: Trainer, states, env, env_params, controller: ControllerConfig, rule: Optional[dict] = None
) -> dict:
    """Evaluate every seed's SABPPO policy and every baseline on the same episodes (same draws);
    ``rule``: the result of :func:`search_best_rule` when it was already run (else it runs here)."""
    n_seeds = int(np.shape(np.asarray(states.update))[0])
    kw = dict(env=env, env_params=env_params, episodes=controller.eval_episodes, rng=controller.eval_seed)
    per_seed = []
    for i in range(n_seeds):
        policy = B.sabppo_policy(trainer, select_run(states, i), deterministic=controller.deterministic_eval)
        per_seed.append(B.evaluate(policy, **kw))
    returns = np.array([r["return_mean"] for r in per_seed])
    sabppo = {
        "return_mean": float(returns.mean()),  # mean over seeds of each seed's mean episode return
        "return_std_across_seeds": float(returns.std()),
        "per_seed_return_mean": returns.tolist(),
        "per_seed": per_seed,
    }
    for name in (
        "perplexity_mean",
        "final_perplexity_mean",
        "latency_mean",
        "memory_mean",
        "violations_mean",
        "stragglers_mean",
        "participants_mean",
        "data_fraction_mean",
    ):
        sabppo[name] = float(np.mean([r[name] for r in per_seed]))
    base, rule = evaluate_baselines(env, env_params, controller, rule)
    best_name = max(base, key=lambda k: base[k]["return_mean"])
    return {
        "sabppo": sabppo,
        "baselines": base,
        "best_rule": None
        if rule is None
        else {
            "description": rule["description"],
            "rules_searched": rule["rules_searched"],
            "rule": rule["rule"].fields(),
        },
        "best_baseline": best_name,
        "beats_every_baseline": bool(all(sabppo["return_mean"] > b["return_mean"] for b in base.values())),
        "seeds_beating_every_baseline": int(sum(all(r > b["return_mean"] for b in base.values()) for r in returns)),
        "eval_episodes": controller.eval_episodes,
        "deterministic_eval": controller.deterministic_eval,
    }


def search_best_rule(env, env_params, controller: ControllerConfig) -> Optional[dict]:
    """``rules.search_rules`` with the controller's settings, on its own draws (not the evaluation's);
    None when ``rule_search_episodes`` is 0."""
    if not controller.rule_search_episodes:
        return None
    return search_rules(
        env,
        env_params,
        episodes=controller.rule_search_episodes,
        finalists=controller.rule_finalists,
        final_episodes=controller.eval_episodes,
        rng=controller.eval_seed + 1,
    )


def evaluate_baselines(env, env_params, controller: ControllerConfig, rule: Optional[dict] = None) -> tuple:
    """({name: evaluation} of every baseline on the evaluation's episodes, the searched best rule
    or None): random, server-only, all-devices, greedy, and the best simple fixed rule (``rule``, the
    result of :func:`search_best_rule`, searched here when not given)."""
    policies = B.baseline_policies(env, controller.greedy_devices or None)
    rule = search_best_rule(env, env_params, controller) if rule is None else rule
    if rule is not None:
        policies["best_rule"] = rule["policy"]
    kw = dict(env=env, env_params=env_params, episodes=controller.eval_episodes, rng=controller.eval_seed)
    return {name: B.evaluate(p, **kw) for name, p in policies.items()}, rule


# =============================================================================================
# Loading a trained controller
# =============================================================================================
def load_policy(out_dir, env, env_params=None, seed_index: int = 0, deterministic: bool = True):
    """The trained policy of seed ``seed_index`` from a ``train_controller`` run directory.

    ``env`` may be any environment with the same observation and action layout as the one trained
    on (e.g. a live-mode FedPEAT environment); returns (policy, trainer, state of that seed).
    """
    out = Path(out_dir)
    cfg_path = out / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a train_controller run directory")
    saved = json.loads(cfg_path.read_text())
    config = SABPPOConfig(**saved["sabppo"])
    controller = ControllerConfig(**saved["controller"])
    if not 0 <= seed_index < controller.seeds:
        raise ValueError(f"seed_index must be in 0..{controller.seeds - 1}, got {seed_index}")
    env_params = env.default_params if env_params is None else env_params
    # The checkpoint holds training states of the calibrated environment; a live environment
    # shares its observation and action layout but carries a federated state, so restore with that,
    # and with the MEC numbers alone (a live env's LiveParams also carry its weights and data).
    env_params = env_params.surrogate() if hasattr(env_params, "surrogate") else env_params
    from fedpeat_jax.mec import FedPEATMEC

    trainer = make_trainer(config, FedPEATMEC(env_params) if isinstance(env, FedPEATMEC) else env, env_params)
    target = jax.eval_shape(lambda: _init_states(trainer, controller))
    with CheckpointManager(out / "checkpoints", create=False) as manager:
        states = manager.restore(target=target)
    state = select_run(states, seed_index)
    return B.sabppo_policy(trainer, state, deterministic=deterministic), trainer, state


# =============================================================================================
# `python -m fedpeat_jax.rl.controller`: the same job as `fedpeat train-controller`, without the package CLI
# =============================================================================================
def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fedpeat_jax.rl.controller",
        description="Train SABPPO on the FedPEAT MEC env and compare with the baselines.",
    )
    parser.add_argument("--preset", default="default", help="MEC environment preset")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="use the SYNTHETIC placeholder perplexity table (needed until `fedpeat calibrate` "
        "has produced the default one)",
    )
    parser.add_argument("--out", default="runs/controller")
    parser.add_argument("--fresh", action="store_true", help="fail instead of resuming when --out has checkpoints")
    parser.add_argument("--seeds", type=int, default=ControllerConfig.seeds)
    parser.add_argument("--seed", type=int, default=ControllerConfig.seed)
    parser.add_argument("--total-timesteps", type=int, default=SABPPOConfig.total_timesteps)
    parser.add_argument("--num-envs", type=int, default=SABPPOConfig.num_envs)
    parser.add_argument("--lr", type=float, default=SABPPOConfig.lr)
    parser.add_argument("--eval-episodes", type=int, default=ControllerConfig.eval_episodes)
    parser.add_argument("--chunk-updates", type=int, default=ControllerConfig.chunk_updates)
    args = parser.parse_args(argv)

    from fedpeat_jax.config import GPT2Config
    from fedpeat_jax.mec import PRESETS, preset_params, synthetic_table

    table = synthetic_table(GPT2Config.preset(PRESETS[args.preset]["model"])) if args.synthetic else None
    env_params = preset_params(args.preset, calibration=table)
    config = SABPPOConfig(total_timesteps=args.total_timesteps, num_envs=args.num_envs, lr=args.lr)
    controller = ControllerConfig(
        seeds=args.seeds, seed=args.seed, eval_episodes=args.eval_episodes, chunk_updates=args.chunk_updates
    )
    summary = train_controller(config, env_params, args.out, resume=not args.fresh, controller=controller)
    s = summary["sabppo"]
    print(
        f"SABPPO ({args.seeds} seeds): {s['return_mean']:.2f} +- {s['return_std_across_seeds']:.2f} "
        f"(per seed {', '.join(f'{r:.2f}' for r in s['per_seed_return_mean'])})"
    )
    for name, b in summary["baselines"].items():
        print(f"{name:>12s}: {b['return_mean']:.2f} +- {b['return_std']:.2f} (std over episodes)")
    print(f"beats every baseline: {summary['beats_every_baseline']}   results in {summary['run_dir']}")
    if args.synthetic:
        print("NOTE: the perplexity response is the SYNTHETIC placeholder table, not a calibrated one.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
