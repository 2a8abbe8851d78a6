"""`FedPEATMEC`: the FedPEAT mobile-edge-computing control problem as a gymnax 1.x environment.

One step is one federated round. Every round an agent chooses, for the server (participant 0)
and N devices, who takes part, which emulator each device trains on and its bandwidth share; the
round then costs latency (radio + compute, synchronous, bounded by a deadline), memory, and moves
the held-out plug-in perplexity along the calibrated response model. The physics is
:mod:`fedpeat_jax.mec.system`, the numbers :mod:`fedpeat_jax.mec.params`, the action and
observation layout :mod:`fedpeat_jax.mec.spaces`; the numpy twin :mod:`fedpeat_jax.mec.twin`
runs the same model as a ``gymnasium.Env``. Equations, ranges and the default problem:
``docs/system_model.md``.

Participants
------------
* **Server (participant 0)** owns the full model and sits at the base station, wired: no radio
  cost, trains the PEFT module on the full model at ``server_flops`` on ``server_data`` examples
  of its own domain (by default public modern-spelling text, not the devices' Folio roles that
  the held-out perplexity measures), no memory limit. ``server_enabled = 0`` removes it.
* **Devices 1..N** are drawn at reset: distance uniform in the annulus [min_distance,
  cell_radius], compute speed f ~ U[flops_min, flops_max], memory capacity uniform from
  ``mem_choices``, data D ~ U[data_min, data_max] examples; they start with no emulator. Each
  round they may move (random walk of ``mobility_step`` metres) and their Rayleigh fading is
  redrawn. The state holds the channel of the *coming* round, which the agent observes.

The round
---------
A participant whose round time exceeds ``round_deadline`` is a straggler: dropped, its data does
not count, its time is capped at the deadline; a device whose memory need exceeds its capacity
fails (a violation: penalized, its data does not count, its time still counts). A device stores
the chosen emulator once its download finished before the deadline. The devices' data that made
it (fraction phi_dev of all devices' data, mean emulator size kbar) and the server's data (phi_srv
= server_data / all devices' data) each pull the perplexity towards their own calibrated fixed
point, each with its FedAvg weight (``system.two_source_perplexity``).

Reward (every term documented with its range in docs/system_model.md)::

    r = -(w_ppl g + w_latency T / latency_ref + w_memory mean_n(M_n / Mcap_n))
        - w_violation * #violations - w_empty * [nobody took part]
    g = (ppl - ppl_best) / (ppl_ref - ppl_best)   (1 at the start, 0 at the best calibrated fixed point)

Episodes are truncated after ``max_steps_in_episode`` rounds; there is no natural termination.
``step`` auto-resets like every gymnax environment and puts the observation before the reset in
``info["final_observation"]``.

Random numbers
--------------
Each step draws U[0, 1) numbers ``u`` of shape (5, N) (:meth:`FedPEATMEC.draw`). Rows: 0 fading |
1 random-walk x, or a fresh device's distance | 2 walk y, or its speed | 3 its memory capacity |
4 its data size. The stepped and the auto-reset state are alternatives, so they share the draws.
``step_with_draws`` and ``reset_with_draws`` take them explicitly: the numpy twin is fed the very
same numbers.

Batches (layout)
----------------
Every function of the step is written for arrays whose own axes lead and whose batch axes
TRAIL: device arrays (N, *B), actions (3N + 1, *B), observations (7N + 4, *B), table params
(m, *B). Single environments are the case B = (). Two ways to batch:

* ``jax.vmap(env.step)``, the usual gymnax way (state leaves (E, N), obs (E, 7N + 4)); on a CPU
  a custom vmap rule runs the native batched step once (``cpu_tricks.batch_trailing``). Params
  may be vmapped too (``in_axes=(0, 0, 0, 0)``).
* ``env.reset_batch(key, E)`` / ``env.step_batch(key, state, action)``: the native layout
  directly (state leaves (N, E), action (3N + 1, E), obs (7N + 4, E)), one key per step for the
  whole batch.

Live mode
---------
How the round moves the perplexity is isolated in :meth:`FedPEATMEC.learn` (state, params,
:class:`RoundOutcome`) -> (perplexity, learner, info). Here it is the calibrated surrogate;
:class:`fedpeat_jax.mec.live.LiveFedPEATMEC` overrides it with a real jitted FedPEAT round of
the chosen devices and emulator sizes, keeping the federated server state in ``state.learner``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment
from gymnax.environments import spaces as gx_spaces

from fedpeat_jax import cpu_tricks
from fedpeat_jax.mec import system
from fedpeat_jax.mec.params import PRESETS, EnvParams, make_params, preset_params, reference_latency, validate_params
from fedpeat_jax.mec.spaces import (
    AgentLayout,
    MultiDiscrete,
    action_nvec,
    agent_layout,
    check_action_shape,
    clip_action,
    decode_action,
    encode_action,
    obs_size,
)

ENV_ID = "FedPEAT-MEC-v0"
N_DRAWS = 5  # rows of the per-step draw: fading, walk-x | distance, walk-y | speed, memory, data


@struct.dataclass
class EnvState(environment.EnvState):
    """Per-episode state; device arrays have shape (N, *B), ``took_part`` (N + 1, *B) with the
    server first, scalars (*B); B = () for one environment (see "Batches" in the module doc)."""

    distance: jax.Array  # (N,) m from the base station
    gain: jax.Array  # (N,) linear channel gain of the coming round
    flops: jax.Array  # (N,) FLOP/s
    mem_capacity: jax.Array  # (N,) bytes
    data: jax.Array  # (N,) local data size, examples
    stored_level: jax.Array  # (N,) int32 emulator level held by the device, -1 = none
    took_part: jax.Array  # (N + 1,) float32: server, devices 1..N in the last round
    ppl: jax.Array  # () plug-in perplexity after the last round
    last_latency: jax.Array  # () s
    time: jax.Array  # () int32 rounds done in this episode
    learner: Any = None  # live mode: the federated server state; None for the surrogate


class RoundOutcome(NamedTuple):
    """What a round's choices gave the learning side (:meth:`FedPEATMEC.learn`)."""

    k_bar: jax.Array  # () data-weighted mean emulator size of the devices that made it
    data_fraction: jax.Array  # () their data / all devices' data
    server_fraction: jax.Array  # () server data / all devices' data when the server made it, else 0
    succeeded: jax.Array  # (N,) float32 1 for a device that took part, fit its memory and met the deadline
    level: jax.Array  # (N,) int32 emulator level chosen for each device
    server: jax.Array  # () float32 1 when the server took part and met the deadline
    repeat_share: jax.Array  # () share of the successful devices' data whose device also took part last round


