"""`fedpeat calibrate`: measure real FedPEAT runs and fit the environment's perplexity response.

For every emulator level k and participation level (clients per round), run the project's
FedPEAT simulator on the foundation model and a population of Folio role clients (the
environment's devices: `population` of them, the same seeded choice the live environment
trains), measuring the held-out plug-in perplexity after every round and the fraction of the
population's data the round used. The environment's data fraction means the same thing (the
participants' share of all devices' data), so the fitted rates hold in its units; fractions of
a much larger population would make a round of the env's few devices look like hundreds of
clients' worth of progress. Then fit, per level, the response model of mec_model.md

    ppl_t = ppl_inf(k) + (ppl_{t-1} - ppl_inf(k)) * exp(-eta(k) * data_fraction_t)

by a grid over ppl_inf (below every measured value) with eta in closed form (least squares on
log((ppl_t - P) / (ppl_{t-1} - P)) = -eta f_t), keeping the pair whose simulated curves (each
started from its measured ppl_0 and driven by its measured fractions) best match the
measurements in log space. The table, with the measured curves and the fit's worst relative
error, is written as JSON that `FedPEATMEC` loads.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from fedpeat_jax.config import Config, FedConfig, PeftConfig
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.mec.calibration import CalibrationTable, model_shape

FIT_TOLERANCE = 0.10  # stated tolerance: simulated curves within 10% of every measured point


@dataclass(frozen=True)
class CalibrateConfig(Config):
    """What `fedpeat calibrate` measures."""

    levels: tuple[int, ...] = (0, 1, 2, 3, 4)  # emulator sizes k (middle blocks kept)
    population: Optional[int] = 10  # the env's devices: clients whose data the fractions refer to (None: every client)
    clients_per_round: tuple[int, ...] = (3, 10)  # participation levels (at most the population)
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
        if not self.clients_per_round or min(self.clients_per_round) < 1:
            raise ValueError(f"CalibrateConfig.clients_per_round must be >= 1, got {self.clients_per_round}")
        for name in ("rounds", "local_steps", "local_batch", "lora_rank", "seq_len", "max_examples", "max_eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibrateConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.population is not None and not 1 <= max(self.clients_per_round) <= self.population:
            raise ValueError(f"CalibrateConfig.clients_per_round {self.clients_per_round} must be at most the population ({self.population})")
        if self.rounds < 2:
            raise ValueError(f"CalibrateConfig.rounds must be >= 2 to fit a rate, got {self.rounds}")

    def peft(self) -> PeftConfig:
        return PeftConfig(kind="lora", lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)

    def task(self):
        """The TaskConfig of the measured clients (before the population is drawn from them)."""
        from fedpeat_jax.tasks import TaskConfig

        return TaskConfig(text=self.text, seq_len=self.seq_len, max_examples=self.max_examples, max_eval_windows=self.max_eval_windows, seed=self.seed)


# --------------------------------------------------------------------------------------------
# The fit (pure numpy)
# --------------------------------------------------------------------------------------------
def simulate(ppl0: float, fractions, ppl_inf: float, eta: float) -> np.ndarray:
    """The response model's curve [ppl_0, ppl_1, ...] driven by per-round data fractions."""
    out = [float(ppl0)]
    for f in fractions:
        out.append(ppl_inf + (out[-1] - ppl_inf) * np.exp(-eta * f))
    return np.asarray(out)


def _fit_eta(curves: list, P: float) -> float:
    """Least-squares eta for a given ppl_inf P: log((p_t - P) / (p_{t-1} - P)) = -eta f_t."""
    num = den = 0.0
    for p, f in curves:
        gaps = p - P
        y = np.log(gaps[1:] / gaps[:-1])
        num += float(np.sum(f * y))
        den += float(np.sum(f * f))
    return max(-num / max(den, 1e-12), 1e-6)


def _log_error(curves: list, P: float, eta: float) -> float:
    return sum(float(np.sum((np.log(simulate(p[0], f, P, eta)) - np.log(p)) ** 2)) for p, f in curves)


def fit_level(curves: list) -> dict:
    """Fit (ppl_inf, eta) to curves [(ppl array of R+1, fraction array of R)] of one level.

    A grid over ppl_inf in (0.3, 0.999) x the lowest measured value, with eta in closed form,
    gives a start; Nelder-Mead on the simulated curves' log error then refines both jointly.
    """
    from scipy.optimize import minimize

    floor = min(float(np.min(p)) for p, _ in curves)
    grid = np.linspace(0.3 * floor, 0.999 * floor, 200)
    errors = [_log_error(curves, P, _fit_eta(curves, P)) for P in grid]
    start = float(grid[int(np.argmin(errors))])

    lo, hi = 0.3 * floor, 0.999 * floor

    def to_ppl(z):  # keeps ppl_inf inside the grid's range (below every measured value)
        return lo + (hi - lo) / (1.0 + np.exp(-z))

    def objective(x):  # x = (squashed ppl_inf, log eta)
        return _log_error(curves, to_ppl(x[0]), float(np.exp(x[1])))

    u = np.clip((start - lo) / (hi - lo), 1e-6, 1 - 1e-6)
    x0 = np.array([np.log(u / (1 - u)), np.log(_fit_eta(curves, start))])
    x = minimize(objective, x0, method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000}).x
    ppl_inf, eta = float(to_ppl(x[0])), float(np.exp(x[1]))
    rel = max(float(np.max(np.abs(simulate(p[0], f, ppl_inf, eta) / p - 1))) for p, f in curves)
    return {"ppl_inf": ppl_inf, "eta": eta, "max_rel_error": rel}


