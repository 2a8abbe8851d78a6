"""FedPEAT against its baselines on the same clients, rounds, seeds and data.

    python scripts/fedpeat_study.py                    # default foundation model: ~10 min on an idle 2-core CPU (estimate)
    python scripts/fedpeat_study.py --tiny --out runs/study_tiny      # tiny preset, a smoke run (~1 min, mostly compiling)
    python scripts/fedpeat_study.py --seeds 0 1 2 --rounds 24         # longer, several seeds

Cost of the default run (12 rounds x 16 clients x 4 local steps of 2 x 64 tokens, 5 methods): about
18 TFLOP of training and 4.7 TFLOP of held-out evaluation (33 evaluations of 8k tokens on the
full model: every `--eval-every` rounds, round 0 included, local-only once per evaluated client)
plus ~17 XLA compilations; a loaded machine (load average above the 2 cores) takes 2-3x longer.
Fewer evaluations: --eval-every 12, --local-eval-clients 2, --eval-windows 64.

Methods (every one starts from the foundation model, so round 0 is its zero-shot perplexity):

  fedpeat_lora         (1) FedPEAT: LoRA inside the adapter blocks, tuned on the l-k-r layer-drop
                           emulator (`FedPEAT`, PeftConfig kind "lora").
  fed_full_adapter     (2) federated full-adapter tuning on the same emulator: every weight of the
                           adapter blocks trained (`FedPEAT`, PeftConfig kind "full" on the adapter).
  fed_lora_full_model  (3) federated LoRA on the full model (no emulator, the device holds every
                           block), LoRA in every block: FedIT, the paper's "FT + LoRA" baseline.
  fed_full_ft          (4) federated full fine-tuning of the whole model (embeddings, every block,
                           final LayerNorm; the whole model travels both ways every round).
  local_lora           (5) local-only: FedPEAT's LoRA on the emulator, no aggregation. The cohort is
                           round 0's sampled clients (clients_per_round of them); each trains its
                           own LoRA `local_steps` steps every round, so per round the cohort does
                           the work of one federated round and every device trains every round (a
                           generous setting for local-only). Reported: the mean over the first
                           `--local-eval-clients` cohort clients of each one's plug-in perplexity
                           on the same held-out text (each client costs one full evaluation).
  fed_lora_adapter_full_model  (optional, --methods) LoRA in the adapter blocks like FedPEAT but
                           trained on the full model (emulator k = whole middle): the emulator's
                           own cost, isolated.

FedPEAT (1, 2, optional) runs the library's `FedPEAT.round`. Methods 3 and 4 train outside the
adapter, which `FedPEAT` does not express, so `FullModelFed` below repeats its round: the same
client sampling (`FedPEAT.sample` with the keys of `FedPEAT.round_keys`), client keys, local Adam
steps (`client.local_train`, or `local_train_tree`, its copy for a whole-model trainable tree),
example-weighted FedAvg and server update (`aggregate.fedavg`, `aggregate.server_update`). Every run
checks that this loop, given FedPEAT's own emulator and LoRA, reproduces `FedPEAT.round`
(`consistency_check`, recorded as `full_model_loop_check`).

Reported per method: held-out plug-in perplexity (the tuned parameters in the full model, on the
task's held-out Folio plays) after the rounds and its curve; bytes sent per device per round (up
and down, float32: `FedPEAT.bytes_per_round` or 4 x trainable parameters) and the one-time
download of the frozen part; parameters held on the device and the peak memory of one compiled
local step (`peat.train.step_memory`: XLA memory analysis of an Adam step, batch `local_batch`);
model FLOPs per client per round from the token count and the measured wall time of a simulated
round (all clients, compile excluded, median over rounds); trainable parameters; and the MEC
system model's round latency (`mec/system.py`) for a typical device at the environment's default
parameters (see `mec_latency`).

Writes <out>.json, <out>.md and <out>.png (default benchmarks/results/fedpeat_study).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402
from fedpeat_jax import peft as peft_lib  # noqa: E402
from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig  # noqa: E402
from fedpeat_jax.fed import aggregate  # noqa: E402
from fedpeat_jax.fed.client import Hyper, batch_loss, client_optimizer, local_steps, local_train  # noqa: E402
from fedpeat_jax.fed.simulation import FedData, FedPEAT  # noqa: E402
from fedpeat_jax.io.plots import pyplot  # noqa: E402
from fedpeat_jax.mec import system  # noqa: E402
from fedpeat_jax.mec.env import EnvParams  # noqa: E402
from fedpeat_jax.model import gpt2  # noqa: E402
from fedpeat_jax.peat import emulator as emu  # noqa: E402
from fedpeat_jax.peat.train import TrainConfig, lm_objective, step_memory  # noqa: E402

NAME = "fedpeat_study"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / NAME
METHODS = ("fedpeat_lora", "fed_full_adapter", "fed_lora_full_model", "fed_full_ft", "local_lora")
OPTIONAL_METHODS = ("fed_lora_adapter_full_model",)
LABELS = {
    "fedpeat_lora": "(1) FedPEAT: LoRA in adapter, emulator",
    "fed_full_adapter": "(2) full adapter, emulator",
    "fed_lora_full_model": "(3) LoRA every block, full model",
    "fed_full_ft": "(4) full fine-tuning, full model",
    "local_lora": "(5) local-only LoRA, emulator",
    "fed_lora_adapter_full_model": "LoRA in adapter, full model",
}
BYTES_PER_PARAM = 4  # float32, as FedPEAT.bytes_per_round counts


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    preset: str = "default"
    seq_len: int = 64
    max_examples: int = 16  # windows per client (the quickstart's task)
    eval_windows: int = 128  # held-out windows (the quickstart's task)
    rounds: int = 12  # the quickstart's FedPEAT stage: 12 rounds x 16 clients x 4 local steps, lr 3e-3, LoRA r 8 / alpha 16
    clients_per_round: int = 16
    local_steps: int = 4
    local_batch: int = 2
    lr_lora: float = 3e-3  # the quickstart's FedPEAT client lr
    lr_full: float = 3e-4  # full-weight tuning (the offsite table's FT / full-adapter lr)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    l: int = 2
    k: int = 2
    r: int = 2
    eval_every: int = 4  # held-out evaluations cost about as much as a round: every 4th round, and round 0
    eval_batch: int = 16
    local_eval_clients: int = 4  # 0: every cohort client
    seeds: tuple = (0,)
    methods: tuple = METHODS

    @classmethod
    def tiny(cls, **overrides) -> "StudyConfig":
        base = dict(preset="tiny", seq_len=32, max_examples=8, eval_windows=16, rounds=2, clients_per_round=2, local_steps=2,
                    lora_rank=4, lora_alpha=8.0, k=1, eval_every=1, eval_batch=8, local_eval_clients=2)
        return cls(**{**base, **overrides})


# --------------------------------------------------------------------------------------------
# Federated tuning of a whole-model tree (what FedPEAT, tied to the adapter, does not express)
# --------------------------------------------------------------------------------------------
class RunState(NamedTuple):
    tree: Any  # the global trainable tree
    opt_state: Any  # server optimizer state
    round: jax.Array  # () int32
    key: jax.Array  # the run key: FedPEAT.round_keys(state) reads .key and .round


class RoundInfo(NamedTuple):
    loss: jax.Array
    participants: jax.Array


def local_train_tree(frozen, global_tree, tokens, mask, count, rng, hyper: Hyper, *, loss: Callable, fed: FedConfig, n_steps: int, batch: int):
    """`client.local_train` for any trainable tree: `loss(tree, frozen, tokens, mask, key)`, with
    the library's own local steps (sampling, step keys, client optimizer; FedAvg, no prox or
    SCAFFOLD); `consistency_check` runs it on FedPEAT's LoRA against `FedPEAT.round`. Returns
    (tree, mean loss over the steps).
    """
    return local_steps(lambda tree, tok, msk, key: loss(tree, frozen, tok, msk, key), global_tree, tokens, mask, count, rng,
                       client_optimizer(fed, hyper.client_lr), n_steps=n_steps, batch=batch)


def whole_model_loss(model: GPT2Config):
    """Next-token loss with the whole GPT-2 params as the trainable tree (full fine-tuning)."""

    def loss(tree, frozen, tokens, mask, key):
        return batch_loss(tree, None, tokens, mask, key, model, None)

    return loss


def peft_loss(model: GPT2Config, peft: PeftConfig):
    """Next-token loss of a PEFT state on a frozen base (what `local_train` optimizes)."""

    def loss(tree, frozen, tokens, mask, key):
        return batch_loss(frozen, tree, tokens, mask, key, model, peft)

    return loss


class FullModelFed:
    """Federated tuning of `init_tree(key)` with `FedPEAT.round`'s sampling, keys, local steps and
    FedAvg (single emulator level, FedAvg server optimizer, no DP/robust/SCAFFOLD/server).

    ref:      a FedPEAT with the same FedConfig (its `sample` draws the clients)
    frozen:   the frozen tree each client's loss sees (None for full fine-tuning)
    local_fn: (frozen, global_tree, tokens, mask, count, key, hyper) -> (tree, loss)
    """

    def __init__(self, ref: FedPEAT, frozen, init_tree: Callable, local_fn: Callable):
        fed = ref.fed
        if len(fed.emulator_levels) != 1 or fed.server_participation or fed.dp_clip is not None or fed.aggregation != "mean" or fed.algorithm != "fedavg":
            raise ValueError("FullModelFed repeats FedPEAT.round for one level, FedAvg, no server, DP, robust aggregation or SCAFFOLD")
        self.ref, self.fed, self.frozen, self.init_tree, self.local_fn = ref, fed, frozen, init_tree, local_fn

    def init(self, key: jax.Array, hyper: Hyper) -> RunState:
        k_tree, k_run = jax.random.split(key)  # as FedPEAT.init
        tree = self.init_tree(k_tree)
        tx = aggregate.server_optimizer(self.fed.server_optimizer, hyper.server_lr)
        return RunState(tree, tx.init(tree), jnp.zeros((), jnp.int32), k_run)

    def round(self, state: RunState, data: FedData, hyper: Hyper):
        k_sample, k_train, _, _ = FedPEAT.round_keys(state)
        (ids, ok), = self.ref.sample(k_sample, data.levels)
        keys = FedPEAT.client_keys(k_train, 0, ids.shape[0])
        trees, losses = jax.vmap(self.local_fn, in_axes=(None, None, 0, 0, 0, 0, None))(
            self.frozen, state.tree, data.tokens[ids], data.mask[ids], data.counts[ids], keys, hyper
        )
        counts = data.counts[ids].astype(jnp.float32)
        agg = aggregate.fedavg(aggregate.client_deltas(trees, state.tree), counts, ok.astype(jnp.float32))
        tx = aggregate.server_optimizer(self.fed.server_optimizer, hyper.server_lr)
        tree, opt_state = aggregate.server_update(tx, state.tree, state.opt_state, agg.mean, agg.empty)
        used = agg.weights > 0
        n_used = used.sum()
        loss = jnp.where(n_used > 0, jnp.sum(jnp.where(used, losses, 0.0)) / jnp.maximum(n_used, 1), jnp.nan)
        return RunState(tree, opt_state, state.round + 1, state.key), RoundInfo(loss, n_used.astype(jnp.int32))


class LocalState(NamedTuple):
    trees: Any  # per-client PEFT states, leading cohort axis
    ids: jax.Array  # (C,) the cohort's client ids
    valid: jax.Array  # (C,) bool
    round: jax.Array
    key: jax.Array


class LocalOnly:
    """Each cohort client tunes FedPEAT's LoRA on its emulator with its own data, never aggregated."""

    def __init__(self, sim: FedPEAT):
        if len(sim.fed.emulator_levels) != 1:
            raise ValueError("LocalOnly uses one emulator level")
        self.sim = sim
        self.base = jax.jit(emu.build, static_argnums=1)(sim.params, sim.specs[0])
        self.train = lambda *a: local_train(
            *a, model=sim.specs[0].emulator_config(sim.model), peft=sim.peft_emulators[0], fed=sim.fed,
            n_steps=sim.fed.local_steps, batch=sim.fed.local_batch,
        )

    def init(self, key: jax.Array, hyper: Hyper, data: FedData) -> LocalState:
        state = self.sim.init(key, hyper)  # FedPEAT's own LoRA init and run key
        (ids, ok), = self.sim.sample(FedPEAT.round_keys(state)[0], data.levels)  # round 0's clients
        trees = jax.tree.map(lambda x: jnp.broadcast_to(x, (ids.shape[0],) + x.shape), state.peft)
        return LocalState(trees, ids, ok, state.round, state.key)

    def round(self, state: LocalState, data: FedData, hyper: Hyper):
        _, k_train, _, _ = FedPEAT.round_keys(state)
        keys = FedPEAT.client_keys(k_train, 0, state.ids.shape[0])
        ids = state.ids
        res = jax.vmap(self.train, in_axes=(None, 0, 0, 0, 0, 0, None))(
            self.base, state.trees, data.tokens[ids], data.mask[ids], data.counts[ids], keys, hyper
        )
        keep = lambda new, old: jnp.where(state.valid.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
        trees = jax.tree.map(keep, res.peft, state.trees)
        n = state.valid.sum()
        loss = jnp.sum(jnp.where(state.valid, res.loss, 0.0)) / jnp.maximum(n, 1)
        return LocalState(trees, ids, state.valid, state.round + 1, state.key), RoundInfo(loss, n.astype(jnp.int32))


# --------------------------------------------------------------------------------------------
# Methods: how each is built, run, evaluated and costed
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Method:
    key: str
    description: str
    hyper: Hyper
    lr: float
    init: Callable  # (seed, data) -> state (jitted: one compile instead of many eager ops)
    round: Callable  # (state, data, hyper) -> (state, info with .loss, .participants)
    eval: Callable  # (state, tokens, mask) -> (totals (E,), counts (E,)) one row per evaluated model
    trainable_params: int
    on_device_params: int
    bytes_up: int  # per device per round
    bytes_down: int
    one_time_download_bytes: int  # the frozen part a device must hold before its first round
    clients_per_round: int  # devices that train in one simulated round
    depth: int  # blocks the device runs
    emulator: str
    mem_args: Callable  # state -> (objective, trainable, frozen) of one local step, for step_memory
    mec_k: int  # middle blocks the device holds (MEC model)
    lora_params: int  # LoRA factor parameters (FLOPs)
    trained_matmul: int  # trained dense weights (their weight gradients: FLOPs)
    aggregated: bool = True


def n_params(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def study_fed_config(cfg: StudyConfig) -> FedConfig:
    """The FedConfig every method shares (client lr and emulator level set per method)."""
    return FedConfig(clients_per_round=cfg.clients_per_round, rounds=cfg.rounds, local_steps=cfg.local_steps, local_batch=cfg.local_batch,
                     client_lr=cfg.lr_lora, adapter_l=cfg.l, adapter_r=cfg.r, emulator_levels=(cfg.k,), log_lora_gap=False,
                     eval_batch=cfg.eval_batch)


def study_lora(cfg: StudyConfig) -> PeftConfig:
    return PeftConfig(kind="lora", lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)


def fedpeat_method(key: str, params, model: GPT2Config, fed: FedConfig, peft: PeftConfig, n_clients: int, description: str) -> tuple:
    """(sim, Method) of a method the library's FedPEAT runs."""
    sim = FedPEAT(params, model, peft, fed, n_clients=n_clients)
    spec = sim.specs[0]
    hyper = Hyper.from_config(fed)
    emulator_params = jax.jit(emu.build, static_argnums=1)(params, spec)
    trainable = n_params(jax.eval_shape(lambda: sim.init(jax.random.key(0), hyper).peft))
    on_device = n_params(emulator_params) + (0 if peft.kind == "full" else trainable)  # "full": adapter trained in place
    sent = sim.bytes_per_round(1)
    objective = lm_objective(spec.emulator_config(model), sim.peft_emulators[0])
    return sim, Method(
        key=key, description=description, hyper=hyper, lr=fed.client_lr,
        init=jax.jit(lambda seed, data: sim.init(jax.random.key(seed), hyper)),
        round=sim.round,
        eval=lambda s, tok, msk: jax.tree.map(lambda x: x[None], sim.eval_nll(s, tok, msk)),
        trainable_params=trainable, on_device_params=on_device, bytes_up=int(sent["bytes_up"]), bytes_down=int(sent["bytes_down"]),
        one_time_download_bytes=BYTES_PER_PARAM * (on_device - trainable), clients_per_round=fed.clients_per_round,
        depth=spec.depth, emulator=spec.name,
        mem_args=lambda s: (objective, s.peft, emulator_params),  # a PEFT state has the same shapes on emulator and full model
        mec_k=spec.k, lora_params=trainable if peft.kind == "lora" else 0, trained_matmul=trainable if peft.kind == "full" else 0,
    )


def lora_full_model_method(ref: FedPEAT, params, model: GPT2Config, fed: FedConfig, lora: PeftConfig, eval_batch: int) -> Method:
    """(3) LoRA in every block of the full model (FedIT), outside FedPEAT's adapter placement."""
    lora_all = lora.replace(layers=None)
    hyper = Hyper.from_config(fed)

    def local_fn(frozen, global_tree, tokens, mask, count, key, hyper):
        res = local_train(frozen, global_tree, tokens, mask, count, key, hyper, model=model, peft=lora_all, fed=fed,
                          n_steps=fed.local_steps, batch=fed.local_batch)
        return res.peft, res.loss

    runner = FullModelFed(ref, params, lambda k: peft_lib.init(k, params, model, lora_all), local_fn)
    trainable = n_params(jax.eval_shape(lambda: runner.init_tree(jax.random.key(0))))
    full = model.param_count()
    objective = lm_objective(model, lora_all)
    return Method(
        key="fed_lora_full_model", description=f"LoRA r={lora.lora_rank} in every block, tuned on the full model (no emulator)",
        hyper=hyper, lr=fed.client_lr,
        init=jax.jit(lambda seed, data: runner.init(jax.random.key(seed), hyper)),
        round=runner.round,
        eval=lambda s, tok, msk: jax.tree.map(lambda x: x[None], gpt2.evaluate_nll(params, s.tree, tok, msk, model, lora_all, eval_batch)),
        trainable_params=trainable, on_device_params=full + trainable,
        bytes_up=BYTES_PER_PARAM * trainable, bytes_down=BYTES_PER_PARAM * trainable,
        one_time_download_bytes=BYTES_PER_PARAM * full, clients_per_round=fed.clients_per_round,
        depth=model.n_layer, emulator="none (full model)",
        mem_args=lambda s: (objective, s.tree, params),
        mec_k=model.n_layer - fed.adapter_l - fed.adapter_r, lora_params=trainable, trained_matmul=0,
    )


def full_ft_method(ref: FedPEAT, params, model: GPT2Config, fed: FedConfig, eval_batch: int) -> Method:
    """(4) Full fine-tuning: the whole GPT-2 params tree is the trainable tree."""
    hyper = Hyper.from_config(fed)
    loss = whole_model_loss(model)

    def local_fn(frozen, global_tree, tokens, mask, count, key, hyper):
        return local_train_tree(frozen, global_tree, tokens, mask, count, key, hyper, loss=loss, fed=fed, n_steps=fed.local_steps,
                                batch=fed.local_batch)

    runner = FullModelFed(ref, None, lambda k: jax.tree.map(jnp.array, params), local_fn)
    full = model.param_count()
    objective = lm_objective(model, None)
    return Method(
        key="fed_full_ft", description="every parameter of the model (embeddings, blocks, final LayerNorm), the whole model sent both ways",
        hyper=hyper, lr=fed.client_lr,
        init=jax.jit(lambda seed, data: runner.init(jax.random.key(seed), hyper)),
        round=runner.round,
        eval=lambda s, tok, msk: jax.tree.map(lambda x: x[None], gpt2.evaluate_nll(s.tree, None, tok, msk, model, None, eval_batch)),
        trainable_params=full, on_device_params=full,
        bytes_up=BYTES_PER_PARAM * full, bytes_down=BYTES_PER_PARAM * full,
        one_time_download_bytes=0, clients_per_round=fed.clients_per_round, depth=model.n_layer, emulator="none (full model)",
        mem_args=lambda s: (objective, s.tree, None),
        mec_k=model.n_layer - fed.adapter_l - fed.adapter_r, lora_params=0,
        trained_matmul=model.n_layer * model.block_param_count() + model.vocab_size * model.n_embd,
    )


def local_only_method(sim: FedPEAT, base: Method, n_eval: int, eval_batch: int) -> Method:
    """(5) FedPEAT's LoRA on the emulator, each cohort client on its own: nothing is sent."""
    local = LocalOnly(sim)

    def local_eval(s, tok, msk):
        trees = jax.tree.map(lambda x: x[:n_eval], s.trees)
        return jax.vmap(lambda t: gpt2.evaluate_nll(sim.params, t, tok, msk, sim.model, sim.peft_full, eval_batch))(trees)

    n = sim.fed.clients_per_round
    return dataclasses.replace(
        base, key="local_lora",
        description=f"FedPEAT's LoRA on the {sim.specs[0].name} emulator, each of round 0's {n} clients alone every round, no aggregation; "
                    f"perplexity: mean over {n_eval} of them",
        init=jax.jit(lambda seed, data: local.init(jax.random.key(seed), base.hyper, data)),
        round=local.round, eval=local_eval,
        mem_args=lambda s: base.mem_args(SimpleNamespace(peft=jax.tree.map(lambda x: x[0], s.trees))),
        bytes_up=0, bytes_down=0, aggregated=False,
    )


def build_methods(cfg: StudyConfig, params, model: GPT2Config, data: FedData) -> tuple:
    """({method key: Method} in the order of cfg.methods, the FedPEAT of method (1): the reference)."""
    n_clients = int(data.tokens.shape[0])
    n_middle = model.n_layer - cfg.l - cfg.r
    fed = study_fed_config(cfg)
    lora = study_lora(cfg)
    spec_name = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, cfg.k).name
    full_name = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, n_middle).name
    methods = {}
    ref, methods["fedpeat_lora"] = fedpeat_method("fedpeat_lora", params, model, fed, lora, n_clients,
                                                  f"LoRA r={cfg.lora_rank} in the adapter blocks, tuned on the {spec_name} layer-drop emulator")
    if "fed_full_adapter" in cfg.methods:
        _, methods["fed_full_adapter"] = fedpeat_method("fed_full_adapter", params, model, fed.replace(client_lr=cfg.lr_full), PeftConfig(kind="full"),
                                                        n_clients, f"every weight of the adapter blocks, tuned on the {spec_name} emulator")
    if "fed_lora_full_model" in cfg.methods:
        methods["fed_lora_full_model"] = lora_full_model_method(ref, params, model, fed, lora, cfg.eval_batch)
    if "fed_full_ft" in cfg.methods:
        methods["fed_full_ft"] = full_ft_method(ref, params, model, fed.replace(client_lr=cfg.lr_full), cfg.eval_batch)
    if "local_lora" in cfg.methods:
        n_eval = cfg.clients_per_round if cfg.local_eval_clients == 0 else min(cfg.local_eval_clients, cfg.clients_per_round)
        methods["local_lora"] = local_only_method(ref, methods["fedpeat_lora"], n_eval, cfg.eval_batch)
    if "fed_lora_adapter_full_model" in cfg.methods:
        _, methods["fed_lora_adapter_full_model"] = fedpeat_method(
            "fed_lora_adapter_full_model", params, model, fed.replace(emulator_levels=(n_middle,)), lora, n_clients,
            f"LoRA r={cfg.lora_rank} in the adapter blocks, tuned on the full model ({full_name}: no layer dropped)")
    return {k: methods[k] for k in cfg.methods}, ref


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------
def flops_per_token(model: GPT2Config, depth: int, seq_len: int, trained_matmul: int, lora_params: int) -> float:
    """Training FLOPs per token (as benchmarks/fl_throughput.py): forward and activation gradients
    through every block and the tied LM head (4 N), weight gradients of trained dense weights
    (2 per weight), attention scores (12 L T d) and LoRA's own matmuls (6 per factor weight)."""
    n_matmul = depth * model.block_param_count() + model.vocab_size * model.n_embd
    return 4.0 * n_matmul + 2.0 * trained_matmul + 12.0 * depth * seq_len * model.n_embd + 6.0 * lora_params


