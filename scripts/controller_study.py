"""SABPPO on the default MEC environment across seeds, and a trained policy in live mode.

1. Trains SABPPO (``SABPPOConfig`` defaults) with ``--seeds`` seeds vmapped in one compiled call
   on the default environment (the shipped calibration table, which names the shipped foundation
   model) and evaluates every seed and every baseline on the same episodes: random, server only,
   all devices, greedy by channel, and the best of a search over simple fixed rules
   (``rl.rules``). Writes ``benchmarks/results/controller.{json,md}`` with the learning curve,
   the comparison and what SABPPO learned (``controller_behaviour.png``).
2. Builds the live environment (real FedPEAT rounds of the shipped foundation model on the Folio
   role clients, the server on public modern-spelling text) with ``--live-rounds`` rounds per
   episode; runs a spread of simple rules (``COLLECTION_RULES``) and the best rule on the calibrated
   surrogate for one live episode each on their own seeds (100, 101, ...) and refits the
   surrogate's perplexity response to those rounds (``mec.live_fit``); trains SABPPO on the
   refitted surrogate with the live environment's own parameters, from a behaviour clone of the
   best rule there (``--live-warm-start``, ``rl.imitation``); ``--live-iterations`` times runs
   the trained controller and the best rule on that surrogate live on fresh seeds, adds both
   episodes to the refit and trains again; then runs SABPPO and the baselines (the best rule on the
   last refit and on the calibrated surrogate, greedy, all devices) for ``--live-seeds`` live
   episodes each (seeds 0, 1, ...; every policy from the same start in an episode):
   ``benchmarks/results/live.{json,md,png}``. Every live episode is cached in
   ``runs/controller_study/live_collect.json``; a rerun pays only for new ones.

    python scripts/controller_study.py              # hours on a 2-core CPU from an empty cache (37 live episodes)
    python scripts/controller_study.py --quick      # a smoke run (few steps, 2 live rounds), not for the results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402
from scripts import live_report  # noqa: E402
from scripts.update_readme import README_EXCERPT_END  # noqa: E402


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


# (server, score, devices, level, bandwidth) of `rl.rules.Rule.of`; level 5: the largest that fits.
# A spread of participation (1..10 devices), emulator levels and server use for the refit's data;
# the channel-ranked few change from round to round (fresh small sets). The live part appends the best
# rule on the calibrated surrogate.
COLLECTION_RULES = (
    (0, "fastest", 6, 5, "equal"),
    (0, "channel", 3, 0, "equal"),
    (1, "compute", 8, 2, "equal"),
    (1, "data", 10, 4, "equal"),
    (0, "channel", 5, 1, "exchange_first"),
    (1, "fastest", 4, 3, "equal"),
    (0, "channel", 1, 1, "equal"),
    (0, "channel", 2, 1, "equal"),
)
COLLECTION_SEED0 = 100  # the collection's episodes run on seeds 100, 101, ...; the evaluation on 0, 1, ...


def live_episode(env, rounds: int, policy, seed: int, identity: dict, path: Path, desc: str) -> dict:
    """One live episode of ``policy`` on ``seed``, kept in ``path`` under ``identity`` (what the policy
    is: a rule's fields, a controller's weights digest) and reused by a later run with the same
    identity, seed, rounds and live settings (live rounds are the slow part)."""
    from fedpeat_jax.io.files import write_json_atomic
    from fedpeat_jax.mec import live
    from fedpeat_jax.rl import live_eval

    kept = json.loads(path.read_text()).get("episodes", {}) if path.is_file() else {}
    live_config = dataclasses.asdict(live.LiveConfig())
    key = json.dumps({**identity, "seed": seed, "rounds": rounds, "live": live_config}, sort_keys=True)
    if key not in kept:
        records = live_eval.run_policy(env, policy, rounds, seed=seed, desc=desc)
        kept[key] = {"policy": policy.name, "seed": seed, "records": records}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"episodes": kept})
    return kept[key]


def compare_live(env, rounds: int, policies: dict, seed: int, path: Path) -> dict:
    """``live_eval.compare``, each policy's episode kept in ``path`` under its name and weights."""
    from fedpeat_jax.io.fingerprint import tree_digest
    from fedpeat_jax.rl import live_eval

    out = {"rounds": rounds, "seed": seed, "policies": {}}
    for name, policy in policies.items():
        identity = {"evaluated": name, "weights": tree_digest(policy.params)}
        episode = live_episode(env, rounds, policy, seed, identity, path, f"live: {name}, seed {seed}")
        out["policies"][name] = {"records": episode["records"], "summary": live_eval.summarize(episode["records"])}
    return out


