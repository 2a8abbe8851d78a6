"""Running observation and return statistics, kept inside a jitted training state.

``RunningMeanStd`` merges batches by the parallel-variance formula (Chan et al.), as
stable-baselines3's ``VecNormalize`` does; ``normalize_obs`` standardizes and clips.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class RunningMeanStd(NamedTuple):
    mean: jax.Array
    var: jax.Array
    count: jax.Array


def rms_init(shape=()) -> RunningMeanStd:
    return RunningMeanStd(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.asarray(1e-4, jnp.float32))


def rms_update(rms: RunningMeanStd, batch: jax.Array) -> RunningMeanStd:
    """Merge the moments of ``batch`` (leading batch axis) into ``rms`` (parallel-variance formula)."""
    b_mean, b_var, b_count = jnp.mean(batch, axis=0), jnp.var(batch, axis=0), batch.shape[0]
    delta = b_mean - rms.mean
    total = rms.count + b_count
    mean = rms.mean + delta * b_count / total
    m2 = rms.var * rms.count + b_var * b_count + jnp.square(delta) * rms.count * b_count / total
    return RunningMeanStd(mean, m2 / total, total)


def normalize_obs(obs: jax.Array, rms: Optional[RunningMeanStd], clip: float) -> jax.Array:
    """(obs - mean) / sqrt(var + 1e-8), clipped to [-clip, clip]; identity when ``rms`` is None."""
    if rms is None:
        return obs
    return jnp.clip((obs - rms.mean) / jnp.sqrt(rms.var + 1e-8), -clip, clip)


__all__ = ["RunningMeanStd", "normalize_obs", "rms_init", "rms_update"]
