"""The offsite-tuning table (Xiao et al. 2023, Table 2 and 4) on our data.

The foundation model is pretrained on modern-spelling plays; the downstream task is the
First-Folio spelling of the training plays (held-out plays excluded), and every perplexity is on
the held-out plays in Folio spelling. Settings (reference/offsite_tuning.md):

    Full ZS      the foundation model as is
    Emulator ZS  the emulator (layer-drop or distilled middle) with the original adapter
    FT           the full model fine-tuned end to end
    OT Emulator  the emulator with the adapter tuned on it
    OT Plug-in   the full model with that tuned adapter plugged in

each OT setting with full adapter tuning (PeftConfig kind "full" on the adapter blocks) and with
LoRA inside the adapter blocks. Efficiency per training run: trainable parameters, parameters the
device holds, peak memory of one compiled training step (XLA memory analysis, see
`train.step_memory`) and steady-state training tokens/s.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax import data as data_lib
from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import Config, GPT2Config, PeftConfig
from fedpeat_jax.data.source import TextConfig, describe_text
from fedpeat_jax.io.logging import RunLogger
from fedpeat_jax.io.machine import machine_info
from fedpeat_jax.peat import emulator as emu
from fedpeat_jax.peat.distill import DistillConfig, load_distilled
from fedpeat_jax.peat.foundation import Foundation, load_foundation
from fedpeat_jax.peat.train import TrainConfig, evaluate_perplexity, fit, lm_objective, step_memory

SETTINGS = ("Full ZS", "Emulator ZS", "FT", "OT Emulator", "OT Plug-in")
EMULATORS = ("layer-drop", "distilled")
PEFTS = ("full", "lora")


@dataclass(frozen=True)
class OffsiteConfig(Config):
    """Settings of the offsite-tuning table: emulator shape, fine-tuning runs, evaluation."""

    preset: str = "default"
    """Foundation model preset (`GPT2Config.preset`)."""
    l: int = 2
    """Bottom adapter blocks."""
    k: int = 2  # middle blocks the emulator keeps (2-2-2 of the default 8-block model)
    r: int = 2
    """Top adapter blocks."""
    seq_len: int = 128
    """Tokens per window."""
    steps: int = 100  # optimizer steps of every fine-tuning run
    batch: int = 8
    """Windows per step."""
    lr: float = 3e-4  # FT and full adapter tuning
    lr_lora: float = 2e-3  # LoRA (scale alpha / r = 8 on top)
    warmup: int = 10
    """Warm-up steps of every fine-tuning run."""
    lora_rank: int = 4
    """LoRA rank of the 'lora' adapter tuning."""
    lora_alpha: float = 32.0
    """LoRA alpha."""
    # dropout of every fine-tuning run (embedding, attention, residual, LoRA): the published
    # setting (GPT-2 trains with 0.1; LoRA dropout 0.1); evaluation never drops
    dropout: float = 0.1
    eval_windows: int = 128  # held-out windows evaluated, spread evenly over the plays (0: all)
    eval_batch: int = 16
    """Windows per evaluation batch."""
    emulators: tuple[str, ...] = EMULATORS
    """Emulator kinds: 'layer-drop' and/or 'distilled'."""
    pefts: tuple[str, ...] = PEFTS
    """Adapter tuning kinds: 'full' and/or 'lora'."""
    ft_lora: bool = False  # also FT with LoRA in every block (the paper's efficiency baseline)
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation settings of the 'distilled' emulator (the CLI's `distill` group)."""
    text: TextConfig = TextConfig()  # the fine-tuning text (its training documents) and the held-out documents
    seed: int = 0
    """Seed of every run."""

    def validate(self) -> None:
        bad = [e for e in self.emulators if e not in EMULATORS] + [p for p in self.pefts if p not in PEFTS]
        if bad:
            raise ValueError(f"unknown emulator/PEFT kind(s) {bad}; emulators: {EMULATORS}, PEFTs: {PEFTS}")
        if not self.emulators or not self.pefts:
            raise ValueError("OffsiteConfig needs at least one emulator kind and one PEFT kind")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"OffsiteConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.eval_windows < 0:
            raise ValueError(f"OffsiteConfig.eval_windows must be >= 0, got {self.eval_windows}")
        self.train_config(self.lr)

    def train_config(self, lr: float) -> TrainConfig:
        return TrainConfig.of(
            "OffsiteConfig",
            steps=self.steps,
            batch=self.batch,
            lr=lr,
            warmup=self.warmup,
            chunk=min(25, self.steps),
            seed=self.seed,
        )

    def peft(self, kind: str) -> PeftConfig:
        return PeftConfig(kind=kind, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.dropout)


