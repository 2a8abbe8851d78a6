"""Live mode: the MEC environment with a real jitted FedPEAT round inside every ``step``.

:class:`LiveFedPEATMEC` is :class:`~fedpeat_jax.mec.env.FedPEATMEC` (same action, observation,
radio, latency, memory and reward) in which device n is a real federated client (one (play,
role) of the Folio-spelling task) and the perplexity comes from the model, not from the
calibrated response curve: each step runs one :meth:`FedPEAT.round` in which exactly the devices
that took part within their memory and the round's deadline train LoRA on the emulator level the
action gave them, the server tunes on its own data (public modern-spelling text by default: another
domain than the devices') with the full model when the action says so and it meets the deadline,
the updates are aggregated, and the reward uses the measured held-out plug-in perplexity. The federated server
state lives in ``state.learner`` and is reset with the episode.

Cost: each level's devices run vmapped on that level's shared emulator, with N client slots per
level (devices on other levels fill the slots masked out), so a step trains N x m clients for
N real ones; live mode is for checking a controller against the real system, not for training it.
A live environment is one environment; ``jax.vmap`` over it batches the whole round.

    env = make_live_env()                                  # default foundation model and corpus
    policy, _, _ = controller.load_policy("runs/controller", env)
    records = live_eval.run_policy(env, policy, rounds=10)      # per round: reward, perplexity, latency...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedpeat_jax.config import Config, FedConfig, PeftConfig
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.mec.env import FedPEATMEC, RoundOutcome
from fedpeat_jax.mec.params import EnvParams, make_params


@dataclass(frozen=True)
class LiveConfig(Config):
    """The real federated workload behind a live environment's rounds."""

    n_devices: int = 10  # devices = clients of the task (a seeded choice among them)
    emulator_k: Optional[tuple[int, ...]] = None  # emulator levels offered (default: the calibration table's)
    local_steps: int = 4
    """Local steps per device and round."""
    local_batch: int = 2  # sequences per local step
    client_lr: float = 3e-3
    """Client learning rate."""
    lora_rank: int = 4
    """LoRA rank of the PEFT module in the adapter."""
    lora_alpha: float = 32.0
    """LoRA alpha."""
    seq_len: int = 64
    """Tokens per window."""
    max_examples: int = 16  # windows per client
    eval_windows: int = 96
    """Held-out windows behind each step's perplexity: the calibration's (`CalibrateConfig.max_eval_windows`),
    on which the surrogate's fixed points were measured, so that real and surrogate perplexities share one scale."""
    server: bool = True  # the server holds its own data and may take part
    server_domain: str = "modern"  # its data: "modern" (public modern-spelling text) or "target" (the devices' domain)
    server_windows: int = 32  # windows of server data (as in `fedpeat calibrate`)
    participation_drift: bool = True
    """The surrogate's fixed point rises when the same few devices keep training (the table's `drift`;
    `make_params(participation_drift=)`), as real rounds of few devices do."""
    seed: int = 0
    """Seed of the device choice and the runs."""

    def validate(self) -> None:
        for name in (
            "n_devices",
            "local_steps",
            "local_batch",
            "lora_rank",
            "max_examples",
            "eval_windows",
            "server_windows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LiveConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"LiveConfig.seq_len must be >= 2, got {self.seq_len}")
        if not self.client_lr > 0:
            raise ValueError(f"LiveConfig.client_lr must be > 0, got {self.client_lr}")

    def peft(self) -> PeftConfig:
        return PeftConfig(kind="lora", lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)


@struct.dataclass(kw_only=True)
class LiveParams(EnvParams):
    """EnvParams plus everything a live round computes with, so that a jitted live step receives
    the frozen weights and the data as arguments (never as constants of the compiled program).

    weights:        the frozen foundation weights (``FedPEAT`` holds none)
    clients:        FedData with exactly N clients; device n trains on client n - 1
    heldout:        (tokens, mask) windows of the plug-in perplexity
    server_windows: (tokens, mask) of the server's own tuning, or None (``server_data`` is their count)
    fresh_learner:  the federated server state every episode starts from
    hyper:          the rounds' numeric hyperparameters (``fed.client.Hyper``)
    """

    weights: Any = None
    clients: Any = None
    heldout: Any = None
    server_windows: Any = None
    fresh_learner: Any = None
    hyper: Any = None

    def surrogate(self) -> EnvParams:
        """The MEC numbers alone: the calibrated surrogate environment with the same devices,
        radio, workload and reward (train and search controllers there)."""
        return EnvParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EnvParams)})


