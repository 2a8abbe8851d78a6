"""The host loop of a federated run, and vmapped hyperparameter studies.

`train` runs chunks of `FedConfig.rounds_per_chunk` rounds, each chunk one jitted `lax.scan`;
between chunks it evaluates plug-in perplexity, logs scalars (TensorBoard + JSONL), advances a
progress bar and writes an atomic orbax checkpoint. A run killed at any moment resumes from its
last checkpoint and, since every random draw derives from (seed, round), ends with exactly the
parameters of an uninterrupted run.

The round is compiled ahead of time and its memory checked against the budget first
(`compile_rounds`): with `FedConfig.client_chunk=None` the clients vmapped at once are reduced until
the compiled round fits, and a round that cannot fit even one client at a time is refused with
the numbers, before any training.

`study` runs whole trainings vmapped over seeds and numeric hyperparameters in one compiled call.
The frozen weights, the data and the held-out windows are arguments of every compiled function.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.fed import privacy, sharding
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedData, FedPEAT, ServerState
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.io.fingerprint import fingerprint
from fedpeat_jax.io.logging import RunLogger
from fedpeat_jax.io.loop import restore_latest, run_chunks
from fedpeat_jax.model import gpt2

GiB = 2**30


def config_fingerprint(sim: FedPEAT, seed: int) -> str:
    """A digest of everything that determines a run, stored with checkpoints: resuming a run
    with different settings is refused instead of silently mixing two runs. The client chunk and
    the memory budget change how a round is computed, not its result, so they are left out."""
    fed = dataclasses.replace(sim.fed, client_chunk=None, memory_budget_gb=None)
    return fingerprint({"model": sim.model, "peft": sim.peft_full, "fed": fed, "seed": seed})


def memory_budget(fed) -> float:
    """Bytes a compiled round may use: `FedConfig.memory_budget_gb`, else 90% of the first
    device's memory limit (accelerators) or half of the host's available memory (CPU)."""
    if fed.memory_budget_gb is not None:
        return fed.memory_budget_gb * GiB
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.9 * stats["bytes_limit"]
    try:
        return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * GiB


def round_memory(compiled) -> float:
    """Peak bytes of a compiled computation as XLA's memory analysis sees it (arguments,
    outputs, temporaries; donated arguments counted once)."""
    m = compiled.memory_analysis()
    if m is None:
        return 0.0
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB else f"{n_bytes / 2**20:.2f} MiB"


def compile_rounds(sim: FedPEAT, state, params, data, n_rounds: int, hyper, server_data=None):
    """(sim, compiled `run_rounds`) whose peak memory fits `memory_budget`: with an automatic
    client chunk, halve it until it fits; refuse a round that cannot fit one client at a time."""
    budget = memory_budget(sim.fed)
    automatic = sim.fed.client_chunk is None
    while True:
        run = jax.jit(sim.run_rounds, static_argnums=(3,), donate_argnums=(0,))
        compiled = run.lower(state, params, data, n_rounds, hyper, server_data).compile()
        need = round_memory(compiled)
        if need <= budget:
            return sim, compiled
        chunk = sim.effective_chunk
        if automatic and chunk > sim.n_devices:
            sim = sim.replace(client_chunk=max(chunk // 2, sim.n_devices))
            continue
        what = "one client at a time" if chunk <= sim.n_devices else f"{chunk} clients at a time"
        raise ValueError(
            f"a round training {what} needs {_size(need)}, more than the memory budget of {_size(budget)} "
            "(FedConfig.memory_budget_gb); lower FedConfig.client_chunk, FedConfig.local_batch or the sequence length, or "
            "enable gradient checkpointing (GPT2Config.remat)"
        )


class TrainResult(NamedTuple):
    state: ServerState
    history: list  # one dict of scalars per round (and eval entries at chunk ends)
    client_chunk: int  # clients trained at once (the automatic choice when FedConfig.client_chunk is None)


def _host(tree):
    """Host copies of (replicated) arrays, also in a run spanning processes."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


_epsilon = functools.lru_cache(maxsize=65536)(privacy.dp_epsilon)  # studies ask for the same (sigma, q, round) often


def round_rows(sim: FedPEAT, metrics, start: int, dp_noise: float, sampling_rate: float) -> list:
    """History rows of rounds start+1 .. start+n from host `RoundMetrics` of (n,) arrays: every
    metric, the bytes each way, the DP epsilon spent so far (with DP noise) and the round."""
    fed = sim.fed
    rows = []
    for i in range(len(metrics.loss)):
        step = start + i + 1
        row = {name: float(getattr(metrics, name)[i]) for name in metrics._fields}
        row.update(sim.bytes_per_round(int(metrics.participants[i])))
        if fed.dp_clip is not None and dp_noise > 0:
            row["epsilon"] = _epsilon(float(dp_noise), sampling_rate, step, fed.dp_delta)
        row["round"] = step
        rows.append(row)
    return rows


