"""Refit the surrogate's perplexity response to rounds measured in the live environment.

The calibration table is fitted on short runs of fixed client sets (`fedpeat calibrate`: 8 rounds
per curve, server-only and device-only curves apart). A controller trained on it meets other
rounds in live mode: 20-round episodes, changing device sets, the server mixed with devices.
:func:`fit_response` is the system identification step between the two: it refits the response
fields of :class:`~fedpeat_jax.mec.params.EnvParams` (each level's fixed point and rate, the
drift of few repeated and of few fresh devices, how the devices' pull grows with their data, the
server's fixed point and rate) to rounds measured in live episodes, by least squares on the log
perplexity through the environment's own :meth:`~fedpeat_jax.mec.env.FedPEATMEC.surrogate_perplexity`. Each field is scaled by one factor
(the levels' fixed points by one, their rates by another), so the levels keep the calibrated
ordering and a level the measured rounds rarely used is not fitted to a handful of noisy rounds;
a weak prior keeps each factor near 1 where the data say little.
Every other field (radio, workload, reward scales ``ppl_ref`` and ``ppl_best``) is unchanged, so
the refitted surrogate pays the same reward as the live environment.

    records = [live_eval.run_policy(env, rule, rounds=20, seed=s) for s, rule in ...]
    data = live_fit.concat([live_fit.transitions(r, env.default_params.ppl0) for r in records])
    fitted, report = live_fit.fit_response(env.default_params.surrogate(), data)
    controller.train_controller(config, fitted, "runs/controller_refit")
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpeat_jax.mec.env import FedPEATMEC, RoundOutcome
from fedpeat_jax.mec.params import EnvParams

FIELDS = ("cal_ppl_inf", "cal_eta", "ppl_drift", "ppl_drift_fresh", "data_exponent", "srv_ppl_inf", "srv_eta")
"""The response fields :func:`fit_response` refits, each times one positive factor (fitted as its log)."""

# The live info entries a transition needs; ``LiveFedPEATMEC`` reports them every round.
INFO_KEYS = ("perplexity", "k_bar", "data_fraction", "server_fraction", "repeat_share")
HORIZONS = ("episode", "round")


class Transitions(NamedTuple):
    """One-round transitions, (T,) float32 each, in the order of their episodes: the perplexity
    before and after a round, what the round brought (the :class:`~fedpeat_jax.mec.env.RoundOutcome`
    scalars) and 1 where an episode starts."""

    ppl_prev: jax.Array
    ppl: jax.Array
    k_bar: jax.Array
    data_fraction: jax.Array
    server_fraction: jax.Array
    repeat_share: jax.Array
    start: jax.Array


def transitions(records: list, ppl0: float) -> Transitions:
    """The transitions of one live episode: ``records`` as :func:`fedpeat_jax.rl.live_eval.run_policy`
    returns them (consecutive rounds from a reset), ``ppl0`` the perplexity the episode started at."""
    missing = [k for k in INFO_KEYS if records and k not in records[0]]
    if missing:
        raise ValueError(f"live records lack {missing}: record them with a LiveFedPEATMEC (mec.live)")
    col = lambda k: np.asarray([r[k] for r in records], np.float32)  # noqa: E731
    ppl = col("perplexity")
    return Transitions(
        ppl_prev=jnp.asarray(np.concatenate([[np.float32(ppl0)], ppl])[: len(ppl)]),
        ppl=jnp.asarray(ppl),
        k_bar=jnp.asarray(col("k_bar")),
        data_fraction=jnp.asarray(col("data_fraction")),
        server_fraction=jnp.asarray(col("server_fraction")),
        repeat_share=jnp.asarray(col("repeat_share")),
        start=jnp.asarray((np.arange(len(ppl)) == 0).astype(np.float32)),
    )


def concat(parts: list) -> Transitions:
    return Transitions(*(jnp.concatenate(xs) for xs in zip(*parts)))


def predict(params: EnvParams, data: Transitions) -> jax.Array:
    """The surrogate's one-round prediction of every transition's perplexity."""
    outcome = RoundOutcome(
        k_bar=data.k_bar,
        data_fraction=data.data_fraction,
        server_fraction=data.server_fraction,
        succeeded=None,
        level=None,
        server=None,
        repeat_share=data.repeat_share,
    )
    return FedPEATMEC.surrogate_perplexity(data.ppl_prev, params, outcome)


def rollout(params: EnvParams, data: Transitions) -> jax.Array:
    """The surrogate run through each whole episode from its measured start, on the measured rounds'
    outcomes: every round continues from the surrogate's own previous perplexity, as in training."""

    def round_(ppl, t: Transitions):
        pred = predict(params, t._replace(ppl_prev=jnp.where(t.start > 0, t.ppl_prev, ppl)))
        return pred, pred

    return jax.lax.scan(round_, data.ppl_prev[0], data)[1]


def log_errors(params: EnvParams, data: Transitions, horizon: str = "episode") -> jax.Array:
    """log(predicted / measured) per transition: predicted over the whole episode (:func:`rollout`)
    or one round at a time from the measured previous perplexity (``horizon="round"``)."""
    return jnp.log(_predicted(params, data, horizon)) - jnp.log(data.ppl)


