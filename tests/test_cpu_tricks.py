"""The CPU tricks against their plain paths: the same distributions, the same results.

``FEDPEAT_CPU_TRICKS`` is read when a function is traced, so each path gets its own freshly built
environment (a new object: a new trace).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedpeat_jax import cpu_tricks
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import FedPEATMEC, synthetic_table
from fedpeat_jax.rl import distributions as D


@pytest.fixture(params=["1", "0"], ids=["tricks", "plain"])
def mode(request, monkeypatch):
    monkeypatch.setenv(cpu_tricks.ENV_VAR, request.param)
    return request.param


def test_switch_reads_the_environment_variable(monkeypatch):
    for value, on in (("1", True), ("0", False), ("auto", jax.default_backend() == "cpu")):
        monkeypatch.setenv(cpu_tricks.ENV_VAR, value)
        assert cpu_tricks.enabled() is on
    monkeypatch.setenv(cpu_tricks.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=cpu_tricks.ENV_VAR):
        cpu_tricks.enabled()


def test_uniforms_are_uniform_on_both_paths(mode):
    u = np.asarray(cpu_tricks.uniforms(jax.random.key(7), (50_000,)))
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # a batch of keys: batch axes trail, each key's numbers are its own
    keys = jax.random.split(jax.random.key(1), 3)
    ub = np.asarray(cpu_tricks.uniforms(keys, (4, 5)))
    assert ub.shape == (4, 5, 3)
    np.testing.assert_array_equal(ub[..., 1], np.asarray(cpu_tricks.uniforms(keys[1], (4, 5))))


def test_hash_bits_rolled_and_unrolled_agree():
    key = jax.random.key(7)
    np.testing.assert_array_equal(cpu_tricks.hash_bits(key, (4, 9)), cpu_tricks.hash_bits(key, (4, 9), rolled=False))
    assert not np.array_equal(cpu_tricks.hash_bits(key, (8,)), cpu_tricks.hash_bits(jax.random.key(8), (8,)))


@pytest.mark.parametrize("n", [1, 7, 1600, 70_000])  # 70,000 > 2**16: the argsort fallback
def test_permutation_is_a_permutation_on_both_paths(n, mode):
    perm = np.asarray(jax.jit(cpu_tricks.permutation, static_argnums=1)(jax.random.key(3), n))
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    if n > 7:
        assert not np.array_equal(perm, np.asarray(cpu_tricks.permutation(jax.random.key(4), n)))


def test_materialize_is_the_identity(mode):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 50, (6, 31)), jnp.int32)
    np.testing.assert_array_equal(jax.jit(cpu_tricks.materialize)(x), x)


def test_env_batching_gives_the_same_steps_on_both_paths(monkeypatch):
    """vmap(env.step) through the custom rule (tricks) equals plain vmap, given the same draws."""
    table = synthetic_table(GPT2Config.preset("default"))
    out = {}
    for value in ("1", "0"):
        monkeypatch.setenv(cpu_tricks.ENV_VAR, value)
        env = FedPEATMEC(preset="default", calibration=table)
        p = env.default_params
        u = jnp.asarray(np.random.default_rng(0).random((6, 5, env.n_devices), dtype=np.float32))  # (E, 5, N)
        _, s = jax.vmap(env.reset_with_draws, in_axes=(0, None))(u, p)
        a = jnp.asarray(np.random.default_rng(1).integers(0, env.nvec, (6, len(env.nvec))), jnp.int32)
        rule = cpu_tricks.batch_trailing(
            lambda u, s, a, p: env.step_with_draws(u, s, a, p), per_env=(True, True, True, False)
        )
        out[value] = jax.jit(jax.vmap(rule, in_axes=(0, 0, 0, None)))(u, s, a, p)
    for x, y in zip(jax.tree.leaves(out["1"]), jax.tree.leaves(out["0"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-6)


def test_env_draws_have_the_same_distribution_on_both_paths(monkeypatch):
    table = synthetic_table(GPT2Config.preset("default"))
    first = {}
    for value in ("1", "0"):
        monkeypatch.setenv(cpu_tricks.ENV_VAR, value)
        env = FedPEATMEC(preset="default", calibration=table)
        obs, s = env.reset_batch(jax.random.key(0), 4000, env.default_params)
        first[value] = np.asarray(s.distance).ravel()
    assert stats.ks_2samp(first["1"], first["0"]).pvalue > 1e-3


def test_branch_sampling_follows_the_probabilities_on_both_paths(mode):
    nvec = (2, 3, 4)
    logits = jnp.log(jnp.asarray([0.3, 0.7, 0.2, 0.5, 0.3, 0.1, 0.1, 0.2, 0.6]))
    keys = jax.random.split(jax.random.key(0), 20_000)
    acts = np.asarray(jax.jit(jax.vmap(lambda k: D.sample_branches(k, logits, nvec)))(keys))
    probs = np.exp(np.asarray(logits))
    start = 0
    for b, n in enumerate(nvec):
        freq = np.bincount(acts[:, b], minlength=n) / len(acts)
        np.testing.assert_allclose(freq, probs[start : start + n], atol=0.015)
        start += n
