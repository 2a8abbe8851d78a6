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

Every method is a configuration of the library's one round, `FedPEAT.round`: (3) is
`FedConfig.trainable="all_blocks"`, (4) `trainable="model"` (both with the whole middle as the
"emulator"), (5) `algorithm="local"` on round 0's cohort; the script only configures, runs and
reports.

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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402
from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig  # noqa: E402
from fedpeat_jax.fed.client import Hyper  # noqa: E402
from fedpeat_jax.fed.simulation import FedData, FedPEAT  # noqa: E402
from fedpeat_jax.io.plots import pyplot  # noqa: E402
from fedpeat_jax.mec import system  # noqa: E402
from fedpeat_jax.mec.env import EnvParams  # noqa: E402
from fedpeat_jax.model import gpt2  # noqa: E402
from fedpeat_jax.model.flops import train_flops_per_token  # noqa: E402
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
    rounds: int = (
        12  # the quickstart's FedPEAT stage: 12 rounds x 16 clients x 4 local steps, lr 3e-3, LoRA r 8 / alpha 16
    )
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
    def tiny(cls, **overrides) -> StudyConfig:
        base = dict(
            preset="tiny",
            seq_len=32,
            max_examples=8,
            eval_windows=16,
            rounds=2,
            clients_per_round=2,
            local_steps=2,
            lora_rank=4,
            lora_alpha=8.0,
            k=1,
            eval_every=1,
            eval_batch=8,
            local_eval_clients=2,
        )
        return cls(**{**base, **overrides})


# --------------------------------------------------------------------------------------------
# Methods: each is a configuration of the library's one round (`FedPEAT`); this script only
# configures, runs and reports
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Method:
    key: str
    description: str
    sim: FedPEAT
    data: FedData  # the clients it trains (local-only: its fixed cohort)
    eval_clients: int = 0  # local-only: evaluate this many clients' own trees (0: the global tree)

    @property
    def learner(self):
        return self.sim.learner

    @property
    def aggregated(self) -> bool:
        return self.sim.fed.algorithm != "local"

    @property
    def trainable_params(self) -> int:
        return self.learner.param_count()

    @property
    def on_device_params(self) -> int:
        in_place = self.learner.kind == "model" or (
            self.learner.peft_full.kind == "full"
        )  # trained weights replace frozen ones
        return self.learner.device_params(0) + (0 if in_place else self.trainable_params)

    @property
    def bytes_up(self) -> int:
        return self.sim.bytes_per_round(1)["bytes_up"] if self.aggregated else 0

    @property
    def bytes_down(self) -> int:
        return self.sim.bytes_per_round(1)["bytes_down"] if self.aggregated else 0

    @property
    def one_time_download_bytes(self) -> int:
        """The frozen part a device holds before its first round (full fine-tuning receives the
        whole model every round instead)."""
        return 0 if self.learner.kind == "model" else BYTES_PER_PARAM * (self.on_device_params - self.trainable_params)

    @property
    def depth(self) -> int:
        return self.learner.model_levels[0].n_layer

    @property
    def mec_k(self) -> int:
        return self.learner.specs[0].k

    @property
    def lora_params(self) -> int:
        return (
            self.trainable_params if self.learner.peft_full is not None and self.learner.peft_full.kind == "lora" else 0
        )

    @property
    def trained_matmul(self) -> int:
        """Trained dense weights (their weight gradients cost FLOPs)."""
        model = self.sim.model
        if self.learner.kind == "model":
            return model.n_layer * model.block_param_count() + model.vocab_size * model.n_embd
        return self.trainable_params if self.learner.peft_full.kind == "full" else 0

    def step_memory_args(self, state, params) -> tuple:
        """(objective, trainable, frozen) of one local step, for `peat.train.step_memory`."""
        learner = self.learner
        if learner.kind == "model":
            return lm_objective(self.sim.model, None), state.trainable, None
        tree = state.trainable if self.eval_clients == 0 else jax.tree.map(lambda x: x[0], state.clients)
        return lm_objective(learner.model_levels[0], learner.peft_levels[0]), tree, learner.frozen(params, 0)


def study_fed_config(cfg: StudyConfig) -> FedConfig:
    """The FedConfig every method shares (client lr, what is trained and the emulator set per method)."""
    return FedConfig(
        clients_per_round=cfg.clients_per_round,
        rounds=cfg.rounds,
        local_steps=cfg.local_steps,
        local_batch=cfg.local_batch,
        client_lr=cfg.lr_lora,
        adapter_l=cfg.l,
        adapter_r=cfg.r,
        emulator_levels=(cfg.k,),
        log_lora_gap=False,
        eval_batch=cfg.eval_batch,
    )


