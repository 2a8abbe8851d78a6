"""`FedPEATMEC`: the FedPEAT mobile-edge-computing control problem as a gymnax 1.x environment.

One step is one federated round. Every round an agent chooses, for the server (participant 0)
and N devices, who takes part, which emulator each device trains on and its bandwidth share; the
round then costs latency (radio + compute, synchronous), memory, and moves the plug-in perplexity
along the calibrated response model. The physics is :mod:`fedpeat_jax.mec.system`; the numpy
twin :mod:`fedpeat_jax.mec.twin` runs the same model as a ``gymnasium.Env``.

Participants
------------
* **Server (participant 0)** owns the full model and sits at the base station, wired: it has no
  radio cost, trains the same PEFT module on the full model (k = k_full middle blocks) at
  ``server_flops``, contributes ``server_data`` samples and is not memory-constrained. Its only
  decision is whether it takes part (``server_enabled = 0`` removes it).
* **Devices 1..N** are drawn at reset: distance uniform in the annulus [min_distance, cell_radius]
  around the base station, compute speed f ~ U[flops_min, flops_max], memory capacity uniform from
  ``mem_choices``, data size D ~ U[data_min, data_max] samples; they start with no emulator.
  Each round they may move (random walk of ``mobility_step`` metres) and their Rayleigh fading is
  redrawn. The state holds the channel of the *coming* round, which the agent observes.

Action (int32 vector of length 3N + 1, branch-major; ``action_nvec`` gives the branch sizes)
-------------------------------------------------------------------------------------------
    [0]              server takes part         {0, 1}
    [1 .. N]         device n takes part       {0, 1}          (index n for device n = 1..N)
    [N+1 .. 2N]      device emulator level     {0 .. m-1}      (level -> k = level_k[level])
    [2N+1 .. 3N]     device bandwidth level    {0 .. L-1}      (index b is level b + 1 of 1..L,
                                                                weight bw_weights[b])
Shares beta_n = x_n w_n / sum_m x_m w_m. Out-of-range entries are clipped into range.

Observation (float32 vector of length 7N + 4, feature-major)
------------------------------------------------------------
    [0N:1N]  channel gain (G_dB - gain_db_center) / gain_db_scale
    [1N:2N]  distance / cell_radius
    [2N:3N]  compute speed / flops_max
    [3N:4N]  memory capacity / max(mem_choices)
    [4N:5N]  data size / data_max
    [5N:6N]  stored emulator (level + 1) / m   (0: none stored)
    [6N:7N]  took part last round {0, 1}
    [7N+0]   t / T
    [7N+1]   perplexity / ppl_ref
    [7N+2]   last round latency / latency_ref
    [7N+3]   server took part last round {0, 1}

Reward
------
    r = -(w_ppl ppl_t / ppl_ref + w_latency T_round / latency_ref + w_memory mean_n(M_n / Mcap_n))
        - w_violation * (#devices with M_n > Mcap_n) - w_empty * [nobody took part]
The memory mean runs over participating devices. A device whose memory need exceeds its capacity
fails: it counts as a violation and its data does not reach the model, yet its whole time
(download, compute, upload) still counts in the round's latency. The perplexity uses the
data-weighted mean emulator size kbar of the successful participants (server: k_full) and
data_fraction = their data / all data (devices + server); ppl_inf and eta are interpolated
linearly in k between the calibrated levels and held constant beyond them (a server with k_full
above the table's largest k counts as that level).

Episodes are truncated after ``max_steps_in_episode`` rounds (T = 50); there is no natural
termination. ``step`` auto-resets like every gymnax environment.

Random numbers
--------------
Each step draws U[0, 1) numbers ``u`` of shape (5, N) from its key (``draw``: a counter-based
hash of the key bits, see :func:`hash_bits`). Rows: 0 fading | 1 random-walk x, or a fresh
device's distance | 2 walk y, or its speed | 3 its memory capacity | 4 its data size. The stepped
state and the auto-reset state are alternatives, so they share the draws; the next round's
distance and channel are computed once, after the auto-reset selection. ``step_with_draws`` and
``reset_with_draws`` take the draws explicitly: the numpy twin is fed the very same numbers.

Batches (layout)
----------------
Every function of the step is written for arrays whose own axes lead and whose batch axes
TRAIL: device arrays (N, *B), actions (3N + 1, *B), observations (7N + 4, *B), table params
(m, *B). Single environments are the case B = (). This "structure of arrays" keeps the
environment axis contiguous, which vectorizes on a CPU (about 3x faster than vmap's default of
batching every primitive with the env axis leading). Two ways to batch:

* ``jax.vmap(env.step)`` — the usual gymnax way (state leaves (E, N), obs (E, 7N + 4)); a
  custom vmap rule moves the batch axis to the end, runs the native batched step once and moves
  it back. Params may be vmapped too (``in_axes=(0, 0, 0, 0)``).
* ``env.reset_batch(key, E)`` / ``env.step_batch(key, state, action)`` — the native layout
  directly (state leaves (N, E), action (3N + 1, E), obs (7N + 4, E)), one key per step for
  the whole batch: no transposes, the fastest path.

Live mode
---------
How the round moves the perplexity is isolated in :meth:`FedPEATMEC.learn` (state, params,
:class:`RoundOutcome`) -> (perplexity, learner, info). Here it is the calibrated surrogate;
:class:`fedpeat_jax.mec.live.LiveFedPEATMEC` overrides it with a real jitted FedPEAT round of
the chosen devices and emulator sizes, keeping the federated server state in ``state.learner``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from fedpeat_jax.hashrand import hash_bits, typed_key
from fedpeat_jax.mec import system
from fedpeat_jax.mec.calibration import CalibrationTable, resolve_table

ENV_ID = "FedPEAT-MEC-v0"
N_DRAWS = 5  # rows of the per-step draw: fading, walk-x | distance, walk-y | speed, memory, data
N_DEVICE_FEATURES = 7
N_GLOBAL_FEATURES = 4
GB = 1e9


# ---------------------------------------------------------------------------------------------
# State and parameters
# ---------------------------------------------------------------------------------------------
@struct.dataclass
class EnvState(environment.EnvState):
    """Per-episode state; device arrays have shape (N, *B), ``took_part`` (N + 1, *B) with the
    server first, scalars (*B); B = () for one environment (see "Batches" in the module doc)."""

    distance: jax.Array      # (N,) m from the base station
    gain: jax.Array          # (N,) linear channel gain of the coming round
    flops: jax.Array         # (N,) FLOP/s
    mem_capacity: jax.Array  # (N,) bytes
    data: jax.Array          # (N,) local data size, samples
    stored_level: jax.Array  # (N,) int32 emulator level held by the device, -1 = none
    took_part: jax.Array     # (N + 1,) float32: server, devices 1..N in the last round
    ppl: jax.Array           # () plug-in perplexity after the last round
    last_latency: jax.Array  # () s
    time: jax.Array          # () int32 rounds done in this episode
    learner: Any = None      # live mode: the federated server state; None for the surrogate


class RoundOutcome(NamedTuple):
    """What a round's choices gave the learning side (:meth:`FedPEATMEC.learn`)."""

    k_bar: jax.Array           # () data-weighted mean emulator size of the successful participants
    data_fraction: jax.Array   # () their data / all data (devices + server)
    succeeded: jax.Array       # (N,) float32 1 for a device that took part within its memory
    level: jax.Array           # (N,) int32 emulator level chosen for each device
    server: jax.Array          # () float32 1 when the server took part