def env_device_defaults() -> dict:
    """The FedPEAT-MEC environment's default radio and device numbers (EnvParams field defaults)."""
    fields = EnvParams.__dataclass_fields__
    names = ("n_devices", "cell_radius", "bandwidth_hz", "noise_psd_w_hz", "device_power_w", "bs_power_w", "pl_const_db", "pl_exp_db",
             "flops_min", "flops_max", "utilization", "q_bits")
    return {n: float(fields[n].default) for n in names}


def mec_latency(m: Method, model: GPT2Config, cfg: StudyConfig, env: dict) -> dict:
    """Round latency of a typical device under the MEC system model (mec/system.py), as the
    environment's `reference_latency` places it: median distance R / sqrt(2), unit fading, the
    mean compute speed, an equal 1 / n_devices bandwidth share; this study's workload
    (local_steps x local_batch x seq_len tokens); payloads at q_bits per parameter."""
    p_emb, p_blk, n_adapter = model.embedding_param_count(), model.block_param_count(), cfg.l + cfg.r
    p_dev = float(system.device_param_count(m.mec_k, p_emb, p_blk, n_adapter))
    p_sent = float(m.trainable_params) if m.aggregated else 0.0
    q = env["q_bits"]
    gain = float(system.channel_gain(1.0, env["cell_radius"] / math.sqrt(2.0), env["pl_const_db"], env["pl_exp_db"]))
    beta = 1.0 / env["n_devices"]
    r_dl = float(system.downlink_rate(beta, gain, env["bandwidth_hz"], env["bs_power_w"], env["noise_psd_w_hz"]))
    r_ul = float(system.uplink_rate(beta, gain, env["bandwidth_hz"], env["device_power_w"], env["noise_psd_w_hz"]))
    tokens = system.tokens_per_round(cfg.local_steps, cfg.local_batch, cfg.seq_len)
    fpt = float(system.flops_per_token(p_dev, float(m.trainable_params)))
    t_cmp = float(system.compute_time(tokens, fpt, 0.5 * (env["flops_min"] + env["flops_max"]), env["utilization"]))
    s_emu = float(system.emulator_bits(m.mec_k, p_emb, p_blk, n_adapter, q))
    s_peft = float(system.peft_bits(p_sent, q))
    steady = float(system.device_latency(0.0, s_emu, s_peft, r_dl, t_cmp, r_ul, 1.0))
    first = float(system.device_latency(1.0, s_emu, s_peft, r_dl, t_cmp, r_ul, 1.0))
    memory = float(system.device_memory_bytes(m.mec_k, p_emb, p_blk, n_adapter, float(m.trainable_params), q, cfg.local_batch, cfg.seq_len,
                                              model.n_embd, model.n_head))
    return {"latency_s": steady, "first_round_latency_s": first, "download_s": s_peft / r_dl, "compute_s": t_cmp, "upload_s": s_peft / r_ul,
            "emulator_download_s": s_emu / r_dl, "rate_dl_bps": r_dl, "rate_ul_bps": r_ul, "device_params": p_dev, "payload_bits": s_peft,
            "emulator_bits": s_emu, "memory_bytes": memory}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _ppl(totals, counts) -> np.ndarray:
    totals, counts = np.asarray(totals, np.float64), np.asarray(counts, np.float64)
    return np.exp(totals / np.maximum(counts, 1.0))