def rule_episode(env, rounds: int, rule, seed: int, path: Path, desc: str) -> dict:
    """One live episode of the fixed ``rule`` (an ``rl.rules.Rule``), kept under its fields."""
    from fedpeat_jax.rl.rules import rule_policy

    policy = rule_policy(env, rule, rule.describe(int(env.n_levels)))
    return live_episode(env, rounds, policy, seed, {"rule": rule.fields()}, path, desc)


def collect_live(env, rounds: int, rules, path: Path) -> list:
    """One live episode per rule (``rl.rules.Rule``) on its own seed: the refit's first data."""
    return [
        rule_episode(env, rounds, rule, COLLECTION_SEED0 + i, path, f"collect {i + 1}/{len(rules)}")
        for i, rule in enumerate(rules)
    ]


def _episode_step(episode: dict, refitted, ppl0: float) -> dict:
    """An iteration's live episode: its seed, return, devices per round and how wrong the refit (not yet
    fitted on it) was about its rounds."""
    import numpy as np

    from fedpeat_jax.mec import live_fit

    records = episode["records"]
    return {
        "seed": episode["seed"],
        "policy": episode["policy"],
        "return": float(sum(r["reward"] for r in records)),
        "devices_per_round": float(np.mean([r["devices"] for r in records])),
        "refit_error": live_fit.error_summary(refitted, live_fit.transitions(records, ppl0)),
    }


def _surrogate_check(env, surrogates: dict, results: list) -> dict:
    """Prediction errors (whole episodes and one round at a time) of each surrogate on the
    evaluation episodes' real rounds (data the refit never saw), per policy."""
    from fedpeat_jax.mec import live_fit

    ppl0 = float(env.default_params.ppl0)
    names = results[0]["policies"]
    per_policy = {
        name: live_fit.concat([live_fit.transitions(r["policies"][name]["records"], ppl0) for r in results])
        for name in names
    }
    return {
        label: {name: live_fit.error_summary(params, data) for name, data in per_policy.items()}
        for label, params in surrogates.items()
    }


def _predicted_returns(params, policies: dict, rounds: int, seeds) -> dict:
    """Each policy's return as the surrogate ``params`` predicts it for the live evaluation's episodes
    (the same reset and channel draws; the surrogate's own perplexity carried from round to round, so a
    controller, which observes it, may act differently there)."""
    from fedpeat_jax.mec import FedPEATMEC
    from fedpeat_jax.rl import live_eval

    env = FedPEATMEC(params)
    run = lambda p, s: live_eval.run_policy(env, p, rounds, seed=s, params=params, show_progress=False)  # noqa: E731
    return {name: [float(sum(r["reward"] for r in run(p, s))) for s in seeds] for name, p in policies.items()}


