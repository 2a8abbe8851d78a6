"""Closed-form checks of fedpeat_jax.fed.aggregate."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeat_jax.fed import aggregate as agg
from fedpeat_jax.fed import drift, server_opt

_jit = jax.jit


def _tree(rng, c, dtype=np.float32):
    return {
        "w": rng.normal(size=(c, 3, 4)).astype(dtype),
        "nested": {"b": rng.normal(size=(c, 5)).astype(dtype)},
    }


def _np_weighted_mean(tree, w):
    w = np.asarray(w, np.float64)
    p = w / w.sum()
    return jax.tree.map(lambda x: np.tensordot(p, np.asarray(x, np.float64), axes=1), tree)


def _assert_tree_close(a, b, rtol=1e-7, atol=0.0):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)  # also checks the two trees' structure


# --------------------------------------------------------------------------------------------------
# FedAvg, masks, NaN guard
# --------------------------------------------------------------------------------------------------


def test_fedavg_is_example_weighted_mean():
    rng = np.random.default_rng(0)
    t = _tree(rng, 4)
    n = np.array([1.0, 2.0, 3.0, 10.0], np.float32)
    res = jax.jit(agg.fedavg)(t, n)
    _assert_tree_close(res.mean, _np_weighted_mean(t, n), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.weights, n / n.sum(), rtol=1e-6)
    assert not bool(res.empty) and not np.any(res.dropped)


def test_mask_and_zero_examples_exclude_clients():
    rng = np.random.default_rng(1)
    t = _tree(rng, 5)
    n = np.array([4.0, 1.0, 0.0, 2.0, 3.0], np.float32)
    m = np.array([1.0, 0.0, 1.0, 1.0, 1.0], np.float32)
    res = jax.jit(agg.fedavg)(t, n, m)
    keep = np.array([0, 3, 4])
    expect = _np_weighted_mean(jax.tree.map(lambda x: x[keep], t), n[keep])
    _assert_tree_close(res.mean, expect, rtol=1e-5, atol=1e-6)
    assert res.weights[1] == 0 and res.weights[2] == 0
    # A masked-out client's (huge) values must not matter at all.
    t2 = jax.tree.map(lambda x: x.copy(), t)
    t2["w"][1] = 1e30
    _assert_tree_close(jax.jit(agg.fedavg)(t2, n, m).mean, res.mean, rtol=0, atol=0)


def test_nan_client_is_excluded_and_reported():
    rng = np.random.default_rng(2)
    t = _tree(rng, 4)
    t["w"][1, 0, 0] = np.nan
    t["nested"]["b"][3, 2] = np.inf
    n = np.array([1.0, 5.0, 2.0, 7.0], np.float32)
    res = jax.jit(agg.fedavg)(t, n)
    np.testing.assert_array_equal(res.dropped, [False, True, False, True])
    keep = np.array([0, 2])
    expect = _np_weighted_mean(jax.tree.map(lambda x: x[keep], t), n[keep])
    _assert_tree_close(res.mean, expect, rtol=1e-5, atol=1e-6)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(res.mean))
    # A NaN in a masked-out client is neither used nor reported as dropped.
    res2 = _jit(agg.fedavg)(t, n, np.array([1, 0, 1, 1], np.float32))
    np.testing.assert_array_equal(res2.dropped, [False, False, False, True])


def _fedavg_params(global_params, client_params, num_examples):
    """FedAvg on client parameters: the weighted mean, or the old global when no client counts."""
    res = agg.fedavg(client_params, num_examples)
    return agg.select_tree(res.empty, global_params, res.mean), res


def test_all_dropped_keeps_global_state():
    rng = np.random.default_rng(3)
    glob = jax.tree.map(lambda x: x[0], _tree(rng, 1))
    clients = _tree(rng, 3)
    clients["w"][:, 0, 0] = np.nan
    n = np.ones(3, np.float32)
    new, res = jax.jit(_fedavg_params)(glob, clients, n)
    assert bool(res.empty) and np.all(res.dropped)
    _assert_tree_close(new, glob, rtol=0, atol=0)
    # Same for a momentum server: neither params nor optimizer state may move.
    tx = server_opt.server_optimizer("fedavgm", 1.0, momentum=0.9)
    state = tx.init(glob)
    delta = jax.tree.map(jnp.ones_like, glob)
    glob1, state1 = jax.jit(server_opt.server_update, static_argnums=0)(tx, glob, state, delta)
    deltas = agg.client_deltas(clients, glob1)
    r = _jit(agg.fedavg)(deltas, n)
    glob2, state2 = jax.jit(server_opt.server_update, static_argnums=0)(tx, glob1, state1, r.mean, r.empty)
    _assert_tree_close(glob2, glob1, rtol=0, atol=0)
    _assert_tree_close(state2, state1, rtol=0, atol=0)
    # Fully masked round: empty too.
    assert bool(_jit(agg.fedavg)(_tree(rng, 3), n, np.zeros(3, np.float32)).empty)


def test_client_axis_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="client-axis"):
        _jit(agg.fedavg)({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, np.ones(3))


# --------------------------------------------------------------------------------------------------
# FedOpt
# --------------------------------------------------------------------------------------------------


def test_fedopt_sgd_lr1_equals_fedavg():
    rng = np.random.default_rng(4)
    glob = jax.tree.map(lambda x: x[0], _tree(rng, 1))
    tx = server_opt.server_optimizer("fedavg", 1.0)
    state = tx.init(glob)
    n = np.array([3.0, 1.0, 2.0], np.float32)
    for _ in range(3):
        clients = _tree(rng, 3)
        expect, _ = _jit(_fedavg_params)(glob, clients, n)
        r = _jit(agg.fedavg)(agg.client_deltas(clients, glob), n)
        glob, state = jax.jit(server_opt.server_update, static_argnums=0)(tx, glob, state, r.mean, r.empty)
        _assert_tree_close(glob, expect, rtol=1e-5, atol=1e-5)


def _one_leaf_round(name, steps, **kw):
    x = jnp.array([1.0, -2.0, 0.5])
    deltas = [jnp.array([0.3, -0.1, 0.0]), jnp.array([-0.2, 0.4, 1.0])]
    tx = server_opt.server_optimizer(name, 0.1, **kw)
    st = tx.init(x)
    step = jax.jit(server_opt.server_update, static_argnums=0)
    for d in deltas[:steps]:
        x, st = step(tx, x, st, d)
    return np.asarray(x), [np.asarray(d, np.float64) for d in deltas[:steps]]


def test_fedadam_matches_hand_computation():
    x, (d1, d2) = _one_leaf_round("fedadam", 2)
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    x0 = np.array([1.0, -2.0, 0.5])
    m = (1 - b1) * d1
    v = b2 * tau**2 + (1 - b2) * d1**2
    x1 = x0 + lr * m / (np.sqrt(v) + tau)
    m = b1 * m + (1 - b1) * d2
    v = b2 * v + (1 - b2) * d2**2
    x2 = x1 + lr * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(x, x2, rtol=1e-5, atol=1e-6)


def test_fedyogi_and_fedadagrad_match_hand_computation():
    lr, tau = 0.1, 1e-3
    x0 = np.array([1.0, -2.0, 0.5])
    x, (d1, d2) = _one_leaf_round("fedyogi", 2)
    b1, b2 = 0.9, 0.99
    m, v, xe = np.zeros(3), np.full(3, tau**2), x0
    for d in (d1, d2):
        m = b1 * m + (1 - b1) * d
        v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        xe = xe + lr * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(x, xe, rtol=1e-5, atol=1e-6)

    x, (d1, d2) = _one_leaf_round("fedadagrad", 2)
    v, xe = np.full(3, tau**2), x0
    for d in (d1, d2):
        v = v + d**2
        xe = xe + lr * d / (np.sqrt(v) + tau)
    np.testing.assert_allclose(x, xe, rtol=1e-5, atol=1e-6)


def test_fedavgm_matches_hand_computation():
    x, (d1, d2) = _one_leaf_round("fedavgm", 2, momentum=0.5)
    v1 = d1
    v2 = 0.5 * v1 + d2
    np.testing.assert_allclose(x, np.array([1.0, -2.0, 0.5]) + 0.1 * (v1 + v2), rtol=1e-6)


def test_server_optimizer_errors():
    with pytest.raises(ValueError, match="unknown server optimizer 'fedsgd'"):
        server_opt.server_optimizer("fedsgd", 1.0)
    with pytest.raises(ValueError, match="unexpected options"):
        server_opt.server_optimizer("fedadam", 1.0, momentum=0.9)
    assert isinstance(server_opt.server_optimizer("FedYogi", 0.01, tau=1e-2), optax.GradientTransformation)


def test_server_lr_can_be_traced_for_hparam_vmaps():
    x = jnp.zeros(2)
    d = jnp.ones(2)

    def run(lr):
        tx = server_opt.server_optimizer("fedavg", lr)
        return server_opt.server_update(tx, x, tx.init(x), d)[0]

    out = jax.vmap(run)(jnp.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(out, [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]])


# --------------------------------------------------------------------------------------------------
# FedProx
# --------------------------------------------------------------------------------------------------


def test_prox_penalty_value_and_gradient():
    w = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    g = {"a": jnp.array([0.0, 0.0]), "b": jnp.array([[1.0]])}
    assert float(drift.prox_penalty(w, g, 0.1)) == pytest.approx(0.05 * (1 + 4 + 4))
    grad = jax.grad(drift.prox_penalty)(w, g, 0.1)
    _assert_tree_close(grad, {"a": np.array([0.1, 0.2]), "b": np.array([[0.2]])}, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# SCAFFOLD
# --------------------------------------------------------------------------------------------------


def test_scaffold_client_control_and_correction_formulas():
    rng = np.random.default_rng(5)
    c_i, c, x, y = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4))
    out = jax.jit(drift.scaffold_client_control)({"p": c_i}, {"p": c}, {"p": x}, {"p": y}, 5, 0.1)
    np.testing.assert_allclose(out["p"], c_i - c + (x - y) / 0.5, rtol=1e-5, atol=1e-5)
    # Batched over clients with per-client step counts; K = 0 keeps c_i.
    cb, yb = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 4)).astype(np.float32)
    out = jax.jit(drift.scaffold_client_control)({"p": cb}, {"p": c}, {"p": x}, {"p": yb}, jnp.array([4, 0]), 0.5)
    np.testing.assert_allclose(out["p"][0], cb[0] - c + (x - yb[0]) / 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["p"][1], cb[1])
    g = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        drift.scaffold_correct_grads({"p": g}, {"p": c_i}, {"p": c})["p"], g - c_i + c, rtol=1e-6
    )


def test_scaffold_server_update():
    rng = np.random.default_rng(6)
    n_total = 5
    x = {"p": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    state = drift.scaffold_init(x, n_total)
    state = state._replace(c_clients={"p": jnp.asarray(rng.normal(size=(n_total, 3)), jnp.float32)})
    ids = jnp.array([4, 1, 2])
    y = {"p": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}
    c_new = {"p": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}
    mask = jnp.array([1.0, 1.0, 0.0])
    new_x, new_state, res = jax.jit(drift.scaffold_server_update)(state, x, y, c_new, ids, mask, None, 0.5)
    used = [0, 1]
    dy = np.asarray(y["p"])[used] - np.asarray(x["p"])
    np.testing.assert_allclose(new_x["p"], x["p"] + 0.5 * dy.mean(0), rtol=1e-5, atol=1e-6)
    dc = np.asarray(c_new["p"])[used] - np.asarray(state.c_clients["p"])[[4, 1]]
    np.testing.assert_allclose(new_state.c["p"], dc.sum(0) / n_total, rtol=1e-5, atol=1e-6)
    expect_clients = np.asarray(state.c_clients["p"]).copy()
    expect_clients[[4, 1]] = np.asarray(c_new["p"])[used]
    np.testing.assert_allclose(new_state.c_clients["p"], expect_clients, rtol=0, atol=0)
    # A NaN client keeps its control variate and does not move x or c.
    c_bad = {"p": c_new["p"].at[0, 0].set(jnp.nan)}
    new_x2, new_state2, res2 = jax.jit(drift.scaffold_server_update)(state, x, y, c_bad, ids, mask)
    assert bool(res2.dropped[0])
    np.testing.assert_allclose(new_x2["p"], x["p"] + dy[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_state2.c_clients["p"][4], state.c_clients["p"][4])


def test_scaffold_removes_client_drift_on_quadratics():
    """f_i(w) = a_i/2 (w - b_i)^2; global optimum sum a_i b_i / sum a_i. FedAvg with many local
    steps drifts to a biased fixed point; SCAFFOLD (option II) converges to the optimum."""
    a = jnp.array([1.0, 4.0, 0.5, 2.0])
    b = jnp.array([3.0, -1.0, 2.0, 0.5])
    w_star = float(jnp.sum(a * b) / jnp.sum(a))
    K, lr, rounds = 10, 0.05, 300
    ids = jnp.arange(4)
    ones = jnp.ones(4)

    def local(x, ci, c):
        def step(y, _):
            g = a * (y - b)
            return y - lr * drift.scaffold_correct_grads(g, ci, c), None

        y, _ = jax.lax.scan(step, jnp.broadcast_to(x, (4,)), None, length=K)
        return y

    def fedavg_round(x, _):
        y = local(x, jnp.zeros(4), 0.0)
        return _fedavg_params(x, y, ones)[0], None

    def scaffold_round(carry, _):
        x, st = carry
        ci = drift.scaffold_cohort_controls(st, ids)
        y = local(x, ci, st.c)
        c_new = drift.scaffold_client_control(ci, st.c, x, y, K, lr)
        x, st, _ = drift.scaffold_server_update(st, x, y, c_new, ids)
        return (x, st), None

    x_avg, _ = jax.lax.scan(fedavg_round, jnp.float32(0.0), None, length=rounds)
    init = (jnp.float32(0.0), drift.scaffold_init(jnp.float32(0.0), 4))
    (x_sc, _), _ = jax.lax.scan(scaffold_round, init, None, length=rounds)
    assert abs(float(x_sc) - w_star) < 1e-4
    assert abs(float(x_avg) - w_star) > 1e-2


# --------------------------------------------------------------------------------------------------
# LoRA aggregation
# --------------------------------------------------------------------------------------------------


def _lora(rng, c, L=2, d=6, r=2, o=5, shared_a=False):
    def target(d_in, d_out):
        a = rng.normal(size=(c, L, d_in, r)).astype(np.float32)
        if shared_a:
            a = np.broadcast_to(a[:1], a.shape).copy()
        return {"a": a, "b": rng.normal(size=(c, L, r, d_out)).astype(np.float32)}

    return {
        "attn": {"c_attn": target(d, 3 * d), "c_proj": target(d, d)},
        "mlp": {"c_fc": target(d, o), "c_proj": target(o, d)},
    }


def _targets(tree):
    return [tree["attn"]["c_attn"], tree["attn"]["c_proj"], tree["mlp"]["c_fc"], tree["mlp"]["c_proj"]]


def test_exact_lora_aggregation_reproduces_weighted_mean_product():
    rng = np.random.default_rng(7)
    lora = _lora(rng, 4)
    _targets(lora)[1]["b"][2, 0, 0, 0] = np.nan  # client 2 is dropped
    n = np.array([3.0, 1.0, 5.0, 2.0], np.float32)
    m = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    p = n * m * np.array([1, 1, 0, 1])
    p = p / p.sum()
    stacked = jax.jit(agg.lora_stack)(lora, n, m)
    dense = jax.jit(agg.lora_product_mean)(lora, n, m, 2.0)
    np.testing.assert_array_equal(stacked.dropped, [False, False, True, False])
    for t, s, dd in zip(_targets(lora), _targets(stacked.mean), _targets(dense.mean)):
        expect = np.einsum("k,kldr,klro->ldo", p, np.nan_to_num(t["a"]), np.nan_to_num(t["b"]))
        assert s["a"].shape[-1] == 4 * t["a"].shape[-1] and s["b"].shape[-2] == 4 * t["b"].shape[-2]
        np.testing.assert_allclose(s["a"] @ s["b"], expect, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dd, 2.0 * expect, rtol=1e-4, atol=1e-5)


def test_fedavg_of_factors_is_exact_when_a_is_shared():
    # FFA-LoRA (Sun et al. 2024): with a frozen, shared `a`, the plain mean of the factors is the
    # mean of the products, a @ sum_k p_k b_k == sum_k p_k a @ b_k; the round relies on this.
    rng = np.random.default_rng(8)
    lora = _lora(rng, 3, shared_a=True)
    n = np.array([1.0, 2.0, 4.0], np.float32)
    mean = _jit(agg.fedavg)(lora, n).mean
    exact = _jit(agg.lora_product_mean)(lora, n)
    for g, t, e in zip(_targets(mean), _targets(lora), _targets(exact.mean)):
        np.testing.assert_allclose(g["a"], t["a"][0], rtol=1e-6)
        np.testing.assert_allclose(g["a"] @ g["b"], e, rtol=1e-4, atol=1e-5)
    gap = _jit(agg.lora_gap)(lora, n)
    assert float(gap.total_rel) < 1e-5


def test_lora_gap_zero_when_clients_agree_and_positive_otherwise():
    rng = np.random.default_rng(9)
    one = _lora(rng, 1)
    same = jax.tree.map(lambda x: np.repeat(x, 3, axis=0), one)
    n = np.array([1.0, 2.0, 3.0], np.float32)
    gap = jax.jit(agg.lora_gap)(same, n)
    assert float(gap.total_abs) < 1e-4 * float(jnp.linalg.norm(_targets(_jit(agg.lora_product_mean)(same, n).mean)[0]))
    assert float(gap.total_rel) < 1e-5
    diff = _lora(rng, 3)
    gap = jax.jit(agg.lora_gap)(diff, n)
    assert float(gap.total_rel) > 0.05
    # Per-target values against numpy.
    p = n / n.sum()
    sq_abs, sq_norm = 0.0, 0.0
    for t, g_abs, g_rel in zip(_targets(diff), _targets(gap.abs), _targets(gap.rel)):
        a_bar = np.einsum("k,k...->...", p, t["a"])
        b_bar = np.einsum("k,k...->...", p, t["b"])
        prod = np.einsum("k,kldr,klro->ldo", p, t["a"], t["b"])
        e_abs = np.linalg.norm(a_bar @ b_bar - prod)
        np.testing.assert_allclose(g_abs, e_abs, rtol=1e-4)
        np.testing.assert_allclose(g_rel, e_abs / np.linalg.norm(prod), rtol=1e-4)
        sq_abs += e_abs**2
        sq_norm += np.linalg.norm(prod) ** 2
    np.testing.assert_allclose(gap.total_rel, np.sqrt(sq_abs / sq_norm), rtol=1e-4)


def test_fedavg_of_a_lora_tree_is_the_mean_of_each_factor():
    rng = np.random.default_rng(10)
    lora = _lora(rng, 3)
    n = np.array([1.0, 1.0, 2.0], np.float32)
    _assert_tree_close(_jit(agg.fedavg)(lora, n).mean, _np_weighted_mean(lora, n), rtol=1e-5, atol=1e-6)


def test_lora_tree_with_foreign_leaf_is_a_clear_error():
    with pytest.raises(ValueError, match="/attn/scale"):
        agg.lora_stack({"attn": {"scale": np.ones((2, 1))}}, np.ones(2))


# --------------------------------------------------------------------------------------------------
# Robust aggregation
# --------------------------------------------------------------------------------------------------


def test_coordinate_median_matches_numpy():
    rng = np.random.default_rng(11)
    t = _tree(rng, 6)
    t["w"][5] = np.nan
    m = np.array([1, 1, 0, 1, 1, 1], np.float32)
    res = jax.jit(agg.coordinate_median)(t, m)
    keep = [0, 1, 3, 4]  # even count: mean of the middle two
    _assert_tree_close(res.mean, jax.tree.map(lambda x: np.median(x[keep], 0), t), rtol=1e-6)
    np.testing.assert_array_equal(res.dropped, [0, 0, 0, 0, 0, 1])
    res = _jit(agg.coordinate_median)(t, np.array([1, 1, 1, 0, 1, 0], np.float32))
    _assert_tree_close(res.mean, jax.tree.map(lambda x: np.median(x[[0, 1, 2, 4]], 0), t), rtol=1e-6)


def _np_trimmed(x, beta):
    k = x.shape[0]
    t = int(np.floor(beta * k))
    s = np.sort(x, axis=0)
    return s[t : k - t].mean(0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.4])
def test_trimmed_mean_matches_numpy(beta):
    rng = np.random.default_rng(12)
    t = _tree(rng, 9)
    m = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0], np.float32)
    keep = np.flatnonzero(m)
    res = jax.jit(agg.trimmed_mean)(t, beta, m)
    _assert_tree_close(res.mean, jax.tree.map(lambda x: _np_trimmed(x[keep], beta), t), rtol=1e-5, atol=1e-6)


def test_trimmed_mean_resists_outlier_and_validates_beta():
    x = {"p": np.array([[1.0], [2.0], [3.0], [1e6]], np.float32)}
    assert float(agg.trimmed_mean(x, 0.25).mean["p"][0]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="beta"):
        agg.trimmed_mean(x, 0.5)


def test_norm_bounded_mean():
    d = {"u": np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 10.0]], np.float32)}  # norms 5, 0.5, 10
    n = np.array([1.0, 1.0, 2.0], np.float32)
    res = jax.jit(agg.norm_bounded_mean)(d, 1.0, n)
    clipped = np.array([[0.6, 0.8], [0.3, 0.4], [0.0, 1.0]])
    np.testing.assert_allclose(res.mean["u"], (clipped * (n / n.sum())[:, None]).sum(0), rtol=1e-6)
    _, norms = agg.clip_by_client_norm(d, 1.0)
    np.testing.assert_allclose(norms, [5.0, 0.5, 10.0], rtol=1e-6)
    res = agg.norm_bounded_mean(d, 1.0, n, np.array([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(res.mean["u"], [0.3, 0.4], rtol=1e-6)
