"""What a cohort records of its runs, chunk by chunk: metrics, held-out evaluations, which runs
diverged and why; and each run's history in `driver.train`'s rows (`fed.sweep.run_cohort`).

The record is a dict of host arrays with a leading run axis, so that it is checkpointed whole and
a resumed cohort continues it.
"""

from __future__ import annotations

import jax
import numpy as np

from fedpeat_jax.fed import driver
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedPEAT, RoundMetrics

# Why a run was stopped (index 0: it was not).
REASONS = (
    "",
    "the global update is not finite",
    "every client's update is not finite",
    "the training loss is not finite",
    "the server state is not finite",
    "the held-out loss is not finite",
)


def chunk_lengths(rounds: int, per_chunk: int) -> list:
    return [min(per_chunk, rounds - s) for s in range(0, rounds, per_chunk)]


def empty_record(states, n_runs: int, rounds: int, n_evals: int) -> dict:
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    return {
        "states": states,
        "metrics": {name: nan(n_runs, rounds) for name in RoundMetrics._fields},
        "eval_nll": nan(n_runs, n_evals),
        "eval_count": nan(n_runs, n_evals),
        "zero": nan(n_runs, 2),
        "stopped": np.full(n_runs, -1, np.int32),
        "reason": np.zeros(n_runs, np.int32),
    }


def _first_bad_round(metrics) -> np.ndarray:
    """(runs, n) -> per run the index of its first round whose update, clients or loss are not
    finite (n when none), and the reason code."""
    norm, used, dropped, loss = (
        np.asarray(getattr(metrics, f), np.float64) for f in ("update_norm", "participants", "dropped", "loss")
    )
    codes = np.zeros(norm.shape, np.int32)
    codes = np.where((used > 0) & ~np.isfinite(loss), 3, codes)
    codes = np.where((used == 0) & (dropped > 0), 2, codes)
    codes = np.where(~np.isfinite(norm), 1, codes)
    bad = codes > 0
    first = np.where(bad.any(axis=1), bad.argmax(axis=1), norm.shape[1])
    return first, codes[np.arange(len(first)), np.minimum(first, norm.shape[1] - 1)] * (first < norm.shape[1])


def fold_chunk(record: dict, idx: np.ndarray, start: int, e: int, out: tuple) -> None:
    """Fold one chunk's outputs for runs `idx` into the record; stop the runs that diverged."""
    states, metrics, (nll, count), finite = out
    n = np.asarray(metrics.loss).shape[1]
    first, code = _first_bad_round(metrics)
    code = np.where((first == n) & ~finite, 4, code)
    code = np.where((code == 0) & (count > 0) & ~np.isfinite(nll), 5, code)
    ok = code == 0
    for name in RoundMetrics._fields:
        values = np.asarray(getattr(metrics, name), np.float64)
        kept = np.where(
            np.arange(n)[None, :] <= first[:, None], values, np.nan
        )  # a diverged run's rows stop at its bad round
        record["metrics"][name][idx, start : start + n] = kept
    shown = first == n  # the chunk's evaluation belongs to the history unless a round before it diverged
    record["eval_nll"][idx[shown], e] = nll[shown]
    record["eval_count"][idx[shown], e] = count[shown]
    live = idx[ok]
    record["states"] = jax.tree.map(lambda s, v: _assign(s, live, v[ok]), record["states"], states)
    record["stopped"][idx[~ok]] = start + np.minimum(first[~ok], n - 1) + 1
    record["reason"][idx[~ok]] = code[~ok]


def _assign(store: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    store = np.array(store)  # restored checkpoints may be read-only
    store[idx] = values
    return store


def histories(sim: FedPEAT, record: dict, hypers: Hyper, rounds: int, per_chunk: int, sampling_rate: float) -> list:
    ends = np.cumsum(chunk_lengths(rounds, per_chunk))
    out = []
    for r in range(len(hypers.client_lr)):
        done = int(
            np.sum(~np.isnan(record["metrics"]["participants"][r]))
        )  # rounds it ran (a stopped run: to its bad round)
        metrics = RoundMetrics(*(record["metrics"][name][r, :done] for name in RoundMetrics._fields))
        rows = driver.round_rows(sim, metrics, 0, float(hypers.dp_noise[r]), sampling_rate)
        for e, end in enumerate(ends):
            count = record["eval_count"][r, e]
            if end <= done and np.isfinite(count) and count > 0:
                rows[end - 1]["plugin_ppl"] = float(np.exp(record["eval_nll"][r, e] / max(count, 1.0)))
        out.append(rows)
    return out