def spread(n: int, limit: int) -> np.ndarray:
    """`limit` indices spread evenly over range(n) (all of them when limit is 0 or >= n)."""
    if limit == 0 or limit >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(int)


def task_texts(text: TextConfig, heldout_plays=data_lib.DEFAULT_HELDOUT_PLAYS) -> tuple:
    """(training examples, held-out examples, held-out documents) of the fine-tuning text:
    Shakespeare holds out `heldout_plays` (the foundation model's), a user's text its
    TextConfig's held-out documents. Needs no model, so a user's text is checked first."""
    train, held, docs = data_lib.training_and_heldout_texts(
        text, heldout_docs=heldout_plays if text.is_shakespeare else None
    )
    if not held:
        raise ValueError(
            f"TextConfig.heldout_docs: the offsite table compares held-out perplexities, and {text.describe()} has no held-out documents"
        )
    return train, held, docs


def task_data(text: TextConfig, tokenizer, seq_len: int, heldout_plays, eval_windows: int = 0, texts=None) -> tuple:
    """(training windows int32[N, T], held-out (tokens, mask), held-out documents) of the
    fine-tuning text (`texts`: its `task_texts`, when already loaded)."""
    train_texts, held_texts, held_docs = texts if texts is not None else task_texts(text, heldout_plays)
    train = data_lib.pretraining_windows(train_texts, tokenizer, seq_len)
    if len(train) == 0:
        raise ValueError(
            f"OffsiteConfig.seq_len: the training documents of {text.describe()} give no full window of {seq_len} tokens"
        )
    tokens, mask = data_lib.eval_windows(held_texts, tokenizer, seq_len)
    keep = spread(len(tokens), eval_windows)
    return train, (tokens[keep], mask[keep]), held_docs


def folio_data(tokenizer, seq_len: int, heldout_plays, eval_windows: int = 0) -> tuple:
    """(training windows int32[N, T], held-out (tokens, mask)) of the Folio-spelling plays."""
    return task_data(TextConfig(), tokenizer, seq_len, heldout_plays, eval_windows)[:2]


def _display_path(path) -> str:
    """The path with the home directory as "~": results files are committed, machines differ."""
    path, home = Path(path).absolute(), Path.home()
    return "~/" + str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