@struct.dataclass(kw_only=True)
class EnvParams(environment.EnvParams):
    """Every number of the environment. Build with :func:`make_params` / :func:`preset_params`.

    All fields but ``n_devices`` (static: it fixes array shapes) are pytree leaves, so a batch of
    parameters can be ``jax.vmap``-ped. The model-derived counts (p_emb, p_blk, p_peft,
    n_adapter, k_full, n_embd, n_head) and the calibration arrays come from the GPT2Config,
    PeftConfig and calibration table given to ``make_params``.
    """

    max_steps_in_episode: int = 50
    n_devices: int = struct.field(pytree_node=False, default=10)
    # topology and mobility
    cell_radius: float = 500.0         # m
    min_distance: float = 10.0         # m
    mobility_step: float = 0.0         # m per round per axis (0: static devices)
    # radio
    bandwidth_hz: float = 20e6         # B, uplink and downlink each
    noise_psd_w_hz: float = system.dbm_to_watt(-174.0)
    device_power_w: float = 0.2        # p_n
    bs_power_w: float = 10.0           # P_bs (40 dBm)
    pl_const_db: float = 128.1
    pl_exp_db: float = 37.6
    min_fading: float = 1e-6
    bw_weights: jax.Array              # (L,) weight of bandwidth level 1..L (positive)
    # devices
    flops_min: float = 1e12
    flops_max: float = 10e12
    utilization: float = 0.3
    mem_choices: jax.Array             # (C,) bytes
    data_min: float = 200.0
    data_max: float = 1000.0
    # server (participant 0)
    server_flops: float = 100e12
    server_data: float = 600.0
    server_enabled: float = 1.0
    # workload per round
    local_steps: float = 10.0
    batch_size: float = 16.0
    seq_len: float = 256.0
    q_bits: float = 16.0
    # model (from GPT2Config / PeftConfig)
    p_emb: float
    p_blk: float
    p_peft: float
    n_adapter: float                  # l + r
    k_full: float                     # n_layer - l - r
    n_embd: float
    n_head: float
    level_k: jax.Array                # (m,) middle blocks of each emulator level
    # perplexity response (from the calibration table)
    cal_k: jax.Array                  # (K,)
    cal_ppl_inf: jax.Array            # (K,)
    cal_eta: jax.Array                # (K,)
    ppl0: float
    # reward
    w_ppl: float = 1.0
    w_latency: float = 1.0
    w_memory: float = 1.0
    w_violation: float = 1.0
    w_empty: float = 5.0
    ppl_ref: float = 1.0
    latency_ref: float = 1.0
    # observation scaling
    gain_db_center: float = -85.0
    gain_db_scale: float = 30.0


