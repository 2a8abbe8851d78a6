"""The FedPEAT MEC environment in numpy: a ``gymnasium.Env`` twin of :class:`FedPEATMEC`.

Two layers:

* :class:`NumpyFedPEAT` — the model in plain numpy (float64), vectorized over any number of
  environments (batch axes trail, as in the JAX environment: device arrays (N, *B), actions
  (3N + 1, *B), observations (7N + 4, *B)). It is written independently of the JAX env's
  orchestration — direct per-device indexing, ``numpy.interp``, explicit auto-reset — and shares
  only the physics formulas of :mod:`fedpeat_jax.mec.system`, so it serves as the test oracle:
  fed the same uniform draws (``reset_from_draws`` / ``step_from_draws``), it must reproduce the
  JAX environment step by step.
* :class:`FedPEATTwin` — one environment as a ``gymnasium.Env`` (``MultiDiscrete`` actions,
  ``Box`` observations) for stable-baselines3 and other PyTorch RL code. Episodes end with
  ``truncated=True`` after T rounds; call ``reset()`` then (gymnasium convention, no auto-reset).

Invalid actions follow the environment's one rule (``spaces.clip_action``: cast to integers,
clipped into range); an action of the wrong length raises a ``ValueError`` naming the expected one.

Random draws: ``draw(rng)`` gives float32 U[0, 1) numbers of shape (5, N, *B) with the same row
meaning as ``FedPEATMEC.draw`` (0 fading, 1 walk-x / fresh distance, 2 walk-y / fresh speed,
3 fresh memory capacity, 4 fresh data size).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import gymnasium
import jax
import numpy as np

from fedpeat_jax.mec import system
from fedpeat_jax.mec.env import ENV_ID, N_DRAWS
from fedpeat_jax.mec.params import EnvParams, preset_params, validate_params
from fedpeat_jax.mec.spaces import action_nvec, check_action_shape, clip_action, obs_size


@dataclass
class TwinState:
    """numpy episode state; device arrays (N, *B), ``took_part`` (N + 1, *B), scalars (*B)."""

    distance: np.ndarray
    gain: np.ndarray
    flops: np.ndarray
    mem_capacity: np.ndarray
    data: np.ndarray
    stored_level: np.ndarray
    took_part: np.ndarray
    ppl: np.ndarray
    last_latency: np.ndarray
    time: np.ndarray

    def copy(self) -> TwinState:
        return TwinState(**{f.name: np.array(getattr(self, f.name), copy=True) for f in fields(self)})


def _numpy_params(params: EnvParams) -> EnvParams:
    """The same parameters on the host: scalars as Python floats/ints, tables as float64 arrays."""

    def host(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return int(x) if np.issubdtype(x.dtype, np.integer) else float(x)
        return x.astype(np.float64)

    return jax.tree.map(host, params)


class NumpyFedPEAT:
    """The FedPEAT MEC model in numpy, vectorized over trailing batch axes (the test oracle)."""

    def __init__(self, params: EnvParams):
        validate_params(params)
        self.params = params
        self.p = _numpy_params(params)
        self.n = params.n_devices
        self.m = int(np.shape(params.level_k)[-1])
        self.n_mem = int(np.shape(params.mem_choices)[-1])
        self.nvec = action_nvec(params)
        self.obs_size = obs_size(self.n)

    # -- random draws -----------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, batch_shape=()) -> np.ndarray:
        """float32 U[0, 1) draws of shape (5, N, *batch_shape)."""
        return rng.random((N_DRAWS, self.n) + tuple(batch_shape), dtype=np.float32)

    def sample_actions(self, rng: np.random.Generator, batch_shape=()) -> np.ndarray:
        """Uniformly random actions of shape (3N + 1, *batch_shape)."""
        nvec = self.nvec.reshape((-1,) + (1,) * len(tuple(batch_shape)))
        return rng.integers(0, nvec, size=(len(self.nvec),) + tuple(batch_shape))

    # -- episode start --------------------------------------------------------------------------
    def _fresh(self, u: np.ndarray) -> dict:
        """A new device population from draws u (5, N, *B): distance, speed, memory, data."""
        p = self.p
        u = np.asarray(u, dtype=np.float32)
        uf = u.astype(np.float64)
        cap_idx = system.categorical_from_uniform(u, self.n_mem)[3]  # float32 arithmetic, like the env
        return {
            "distance": system.distance_in_annulus(uf[1], p.min_distance, p.cell_radius),
            "flops": system.uniform_range(uf[2], p.flops_min, p.flops_max),
            "mem_capacity": p.mem_choices[cap_idx],
            "data": system.uniform_range(uf[4], p.data_min, p.data_max),
        }

    def _channel(self, distance: np.ndarray, u_fading: np.ndarray):
        p = self.p
        fading = system.rayleigh_power(np.asarray(u_fading, np.float64), p.min_fading)
        return system.channel_gain(fading, distance, p.pl_const_db, p.pl_exp_db)

    def reset_from_draws(self, u: np.ndarray):
        """A fresh episode (obs, state) from draws of shape (5, N, *B)."""
        batch = np.shape(u)[2:]
        f = self._fresh(u)
        gain = self._channel(f["distance"], u[0])
        state = TwinState(
            distance=f["distance"],
            gain=gain,
            flops=f["flops"],
            mem_capacity=f["mem_capacity"],
            data=f["data"],
            stored_level=np.full((self.n,) + batch, -1, dtype=np.int64),
            took_part=np.zeros((self.n + 1,) + batch),
            ppl=np.full(batch, float(self.p.ppl0)),
            last_latency=np.zeros(batch),
            time=np.zeros(batch, dtype=np.int64),
        )
        return self.observe(state), state

    # -- one round --------------------------------------------------------------------------------
    def step_from_draws(self, state: TwinState, action: np.ndarray, u: np.ndarray, autoreset: bool = True):
        """One round; returns (obs, state, reward, terminated, truncated, info) like the JAX env.

        With ``autoreset`` a finished episode restarts from the same draws (JAX semantics) and
        ``info["final_observation"]`` holds the observation before the restart; without it the
        returned observation and state are those after the last round (gymnasium semantics).
        """
        p, n = self.p, self.n
        u = np.asarray(u)
        check_action_shape(np.shape(action), self.nvec, batch_ndim=np.ndim(state.time))
        a = clip_action(action, self.nvec, np).astype(np.int64)

        # decode: server, devices, emulator level, bandwidth level
        server = (a[0] > 0).astype(np.float64) * p.server_enabled
        part = (a[1 : n + 1] > 0).astype(np.float64)
        level = a[n + 1 : 2 * n + 1]
        k = p.level_k[level]
        weight = p.bw_weights[a[2 * n + 1 : 3 * n + 1]]

        # payloads, compute, memory
        s_emu = system.emulator_bits(k, p.p_emb, p.p_blk, p.n_adapter, p.q_bits)
        s_peft = system.peft_bits(p.p_peft, p.q_bits)
        tokens = system.tokens_per_round(p.local_steps, p.batch_size, p.seq_len)
        fpt = system.flops_per_token(system.device_param_count(k, p.p_emb, p.p_blk, p.n_adapter), p.p_peft)
        t_cmp = system.compute_time(tokens, fpt, state.flops, p.utilization)
        mem = system.device_memory_bytes(
            k, p.p_emb, p.p_blk, p.n_adapter, p.p_peft, p.q_bits, p.batch_size, p.seq_len, p.n_embd, p.n_head
        )

        # radio and time, per device: download (emulator only on an exchange), compute, upload
        beta = system.bandwidth_shares(weight, part)
        r_dl = system.downlink_rate(beta, state.gain, p.bandwidth_hz, p.bs_power_w, p.noise_psd_w_hz)
        r_ul = system.uplink_rate(beta, state.gain, p.bandwidth_hz, p.device_power_w, p.noise_psd_w_hz)
        exchange = part * (state.stored_level != level)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_down = np.where(part > 0, (exchange * s_emu + s_peft) / r_dl, 0.0)
            t_dev = np.where(part > 0, t_down + t_cmp + s_peft / r_ul, 0.0)
        fpt_full = system.flops_per_token(system.device_param_count(p.k_full, p.p_emb, p.p_blk, p.n_adapter), p.p_peft)
        t_srv = server * system.compute_time(tokens, fpt_full, p.server_flops, p.utilization)

        # the deadline: stragglers are dropped, every time is capped at it
        deadline = p.round_deadline
        late = part * (t_dev > deadline)
        server_ok = server * (t_srv <= deadline)
        latency = np.minimum(np.maximum(t_dev.max(axis=0), t_srv), deadline)

        # memory violations: a device that does not fit fails (no data reaches the model)
        violation = part * (mem > state.mem_capacity)
        n_part = part.sum(axis=0)
        mem_ratio = (part * mem / state.mem_capacity).sum(axis=0) / np.maximum(n_part, 1.0)
        ok = part * (1 - violation) * (1 - late)

        # perplexity: devices and server pull towards their own fixed points (system_model.md)
        data_all = state.data.sum(axis=0)
        data_ok = (ok * state.data).sum(axis=0)
        k_bar = np.where(data_ok > 0, (ok * state.data * k).sum(axis=0) / np.where(data_ok > 0, data_ok, 1.0), 0.0)
        # each source's pull: eta * its fraction of all devices' data * its FedAvg weight in the round
        data_srv = server_ok * p.server_data
        used = np.where(data_ok + data_srv > 0, data_ok + data_srv, 1.0)
        pull_dev = np.interp(k_bar, p.cal_k, p.cal_eta) * (data_ok / data_all) ** p.data_exponent * (data_ok / used)
        pull_srv = p.srv_eta * (data_srv / data_all) * (data_srv / used)
        pull = pull_dev + pull_srv
        # few devices drift towards their own data: ppl_drift when they trained last round too, else ppl_drift_fresh
        made_it = np.where(data_ok > 0, data_ok, 1.0)
        repeat = (ok * state.data * state.took_part[1:]).sum(axis=0) / made_it
        phi = np.where(data_ok > 0, data_ok / data_all, 1.0)
        drift = p.ppl_drift * repeat + p.ppl_drift_fresh * (1.0 - repeat)
        dev_inf = np.interp(k_bar, p.cal_k, p.cal_ppl_inf) + drift * (1.0 / phi - 1.0)
        target = np.where(
            pull > 0,
            (pull_dev * dev_inf + pull_srv * p.srv_ppl_inf) / np.where(pull > 0, pull, 1.0),
            state.ppl,
        )
        ppl = target + (state.ppl - target) * np.exp(-pull)

        n_viol = violation.sum(axis=0)
        empty = (n_part + server) == 0
        gap = (ppl - p.ppl_best) / (p.ppl_ref - p.ppl_best)
        reward = (
            -(p.w_ppl * gap + p.w_latency * latency / p.latency_ref + p.w_memory * mem_ratio)
            - p.w_violation * n_viol
            - p.w_empty * empty
        )

        # next round: devices move, fading is redrawn
        distance = system.random_walk_distance(
            state.distance,
            u[1].astype(np.float64),
            u[2].astype(np.float64),
            p.mobility_step,
            p.min_distance,
            p.cell_radius,
        )
        gain = self._channel(distance, u[0])
        after = TwinState(
            distance=distance,
            gain=gain,
            flops=state.flops,
            mem_capacity=state.mem_capacity,
            data=state.data,
            stored_level=np.where((part > 0) & (t_down <= deadline), level, state.stored_level),
            took_part=np.concatenate([server[None], part]),
            ppl=ppl,
            last_latency=latency,
            time=state.time + 1,
        )
        truncated = after.time >= p.max_steps_in_episode
        terminated = np.zeros_like(truncated)
        info = {
            "perplexity": ppl,
            "latency": latency,
            "memory": mem_ratio,
            "memory_peak_bytes": (part * mem).max(axis=0),
            "bytes": (part * (exchange * s_emu + 2.0 * s_peft)).sum(axis=0) / 8.0,
            "violations": n_viol,
            "stragglers": late.sum(axis=0) + server - server_ok,
            "n_participants": n_part + server,
            "exchanges": exchange.sum(axis=0),
            "data_fraction": data_ok / data_all,
            "empty_round": empty,
            "terminated": terminated,
            "truncated": truncated,
        }
        obs_after = self.observe(after)
        if not autoreset:
            return obs_after, after, reward, terminated, truncated, info
        info["final_observation"] = obs_after
        obs_fresh, fresh = self.reset_from_draws(u)
        state_out = TwinState(
            **{f.name: np.where(truncated, getattr(fresh, f.name), getattr(after, f.name)) for f in fields(TwinState)}
        )
        obs = np.where(truncated, obs_fresh, obs_after)
        return obs, state_out, reward, terminated, truncated, info

    # -- observation ------------------------------------------------------------------------------
    def observe(self, state: TwinState) -> np.ndarray:
        """float32 observation (7N + 4, *B), layout as in :mod:`fedpeat_jax.mec.spaces`."""
        p = self.p
        rows = [
            (system.to_db(state.gain) - p.gain_db_center) / p.gain_db_scale,
            state.distance / p.cell_radius,
            state.flops / p.flops_max,
            state.mem_capacity / np.max(p.mem_choices),
            state.data / p.data_max,
            (state.stored_level + 1) / self.m,
            state.took_part[1:],
            (state.time / p.max_steps_in_episode)[None],
            ((state.ppl - p.ppl_best) / (p.ppl_ref - p.ppl_best))[None],
            (state.last_latency / p.latency_ref)[None],
            state.took_part[:1],
        ]
        return np.concatenate(rows).astype(np.float32)


class FedPEATTwin(gymnasium.Env):
    """One FedPEAT MEC environment as a ``gymnasium.Env`` (numpy; usable by stable-baselines3).

    Built like :class:`FedPEATMEC`: ``FedPEATTwin(params)`` or
    ``FedPEATTwin(preset=..., calibration=..., **overrides)``.
    """

    metadata = {"render_modes": []}

    def __init__(self, params: Optional[EnvParams] = None, *, preset: str = "default", calibration=None, **overrides):
        super().__init__()
        if params is None:
            params = preset_params(preset, calibration=calibration, **overrides)
        elif calibration is not None or overrides:
            raise ValueError("pass either explicit EnvParams or preset/calibration/overrides, not both")
        self.sim = NumpyFedPEAT(params)
        self.params = params
        self.action_space = gymnasium.spaces.MultiDiscrete(self.sim.nvec)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (self.sim.obs_size,), np.float32)
        self.state: Optional[TwinState] = None

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        return self.reset_from_draws(self.sim.draw(self.np_random))

    def step(self, action):
        return self.step_from_draws(action, self.sim.draw(self.np_random))

    def reset_from_draws(self, u: np.ndarray):
        obs, self.state = self.sim.reset_from_draws(u)
        return obs, {}

    def step_from_draws(self, action, u: np.ndarray):
        """gymnasium step with given draws (5, N): (obs, reward, terminated, truncated, info)."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        obs, self.state, reward, terminated, truncated, info = self.sim.step_from_draws(
            self.state, np.asarray(action), u, autoreset=False
        )
        info = {key: (bool(v) if np.asarray(v).dtype == bool else float(v)) for key, v in info.items()}
        return obs, float(reward), bool(terminated), bool(truncated), info


# gymnasium.make(ENV_ID) gives the numpy twin, gymnasium.make_vec(ENV_ID, num_envs) the jitted vector env
if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="fedpeat_jax.mec.twin:FedPEATTwin",
        vector_entry_point="fedpeat_jax.mec.vector:FedPEATVectorEnv",
    )


__all__ = ["FedPEATTwin", "NumpyFedPEAT", "TwinState"]