def study_lora(cfg: StudyConfig) -> PeftConfig:
    return PeftConfig(kind="lora", lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)


def local_cohort(sim: FedPEAT, params, data: FedData, seed: int) -> FedData:
    """The clients FedPEAT samples in its round 0 for `seed`: local-only's fixed cohort."""
    state = jax.jit(sim.init)(jax.random.key(seed), params)
    ((ids, ok),) = sim.sample(FedPEAT.round_keys(state)[0], data.levels)
    ids = np.asarray(ids)[np.asarray(ok)]
    return FedData(*(x[ids] for x in data))


def build_methods(cfg: StudyConfig, params, model: GPT2Config, data: FedData) -> dict:
    """{method key: Method} in the order of cfg.methods."""
    n_clients = int(data.tokens.shape[0])
    n_middle = model.n_layer - cfg.l - cfg.r
    fed, lora = study_fed_config(cfg), study_lora(cfg)
    full = fed.replace(emulator_levels=(n_middle,))
    spec_name = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, cfg.k).name
    full_name = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, n_middle).name
    fedpeat = FedPEAT(model, lora, fed, n_clients=n_clients)
    cohort = local_cohort(fedpeat, params, data, cfg.seeds[0])
    n_eval = (
        cfg.clients_per_round if cfg.local_eval_clients == 0 else min(cfg.local_eval_clients, cfg.clients_per_round)
    )
    n_cohort = int(cohort.tokens.shape[0])
    build = {
        "fedpeat_lora": lambda: Method(
            "fedpeat_lora",
            f"LoRA r={cfg.lora_rank} in the adapter blocks, tuned on the {spec_name} layer-drop emulator",
            fedpeat,
            data,
        ),
        "fed_full_adapter": lambda: Method(
            "fed_full_adapter",
            f"every weight of the adapter blocks, tuned on the {spec_name} emulator",
            FedPEAT(model, PeftConfig(kind="full"), fed.replace(client_lr=cfg.lr_full), n_clients=n_clients),
            data,
        ),
        "fed_lora_full_model": lambda: Method(
            "fed_lora_full_model",
            f"LoRA r={cfg.lora_rank} in every block, tuned on the full model (no emulator)",
            FedPEAT(model, lora, full.replace(trainable="all_blocks"), n_clients=n_clients),
            data,
        ),
        "fed_full_ft": lambda: Method(
            "fed_full_ft",
            "every parameter of the model (embeddings, blocks, final LayerNorm), the whole model sent both ways",
            FedPEAT(model, lora, full.replace(trainable="model", client_lr=cfg.lr_full), n_clients=n_clients),
            data,
        ),
        "local_lora": lambda: Method(
            "local_lora",
            f"FedPEAT's LoRA on the {spec_name} emulator, each of round 0's {n_cohort} clients alone every round, "
            f"no aggregation; perplexity: mean over {n_eval} of them",
            FedPEAT(model, lora, fed.replace(algorithm="local", clients_per_round=n_cohort), n_clients=n_cohort),
            cohort,
            n_eval,
        ),
        "fed_lora_adapter_full_model": lambda: Method(
            "fed_lora_adapter_full_model",
            f"LoRA r={cfg.lora_rank} in the adapter blocks, tuned on the full model ({full_name}: no layer dropped)",
            FedPEAT(model, lora, full, n_clients=n_clients),
            data,
        ),
    }
    return {k: build[k]() for k in cfg.methods}


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------
def env_device_defaults() -> dict:
    """The FedPEAT-MEC environment's default radio and device numbers (EnvParams field defaults)."""
    fields = EnvParams.__dataclass_fields__
    names = (
        "n_devices",
        "cell_radius",
        "bandwidth_hz",
        "noise_psd_w_hz",
        "device_power_w",
        "bs_power_w",
        "pl_const_db",
        "pl_exp_db",
        "flops_min",
        "flops_max",
        "utilization",
        "q_bits",
    )
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
    memory = float(
        system.device_memory_bytes(
            m.mec_k,
            p_emb,
            p_blk,
            n_adapter,
            float(m.trainable_params),
            q,
            cfg.local_batch,
            cfg.seq_len,
            model.n_embd,
            model.n_head,
        )
    )
    return {
        "latency_s": steady,
        "first_round_latency_s": first,
        "download_s": s_peft / r_dl,
        "compute_s": t_cmp,
        "upload_s": s_peft / r_ul,
        "emulator_download_s": s_emu / r_dl,
        "rate_dl_bps": r_dl,
        "rate_ul_bps": r_ul,
        "device_params": p_dev,
        "payload_bits": s_peft,
        "emulator_bits": s_emu,
        "memory_bytes": memory,
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _ppl(totals, counts) -> np.ndarray:
    totals, counts = np.asarray(totals, np.float64), np.asarray(counts, np.float64)
    return np.exp(totals / np.maximum(counts, 1.0))


def _shapes(tree) -> tuple:
    return (jax.tree.structure(tree), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(tree)))