def _shapes(tree) -> tuple:
    return (jax.tree.structure(tree), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(tree)))


def run_method(m: Method, cfg: StudyConfig, model: GPT2Config, data: FedData, heldout, log, memory_cache: Optional[dict] = None,
               compiled: Optional[dict] = None) -> dict:
    """Compile, measure memory, run every seed with evaluations; returns the method's results."""
    tok, msk = heldout
    eval_rounds = sorted({r for r in range(cfg.eval_every, cfg.rounds + 1, cfg.eval_every)} | {cfg.rounds})
    state = m.init(cfg.seeds[0], data)
    t0 = time.perf_counter()
    round_c = jax.jit(m.round).lower(state, data, m.hyper).compile()
    round_compile = time.perf_counter() - t0
    if compiled is not None:
        compiled[m.key] = round_c
    t0 = time.perf_counter()
    eval_c = jax.jit(m.eval).lower(state, tok, msk).compile()
    eval_compile = time.perf_counter() - t0
    round_memory = round_c.memory_analysis()

    objective, trainable, frozen = m.mem_args(state)
    example = {"tokens": data.tokens[0, : cfg.local_batch], "mask": data.mask[0, : cfg.local_batch]}
    tcfg = TrainConfig(steps=2, batch=cfg.local_batch, lr=m.lr, weight_decay=0.0, clip=0.0)  # plain Adam, as the clients
    memory_key = (objective, _shapes(trainable), _shapes(frozen), tcfg)
    memory_cache = {} if memory_cache is None else memory_cache
    if memory_key not in memory_cache:  # local-only runs FedPEAT's very step: compile it once
        memory_cache[memory_key] = step_memory(objective, trainable, frozen, example, tcfg)
    memory = memory_cache[memory_key]

    runs, round_seconds, eval_seconds = [], [], []
    for seed in cfg.seeds:
        state = m.init(seed, data)
        curve = [{"round": 0, "ppl": float(np.mean(_ppl(*jax.device_get(eval_c(state, tok, msk)))))}]  # the untuned model: zero-shot
        losses = []
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            state, info = round_c(state, data, m.hyper)
            jax.block_until_ready(state)
            round_seconds.append(time.perf_counter() - t0)
            losses.append(float(info.loss))
            if r in eval_rounds:
                t0 = time.perf_counter()
                totals, counts = jax.device_get(eval_c(state, tok, msk))
                eval_seconds.append(time.perf_counter() - t0)
                ppls = _ppl(totals, counts)
                point = {"round": r, "ppl": float(np.mean(ppls)), "train_loss": losses[-1]}
                if len(ppls) > 1:
                    point["client_ppl"] = [float(p) for p in ppls]
                curve.append(point)
                log(f"  {m.key} seed {seed} round {r}: loss {losses[-1]:.3f}, plug-in ppl {point['ppl']:.2f}")
        runs.append({"seed": seed, "curve": curve, "train_loss": losses, "final_ppl": curve[-1]["ppl"]})

    finals = [run["final_ppl"] for run in runs]
    rounds_axis = [p["round"] for p in runs[0]["curve"]]
    mean_curve = [{"round": rd, "ppl": float(np.mean([run["curve"][i]["ppl"] for run in runs]))} for i, rd in enumerate(rounds_axis)]
    tokens_client = cfg.local_steps * cfg.local_batch * cfg.seq_len
    fpt = flops_per_token(model, m.depth, cfg.seq_len, m.trained_matmul, m.lora_params)
    median_round = statistics.median(round_seconds)
    flops_round = fpt * tokens_client * m.clients_per_round
    return {
        "label": LABELS[m.key],
        "description": m.description,
        "emulator": m.emulator,
        "client_lr": m.lr,
        "aggregated": m.aggregated,
        "trainable_params": m.trainable_params,
        "on_device_params": m.on_device_params,
        "on_device_param_bytes": BYTES_PER_PARAM * m.on_device_params,
        "bytes_up_per_device_per_round": m.bytes_up,
        "bytes_down_per_device_per_round": m.bytes_down,
        "one_time_download_bytes": m.one_time_download_bytes,
        "step_memory": memory,
        "peak_step_memory_mb": memory["peak_bytes"] / 2**20,
        "tokens_per_client_per_round": tokens_client,
        "flops_per_token": fpt,
        "flops_per_client_per_round": fpt * tokens_client,
        "clients_per_round": m.clients_per_round,
        "round_seconds": round_seconds,
        "round_seconds_median": median_round,
        "round_gflops_per_s": flops_round / median_round / 1e9,
        "eval_seconds_median": statistics.median(eval_seconds) if eval_seconds else None,
        "compile_seconds": {"round": round_compile, "eval": eval_compile},
        "round_program_peak_mb": None if round_memory is None else (round_memory.argument_size_in_bytes + round_memory.output_size_in_bytes
                                                                    + round_memory.temp_size_in_bytes - round_memory.alias_size_in_bytes) / 2**20,
        "final_ppl": float(np.mean(finals)),
        "final_ppl_std": float(np.std(finals)) if len(finals) > 1 else None,
        "curve": mean_curve,
        "runs": runs,
    }


