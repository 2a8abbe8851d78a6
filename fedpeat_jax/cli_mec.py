"""The `fedpeat` subcommands of the MEC environment and its controller: calibrate,
train-controller and live. They parse options and call the library, as the rest of `fedpeat_jax.cli`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedpeat_jax.options import (
    Group,
    Parser,
    add_groups,
    build_configs,
    subcommand,
    text_group,
)


@subcommand("calibrate", "fit the MEC environment's perplexity response to real FedPEAT runs")
def cmd_calibrate(argv):
    from fedpeat_jax.mec.calibrate import CalibrateConfig, add_drift, calibrate
    from fedpeat_jax.mec.calibration import DEFAULT_TABLE_PATH, load_calibration
    from fedpeat_jax.peat.pretrained import load_model, model_config
    from fedpeat_jax.tasks import plan_task

    parser = Parser(
        prog="fedpeat calibrate",
        description="Run FedPEAT device rounds for every emulator size and participation level and server-only rounds for every server data domain, fit the two-source response, write the table the environment loads.",
    )
    parser.add_argument("--config", default=None, help="JSON file with 'text' and 'calibrate' sections")
    parser.add_argument("--preset", default="default", help="foundation model preset (ignored with --model-dir)")
    parser.add_argument("--model-dir", default=None, help="a local Hugging Face GPT-2 directory")
    parser.add_argument(
        "--out",
        default="runs/calibration.json",
        help=f"where to write the table (the shipped default is {DEFAULT_TABLE_PATH.name})",
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--drift-only",
        default=None,
        metavar="TABLE",
        help="measure only the fixed-subset runs and write TABLE with its participation drift fitted to --out",
    )
    groups = [text_group(), Group("calibrate", CalibrateConfig, CalibrateConfig(), skip=("text",))]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["calibrate"]
    model = model_config(args.preset, args.model_dir)
    cfg.check_model(model)
    plan = plan_task(cfg.task(), args.cache_dir)  # the text's checks, before any weights are loaded
    if not plan.heldout:
        raise ValueError(
            f"TextConfig.heldout_fraction: calibration measures held-out perplexity, and {cfg.text.describe()} holds none out"
        )
    n = plan.n_clients
    if cfg.population is not None and cfg.population > n:
        raise ValueError(
            f"CalibrateConfig.population ({cfg.population}) is more than the {n} clients of {cfg.text.describe()}; lower it"
        )
    if max(cfg.clients_per_round) > n:
        raise ValueError(
            f"CalibrateConfig.clients_per_round {cfg.clients_per_round} asks for more than the {n} clients of {cfg.text.describe()}"
        )
    base = None if args.drift_only is None else load_calibration(args.drift_only)  # checked before loading weights
    if base is not None:
        base.check_model(model, cfg.adapter_l, cfg.adapter_r)
    params, model, tokenizer = load_model(args.preset, args.model_dir, args.cache_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = "fedpeat calibrate " + " ".join(argv)
    if base is not None:
        table = add_drift(base, cfg, params, model, tokenizer, cache_dir=args.cache_dir)
        table = table.replace(source=f"{base.source}; drift: {source.strip()}")
        table.save(out)
        fit = table.meta["fit"]["drift"]
        print(f"calibration table: {out}")
        print(
            f"  drift {table.drift:.3f} (max rel. error per fixed-subset curve {[round(e, 3) for e in fit['curve_rel_errors']]})"
        )
        return
    from fedpeat_jax.peat import foundation

    fingerprint = None if args.model_dir else foundation.fingerprint(*foundation.resolve_settings(args.preset))
    result = calibrate(
        cfg,
        params,
        model,
        tokenizer,
        model_name=args.model_dir or args.preset,
        cache_dir=args.cache_dir,
        out=out,
        source=source.strip(),
        model_fingerprint=fingerprint,
    )
    print(f"calibration table: {out}")
    fit = result.meta["fit"]
    for k, p, e in zip(result.k, result.ppl_inf, result.eta):
        print(
            f"  devices k={k}: ppl_inf={p:.2f} eta={e:.3f} (max rel. error {fit['levels'][str(k)]['max_rel_error']:.3f})"
        )
    for domain, resp in result.server.items():
        print(
            f"  server {domain}: ppl_inf={resp.ppl_inf:.2f} eta={resp.eta:.3f} (max rel. error {fit['server'][domain]['max_rel_error']:.3f})"
        )
    if "drift" in fit:
        print(
            f"  drift {result.drift:.3f} (max rel. error per fixed-subset curve {[round(e, 3) for e in fit['drift']['curve_rel_errors']]})"
        )
    if "mixed" in result.meta:
        print(
            f"  server + devices (not fitted): max rel. error of the prediction {result.meta['mixed']['max_rel_error']:.3f}"
        )


@subcommand("train-controller", "train the SABPPO controller in the MEC environment and compare it with the baselines")
def cmd_train_controller(argv):
    from fedpeat_jax.mec import PRESETS, load_calibration, preset_params
    from fedpeat_jax.rl.controller import ControllerConfig, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    parser = Parser(
        prog="fedpeat train-controller",
        description="SABPPO (shared trunk, one head per action branch) trained end to end in the jitted FedPEAT MEC environment; checkpoints, TensorBoard logs, baseline comparison and plots in --out.",
    )
    parser.add_argument("--env-preset", default="default", choices=sorted(PRESETS), help="MEC environment preset")
    parser.add_argument(
        "--calibration", default=None, help="calibration table JSON (default: the table shipped with the package)"
    )
    parser.add_argument("--out", default="runs/controller")
    parser.add_argument("--fresh", action="store_true", help="refuse to resume when --out holds checkpoints")
    parser.add_argument("--config", default=None, help="JSON file with 'sabppo' and 'controller' sections")
    groups = [Group("sabppo", SABPPOConfig, SABPPOConfig()), Group("controller", ControllerConfig, ControllerConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    calibration = load_calibration(args.calibration) if args.calibration else None
    env_params = preset_params(args.env_preset, calibration=calibration)
    summary = train_controller(
        configs["sabppo"], env_params, args.out, resume=not args.fresh, controller=configs["controller"]
    )
    print(f"SABPPO: {summary['sabppo']['return_mean']:.3f}")
    for name, b in summary["baselines"].items():
        print(f"{name:>14s}: {b['return_mean']:.3f}")
    print(f"beats every baseline: {summary['beats_every_baseline']}; results in {summary['run_dir']}")


@subcommand("live", "run controllers in the live MEC environment (real FedPEAT rounds in every step)")
def cmd_live(argv):
    from fedpeat_jax.mec import live
    from fedpeat_jax.rl import live_eval

    parser = Parser(
        prog="fedpeat live",
        description="The MEC environment in live mode: every step runs a real jitted FedPEAT round of the chosen devices, emulators and server participation on the default foundation model, and the reward uses the measured held-out perplexity. Compares a trained controller (--controller) with baselines from the same start.",
    )
    parser.add_argument(
        "--controller",
        default=None,
        help="a `fedpeat train-controller` run directory (its policy must match the env's layout: default settings do)",
    )
    parser.add_argument("--seed-index", type=int, default=0, help="which seed's policy of a multi-seed controller run")
    parser.add_argument(
        "--baselines",
        default="best_rule,greedy",
        help="comma-separated baselines from: "
        + ", ".join(live_eval.BASELINES)
        + " (best_rule: the best simple fixed rule, searched on the calibrated surrogate with the live parameters; empty: none)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="live rounds per policy")
    parser.add_argument("--out", default="runs/live", help="folder for live.json, live.md and live.png")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--config", default=None, help="JSON file with a 'live' section")
    groups = [Group("live", live.LiveConfig, live.LiveConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["live"]
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    names = [n for n in args.baselines.split(",") if n]
    unknown = sorted(set(names) - set(live_eval.BASELINES))
    if unknown:
        raise ValueError(f"--baselines: unknown {unknown}; choose from {list(live_eval.BASELINES)}")
    env = live.make_live_env(config=cfg, cache_dir=args.cache_dir)
    policies = {}
    if args.controller:
        from fedpeat_jax.rl.controller import load_policy

        policies["sabppo"], _, _ = load_policy(args.controller, env, seed_index=args.seed_index)
    policies.update(live_eval.baselines(env, names))
    if not policies:
        raise ValueError("nothing to run: give --controller and/or --baselines")
    result = live_eval.compare(env, policies, args.rounds, seed=cfg.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "live.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "ppl0": float(env.default_params.ppl0), **result}, indent=1)
    )
    markdown = live_eval.to_markdown(result, float(env.default_params.ppl0))
    (out / "live.md").write_text(markdown)
    live_eval.plot(result, out / "live.png")
    print(markdown)
    print(f"results in {out.resolve()}")