def fit_table(measured: dict, *, model, model_name: str, l: int, r: int, ppl0: float, source: str, meta: dict) -> CalibrationTable:
    """A CalibrationTable from {k: [(ppl curve, fractions), ...]}."""
    ks = sorted(measured)
    fits = {k: fit_level(measured[k]) for k in ks}
    return CalibrationTable(
        model_name=model_name,
        model=model_shape(model),
        l=l,
        r=r,
        k=tuple(ks),
        ppl_inf=tuple(fits[k]["ppl_inf"] for k in ks),
        eta=tuple(fits[k]["eta"] for k in ks),
        ppl0=ppl0,
        synthetic=False,
        source=source,
        meta={**meta, "fit": {str(k): fits[k] for k in ks}, "fit_tolerance": FIT_TOLERANCE},
    )


# --------------------------------------------------------------------------------------------
# Measurement: real FedPEAT runs
# --------------------------------------------------------------------------------------------
def measure_curve(sim, params, task, rounds: int, seed: int) -> tuple:
    """(plug-in ppl after rounds 0..R, data fraction of rounds 1..R) of one FedPEAT run."""
    import jax.numpy as jnp

    state = jax.jit(sim.init)(jax.random.key(seed), params)
    heldout = tuple(jnp.asarray(x) for x in task.heldout)
    evaluate = jax.jit(lambda s, p, h: sim.eval_nll(s, p, *h))
    run = jax.jit(lambda s, p, d: sim.run_rounds(s, p, d, 1))
    step = lambda s: run(s, params, task.train)  # noqa: E731
    total_examples = float(np.asarray(task.train.counts).sum())
    ppl, fractions = [], []
    for t in range(rounds + 1):
        if t:
            state, metrics = step(state)
            fractions.append(float(metrics.examples[0]) / total_examples)
        nll, count = jax.device_get(evaluate(state, params, heldout))
        ppl.append(float(np.exp(nll / count)))
    return np.asarray(ppl), np.asarray(fractions)


def calibrate(cfg: CalibrateConfig, params, model, tokenizer, *, model_name: str = "default", cache_dir=None,
              out: Optional[Path] = None, show_progress: bool = True, source: str = "",
              model_fingerprint: Optional[str] = None) -> CalibrationTable:
    """Run every (level, participation) FedPEAT run, fit the table, write it to `out`. The table's
    meta records which model it belongs to: `model_fingerprint` (the foundation model's settings,
    when it is one) and the sha256 of the exact weights (`io.fingerprint.tree_digest`)."""
    from fedpeat_jax.fed.simulation import FedPEAT
    from fedpeat_jax.io.logging import progress
    from fedpeat_jax.io.fingerprint import tree_digest
    from fedpeat_jax.tasks import build_task, device_population

    model = model.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    task_cfg = cfg.task()
    n_middle = model.n_layer - 4
    bad = [k for k in cfg.levels if k > n_middle]
    if bad:
        raise ValueError(f"CalibrateConfig.levels {bad} larger than the model's middle ({n_middle} blocks)")
    task = build_task(task_cfg, tokenizer, cache_dir=cache_dir)
    if cfg.population is not None:
        task = device_population(task, cfg.population, cfg.seed)
    n_clients = int(task.train.tokens.shape[0])
    too_many = [c for c in cfg.clients_per_round if c > n_clients]
    if too_many:
        raise ValueError(f"CalibrateConfig.clients_per_round {too_many} is more than the {n_clients} clients that exist")
    measured, started = {}, time.time()
    bar = progress(len(cfg.levels) * len(cfg.clients_per_round) * cfg.rounds, "calibrate (FedPEAT rounds)", disable=not show_progress)
    ppl0 = None
    for k in cfg.levels:
        for m in cfg.clients_per_round:
            fed = FedConfig(clients_per_round=m, local_steps=cfg.local_steps, local_batch=cfg.local_batch, client_lr=cfg.client_lr,
                            emulator_levels=(k,), log_lora_gap=False, seed=cfg.seed)
            sim = FedPEAT(model, cfg.peft(), fed, n_clients=n_clients)
            ppl, fractions = measure_curve(sim, params, task, cfg.rounds, cfg.seed)
            ppl0 = float(ppl[0]) if ppl0 is None else ppl0
            measured.setdefault(k, []).append((ppl, fractions))
            bar.update(cfg.rounds)
            bar.set_postfix(k=k, clients=m, ppl=f"{ppl[-1]:.1f}")
    bar.close()
    meta = {
        "model_fingerprint": model_fingerprint,
        "model_params_sha256": tree_digest(params),
        "calibrate_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "peft": {"kind": "lora", "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha},
        "clients": n_clients,
        "seconds": round(time.time() - started, 1),
        "curves": {str(k): [{"ppl": c[0].tolist(), "data_fraction": c[1].tolist()} for c in curves] for k, curves in measured.items()},
    }
    table = fit_table(measured, model=model, model_name=model_name, l=2, r=2, ppl0=ppl0, source=source or "fedpeat calibrate", meta=meta)
    if out is not None:
        table.save(out)
    return table