def _halves(h: jax.Array, rows: int) -> jax.Array:
    """Split words (R, ...) into 16-bit halves: rows 2i, 2i+1 from the high and low half of word i."""
    hi, lo = h >> 16, h & jnp.uint32(0xFFFF)
    return jnp.stack([hi, lo], axis=1).reshape((-1,) + h.shape[1:])[:rows]


def _lookup(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[clip(index, 0, len - 1)] for a short table (axis 0), as a chain of selects.

    Selects vectorize over devices and environments; a gather does not. Batch axes trail in
    both ``table`` (len, *B) and ``index`` (N, *B).
    """
    out = jnp.broadcast_to(table[0], jnp.broadcast_shapes(index.shape, jnp.shape(table[0])))
    for j in range(1, table.shape[0]):
        out = jnp.where(index >= j, table[j], out)
    return out


def _fields(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


# ---------------------------------------------------------------------------------------------
# Building and validating parameters
# ---------------------------------------------------------------------------------------------
PRESETS = {
    # The project's own foundation model (GPT2Config preset 'default').
    "default": dict(model="default", batch_size=16.0, seq_len=256.0),
    # GPT-2 small shape (124M): activations make large emulators exceed small devices.
    "gpt2-small": dict(model="gpt2", batch_size=16.0, seq_len=512.0),
    # GPT-2 XL shape (1.5B): the emulator exchange dominates the latency.
    "gpt2-xl": dict(model="gpt2-xl", batch_size=2.0, seq_len=1024.0),
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
    mem_choices_gb: tuple = (4.0, 6.0, 8.0, 12.0),
    **overrides,
) -> EnvParams:
    """Environment parameters for ``model`` (GPT2Config or preset name) and a calibration table.

    calibration: CalibrationTable, path to its JSON, or None for the shipped default table
                 (``CalibrationMissingError`` when there is none yet).
    peft:        PeftConfig (default LoRA r=4 on the four targets) placed in the adapter blocks.
    emulator_k:  the emulator levels offered to devices (default: all levels of the table); each
                 must be a calibrated level.
    bw_levels / bw_weights: L bandwidth levels with weights 1..L, or explicit positive weights.
    overrides:   any other EnvParams field (e.g. cell_radius=300.0, w_latency=0.5).
    Payload, compute and memory sizes are computed from the model, PEFT config and (l, r);
    ``ppl_ref`` defaults to the table's ppl0 and ``latency_ref`` to :func:`reference_latency`.
    """
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
        raise ValueError(f"emulator level(s) k={uncal} have no entry in the calibration table (calibrated: {list(table.k)})")
    if bw_weights is None:
        if int(bw_levels) < 1:
            raise ValueError(f"bw_levels must be >= 1, got {bw_levels}")
        bw_weights = tuple(float(b) for b in range(1, int(bw_levels) + 1))

    unknown = sorted(set(overrides) - set(_fields(EnvParams)))
    if unknown:
        raise ValueError(f"unknown EnvParams field(s) {unknown}; valid fields: {sorted(_fields(EnvParams))}")
    if "seq_len" in overrides and overrides["seq_len"] > cfg.n_positions:
        raise ValueError(f"seq_len ({overrides['seq_len']}) exceeds the model's n_positions ({cfg.n_positions})")

    f32 = lambda x: jnp.asarray(np.asarray(x, dtype=np.float64), dtype=jnp.float32)  # noqa: E731
    values = dict(
        n_devices=int(n_devices),
        bw_weights=f32(bw_weights),
        mem_choices=f32([g * GB for g in mem_choices_gb]),
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
        ppl_ref=float(table.ppl0),
    )
    values["seq_len"] = float(min(EnvParams.__dataclass_fields__["seq_len"].default, cfg.n_positions))
    values.update(overrides)
    params = EnvParams(**values)
    validate_params(params)
    if "latency_ref" not in overrides:
        params = params.replace(latency_ref=float(reference_latency(params)))
        validate_params(params)
    return params


def preset_params(name: str = "default", calibration=None, **overrides) -> EnvParams:
    """:func:`make_params` for a named preset: 'default' (the project's model), 'gpt2-small', 'gpt2-xl'."""
    if name not in PRESETS:
        raise ValueError(f"unknown MEC preset {name!r}; choose one of {sorted(PRESETS)}")
    return make_params(calibration=calibration, **{**PRESETS[name], **overrides})


def reference_latency(params: EnvParams) -> float:
    """Latency scale: a typical device's round with the largest emulator, including its exchange.

    The device sits at the median distance R / sqrt(2), has unit fading, the mean compute speed
    and an equal 1/N bandwidth share. Used as the default ``latency_ref`` of the reward and
    observation.
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
    need(np.isfinite(bw) & (bw > 0), f"bandwidth level weights must be finite and > 0 so shares can be normalized, got {bw}")
    for name in ("bandwidth_hz", "noise_psd_w_hz", "device_power_w", "bs_power_w", "utilization", "flops_min",
                 "server_flops", "data_min", "local_steps", "batch_size", "seq_len", "q_bits", "min_distance",
                 "min_fading", "ppl_ref", "latency_ref", "gain_db_scale", "p_emb", "p_blk", "n_embd", "n_head"):
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
    need(mem.ndim >= 1 and mem.shape[-1] >= 1 and np.all(mem > 0), f"mem_choices must be positive capacities, got {mem}")
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
    need(ck.shape == cp.shape == ce.shape and ck.shape[-1] >= 1, "cal_k, cal_ppl_inf, cal_eta must have one equal length")
    need(np.diff(ck, axis=-1) > 0, f"calibration levels cal_k must be strictly increasing, got {ck}")
    need(np.isin(lk, ck), f"emulator level(s) {lk} lack a calibration entry (calibrated k: {ck})")
    need(np.isfinite(cp) & (cp >= 1), "calibration ppl_inf must be finite perplexities >= 1")
    need(np.isfinite(ce) & (ce > 0), "calibration eta must be finite and > 0")
    need(np.isfinite(arr("ppl0")) & (arr("ppl0") >= 1), "ppl0 must be a finite perplexity >= 1")


def action_nvec(params: EnvParams) -> np.ndarray:
    """Branch sizes of the flat action: [2] * (N + 1) + [m] * N + [L] * N (see module docstring)."""
    n, m, L = params.n_devices, np.shape(params.level_k)[-1], np.shape(params.bw_weights)[-1]
    return np.array([2] * (n + 1) + [m] * n + [L] * n, dtype=np.int64)


def encode_action(participate, level, bandwidth, server: int = 1):
    """Flat action from per-device choices: (N,) participate {0,1}, (N,) level, (N,) bandwidth index."""
    xp = jnp if any(isinstance(a, jax.Array) for a in (participate, level, bandwidth)) else np
    s = xp.reshape(xp.asarray(server), (1,))
    return xp.concatenate([s, xp.asarray(participate), xp.asarray(level), xp.asarray(bandwidth)]).astype(xp.int32)


def decode_action(action, n_devices: int) -> dict:
    """Split a flat action into server, participate (N,), level (N,), bandwidth index (N,)."""
    n = n_devices
    return {
        "server": action[..., 0],
        "participate": action[..., 1 : n + 1],
        "level": action[..., n + 1 : 2 * n + 1],
        "bandwidth": action[..., 2 * n + 1 : 3 * n + 1],
    }


class MultiDiscrete(spaces.Space):
    """Jittable multi-discrete space: one categorical per entry with sizes ``nvec``."""

    def __init__(self, nvec):
        self.nvec = np.asarray(nvec, dtype=np.int32)
        self.shape = self.nvec.shape
        self.dtype = jnp.int32
        # vmapped over keys, sample natively (batch axis trailing) and transpose once
        self._sample = _with_trailing_batch_vmap(lambda key: self._from_bits(hash_bits(key, (self._words,))), per_env=(True,))

    @property
    def _words(self) -> int:
        return (self.shape[0] + 1) // 2

    def __repr__(self) -> str:
        return f"MultiDiscrete({self.nvec.tolist()})"

    def sample(self, key: jax.Array) -> jax.Array:
        """One uniformly random action (see ``sample_batch``); ``jax.vmap`` over keys batches natively."""
        return self._sample(typed_key(key))

    def sample_batch(self, key: jax.Array, batch_shape=()) -> jax.Array:
        """Samples of shape ``nvec.shape + batch_shape`` (batch axes trailing) from one key.

        Each branch takes 16 random bits v and returns (v n) >> 16: exactly uniform when n is a
        power of two, otherwise within n / 65536 of uniform.
        """
        batch_shape = tuple(int(b) for b in np.atleast_1d(batch_shape)) if np.ndim(batch_shape) or batch_shape else ()
        return self._from_bits(hash_bits(key, (self._words,) + batch_shape))

    def _from_bits(self, h: jax.Array) -> jax.Array:
        """(words, *B) uint32 -> (len(nvec), *B) actions from 16-bit halves."""
        (a,) = self.shape
        v = _halves(h, a)
        n = jnp.asarray(self.nvec, jnp.uint32).reshape((a,) + (1,) * (v.ndim - 1))
        return ((v * n) >> 16).astype(jnp.int32)

    def contains(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.logical_and(jnp.all(x >= 0), jnp.all(x < self.nvec))


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------
class FedPEATMEC(environment.Environment[EnvState, EnvParams]):
    """FedPEAT over mobile edge computing; see the module docstring for action/obs/reward.

    FedPEATMEC(params)                                   explicit EnvParams
    FedPEATMEC(preset="gpt2-xl", calibration=table, ...)  a preset (overrides go to make_params)
    FedPEATMEC()                                         'default' preset with the shipped table
    Invalid parameters raise ValueError here, at construction.

    ``final_observation=True`` adds gymnax's ``info["final_observation"]`` (the observation
    before the auto-reset, for bootstrapping at truncation); it costs a second channel and
    observation computation per step, so it is off by default.
    """

    native_batch = True  # offers reset_batch / step_batch (env axes trailing); SABPPO uses them

    def __init__(self, params: Optional[EnvParams] = None, *, preset: str = "default", calibration=None,
                 final_observation: bool = False, **overrides):
        super().__init__()
        if params is None:
            params = preset_params(preset, calibration=calibration, **overrides)
        elif calibration is not None or overrides:
            raise ValueError("pass either explicit EnvParams or preset/calibration/overrides, not both")
        if not isinstance(params, EnvParams):
            raise TypeError(f"params must be fedpeat_jax.mec.EnvParams, got {type(params).__name__}")
        validate_params(params)
        self._params = params
        self.final_observation = bool(final_observation)
        self.n_devices = params.n_devices
        self.n_levels = int(np.shape(params.level_k)[-1])
        self.n_bw_levels = int(np.shape(params.bw_weights)[-1])
        self.n_mem_choices = int(np.shape(params.mem_choices)[-1])
        self.obs_shape = (N_DEVICE_FEATURES * self.n_devices + N_GLOBAL_FEATURES,)
        self._step_vmappable = _with_trailing_batch_vmap(self._step_native, per_env=(True, True, True, False))

    # -- gymnax API -----------------------------------------------------------------------------
    @property
    def default_params(self) -> EnvParams:
        return self._params

    @property
    def name(self) -> str:
        return ENV_ID

    @property
    def num_actions(self) -> int:
        """Number of action branches (entries of the flat action)."""
        return 3 * self.n_devices + 1

    @property
    def nvec(self) -> np.ndarray:
        return action_nvec(self._params)

    def action_space(self, params: Optional[EnvParams] = None) -> MultiDiscrete:
        return MultiDiscrete(self.nvec)

    def observation_space(self, params: Optional[EnvParams] = None) -> spaces.Box:
        return spaces.Box(-jnp.inf, jnp.inf, self.obs_shape, jnp.float32)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return jnp.zeros(jnp.shape(state.time), dtype=bool)

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        """gymnax step with auto-reset: (obs, state, reward, terminated, truncated, info).

        ``jax.vmap(env.step)`` runs the batch in the environment's native layout (batch axes
        trailing, see ``step_batch``) through a custom vmap rule, and transposes in and out.
        """
        params = self.default_params if params is None else params
        return self._step_vmappable(typed_key(key), state, action, params)

    @partial(jax.jit, static_argnames=("self",))
    def reset(self, key, params=None):
        params = self.default_params if params is None else params
        return self.reset_env(key, params)

    def reset_env(self, key, params):
        return self.reset_with_draws(self.draw(key), params)

    def step_env(self, key, state, action, params):
        """The round without auto-reset (gymnax hook; ``step`` does not use it)."""
        u = self.draw(key)
        stepped, reward, info = self._round(state, action, params)
        walk_sq = system.random_walk_distance_sq(stepped.distance, u[1], u[2], params.mobility_step)
        stepped = stepped.replace(distance=jnp.clip(jnp.sqrt(walk_sq), params.min_distance, params.cell_radius))
        stepped = self._with_channel(stepped, u[0], params)
        return self.get_obs(stepped, params), stepped, reward, self.is_terminated(stepped, params), info

    # -- batched API (structure of arrays: environment axes trail) ------------------------------
    @partial(jax.jit, static_argnames=("self", "num_envs"))
    def reset_batch(self, key, num_envs: int, params=None):
        """``num_envs`` fresh episodes from one key; every state leaf and the obs get a trailing env axis."""
        params = self.default_params if params is None else params
        u = _draws_from_bits(hash_bits(key, (3, self.n_devices, num_envs)))
        return self.reset_with_draws(u, params)

    @partial(jax.jit, static_argnames=("self",))
    def step_batch(self, key, state, action, params=None):
        """Step a batch in the native layout from ONE key: the fastest path.

        ``state`` comes from ``reset_batch`` (env axis last), ``action`` has shape (3N + 1, E),
        obs come back as (7N + 4, E); ``params`` unbatched or with batch axes trailing.
        """
        params = self.default_params if params is None else params
        u = _draws_from_bits(hash_bits(key, (3, self.n_devices) + tuple(jnp.shape(state.time))))
        return self.step_with_draws(u, state, action, params)

    # -- the step, given its draws ----------------------------------------------------------------
    def draw(self, key: jax.Array) -> jax.Array:
        """The step's random numbers: U[0, 1) float32 of shape (5, N) + key.shape (see ``hash_bits``).

        Rows: 0 fading (24 bits) | 1 walk-x, or the distance of a fresh device | 2 walk-y, or its
        speed | 3 its memory capacity | 4 its data size (rows 1-4: 16 bits each, two per word).
        """
        return _draws_from_bits(hash_bits(key, (3, self.n_devices)))

    def _step_native(self, key, state, action, params):
        return self.step_with_draws(self.draw(key), state, action, params)

    def reset_with_draws(self, u: jax.Array, params: EnvParams):
        """A fresh episode from pre-drawn uniforms ``u`` of shape (5, N, *batch)."""
        fresh = self._fresh_devices(u, params)
        fresh = fresh.replace(distance=system.distance_in_annulus(u[1], params.min_distance, params.cell_radius, jnp))
        state = self._with_channel(fresh, u[0], params)
        return self.get_obs(state, params), state

    def step_with_draws(self, u, state, action, params):
        """One round with pre-drawn uniforms ``u`` (5, N, *batch); auto-resets after the last round.

        The stepped and the fresh state share the draws (they are alternatives), and the distance
        and channel of the next round are computed once, after the auto-reset selection.
        """
        stepped, reward, info = self._round(state, action, params)
        truncated = stepped.time >= params.max_steps_in_episode
        terminated = self.is_terminated(stepped, params)
        done = jnp.logical_or(terminated, truncated)
        fresh = self._fresh_devices(u, params)
        merged = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, stepped)
        walk_sq = system.random_walk_distance_sq(state.distance, u[1], u[2], params.mobility_step)
        fresh_sq = system.distance_in_annulus_sq(u[1], params.min_distance, params.cell_radius)
        distance = jnp.clip(jnp.sqrt(jnp.where(done, fresh_sq, walk_sq)), params.min_distance, params.cell_radius)
        state_out = self._with_channel(merged.replace(distance=distance), u[0], params)
        obs = self.get_obs(state_out, params)
        info = {**info, "terminated": terminated, "truncated": truncated}
        if self.final_observation:
            d_walk = jnp.clip(jnp.sqrt(walk_sq), params.min_distance, params.cell_radius)
            info["final_observation"] = self.get_obs(self._with_channel(stepped.replace(distance=d_walk), u[0], params), params)
        return obs, state_out, reward, terminated, truncated, info

    def _fresh_devices(self, u, params) -> EnvState:
        """A fresh episode's devices from the draws (distance and channel are filled in later)."""
        n = self.n_devices
        batch = u.shape[2:]
        cap_idx = system.categorical_from_uniform(u[3], self.n_mem_choices, jnp)
        zeros = jnp.zeros((n,) + batch, jnp.float32)
        return EnvState(
            distance=zeros,
            gain=zeros,
            flops=system.uniform_range(u[2], params.flops_min, params.flops_max),
            mem_capacity=_lookup(params.mem_choices, cap_idx),
            data=system.uniform_range(u[4], params.data_min, params.data_max),
            stored_level=jnp.full((n,) + batch, -1, jnp.int32),
            took_part=jnp.zeros((n + 1,) + batch, jnp.float32),
            ppl=jnp.broadcast_to(jnp.asarray(params.ppl0, jnp.float32), batch),
            last_latency=jnp.zeros(batch, jnp.float32),
            time=jnp.zeros(batch, jnp.int32),
        )

    def _with_channel(self, state: EnvState, u_fading, params) -> EnvState:
        """Fill the coming round's channel: Rayleigh fading from ``u_fading`` and path loss at the distance."""
        fading = system.rayleigh_power(u_fading, params.min_fading, jnp)
        return state.replace(gain=system.channel_gain(fading, state.distance, params.pl_const_db, params.pl_exp_db, jnp))

    def learn(self, state: EnvState, params: EnvParams, outcome: RoundOutcome):
        """(perplexity after the round, learner state, extra info) from the round's outcome.

        The calibrated surrogate response model; the live environment overrides this with a real
        FedPEAT round (``fedpeat_jax.mec.live``).
        """
        return self.surrogate_perplexity(state.ppl, params, outcome), state.learner, {}

    @staticmethod
    def surrogate_perplexity(ppl, params: EnvParams, outcome: RoundOutcome):
        """The response model of mec_model.md, ppl_inf and eta interpolated at k_bar."""
        ppl_inf = system.interp_clamped(outcome.k_bar, params.cal_k, params.cal_ppl_inf, jnp)
        eta = system.interp_clamped(outcome.k_bar, params.cal_k, params.cal_eta, jnp)
        return system.surrogate_perplexity(ppl, ppl_inf, eta, outcome.data_fraction, jnp)

    def _round(self, state: EnvState, action, params: EnvParams):
        """Run the round chosen by ``action`` from ``state`` (devices have not moved yet)."""
        n, m = self.n_devices, self.n_levels
        a = jnp.asarray(action, jnp.int32)
        took = (a[: n + 1] > 0).astype(jnp.float32)
        srv = took[0] * params.server_enabled
        x = took[1:]
        lvl = jnp.clip(a[n + 1 : 2 * n + 1], 0, m - 1)
        k = _lookup(params.level_k, lvl)
        w = _lookup(params.bw_weights, a[2 * n + 1 : 3 * n + 1])

        # sizes (affine in k)
        p_dev = system.device_param_count(k, params.p_emb, params.p_blk, params.n_adapter)
        s_emu = params.q_bits * p_dev
        s_peft = system.peft_bits(params.p_peft, params.q_bits)
        tokens = system.tokens_per_round(params.local_steps, params.batch_size, params.seq_len)
        mem = system.device_memory_bytes(k, params.p_emb, params.p_blk, params.n_adapter, params.p_peft,
                                         params.q_bits, params.batch_size, params.seq_len, params.n_embd, params.n_head)

        # radio and latency
        beta = system.bandwidth_shares(w, x, jnp)
        r_dl = system.downlink_rate(beta, state.gain, params.bandwidth_hz, params.bs_power_w, params.noise_psd_w_hz, jnp)
        r_ul = system.uplink_rate(beta, state.gain, params.bandwidth_hz, params.device_power_w, params.noise_psd_w_hz, jnp)
        t_cmp = system.compute_time(tokens, system.flops_per_token(p_dev, params.p_peft), state.flops, params.utilization)
        xchg = system.exchange_indicator(state.stored_level, lvl, x)
        t_dev = system.device_latency(xchg, s_emu, s_peft, r_dl, t_cmp, r_ul, x, jnp)
        p_full = system.device_param_count(params.k_full, params.p_emb, params.p_blk, params.n_adapter)
        t_srv = srv * system.compute_time(tokens, system.flops_per_token(p_full, params.p_peft), params.server_flops,
                                          params.utilization)
        latency = system.round_latency(t_dev, t_srv, jnp)

        # memory and violations
        cap = state.mem_capacity
        viol = x * (mem > cap)
        n_dev = jnp.sum(x, axis=0)
        mem_ratio = jnp.sum(x * mem / cap, axis=0) / jnp.maximum(n_dev, 1.0)

        # perplexity
        d_ok = (x - viol) * state.data
        d_srv = srv * params.server_data
        d_eff = jnp.sum(d_ok, axis=0) + d_srv
        frac = d_eff / (jnp.sum(state.data, axis=0) + params.server_data)
        k_bar = (jnp.sum(d_ok * k, axis=0) + d_srv * params.k_full) / jnp.maximum(d_eff, 1e-12)
        ppl, learner, learn_info = self.learn(state, params, RoundOutcome(k_bar, frac, x - viol, lvl, srv))

        # reward
        n_viol = jnp.sum(viol, axis=0)
        empty = (n_dev + srv) == 0
        reward = -(params.w_ppl * ppl / params.ppl_ref + params.w_latency * latency / params.latency_ref
                   + params.w_memory * mem_ratio) - params.w_violation * n_viol - params.w_empty * empty

        stepped = state.replace(
            stored_level=jnp.where(x > 0, lvl, state.stored_level),
            took_part=jnp.concatenate([srv[None], x]),
            ppl=ppl,
            last_latency=latency,
            time=state.time + 1,
            learner=learner,
        )
        info = {
            "perplexity": ppl,
            "latency": latency,
            "memory": mem_ratio,
            "memory_peak_bytes": jnp.max(x * mem, axis=0),
            "bytes": jnp.sum(x * (xchg * s_emu + 2.0 * s_peft), axis=0) / 8.0,
            "violations": n_viol,
            "n_participants": n_dev + srv,
            "exchanges": jnp.sum(xchg, axis=0),
            "empty_round": empty,
            **learn_info,
        }
        return stepped, reward.astype(jnp.float32), info

    def get_obs(self, state: EnvState, params: Optional[EnvParams] = None, key=None) -> jax.Array:
        """The flat observation (layout in the module docstring); batch axes trail."""
        p = self.default_params if params is None else params
        dev = [
            (system.to_db(state.gain, jnp) - p.gain_db_center) * (1.0 / p.gain_db_scale),
            state.distance * (1.0 / p.cell_radius),
            state.flops * (1.0 / p.flops_max),
            state.mem_capacity * (1.0 / jnp.max(p.mem_choices, axis=0)),
            state.data * (1.0 / p.data_max),
            (state.stored_level + 1).astype(jnp.float32) * (1.0 / self.n_levels),
            state.took_part[1:],
        ]
        glob = jnp.stack([
            state.time * (1.0 / p.max_steps_in_episode),
            state.ppl * (1.0 / p.ppl_ref),
            state.last_latency * (1.0 / p.latency_ref),
            state.took_part[0],
        ]).astype(jnp.float32)
        return jnp.concatenate(dev + [glob]).astype(jnp.float32)


