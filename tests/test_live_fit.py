"""mec.live_fit: the surrogate's response refitted to measured one-round transitions.

Checked against episodes the surrogate itself generated: from known factors on the response
fields, the fit finds predictions as good as the truth's and the well-determined fields; from the
table's own predictions it stays at the table, over whole episodes and one round at a time.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.mec import live_fit, preset_params

PARAMS = preset_params("default")


def _episodes(truth, episodes=12, rounds=20, seed=0):
    """Episodes of random rounds across the environment's range (levels, fractions, repeats, the
    server), measured as ``truth`` predicts them: a live collection from a known response."""
    rng = np.random.default_rng(seed)
    n = episodes * rounds
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    start = f32(np.arange(n) % rounds == 0)
    data = live_fit.Transitions(
        ppl_prev=jnp.full(n, PARAMS.ppl0, jnp.float32),
        ppl=jnp.zeros(n, jnp.float32),
        k_bar=f32(rng.uniform(0.0, 4.0, n)),
        data_fraction=f32(rng.uniform(0.1, 1.0, n)),
        server_fraction=f32(rng.choice([0.0, 0.26], n)),
        repeat_share=f32(rng.uniform(0.0, 1.0, n)),
        start=start,
    )
    ppl = live_fit.rollout(truth, data)
    previous = jnp.where(start > 0, data.ppl_prev, jnp.roll(ppl, 1))
    return data._replace(ppl=ppl, ppl_prev=previous)


def test_the_fit_recovers_factors_the_data_determine():
    truth = PARAMS.replace(cal_ppl_inf=PARAMS.cal_ppl_inf * 0.97, srv_eta=PARAMS.srv_eta * 0.5, ppl_drift=6.0)
    data = _episodes(truth)
    fitted, report = live_fit.fit_response(PARAMS, data, steps=4000)
    for horizon in live_fit.HORIZONS:  # the data are exact: both horizons' errors fall to near 0
        assert report["before"][horizon]["rms_log_error"] > 0.01
        assert report["after"][horizon]["rms_log_error"] < report["before"][horizon]["rms_log_error"] / 10
    np.testing.assert_allclose(np.asarray(fitted.cal_ppl_inf), np.asarray(truth.cal_ppl_inf), rtol=0.01)
    assert float(fitted.srv_ppl_inf) == pytest.approx(float(truth.srv_ppl_inf), rel=0.02)
    # every other field of the environment is the table's: the reward is the live one
    assert float(fitted.ppl_best) == float(PARAMS.ppl_best) and float(fitted.ppl_ref) == float(PARAMS.ppl_ref)
    np.testing.assert_array_equal(np.asarray(fitted.cal_k), np.asarray(PARAMS.cal_k))
    assert report["transitions"] == 240 and set(report["fields"]) == set(live_fit.FIELDS)


def test_data_the_table_predicts_leave_the_table_in_place():
    params = PARAMS.replace(ppl_drift=2.0, ppl_drift_fresh=3.0, data_exponent=0.7)  # every field away from 0
    for horizon in live_fit.HORIZONS:
        fitted, report = live_fit.fit_response(params, _episodes(params, seed=1), horizon=horizon)
        for name in live_fit.FIELDS:
            np.testing.assert_allclose(np.asarray(getattr(fitted, name)), np.asarray(getattr(params, name)), rtol=2e-3)
        assert report["after"]["episode"]["rms_log_error"] < 1e-4 and report["horizon"] == horizon


def test_transitions_chain_the_perplexity_and_name_missing_entries():
    records = [
        {"perplexity": 400.0, "k_bar": 1.0, "data_fraction": 0.5, "server_fraction": 0.0, "repeat_share": 0.0},
        {"perplexity": 380.0, "k_bar": 2.0, "data_fraction": 0.6, "server_fraction": 0.26, "repeat_share": 1.0},
    ]
    data = live_fit.transitions(records, 444.0)
    np.testing.assert_allclose(np.asarray(data.ppl_prev), [444.0, 400.0])
    np.testing.assert_allclose(np.asarray(data.ppl), [400.0, 380.0])
    np.testing.assert_array_equal(np.asarray(data.start), [1.0, 0.0])
    # a rollout continues from its own prediction; one round at a time from the measured one
    params = PARAMS.replace(ppl_drift=0.0)
    first = float(live_fit.predict(params, data)[0])
    rolled = np.asarray(live_fit.rollout(params, data))
    assert rolled[0] == pytest.approx(first)
    second = live_fit.predict(params, data._replace(ppl_prev=jnp.asarray([444.0, first])))[1]
    assert rolled[1] == pytest.approx(float(second))
    with pytest.raises(ValueError, match="horizon"):
        live_fit.fit_response(PARAMS, data, horizon="week")
    both = live_fit.concat([data, data])
    assert both.k_bar.shape == (4,)
    with pytest.raises(ValueError, match="repeat_share"):
        live_fit.transitions([{k: v for k, v in records[0].items() if k != "repeat_share"}], 444.0)
    with pytest.raises(ValueError, match="at least one"):
        live_fit.fit_response(PARAMS, live_fit.transitions([], 444.0))
