"""The host loop every long job runs: compiled chunks, then log, checkpoint and progress.

Federated rounds (`fed.driver.train`), controller training (`rl.controller`), pretraining and
distillation (`peat.train.fit`) all advance a state by chunks of jitted steps. Between chunks the
host logs the chunk's rows, writes an atomic checkpoint and moves a progress bar; a run killed at
any moment resumes from its newest checkpoint (`restore_latest`), and since each job derives its random
draws from its seed and step, ends where an uninterrupted run ends.

    state, start = restore_latest(manager, state, fingerprint)
    state, rows = run_chunks(state, advance, start=start, total=steps, chunk=100, desc="train",
                             logger=logger, checkpoints=manager, checkpoint_meta=lambda s: {...})

`advance(state, start, n)` runs steps start+1 .. start+n and returns (state, rows): one dict of
scalars per logged step, each holding its step under `step_key`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

from fedpeat_jax.io.logging import progress


def restore_latest(
    checkpoints,
    state,
    fingerprint: Optional[str] = None,
    *,
    fresh: bool = False,
    hint: str = "continue that run or pick a new directory",
):
    """(state, checkpoint step) restored from the newest checkpoint of `checkpoints` (a
    CheckpointManager or None); `state` unchanged and step None when there is none.

    A checkpoint whose metadata names another `fingerprint` belongs to a run with other
    settings and is refused; with `fresh`, any existing checkpoint is refused.
    """
    if checkpoints is None or checkpoints.latest_step() is None:
        return state, None
    if fresh:
        raise ValueError(f"{checkpoints.directory} already holds checkpoints; {hint}")
    if fingerprint is not None:
        found = checkpoints.metadata().get("fingerprint")
        if found != fingerprint:
            raise ValueError(
                f"checkpoints in {checkpoints.directory} belong to a run with other settings (fingerprint {found} != "
                f"{fingerprint}); use another directory"
            )
    return checkpoints.restore(target=state), checkpoints.latest_step()


def run_chunks(
    state,
    advance: Callable,
    *,
    start: int,
    total: int,
    chunk: int,
    desc: str,
    step_key: str = "step",
    logger=None,
    log_tag: Callable[[str], str] = lambda name: name,
    checkpoints=None,
    checkpoint_meta: Callable[[int], dict] = lambda step: {},
    postfix: Callable[[dict], dict] = lambda row: {"loss": f"{row['loss']:.3f}"} if "loss" in row else {},
    show_progress: bool = True,
    stop_after_chunks: Optional[int] = None,
):
    """Advance `state` from step `start` to `total` in chunks of at most `chunk` steps; returns
    (state, rows of every chunk). After each chunk: every row's scalars go to `logger` (a
    RunLogger, names through `log_tag`), a checkpoint `end -> (state, checkpoint_meta(end))` goes
    to `checkpoints`, and the progress bar shows `postfix(last row)`. `stop_after_chunks` stops
    early, as an interruption would (tests)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if start and checkpoints is not None:  # say so: with progress bars off a resumed run is otherwise silent
        done = "nothing left to do" if start >= total else f"continuing to {total}"
        print(
            f"{desc}: resumed from the checkpoint at step {start} in {checkpoints.directory}; {done}", file=sys.stderr
        )
    history, chunks = [], 0
    with progress(total, desc, initial=start, disable=not show_progress) as bar:
        while start < total:
            n = min(chunk, total - start)
            state, rows = advance(state, start, n)
            start += n
            history.extend(rows)
            if logger is not None:
                for row in rows:
                    logger.scalars(row[step_key], {log_tag(k): v for k, v in row.items() if k != step_key})
            if checkpoints is not None:
                checkpoints.save(start, state, checkpoint_meta(start))
            if rows:
                bar.set_postfix(postfix(rows[-1]))
            bar.update(n)
            chunks += 1
            if stop_after_chunks is not None and chunks >= stop_after_chunks:
                break
    if checkpoints is not None:
        checkpoints.wait_until_finished()
    return state, history
