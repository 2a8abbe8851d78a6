"""One generic training loop for pretraining, emulator distillation and the offsite-tuning runs.

    result = fit(loss_fn, trainable, frozen, data, TrainConfig(steps=1000, batch=16, lr=3e-4))

* `loss_fn(trainable, frozen, batch, rng)` returns a scalar loss, or `(loss, {name: scalar})`
  whose extra scalars are logged too. Only `trainable` gets gradients and optimizer state;
  `frozen` (a base model, a teacher...) is an argument of the jitted step, never a constant
  baked into the compiled program.
* `data` is a pytree of arrays with a leading example axis; each step draws `batch` examples
  uniformly with replacement, inside jit, so the whole data set stays on the device.
* The optimizer is AdamW (decay on weight matrices and embeddings only) after global-norm
  clipping, with linear warm-up and cosine decay.
* `TrainConfig.chunk` steps run inside one jitted `lax.scan`; the host loop between chunks only
  logs (RunLogger), checkpoints (CheckpointManager) and moves the progress
  bar. With a checkpoint manager an interrupted run resumes from its last chunk, bit-exactly.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeat_jax.config import Config, GPT2Config, PeftConfig
from fedpeat_jax.io.loop import restore_latest, run_chunks
from fedpeat_jax.model import gpt2

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], Any]

# Leaves that get weight decay: weight matrices and embeddings. Biases, LayerNorms and LoRA
# factors do not (GPT-2 / nanoGPT practice; stacked biases are 2-D, so ndim cannot tell them apart).
DECAYED_LEAVES = ("kernel", "wte", "wpe")


@dataclass(frozen=True)
class TrainConfig(Config):
    steps: int
    """Optimizer steps."""
    batch: int
    """Examples per step, drawn uniformly with replacement inside jit."""
    lr: float
    """Peak learning rate (AdamW)."""
    warmup: int = 0  # linear warm-up steps, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.1
    """Final learning rate / peak."""
    weight_decay: float = 0.0
    """AdamW weight decay (kernels and embeddings only)."""
    clip: float = 1.0  # global gradient norm; 0 disables clipping
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    chunk: int = 50  # optimizer steps per jitted call
    seed: int = 0
    """Seed of batch sampling and dropout."""

    def validate(self) -> None:
        for name in ("steps", "batch", "chunk"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"TrainConfig.warmup must be in [0, steps={self.steps}), got {self.warmup}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.weight_decay < 0 or self.clip < 0:
            raise ValueError("TrainConfig.weight_decay and TrainConfig.clip must be >= 0")

    @classmethod
    def of(cls, owner: str, **fields) -> TrainConfig:
        """The TrainConfig that config class `owner` (PretrainConfig, ...) builds from its own fields of the same
        names; its errors name `owner`'s fields, so that the command line maps them to the owner's options."""
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(str(err).replace("TrainConfig.", f"{owner}.")) from None


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.final_lr_ratio,
    )


def decay_mask(tree: PyTree) -> PyTree:
    def decayed(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED_LEAVES

    return jax.tree_util.tree_map_with_path(decayed, tree)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip > 0 else adamw


class TrainState(NamedTuple):
    step: jax.Array  # () int32, optimizer steps taken
    params: PyTree  # the trainable tree
    opt_state: PyTree
    rng: jax.Array  # raw uint32 key, so checkpoints need no typed-key handling


class TrainResult(NamedTuple):
    params: PyTree  # the trained `trainable` tree
    history: list  # one dict per chunk (means over it): step, loss, lr, grad_norm, the loss_fn's metrics
    steps_per_s: float  # training speed, compilation excluded
    seconds: float  # wall time of this call (compilation included)
    compile_seconds: float
    resumed_from: Optional[int]  # step a checkpoint resumed from, else None


def _split_loss(out):
    """(loss, metrics) from a loss_fn output (a scalar, or (scalar, dict))."""
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def _draw(data: PyTree, rng: jax.Array, batch: int) -> PyTree:
    n = jax.tree.leaves(data)[0].shape[0]
    idx = jax.random.randint(rng, (batch,), 0, n)
    return jax.tree.map(lambda x: x[idx], data)


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, sched: optax.Schedule):
    """One optimizer step on one batch: (state, frozen, batch) -> (state, metrics). Used by the
    loop (inside scan) and by `step_memory`, so the measured program is the trained one."""

    def step(state: TrainState, frozen: PyTree, batch: PyTree, rng: jax.Array):
        def objective(params):
            loss, metrics = _split_loss(loss_fn(params, frozen, batch, rng))
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=sched(state.step))
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step


class _Runner:
    """The jitted chunk of steps, compiled ahead of time once per (chunk length, argument
    shapes): compilation is timed apart from training, and runs with the same objective and
    config (e.g. the same `lm_objective`, which is cached) share one compilation."""

    def __init__(self, loss_fn: LossFn, cfg: TrainConfig):
        step = make_step(loss_fn, optimizer(cfg), schedule(cfg))

        def run(state: TrainState, frozen: PyTree, data: PyTree, n_steps: int):
            def body(state, _):
                rng, k_batch, k_loss = jax.random.split(state.rng, 3)
                return step(state._replace(rng=rng), frozen, _draw(data, k_batch, cfg.batch), k_loss)

            state, metrics = jax.lax.scan(body, state, None, length=n_steps)
            return state, jax.tree.map(jnp.mean, metrics)  # chunk means

        self._jit = jax.jit(run, static_argnames="n_steps", donate_argnums=0)
        self._compiled: dict = {}

    def compiled(self, state, frozen, data, n_steps: int):
        """(executable, seconds spent compiling it now: 0 when cached)."""
        args = (state, frozen, data)
        key = (
            n_steps,
            jax.tree.structure(args),
            tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(args)),
        )
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        self._compiled[key] = self._jit.lower(state, frozen, data, n_steps=n_steps).compile()
        return self._compiled[key], time.perf_counter() - t0


@functools.lru_cache(maxsize=64)
def _runner(loss_fn: LossFn, cfg: TrainConfig) -> _Runner:
    return _Runner(loss_fn, cfg)


def init_state(trainable: PyTree, cfg: TrainConfig) -> TrainState:
    tx = optimizer(cfg)
    # A copy: the jitted chunk donates its state, and the caller's tree must stay valid.
    params = jax.tree.map(jnp.array, trainable)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(cfg.seed))


def fit(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    data: PyTree,
    cfg: TrainConfig,
    *,
    logger=None,
    checkpoints=None,
    desc: str = "train",
    log_prefix: str = "",
    show_progress: bool = True,
) -> TrainResult:
    """Train `trainable` for `cfg.steps` steps of `loss_fn` on random batches of `data`.

    logger: a RunLogger (scalars per chunk, under `log_prefix`). checkpoints: a CheckpointManager;
    a checkpoint is written after every chunk and the latest one is resumed from (a run that was
    already complete returns at once, with an empty history).
    """
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("fit() got no training data")
    if any(x.shape[0] != leaves[0].shape[0] for x in leaves) or leaves[0].shape[0] == 0:
        raise ValueError(
            f"fit(): every data leaf needs the same, non-zero leading (example) axis; got {[x.shape for x in leaves]}"
        )
    start = time.perf_counter()
    data, frozen = jax.device_put((data, frozen))  # once, not at every chunk
    runner = _runner(loss_fn, cfg)
    state, resumed_from = restore_latest(checkpoints, init_state(trainable, cfg))
    if resumed_from is not None and resumed_from > cfg.steps:
        raise ValueError(f"checkpoint in {checkpoints.directory} is at step {resumed_from}, past cfg.steps={cfg.steps}")

    timing = {"train": 0.0, "compile": 0.0, "steps": 0}

    def advance(state, step, n):
        run, seconds = runner.compiled(state, frozen, data, n)
        t0 = time.perf_counter()
        state, metrics = run(state, frozen, data)
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}  # blocks: honest timing
        timing["train"] += time.perf_counter() - t0
        timing["compile"] += seconds
        timing["steps"] += n
        if not np.isfinite(record["loss"]):
            raise FloatingPointError(
                f"{desc}: loss became {record['loss']} by step {step + n}; lower the learning rate"
            )
        return state, [dict(record, step=step + n)]

    state, history = run_chunks(
        state,
        advance,
        start=int(state.step),
        total=cfg.steps,
        chunk=cfg.chunk,
        desc=desc,
        logger=logger,
        log_tag=lambda name: log_prefix + name,
        checkpoints=checkpoints,
        checkpoint_meta=lambda step: {"step": step, "desc": desc},
        show_progress=show_progress,
    )
    train_seconds, compile_seconds, steps_done = timing["train"], timing["compile"], timing["steps"]
    steps_per_s = steps_done / train_seconds if steps_done else float("nan")
    return TrainResult(state.params, history, steps_per_s, time.perf_counter() - start, compile_seconds, resumed_from)


def step_memory(loss_fn: LossFn, trainable: PyTree, frozen: PyTree, batch: PyTree, cfg: TrainConfig) -> dict:
    """Memory of one compiled training step, from XLA's `memory_analysis` (bytes).

    peak = arguments + outputs + temporaries - aliased (donated) buffers: everything live while
    the step runs on the device (frozen and trainable params, optimizer state, the batch,
    activations kept for the backward pass). A compile-time figure, identical on every run,
    unlike the allocator statistics a CPU backend does not expose.
    """
    tx, sched = optimizer(cfg), schedule(cfg)
    step = make_step(loss_fn, tx, sched)
    state = init_state(trainable, cfg)
    compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, batch, jax.random.PRNGKey(0)).compile()
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis of compiled programs")
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


# --------------------------------------------------------------------------------------------
# GPT-2 language modelling: the objective and the perplexity every run reports
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def lm_objective(
    model: GPT2Config,
    peft: Optional[PeftConfig] = None,
    dropout: bool = False,
    layerdrop: float = 0.0,
    layerdrop_blocks: tuple = (),
) -> LossFn:
    """Next-token loss for `fit` on batches {"tokens": (B, T)[, "mask": (B, T)]}.

    Without `peft` the trainable tree is the GPT-2 params themselves (pretraining, FT) and
    `frozen` is unused; with `peft` the trainable tree is the PEFT state and `frozen` the base
    params (an emulator or the full model). dropout=False (the default) trains deterministically:
    our runs see each token about once, where dropout only slows learning. `layerdrop` > 0 skips
    each block of `layerdrop_blocks` with that probability at every step (see `drop_blocks`).
    """

    def loss(trainable, frozen, batch, rng):
        params, state = (trainable, None) if peft is None else (frozen, trainable)
        if layerdrop > 0.0:
            rng, k_drop = jax.random.split(rng)
            params = drop_blocks(params, k_drop, layerdrop, layerdrop_blocks)
        logits = gpt2.apply(
            params, batch["tokens"], config=model, peft=state, peft_config=peft, rng=rng if dropout else None
        )
        return gpt2.lm_loss(logits, batch["tokens"], batch.get("mask"))

    return loss


def drop_blocks(params: PyTree, rng: jax.Array, rate: float, blocks: tuple) -> PyTree:
    """LayerDrop (Fan et al., 2019): skip each of `blocks` with probability `rate`.

    A block is skipped by zeroing its two output projections (attention and MLP `c_proj`, weight
    and bias), which makes both residual updates zero: the block is the identity, and none of its
    parameters gets a gradient this step. Pretraining the middle blocks this way trains the model
    to work with any subset of them, as a layer-drop emulator uses it.
    """
    n_layer = params["blocks"]["ln_1"]["scale"].shape[0]
    droppable = jnp.zeros((n_layer,), bool).at[jnp.asarray(blocks, jnp.int32)].set(True)
    keep = jnp.where(droppable, jax.random.bernoulli(rng, 1.0 - rate, (n_layer,)), True).astype(jnp.float32)

    def gate(x):
        return x * keep.reshape((n_layer,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    blocks_p = params["blocks"]
    gated = {
        **blocks_p,
        "attn": {**blocks_p["attn"], "c_proj": jax.tree.map(gate, blocks_p["attn"]["c_proj"])},
        "mlp": {**blocks_p["mlp"], "c_proj": jax.tree.map(gate, blocks_p["mlp"]["c_proj"])},
    }
    return {**params, "blocks": gated}


@functools.partial(jax.jit, static_argnames=("model", "peft", "batch"))
def _eval_nll(params, peft_state, tokens, mask, model, peft, batch):
    return gpt2.evaluate_nll(params, peft_state, tokens, mask, model, peft, batch)


def evaluate_perplexity(
    params, tokens, mask, model: GPT2Config, peft_state=None, peft: Optional[PeftConfig] = None, batch: int = 16
) -> dict:
    """Perplexity over eval windows (pads masked): {"ppl", "nll" (mean per token), "tokens", "seconds"
    (wall time, compilation included on a first call)}."""
    t0 = time.perf_counter()
    total, count = jax.device_get(
        _eval_nll(params, peft_state, jnp.asarray(tokens), jnp.asarray(mask), model, peft, batch)
    )
    seconds = time.perf_counter() - t0
    if count == 0:
        raise ValueError("evaluate_perplexity: the eval windows hold no real tokens")
    nll = float(total) / float(count)
    return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(count), "seconds": seconds}


__all__ = [
    "lm_objective",
    "evaluate_perplexity",
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "fit",
    "make_step",
    "optimizer",
    "schedule",
    "step_memory",
    "init_state",
    "decay_mask",
]
