"""The perplexity calibration: the fit reproduces the curves it was fitted to, for device rounds and
server-only rounds alike; the two-source model predicts rounds that combine them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.fed.simulation import FedData
from fedpeat_jax.mec import FedPEATMEC, calibrate
from fedpeat_jax.model import gpt2

MODEL = GPT2Config(
    vocab_size=61, n_positions=16, n_embd=16, n_layer=6, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)


WORKLOAD = {"local_steps": 2, "batch_size": 2, "seq_len": 8}


def _fit(measured, server, **kw):
    settings = dict(
        model=MODEL,
        model_name="test",
        l=2,
        r=2,
        ppl0=120.0,
        population=[6.0] * 12,
        workload=WORKLOAD,
        source="test",
        meta={"server_examples": {d: 6.0 for d in server}},
    )
    return calibrate.fit_table(measured, server, **{**settings, **kw})


def test_fit_recovers_the_response_model_of_devices_and_of_server_data_that_hurts():
    rng = np.random.default_rng(0)
    truth = {1: (40.0, 3.0), 2: (30.0, 5.0)}
    measured = {}
    for k, (ppl_inf, eta) in truth.items():
        measured[k] = []
        for scale in (0.05, 0.2):
            f = scale * rng.uniform(0.5, 1.5, 8)
            measured[k].append((calibrate.simulate(120.0, f, ppl_inf, eta), f))
    f_srv = np.full(8, 0.5)
    server = {"modern": [(calibrate.simulate(120.0, f_srv, 150.0, 0.4), f_srv)]}  # a fixed point above the start
    table = _fit(measured, server)
    for k, p, e in zip(table.k, table.ppl_inf, table.eta):
        assert p == pytest.approx(truth[k][0], rel=0.01)
        assert e == pytest.approx(truth[k][1], rel=0.02)
        fit = table.meta["fit"]["levels"][str(k)]
        assert fit["max_rel_error"] < 1e-3 and len(fit["curve_rel_errors"]) == 2
    srv = table.server_response()
    assert srv.ppl_inf == pytest.approx(150.0, rel=0.01) and srv.eta == pytest.approx(0.4, rel=0.02) and srv.data == 6.0
    assert table.server_domain == "modern" and table.workload == {k: float(v) for k, v in WORKLOAD.items()}


def test_mixed_rounds_predicted_by_the_two_source_model():
    table = _fit(
        {1: [(calibrate.simulate(120.0, [0.5] * 4, 40.0, 2.0), np.full(4, 0.5))]},
        {"modern": [(calibrate.simulate(120.0, [0.5] * 4, 110.0, 1.0), np.full(4, 0.5))]},
    )
    # one source alone is that source's curve; both together pull towards a point between them
    only_dev = calibrate.predict_mixed(table, 120.0, [0.5] * 4, [0.0] * 4, 1, "modern")
    np.testing.assert_allclose(only_dev, calibrate.simulate(120.0, [0.5] * 4, *table.ppl_inf, *table.eta), rtol=1e-9)
    both = calibrate.predict_mixed(table, 120.0, [0.5] * 4, [0.5] * 4, 1, "modern")
    assert only_dev[-1] < both[-1] < table.server_response().ppl_inf


def test_fit_on_measured_fedpeat_rounds_within_tolerance_and_loads_in_env():
    params = gpt2.init(jax.random.key(0), MODEL)
    rs = np.random.RandomState(0)
    # A learnable task: every client repeats the same short token pattern; the server holds other text.
    pattern = rs.randint(0, 61, 8)
    tokens = np.tile(pattern, (12, 6, 2))
    train = FedData.from_arrays(tokens, np.ones_like(tokens), np.full(12, 6))
    heldout = (tokens[0], np.ones_like(tokens[0], np.float32))
    other = rs.randint(0, 61, (6, 16))
    cfg = calibrate.CalibrateConfig(
        levels=(1,),
        clients_per_round=(2, 6),
        local_steps=2,
        local_batch=2,
        client_lr=1e-2,
        lora_rank=2,
        lora_alpha=8.0,
        population=None,
    )
    runs = calibrate._Runs(params, MODEL, cfg.peft(), heldout)
    measured = {}
    for m in (2, 6):
        ppl, used = runs.curve(cfg.fed(clients_per_round=m, emulator_levels=(1,), client_lr=1e-2), train, 4, 0)
        assert ppl[-1] < ppl[0]  # tuning helps
        np.testing.assert_allclose(used / 72.0, m / 12)  # equal clients: fraction = participation
        measured.setdefault(1, []).append((ppl, used / 72.0))
    server_data = (jnp.asarray(other), jnp.ones((6, 16), jnp.float32))
    ppl, used = runs.curve(cfg.fed(server_participation=True), train, 4, 0, server_data=server_data, devices_on=False)
    np.testing.assert_allclose(used, 6.0)  # only the server's examples
    fixed = runs.curve(cfg.fed(clients_per_round=2, emulator_levels=(1,)), train, 2, 0, available=jnp.arange(12) < 2)
    np.testing.assert_allclose(fixed[1], 12.0)  # a fixed subset: the same two clients' examples every round
    table = _fit(measured, {"modern": [(ppl, used / 72.0)]}, ppl0=float(measured[1][0][0][0]))
    for fit in (table.meta["fit"]["levels"]["1"], table.meta["fit"]["server"]["modern"]):
        assert fit["max_rel_error"] < calibrate.FIT_TOLERANCE
    with pytest.raises(ValueError, match="does not match"):  # a table for another model is refused
        FedPEATMEC(preset="default", calibration=table)


def test_fit_drift_never_puts_a_fixed_point_below_zero():
    """Curves that fall far below ppl_inf (a short noisy run) pull the drift negative: the search
    stays where every round's fixed point is >= 0, so no curve goes through log of a negative."""
    import warnings

    curves = [(np.array([200.0, 101.0, 20.0]), np.array([0.1, 0.1]))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = calibrate.fit_drift(curves, ppl_inf=100.0, eta=50.0)
    assert 100.0 + fit["drift"] * (1 / 0.1 - 1) >= 0
    assert fit["curve_rel_errors"][0] < 0.01 < fit["curve_rel_errors_without_drift"][0]


def test_fit_drift_recovers_the_participation_drift_of_repeated_clients():
    truth, ppl_inf, eta = 4.0, 40.0, 3.0
    curves = []
    for phi in (0.2, 0.5):
        f = np.full(12, phi)
        repeat = (np.arange(12) > 0).astype(float)  # the same clients: nobody repeated in the first round
        curves.append((calibrate.simulate(120.0, f, ppl_inf, eta, truth, repeat), f))
    assert curves[0][0][-1] > ppl_inf + 0.9 * truth * (1 / 0.2 - 1)  # it settles above ppl_inf
    fit = calibrate.fit_drift(curves, ppl_inf, eta)
    assert fit["drift"] == pytest.approx(truth, rel=1e-3)
    assert max(fit["curve_rel_errors"]) < 1e-4 < min(fit["curve_rel_errors_without_drift"])
    # the table carries it; the environment uses it only when asked (the default problem is unchanged)
    table = _fit({1: curves}, {"modern": [(calibrate.simulate(120.0, [0.5] * 4, 110.0, 1.0), np.full(4, 0.5))]})
    table = table.replace(drift=fit["drift"])
    again = type(table).from_dict(table.to_dict())
    assert again.drift == table.drift
    legacy = table.to_dict()
    del legacy["drift"]
    assert type(table).from_dict(legacy).drift == 0.0  # tables measured before the drift: none
    from fedpeat_jax.mec import make_params

    assert float(make_params(MODEL, table).ppl_drift) == 0.0
    assert float(make_params(MODEL, table, participation_drift=True).ppl_drift) == pytest.approx(truth, rel=1e-3)
    with pytest.raises(ValueError, match="drift must be finite"):
        table.replace(drift=float("nan"))


def test_bad_calibrate_config():
    with pytest.raises(ValueError, match="strictly increasing"):
        calibrate.CalibrateConfig(levels=(2, 1))
    with pytest.raises(ValueError, match="rounds must be >= 2"):
        calibrate.CalibrateConfig(rounds=1)
    with pytest.raises(ValueError, match="server_domains"):
        calibrate.CalibrateConfig(server_domains=("modern", "klingon"))
    with pytest.raises(ValueError, match="adapter_l"):
        calibrate.CalibrateConfig(adapter_l=-1)
    # the adapter split is an option: levels are checked against the middle it leaves
    calibrate.CalibrateConfig(levels=(0, 4), adapter_l=1, adapter_r=1).check_model(MODEL)
    with pytest.raises(ValueError, match=r"larger than the model's middle \(2 blocks with l=2, r=2\)"):
        calibrate.CalibrateConfig(levels=(0, 4)).check_model(MODEL)
    with pytest.raises(ValueError, match="leaves no middle"):
        calibrate.CalibrateConfig(adapter_l=3, adapter_r=3).check_model(MODEL)


def test_bad_population():
    with pytest.raises(ValueError, match="at most the population"):
        calibrate.CalibrateConfig(population=10, clients_per_round=(3, 16))
    calibrate.CalibrateConfig(population=None, clients_per_round=(3, 16))  # every client: no bound here
    with pytest.raises(ValueError, match="fixed_clients"):
        calibrate.CalibrateConfig(population=10, fixed_clients=(2, 10))  # all of them: nothing to drift from
    with pytest.raises(ValueError, match="fixed_rounds"):
        calibrate.CalibrateConfig(fixed_rounds=1)


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