class LiveFedPEATMEC(FedPEATMEC):
    """FedPEATMEC whose rounds are real FedPEAT rounds of ``sim`` on ``data`` (one client per device).

    sim:         a FedPEAT whose ``emulator_levels`` are the env's ``level_k`` with N slots each
                 (:func:`make_live_env` builds a matching one); it holds no weights
    weights:     the frozen foundation weights
    data:        FedData with exactly N clients; device n trains on client n - 1
    heldout:     (tokens, mask) windows of the plug-in perplexity
    server_data: (tokens, mask) of the server's own tuning (needs ``server_participation``)
    All of them go into the env's :class:`LiveParams` (``default_params``): ``step`` and ``reset``
    take them as arguments like every other number of the environment. The measured zero-shot
    plug-in perplexity becomes ``params.ppl0`` (every episode starts there) and ``ppl_ref`` (the
    perplexity term of the reward is 1 there).
    """

    native_batch = False  # one federated state per environment: batch with jax.vmap

    def __init__(
        self, sim: FedPEAT, weights, data: FedData, heldout, params: EnvParams, *, server_data=None, seed: int = 0
    ):
        n, ks = params.n_devices, tuple(int(k) for k in np.asarray(params.level_k))
        if int(data.tokens.shape[0]) != n:
            raise ValueError(
                f"live mode needs one client per device: data has {data.tokens.shape[0]} clients, params.n_devices = {n}"
            )
        if tuple(sim.fed.emulator_levels) != ks:
            raise ValueError(
                f"the simulator's emulator_levels {sim.fed.emulator_levels} must be the env's level_k {ks}"
            )
        if tuple(sim.fed.slots) != (n,) * len(ks):
            raise ValueError(
                f"the simulator needs {n} client slots on every level (level_slots={(n,) * len(ks)}), has {sim.fed.slots}"
            )
        n_adapter = sim.fed.adapter_l + sim.fed.adapter_r
        if float(params.n_adapter) != n_adapter or float(params.k_full) != sim.model.n_layer - n_adapter:
            raise ValueError(
                f"EnvParams describe a different model (n_adapter={params.n_adapter}, k_full={params.k_full}) "
                f"than the simulator's ({n_adapter} adapter blocks of {sim.model.n_layer})"
            )
        if sim.fed.server_participation != (server_data is not None):
            raise ValueError("give server_data exactly when the simulator has FedConfig.server_participation=True")
        self.sim = sim
        live = LiveParams(
            **{f.name: getattr(params, f.name) for f in dataclasses.fields(EnvParams)},
            weights=weights,
            clients=data,
            heldout=tuple(jnp.asarray(x) for x in heldout),
            server_windows=None if server_data is None else tuple(jnp.asarray(x) for x in server_data),
            fresh_learner=jax.jit(sim.init)(jax.random.key(seed), weights),
            hyper=Hyper.from_config(sim.fed),
        )
        ppl0 = float(jax.jit(self.plugin_perplexity)(live.fresh_learner, live))
        super().__init__(live.replace(ppl0=ppl0, ppl_ref=ppl0))
        self._step_vmappable = (
            self._step_native
        )  # plain vmap semantics: the round is not laid out for trailing batch axes

    # The base class's jitted step/reset fill a missing ``params`` from ``default_params`` INSIDE the
    # trace, which would bake the weights into the program: fill it here, before the jit.
    def step(self, key, state, action, params=None):
        return FedPEATMEC.step(self, key, state, action, self.default_params if params is None else params)

    def reset(self, key, params=None):
        return FedPEATMEC.reset(self, key, self.default_params if params is None else params)

    def reset_batch(self, key, num_envs: int, params=None):
        raise TypeError("a live environment has no native batched layout; use jax.vmap(env.reset)")

    def step_batch(self, key, state, action, params=None):
        raise TypeError("a live environment has no native batched layout; use jax.vmap(env.step)")

    def plugin_perplexity(self, learner, params: LiveParams) -> jax.Array:
        nll, count = self.sim.eval_nll(learner, params.weights, *params.heldout)
        return jnp.exp(nll / count).astype(jnp.float32)

    def _fresh_state(self, u, params):
        # Devices hold their real clients' data; the federated state starts from the foundation model.
        fresh = super()._fresh_state(u, params)
        return fresh.replace(data=params.clients.counts.astype(jnp.float32), learner=params.fresh_learner)

    def learn(self, state, params, outcome: RoundOutcome):
        learner, metrics = self.sim.round(
            state.learner,
            params.weights,
            params.clients._replace(levels=outcome.level),
            params.hyper,
            params.server_windows,
            available=outcome.succeeded > 0,
            server_available=None if params.server_windows is None else outcome.server > 0,
        )
        info = {
            "surrogate_perplexity": self.surrogate_perplexity(
                state.ppl, params, outcome
            ),  # what the calibrated env would say
            "train_loss": metrics.loss,
            "clients_trained": metrics.participants,
            "clients_dropped": metrics.dropped,
            # what the round brought, as the surrogate sees it (mec.live_fit refits it from these)
            "k_bar": outcome.k_bar,
            "server_fraction": outcome.server_fraction,
            "repeat_share": outcome.repeat_share,
        }
        return self.plugin_perplexity(learner, params), learner, info


