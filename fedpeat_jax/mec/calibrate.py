"""`fedpeat calibrate`: measure real FedPEAT rounds and fit the environment's perplexity response.

Three kinds of runs of the project's FedPEAT simulator on the foundation model, each measuring
the held-out plug-in perplexity after every round:

* **device rounds**, for every emulator size k and participation level (clients per round): a
  population of Folio role clients (the environment's devices: ``population`` of them, the same
  seeded choice the live environment trains) tunes LoRA on the l-k-r emulator; the round's data
  fraction is the participants' share of the population's examples (the environment's phi_dev);
* **server-only rounds**, for every server data domain: only the server tunes, on the full model,
  on ``server_windows`` windows of its own data ("modern": public modern-spelling text, the
  foundation's own domain; "target": the devices' domain); the fraction is server examples /
  population examples (the environment's phi_srv);
* one **mixed** run (server on the default domain + every device on the largest level), which is
  not fitted: it checks how well the fitted two-source model predicts rounds that combine both;
* **fixed-subset** runs (``fixed_clients``): the same first m clients every round on the largest
  level, for ``fixed_rounds`` rounds; the model drifts towards their data and the held-out
  perplexity rises again. They fit the table's ``drift`` (``fit_drift``, the level's (P, eta) kept),
  which the environment uses with ``make_params(participation_drift=True)`` (the live preset).

Every curve is fitted by the single-source response ``ppl_t = P + (ppl_{t-1} - P) exp(-eta f_t)``:
per emulator level (its curves together) and per server domain, by a grid over (P, eta) refined
with Nelder-Mead on the simulated curves' log error (each started at its measured ppl_0 and
driven by its measured fractions). The table holds the fits and, in ``meta``, every measured curve
with the fit's worst relative error per curve.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.config import Config, FedConfig, PeftConfig
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.mec.calibrate_fit import (
    FIT_TOLERANCE,
    curve_errors,
    fit_drift,
    fit_level,
    fit_table,
    predict_mixed,
    simulate,
)
from fedpeat_jax.mec.calibration import CalibrationTable

SERVER_DOMAINS = ("modern", "target")  # tasks.SERVER_DOMAINS, spelt here to keep the import lazy


@dataclass(frozen=True)
class CalibrateConfig(Config):
    """What `fedpeat calibrate` measures."""

    levels: tuple[int, ...] = (0, 1, 2, 3, 4)  # emulator sizes k (middle blocks kept)
    adapter_l: int = 2  # bottom blocks of the adapter (the environment's l)
    adapter_r: int = 2  # top blocks of the adapter (the environment's r)
    population: Optional[int] = 10  # the env's devices: clients whose data the fractions refer to (None: every client)
    clients_per_round: tuple[int, ...] = (3, 10)  # participation levels (at most the population)
    server_domains: tuple[str, ...] = (
        SERVER_DOMAINS  # server data domains measured in server-only rounds; the first is the default
    )
    server_windows: int = 32  # windows of server data (the environment's default server_data)
    mixed_run: bool = True  # also measure server + all devices (a check of the two-source model, not fitted)
    fixed_clients: tuple[int, ...] = (2, 5)
    """Fixed-subset runs: the same first m clients of the population every round, on the largest
    level, to fit the table's ``drift`` (empty: none, drift 0)."""
    fixed_rounds: int = 16
    """FedPEAT rounds of each fixed-subset run (the drift shows after several rounds)."""
    rounds: int = 8
    """FedPEAT rounds per measured curve (>= 2)."""
    local_steps: int = 4
    """Local steps per client and round."""
    local_batch: int = 2
    """Windows per local step."""
    client_lr: float = 3e-3
    """Client learning rate (Adam)."""
    lora_rank: int = 4
    """LoRA rank of the PEFT module in the adapter."""
    lora_alpha: float = 32.0
    """LoRA alpha."""
    seq_len: int = 64
    """Tokens per window."""
    max_examples: int = 16
    """Windows kept per client (`TaskConfig.max_examples`)."""
    max_eval_windows: int = 96
    """Held-out windows for the plug-in perplexity."""
    text: TextConfig = TextConfig()  # the devices' text (default: Folio-spelling role clients)
    seed: int = 0
    """Seed of the runs and the task."""

    def validate(self) -> None:
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"CalibrateConfig.levels must be strictly increasing, got {self.levels}")
        if min(self.levels) < 0:
            raise ValueError(f"CalibrateConfig.levels must be >= 0 middle blocks, got {self.levels}")
        if not self.clients_per_round or min(self.clients_per_round) < 1:
            raise ValueError(f"CalibrateConfig.clients_per_round must be >= 1, got {self.clients_per_round}")
        for name in ("adapter_l", "adapter_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"CalibrateConfig.{name} must be >= 0, got {getattr(self, name)}")
        bad = [d for d in self.server_domains if d not in SERVER_DOMAINS]
        if not self.server_domains or bad or len(set(self.server_domains)) != len(self.server_domains):
            raise ValueError(
                f"CalibrateConfig.server_domains must be distinct names from {SERVER_DOMAINS}, got {self.server_domains}"
            )
        for name in (
            "rounds",
            "local_steps",
            "local_batch",
            "lora_rank",
            "seq_len",
            "max_examples",
            "max_eval_windows",
            "server_windows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibrateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.population is not None and not 1 <= max(self.clients_per_round) <= self.population:
            raise ValueError(
                f"CalibrateConfig.clients_per_round {self.clients_per_round} must be at most the population ({self.population})"
            )
        too_many = self.population is not None and max(self.fixed_clients, default=0) >= self.population
        if min(self.fixed_clients, default=1) < 1 or too_many:
            raise ValueError(
                f"CalibrateConfig.fixed_clients {self.fixed_clients} must be between 1 and fewer than the population "
                f"({self.population}): with every client there is nothing to drift from"
            )
        if self.fixed_rounds < 2:
            raise ValueError(f"CalibrateConfig.fixed_rounds must be >= 2, got {self.fixed_rounds}")
        if self.rounds < 2:
            raise ValueError(f"CalibrateConfig.rounds must be >= 2 to fit a rate, got {self.rounds}")

    def check_model(self, model) -> None:
        """Refuse levels or an adapter split that the model (a GPT2Config) does not have."""
        middle = model.n_layer - self.adapter_l - self.adapter_r
        if middle < 1:
            raise ValueError(
                f"CalibrateConfig.adapter_l + adapter_r ({self.adapter_l} + {self.adapter_r}) leaves no middle "
                f"block in the {model.n_layer}-block model"
            )
        bad = [k for k in self.levels if k > middle]
        if bad:
            raise ValueError(
                f"CalibrateConfig.levels {bad} larger than the model's middle ({middle} blocks with "
                f"l={self.adapter_l}, r={self.adapter_r})"
            )

    def peft(self) -> PeftConfig:
        return PeftConfig(kind="lora", lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)

    def fed(self, **changes) -> FedConfig:
        """The FedConfig of one measured run."""
        base = dict(
            clients_per_round=1,
            local_steps=self.local_steps,
            local_batch=self.local_batch,
            client_lr=self.client_lr,
            emulator_levels=(self.levels[-1],),
            adapter_l=self.adapter_l,
            adapter_r=self.adapter_r,
            log_lora_gap=False,
            seed=self.seed,
        )
        return FedConfig(**{**base, **changes})

    def task(self, server_domain: Optional[str] = None):
        """The TaskConfig of the measured clients (before the population is drawn from them), the
        server holding ``server_domain`` (default: the first of ``server_domains``)."""
        from fedpeat_jax.tasks import TaskConfig

        return TaskConfig(
            text=self.text,
            seq_len=self.seq_len,
            max_examples=self.max_examples,
            max_eval_windows=self.max_eval_windows,
            server_domain=server_domain or self.server_domains[0],
            server_windows=self.server_windows,
            seed=self.seed,
        )


# --------------------------------------------------------------------------------------------
# Measurement: real FedPEAT rounds
# --------------------------------------------------------------------------------------------
class _Runs:
    """The FedPEAT calls of a measurement, in one place: build a simulator, init, round, evaluate.
    The weights, data and held-out windows are arguments of the jitted functions, which are
    compiled once per FedConfig (runs that differ only in their rounds or clients share them)."""

    def __init__(self, params, model, peft, heldout):
        self.params, self.model, self.peft = params, model, peft
        self.heldout = tuple(jnp.asarray(x) for x in heldout)
        self._programs = {}

    def _compiled(self, fed: FedConfig, n_clients: int):
        from fedpeat_jax.fed.simulation import FedPEAT

        key = (fed, n_clients)
        if key not in self._programs:
            sim = FedPEAT(self.model, self.peft, fed, n_clients=n_clients)
            self._programs[key] = (
                jax.jit(sim.init),
                jax.jit(lambda s, p, d, h, srv, avail: sim.round(s, p, d, h, srv, available=avail)),
                jax.jit(lambda s, p, h: sim.eval_nll(s, p, *h)),
            )
        return self._programs[key]

    def curve(
        self, fed: FedConfig, data, rounds: int, seed: int, server_data=None, devices_on: bool = True, available=None
    ) -> tuple:
        """Plug-in perplexity after rounds 0..R and the examples each round used (devices, server);
        ``available`` (C,) bool: only those clients may be drawn (default: all when ``devices_on``)."""
        from fedpeat_jax.fed.client import Hyper

        n_clients = int(data.tokens.shape[0])
        init, step, evaluate = self._compiled(fed, n_clients)
        hyper = Hyper.from_config(fed)
        if available is None:
            available = jnp.full((n_clients,), bool(devices_on))
        state = init(jax.random.key(seed), self.params)
        ppl, examples = [], []
        for t in range(rounds + 1):
            if t:
                state, metrics = step(state, self.params, data, hyper, server_data, available)
                examples.append(float(metrics.examples))
            nll, count = jax.device_get(evaluate(state, self.params, self.heldout))
            ppl.append(float(np.exp(nll / count)))
        return np.asarray(ppl), np.asarray(examples)


def calibrate(
    cfg: CalibrateConfig,
    params,
    model,
    tokenizer,
    *,
    model_name: str = "default",
    cache_dir=None,
    out: Optional[Path] = None,
    show_progress: bool = True,
    source: str = "",
    model_fingerprint: Optional[str] = None,
) -> CalibrationTable:
    """Run every device, server-only and mixed FedPEAT run, fit the table, write it to `out`.

    The table's meta records which model it belongs to: ``model_fingerprint`` (the foundation
    model's settings, when it is one) and the sha256 of the exact weights
    (``io.fingerprint.tree_digest``).
    """
    from fedpeat_jax.io.fingerprint import tree_digest
    from fedpeat_jax.io.logging import progress

    model, tasks, data, runs = _setup(cfg, params, model, tokenizer, cache_dir)
    n_clients = int(data.tokens.shape[0])
    population = np.asarray(data.counts, np.float64)
    total = float(population.sum())
    n_runs = len(cfg.levels) * len(cfg.clients_per_round) + len(cfg.server_domains) + int(cfg.mixed_run)
    bar = progress(n_runs * cfg.rounds, "calibrate (FedPEAT rounds)", disable=not show_progress)
    started = time.time()

    measured, server, server_examples = {}, {}, {}
    for k in cfg.levels:
        for m in cfg.clients_per_round:
            ppl, used = runs.curve(cfg.fed(clients_per_round=m, emulator_levels=(k,)), data, cfg.rounds, cfg.seed)
            measured.setdefault(k, []).append((ppl, used / total))
            bar.update(cfg.rounds)
            bar.set_postfix(k=k, clients=m, ppl=f"{ppl[-1]:.1f}")
    for domain in cfg.server_domains:
        server_data = tuple(jnp.asarray(x) for x in tasks[domain].server)
        server_examples[domain] = float(server_data[0].shape[0])
        ppl, used = runs.curve(
            cfg.fed(server_participation=True), data, cfg.rounds, cfg.seed, server_data=server_data, devices_on=False
        )
        server[domain] = [(ppl, used / total)]
        bar.update(cfg.rounds)
        bar.set_postfix(server=domain, ppl=f"{ppl[-1]:.1f}")
    mixed = None
    if cfg.mixed_run:
        domain, k = cfg.server_domains[0], cfg.levels[-1]
        server_data = tuple(jnp.asarray(x) for x in tasks[domain].server)
        ppl, used = runs.curve(
            cfg.fed(clients_per_round=n_clients, emulator_levels=(k,), server_participation=True),
            data,
            cfg.rounds,
            cfg.seed,
            server_data=server_data,
        )
        srv_f = np.full(cfg.rounds, server_examples[domain] / total)
        mixed = {
            "domain": domain,
            "k": k,
            "ppl": ppl,
            "device_fraction": used / total - srv_f,
            "server_fraction": srv_f,
        }
        bar.update(cfg.rounds)
    bar.close()

    ppl0 = float(measured[cfg.levels[0]][0][0][0])
    curves = {
        str(k): [{"ppl": c[0].tolist(), "data_fraction": c[1].tolist()} for c in cs] for k, cs in measured.items()
    }
    meta = {
        "model_fingerprint": model_fingerprint,
        "model_params_sha256": tree_digest(params),
        "calibrate_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "peft": {"kind": "lora", "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha},
        "clients": n_clients,
        "server_examples": server_examples,
        "seconds": round(time.time() - started, 1),
        "curves": curves,
        "server_curves": {
            d: [{"ppl": c[0].tolist(), "data_fraction": c[1].tolist()} for c in cs] for d, cs in server.items()
        },
    }
    workload = {"local_steps": cfg.local_steps, "batch_size": cfg.local_batch, "seq_len": cfg.seq_len}
    table = fit_table(
        measured,
        server,
        model=model,
        model_name=model_name,
        l=cfg.adapter_l,
        r=cfg.adapter_r,
        ppl0=ppl0,
        population=population.tolist(),
        workload=workload,
        source=source or "fedpeat calibrate",
        meta=meta,
    )
    if mixed is not None:
        predicted = predict_mixed(
            table, mixed["ppl"][0], mixed["device_fraction"], mixed["server_fraction"], mixed["k"], mixed["domain"]
        )
        table.meta["mixed"] = {
            **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in mixed.items()},
            "predicted": predicted.tolist(),
            "max_rel_error": float(np.max(np.abs(predicted / mixed["ppl"] - 1))),
        }
    if cfg.fixed_clients:
        table = _with_drift(table, cfg, runs, data, show_progress)
    if out is not None:
        table.save(out)
    return table