def run_method(
    m: Method, cfg: StudyConfig, model: GPT2Config, params, heldout, log, memory_cache: Optional[dict] = None
) -> dict:
    """Compile, measure memory, run every seed with evaluations; returns the method's results."""
    sim, data = m.sim, m.data
    hyper = Hyper.from_config(sim.fed)
    tok, msk = heldout
    eval_rounds = sorted({r for r in range(cfg.eval_every, cfg.rounds + 1, cfg.eval_every)} | {cfg.rounds})
    init = jax.jit(sim.init)
    state = init(jax.random.key(cfg.seeds[0]), params, hyper)
    t0 = time.perf_counter()
    round_c = jax.jit(sim.round).lower(state, params, data, hyper).compile()
    round_compile = time.perf_counter() - t0

    def evaluate(s, p, t, k):
        if m.eval_clients == 0:
            return jax.tree.map(lambda x: x[None], sim.eval_nll(s, p, t, k))
        return jax.vmap(lambda i: sim.eval_nll(s, p, t, k, client=i))(jnp.arange(m.eval_clients))

    t0 = time.perf_counter()
    eval_c = jax.jit(evaluate).lower(state, params, tok, msk).compile()
    eval_compile = time.perf_counter() - t0
    round_memory = round_c.memory_analysis()

    objective, trainable, frozen = m.step_memory_args(state, params)
    example = {"tokens": data.tokens[0, : cfg.local_batch], "mask": data.mask[0, : cfg.local_batch]}
    tcfg = TrainConfig(
        steps=2, batch=cfg.local_batch, lr=sim.fed.client_lr, weight_decay=0.0, clip=0.0
    )  # plain Adam, as the clients
    memory_key = (objective, _shapes(trainable), _shapes(frozen), tcfg)
    memory_cache = {} if memory_cache is None else memory_cache
    if memory_key not in memory_cache:  # local-only runs FedPEAT's very step: compile it once
        memory_cache[memory_key] = step_memory(objective, trainable, frozen, example, tcfg)
    memory = memory_cache[memory_key]

    runs, round_seconds, eval_seconds = [], [], []
    for seed in cfg.seeds:
        state = init(jax.random.key(seed), params, hyper)
        curve = [
            {"round": 0, "ppl": float(np.mean(_ppl(*jax.device_get(eval_c(state, params, tok, msk)))))}
        ]  # the untuned model: zero-shot
        losses = []
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            state, info = round_c(state, params, data, hyper)
            jax.block_until_ready(state)
            round_seconds.append(time.perf_counter() - t0)
            losses.append(float(info.loss))
            if r in eval_rounds:
                t0 = time.perf_counter()
                totals, counts = jax.device_get(eval_c(state, params, tok, msk))
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
    mean_curve = [
        {"round": rd, "ppl": float(np.mean([run["curve"][i]["ppl"] for run in runs]))}
        for i, rd in enumerate(rounds_axis)
    ]
    tokens_client = cfg.local_steps * cfg.local_batch * cfg.seq_len
    fpt = train_flops_per_token(model, m.depth, cfg.seq_len, trained_matmul=m.trained_matmul, lora_params=m.lora_params)
    median_round = statistics.median(round_seconds)
    clients_per_round = sim.fed.clients_per_round
    flops_round = fpt * tokens_client * clients_per_round
    spec = sim.learner.specs[0]
    return {
        "label": LABELS[m.key],
        "description": m.description,
        "emulator": spec.name if sim.learner.kind == "adapter" and spec.k < spec.n_middle else "none (full model)",
        "client_lr": sim.fed.client_lr,
        "config": {
            "trainable": sim.fed.trainable,
            "algorithm": sim.fed.algorithm,
            "peft_kind": sim.peft.kind,
            "emulator_levels": list(sim.fed.emulator_levels),
        },
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
        "clients_per_round": clients_per_round,
        "round_seconds": round_seconds,
        "round_seconds_median": median_round,
        "round_gflops_per_s": flops_round / median_round / 1e9,
        "eval_seconds_median": statistics.median(eval_seconds) if eval_seconds else None,
        "compile_seconds": {"round": round_compile, "eval": eval_compile},
        "round_program_peak_mb": None
        if round_memory is None
        else (
            round_memory.argument_size_in_bytes
            + round_memory.output_size_in_bytes
            + round_memory.temp_size_in_bytes
            - round_memory.alias_size_in_bytes
        )
        / 2**20,
        "final_ppl": float(np.mean(finals)),
        "final_ppl_std": float(np.std(finals)) if len(finals) > 1 else None,
        "curve": mean_curve,
        "runs": runs,
    }