def consistency_check(ref: FedPEAT, m: Method, round_compiled, data: FedData, seed: int) -> dict:
    """Does `FullModelFed` + `local_train_tree` (how methods 3 and 4 run) reproduce `FedPEAT.round`?
    Both run one round from the same state on FedPEAT's own emulator and LoRA; relative max
    difference of the new global state, and of the mean training loss."""
    spec = ref.specs[0]
    loss = peft_loss(spec.emulator_config(ref.model), ref.peft_emulators[0])
    fed = ref.fed

    def local_fn(frozen, global_tree, tokens, mask, count, key, hyper):
        return local_train_tree(frozen, global_tree, tokens, mask, count, key, hyper, loss=loss, fed=fed, n_steps=fed.local_steps,
                                batch=fed.local_batch)

    runner = FullModelFed(ref, jax.jit(emu.build, static_argnums=1)(ref.params, spec), None, local_fn)
    state = m.init(seed, data)
    mine = RunState(state.peft, state.opt_state, state.round, state.key)
    ref_state, ref_info = round_compiled(state, data, m.hyper)
    my_state, my_info = jax.jit(runner.round)(mine, data, m.hyper)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref_state.peft), jax.tree.leaves(my_state.tree)))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref_state.peft))
    rel = diff / max(scale, 1e-30)
    loss_diff = abs(float(ref_info.loss) - float(my_info.loss))
    same_clients = int(ref_info.participants) == int(my_info.participants)
    return {"max_abs_diff": diff, "relative_diff": rel, "loss_diff": loss_diff, "same_participants": same_clients,
            "passed": bool(rel < 1e-4 and loss_diff < 1e-4 and same_clients)}