def _setup(cfg: CalibrateConfig, params, model, tokenizer, cache_dir):
    """(model without dropout, {domain: task}, the devices' data, _Runs) of a measurement."""
    from fedpeat_jax.tasks import build_task, device_population

    model = model.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    cfg.check_model(model)
    tasks = {domain: build_task(cfg.task(domain), tokenizer, cache_dir=cache_dir) for domain in cfg.server_domains}
    task = tasks[cfg.server_domains[0]]
    if cfg.population is not None:
        task = device_population(task, cfg.population, cfg.seed)
    n_clients = int(task.train.tokens.shape[0])
    too_many = [c for c in (*cfg.clients_per_round, *cfg.fixed_clients) if c > n_clients]
    if too_many:
        raise ValueError(
            f"CalibrateConfig.clients_per_round / fixed_clients {too_many} is more than the {n_clients} clients that exist"
        )
    return model, tasks, task.train, _Runs(params, model, cfg.peft(), task.heldout)


def _with_drift(table: CalibrationTable, cfg: CalibrateConfig, runs: _Runs, data, show_progress: bool):
    """Measure the fixed-subset runs (the same first m clients every round, largest level) and
    fit the table's ``drift`` with that level's (ppl_inf, eta) kept; curves and errors go to meta."""
    from fedpeat_jax.io.logging import progress

    k = cfg.levels[-1]
    total = float(np.sum(np.asarray(data.counts, np.float64)))
    n_clients = int(data.tokens.shape[0])
    bar = progress(
        len(cfg.fixed_clients) * cfg.fixed_rounds, "calibrate (fixed-subset rounds)", disable=not show_progress
    )
    curves = []
    for m in cfg.fixed_clients:
        fed = cfg.fed(clients_per_round=m, emulator_levels=(k,))
        ppl, used = runs.curve(fed, data, cfg.fixed_rounds, cfg.seed, available=jnp.arange(n_clients) < m)
        curves.append((ppl, used / total))
        bar.update(cfg.fixed_rounds)
        bar.set_postfix(clients=m, ppl=f"{ppl[-1]:.1f}")
    bar.close()
    i = table.k.index(k)
    fit = fit_drift(curves, table.ppl_inf[i], table.eta[i])
    meta = {
        **table.meta,
        "fixed_curves": {
            "k": k,
            "clients": list(cfg.fixed_clients),
            "curves": [{"ppl": p.tolist(), "data_fraction": f.tolist()} for p, f in curves],
        },
    }
    meta["fit"] = {**meta.get("fit", {}), "drift": fit}
    return table.replace(drift=fit["drift"], meta=meta)


def add_drift(
    table: CalibrationTable, cfg: CalibrateConfig, params, model, tokenizer, *, cache_dir=None, show_progress=True
) -> CalibrationTable:
    """``table`` with its ``drift`` measured and fitted (only the fixed-subset runs of ``cfg``):
    adds the participation drift to a table measured before it existed."""
    if not cfg.fixed_clients:
        raise ValueError("CalibrateConfig.fixed_clients is empty: there is no fixed-subset run to fit the drift on")
    if cfg.levels[-1] not in table.k:
        raise ValueError(
            f"the table has no level k={cfg.levels[-1]} (the fixed-subset runs' level); it has {list(table.k)}"
        )
    model, _, data, runs = _setup(cfg, params, model, tokenizer, cache_dir)
    return _with_drift(table, cfg, runs, data, show_progress)


__all__ = [
    "CalibrateConfig",
    "add_drift",
    "FIT_TOLERANCE",
    "calibrate",
    "curve_errors",
    "fit_drift",
    "fit_level",
    "fit_table",
    "predict_mixed",
    "simulate",
]