def n_params(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def tune(
    base,
    model: GPT2Config,
    peft: Optional[PeftConfig],
    windows,
    tcfg: TrainConfig,
    *,
    name: str,
    logdir=None,
    show_progress=True,
    dropout: float = 0.0,
) -> tuple:
    """Fine-tune (FT when `peft` is None, else the PEFT state on `base`) with `dropout` on the
    embedding, attention and residuals; returns (trained tree, efficiency dict). The memory figure
    is of the very step `fit` runs."""
    train_model = model.replace(embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    objective = lm_objective(train_model, peft, dropout=dropout > 0)
    trainable = base if peft is None else peft_lib.init(jax.random.PRNGKey(tcfg.seed), base, model, peft)
    frozen = None if peft is None else base
    example = {"tokens": jnp.asarray(windows[: tcfg.batch])}
    memory = step_memory(objective, trainable, frozen, example, tcfg)
    logger = RunLogger(Path(logdir) / name) if logdir is not None else None
    try:
        result = fit(
            objective,
            trainable,
            frozen,
            {"tokens": jnp.asarray(windows)},
            tcfg,
            logger=logger,
            desc=name,
            log_prefix="train/",
            show_progress=show_progress,
        )
    finally:
        if logger is not None:
            logger.close()
    trainable_count = n_params(trainable)
    # A device holds the base once: full adapter tuning trains its adapter blocks in place.
    on_device = n_params(base) + (
        0 if peft is not None and peft.kind == "full" else (trainable_count if peft is not None else 0)
    )
    stats = {
        "trainable_params": trainable_count,
        "on_device_params": on_device,
        "peak_memory_mb": memory["peak_bytes"] / 2**20,
        "memory": memory,
        "tokens_per_s": result.steps_per_s * tcfg.batch * windows.shape[1],
        "train_seconds": result.seconds,
        "final_train_loss": result.history[-1]["loss"],
        "lr": tcfg.lr,
    }
    return result.params, stats


def check_pattern(row: dict) -> dict:
    """The published pattern, per row of the table."""
    return {
        "plugin_beats_full_zs": row["OT Plug-in"] < row["Full ZS"],
        "plugin_beats_ot_emulator": row["OT Plug-in"] < row["OT Emulator"],
        "emulator_zs_worse_than_full_zs": row["Emulator ZS"] > row["Full ZS"],
    }


def run_table(
    cfg: OffsiteConfig = OffsiteConfig(),
    *,
    foundation: Optional[Foundation] = None,
    logdir=None,
    show_progress: bool = True,
) -> dict:
    """Every run of the table; returns the JSON-ready result (see `to_markdown`)."""
    start = time.perf_counter()
    texts = (
        None if cfg.text.is_shakespeare else task_texts(cfg.text)
    )  # a user's text is checked before any model is loaded
    fm = foundation if foundation is not None else load_foundation(cfg.preset, show_progress=show_progress)
    model = fm.config
    if cfg.seq_len > model.n_positions:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's n_positions {model.n_positions}")
    spec = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, cfg.k)
    windows, (held_tokens, held_mask), heldout_plays = task_data(
        cfg.text,
        fm.tokenizer,
        cfg.seq_len,
        tuple(fm.info.get("heldout_plays", data_lib.DEFAULT_HELDOUT_PLAYS)),
        cfg.eval_windows,
        texts,
    )

    def ppl(params, config, state=None, peft=None):
        return evaluate_perplexity(params, held_tokens, held_mask, config, state, peft, cfg.eval_batch)["ppl"]

    full = fm.params
    full_zs = ppl(full, model)
    # How much the middle matters: zero-shot perplexity of every l-k-r layer-drop emulator. The
    # emulator can only be worse than the full model by what the dropped blocks contribute.
    depth_sweep = {}
    for k in range(spec.n_middle + 1):
        s_k = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, k)
        depth_sweep[s_k.name] = ppl(emu.build(full, s_k), s_k.emulator_config(model))
    efficiency, runs = [], {}

    ft_params, ft_stats = tune(
        full,
        model,
        None,
        windows,
        cfg.train_config(cfg.lr),
        name="FT",
        logdir=logdir,
        show_progress=show_progress,
        dropout=cfg.dropout,
    )
    ft_ppl = ppl(ft_params, model)
    del ft_params
    efficiency.append(dict(setting="FT", emulator="-", peft="all parameters", **ft_stats))
    if cfg.ft_lora:
        lora_all = cfg.peft("lora")
        state, stats = tune(
            full,
            model,
            lora_all,
            windows,
            cfg.train_config(cfg.lr_lora),
            name="FT-LoRA",
            logdir=logdir,
            show_progress=show_progress,
            dropout=cfg.dropout,
        )
        efficiency.append(dict(setting="FT", emulator="-", peft="lora", ppl=ppl(full, model, state, lora_all), **stats))

    emu_cfg = spec.emulator_config(model)
    rows = []
    for kind in cfg.emulators:
        if kind == "layer-drop":
            emulator = emu.build(full, spec)
        else:
            emulator, info = load_distilled(fm, spec, cfg.distill, show_progress=show_progress)
            runs["distillation"] = {k: info[k] for k in ("before", "after", "seconds", "tokens_per_s", "distill")}
        emulator_zs = ppl(emulator, emu_cfg)
        for peft_kind in cfg.pefts:
            pc = cfg.peft(peft_kind)
            on_emu, on_full = spec.emulator_peft(pc), spec.full_peft(pc)
            lr = cfg.lr if peft_kind == "full" else cfg.lr_lora
            name = f"OT-{kind}-{peft_kind}"
            state, stats = tune(
                emulator,
                emu_cfg,
                on_emu,
                windows,
                cfg.train_config(lr),
                name=name,
                logdir=logdir,
                show_progress=show_progress,
                dropout=cfg.dropout,
            )
            row = {
                "emulator": kind,
                "peft": peft_kind,
                "Full ZS": full_zs,
                "Emulator ZS": emulator_zs,
                "FT": ft_ppl,
                "OT Emulator": ppl(emulator, emu_cfg, state, on_emu),
                "OT Plug-in": ppl(full, model, state, on_full),  # the same state, run in the full model
            }
            row["pattern"] = check_pattern(row)
            rows.append(row)
            efficiency.append(dict(setting="OT", emulator=kind, peft=peft_kind, **stats))

    return {
        "config": dataclasses.asdict(cfg),
        "emulator": {"name": spec.name, "middle_ids": list(spec.middle_ids), "adapter_ids": list(spec.adapter_ids)},
        "foundation": {
            "path": _display_path(fm.path),
            "fingerprint": fm.info.get("fingerprint"),
            "modern_heldout_ppl": fm.info.get("heldout_ppl"),
            "param_count": model.param_count(),
            "pretraining_text": describe_text(fm.info["pretrain"].get("text", {"spelling": "modern"}))
            if "pretrain" in fm.info
            else "text this project did not record",
        },
        "data": {
            "train_windows": int(len(windows)),
            "seq_len": cfg.seq_len,
            "train_tokens_seen": cfg.steps * cfg.batch * cfg.seq_len,
            "corpus": cfg.text.describe(),
            "heldout_plays": list(heldout_plays),
            "heldout_windows": int(len(held_tokens)),
            "heldout_tokens": int(held_mask[:, 1:].sum()),
        },
        "rows": rows,
        "layer_drop_zero_shot": depth_sweep,
        # zero-shot cost of dropping every middle block: l-0-r against l-n-r (= the full model)
        "drop_whole_middle_cost": depth_sweep[emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, 0).name] / full_zs - 1,
        "efficiency": efficiency,
        "runs": runs,
        "pattern_holds": all(all(r["pattern"].values()) for r in rows),
        "memory_note": "peak memory = XLA memory_analysis of one compiled training step: arguments + outputs + temporaries - donated (aliased) buffers",
        "machine": machine_info(),
        "runtime_s": time.perf_counter() - start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_markdown(result: dict) -> str:
    cfg, data, fm = result["config"], result["data"], result["foundation"]
    em = result["emulator"]
    sweep = result["layer_drop_zero_shot"]
    folio = (
        describe_text(cfg.get("text", {})) == TextConfig().describe()
    )  # results written before `text` existed are Folio
    pretrained = fm.get("pretraining_text", "Shakespeare (modern spelling)")
    own = fm["modern_heldout_ppl"]
    if pretrained == "Shakespeare (modern spelling)":
        about = f"modern-spelling held-out perplexity {own:.2f}"
    else:
        about = f"pretrained on {pretrained}" + ("" if own is None else f", held-out perplexity {own:.2f}")
    lines = [
        "# Offsite tuning on our data" if folio else f"# Offsite tuning on {data['corpus']}",
        "",
        f"Foundation model `{cfg['preset'] if pretrained == 'Shakespeare (modern spelling)' else fm['path']}` ({fm['param_count']:,} parameters, {about}); emulator {em['name']} keeps middle blocks {em['middle_ids']}, adapter blocks "
        f"{em['adapter_ids']}. Fine-tuning: {cfg['steps']} steps x {cfg['batch']} windows x {cfg['seq_len']} tokens of "
        + ("First-Folio-spelling text" if folio else f"the training documents of {data['corpus']}")
        + f" ({data['train_windows']} training windows); lr {cfg['lr']:g} (FT, full adapter), "
        f"{cfg['lr_lora']:g} (LoRA r={cfg['lora_rank']}, alpha={cfg['lora_alpha']:g}). Perplexity on {data['heldout_tokens']:,} "
        + (
            f"tokens of the held-out plays {', '.join(data['heldout_plays'])} in Folio spelling (lower is better)."
            if folio
            else f"tokens of the held-out documents {', '.join(data['heldout_plays'])} (lower is better)."
        ),
        "",
        "| emulator | adapter tuning | " + " | ".join(SETTINGS) + " | pattern |",
        "|---|---|" + "---|" * len(SETTINGS) + "---|",
    ]
    for row in result["rows"]:
        ok = (
            "yes" if all(row["pattern"].values()) else "NO: " + ", ".join(k for k, v in row["pattern"].items() if not v)
        )
        lines.append(
            f"| {row['emulator']} | {row['peft']} | " + " | ".join(f"{row[s]:.2f}" for s in SETTINGS) + f" | {ok} |"
        )
    lines += [
        "",
        "Pattern: OT Plug-in < Full ZS, OT Plug-in < OT Emulator, Emulator ZS > Full ZS. "
        + ("It holds in every row." if result["pattern_holds"] else "It does NOT hold in every row."),
        "",
        "Zero-shot perplexity of every layer-drop emulator (what the middle blocks add): "
        + ", ".join(f"{name}: {value:.2f}" for name, value in sweep.items())
        + f"; dropping the whole middle costs {100 * result['drop_whole_middle_cost']:.1f}%.",
        "",
        "## Efficiency of the training runs",
        "",
        "| setting | emulator | tuned | trainable params | on-device params | peak memory (MB) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in result["efficiency"]:
        lines.append(
            f"| {e['setting']} | {e['emulator']} | {e['peft']} | {e['trainable_params']:,} | {e['on_device_params']:,} | "
            f"{e['peak_memory_mb']:.1f} | {e['tokens_per_s']:.0f} |"
        )
    dist = result["runs"].get("distillation")
    machine = result["machine"]
    lines += [
        "",
        f"Peak memory: {result['memory_note']}. On-device params: what the device holds (the emulator, or the full model "
        "for FT, plus LoRA factors; full adapter tuning trains the adapter blocks in place). tokens/s: steady-state training "
        "throughput (compilation excluded).",
    ]
    if dist:
        lines.append(
            f"Distillation: {dist['distill']['steps']} steps, lr {dist['distill']['lr']:g}, LM + {dist['distill']['kd_weight']:g} x KD; "
            f"on held-out modern text KD {dist['before']['kd']:.4f} -> {dist['after']['kd']:.4f}, emulator LM loss "
            f"{dist['before']['lm']:.3f} -> {dist['after']['lm']:.3f} ({dist['seconds']:.0f} s, cached)."
        )
    lines += [
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs, {machine['platform']}, jax {machine['jax']} "
        f"({machine['jax_backend']}); load average (1, 5, 15 min) at the end {[round(x, 1) for x in machine['loadavg_1_5_15'] or []]}. Runtime {result['runtime_s'] / 60:.1f} min. "
        f"Created {result['created']}.",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "SETTINGS",
    "OffsiteConfig",
    "spread",
    "task_texts",
    "task_data",
    "folio_data",
    "n_params",
    "tune",
    "check_pattern",
    "run_table",
    "to_markdown",
]