def run_study(cfg: StudyConfig, *, cache_dir=None, log=print) -> dict:
    from fedpeat_jax.peat.foundation import load_foundation
    from fedpeat_jax.tasks import TaskConfig, build_task

    start = time.perf_counter()
    machine = machine_info()
    fm = load_foundation(cfg.preset, cache_dir=cache_dir, show_progress=False)
    model = fm.config.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)  # deterministic tuning, as `fedpeat tune`
    if cfg.seq_len > model.n_positions:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's n_positions {model.n_positions}")
    task = build_task(TaskConfig(seq_len=cfg.seq_len, max_examples=cfg.max_examples, max_eval_windows=cfg.eval_windows, seed=cfg.seeds[0]),
                      fm.tokenizer, cache_dir=cache_dir)
    data = task.train
    heldout = (jnp.asarray(task.heldout[0], jnp.int32), jnp.asarray(task.heldout[1], jnp.float32))
    params = fm.params
    zs_total, zs_count = jax.device_get(jax.jit(lambda p, t, m: gpt2.evaluate_nll(p, None, t, m, model, None, cfg.eval_batch))(params, *heldout))
    zero_shot = float(_ppl(zs_total, zs_count))
    log(f"{cfg.preset}: {model.param_count():,} parameters; {int(data.tokens.shape[0])} clients; held-out zero-shot perplexity {zero_shot:.2f}")

    methods, ref = build_methods(cfg, params, model, data)
    env = env_device_defaults()
    results, memory_cache, compiled = {}, {}, {}
    for key, m in methods.items():
        log(f"[{key}] {m.description}")
        t0 = time.perf_counter()
        results[key] = run_method(m, cfg, model, data, heldout, log, memory_cache, compiled)
        results[key]["mec"] = mec_latency(m, model, cfg, env)
        results[key]["wall_seconds"] = time.perf_counter() - t0
        log(f"[{key}] final plug-in ppl {results[key]['final_ppl']:.2f}, {results[key]['round_seconds_median']:.2f} s/round, "
            f"{results[key]['wall_seconds']:.0f} s in all")
    check = None
    if {"fed_lora_full_model", "fed_full_ft"} & set(methods):
        check = consistency_check(ref, methods["fedpeat_lora"], compiled["fedpeat_lora"], data, cfg.seeds[0])
        log(f"full-model loop vs FedPEAT.round on FedPEAT's LoRA: relative difference {check['relative_diff']:.2e}, "
            f"{'PASSED' if check['passed'] else 'FAILED: methods 3 and 4 are not run like FedPEAT'}")

    spec = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, cfg.k)
    return {
        "name": NAME,
        "config": dataclasses.asdict(cfg),
        "model": {"preset": cfg.preset, "params": model.param_count(), "n_layer": model.n_layer, "n_embd": model.n_embd, "n_head": model.n_head,
                  "vocab_size": model.vocab_size, "foundation": str(fm.path.name), "modern_heldout_ppl": fm.info.get("heldout_ppl")},
        "emulator": {"name": spec.name, "middle_ids": list(spec.middle_ids), "adapter_ids": list(spec.adapter_ids), "depth": spec.depth},
        "task": {"clients": int(data.tokens.shape[0]), "client_tokens": int(task.n_tokens), "seq_len": cfg.seq_len,
                 "heldout_windows": int(heldout[0].shape[0]), "heldout_tokens": int(np.asarray(heldout[1])[:, 1:].sum()),
                 "heldout": "the held-out plays in First Folio spelling (TaskConfig default)"},
        "zero_shot_ppl": zero_shot,
        "full_model_loop_check": check,
        "mec_parameters": {**env, "distance_m": env["cell_radius"] / math.sqrt(2.0), "fading": 1.0, "bandwidth_share": 1.0 / env["n_devices"],
                           "flops_per_s": 0.5 * (env["flops_min"] + env["flops_max"]), "tokens_per_round": cfg.local_steps * cfg.local_batch * cfg.seq_len},
        "methods": results,
        "machine": machine,
        "loadavg_start": machine.get("loadavg_1_5_15"),
        "loadavg_end": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def _mib(b) -> str:
    return f"{b / 2**20:,.2f}"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def to_markdown(res: dict) -> str:
    cfg, mth = res["config"], res["methods"]
    load = lambda v: ", ".join(f"{x:.2f}" for x in v) if v else "n/a"  # noqa: E731
    lines = [
        "# FedPEAT against its baselines",
        "",
        f"Foundation model `{res['model']['preset']}` ({res['model']['params']:,} parameters, {res['model']['n_layer']} blocks); "
        f"emulator {res['emulator']['name']} (middle blocks {res['emulator']['middle_ids']}, adapter blocks {res['emulator']['adapter_ids']}). "
        f"{res['task']['clients']} Folio-spelling (play, role) clients; every method: {cfg['rounds']} rounds x {cfg['clients_per_round']} clients, "
        f"{cfg['local_steps']} local Adam steps of {cfg['local_batch']} x {cfg['seq_len']} tokens, FedAvg, seeds {list(cfg['seeds'])}, the same "
        f"clients each round. Plug-in perplexity on {res['task']['heldout_tokens']:,} tokens of held-out plays "
        f"(zero-shot {res['zero_shot_ppl']:.2f}; every method starts there).",
        "",
        "| method | trainable params | plug-in ppl | up / down per device per round | one-time download | on-device params | "
        "step peak MiB | GFLOP per client-round | round s | MEC latency s (first round) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, m in mth.items():
        ppl = f"{m['final_ppl']:.2f}" + (f" ± {m['final_ppl_std']:.2f}" if m.get("final_ppl_std") is not None else "")
        lines.append(
            f"| {m['label']} | {m['trainable_params']:,} | {ppl} | {_mib(m['bytes_up_per_device_per_round'])} / "
            f"{_mib(m['bytes_down_per_device_per_round'])} MiB | {_mib(m['one_time_download_bytes'])} MiB | "
            f"{m['on_device_params']:,} | {m['peak_step_memory_mb']:.1f} | {m['flops_per_client_per_round'] / 1e9:.2f} | "
            f"{m['round_seconds_median']:.2f} | {m['mec']['latency_s']:.3g} ({m['mec']['first_round_latency_s']:.3g}) |"
        )
    keys = list(mth)
    rounds = [p["round"] for p in mth[keys[0]]["curve"]]
    lines += ["", "Plug-in perplexity over rounds:", "", "| round | " + " | ".join(mth[k]["label"] for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for i, rd in enumerate(rounds):
        lines.append(f"| {rd} | " + " | ".join(f"{mth[k]['curve'][i]['ppl']:.2f}" for k in keys) + " |")
    mec = res["mec_parameters"]
    machine = res["machine"]
    lines += [
        "",
        "Methods:",
        "",
        *[f"- {m['label']}: {m['description']} (client lr {m['client_lr']:g})." for m in mth.values()],
        "",
        "Notes:",
        "",
        "- Bytes: float32 parameters sent per device per round (`FedPEAT.bytes_per_round` for the FedPEAT-run methods; 4 x trainable parameters "
        "otherwise; local-only sends nothing). One-time download: the frozen part a device must hold before its first round "
        "(the emulator, or the full model; full fine-tuning receives the whole model every round instead).",
        "- On-device params: what the device holds (the emulator or the full model, plus LoRA factors; full adapter tuning trains "
        "the adapter blocks in place). Step peak: XLA memory analysis of one compiled local Adam step (`peat.train.step_memory`: "
        "arguments + outputs + temporaries - donated), batch local_batch x seq_len; for full adapter tuning it counts the frozen "
        "copy of the adapter blocks as well as the trained one.",
        "- GFLOP per client-round: tokens (local_steps x local_batch x seq_len) x FLOPs/token, FLOPs/token = 4 N (forward and "
        "activation gradients through the device's blocks and the tied LM head) + 2 x trained dense weights + 12 L T d (attention) "
        "+ 6 x LoRA parameters. Round s: median wall time of one simulated round (all its clients vmapped in one jitted call, "
        "aggregation included, compile excluded) on this machine.",
        f"- MEC latency: `mec/system.py` for a typical device at the FedPEAT-MEC environment's default parameters: distance "
        f"R/sqrt(2) = {mec['distance_m']:.0f} m, unit fading, bandwidth share 1/{mec['n_devices']:.0f} of {mec['bandwidth_hz'] / 1e6:.0f} MHz, "
        f"device power {mec['device_power_w']} W, base-station power {mec['bs_power_w']} W, noise {10 * math.log10(mec['noise_psd_w_hz'] * 1e3):.0f} dBm/Hz, path loss "
        f"{mec['pl_const_db']} + {mec['pl_exp_db']} log10(d/km), compute {mec['flops_per_s'] / 1e12:.1f} TFLOP/s at utilization "
        f"{mec['utilization']}, {mec['q_bits']:.0f}-bit payloads, this study's workload ({mec['tokens_per_round']} tokens per round). "
        "Steady rounds download and upload the trained part and compute; the first round also downloads the emulator / model.",
        "- Methods (3) and (4) run in the script's own loop (FedPEAT ties the trained part to the adapter blocks): FedPEAT's client "
        "sampling, keys, local Adam steps and FedAvg. Check: the loop given FedPEAT's emulator and LoRA reproduces `FedPEAT.round` "
        + ("(relative difference {:.1e}, {}).".format(res["full_model_loop_check"]["relative_diff"], "passed" if res["full_model_loop_check"]["passed"] else "FAILED")
           if res.get("full_model_loop_check") else "(not run)."),
        f"- Perplexity of local-only: mean over the evaluated clients of each one's own plug-in perplexity (`local_eval_clients` = "
        f"{cfg['local_eval_clients']}).",
        f"- Machine: {machine.get('cpu_model')}, {machine.get('cpus_usable')} usable CPUs, jax {machine.get('jax')} ({machine.get('jax_backend')}); "
        f"load average (1/5/15 min) at start {load(res['loadavg_start'])}, at end {load(res['loadavg_end'])} (other work on the machine "
        f"slows every timing). Study wall time {res['wall_seconds'] / 60:.1f} min. Created {res['created']}.",
    ]
    return "\n".join(lines) + "\n"


SHORT = {"fedpeat_lora": "FedPEAT\nLoRA, emu", "fed_full_adapter": "full adapter\nemu", "fed_lora_full_model": "LoRA all\nfull model",
         "fed_full_ft": "full FT\nfull model", "local_lora": "local-only\nLoRA, emu", "fed_lora_adapter_full_model": "LoRA adapter\nfull model"}


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    mth = res["methods"]
    keys = list(mth)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for i, k in enumerate(keys):
        c = mth[k]["curve"]
        ax.plot([p["round"] for p in c], [p["ppl"] for p in c], marker="o", ms=3, label=mth[k]["label"], color=f"C{i}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="plug-in perplexity, held-out plays", title="perplexity over rounds")
    ax.legend(fontsize=7)
    x = np.arange(len(keys))
    names = [SHORT[k] for k in keys]
    ax = axes[1]
    mib = lambda k, f: mth[k][f] / 2**20  # noqa: E731
    for j, (field, label) in enumerate((("bytes_up_per_device_per_round", "up, per round"), ("bytes_down_per_device_per_round", "down, per round"),
                                        ("one_time_download_bytes", "one-time download (frozen part)"))):
        vals = [mib(k, field) for k in keys]
        ax.bar(x + (j - 1) * 0.27, [v if v > 0 else np.nan for v in vals], 0.27, label=label, color=f"C{j}")
        for xi, v in zip(x, vals):
            if v == 0:
                ax.text(xi + (j - 1) * 0.27, 0.01, "0", ha="center", va="bottom", fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    top = max(mib(k, f) for k in keys for f in ("bytes_up_per_device_per_round", "one_time_download_bytes"))
    ax.set_ylim(top=top * 50)  # room for the legend
    ax.set(xticks=x, ylabel="MiB per device (float32)", title="communication")
    ax.set_xticklabels(names, fontsize=7)
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.bar(x - 0.2, [mth[k]["on_device_param_bytes"] / 2**20 for k in keys], 0.4, label="parameters held")
    ax.bar(x + 0.2, [mth[k]["peak_step_memory_mb"] for k in keys], 0.4, label="peak of one local step (XLA)")
    ax.set(xticks=x, ylabel="MiB", title="on-device memory")
    ax.set_xticklabels(names, fontsize=7)
    ax.legend(fontsize=7)
    fig.suptitle(f"{res['model']['preset']} model, emulator {res['emulator']['name']}, {res['config']['rounds']} rounds x "
                 f"{res['config']['clients_per_round']} clients", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict, out) -> dict:
    out = Path(out)
    if out.suffix in (".json", ".md", ".png"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: out.with_name(out.name + "." + ext) for ext in ("json", "md", "png")}
    tmp = paths["json"].with_name(paths["json"].name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=lambda x: np.asarray(x).tolist()) + "\n")
    os.replace(tmp, paths["json"])
    paths["md"].write_text(to_markdown(res))
    plot(res, paths["png"])
    return paths


def parse_args(argv=None) -> tuple:
    d = StudyConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tiny", action="store_true", help="tiny preset, 2 rounds x 2 clients: a smoke run (tests use it)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output path prefix: writes <out>.json, <out>.md, <out>.png")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    for f in dataclasses.fields(StudyConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "seeds":
            p.add_argument(flag, type=int, nargs="+", default=None, help=f"default {list(d.seeds)}")
        elif f.name == "methods":
            p.add_argument(flag, nargs="+", default=None, choices=METHODS + OPTIONAL_METHODS, help=f"default {' '.join(d.methods)}")
        else:
            p.add_argument(flag, type=type(getattr(d, f.name)), default=None, help=f"default {getattr(d, f.name)!r} ({StudyConfig.tiny().__dict__[f.name]!r} with --tiny)")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig) if getattr(args, f.name) is not None}
    if "seeds" in overrides:
        overrides["seeds"] = tuple(overrides["seeds"])
    if "methods" in overrides:
        overrides["methods"] = tuple(overrides["methods"])
    cfg = StudyConfig.tiny(**overrides) if args.tiny else StudyConfig(**overrides)
    validate(cfg)
    return cfg, args


def validate(cfg: StudyConfig) -> None:
    if "fedpeat_lora" not in cfg.methods:
        raise SystemExit("--methods must include fedpeat_lora (its client sampling and emulator are every method's reference)")
    for name in ("rounds", "clients_per_round", "local_steps", "local_batch", "eval_every", "eval_batch", "seq_len", "max_examples", "eval_windows"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.seeds:
        raise SystemExit("--seeds needs at least one seed")


def main(argv=None) -> dict:
    cfg, args = parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, flush=True))
    res = run_study(cfg, cache_dir=args.cache_dir, log=log)
    paths = write_outputs(res, args.out)
    log(to_markdown(res))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return res


if __name__ == "__main__":
    main()