def live_part(args, out: Path, runs: Path) -> dict:
    from fedpeat_jax.io.fingerprint import tree_digest
    from fedpeat_jax.mec import live, live_fit
    from fedpeat_jax.rl import live_eval
    from fedpeat_jax.rl.controller import ControllerConfig, load_policy, train_controller
    from fedpeat_jax.rl.rules import Rule
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    started = time.time()
    rounds = args.live_rounds
    env = live.make_live_env(config=live.LiveConfig(), max_steps_in_episode=rounds)
    ppl0 = float(env.default_params.ppl0)
    calibrated = env.default_params.surrogate()
    search = 16 if args.quick else 64
    # the best rule on the calibrated surrogate (the previous study's best baseline) is collected too, so the
    # refit sees rounds of the policy the controller must beat
    calibrated_rule = live_eval.baselines(env, ("best_rule",), search_episodes=search)["best_rule"]
    rules = [Rule.of(*fields) for fields in (COLLECTION_RULES[:2] if args.quick else COLLECTION_RULES)]
    rules.append(calibrated_rule.params)
    cache = runs / "live_collect.json"
    kept = lambda: len(json.loads(cache.read_text())["episodes"]) if cache.is_file() else 0  # noqa: E731
    kept_before = kept()
    collected = collect_live(env, rounds, rules, cache)
    config = SABPPOConfig(total_timesteps=64 * 50 * 4 if args.quick else args.live_steps, num_steps=rounds)
    controller = ControllerConfig(
        seeds=args.live_train_seeds,
        eval_episodes=64 if args.quick else 256,
        rule_search_episodes=8 if args.quick else 64,
        behaviour_episodes=0,
        warm_start=args.live_warm_start,
        clone_episodes=64 if args.quick else ControllerConfig.clone_episodes,
    )
    # Data aggregation (as in DAgger / model-based RL): refit on every live episode so far, train SABPPO on
    # the refitted surrogate with the live parameters, run it and the best rule found there live, each on a
    # fresh collection seed, and add both episodes, so the refit sees the rounds of the controller and of its
    # strongest competitor. Of the training seeds, the one with the best return on the surrogate's evaluation
    # episodes is the controller (selected there, never live).
    iterations = []
    for it in range(args.live_iterations + 1):
        data = live_fit.concat([live_fit.transitions(e["records"], ppl0) for e in collected])
        refitted, fit_report = live_fit.fit_response(calibrated, data)
        run_dir = runs / f"controller_live_refit{it}"
        trained = train_controller(config, refitted, run_dir, controller=controller)
        surrogate_returns = [float(r) for r in trained["sabppo"]["per_seed_return_mean"]]
        chosen = max(range(len(surrogate_returns)), key=surrogate_returns.__getitem__)
        policy, _, _ = load_policy(run_dir, env, seed_index=chosen)
        step = {
            "episodes_fitted": len(collected),
            "sabppo_on_surrogate": surrogate_returns,
            "best_rule_on_surrogate": float(trained["baselines"]["best_rule"]["return_mean"]),
            "warm_start": trained.get("warm_start"),
        }
        iterations.append(step)
        if it == args.live_iterations:
            break
        identity = {"controller": tree_digest(policy.params)}
        own = live_episode(
            env,
            rounds,
            policy,
            COLLECTION_SEED0 + len(collected),
            identity,
            cache,
            f"controller live, iteration {it + 1}",
        )
        step["controller_episode"] = _episode_step(own, refitted, ppl0)
        collected.append(own)
        rule = Rule.of_fields(trained["best_rule"]["rule"])
        desc = f"best rule live, iteration {it + 1}"
        competitor = rule_episode(env, rounds, rule, COLLECTION_SEED0 + len(collected), cache, desc)
        step["rule_episode"] = _episode_step(competitor, refitted, ppl0)
        collected.append(competitor)
    policies = {
        "sabppo": policy,
        # the best rule on the refitted surrogate, and on the calibrated one (the previous study's best baseline)
        **live_eval.baselines(env, ("best_rule",), search_episodes=search, surrogate=refitted),
        "best_rule_calibrated": calibrated_rule,
        **live_eval.baselines(env, ("greedy", "all_devices")),
    }
    if policies["best_rule_calibrated"].name == policies["best_rule"].name:  # the same rule: run it once
        del policies["best_rule_calibrated"]
    results = [compare_live(env, rounds, policies, seed, cache) for seed in range(args.live_seeds)]
    seconds = time.time() - started
    used = len(collected) + len(policies) * len(results)
    ran = kept() - kept_before
    check = _surrogate_check(env, {"calibrated": calibrated, "refitted": refitted}, results)
    per_episode = {name: [r["policies"][name]["summary"]["return"] for r in results] for name in policies}
    returns = {name: float(sum(v) / len(v)) for name, v in per_episode.items()}
    best_baseline = max((n for n in returns if n != "sabppo"), key=returns.get)
    wins = [
        all(ret["sabppo"] > r for n, r in ret.items() if n != "sabppo")
        for ret in ({name: v[i] for name, v in per_episode.items()} for i in range(len(results)))
    ]
    # SABPPO minus the best baseline, episode by episode (the same start): how sure the mean's sign is
    gaps = [a - b for a, b in zip(per_episode["sabppo"], per_episode[best_baseline])]
    gap_se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    payload = {
        "live_config": dataclasses.asdict(live.LiveConfig()),
        "ppl0": ppl0,
        "ppl_drift": float(env.default_params.ppl_drift),
        "rounds": rounds,
        "seeds": list(range(args.live_seeds)),
        "sabppo_env_steps": config.total_timesteps,
        "warm_start": args.live_warm_start,
        "collection": [{"policy": e["policy"], "seed": e["seed"]} for e in collected],
        "iterations": iterations,
        "refit": fit_report,
        "surrogate_check_on_evaluation": check,
        "rule_descriptions": {n: p.name for n, p in policies.items() if n.startswith("best_rule")},
        "surrogate_eval": {
            "sabppo_per_training_seed": surrogate_returns,
            "chosen_training_seed": chosen,
            "best_rule": float(trained["baselines"]["best_rule"]["return_mean"]),
            "episodes": trained["eval_episodes"],
        },
        "mean_return": returns,
        "per_episode_return": per_episode,
        "predicted_returns": _predicted_returns(refitted, policies, rounds, list(range(args.live_seeds))),
        "best_baseline": best_baseline,
        "sabppo_beats_every_baseline": all(returns["sabppo"] > r for n, r in returns.items() if n != "sabppo"),
        "episodes_sabppo_beats_every_baseline": int(sum(wins)),
        "gap_to_best_baseline": {"per_episode": gaps, "mean": statistics.fmean(gaps), "standard_error": gap_se},
        "seconds": round(seconds, 1),
        "live_episodes": {"used": used, "ran_in_this_call": ran},
        "machine": machine_info(),
        "environment": _model_line(),
        "episodes": results,
    }
    (out / "live.json").write_text(json.dumps(payload, indent=1, default=str))
    for seed, result in enumerate(results):
        live_eval.plot(result, out / ("live.png" if seed == 0 else f"live_seed{seed}.png"))

    def mean_of(name: str, key: str) -> float:  # a policy's live_eval.summarize entry, averaged over the episodes
        return statistics.fmean(r["policies"][name]["summary"][key] for r in results)

    md = f"# Live FedPEAT rounds: SABPPO and the baselines over {len(results)} episodes\n"
    md += (
        f"\n## Mean over the {len(results)} episodes\n\n| policy | mean return | per episode | final perplexity (real) "
        "| mean perplexity (real) | mean round latency (s) | stragglers per episode |\n|---|---|---|---|---|---|---|\n"
        + "".join(
            f"| {n} | {returns[n]:.2f} | {', '.join(f'{r:.2f}' for r in v)} | {mean_of(n, 'final_perplexity'):.1f} | "
            f"{mean_of(n, 'mean_perplexity'):.1f} | {mean_of(n, 'mean_latency_s'):.3f} | {mean_of(n, 'stragglers'):.1f} |\n"
            for n, v in per_episode.items()
        )
    )
    md += (
        f"\n{len(results)} live episodes (seeds {payload['seeds']}) of {rounds} real FedPEAT rounds per policy, each "
        f"policy from the same start in an episode (the same devices and channel draws). SABPPO beats every baseline in "
        f"mean measured return: **{payload['sabppo_beats_every_baseline']}** (best baseline: {best_baseline}); in "
        f"{payload['episodes_sabppo_beats_every_baseline']} of {len(results)} episodes on their own. SABPPO minus "
        f"{best_baseline}, episode by episode: {', '.join(f'{g:+.2f}' for g in gaps)}; mean {statistics.fmean(gaps):+.2f}, "
        f"standard error {gap_se:.2f}. SABPPO was "
        + (
            f"cloned from the best rule on the last refitted surrogate (action agreement "
            f"{', '.join(f'{a:.3f}' for a in iterations[-1]['warm_start']['action_agreement'])} per training seed, "
            f"`rl.imitation`), then trained for "
            if iterations[-1]["warm_start"]
            else "trained from scratch for "
        )
        + f"{config.total_timesteps:,} PPO steps per training seed on the last refitted surrogate (below: "
        f"{len(iterations) - 1} data-aggregation iterations) with the live environment's "
        f"parameters ({rounds}-round episodes, LiveConfig defaults: {env.n_devices} devices = Folio role clients, the "
        f"server on public modern-spelling text, the shipped foundation model, the participation drift on). best_rule "
        f"was searched on the refitted surrogate, and a rule on the calibrated one (the shipped table): "
        f"{'best_rule_calibrated' if 'best_rule_calibrated' in payload['mean_return'] else 'the same rule'}. On the "
        f"refitted surrogate's {trained['eval_episodes']} evaluation episodes the {len(surrogate_returns)} training seeds "
        f"scored {', '.join(f'{r:.2f}' for r in surrogate_returns)} and its best rule "
        f"{payload['surrogate_eval']['best_rule']:.2f}; seed {chosen}, the better there, went live. Rules: "
        + "; ".join(f"{n} = {d}" for n, d in payload["rule_descriptions"].items())
        + f". Wall time {seconds:.0f} s (collection, refit, training, search and evaluation; {ran} of the {used} live "
        f"episodes ran in this call{'' if ran == used else f', the others were kept from an earlier call in `{cache.name}`'}). "
        "Machine: "
        f"{payload['machine']['cpu_model']}, load average at the end {payload['machine']['loadavg_1_5_15']}. Plots: "
        f"`live.png` (seed 0)" + "".join(f", `live_seed{i}.png`" for i in range(1, len(results))) + ".\n"
    )
    md += (
        live_report.predicted_markdown(payload)
        + live_report.iterations_markdown(payload)
        + f"\n{README_EXCERPT_END}\n\n"
    )
    md += "\n".join(live_eval.to_markdown(result, ppl0).replace("# Live", "## Live", 1) for result in results)
    md += live_report.refit_markdown(payload)
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
        "--live-seeds", type=int, default=6, help="live episodes (seeds 0..N-1) per policy; the mean return decides"
    )
    parser.add_argument(
        "--live-train-seeds",
        type=int,
        default=2,
        help="SABPPO training seeds on the live surrogate; the best on its evaluation episodes goes live",
    )
    parser.add_argument(
        "--live-iterations",
        type=int,
        default=2,
        help="data-aggregation iterations: the trained controller's own live episodes added to the refit, then retrained",
    )
    parser.add_argument(
        "--live-steps", type=int, default=1_000_000, help="SABPPO env steps per training seed on the live surrogate"
    )
    parser.add_argument(
        "--live-warm-start",
        choices=("best_rule", "none"),
        default="best_rule",
        help="start SABPPO on the live surrogate from a clone of the best rule there (rl.imitation), or from scratch",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny training budgets (smoke run; do not commit its results)"
    )
    parser.add_argument("--skip", choices=("controller", "live"), default=None, help="skip one part")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--runs", default="runs/controller_study", help="training run directories (resumable)")
    args = parser.parse_args(argv)
    if args.quick:
        args.live_rounds, args.live_seeds, args.live_iterations = min(args.live_rounds, 2), 1, 1
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    if args.skip != "controller":
        controller_part(args, out, runs)
    if args.skip != "live":
        live_part(args, out, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