def make_live_env(
    foundation=None, config: LiveConfig = LiveConfig(), *, calibration=None, cache_dir=None, **env_overrides
) -> LiveFedPEATMEC:
    """A live environment on ``foundation`` (default: the cached default model) and the Folio task.

    The env's workload (local steps, batch, sequence length) is the real one, so its latency and
    memory describe the rounds that actually run; ``env_overrides`` go to :func:`make_params`.
    ``calibration`` (needed only for the env's level list and reference scales) defaults to the
    shipped table, which belongs to the default model.
    """
    from fedpeat_jax.peat.foundation import load_foundation
    from fedpeat_jax.tasks import TaskConfig, build_task, device_population

    cfg = config
    fnd = foundation if foundation is not None else load_foundation("default", cache_dir=cache_dir)
    model = fnd.config.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    if cfg.seq_len > model.n_positions:
        raise ValueError(f"LiveConfig.seq_len ({cfg.seq_len}) exceeds the model's n_positions ({model.n_positions})")
    task_cfg = TaskConfig(
        seq_len=cfg.seq_len,
        max_examples=cfg.max_examples,
        max_eval_windows=cfg.eval_windows,
        server_domain=cfg.server_domain,
        server_windows=cfg.server_windows,
        seed=cfg.seed,
    )
    task = build_task(task_cfg, fnd.tokenizer, cache_dir=cache_dir)
    task = device_population(task, cfg.n_devices, cfg.seed)  # the clients `fedpeat calibrate` measures
    data = task.train
    counts = np.asarray(data.counts, np.float64)
    server_data = task.server if cfg.server else None
    env_params = make_params(
        model,
        calibration,
        peft=cfg.peft(),
        n_devices=cfg.n_devices,
        emulator_k=cfg.emulator_k,
        server_domain=cfg.server_domain,
        participation_drift=cfg.participation_drift,
        **{
            "local_steps": float(cfg.local_steps),
            "batch_size": float(cfg.local_batch),
            "seq_len": float(cfg.seq_len),
            "data_min": float(counts.min()),
            "data_max": float(counts.max()),
            "server_data": float(len(task.server[0])),
            "server_enabled": 1.0 if cfg.server else 0.0,
            **env_overrides,
        },
    )
    ks = tuple(int(k) for k in np.asarray(env_params.level_k))
    fed = FedConfig(
        clients_per_round=cfg.n_devices * len(ks),
        level_slots=(cfg.n_devices,) * len(ks),
        emulator_levels=ks,
        local_steps=cfg.local_steps,
        local_batch=cfg.local_batch,
        client_lr=cfg.client_lr,
        server_participation=cfg.server,
        log_lora_gap=False,
        seed=cfg.seed,
    )
    sim = FedPEAT(model, cfg.peft(), fed)
    return LiveFedPEATMEC(sim, fnd.params, data, task.heldout, env_params, server_data=server_data, seed=cfg.seed)


__all__ = ["LiveConfig", "LiveFedPEATMEC", "LiveParams", "make_live_env"]
