"""Which settings of the numeric axes a study runs: every point of a grid, random draws, or
Optuna's samplers (TPE by default) through ask-and-tell in batches.

Optuna batch b is asked from a fresh study holding the results of batches 0..b-1 (replayed in
order) and a sampler seeded by (sampler_seed, b): what is asked depends only on earlier results,
so a study killed and resumed asks exactly the trials an uninterrupted one asks.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from fedpeat_jax.sweep.spec import Spec


def grid(spec: Spec) -> list:
    """Every point of the Cartesian product of the axes (a single empty setting without axes)."""
    points = [{}]
    for axis in spec.axes:
        points = [dict(p, **{axis.name: v}) for p in points for v in axis.grid()]
    return points


def _draw(axis, rng: np.random.Generator) -> float:
    if not axis.is_range:
        return float(axis.values[rng.integers(len(axis.values))])
    if axis.log:
        value = math.exp(rng.uniform(math.log(axis.low), math.log(axis.high)))
    else:
        value = rng.uniform(axis.low, axis.high)
    return float(f"{value:.6g}")


def random(spec: Spec) -> list:
    """`spec.trials` settings drawn independently (uniform over a list, uniform or log-uniform over
    a range), the same for every structural group (seeded by `sampler_seed`)."""
    rng = np.random.default_rng(spec.sampler_seed)
    return [{axis.name: _draw(axis, rng) for axis in spec.axes} for _ in range(spec.trials)]


def settings(spec: Spec) -> list:
    """The settings of a grid or random study (Optuna asks them batch by batch: `OptunaSearch`)."""
    return grid(spec) if spec.sampler == "grid" else random(spec)


class OptunaSearch:
    """Ask a batch of trials, run it, tell the results (minimizing the objective)."""

    def __init__(self, spec: Spec):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.spec = optuna, spec
        dist = optuna.distributions
        self.distributions = {
            a.name: dist.CategoricalDistribution(list(a.values))
            if not a.is_range
            else dist.FloatDistribution(a.low, a.high, log=a.log)
            for a in spec.axes
        }

    def _sampler(self, batch: int):
        seed = self.spec.sampler_seed * 1_000_003 + batch
        samplers = self.optuna.samplers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            if self.spec.optuna_sampler == "tpe":
                return samplers.TPESampler(seed=seed, constant_liar=True)
            if self.spec.optuna_sampler == "qmc":
                return samplers.QMCSampler(seed=self.spec.sampler_seed, warn_independent_sampling=False)
            return samplers.RandomSampler(seed=seed)

    def ask(self, told: list, batch: int, size: int) -> list:
        """`size` settings for batch `batch`, given `told`: [(setting, value or None if it failed)]
        of every earlier trial in order."""
        trial = self.optuna.trial
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            study = self.optuna.create_study(direction="minimize", sampler=self._sampler(batch))
            for setting, value in told:
                ok = value is not None and math.isfinite(value)
                study.add_trial(
                    trial.create_trial(
                        params=setting,
                        distributions=self.distributions,
                        value=value if ok else None,
                        state=trial.TrialState.COMPLETE if ok else trial.TrialState.FAIL,
                    )
                )
            asked = [study.ask(self.distributions) for _ in range(size)]
        return [{name: float(value) for name, value in t.params.items()} for t in asked]


def best_told(told: list) -> Optional[tuple]:
    """(setting, value) of the best finished trial, or None."""
    done = [(s, v) for s, v in told if v is not None and math.isfinite(v)]
    return min(done, key=lambda sv: sv[1]) if done else None


__all__ = ["grid", "random", "settings", "OptunaSearch", "best_told"]
