"""Emulator distillation (offsite tuning's optional step): train the emulator's middle blocks to
mimic the full middle, with the adapter frozen.

    loss = LM_loss(emulator) + kd_weight * KD,   KD = mean(((h_t - h_s) / rms(h_t))^2)

h_t is the hidden state after the full middle (teacher), h_s after the emulator's middle
(student), both fed the same bottom-adapter output; rms is over the whole tensor. The pieces
come from `gpt2.embed` / `gpt2.run_blocks` / `gpt2.head` on slices of one params tree, so the
distilled emulator runs through exactly the forward that training and evaluation use.
Distillation is deterministic (no dropout): the KD target must be the model's real output.

`load_distilled` caches the result next to its foundation model as a plain HF GPT-2 of depth
l + k + r (`<foundation>/emulators/<l-k-r>-distill-<fingerprint>`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax import data as data_lib
from fedpeat_jax.config import Config, GPT2Config
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.io.files import file_lock, write_json_atomic
from fedpeat_jax.io.fingerprint import fingerprint
from fedpeat_jax.io.logging import RunLogger
from fedpeat_jax.io.machine import machine_info
from fedpeat_jax.model import gpt2, hf
from fedpeat_jax.peat import emulator as emu
from fedpeat_jax.peat.foundation import Foundation, pretraining_texts
from fedpeat_jax.peat.train import TrainConfig, fit
from fedpeat_jax.tree import select_blocks

DEFAULT_KD_WEIGHT = 30.0  # the published weight of the KD term
INFO_FILE = "distill.json"


@dataclass(frozen=True)
class DistillConfig(Config):
    """Settings of emulator distillation (LM loss + kd_weight x KD on the pretraining text)."""

    steps: int = 200
    """Optimizer steps."""
    batch: int = 8
    """Windows per step."""
    seq_len: int = 128
    """Tokens per window."""
    lr: float = 3e-4  # published: 1e-4 over a full epoch of a large corpus; ours is a short run
    warmup: int = 20
    """Linear warm-up steps, then cosine decay."""
    final_lr_ratio: float = 0.1
    """Final learning rate / peak."""
    kd_weight: float = DEFAULT_KD_WEIGHT
    """Weight of the KD term (published: 30)."""
    eval_windows: int = 64  # fixed held-out windows for the before/after KD and LM numbers
    chunk: int = 20
    """Steps per jitted call (= checkpoint interval)."""
    seed: int = 0
    """Seed of batch sampling."""

    def validate(self) -> None:
        if self.kd_weight < 0:
            raise ValueError(f"DistillConfig.kd_weight must be >= 0, got {self.kd_weight}")
        if self.eval_windows < 1:
            raise ValueError(f"DistillConfig.eval_windows must be >= 1, got {self.eval_windows}")
        self.train_config()

    def train_config(self) -> TrainConfig:
        # No weight decay: it would pull the copied blocks away from the teacher for no gain.
        return TrainConfig.of(
            "DistillConfig",
            steps=self.steps,
            batch=self.batch,
            lr=self.lr,
            warmup=self.warmup,
            final_lr_ratio=self.final_lr_ratio,
            chunk=self.chunk,
            seed=self.seed,
        )


def kd_loss(h_teacher: jax.Array, h_student: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """mean(((h_t - h_s) / rms(h_t))^2) over (real) tokens and features; rms over the whole
    teacher tensor, so the loss is scale-free (1.0 = an error as large as the signal)."""
    t = h_teacher.astype(jnp.float32)
    s = h_student.astype(jnp.float32)
    if mask is None:
        rms = jnp.sqrt(jnp.mean(jnp.square(t)))
        return jnp.mean(jnp.square((t - s) / rms))
    w = mask.astype(jnp.float32)[..., None]
    n = jnp.maximum(w.sum() * t.shape[-1], 1.0)
    rms = jnp.sqrt(jnp.sum(jnp.square(t) * w) / n)
    return jnp.sum(jnp.square((t - s) / rms) * w) / n


def split_forward(full_params, student_middle, tokens: jax.Array, model: GPT2Config, spec: emu.EmulatorSpec) -> dict:
    """The emulator forward with the full middle alongside: {"teacher", "student", "logits"}.

    teacher: hidden state after the full middle; student: after `student_middle`; logits: the
    emulator's (bottom adapter, student middle, top adapter, head). Deterministic.
    """
    spec.check(model)
    blocks = full_params["blocks"]
    ctx = gpt2.Ctx(model, None, gpt2.attention_bias(None, tokens.shape[1], tokens.shape[1]), False)
    h = gpt2.embed(full_params, tokens, model)
    h_bottom, _ = gpt2.run_blocks(select_blocks(blocks, range(spec.l)), h, ctx)
    h_teacher, _ = gpt2.run_blocks(emu.middle(full_params, spec, emulator=False), h_bottom, ctx)
    h_student, _ = gpt2.run_blocks(student_middle, h_bottom, ctx)
    h_top, _ = gpt2.run_blocks(select_blocks(blocks, range(spec.n_layer - spec.r, spec.n_layer)), h_student, ctx)
    return {
        "teacher": jax.lax.stop_gradient(h_teacher),
        "student": h_student,
        "logits": gpt2.head(full_params, h_top, model),
    }


@functools.lru_cache(maxsize=16)
def distill_objective(model: GPT2Config, spec: emu.EmulatorSpec, kd_weight: float = DEFAULT_KD_WEIGHT):
    """`fit` loss: trainable = the emulator's middle blocks, frozen = the full model's params.
    Batches are {"tokens": (B, T)[, "mask": (B, T)]} (right-padded windows)."""

    def loss(student_middle, full_params, batch, rng):
        del rng  # deterministic, see the module docstring
        mask = batch.get("mask")
        out = split_forward(full_params, student_middle, batch["tokens"], model, spec)
        lm = gpt2.lm_loss(out["logits"], batch["tokens"], mask)
        kd = kd_loss(out["teacher"], out["student"], mask)
        return lm + kd_weight * kd, {"lm": lm, "kd": kd}

    return loss


def distill_metrics(
    full_params, student_middle, tokens, model: GPT2Config, spec: emu.EmulatorSpec, batch: int = 16
) -> dict:
    """Mean KD and LM loss of the student over eval windows (full windows, no padding)."""
    kd = lm = 0.0
    for i in range(0, len(tokens), batch):
        chunk = jnp.asarray(tokens[i : i + batch])
        m = _batch_metrics(student_middle, full_params, chunk, model, spec)
        kd, lm = kd + float(m["kd"]) * len(chunk), lm + float(m["lm"]) * len(chunk)
    return {"kd": kd / len(tokens), "lm": lm / len(tokens)}


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _batch_metrics(student_middle, full_params, tokens, model, spec):
    return distill_objective(model, spec, DEFAULT_KD_WEIGHT)(student_middle, full_params, {"tokens": tokens}, None)[1]


class DistillResult(NamedTuple):
    params: Any  # the distilled emulator's params (depth l + k + r)
    history: list
    before: dict  # {"kd", "lm"} of the layer-drop emulator on the eval windows
    after: dict  # the same after distillation
    seconds: float
    steps_per_s: float


def distill(
    full_params,
    model: GPT2Config,
    spec: emu.EmulatorSpec,
    windows: np.ndarray,
    cfg: DistillConfig = DistillConfig(),
    *,
    heldout: Optional[np.ndarray] = None,
    logger=None,
    checkpoints=None,
    show_progress: bool = True,
) -> DistillResult:
    """Distill the layer-drop emulator of `full_params` on training `windows` (int32[N, T]);
    KD and LM loss are measured before and after on `heldout` windows when given."""
    student = emu.middle(emu.build(full_params, spec), spec, emulator=True)
    objective = distill_objective(model, spec, cfg.kd_weight)
    before = after = None
    if heldout is not None:
        before = distill_metrics(full_params, student, heldout, model, spec)
    result = fit(
        objective,
        student,
        full_params,
        {"tokens": jnp.asarray(windows)},
        cfg.train_config(),
        logger=logger,
        checkpoints=checkpoints,
        desc=f"distill {spec.name}",
        log_prefix="distill/",
        show_progress=show_progress,
    )
    if heldout is not None:
        after = distill_metrics(full_params, result.params, heldout, model, spec)
    params = emu.with_middle(emu.build(full_params, spec), spec, result.params)
    return DistillResult(params, result.history, before, after, result.seconds, result.steps_per_s)


# --------------------------------------------------------------------------------------------
# Cached distilled emulators of a foundation model
# --------------------------------------------------------------------------------------------
def distilled_dir(foundation: Foundation, spec: emu.EmulatorSpec, cfg: DistillConfig) -> Path:
    key = fingerprint({"spec": spec, "distill": cfg, "foundation": foundation.info.get("fingerprint")}, length=12)
    return foundation.work_dir / "emulators" / f"{spec.name}-distill-{key}"


def load_distilled(
    foundation: Foundation,
    spec: emu.EmulatorSpec,
    cfg: DistillConfig = DistillConfig(),
    *,
    allow_distill: bool = True,
    show_progress: bool = True,
) -> tuple:
    """(emulator params, info dict) of the distilled `spec` emulator of `foundation`, distilled on
    the foundation's own pretraining text (held-out plays excluded) unless already cached."""
    spec.check(foundation.config)
    path = distilled_dir(foundation, spec, cfg)
    with file_lock(path.with_name(path.name + ".lock")):
        if not (path / INFO_FILE).is_file():
            if not allow_distill:
                raise FileNotFoundError(f"no distilled {spec.name} emulator cached in {path}")
            heldout_plays = tuple(foundation.info.get("heldout_plays", data_lib.DEFAULT_HELDOUT_PLAYS))
            text = foundation.info.get("pretrain", {}).get("text")  # a foundation pretrained on a user's text
            train_texts, held_texts, _ = pretraining_texts(
                heldout_plays, text=None if text is None else TextConfig(**text)
            )
            windows = data_lib.pretraining_windows(train_texts, foundation.tokenizer, cfg.seq_len)
            held = data_lib.pretraining_windows(held_texts, foundation.tokenizer, cfg.seq_len)
            held = held[np.linspace(0, len(held) - 1, min(cfg.eval_windows, len(held))).round().astype(int)]
            run_dir = path.with_name(path.name + ".run")
            ckpt = CheckpointManager(run_dir / "ckpt", max_to_keep=1)
            with RunLogger(run_dir / "logs", resume_step=ckpt.latest_step()) as logger:
                result = distill(
                    foundation.params,
                    foundation.config,
                    spec,
                    windows,
                    cfg,
                    heldout=held,
                    logger=logger,
                    checkpoints=ckpt,
                    show_progress=show_progress,
                )
            ckpt.close()
            info = {
                "spec": dataclasses.asdict(spec),
                "middle_ids": list(spec.middle_ids),
                "distill": dataclasses.asdict(cfg),
                "foundation": str(foundation.path),
                "before": result.before,
                "after": result.after,
                "seconds": result.seconds,
                "tokens_per_s": result.steps_per_s * cfg.batch * cfg.seq_len,
                "final": result.history[-1] if result.history else None,
                "machine": machine_info(),
            }
            hf.save_pretrained(result.params, spec.emulator_config(foundation.config), path, overwrite=True)
            write_json_atomic(path / INFO_FILE, info)
            shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
            return result.params, info
    params, _ = hf.load_pretrained(path)
    return params, json.loads((path / INFO_FILE).read_text())


__all__ = [
    "DEFAULT_KD_WEIGHT",
    "DistillConfig",
    "kd_loss",
    "split_forward",
    "distill_objective",
    "distill_metrics",
    "DistillResult",
    "distill",
    "distilled_dir",
    "load_distilled",
]
