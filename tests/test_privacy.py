"""Tests of fedpeat_jax.fed.privacy: DP-FedAvg, accounting, secure aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.fed import aggregate as agg
from fedpeat_jax.fed import privacy as dp

_encode = jax.jit(dp.secagg_encode, static_argnums=(1, 2))


def _tree(rng, c, scale=1.0):
    return {
        "w": (scale * rng.normal(size=(c, 3, 4))).astype(np.float32),
        "b": {"x": (scale * rng.normal(size=(c, 7))).astype(np.float32)},
    }


# --------------------------------------------------------------------------------------------------
# Clipping and DP-FedAvg
# --------------------------------------------------------------------------------------------------


def test_clipping_bounds_global_norms():
    rng = np.random.default_rng(0)
    t = _tree(rng, 6, scale=1.0)
    t["w"][2] *= 1e-3
    t["b"]["x"][2] *= 1e-3  # one small client: left untouched
    clipped, norms = jax.jit(agg.clip_by_client_norm)(t, 1.5)
    after = np.asarray(jax.jit(agg.client_norms)(clipped))
    assert np.all(after <= 1.5 * (1 + 1e-5))
    big = np.asarray(norms) > 1.5
    np.testing.assert_allclose(after[big], 1.5, rtol=1e-5)
    np.testing.assert_allclose(clipped["w"][2], t["w"][2], rtol=1e-6)
    # Norm is global over the pytree, not per leaf.
    expect = np.sqrt((t["w"] ** 2).reshape(6, -1).sum(1) + (t["b"]["x"] ** 2).sum(1))
    np.testing.assert_allclose(norms, expect, rtol=1e-5)


def test_dp_fedavg_without_noise_is_clipped_mean():
    rng = np.random.default_rng(1)
    t = _tree(rng, 5)
    t["w"][4, 0, 0] = np.nan
    mask = np.array([1, 1, 0, 1, 1], np.float32)
    f = jax.jit(dp.dp_fedavg)
    res = f(jax.random.key(0), t, 0.5, 0.0, mask)
    clipped, _ = jax.jit(agg.clip_by_client_norm)(t, 0.5)
    used = [0, 1, 3]
    expect = jax.tree.map(lambda x: np.asarray(x)[used].sum(0) / 3, clipped)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.mean, expect)
    np.testing.assert_array_equal(res.dropped, [0, 0, 0, 0, 1])
    assert float(res.num_used) == 3 and float(res.denominator) == 3
    # Fixed (expected) denominator.
    res = f(jax.random.key(0), t, 0.5, 0.0, mask, None, 10.0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, np.asarray(b) * 3 / 10, rtol=1e-5, atol=1e-6), res.mean, expect
    )


def test_dp_noise_has_configured_std():
    c, clip, sigma = 4, 0.7, 1.3
    t = {"w": np.zeros((c, 200, 250), np.float32), "v": np.zeros((c, 10_000), np.float32)}
    res = jax.jit(dp.dp_fedavg)(jax.random.key(42), t, clip, sigma, None, None, 8.0)
    noise = np.concatenate([np.ravel(res.noised_sum["w"]), np.ravel(res.noised_sum["v"])])
    std = sigma * clip
    # 60k samples: the sample std is within ~0.6% (1 sigma) of the truth; allow 3%.
    assert abs(noise.std() / std - 1) < 0.03
    assert abs(noise.mean()) < 0.03 * std
    np.testing.assert_allclose(np.ravel(res.mean["v"]), np.ravel(res.noised_sum["v"]) / 8.0, rtol=1e-6)
    # Leaves get independent noise, and a different key gives different noise.
    assert abs(np.corrcoef(np.ravel(res.noised_sum["w"])[:10_000], np.ravel(res.noised_sum["v"]))[0, 1]) < 0.05
    res2 = jax.jit(dp.dp_fedavg)(jax.random.key(43), t, clip, sigma, None, None, 8.0)
    assert not np.allclose(res.noised_sum["v"], res2.noised_sum["v"])


def test_dp_weights_are_capped_so_sensitivity_stays_clip():
    t = {"u": np.array([[10.0, 0.0], [0.0, 10.0]], np.float32)}
    res = jax.jit(dp.dp_fedavg)(jax.random.key(0), t, 1.0, 0.0, weights=np.array([5.0, 0.5], np.float32))
    np.testing.assert_allclose(res.noised_sum["u"], [1.0, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(res.clipped, [True, True])


# --------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_accountant_epsilon_is_finite_and_monotone(accountant):
    eps = [dp.dp_epsilon(s, 0.05, 100, 1e-6, accountant) for s in (0.8, 1.2, 2.0)]
    assert all(np.isfinite(e) and e > 0 for e in eps)
    assert eps[0] > eps[1] > eps[2]
    assert dp.dp_epsilon(1.2, 0.05, 200, 1e-6, accountant) > eps[1]
    assert dp.dp_epsilon(1.2, 0.05, 0, 1e-6, accountant) == 0.0


def test_accountants_agree_with_closed_form_gaussian():
    # One full-participation round is the plain Gaussian mechanism: PLD is (nearly) exact and
    # RDP is an upper bound on it.
    import dp_accounting

    exact = dp_accounting.get_epsilon_gaussian(2.0, 1e-5)
    pld = dp.dp_epsilon(2.0, 1.0, 1, 1e-5, "pld")
    rdp = dp.dp_epsilon(2.0, 1.0, 1, 1e-5, "rdp")
    assert pld == pytest.approx(exact, rel=0.02)
    assert rdp >= pld * 0.999


def test_running_accountant_and_calibration():
    acc = dp.DPAccountant(1e-6, "rdp")
    assert acc.epsilon() == 0.0
    acc.step(1.1, 0.02, 30)
    acc.step(1.1, 0.02, 20)
    assert acc.rounds == 50
    assert acc.epsilon() == pytest.approx(dp.dp_epsilon(1.1, 0.02, 50, 1e-6), rel=1e-9)
    sigma = dp.dp_noise_for_epsilon(2.0, 0.02, 50, 1e-6)
    assert dp.dp_epsilon(sigma, 0.02, 50, 1e-6) <= 2.0 + 1e-6
    assert dp.dp_epsilon(sigma * 0.95, 0.02, 50, 1e-6) > 2.0


def test_accounting_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.dp_epsilon(0.0, 0.1, 10, 1e-5)
    with pytest.raises(ValueError, match="sampling_rate"):
        dp.dp_epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="unknown accountant"):
        dp.dp_epsilon(1.0, 0.1, 10, 1e-5, "moments")


# --------------------------------------------------------------------------------------------------
# Secure aggregation
# --------------------------------------------------------------------------------------------------


def test_secagg_masks_hide_updates_but_sum_is_exact():
    rng = np.random.default_rng(3)
    c, fb = 6, 16
    t = _tree(rng, c)
    masked = jax.jit(dp.secagg_mask, static_argnums=3)(jax.random.key(7), t, None, fb)
    enc = jax.tree.map(lambda x: np.asarray(_encode(x, fb, c)[0]), t)
    # Each upload differs from the client's own encoding almost everywhere, and looks uniform.
    for y, e in zip(jax.tree.leaves(masked.masked), jax.tree.leaves(enc)):
        assert y.dtype == jnp.uint32
        assert np.mean(np.asarray(y) != e) > 0.99
    big = np.concatenate([np.ravel(y) for y in jax.tree.leaves(masked.masked)]) / 2.0**32
    assert abs(big.mean() - 0.5) < 0.05
    # Masks cancel exactly in modular arithmetic: the sum equals the sum of the encodings bit for bit.
    for y, e in zip(jax.tree.leaves(masked.masked), jax.tree.leaves(enc)):
        np.testing.assert_array_equal(
            np.sum(np.asarray(y, np.uint64), axis=0) % 2**32, np.sum(e.astype(np.uint64), axis=0) % 2**32
        )
    total = jax.jit(dp.secagg_unmask_sum, static_argnums=1)(masked, fb)
    jax.tree.map(
        lambda s, x: np.testing.assert_allclose(s, np.sum(x, 0), rtol=0, atol=c * 2.0 ** -(fb + 1) + 1e-6),
        total,
        t,
    )


def test_secagg_handles_dropouts_and_nan():
    rng = np.random.default_rng(4)
    c = 5
    t = _tree(rng, c)
    t["w"][3, 1, 1] = np.nan
    mask = np.array([1, 0, 1, 1, 1], np.float32)
    total, masked = jax.jit(dp.secure_sum)(jax.random.key(1), t, mask)
    np.testing.assert_array_equal(masked.used, [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(masked.dropped, [0, 0, 0, 1, 0])
    keep = [0, 2, 4]
    jax.tree.map(lambda s, x: np.testing.assert_allclose(s, x[keep].sum(0), atol=1e-4), total, t)
    # The surviving clients' uploads are still masked.
    e0 = np.asarray(_encode(t["b"]["x"][0], dp.DEFAULT_FRAC_BITS, c)[0])
    assert np.mean(np.asarray(masked.masked["b"]["x"][0]) != e0) > 0.99


def test_secagg_single_participant_and_saturation():
    t = {"u": np.array([[1.0, -2.0], [5.0, 7.0], [1e9, 0.0]], np.float32)}
    f = jax.jit(dp.secure_sum)
    total, masked = f(jax.random.key(0), t, np.array([1, 0, 0], np.float32))
    np.testing.assert_allclose(total["u"], [1.0, -2.0])  # nobody to pair with: the sum is its own value
    total, masked = f(jax.random.key(0), t, np.ones(3, np.float32))
    np.testing.assert_array_equal(masked.saturated, [False, False, True])
    assert np.all(np.isfinite(np.asarray(total["u"])))
