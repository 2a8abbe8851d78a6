"""Every number of the FedPEAT MEC environment: ``EnvParams``, presets, and how they are built.

``make_params(model, calibration, ...)`` reads the sizes from the GPT-2 config in use and the
perplexity response, the measured workload, the device population's data and the server's data
from a calibration table, then derives the reference scales (round deadline, latency and
perplexity scales of the reward). ``validate_params`` names the first invalid field. The
equations are in ``docs/system_model.md``; the default problem and why it has no trivial answer
are in its "The default problem" section.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment

from fedpeat_jax.mec import system
from fedpeat_jax.mec.calibration import CalibrationTable, resolve_table

MEM_HEADROOM = 1.05  # default memory classes: 5% above the need of the largest emulator each class holds


@struct.dataclass(kw_only=True)
class EnvParams(environment.EnvParams):
    """Every number of the environment. Build with :func:`make_params` / :func:`preset_params`.

    All fields but ``n_devices`` (static: it fixes array shapes) are pytree leaves, so a batch of
    parameters can be ``jax.vmap``-ped. The model-derived counts (p_emb, p_blk, p_peft,
    n_adapter, k_full, n_embd, n_head), the calibrated response (cal_*, srv_*, ppl0), the workload
    and the data sizes come from the GPT2Config, PeftConfig and calibration table given to
    ``make_params``; ``round_deadline``, ``latency_ref``, ``ppl_ref`` and ``ppl_best`` are derived.
    """

    max_steps_in_episode: int = 50
    n_devices: int = struct.field(pytree_node=False, default=10)
    # topology and mobility
    cell_radius: float = 500.0  # m
    min_distance: float = 10.0  # m
    mobility_step: float = 0.0  # m per round per axis (0: static devices)
    # radio
    bandwidth_hz: float = 20e6  # B, uplink and downlink each
    noise_psd_w_hz: float = system.dbm_to_watt(-174.0)
    device_power_w: float = 0.2  # p_n
    bs_power_w: float = 10.0  # P_bs (40 dBm)
    pl_const_db: float = 128.1
    pl_exp_db: float = 37.6
    min_fading: float = 1e-6
    bw_weights: jax.Array  # (L,) weight of bandwidth level 1..L (positive)
    # devices
    flops_min: float = 1e10  # phone-class CPUs training in float32: 10..100 GFLOP/s
    flops_max: float = 1e11
    utilization: float = 0.3
    mem_choices: jax.Array  # (C,) bytes
    data_min: float  # examples (make_params: the calibrated population's range)
    data_max: float
    # server (participant 0)
    server_flops: float = 100e12
    server_data: float  # examples of the server's own data
    server_enabled: float = 1.0
    srv_ppl_inf: float  # where the server's data pulls the perplexity (its domain's)
    srv_eta: float  # and how strongly, per unit of server data / all devices' data
    # the round
    round_deadline: float  # s: a participant not done by then is dropped (straggler)
    local_steps: float = 4.0
    batch_size: float = 2.0
    seq_len: float = 64.0
    q_bits: float = 16.0  # bits per parameter on the wire (emulator and PEFT) and in device memory
    # model (from GPT2Config / PeftConfig)
    p_emb: float
    p_blk: float
    p_peft: float
    n_adapter: float  # l + r
    k_full: float  # n_layer - l - r
    n_embd: float
    n_head: float
    level_k: jax.Array  # (m,) middle blocks of each emulator level
    # device rounds' perplexity response (from the calibration table)
    cal_k: jax.Array  # (K,)
    cal_ppl_inf: jax.Array  # (K,)
    cal_eta: jax.Array  # (K,)
    ppl0: float
    ppl_drift: float = 0.0  # rise of the devices' fixed point when the same few devices keep training (0: off)
    ppl_drift_fresh: float = 0.0  # the same for few devices that did not train last round (0: off)
    data_exponent: float = 1.0  # the devices' pull grows as (their data fraction) ** data_exponent (1: linearly)
    # reward: r = -(w_ppl g + w_latency T / latency_ref + w_memory mu) - w_violation n_viol - w_empty [empty]
    w_ppl: float = 1.0
    w_latency: float = 1.0
    w_memory: float = 0.1
    w_violation: float = 1.0
    w_empty: float = 1.0
    ppl_ref: float  # g = (ppl - ppl_best) / (ppl_ref - ppl_best): 1 at the start, 0 at the best
    ppl_best: float
    latency_ref: float  # make_params: the round deadline, so T / latency_ref lies in [0, 1]
    # observation scaling
    gain_db_center: float = -85.0
    gain_db_scale: float = 30.0


def _fields(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
PRESETS = {
    # The project's own foundation model with the workload, data and devices it was calibrated on.
    "default": dict(model="default"),
    # GPT-2 small shape (124M) on phones: activations make large emulators exceed small devices.
    "gpt2-small": dict(
        model="gpt2",
        local_steps=10.0,
        batch_size=16.0,
        seq_len=512.0,
        flops_min=1e12,
        flops_max=10e12,
        mem_choices_gb=(4.0, 6.0, 8.0, 12.0),
    ),
    # GPT-2 XL shape (1.5B): the emulator exchange dominates the latency.
    "gpt2-xl": dict(
        model="gpt2-xl",
        local_steps=10.0,
        batch_size=2.0,
        seq_len=1024.0,
        flops_min=1e12,
        flops_max=10e12,
        mem_choices_gb=(4.0, 6.0, 8.0, 12.0),
    ),
}


def _model_config(model):
    from fedpeat_jax.config import GPT2Config

    if isinstance(model, GPT2Config):
        return model
    if isinstance(model, str):
        return GPT2Config.preset(model)
    raise TypeError(f"model must be a GPT2Config or a GPT-2 preset name, got {type(model).__name__}")


def make_params(
    model="default",
    calibration: Union[CalibrationTable, str, Any, None] = None,
    *,
    peft=None,
    l: int = 2,
    r: int = 2,
    n_devices: int = 10,
    emulator_k: Optional[tuple] = None,
    bw_levels: int = 4,
    bw_weights: Optional[tuple] = None,
    mem_choices_gb: Optional[tuple] = None,
    server_domain: Optional[str] = None,
    participation_drift: bool = False,
    **overrides,
) -> EnvParams:
    """Environment parameters for ``model`` (GPT2Config or preset name) and a calibration table.

    calibration:    CalibrationTable, path to its JSON, or None for the shipped default table
                    (``CalibrationMissingError`` when there is none yet).
    peft:           PeftConfig (default LoRA r=4 on the four targets) placed in the adapter blocks.
    emulator_k:     the emulator levels offered to devices (default: all levels of the table); each
                    must be a calibrated level.
    bw_levels / bw_weights: L bandwidth levels with weights 1..L, or explicit positive weights.
    mem_choices_gb: device memory capacities (GB = 1e9 bytes), drawn uniformly per device. Default:
                    one class per emulator level, 5% above that level's need, so a device of class
                    j holds the emulators up to level j.
    server_domain:  which of the table's server data domains the server holds (default: the
                    table's ``server_domain``); sets ``srv_ppl_inf``, ``srv_eta``, ``server_data``.
    participation_drift: use the table's ``drift`` (``ppl_drift``): the devices' fixed point rises
                    when the same few devices keep training. Off by default (the default problem's
                    dynamics); the live environment turns it on (``LiveConfig.participation_drift``).
    overrides:      any other EnvParams field (e.g. cell_radius=300.0, w_latency=0.5).
    The workload (local_steps, batch_size, seq_len), the devices' data range (data_min, data_max)
    and the server's data default to what the table measured; ``round_deadline`` to
    :func:`reference_latency`, ``latency_ref`` to the deadline, ``ppl_ref`` to ppl0 and
    ``ppl_best`` to the lowest fixed point of the table (devices' levels and the server's domain).
    """
    if not (isinstance(n_devices, (int, np.integer)) and n_devices >= 1):
        raise ValueError(f"invalid EnvParams: n_devices must be an integer >= 1 (no devices), got {n_devices!r}")
    cfg = _model_config(model)
    table = resolve_table(calibration)
    table.check_model(cfg, l, r)
    counts = system.model_counts(cfg, peft, l, r)

    ks = tuple(table.k) if emulator_k is None else tuple(int(k) for k in emulator_k)
    if not ks:
        raise ValueError("emulator_k must name at least one emulator level")
    bad = [k for k in ks if not 0 <= k <= counts["k_full"]]
    if bad:
        raise ValueError(
            f"emulator level(s) k={bad} do not exist for {cfg.n_layer}-block model with l={l}, r={r} "
            f"(valid: 0..{counts['k_full']} middle blocks)"
        )
    uncal = [k for k in ks if k not in table.k]
    if uncal:
        raise ValueError(
            f"emulator level(s) k={uncal} have no entry in the calibration table (calibrated: {list(table.k)})"
        )
    if bw_weights is None:
        if int(bw_levels) < 1:
            raise ValueError(f"bw_levels must be >= 1, got {bw_levels}")
        bw_weights = tuple(float(b) for b in range(1, int(bw_levels) + 1))
    srv = table.server_response(server_domain)

    unknown = sorted(set(overrides) - set(_fields(EnvParams)))
    if unknown:
        raise ValueError(f"unknown EnvParams field(s) {unknown}; valid fields: {sorted(_fields(EnvParams))}")
    workload = {**table.workload, **{k: overrides[k] for k in table.workload if k in overrides}}
    if workload["seq_len"] > cfg.n_positions:
        raise ValueError(f"seq_len ({workload['seq_len']}) exceeds the model's n_positions ({cfg.n_positions})")

    f32 = lambda x: jnp.asarray(np.asarray(x, dtype=np.float64), dtype=jnp.float32)  # noqa: E731
    values = dict(
        n_devices=int(n_devices),
        bw_weights=f32(bw_weights),
        mem_choices=f32([0.0]),  # placeholder until the memory needs are known (below)
        data_min=float(min(table.population)),
        data_max=float(max(table.population)),
        server_data=srv.data,
        srv_ppl_inf=srv.ppl_inf,
        srv_eta=srv.eta,
        round_deadline=1.0,  # placeholder: derived below unless given
        p_emb=float(counts["p_emb"]),
        p_blk=float(counts["p_blk"]),
        p_peft=float(counts["p_peft"]),
        n_adapter=float(counts["n_adapter"]),
        k_full=float(counts["k_full"]),
        n_embd=float(cfg.n_embd),
        n_head=float(cfg.n_head),
        level_k=f32(ks),
        cal_k=f32(table.k),
        cal_ppl_inf=f32(table.ppl_inf),
        cal_eta=f32(table.eta),
        ppl0=float(table.ppl0),
        ppl_drift=float(table.drift) if participation_drift else 0.0,
        ppl_ref=float(table.ppl0),
        ppl_best=float(min(min(table.ppl_inf), srv.ppl_inf)),
        latency_ref=1.0,  # placeholder: the deadline, below
        **{k: float(v) for k, v in workload.items()},
    )
    values.update(overrides)
    params = EnvParams(**values)
    if mem_choices_gb is None:
        mem_choices = MEM_HEADROOM * np.asarray(level_memory_bytes(jax.tree.map(np.asarray, params)), np.float64)
    else:
        mem_choices = [g * 1e9 for g in mem_choices_gb]
    params = params.replace(mem_choices=f32(mem_choices))
    if "round_deadline" not in overrides:
        params = params.replace(round_deadline=reference_latency(params))
    if "latency_ref" not in overrides:
        params = params.replace(latency_ref=float(params.round_deadline))
    validate_params(params)
    return params


def preset_params(name: str = "default", calibration=None, **overrides) -> EnvParams:
    """:func:`make_params` for a named preset: 'default' (the project's model), 'gpt2-small', 'gpt2-xl'."""
    if name not in PRESETS:
        raise ValueError(f"unknown MEC preset {name!r}; choose one of {sorted(PRESETS)}")
    return make_params(calibration=calibration, **{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Derived scales
# ---------------------------------------------------------------------------------------------
def level_memory_bytes(params: EnvParams):
    """Device memory need of every emulator level (m,), bytes (the environment's formula)."""
    p = params
    return system.device_memory_bytes(
        p.level_k, p.p_emb, p.p_blk, p.n_adapter, p.p_peft, p.q_bits, p.batch_size, p.seq_len, p.n_embd, p.n_head
    )


def reference_latency(params: EnvParams) -> float:
    """A typical device's round with the largest emulator, including its exchange (the default deadline).

    The device sits at the median distance R / sqrt(2), has unit fading, the mean compute speed
    and an equal 1/N bandwidth share.
    """
    p = jax.tree.map(np.asarray, params)
    n = params.n_devices
    k = np.max(p.level_k)
    gain = system.channel_gain(1.0, p.cell_radius / math.sqrt(2.0), p.pl_const_db, p.pl_exp_db)
    beta = 1.0 / n
    s_emu = system.emulator_bits(k, p.p_emb, p.p_blk, p.n_adapter, p.q_bits)
    s_peft = system.peft_bits(p.p_peft, p.q_bits)
    tokens = system.tokens_per_round(p.local_steps, p.batch_size, p.seq_len)
    fpt = system.flops_per_token(system.device_param_count(k, p.p_emb, p.p_blk, p.n_adapter), p.p_peft)
    t_cmp = system.compute_time(tokens, fpt, 0.5 * (p.flops_min + p.flops_max), p.utilization)
    r_dl = system.downlink_rate(beta, gain, p.bandwidth_hz, p.bs_power_w, p.noise_psd_w_hz)
    r_ul = system.uplink_rate(beta, gain, p.bandwidth_hz, p.device_power_w, p.noise_psd_w_hz)
    return float(system.device_latency(1.0, s_emu, s_peft, r_dl, t_cmp, r_ul, 1.0))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def validate_params(params: EnvParams) -> None:
    """Raise ValueError naming the first invalid field.

    Works on one parameter set and on a stack built for ``jax.vmap`` (batch axes leading).
    """

    def arr(name):
        return np.asarray(getattr(params, name), dtype=np.float64)

    def need(ok, message):
        if not bool(np.all(ok)):
            raise ValueError(f"invalid EnvParams: {message}")

    n = params.n_devices
    need(isinstance(n, (int, np.integer)) and n >= 1, f"n_devices must be an integer >= 1 (no devices), got {n!r}")
    need(arr("max_steps_in_episode") >= 1, "max_steps_in_episode must be >= 1")
    bw = arr("bw_weights")
    need(bw.ndim >= 1 and bw.shape[-1] >= 1, f"bw_weights must hold at least one bandwidth level, got shape {bw.shape}")
    need(
        np.isfinite(bw) & (bw > 0),
        f"bandwidth level weights must be finite and > 0 so shares can be normalized, got {bw}",
    )
    for name in (
        "bandwidth_hz",
        "noise_psd_w_hz",
        "device_power_w",
        "bs_power_w",
        "utilization",
        "flops_min",
        "server_flops",
        "data_min",
        "local_steps",
        "batch_size",
        "seq_len",
        "q_bits",
        "min_distance",
        "min_fading",
        "round_deadline",
        "latency_ref",
        "gain_db_scale",
        "p_emb",
        "p_blk",
        "n_embd",
        "n_head",
    ):
        v = arr(name)
        need(np.isfinite(v) & (v > 0), f"{name} must be finite and > 0, got {v}")
    need(arr("utilization") <= 1.0, "utilization must be in (0, 1]")
    need(arr("flops_max") >= arr("flops_min"), "flops_max must be >= flops_min")
    need(arr("data_max") >= arr("data_min"), "data_max must be >= data_min")
    need(arr("cell_radius") > arr("min_distance"), "cell_radius must exceed min_distance")
    need(arr("mobility_step") >= 0, "mobility_step must be >= 0")
    need(arr("server_data") >= 0, "server_data must be >= 0")
    need((arr("server_enabled") == 0) | (arr("server_enabled") == 1), "server_enabled must be 0 or 1")
    need(arr("p_peft") >= 0, "p_peft must be >= 0")
    mem = arr("mem_choices")
    need(
        mem.ndim >= 1 and mem.shape[-1] >= 1 and np.all(mem > 0), f"mem_choices must be positive capacities, got {mem}"
    )
    for name in ("w_ppl", "w_latency", "w_memory", "w_violation", "w_empty"):
        need(np.isfinite(arr(name)) & (arr(name) >= 0), f"{name} must be finite and >= 0")
    k_full = arr("k_full")
    lk = arr("level_k")
    need(lk.ndim >= 1 and lk.shape[-1] >= 1, "level_k must hold at least one emulator level")
    need(
        (lk >= 0) & (lk <= k_full[..., None]) & (lk == np.round(lk)),
        f"emulator level(s) level_k={lk} do not exist for the model (valid: integers 0..{k_full} middle blocks)",
    )
    ck, cp, ce = arr("cal_k"), arr("cal_ppl_inf"), arr("cal_eta")
    need(
        ck.shape == cp.shape == ce.shape and ck.shape[-1] >= 1, "cal_k, cal_ppl_inf, cal_eta must have one equal length"
    )
    need(np.diff(ck, axis=-1) > 0, f"calibration levels cal_k must be strictly increasing, got {ck}")
    need(np.isin(lk, ck), f"emulator level(s) {lk} lack a calibration entry (calibrated k: {ck})")
    need(np.isfinite(cp) & (cp >= 1), "calibration ppl_inf must be finite perplexities >= 1")
    need(np.isfinite(ce) & (ce > 0), "calibration eta must be finite and > 0")
    need(np.isfinite(arr("srv_ppl_inf")) & (arr("srv_ppl_inf") >= 1), "srv_ppl_inf must be a finite perplexity >= 1")
    need(np.isfinite(arr("srv_eta")) & (arr("srv_eta") >= 0), "srv_eta must be finite and >= 0")
    need(np.isfinite(arr("ppl0")) & (arr("ppl0") >= 1), "ppl0 must be a finite perplexity >= 1")
    need(np.isfinite(arr("ppl_drift")), "ppl_drift must be finite")
    need(np.isfinite(arr("ppl_drift_fresh")), "ppl_drift_fresh must be finite")
    need(np.isfinite(arr("data_exponent")) & (arr("data_exponent") > 0), "data_exponent must be finite and > 0")
    need(
        np.isfinite(arr("ppl_ref")) & np.isfinite(arr("ppl_best")) & (arr("ppl_ref") > arr("ppl_best")),
        f"ppl_ref ({arr('ppl_ref')}) must exceed ppl_best ({arr('ppl_best')}): they span the perplexity term of the reward",
    )


__all__ = [
    "EnvParams",
    "MEM_HEADROOM",
    "PRESETS",
    "level_memory_bytes",
    "make_params",
    "preset_params",
    "reference_latency",
    "validate_params",
]