def _draws_from_bits(h: jax.Array) -> jax.Array:
    """(3, N, *B) words -> (5, N, *B) uniforms: row 0 from 24 bits, rows 1-4 from 16-bit halves."""
    fading = (h[0] >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    rest = _halves(h[1:], 4).astype(jnp.float32) * (1.0 / (1 << 16))
    return jnp.concatenate([fading[None], rest])


def _with_trailing_batch_vmap(native, per_env):
    """Wrap ``native(*args)`` so that ``jax.vmap`` runs it once, natively batched.

    ``native`` treats trailing axes as batch axes. Under ``jax.vmap`` (batch axis 0) the rule
    moves each batched input's batch axis to the end, runs ``native`` once on the whole batch and
    moves the outputs' batch axis back to the front, instead of letting vmap batch every
    primitive with the environment axis leading (about 2-3x slower on a CPU). ``per_env[i]``
    says whether argument i is per environment (key, state, action: an unbatched one is shared
    by the whole batch and broadcast) or may stay unbatched (params: scalars and tables
    broadcast by themselves).
    """

    @jax.custom_batching.custom_vmap
    def fn(*args):
        return native(*args)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        in_batched = tuple(in_batched)
        one_env = jax.tree.map(
            lambda x, b: jax.ShapeDtypeStruct(x.shape[1:] if b else x.shape, x.dtype), args, in_batched
        )
        out_struct = jax.eval_shape(native, *one_env)

        def to_trailing(x, b, shared):
            if b:
                return jnp.moveaxis(x, 0, -1) if x.ndim > 1 else x
            if shared:
                return jnp.broadcast_to(x[..., None], x.shape + (axis_size,)) if x.ndim else jnp.broadcast_to(x, (axis_size,))
            return x

        moved = tuple(
            jax.tree.map(lambda x, b, s=shared: to_trailing(x, b, s), arg, batched)
            for arg, batched, shared in zip(args, in_batched, per_env)
        )
        out = native(*moved)
        out = jax.tree.map(
            lambda o, s: jnp.moveaxis(jnp.broadcast_to(o, s.shape + (axis_size,)), -1, 0), out, out_struct
        )
        return out, jax.tree.map(lambda _: True, out)

    return fn


def make(preset: str = "default", calibration=None, **overrides):
    """(env, params) like ``gymnax.make(ENV_ID, ...)``."""
    env = FedPEATMEC(preset=preset, calibration=calibration, **overrides)
    return env, env.default_params


__all__ = [
    "ENV_ID",
    "EnvParams",
    "EnvState",
    "FedPEATMEC",
    "MultiDiscrete",
    "PRESETS",
    "RoundOutcome",
    "action_nvec",
    "decode_action",
    "encode_action",
    "make",
    "make_params",
    "preset_params",
    "reference_latency",
    "validate_params",
]
