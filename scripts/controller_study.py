"""SABPPO on the default MEC environment across seeds, and a trained policy in live mode.

1. Trains SABPPO (``SABPPOConfig`` defaults) with ``--seeds`` seeds vmapped in one compiled call
   on the default environment (the shipped calibration table, which names the shipped foundation
   model) and evaluates every seed and every baseline on the same episodes: random, server only,
   all devices, greedy by channel, and the best of a search over simple fixed rules
   (``rl.rules``). Writes ``benchmarks/results/controller.{json,md}`` with the learning curve,
   the comparison and what SABPPO learned (``controller_behaviour.png``).
2. Builds the live environment (real FedPEAT rounds of the shipped foundation model on the Folio
   role clients, the server on public modern-spelling text) with ``--live-rounds`` rounds per
   episode, trains SABPPO on the calibrated surrogate with the live environment's own parameters,
   searches the best rule there too, and runs SABPPO and the baselines for ``--live-seeds`` live
   episodes each (every policy from the same start in an episode):
   ``benchmarks/results/live.{json,md,png}``.

    python scripts/controller_study.py              # about 20 minutes on a 2-core CPU
    python scripts/controller_study.py --quick      # a smoke run (few steps, 2 live rounds), not for the results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402


def _table(summary: dict) -> list:
    rows = [
        "| policy | mean episode return | per seed | perplexity | latency (s) | devices + server per round | stragglers | violations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    s = summary["sabppo"]
    rows.append(
        f"| **SABPPO** ({len(s['per_seed_return_mean'])} seeds) | **{s['return_mean']:.2f}** ± {s['return_std_across_seeds']:.2f} | "
        + ", ".join(f"{r:.2f}" for r in s["per_seed_return_mean"])
        + f" | {s['perplexity_mean']:.1f} | {s['latency_mean']:.3f} | {s['participants_mean']:.2f} | "
        f"{s['stragglers_mean']:.2f} | {s['violations_mean']:.2f} |"
    )
    for name, b in summary["baselines"].items():
        rows.append(
            f"| {name} | {b['return_mean']:.2f} | - | {b['perplexity_mean']:.1f} | {b['latency_mean']:.3f} | "
            f"{b['participants_mean']:.2f} | {b['stragglers_mean']:.2f} | {b['violations_mean']:.2f} |"
        )
    return rows


def _model_line() -> str:
    from fedpeat_jax.mec.calibration import default_table

    meta = default_table().meta
    return (
        f"the shipped calibration table, measured on the shipped foundation model (fingerprint "
        f"{meta.get('model_fingerprint')}, weights sha256 {str(meta.get('model_params_sha256'))[:12]}...)"
    )


def controller_part(args, out: Path, runs: Path) -> dict:
    from fedpeat_jax.mec import preset_params
    from fedpeat_jax.rl.controller import ControllerConfig, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    config = SABPPOConfig(total_timesteps=64 * 50 * 4) if args.quick else SABPPOConfig()
    controller = ControllerConfig(
        seeds=args.seeds, eval_episodes=64 if args.quick else 1024, rule_search_episodes=8 if args.quick else 64
    )
    started = time.time()
    summary = train_controller(config, preset_params("default"), runs / "controller", controller=controller)
    seconds = time.time() - started
    for name in ("learning_curve.png", "comparison.png", "behaviour.png"):
        shutil.copy(runs / "controller" / name, out / f"controller_{name}")
    result = {k: v for k, v in summary.items() if k != "run_dir"}
    result["sabppo"] = {k: v for k, v in summary["sabppo"].items() if k != "per_seed"}
    result.update(
        sabppo_config=dataclasses.asdict(config),
        seconds=round(seconds, 1),
        machine=machine_info(),
        environment=_model_line(),
    )
    (out / "controller.json").write_text(json.dumps(result, indent=1, default=str))
    best = summary["best_baseline"]
    beaten = summary["seeds_beating_every_baseline"]
    lines = [
        "# SABPPO vs the baselines on the default MEC environment",
        "",
        *_table(summary),
        "",
        f"- SABPPO beats every baseline's mean return: **{summary['beats_every_baseline']}**, on **{beaten} of {args.seeds}** "
        f"seeds on their own; best baseline: {best}.",
        f"- best_rule: the best of {summary['best_rule']['rules_searched']} simple fixed rules (`rl.rules.search_rules`, "
        f"searched on its own draws): {summary['best_rule']['description']}.",
        f"- {summary['env_steps_per_seed']:,} env steps per seed ({'--quick budget' if args.quick else 'SABPPOConfig defaults'}), "
        f"{args.seeds} seeds vmapped in one compiled call; evaluation: {summary['eval_episodes']} episodes per policy on the "
        "same draws, deterministic SABPPO actions.",
        f"- Environment: preset 'default' with {result['environment']}.",
        "- What SABPPO learned next to the best rule: `controller_behaviour.png` (participation by channel, compute, data "
        "and memory; emulator size by memory; bandwidth by channel; devices, server, perplexity and latency per round).",
        f"- Wall time {seconds:.0f} s ({'rule search + evaluation; the training was resumed finished from the run directory' if summary['resumed'] else 'training + rule search + evaluation'}). "
        f"Machine: {result['machine']['cpu_model']}, load average at the end {result['machine']['loadavg_1_5_15']}.",
    ]
    (out / "controller.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def live_part(args, out: Path, runs: Path) -> dict:
    from fedpeat_jax.mec import live
    from fedpeat_jax.rl import live_eval
    from fedpeat_jax.rl.controller import ControllerConfig, load_policy, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    started = time.time()
    rounds = args.live_rounds
    env = live.make_live_env(config=live.LiveConfig(), max_steps_in_episode=rounds)
    config = SABPPOConfig(total_timesteps=64 * 50 * 4 if args.quick else 2_000_000, num_steps=rounds)
    # Trained on the surrogate with the live parameters; of the training seeds, the one with the best
    # return on the surrogate's evaluation episodes goes live (selected on the surrogate, never on live rounds).
    trained = train_controller(
        config,
        env.default_params.surrogate(),
        runs / "controller_live",
        controller=ControllerConfig(
            seeds=args.live_train_seeds,
            eval_episodes=64 if args.quick else 256,
            rule_search_episodes=8 if args.quick else 64,
            behaviour_episodes=0,
        ),
    )
    surrogate_returns = [float(r) for r in trained["sabppo"]["per_seed_return_mean"]]
    chosen = max(range(len(surrogate_returns)), key=surrogate_returns.__getitem__)
    policy, _, _ = load_policy(runs / "controller_live", env, seed_index=chosen)
    policies = {
        "sabppo": policy,
        **live_eval.baselines(env, ("best_rule", "greedy", "all_devices"), search_episodes=16 if args.quick else 64),
    }
    results = [live_eval.compare(env, policies, rounds, seed=seed) for seed in range(args.live_seeds)]
    seconds = time.time() - started
    ppl0 = float(env.default_params.ppl0)
    per_episode = {name: [r["policies"][name]["summary"]["return"] for r in results] for name in policies}
    returns = {name: float(sum(v) / len(v)) for name, v in per_episode.items()}
    best_baseline = max((n for n in returns if n != "sabppo"), key=returns.get)
    wins = [
        all(ret["sabppo"] > r for n, r in ret.items() if n != "sabppo")
        for ret in ({name: v[i] for name, v in per_episode.items()} for i in range(len(results)))
    ]
    payload = {
        "live_config": dataclasses.asdict(live.LiveConfig()),
        "ppl0": ppl0,
        "ppl_drift": float(env.default_params.ppl_drift),
        "rounds": rounds,
        "seeds": list(range(args.live_seeds)),
        "sabppo_env_steps": config.total_timesteps,
        "surrogate_eval": {
            "sabppo_per_training_seed": surrogate_returns,
            "chosen_training_seed": chosen,
            "best_rule": float(trained["baselines"]["best_rule"]["return_mean"]),
            "episodes": trained["eval_episodes"],
        },
        "mean_return": returns,
        "best_baseline": best_baseline,
        "sabppo_beats_every_baseline": all(returns["sabppo"] > r for n, r in returns.items() if n != "sabppo"),
        "episodes_sabppo_beats_every_baseline": int(sum(wins)),
        "seconds": round(seconds, 1),
        "machine": machine_info(),
        "environment": _model_line(),
        "episodes": results,
    }
    (out / "live.json").write_text(json.dumps(payload, indent=1, default=str))
    for seed, result in enumerate(results):
        live_eval.plot(result, out / ("live.png" if seed == 0 else f"live_seed{seed}.png"))
    md = f"# Live FedPEAT rounds: SABPPO and the baselines over {len(results)} episodes\n\n" + "\n".join(
        live_eval.to_markdown(result, ppl0).replace("# Live", "## Live", 1) for result in results
    )
    md += (
        f"\n## Mean over the {len(results)} episodes\n\n| policy | mean return | per episode |\n|---|---|---|\n"
        + "".join(f"| {n} | {returns[n]:.2f} | {', '.join(f'{r:.2f}' for r in v)} |\n" for n, v in per_episode.items())
    )
    md += (
        f"\n{len(results)} live episodes (seeds {payload['seeds']}) of {rounds} real FedPEAT rounds per policy, each "
        f"policy from the same start in an episode (the same devices and channel draws). SABPPO beats every baseline in "
        f"mean measured return: **{payload['sabppo_beats_every_baseline']}** (best baseline: {best_baseline}); in "
        f"{payload['episodes_sabppo_beats_every_baseline']} of {len(results)} episodes on their own. SABPPO was trained for "
        f"{config.total_timesteps:,} steps per training seed on the calibrated surrogate with the live environment's parameters ({rounds}-round "
        f"episodes, LiveConfig defaults: {env.n_devices} devices = Folio role clients, the server on public modern-spelling "
        f"text, the shipped foundation model, the participation drift ppl_drift = {payload['ppl_drift']:.3f} of the "
        f"shipped table on); best_rule was searched on that surrogate too. On the surrogate's {trained['eval_episodes']} "
        f"evaluation episodes the {len(surrogate_returns)} training seeds scored "
        f"{', '.join(f'{r:.2f}' for r in surrogate_returns)} and the best rule "
        f"{payload['surrogate_eval']['best_rule']:.2f}; seed {chosen}, the better there, went live. "
        f"Wall time {seconds:.0f} s. Machine: "
        f"{payload['machine']['cpu_model']}, load average at the end {payload['machine']['loadavg_1_5_15']}. Plots: "
        f"`live.png` (seed 0)" + "".join(f", `live_seed{i}.png`" for i in range(1, len(results))) + ".\n"
    )
    (out / "live.md").write_text(md)
    print(md)
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--live-rounds", type=int, default=20, help="rounds of the live episodes (the live env's episode length)"
    )
    parser.add_argument(
        "--live-seeds", type=int, default=2, help="live episodes (seeds 0..N-1) per policy; the mean return decides"
    )
    parser.add_argument(
        "--live-train-seeds",
        type=int,
        default=2,
        help="SABPPO training seeds on the live surrogate; the best on its evaluation episodes goes live",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny training budgets (smoke run; do not commit its results)"
    )
    parser.add_argument("--skip", choices=("controller", "live"), default=None, help="skip one part")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--runs", default="runs/controller_study", help="training run directories (resumable)")
    args = parser.parse_args(argv)
    if args.quick:
        args.live_rounds, args.live_seeds = min(args.live_rounds, 2), 1
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    if args.skip != "controller":
        controller_part(args, out, runs)
    if args.skip != "live":
        live_part(args, out, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