def run_study(cfg: StudyConfig, *, cache_dir=None, log=print) -> dict:
    from fedpeat_jax.peat.foundation import load_foundation
    from fedpeat_jax.tasks import TaskConfig, build_task

    start = time.perf_counter()
    machine = machine_info()
    fm = load_foundation(cfg.preset, cache_dir=cache_dir, show_progress=False)
    model = fm.config.replace(
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
    )  # deterministic tuning, as `fedpeat tune`
    if cfg.seq_len > model.n_positions:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's n_positions {model.n_positions}")
    task = build_task(
        TaskConfig(
            seq_len=cfg.seq_len, max_examples=cfg.max_examples, max_eval_windows=cfg.eval_windows, seed=cfg.seeds[0]
        ),
        fm.tokenizer,
        cache_dir=cache_dir,
    )
    data = task.train
    heldout = (jnp.asarray(task.heldout[0], jnp.int32), jnp.asarray(task.heldout[1], jnp.float32))
    params = fm.params
    zs_total, zs_count = jax.device_get(
        jax.jit(lambda p, t, m: gpt2.evaluate_nll(p, None, t, m, model, None, cfg.eval_batch))(params, *heldout)
    )
    zero_shot = float(_ppl(zs_total, zs_count))
    log(
        f"{cfg.preset}: {model.param_count():,} parameters; {int(data.tokens.shape[0])} clients; held-out zero-shot perplexity {zero_shot:.2f}"
    )

    methods = build_methods(cfg, params, model, data)
    env = env_device_defaults()
    results, memory_cache = {}, {}
    for key, m in methods.items():
        log(f"[{key}] {m.description}")
        t0 = time.perf_counter()
        results[key] = run_method(m, cfg, model, params, heldout, log, memory_cache)
        results[key]["mec"] = mec_latency(m, model, cfg, env)
        results[key]["wall_seconds"] = time.perf_counter() - t0
        log(
            f"[{key}] final plug-in ppl {results[key]['final_ppl']:.2f}, {results[key]['round_seconds_median']:.2f} s/round, "
            f"{results[key]['wall_seconds']:.0f} s in all"
        )

    spec = emu.EmulatorSpec(model.n_layer, cfg.l, cfg.r, cfg.k)
    return {
        "name": NAME,
        "config": dataclasses.asdict(cfg),
        "model": {
            "preset": cfg.preset,
            "params": model.param_count(),
            "n_layer": model.n_layer,
            "n_embd": model.n_embd,
            "n_head": model.n_head,
            "vocab_size": model.vocab_size,
            "foundation": str(fm.path.name),
            "modern_heldout_ppl": fm.info.get("heldout_ppl"),
        },
        "emulator": {
            "name": spec.name,
            "middle_ids": list(spec.middle_ids),
            "adapter_ids": list(spec.adapter_ids),
            "depth": spec.depth,
        },
        "task": {
            "clients": int(data.tokens.shape[0]),
            "client_tokens": int(task.n_tokens),
            "seq_len": cfg.seq_len,
            "heldout_windows": int(heldout[0].shape[0]),
            "heldout_tokens": int(np.asarray(heldout[1])[:, 1:].sum()),
            "heldout": "the held-out plays in First Folio spelling (TaskConfig default)",
        },
        "zero_shot_ppl": zero_shot,
        "mec_parameters": {
            **env,
            "distance_m": env["cell_radius"] / math.sqrt(2.0),
            "fading": 1.0,
            "bandwidth_share": 1.0 / env["n_devices"],
            "flops_per_s": 0.5 * (env["flops_min"] + env["flops_max"]),
            "tokens_per_round": cfg.local_steps * cfg.local_batch * cfg.seq_len,
        },
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
    for _key, m in mth.items():
        ppl = f"{m['final_ppl']:.2f}" + (f" ± {m['final_ppl_std']:.2f}" if m.get("final_ppl_std") is not None else "")
        lines.append(
            f"| {m['label']} | {m['trainable_params']:,} | {ppl} | {_mib(m['bytes_up_per_device_per_round'])} / "
            f"{_mib(m['bytes_down_per_device_per_round'])} MiB | {_mib(m['one_time_download_bytes'])} MiB | "
            f"{m['on_device_params']:,} | {m['peak_step_memory_mb']:.1f} | {m['flops_per_client_per_round'] / 1e9:.2f} | "
            f"{m['round_seconds_median']:.2f} | {m['mec']['latency_s']:.3g} ({m['mec']['first_round_latency_s']:.3g}) |"
        )
    keys = list(mth)
    rounds = [p["round"] for p in mth[keys[0]]["curve"]]
    lines += [
        "",
        "Plug-in perplexity over rounds:",
        "",
        "| round | " + " | ".join(mth[k]["label"] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
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
        "- Every method is a configuration of the library's one round (`FedPEAT`: `FedConfig.trainable` 'adapter', 'all_blocks' or "
        "'model'; `algorithm='local'` for local-only): the same client sampling, keys, local Adam steps and FedAvg.",
        f"- Perplexity of local-only: mean over the evaluated clients of each one's own plug-in perplexity (`local_eval_clients` = "
        f"{cfg['local_eval_clients']}).",
        f"- Machine: {machine.get('cpu_model')}, {machine.get('cpus_usable')} usable CPUs, jax {machine.get('jax')} ({machine.get('jax_backend')}); "
        f"load average (1/5/15 min) at start {load(res['loadavg_start'])}, at end {load(res['loadavg_end'])} (other work on the machine "
        f"slows every timing). Study wall time {res['wall_seconds'] / 60:.1f} min. Created {res['created']}.",
    ]
    return "\n".join(lines) + "\n"


SHORT = {
    "fedpeat_lora": "FedPEAT\nLoRA, emu",
    "fed_full_adapter": "full adapter\nemu",
    "fed_lora_full_model": "LoRA all\nfull model",
    "fed_full_ft": "full FT\nfull model",
    "local_lora": "local-only\nLoRA, emu",
    "fed_lora_adapter_full_model": "LoRA adapter\nfull model",
}


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
    for j, (field, label) in enumerate(
        (
            ("bytes_up_per_device_per_round", "up, per round"),
            ("bytes_down_per_device_per_round", "down, per round"),
            ("one_time_download_bytes", "one-time download (frozen part)"),
        )
    ):
        vals = [mib(k, field) for k in keys]
        ax.bar(x + (j - 1) * 0.27, [v if v > 0 else np.nan for v in vals], 0.27, label=label, color=f"C{j}")
        for xi, v in zip(x, vals):
            if v == 0:
                ax.text(
                    xi + (j - 1) * 0.27,
                    0.01,
                    "0",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    transform=ax.get_xaxis_transform(),
                )
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
    fig.suptitle(
        f"{res['model']['preset']} model, emulator {res['emulator']['name']}, {res['config']['rounds']} rounds x "
        f"{res['config']['clients_per_round']} clients",
        fontsize=10,
    )
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--tiny", action="store_true", help="tiny preset, 2 rounds x 2 clients: a smoke run (tests use it)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output path prefix: writes <out>.json, <out>.md, <out>.png")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    for f in dataclasses.fields(StudyConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "seeds":
            p.add_argument(flag, type=int, nargs="+", default=None, help=f"default {list(d.seeds)}")
        elif f.name == "methods":
            p.add_argument(
                flag, nargs="+", default=None, choices=METHODS + OPTIONAL_METHODS, help=f"default {' '.join(d.methods)}"
            )
        else:
            p.add_argument(
                flag,
                type=type(getattr(d, f.name)),
                default=None,
                help=f"default {getattr(d, f.name)!r} ({StudyConfig.tiny().__dict__[f.name]!r} with --tiny)",
            )
    args = p.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig) if getattr(args, f.name) is not None
    }
    if "seeds" in overrides:
        overrides["seeds"] = tuple(overrides["seeds"])
    if "methods" in overrides:
        overrides["methods"] = tuple(overrides["methods"])
    cfg = StudyConfig.tiny(**overrides) if args.tiny else StudyConfig(**overrides)
    validate(cfg)
    return cfg, args


def validate(cfg: StudyConfig) -> None:
    if "fedpeat_lora" not in cfg.methods:
        raise SystemExit(
            "--methods must include fedpeat_lora (its client sampling and emulator are every method's reference)"
        )
    for name in (
        "rounds",
        "clients_per_round",
        "local_steps",
        "local_batch",
        "eval_every",
        "eval_batch",
        "seq_len",
        "max_examples",
        "eval_windows",
    ):
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
