"""Physics of the MEC system model (fedpeat_jax.mec.system): values, monotonicity, sizes."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.mec import system

NOISE = system.dbm_to_watt(-174.0)  # W/Hz
B = 20e6


def test_path_loss_and_gain_values():
    assert system.path_loss_db(1000.0, 128.1, 37.6) == pytest.approx(128.1)
    assert system.path_loss_db(100.0, 128.1, 37.6) == pytest.approx(128.1 - 37.6)
    d = np.array([10.0, 123.0, 500.0])
    expected = 10.0 ** (-system.path_loss_db(d, 128.1, 37.6) / 10.0)
    np.testing.assert_allclose(system.path_gain(d, 128.1, 37.6), expected, rtol=1e-12)
    np.testing.assert_allclose(
        system.to_db(system.channel_gain(2.0, d, 128.1, 37.6)),
        10 * np.log10(2.0) - system.path_loss_db(d, 128.1, 37.6),
        rtol=1e-12,
    )
    assert system.dbm_to_watt(40.0) == pytest.approx(10.0)


def test_rayleigh_power_is_exp1_and_floored():
    u = (np.arange(200_000) + 0.5) / 200_000  # quantiles of U[0, 1)
    h2 = system.rayleigh_power(u, 1e-6)
    assert h2.mean() == pytest.approx(1.0, rel=2e-3)
    assert np.median(h2) == pytest.approx(math.log(2.0), rel=1e-3)
    assert system.rayleigh_power(np.array(0.0), 1e-6) == 1e-6


def test_rates_fall_with_distance_and_rise_with_share():
    d = np.array([20.0, 100.0, 250.0, 500.0])
    g = system.channel_gain(1.0, d, 128.1, 37.6)
    for rate, power in ((system.uplink_rate, 0.2), (system.downlink_rate, 10.0)):
        r = rate(np.full(4, 0.25), g, B, power, NOISE)
        assert np.all(np.diff(r) < 0), f"{rate.__name__} must fall with distance"
        shares = np.array([0.05, 0.1, 0.3, 1.0])
        r = rate(shares, np.full(4, g[2]), B, power, NOISE)
        assert np.all(np.diff(r) > 0), f"{rate.__name__} must rise with the bandwidth share"
        assert rate(np.array([0.0]), g[:1], B, power, NOISE)[0] == 0.0
    # Shannon check of one value: uplink SNR p G / (N0 beta B)
    beta, gain = 0.5, float(g[1])
    snr = 0.2 * gain / (NOISE * beta * B)
    assert system.uplink_rate(np.array(beta), np.array(gain), B, 0.2, NOISE) == pytest.approx(
        beta * B * math.log2(1 + snr)
    )


def test_bandwidth_shares_normalize_over_participants():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.integers(1, 5, size=(10, 7)).astype(float)
        x = (rng.random((10, 7)) < 0.4).astype(float)
        beta = system.bandwidth_shares(w, x)
        total = beta.sum(axis=0)
        assert np.all(beta >= 0) and np.all(total <= 1 + 1e-12)
        np.testing.assert_allclose(total, np.where(x.sum(axis=0) > 0, 1.0, 0.0), atol=1e-12)
        assert np.all(beta[x == 0] == 0)
    # the JAX path gives the same shares
    np.testing.assert_allclose(system.bandwidth_shares(jnp.asarray(w), jnp.asarray(x), jnp), beta, rtol=1e-6)


def test_payload_sizes_from_the_model_config():
    xl = GPT2Config.preset("gpt2-xl")
    counts = system.model_counts(xl, PeftConfig(kind="lora", lora_rank=4), l=2, r=2)
    assert counts["p_blk"] == 30_740_800 and counts["p_emb"] == 82_049_600  # offsite-tuning sizes
    assert counts["k_full"] == 44 and counts["n_adapter"] == 4
    assert counts["p_peft"] == 4 * 16 * 4 * 1600  # LoRA on the four targets: 16 r d per adapter block
    bits = system.emulator_bits(16, counts["p_emb"], counts["p_blk"], counts["n_adapter"], 16)
    assert bits == 16 * (82_049_600 + 20 * 30_740_800)  # the published 2-16-2 GPT2-XL emulator
    small = system.model_counts(GPT2Config.preset("gpt2"), PeftConfig(kind="adapter", adapter_size=64))
    assert small["p_blk"] == 7_087_872
    assert small["p_peft"] == 4 * 2 * (768 * 64 + 64 + 64 * 768 + 768)
    with pytest.raises(ValueError, match="outside the adapter"):
        system.model_counts(GPT2Config.preset("gpt2"), PeftConfig(layers=(5,)))


def test_larger_emulator_costs_more_bytes_time_and_memory():
    c = system.model_counts(GPT2Config.preset("gpt2"))
    k = np.arange(0, c["k_full"] + 1)
    bits = system.emulator_bits(k, c["p_emb"], c["p_blk"], c["n_adapter"], 16)
    p_dev = system.device_param_count(k, c["p_emb"], c["p_blk"], c["n_adapter"])
    t = system.compute_time(10 * 16 * 512, system.flops_per_token(p_dev, c["p_peft"]), 5e12, 0.3)
    mem = system.device_memory_bytes(k, c["p_emb"], c["p_blk"], c["n_adapter"], c["p_peft"], 16, 16, 512, 768, 12)
    for name, v in (("bits", bits), ("compute time", t), ("memory", mem)):
        assert np.all(np.diff(v) > 0), f"{name} must grow with the emulator size"


def test_memory_formula_by_hand():
    # k = 2, GPT-2 small, batch 4, seq 128: weights + 16 B/trainable + activations over 6 blocks
    c = system.model_counts(GPT2Config.preset("gpt2"))
    p_dev = c["p_emb"] + 6 * c["p_blk"]
    act = 4 * 128 * 768 * (34 + 5 * 12 * 128 / 768) * 6
    expected = 2 * p_dev + 16 * c["p_peft"] + act
    got = system.device_memory_bytes(2, c["p_emb"], c["p_blk"], c["n_adapter"], c["p_peft"], 16, 4, 128, 768, 12)
    assert got == pytest.approx(expected)


def test_latency_counts_emulator_only_on_exchange():
    s_emu, s_peft = np.array([8e9, 8e9]), 1e6
    r_dl, r_ul, t_cmp = np.array([5e7, 5e7]), np.array([1e7, 1e7]), np.array([3.0, 3.0])
    x = np.array([1.0, 1.0])
    stored, chosen = np.array([2, 1]), np.array([2, 2])
    xchg = system.exchange_indicator(stored, chosen, x)
    assert xchg.tolist() == [0, 1]
    t = system.device_latency(xchg, s_emu, s_peft, r_dl, t_cmp, r_ul, x)
    assert t[0] == pytest.approx(s_peft / 5e7 + 3.0 + s_peft / 1e7)
    assert t[1] - t[0] == pytest.approx(8e9 / 5e7)
    # non-participants cost nothing and do not exchange
    assert system.exchange_indicator(np.array([-1]), np.array([0]), np.array([0.0])).tolist() == [0]
    t = system.device_latency(
        np.array([0.0]), s_emu[:1], s_peft, np.array([0.0]), t_cmp[:1], np.array([0.0]), np.array([0.0])
    )
    assert t.tolist() == [0.0]
    assert system.round_latency(np.array([[1.0], [4.0]]), np.array([2.0])).tolist() == [4.0]


def test_interp_clamped_matches_numpy_interp():
    rng = np.random.default_rng(1)
    xs = np.array([1.0, 2.0, 4.0, 8.0])
    ys = np.array([90.0, 70.0, 65.0, 50.0])
    x = rng.uniform(-2, 12, size=500)
    np.testing.assert_allclose(system.interp_clamped(x, xs, ys), np.interp(x, xs, ys), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(system.interp_clamped(jnp.asarray(x), jnp.asarray(xs), jnp.asarray(ys), jnp)),
        np.interp(x, xs, ys),
        rtol=1e-5,
    )
    assert system.interp_clamped(3.0, np.array([2.0]), np.array([7.0])) == 7.0


def test_surrogate_perplexity_response():
    assert system.surrogate_perplexity(100.0, 40.0, 2.0, 0.0) == 100.0  # no data: no change
    assert system.surrogate_perplexity(100.0, 40.0, 2.0, 1.0) == pytest.approx(40 + 60 * math.exp(-2.0))
    ppl = 100.0
    for _ in range(200):
        ppl = system.surrogate_perplexity(ppl, 40.0, 2.0, 0.5)
    assert ppl == pytest.approx(40.0)