def _predicted(params: EnvParams, data: Transitions, horizon: str) -> jax.Array:
    if horizon not in HORIZONS:
        raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
    return rollout(params, data) if horizon == "episode" else predict(params, data)


def _with(params: EnvParams, table: dict, u: dict) -> EnvParams:
    return params.replace(**{name: table[name] * jnp.exp(u[name]) for name in FIELDS})


@partial(jax.jit, static_argnames=("steps", "horizon"))
def _fit(params: EnvParams, table: dict, data: Transitions, prior_weight, learning_rate, steps: int, horizon: str):
    def loss(u):
        prior = sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(u))
        errors = log_errors(_with(params, table, u), data, horizon)
        return jnp.mean(jnp.square(errors)) + prior_weight * prior

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))  # decays to 0: settles in the minimum
    u0 = {name: jnp.zeros((), jnp.float32) for name in table}  # one factor per field

    def step(carry, _):
        u, state = carry
        value, grad = jax.value_and_grad(loss)(u)
        updates, state = opt.update(grad, state)
        return (optax.apply_updates(u, updates), state), value

    (u, _), losses = jax.lax.scan(step, (u0, opt.init(u0)), None, length=steps)
    return u, losses


def fit_response(
    params: EnvParams,
    data: Transitions,
    *,
    horizon: str = "episode",
    prior_scale: float = 0.5,
    noise_scale: float = 0.01,
    steps: int = 3000,
    learning_rate: float = 0.02,
) -> tuple[EnvParams, dict]:
    """``params`` with :data:`FIELDS` refitted to ``data``; returns (fitted params, report).

    Least squares on log(predicted / measured), predicted over whole episodes by default
    (``horizon="episode"``, :func:`rollout`: a controller plans over whole episodes, and a fixed
    point that is off shows only there; one-round errors near a fixed point are small whatever it
    is) or one round at a time (``"round"``), with a Gaussian prior on the log of each field's
    factor: ``noise_scale`` is the per-round measurement noise of the log perplexity (0.01: a
    held-out perplexity of 350 moves by about 3.5 between equal rounds), ``prior_scale`` the
    factor's log at one prior standard deviation (0.5: within e^{+-1} at two). A drift of 0 (off)
    starts at 1 so that it can be fitted.
    The report gives each field before and after, and the errors of both (:func:`error_summary`).
    """
    if int(data.ppl.shape[0]) < 1:
        raise ValueError("fit_response needs at least one measured transition")
    if not (prior_scale > 0 and noise_scale > 0 and steps >= 1 and learning_rate > 0):
        raise ValueError("fit_response: prior_scale, noise_scale, learning_rate must be > 0 and steps >= 1")
    if horizon not in HORIZONS:
        raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
    params = params.surrogate() if hasattr(params, "surrogate") else params  # a live env's weights stay out
    table = {name: jnp.asarray(getattr(params, name), jnp.float32) for name in FIELDS}
    for name in ("ppl_drift", "ppl_drift_fresh"):  # a drift of 0 (off) starts at 1, so that it can be fitted
        table[name] = jnp.maximum(table[name], 1.0)
    # mean squared log error / noise^2 + sum(u^2) / prior^2, divided by 1 / noise^2 and by T (mean)
    prior_weight = (noise_scale / prior_scale) ** 2 / int(data.ppl.shape[0])
    u, losses = _fit(params, table, data, prior_weight, learning_rate, int(steps), horizon)
    fitted = _with(params, table, u)
    report = {
        "transitions": int(data.ppl.shape[0]),
        "fields": {
            name: {
                "table": np.asarray(getattr(params, name)).tolist(),
                "fitted": np.asarray(getattr(fitted, name)).tolist(),
            }
            for name in FIELDS
        },
        "before": error_summary(params, data),
        "after": error_summary(fitted, data),
        "horizon": horizon,
        "loss_first_last": [float(losses[0]), float(losses[-1])],
        "prior_scale": prior_scale,
        "noise_scale": noise_scale,
    }
    return fitted, report


def error_summary(params: EnvParams, data: Transitions) -> dict:
    """Prediction errors of ``params`` on ``data`` per horizon ("episode", "round"): RMS of the log
    error, mean and RMS of predicted minus measured perplexity."""
    out = {}
    for horizon in HORIZONS:
        pred = np.asarray(_predicted(params, data, horizon), np.float64)
        diff = pred - np.asarray(data.ppl, np.float64)
        err = np.log(pred) - np.log(np.asarray(data.ppl, np.float64))
        out[horizon] = {
            "rms_log_error": float(np.sqrt(np.mean(err**2))),
            "mean_ppl_error": float(diff.mean()),
            "rms_ppl_error": float(np.sqrt(np.mean(diff**2))),
        }
    return out


__all__ = [
    "FIELDS",
    "HORIZONS",
    "Transitions",
    "concat",
    "error_summary",
    "fit_response",
    "log_errors",
    "predict",
    "rollout",
    "transitions",
]
