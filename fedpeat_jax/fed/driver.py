"""The host loop of a FedPEAT run, and vmapped hyperparameter studies.

`train` runs chunks of `FedConfig.rounds_per_chunk` rounds, each chunk one jitted `lax.scan`;
between chunks it evaluates plug-in perplexity, logs scalars (TensorBoard + JSONL), advances a
progress bar and writes an atomic orbax checkpoint. A run killed at any moment resumes from its
last checkpoint and, since every random draw derives from (seed, round), ends with exactly the
parameters of an uninterrupted run.

`study` runs whole trainings vmapped over seeds and numeric hyperparameters in one compiled call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.fed import privacy
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedData, FedPEAT, ServerState
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.io.logging import RunLogger, progress


def config_fingerprint(sim: FedPEAT, seed: int) -> str:
    """A digest of everything that determines a run, stored with checkpoints: resuming a run
    with different settings is refused instead of silently mixing two runs."""
    blob = json.dumps(
        {"model": dataclasses.asdict(sim.model), "peft": dataclasses.asdict(sim.peft_full), "fed": dataclasses.asdict(sim.fed), "seed": seed},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TrainResult(NamedTuple):
    state: ServerState
    history: list  # one dict of scalars per round (and eval entries at chunk ends)


def train(
    sim: FedPEAT,
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
    """Run `rounds` (default `FedConfig.rounds`) federated rounds from `seed`.

    eval_data:   (tokens, mask) held-out windows for plug-in perplexity after every chunk.
    ckpt_dir:    checkpoint after every chunk; with `resume`, continue from the newest one.
    stop_after_chunks: stop early (simulates an interruption in tests).
    """
    fed = sim.fed
    rounds = fed.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    fed.validate(n_clients=int(data.tokens.shape[0]), model=sim.model)
    hyper = Hyper.from_config(fed)
    state = sim.init(jax.random.key(seed), hyper)
    fingerprint = config_fingerprint(sim, seed)

    manager = None
    if ckpt_dir is not None:
        manager = CheckpointManager(ckpt_dir, max_to_keep=2)
        if resume and manager.latest_step() is not None:
            meta = manager.metadata()
            if meta.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"checkpoints in {ckpt_dir} belong to a run with other settings (fingerprint "
                    f"{meta.get('fingerprint')} != {fingerprint}); use another directory or resume=False"
                )
            state = manager.restore(target=state)
        elif not resume and manager.latest_step() is not None:
            raise ValueError(f"{ckpt_dir} already holds checkpoints; pass resume=True to continue or pick a new directory")
    start = int(state.round)

    run_chunk = jax.jit(sim.run_rounds, static_argnums=(2,), donate_argnums=(0,))
    evaluate = None
    if eval_data is not None:
        e_tokens, e_mask = jnp.asarray(eval_data[0], jnp.int32), jnp.asarray(eval_data[1], jnp.float32)
        evaluate = jax.jit(lambda s: sim.eval_nll(s, e_tokens, e_mask))

    n_clients = int(data.tokens.shape[0])
    sampling_rate = fed.clients_per_round / n_clients
    logger = RunLogger(logdir, resume_step=start) if logdir is not None else None
    history, chunks = [], 0
    bar = progress(rounds, "FedPEAT rounds", initial=start, disable=not show_progress)
    try:
        while start < rounds:
            n = min(fed.rounds_per_chunk, rounds - start)
            state, metrics = run_chunk(state, data, n, hyper, server_data)
            metrics = jax.device_get(metrics)
            for i in range(n):
                step = start + i + 1
                row = {name: float(getattr(metrics, name)[i]) for name in metrics._fields}
                row.update(sim.bytes_per_round(int(metrics.participants[i])))
                if fed.dp_clip is not None and fed.dp_noise > 0:
                    row["epsilon"] = privacy.dp_epsilon(fed.dp_noise, sampling_rate, step, fed.dp_delta)
                row["round"] = step
                history.append(row)
                if logger:
                    logger.scalars(step, {k: v for k, v in row.items() if k != "round"}, prefix="train/")
            start += n
            if evaluate is not None:
                total, count = jax.device_get(evaluate(state))
                ppl = float(np.exp(total / max(count, 1.0)))
                history[-1]["plugin_ppl"] = ppl
                if logger:
                    logger.scalars(start, {"plugin_ppl": ppl}, prefix="eval/")
            if manager is not None:
                manager.save(start, state, {"fingerprint": fingerprint, "round": start})
            bar.update(n)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", **({"ppl": f"{history[-1]['plugin_ppl']:.2f}"} if "plugin_ppl" in history[-1] else {}))
            chunks += 1
            if stop_after_chunks is not None and chunks >= stop_after_chunks:
                break
    finally:
        bar.close()
        if logger:
            logger.close()
        if manager is not None:
            manager.close()
    return TrainResult(state, history)


def study(sim: FedPEAT, data: FedData, seeds, hypers: Hyper, rounds: int, eval_data: Optional[tuple] = None, server_data=None):
    """Whole runs vmapped over seeds and hyperparameters in one compiled call.

    `seeds` (S,) ints and `hypers` a `Hyper` whose fields are (S,) arrays: run s uses seed s with
    hyperparameters s (build a grid by repeating). Returns (final states, per-round metrics with
    a leading run axis, plug-in (nll, count) per run or None).
    """
    seeds = jnp.asarray(seeds)
    if any(jnp.shape(x) != seeds.shape for x in hypers):
        raise ValueError("every Hyper field must have the shape of `seeds` (one entry per run)")

    def one(seed, hyper):
        state = sim.init(jax.random.key(seed), hyper)
        state, metrics = sim.run_rounds(state, data, rounds, hyper, server_data)
        nll = None if eval_data is None else sim.eval_nll(state, eval_data[0], eval_data[1])
        return state, metrics, nll

    return jax.jit(jax.vmap(one))(seeds, hypers)
