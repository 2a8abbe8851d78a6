"""SABPPO on the default MEC environment across seeds, and a trained policy in live mode.

1. Trains SABPPO (``SABPPOConfig`` defaults) with ``--seeds`` seeds vmapped in one compiled call
   on the default environment (the shipped calibration table) and evaluates every seed and every
   baseline on the same episodes: ``benchmarks/results/controller.{json,md}`` plus its learning
   curve and comparison plots.
2. Builds the live environment (real FedPEAT rounds of the default foundation model on the Folio
   role clients), trains a policy on the calibrated surrogate with the live environment's own
   parameters, and runs it and the baselines for ``--live-rounds`` real rounds from the same start:
   ``benchmarks/results/live.{json,md,png}``.

    python scripts/controller_study.py              # ~10 min on a 2-core CPU
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
    rows = ["| policy | mean episode return | per seed | perplexity | latency (s) | participants | violations |",
            "|---|---|---|---|---|---|---|"]
    s = summary["sabppo"]
    rows.append(f"| SABPPO ({len(s['per_seed_return_mean'])} seeds) | {s['return_mean']:.2f} ± {s['return_std_across_seeds']:.2f} | "
                + ", ".join(f"{r:.2f}" for r in s["per_seed_return_mean"])
                + f" | {s['perplexity_mean']:.1f} | {s['latency_mean']:.3f} | {s['participants_mean']:.2f} | {s['violations_mean']:.2f} |")
    for name, b in summary["baselines"].items():
        rows.append(f"| {name} | {b['return_mean']:.2f} | - | {b['perplexity_mean']:.1f} | {b['latency_mean']:.3f} | "
                    f"{b['participants_mean']:.2f} | {b['violations_mean']:.2f} |")
    return rows


def controller_part(args, out: Path, runs: Path) -> dict:
    from fedpeat_jax.mec import preset_params
    from fedpeat_jax.rl.controller import ControllerConfig, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    config = SABPPOConfig(total_timesteps=64 * 50 * 4) if args.quick else SABPPOConfig()
    controller = ControllerConfig(seeds=args.seeds, eval_episodes=64 if args.quick else 1024)
    started = time.time()
    summary = train_controller(config, preset_params("default"), runs / "controller", controller=controller)
    seconds = time.time() - started
    for name in ("learning_curve.png", "comparison.png"):
        shutil.copy(runs / "controller" / name, out / f"controller_{name}")
    result = {k: v for k, v in summary.items() if k != "run_dir"}
    result["sabppo"] = {k: v for k, v in summary["sabppo"].items() if k != "per_seed"}
    result.update(sabppo_config=dataclasses.asdict(config), seconds=round(seconds, 1),
                  machine=machine_info())
    (out / "controller.json").write_text(json.dumps(result, indent=1, default=str))
    best = summary["best_baseline"]
    lines = [
        "# SABPPO vs the baselines on the default MEC environment",
        "",
        *_table(summary),
        "",
        f"- SABPPO beats every baseline's mean return: **{summary['beats_every_baseline']}** "
        f"({summary['seeds_beating_every_baseline']} of {args.seeds} seeds do on their own); best baseline: {best}.",
        f"- {summary['env_steps_per_seed']:,} env steps per seed ({'--quick budget' if args.quick else 'SABPPOConfig defaults'}), {args.seeds} seeds vmapped in one compiled call; "
        f"evaluation: {summary['eval_episodes']} episodes per policy on the same draws, deterministic SABPPO actions.",
        "- Environment: preset 'default' with the shipped calibration table (`fedpeat calibrate` on the default model).",
        f"- Wall time {seconds:.0f} s (training + evaluation). Machine: {result['machine']['cpu_model']}, load average at the end "
        f"{result['machine']['loadavg_1_5_15']}.",
    ]
    (out / "controller.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def live_part(args, out: Path, runs: Path) -> dict:
    from fedpeat_jax.mec import live
    from fedpeat_jax.rl import baselines as B, live_eval
    from fedpeat_jax.rl.controller import ControllerConfig, load_policy, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    started = time.time()
    env = live.make_live_env(config=live.LiveConfig())
    config = SABPPOConfig(total_timesteps=64 * 50 * 4 if args.quick else 320_000)
    train_controller(config, env.default_params, runs / "controller_live", controller=ControllerConfig(eval_episodes=64))
    policy, _, _ = load_policy(runs / "controller_live", env)
    baselines = B.baseline_policies(env)
    policies = {"sabppo": policy, "greedy": baselines["greedy"], "all_largest": baselines["all_largest"]}
    result = live_eval.compare(env, policies, args.live_rounds, seed=0)
    seconds = time.time() - started
    ppl0 = float(env.default_params.ppl0)
    payload = {"live_config": dataclasses.asdict(live.LiveConfig()), "ppl0": ppl0, "sabppo_env_steps": config.total_timesteps,
               "seconds": round(seconds, 1), "machine": machine_info(), **result}
    (out / "live.json").write_text(json.dumps(payload, indent=1, default=str))
    live_eval.plot(result, out / "live.png")
    md = live_eval.to_markdown(result, ppl0)
    md += (f"\nSABPPO was trained for {config.total_timesteps:,} steps on the calibrated surrogate with the live environment's "
           f"parameters (LiveConfig defaults: {env.n_devices} devices = Folio role clients, the default foundation model), then "
           f"run here in real rounds. Wall time {seconds:.0f} s. Machine: {payload['machine']['cpu_model']}, "
           f"load average at the end {payload['machine']['loadavg_1_5_15']}. Plot: `live.png`.\n")
    (out / "live.md").write_text(md)
    print(md)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--live-rounds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny training budgets (smoke run; do not commit its results)")
    parser.add_argument("--skip", choices=("controller", "live"), default=None, help="skip one part")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--runs", default="runs/controller_study", help="training run directories (resumable)")
    args = parser.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    if args.skip != "controller":
        controller_part(args, out, runs)
    if args.skip != "live":
        live_part(args, out, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