def train(
    sim: FedPEAT,
    params,
    data: FedData,
    *,
    seed: int = 0,
    rounds: Optional[int] = None,
    eval_data: Optional[tuple] = None,
    server_data: Optional[tuple] = None,
    logdir=None,
    ckpt_dir=None,
    resume: bool = True,
    show_progress: bool = True,
    stop_after_chunks: Optional[int] = None,
) -> TrainResult:
    """Run `rounds` (default `FedConfig.rounds`) federated rounds from `seed` with frozen weights
    `params` (float32 or bfloat16 pytree of the model's shape).

    eval_data:   (tokens, mask) held-out windows for plug-in perplexity after every chunk.
    ckpt_dir:    checkpoint after every chunk; with `resume`, continue from the newest one.
    stop_after_chunks: stop early (simulates an interruption in tests).
    """
    fed = sim.fed
    rounds = fed.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    fed.validate(n_clients=int(data.tokens.shape[0]), model=sim.model)
    gpt2.check_params(params, sim.model)
    hyper = Hyper.from_config(fed)
    # On a mesh the server state lives replicated on every device (also of every process).
    placement = {} if sim.mesh is None else {"out_shardings": sharding.replicated(sim.mesh)}
    state = jax.jit(sim.init, **placement)(jax.random.key(seed), params, hyper)
    primary = jax.process_index() == 0
    manager = None if ckpt_dir is None else CheckpointManager(ckpt_dir, max_to_keep=2)
    fingerprint = config_fingerprint(sim, seed)
    state, _ = restore_latest(
        manager, state, fingerprint, fresh=not resume, hint="pass resume=True to continue or pick a new directory"
    )
    start = int(_host(state.round))

    compiled = {}  # chunk length -> compiled run_rounds

    def run_chunk(state, n):
        nonlocal sim
        if n not in compiled:
            sim, compiled[n] = compile_rounds(sim, state, params, data, n, hyper, server_data)
            sharding.barrier(f"compiled {n} rounds")
        return compiled[n](state, params, data, hyper, server_data)

    evaluate = None
    if eval_data is not None:
        e_tokens, e_mask = jnp.asarray(eval_data[0], jnp.int32), jnp.asarray(eval_data[1], jnp.float32)
        if e_tokens.shape[0] == 0:
            raise ValueError("eval_data holds no held-out windows; pass eval_data=None to train without evaluation")
        evaluate = jax.jit(lambda s, p, t, m: sim.eval_nll(s, p, t, m)).lower(state, params, e_tokens, e_mask).compile()
        sharding.barrier("compiled evaluation")

    sampling_rate = fed.clients_per_round / int(data.tokens.shape[0])

    def advance(state, start, n):
        state, metrics = run_chunk(state, n)
        rows = round_rows(sim, _host(metrics), start, fed.dp_noise, sampling_rate)
        if evaluate is not None:
            total, count = _host(evaluate(state, params, e_tokens, e_mask))
            rows[-1]["plugin_ppl"] = float(np.exp(total / max(count, 1.0)))
        return state, rows

    logger = RunLogger(logdir, resume_step=start) if logdir is not None and primary else None
    try:
        state, history = run_chunks(
            state,
            advance,
            start=start,
            total=rounds,
            chunk=fed.rounds_per_chunk,
            desc="FedPEAT rounds",
            step_key="round",
            logger=logger,
            log_tag=lambda name: "eval/plugin_ppl" if name == "plugin_ppl" else "train/" + name,
            checkpoints=manager,
            checkpoint_meta=lambda end: {"fingerprint": fingerprint, "round": end},
            postfix=lambda row: {
                "loss": f"{row['loss']:.3f}",
                **({"ppl": f"{row['plugin_ppl']:.2f}"} if "plugin_ppl" in row else {}),
            },
            show_progress=show_progress and primary,
            stop_after_chunks=stop_after_chunks,
        )
    finally:
        if logger:
            logger.close()
        if manager is not None:
            manager.close()
    return TrainResult(state, history, sim.effective_chunk)


def study(
    sim: FedPEAT,
    params,
    data: FedData,
    seeds,
    hypers: Hyper,
    rounds: int,
    eval_data: Optional[tuple] = None,
    server_data=None,
):
    """Whole runs vmapped over seeds and hyperparameters in one compiled call.

    `seeds` (S,) ints and `hypers` a `Hyper` whose fields are (S,) arrays: run s uses seed s with
    hyperparameters s (build a grid by repeating). The weights, data and held-out windows are
    shared by every run (`in_axes=None`). Returns (final states, per-round metrics with a leading
    run axis, plug-in (nll, count) per run or None).
    """
    seeds = jnp.asarray(seeds)
    if any(jnp.shape(x) != seeds.shape for x in hypers):
        raise ValueError("every Hyper field must have the shape of `seeds` (one entry per run)")

    def one(seed, hyper, params, data, eval_data, server_data):
        state = sim.init(jax.random.key(seed), params, hyper)
        state, metrics = sim.run_rounds(state, params, data, rounds, hyper, server_data)
        nll = None if eval_data is None else sim.eval_nll(state, params, eval_data[0], eval_data[1])
        return state, metrics, nll

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None, None)))(
        seeds, hypers, params, data, eval_data, server_data
    )
