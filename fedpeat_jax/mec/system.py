"""The FedPEAT mobile-edge-computing system model: pure functions, one formula per quantity.

This module is the single source of truth for the physics of the MEC environment
(../../shared/reference/mec_model.md). Every function takes its numbers as arguments (nothing is
hard-coded except unit conversions) and an array namespace ``xp`` (``numpy`` or ``jax.numpy``), so
the jitted gymnax environment (:mod:`fedpeat_jax.mec.env`, ``xp=jnp``) and the numpy/gymnasium
twin (:mod:`fedpeat_jax.mec.twin`, ``xp=np``) evaluate the very same equations on two independent
execution paths. Functions broadcast over any leading axes (devices, environments).

Units: metres, seconds, hertz, watts, bits (payloads), bytes (memory), FLOP and FLOP/s.

Array convention: the device axis (where there is one) is the LEADING axis and any batch axes
(environments, parameter sweeps) TRAIL, e.g. shares of shape (N,) for one environment or (N, E)
for E environments; reductions over devices use ``axis=0``. Scalars broadcast against the batch
axes. This "structure of arrays" layout keeps the environment axis contiguous, which is what
makes a batch of environments vectorize well on a CPU.

Equations
---------
Radio (one base station at the origin, block fading per round, FDMA):

* path loss            PL(d) = a + b log10(d / 1 km)  [dB],  default a = 128.1, b = 37.6
* Rayleigh fading      |h|^2 ~ Exp(1): |h|^2 = -ln(1 - u), u ~ U[0, 1), floored at ``min_fading``
* channel gain         G = |h|^2 10^(-PL/10);  G_dB = 10 log10 G = 10 log10 |h|^2 - PL(d)
* bandwidth shares     beta_n = x_n w(b_n) / sum_m x_m w(b_m)  (0 for non-participants; sums to 1
                       when anyone takes part, else 0); w(b) = bandwidth level weight
* uplink rate          R_ul = beta B log2(1 + p G / (N0 beta B))
* downlink rate        R_dl = beta B log2(1 + P_bs beta G / (N0 beta B)) = beta B log2(1 + P_bs G / (N0 B))
                       (the base-station power is split in proportion to beta, so beta cancels
                       inside the logarithm)

Payloads (q bits per parameter):

* on-device parameters P_dev(k) = P_emb + (l + r + k) P_blk      (emulator with k middle blocks)
* emulator payload     S_emu(k) = q P_dev(k)   (sent only on an emulator exchange)
* PEFT payload         S_peft = q P_peft      (down and up every round a device takes part)

Compute and memory:

* FLOPs per token      4 P_dev(k) + 2 P_peft  (forward + backward through the frozen emulator,
                       weight gradients only for the PEFT parameters)
* compute time         T_cmp = tokens * FLOPs/token / (f * utilization),
                       tokens = local_steps * batch * seq_len
* activations          batch * seq * d * (34 + 5 a seq / d) * (l + r + k)  bytes  (a = heads)
* device memory        M(k) = (q / 8) P_dev(k) + 16 P_peft + activations(k)   bytes

Delay:

* device latency       T_n = x_n S_emu(k_n) / R_dl + S_peft / R_dl + T_cmp + S_peft / R_ul,
                       x_n = 1 iff the device's stored emulator differs from the chosen one
* round deadline       a participant with T_n > T_dl is a straggler: dropped, its time capped at T_dl
* round latency        max over the participants of min(T_n, T_dl) (synchronous FedAvg), 0 for an
                       empty round

Perplexity surrogate (response model fitted by the calibration): every data source pulls the
perplexity towards its own fixed point P_j with a strength a_j,

* dp/ds = -sum_j a_j (p - P_j) over one round (s from 0 to 1), whose solution is
  ppl_t = P* + (ppl_{t-1} - P*) exp(-A),  A = sum_j a_j,  P* = sum_j a_j P_j / A,
* a_j = omega_j eta_j phi_j: eta_j phi_j is the pull of a round with source j alone (phi_j its data
  as a fraction of all devices' data), omega_j = phi_j / sum_i phi_i its FedAvg weight in a round
  that averages both sources' updates. Two sources: the devices (P, eta piecewise-linear in the
  data-weighted mean emulator size kbar, clamped outside the calibrated range) and the server's
  own data (its domain's P, eta). One source alone is the single-curve model
  ppl_t = P + (ppl_{t-1} - P) exp(-eta * phi_t).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LN10 = math.log(10.0)
LN2 = math.log(2.0)  # log2(1 + x) is computed as log1p(x) / ln 2: accurate at low SNR
DB_PER_NEPER = 10.0 / LN10  # 10 log10(x) = DB_PER_NEPER * ln(x)

Array = Any  # numpy or jax array


# ---------------------------------------------------------------------------------------------
# Random draws: every stochastic quantity is a deterministic transform of U[0, 1) numbers, so the
# JAX environment and the numpy twin can be fed the very same draws.
# ---------------------------------------------------------------------------------------------
def uniform_range(u: Array, low, high) -> Array:
    """Map u ~ U[0, 1) to U[low, high)."""
    return low + (high - low) * u


def categorical_from_uniform(u: Array, n: int, xp=np) -> Array:
    """Map u ~ U[0, 1) to an index uniform on {0, ..., n-1} (floor(u n), clipped to n-1)."""
    return xp.minimum(xp.floor(u * n), n - 1).astype(xp.int32)


def distance_in_annulus_sq(u: Array, min_distance, radius) -> Array:
    """Squared distance of a point uniform in the annulus min_distance <= d <= radius.

    d^2 = d_min^2 + (R^2 - d_min^2) u: the area below d grows as d^2, so this is the inverse CDF.
    """
    return min_distance**2 + (radius**2 - min_distance**2) * u


def distance_in_annulus(u: Array, min_distance, radius, xp=np) -> Array:
    """Distance from the base station of a device placed uniformly in the annulus."""
    return xp.sqrt(distance_in_annulus_sq(u, min_distance, radius))


def random_walk_distance_sq(distance: Array, ux: Array, uy: Array, step) -> Array:
    """Squared distance after a random-walk move by (dx, dy) ~ U[-step, step]^2.

    Only the distance to the base station enters the model, so the walk is written in the frame
    where the device sits at (d, 0): d'^2 = (d + dx)^2 + dy^2.
    """
    dx = step * (2.0 * ux - 1.0)
    dy = step * (2.0 * uy - 1.0)
    return (distance + dx) ** 2 + dy**2


def random_walk_distance(distance: Array, ux: Array, uy: Array, step, min_distance, radius, xp=np) -> Array:
    """Distance after one random-walk move, kept in the cell [d_min, R] (clipped)."""
    return xp.clip(xp.sqrt(random_walk_distance_sq(distance, ux, uy, step)), min_distance, radius)


def rayleigh_power(u: Array, min_fading, xp=np) -> Array:
    """Rayleigh block-fading power |h|^2 = -ln(1 - u) ~ Exp(1), floored at ``min_fading``.

    The floor (default 1e-6, a -60 dB fade with probability 1e-6) keeps log-gains finite.
    """
    return xp.maximum(-xp.log1p(-u), min_fading)


# ---------------------------------------------------------------------------------------------
# Radio
# ---------------------------------------------------------------------------------------------
def path_loss_db(distance_m: Array, pl_const_db, pl_exp_db, xp=np) -> Array:
    """PL(d) = a + b log10(d / 1 km) dB (3GPP urban macro: a = 128.1, b = 37.6)."""
    return pl_const_db + pl_exp_db * (xp.log(distance_m) - math.log(1000.0)) / LN10


def path_gain(distance_m: Array, pl_const_db, pl_exp_db, xp=np) -> Array:
    """10^(-PL(d)/10) = 10^(-a/10) (d / 1 km)^(-b/10), as a product of two well-conditioned factors.

    (Exponentiating the whole path loss, ~100 dB, in float32 would cost ~5e-6 relative precision.)
    """
    return 10.0 ** (-0.1 * pl_const_db) * xp.exp(-0.1 * pl_exp_db * (xp.log(distance_m) - math.log(1000.0)))


def channel_gain(fading: Array, distance_m: Array, pl_const_db, pl_exp_db, xp=np) -> Array:
    """G = |h|^2 10^(-PL(d)/10)."""
    return fading * path_gain(distance_m, pl_const_db, pl_exp_db, xp)


def to_db(x: Array, xp=np) -> Array:
    """10 log10(x) (e.g. the channel gain in dB: G_dB = 10 log10 |h|^2 - PL(d))."""
    return DB_PER_NEPER * xp.log(x)


def db_to_linear(x_db: Array, xp=np) -> Array:
    """10^(x/10), written as exp(x ln10 / 10)."""
    return xp.exp(x_db / DB_PER_NEPER)


def dbm_to_watt(x_dbm):
    """Power in dBm (or a power density in dBm/Hz) to watts (W/Hz): 10^((x - 30) / 10)."""
    return 10.0 ** ((x_dbm - 30.0) / 10.0)


def bandwidth_shares(weights: Array, participate: Array, xp=np) -> Array:
    """FDMA shares beta_n = x_n w_n / sum_m x_m w_m (all zero when nobody takes part).

    ``weights`` are the positive weights w(b_n) of the chosen bandwidth levels, ``participate``
    the 0/1 participation of the devices (device axis first). The shares are non-negative and
    sum to 1 (or 0 for an empty round), so sum beta_n <= 1 always holds.
    """
    w = weights * participate
    total = xp.sum(w, axis=0)
    return w / xp.where(total > 0, total, 1.0)


def uplink_rate(beta: Array, gain: Array, bandwidth_hz, tx_power_w, noise_psd_w_hz, xp=np) -> Array:
    """R_ul = beta B log2(1 + p G / (N0 beta B)) bit/s; 0 where beta = 0.

    Increasing in beta (more spectrum outweighs the lower SNR per hertz) and in G.
    """
    safe = xp.where(beta > 0, beta, 1.0)
    snr = tx_power_w * gain / (noise_psd_w_hz * safe * bandwidth_hz)
    return xp.where(beta > 0, safe * bandwidth_hz * xp.log1p(snr) / LN2, 0.0)


def downlink_spectral_efficiency(gain: Array, bandwidth_hz, bs_power_w, noise_psd_w_hz, xp=np) -> Array:
    """log2(1 + P_bs G / (N0 B)) bit/s/Hz: the downlink SNR does not depend on the share beta."""
    return xp.log1p(bs_power_w * gain / (noise_psd_w_hz * bandwidth_hz)) / LN2


def downlink_rate(beta: Array, gain: Array, bandwidth_hz, bs_power_w, noise_psd_w_hz, xp=np) -> Array:
    """R_dl = beta B log2(1 + P_bs beta G / (N0 beta B)) = beta B log2(1 + P_bs G / (N0 B)) bit/s."""
    return beta * bandwidth_hz * downlink_spectral_efficiency(gain, bandwidth_hz, bs_power_w, noise_psd_w_hz, xp)


# ---------------------------------------------------------------------------------------------
# Model sizes, payloads, compute, memory
# ---------------------------------------------------------------------------------------------
def model_counts(model, peft=None, l: int = 2, r: int = 2) -> dict:
    """Parameter counts of the FedPEAT split of ``model`` (a GPT2Config) with a PeftConfig.

    Returns ``p_emb`` (token + position embeddings), ``p_blk`` (one block), ``p_peft``
    (trainable PEFT parameters living in the adapter), ``n_adapter`` = l + r and
    ``k_full`` = n_layer - l - r (the number of middle blocks: the emulator with k = k_full is the
    full model). The PEFT module lives in the adapter blocks: a PeftConfig without ``layers``
    is placed on ``adapter_layers(n_layer, l, r)``; explicit ``layers`` must lie in the adapter.
    """
    from fedpeat_jax.config import PeftConfig, adapter_layers

    peft = PeftConfig() if peft is None else peft
    adapter = adapter_layers(model.n_layer, l, r)  # validates l, r against the model
    if peft.layers is None:
        peft = peft.replace(layers=adapter)
    elif peft.kind != "prompt":
        outside = [i for i in peft.layers if i not in adapter]
        if outside:
            raise ValueError(
                f"PEFT layers {outside} lie outside the adapter blocks {adapter} (l={l}, r={r}); "
                "in emulator-assisted tuning only the adapter is trained"
            )
    peft.validate(model)
    return {
        "p_emb": int(model.embedding_param_count()),
        "p_blk": int(model.block_param_count()),
        "p_peft": int(peft.param_count(model)),
        "n_adapter": int(l + r),
        "k_full": int(model.n_layer - l - r),
    }


def device_param_count(k: Array, p_emb, p_blk, n_adapter) -> Array:
    """P_dev(k) = P_emb + (l + r + k) P_blk: parameters held by a device with a k-block emulator."""
    return p_emb + (n_adapter + k) * p_blk


def emulator_bits(k: Array, p_emb, p_blk, n_adapter, q_bits) -> Array:
    """S_emu(k) = q P_dev(k) bits: the emulator (adapter + compressed middle) download."""
    return q_bits * device_param_count(k, p_emb, p_blk, n_adapter)


def peft_bits(p_peft, q_bits) -> Array:
    """S_peft = q P_peft bits: the PEFT state, sent down and up every round a device takes part."""
    return q_bits * p_peft


def flops_per_token(p_dev: Array, p_peft) -> Array:
    """Training FLOPs per token: 4 P_dev + 2 P_peft (frozen emulator, PEFT weight gradients)."""
    return 4.0 * p_dev + 2.0 * p_peft


def tokens_per_round(local_steps, batch_size, seq_len):
    """Tokens a participant processes per round: local_steps * batch * seq_len."""
    return local_steps * batch_size * seq_len


def compute_time(tokens, flops_token: Array, flops_per_s: Array, utilization) -> Array:
    """T_cmp = tokens * FLOPs/token / (f * utilization) seconds."""
    return tokens * flops_token / (flops_per_s * utilization)


def activation_bytes(n_blocks: Array, batch_size, seq_len, n_embd, n_head) -> Array:
    """Activation memory batch * seq * d * (34 + 5 a seq / d) bytes per block, times n_blocks."""
    per_block = batch_size * seq_len * n_embd * (34.0 + 5.0 * n_head * seq_len / n_embd)
    return per_block * n_blocks


def device_memory_bytes(
    k: Array, p_emb, p_blk, n_adapter, p_peft, q_bits, batch_size, seq_len, n_embd, n_head
) -> Array:
    """M(k) = (q/8) P_dev(k) + 16 P_peft + activations over the l + r + k on-device blocks, bytes.

    16 bytes per trainable parameter: fp32 master weight, gradient and two Adam moments.
    """
    weights = (q_bits / 8.0) * device_param_count(k, p_emb, p_blk, n_adapter)
    return weights + 16.0 * p_peft + activation_bytes(n_adapter + k, batch_size, seq_len, n_embd, n_head)


def exchange_indicator(stored_level: Array, chosen_level: Array, participate: Array) -> Array:
    """x_n = 1 iff device n takes part and its stored emulator differs from the chosen one.

    ``stored_level`` is -1 for a device that holds no emulator yet.
    """
    return participate * (stored_level != chosen_level)


def device_latency(
    exchange: Array, s_emu: Array, s_peft, rate_dl: Array, t_cmp: Array, rate_ul: Array, participate: Array, xp=np
) -> Array:
    """T_n = x_n S_emu / R_dl + S_peft / R_dl + T_cmp + S_peft / R_ul for participants, else 0."""
    on = participate > 0
    r_dl = xp.where(on, rate_dl, 1.0)
    r_ul = xp.where(on, rate_ul, 1.0)
    t = (exchange * s_emu + s_peft) / r_dl + t_cmp + s_peft / r_ul
    return xp.where(on, t, 0.0)


def download_time(exchange: Array, s_emu: Array, s_peft, rate_dl: Array, participate: Array, xp=np) -> Array:
    """(x_n S_emu + S_peft) / R_dl: the part of T_n before local training starts (0 for non-participants)."""
    on = participate > 0
    return xp.where(on, (exchange * s_emu + s_peft) / xp.where(on, rate_dl, 1.0), 0.0)


def stragglers(latency: Array, deadline, participate: Array) -> Array:
    """1.0 for a participant whose round time exceeds the deadline (dropped from the round), else 0."""
    return participate * (latency > deadline)


def round_latency(device_latencies: Array, server_latency: Array, deadline=np.inf, xp=np) -> Array:
    """Synchronous round latency: max over the devices' (axis 0) and the server's latency (0 = idle),
    each capped at the deadline (a straggler is dropped when the deadline passes)."""
    slowest = xp.maximum(xp.max(device_latencies, axis=0), server_latency)
    return xp.minimum(slowest, deadline)


# ---------------------------------------------------------------------------------------------
# Perplexity surrogate
# ---------------------------------------------------------------------------------------------
def interp_clamped(x: Array, xs: Array, ys: Array, xp=np) -> Array:
    """Piecewise-linear interpolation through knots (xs, ys), constant outside [xs[0], xs[-1]].

    Same values as ``numpy.interp`` for strictly increasing ``xs``, written branch-free as
    y_0 + sum_i (y_{i+1} - y_i) / (x_{i+1} - x_i) clip(x - x_i, 0, x_{i+1} - x_i), so it needs no
    search. The knot axis is axis 0 of ``xs`` and ``ys``; batch axes trail and broadcast with x.
    """
    out = ys[0] + 0.0 * x
    for i in range(xs.shape[0] - 1):
        width = xs[i + 1] - xs[i]
        out = out + (ys[i + 1] - ys[i]) / width * xp.clip(x - xs[i], 0.0, width)
    return out


def surrogate_perplexity(ppl_prev: Array, ppl_inf: Array, eta: Array, data_fraction: Array, xp=np) -> Array:
    """One source: ppl_t = ppl_inf + (ppl_{t-1} - ppl_inf) exp(-eta data_fraction); unchanged for no data."""
    return ppl_inf + (ppl_prev - ppl_inf) * xp.exp(-eta * data_fraction)


def drifting_fixed_point(
    ppl_inf: Array, drift: Array, repeat_share: Array, fraction: Array, xp=np, drift_fresh: Array = 0.0
) -> Array:
    """The devices' fixed point when few devices train: the model drifts towards their own data,
    away from the held-out text. ``ppl_inf + (drift * repeat_share + drift_fresh * (1 - repeat_share))
    * (1/fraction - 1)``: ``drift`` for data that also trained last round, ``drift_fresh`` (default 0)
    for data that did not; 0 extra when every device took part (fraction 1); ``fraction`` 0 gives
    ``ppl_inf`` (such a round has no device pull)."""
    safe = xp.where(fraction > 0, fraction, 1.0)
    return ppl_inf + (drift * repeat_share + drift_fresh * (1.0 - repeat_share)) * (1.0 / safe - 1.0)


def fraction_power(fraction: Array, exponent: Array, xp=np) -> Array:
    """``fraction ** exponent`` for fractions in [0, 1], as ``fraction * fraction ** (exponent - 1)``:
    exactly ``fraction`` at exponent 1 (x ** 0 is 1), 0 at fraction 0, and a finite gradient in the
    exponent everywhere (no log 0)."""
    safe = xp.where(fraction > 0, fraction, 1.0)
    return fraction * safe ** (exponent - 1.0)


def two_source_perplexity(
    ppl_prev: Array,
    dev_ppl_inf: Array,
    dev_eta: Array,
    dev_fraction: Array,
    srv_ppl_inf: Array,
    srv_eta: Array,
    srv_fraction: Array,
    xp=np,
    dev_exponent: Array = 1.0,
) -> Array:
    """Devices and server data pulling together (module docstring), each pull weighted by its FedAvg weight.

    ppl_t = ppl_{t-1} + (P* - ppl_{t-1}) (1 - exp(-A)); unchanged when nobody brings data. The
    devices' pull grows as ``dev_fraction ** dev_exponent`` (default 1: in proportion to their data).
    """
    total = dev_fraction + srv_fraction
    safe = xp.where(total > 0, total, 1.0)
    dev_pull = dev_eta * fraction_power(dev_fraction, dev_exponent, xp) * (dev_fraction / safe)
    srv_pull = srv_eta * srv_fraction * (srv_fraction / safe)
    pull = dev_pull + srv_pull
    target = (dev_pull * dev_ppl_inf + srv_pull * srv_ppl_inf) / xp.where(pull > 0, pull, 1.0)
    return ppl_prev + (target - ppl_prev) * -xp.expm1(-pull)


__all__ = [
    "activation_bytes",
    "bandwidth_shares",
    "categorical_from_uniform",
    "channel_gain",
    "compute_time",
    "db_to_linear",
    "dbm_to_watt",
    "device_latency",
    "device_memory_bytes",
    "device_param_count",
    "distance_in_annulus",
    "distance_in_annulus_sq",
    "downlink_rate",
    "drifting_fixed_point",
    "downlink_spectral_efficiency",
    "download_time",
    "emulator_bits",
    "exchange_indicator",
    "flops_per_token",
    "fraction_power",
    "interp_clamped",
    "model_counts",
    "path_gain",
    "path_loss_db",
    "peft_bits",
    "random_walk_distance",
    "random_walk_distance_sq",
    "rayleigh_power",
    "round_latency",
    "stragglers",
    "surrogate_perplexity",
    "to_db",
    "tokens_per_round",
    "two_source_perplexity",
    "uniform_range",
    "uplink_rate",
]