def _lookup(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[clip(index, 0, len - 1)] for a short table (axis 0), as a chain of selects.

    Selects vectorize over devices and environments; a gather does not. Batch axes trail in
    both ``table`` (len, *B) and ``index`` (N, *B).
    """
    out = jnp.broadcast_to(table[0], jnp.broadcast_shapes(index.shape, jnp.shape(table[0])))
    for j in range(1, table.shape[0]):
        out = jnp.where(index >= j, table[j], out)
    return out


class FedPEATMEC(environment.Environment[EnvState, EnvParams]):
    """FedPEAT over mobile edge computing; see the module docstring for the round and the reward.

    FedPEATMEC(params)                                   explicit EnvParams
    FedPEATMEC(preset="gpt2-xl", calibration=table, ...)  a preset (overrides go to make_params)
    FedPEATMEC()                                         'default' preset with the shipped table
    Invalid parameters raise ValueError here, at construction.
    """

    native_batch = True  # offers reset_batch / step_batch (env axes trailing); SABPPO uses them

    def __init__(self, params: Optional[EnvParams] = None, *, preset: str = "default", calibration=None, **overrides):
        super().__init__()
        if params is None:
            params = preset_params(preset, calibration=calibration, **overrides)
        elif calibration is not None or overrides:
            raise ValueError("pass either explicit EnvParams or preset/calibration/overrides, not both")
        if not isinstance(params, EnvParams):
            raise TypeError(f"params must be fedpeat_jax.mec.EnvParams, got {type(params).__name__}")
        validate_params(params)
        self._params = params
        self.n_devices = params.n_devices
        self.n_levels = int(np.shape(params.level_k)[-1])
        self.n_bw_levels = int(np.shape(params.bw_weights)[-1])
        self.n_mem_choices = int(np.shape(params.mem_choices)[-1])
        self.obs_shape = (obs_size(self.n_devices),)
        self._nvec = action_nvec(params)
        self._step_vmappable = cpu_tricks.batch_trailing(self._step_native, per_env=(True, True, True, False))

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
        return self._nvec.copy()

    def action_space(self, params: Optional[EnvParams] = None) -> MultiDiscrete:
        return MultiDiscrete(self._nvec)

    def agent_layout(self, params: Optional[EnvParams] = None) -> AgentLayout:
        """Where each device's observation features and action branches sit (for device-shared networks)."""
        return agent_layout(self.default_params if params is None else params)

    def observation_space(self, params: Optional[EnvParams] = None) -> gx_spaces.Box:
        return gx_spaces.Box(-jnp.inf, jnp.inf, self.obs_shape, jnp.float32)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        return jnp.zeros(jnp.shape(state.time), dtype=bool)

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        """gymnax step with auto-reset: (obs, state, reward, terminated, truncated, info).

        ``info["final_observation"]`` is the observation before an auto-reset (gymnax's base step
        gives it too). The action's length is checked here (a ValueError names the expected one).
        """
        params = self.default_params if params is None else params
        check_action_shape(jnp.shape(action), self._nvec, batch_ndim=0)
        return self._step_vmappable(cpu_tricks.typed_key(key), state, action, params)

    @partial(jax.jit, static_argnames=("self",))
    def reset(self, key, params=None):
        params = self.default_params if params is None else params
        return self.reset_env(key, params)

    def reset_env(self, key, params):
        return self.reset_with_draws(self.draw(key), params)

    def step_env(self, key, state, action, params):
        """gymnax hook: the round without auto-reset (``step`` auto-resets; both run :meth:`_advance`)."""
        walked, reward, terminated, _, info = self._advance(self.draw(key), state, action, params)
        return self.get_obs(walked, params), walked, reward, terminated, info

    # -- batched API (structure of arrays: environment axes trail) ------------------------------
    @partial(jax.jit, static_argnames=("self", "num_envs"))
    def reset_batch(self, key, num_envs: int, params=None):
        """``num_envs`` fresh episodes from one key; every state leaf and the obs get a trailing env axis."""
        params = self.default_params if params is None else params
        return self.reset_with_draws(self.draw(key, (num_envs,)), params)

    @partial(jax.jit, static_argnames=("self",))
    def step_batch(self, key, state, action, params=None):
        """Step a batch in the native layout from ONE key.

        ``state`` comes from ``reset_batch`` (env axis last), ``action`` has shape (3N + 1, E),
        obs come back as (7N + 4, E); ``params`` unbatched or with batch axes trailing.
        """
        params = self.default_params if params is None else params
        batch = tuple(jnp.shape(state.time))
        check_action_shape(jnp.shape(action), self._nvec, batch_ndim=len(batch))
        return self.step_with_draws(self.draw(key, batch), state, action, params)

    # -- the step, given its draws ----------------------------------------------------------------
    def draw(self, key: jax.Array, batch_shape: tuple = ()) -> jax.Array:
        """The step's random numbers: U[0, 1) float32 of shape (5, N) + batch_shape + key.shape."""
        return cpu_tricks.uniforms(key, (N_DRAWS, self.n_devices) + tuple(batch_shape))

    def _step_native(self, key, state, action, params):
        return self.step_with_draws(self.draw(key), state, action, params)

    def reset_with_draws(self, u: jax.Array, params: EnvParams):
        """A fresh episode (obs, state) from pre-drawn uniforms ``u`` of shape (5, N, *batch)."""
        state = self._fresh_state(u, params)
        return self.get_obs(state, params), state

    def step_with_draws(self, u, state, action, params):
        """One round with pre-drawn uniforms ``u`` (5, N, *batch); auto-resets after the last round."""
        walked, reward, terminated, truncated, info = self._advance(u, state, action, params)
        done = jnp.logical_or(terminated, truncated)
        fresh = self._fresh_state(u, params)
        state_out = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, walked)
        info = {
            **info,
            "terminated": terminated,
            "truncated": truncated,
            "final_observation": self.get_obs(walked, params),
        }
        return self.get_obs(state_out, params), state_out, reward, terminated, truncated, info

    def _advance(self, u, state, action, params):
        """THE step: the round, then the devices move and the coming round's channel is drawn.

        Returns (state after the round, reward, terminated, truncated, info) without auto-reset.
        """
        stepped, reward, info = self._round(state, action, params)
        walk_sq = system.random_walk_distance_sq(stepped.distance, u[1], u[2], params.mobility_step)
        distance = jnp.clip(jnp.sqrt(walk_sq), params.min_distance, params.cell_radius)
        walked = self._with_channel(stepped.replace(distance=distance), u[0], params)
        truncated = walked.time >= params.max_steps_in_episode
        return walked, reward, self.is_terminated(walked, params), truncated, info

    def _fresh_state(self, u, params) -> EnvState:
        """A fresh episode's state from the draws."""
        n = self.n_devices
        batch = u.shape[2:]
        cap_idx = system.categorical_from_uniform(u[3], self.n_mem_choices, jnp)
        state = EnvState(
            distance=system.distance_in_annulus(u[1], params.min_distance, params.cell_radius, jnp),
            gain=jnp.zeros((n,) + batch, jnp.float32),
            flops=system.uniform_range(u[2], params.flops_min, params.flops_max),
            mem_capacity=_lookup(params.mem_choices, cap_idx),
            data=system.uniform_range(u[4], params.data_min, params.data_max),
            stored_level=jnp.full((n,) + batch, -1, jnp.int32),
            took_part=jnp.zeros((n + 1,) + batch, jnp.float32),
            ppl=jnp.broadcast_to(jnp.asarray(params.ppl0, jnp.float32), batch),
            last_latency=jnp.zeros(batch, jnp.float32),
            time=jnp.zeros(batch, jnp.int32),
        )
        return self._with_channel(state, u[0], params)

    def _with_channel(self, state: EnvState, u_fading, params) -> EnvState:
        """Fill the coming round's channel: Rayleigh fading from ``u_fading`` and path loss at the distance."""
        fading = system.rayleigh_power(u_fading, params.min_fading, jnp)
        return state.replace(
            gain=system.channel_gain(fading, state.distance, params.pl_const_db, params.pl_exp_db, jnp)
        )

    # -- what the round does ----------------------------------------------------------------------
    def learn(self, state: EnvState, params: EnvParams, outcome: RoundOutcome):
        """(perplexity after the round, learner state, extra info) from the round's outcome.

        The calibrated surrogate response model; the live environment overrides this with a real
        FedPEAT round (``fedpeat_jax.mec.live``).
        """
        return self.surrogate_perplexity(state.ppl, params, outcome), state.learner, {}

    @staticmethod
    def surrogate_perplexity(ppl, params: EnvParams, outcome: RoundOutcome):
        """The two-source response model: the devices' pull at kbar and the server's pull."""
        dev_inf = system.drifting_fixed_point(
            system.interp_clamped(outcome.k_bar, params.cal_k, params.cal_ppl_inf, jnp),
            params.ppl_drift,
            outcome.repeat_share,
            outcome.data_fraction,
            jnp,
            drift_fresh=params.ppl_drift_fresh,
        )
        dev_eta = system.interp_clamped(outcome.k_bar, params.cal_k, params.cal_eta, jnp)
        return system.two_source_perplexity(
            ppl,
            dev_inf,
            dev_eta,
            outcome.data_fraction,
            params.srv_ppl_inf,
            params.srv_eta,
            outcome.server_fraction,
            jnp,
            dev_exponent=params.data_exponent,
        )

    def _round(self, state: EnvState, action, params: EnvParams):
        """Run the round chosen by ``action`` from ``state`` (devices have not moved yet)."""
        n = self.n_devices
        a = clip_action(action, self._nvec)
        srv = a[0].astype(jnp.float32) * params.server_enabled
        x = a[1 : n + 1].astype(jnp.float32)
        lvl = a[n + 1 : 2 * n + 1]
        k = _lookup(params.level_k, lvl)
        w = _lookup(params.bw_weights, a[2 * n + 1 : 3 * n + 1])
        deadline = params.round_deadline

        # sizes (affine in k)
        p_dev = system.device_param_count(k, params.p_emb, params.p_blk, params.n_adapter)
        s_emu = params.q_bits * p_dev
        s_peft = system.peft_bits(params.p_peft, params.q_bits)
        tokens = system.tokens_per_round(params.local_steps, params.batch_size, params.seq_len)
        mem = system.device_memory_bytes(
            k,
            params.p_emb,
            params.p_blk,
            params.n_adapter,
            params.p_peft,
            params.q_bits,
            params.batch_size,
            params.seq_len,
            params.n_embd,
            params.n_head,
        )

        # radio and time; stragglers past the deadline are dropped
        beta = system.bandwidth_shares(w, x, jnp)
        r_dl = system.downlink_rate(
            beta, state.gain, params.bandwidth_hz, params.bs_power_w, params.noise_psd_w_hz, jnp
        )
        r_ul = system.uplink_rate(
            beta, state.gain, params.bandwidth_hz, params.device_power_w, params.noise_psd_w_hz, jnp
        )
        t_cmp = system.compute_time(
            tokens, system.flops_per_token(p_dev, params.p_peft), state.flops, params.utilization
        )
        xchg = system.exchange_indicator(state.stored_level, lvl, x)
        t_dev = system.device_latency(xchg, s_emu, s_peft, r_dl, t_cmp, r_ul, x, jnp)
        t_down = system.download_time(xchg, s_emu, s_peft, r_dl, x, jnp)
        p_full = system.device_param_count(params.k_full, params.p_emb, params.p_blk, params.n_adapter)
        t_srv = srv * system.compute_time(
            tokens, system.flops_per_token(p_full, params.p_peft), params.server_flops, params.utilization
        )
        late = system.stragglers(t_dev, deadline, x)
        srv_ok = srv * (t_srv <= deadline)
        latency = system.round_latency(t_dev, t_srv, deadline, jnp)

        # memory
        cap = state.mem_capacity
        viol = x * (mem > cap)
        n_dev = jnp.sum(x, axis=0)
        mem_ratio = jnp.sum(x * mem / cap, axis=0) / jnp.maximum(n_dev, 1.0)

        # perplexity: the data that made it
        ok = x * (1.0 - viol) * (1.0 - late)
        d_ok = ok * state.data
        d_all = jnp.sum(state.data, axis=0)
        d_sum = jnp.sum(d_ok, axis=0)
        outcome = RoundOutcome(
            k_bar=jnp.sum(d_ok * k, axis=0) / jnp.maximum(d_sum, 1e-12),
            data_fraction=d_sum / d_all,
            server_fraction=srv_ok * params.server_data / d_all,
            succeeded=ok,
            level=lvl,
            server=srv_ok,
            repeat_share=jnp.sum(d_ok * state.took_part[1:], axis=0) / jnp.maximum(d_sum, 1e-12),
        )
        ppl, learner, learn_info = self.learn(state, params, outcome)

        # reward
        gap = (ppl - params.ppl_best) / (params.ppl_ref - params.ppl_best)
        n_viol = jnp.sum(viol, axis=0)
        empty = (n_dev + srv) == 0
        reward = (
            -(params.w_ppl * gap + params.w_latency * latency / params.latency_ref + params.w_memory * mem_ratio)
            - params.w_violation * n_viol
            - params.w_empty * empty
        )

        stepped = state.replace(
            stored_level=jnp.where(x * (t_down <= deadline) > 0, lvl, state.stored_level),
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
            "stragglers": jnp.sum(late, axis=0) + srv - srv_ok,
            "n_participants": n_dev + srv,
            "exchanges": jnp.sum(xchg, axis=0),
            "data_fraction": outcome.data_fraction,
            "empty_round": empty,
            **learn_info,
        }
        return stepped, reward.astype(jnp.float32), info

    def get_obs(self, state: EnvState, params: Optional[EnvParams] = None, key=None) -> jax.Array:
        """The flat observation (layout in :mod:`fedpeat_jax.mec.spaces`); batch axes trail."""
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
        glob = jnp.stack(
            [
                state.time * (1.0 / p.max_steps_in_episode),
                (state.ppl - p.ppl_best) * (1.0 / (p.ppl_ref - p.ppl_best)),
                state.last_latency * (1.0 / p.latency_ref),
                state.took_part[0],
            ]
        ).astype(jnp.float32)
        return jnp.concatenate(dev + [glob]).astype(jnp.float32)


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
    "N_DRAWS",
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
