"""The perplexity calibration: the fit reproduces the curves it was fitted to."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.mec import FedPEATMEC, calibrate
from fedpeat_jax.model import gpt2

MODEL = GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=6, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def test_fit_recovers_the_response_model():
    rng = np.random.default_rng(0)
    truth = {1: (40.0, 3.0), 2: (30.0, 5.0)}
    measured = {}
    for k, (ppl_inf, eta) in truth.items():
        measured[k] = []
        for scale in (0.05, 0.2):
            f = scale * rng.uniform(0.5, 1.5, 8)
            measured[k].append((calibrate.simulate(120.0, f, ppl_inf, eta), f))
    table = calibrate.fit_table(measured, model=MODEL, model_name="test", l=2, r=2, ppl0=120.0, source="test", meta={})
    for k, p, e in zip(table.k, table.ppl_inf, table.eta):
        assert p == pytest.approx(truth[k][0], rel=0.01)
        assert e == pytest.approx(truth[k][1], rel=0.02)
        assert table.meta["fit"][str(k)]["max_rel_error"] < 1e-3


def test_fit_on_measured_fedpeat_curves_within_tolerance_and_loads_in_env():
    params = gpt2.init(jax.random.key(0), MODEL)
    rs = np.random.RandomState(0)
    # A learnable task: every client repeats the same short token pattern.
    pattern = rs.randint(0, 61, 8)
    tokens = np.tile(pattern, (12, 6, 2))
    train = FedData.from_arrays(tokens, np.ones_like(tokens), np.full(12, 6))
    task = SimpleNamespace(train=train, heldout=(tokens[0], np.ones_like(tokens[0], np.float32)))
    measured = {}
    for k in (1,):
        for m in (2, 6):
            fed = FedConfig(clients_per_round=m, local_steps=2, local_batch=2, client_lr=1e-2, emulator_levels=(k,), log_lora_gap=False)
            sim = FedPEAT(MODEL, PeftConfig(kind="lora", lora_rank=2, lora_alpha=8.0), fed, n_clients=12)
            ppl, fractions = calibrate.measure_curve(sim, params, task, rounds=4, seed=0)
            assert ppl[-1] < ppl[0]  # tuning helps
            np.testing.assert_allclose(fractions, m / 12)  # equal clients: fraction = participation
            measured.setdefault(k, []).append((ppl, fractions))
    table = calibrate.fit_table(measured, model=MODEL, model_name="test", l=2, r=2, ppl0=float(measured[1][0][0][0]), source="test", meta={})
    for k in table.k:
        assert table.meta["fit"][str(k)]["max_rel_error"] < calibrate.FIT_TOLERANCE
    with pytest.raises(ValueError, match="does not match"):  # a table for another model is refused
        FedPEATMEC(preset="default", calibration=table)


def test_bad_calibrate_config():
    with pytest.raises(ValueError, match="strictly increasing"):
        calibrate.CalibrateConfig(levels=(2, 1))
    with pytest.raises(ValueError, match="rounds must be >= 2"):
        calibrate.CalibrateConfig(rounds=1)


def test_bad_population():
    with pytest.raises(ValueError, match="at most the population"):
        calibrate.CalibrateConfig(population=10, clients_per_round=(3, 16))
    calibrate.CalibrateConfig(population=None, clients_per_round=(3, 16))  # every client: no bound here


def test_device_population_is_a_seeded_subset_shared_by_calibration_and_live_mode():
    from fedpeat_jax.tasks import Task, device_population

    tokens = np.arange(12 * 2 * 3).reshape(12, 2, 3)
    train = FedData.from_arrays(tokens, np.ones_like(tokens), np.arange(1, 13) % 2 + 1)
    task = Task(train, tuple(f"play/role{i}" for i in range(12)), None, None, None, 0)
    a, b = device_population(task, 5, seed=3), device_population(task, 5, seed=3)
    assert a.names == b.names and len(a.names) == 5 and len(set(a.names)) == 5
    ids = [task.names.index(n) for n in a.names]
    assert ids == sorted(ids)
    np.testing.assert_array_equal(np.asarray(a.train.tokens), tokens[ids])
    np.testing.assert_array_equal(np.asarray(a.train.counts), np.asarray(train.counts)[ids])
    assert a.n_tokens == int(np.asarray(a.train.mask).sum())
    assert device_population(task, 5, seed=4).names != a.names
    with pytest.raises(ValueError, match="device population of 13"):
        device_population(task, 13)
