"""FedPEAT rounds against closed-form and one-at-a-time references."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import aggregate, driver
from fedpeat_jax.fed.client import Hyper, local_train
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.io.logging import read_metrics
from fedpeat_jax.model import gpt2

# Five blocks: a 2-1-2 emulator keeps the one middle block; small enough to compile fast.
MODEL = GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=5, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
LORA = PeftConfig(kind="lora", lora_rank=2, lora_alpha=4.0)
C, N, T = 6, 4, 8


@pytest.fixture(scope="module")
def params():
    return gpt2.init(jax.random.key(0), MODEL)


@pytest.fixture(scope="module")
def data():
    rs = np.random.RandomState(0)
    return FedData.from_arrays(rs.randint(0, 61, (C, N, T)), np.ones((C, N, T)), rs.randint(1, N + 1, C))


def fed(**kw):
    base = dict(clients_per_round=3, local_steps=2, local_batch=2, emulator_levels=(1,), rounds=2, rounds_per_chunk=1, log_lora_gap=False)
    return FedConfig(**{**base, **kw})


def tree_close(a, b, atol):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y, atol=atol)), a, b)))


def test_one_sgd_step_fedavg_equals_centralized_step(params):
    """One local SGD step, full participation, equal weights: FedAvg = one step on the union."""
    b = 2
    rs = np.random.RandomState(1)
    tokens = rs.randint(0, 61, (C, b, T))
    data = FedData.from_arrays(tokens, np.ones((C, b, T)), np.full(C, b))
    cfg = fed(clients_per_round=C, local_steps=1, local_batch=b, client_optimizer="sgd", client_lr=0.5)
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(2))
    # Make B nonzero so every LoRA factor gets a gradient.
    state = state._replace(peft=jax.tree.map(lambda x: x + 0.1, state.peft))
    new, _ = jax.jit(lambda s: sim.round(s, data, Hyper.from_config(cfg)))(state)

    emulator = sim.base_params(state, 0)
    em_cfg = sim.specs[0].emulator_config(MODEL)

    def union_loss(p):
        flat = jnp.asarray(tokens.reshape(C * b, T))
        return gpt2.lm_loss(gpt2.apply(emulator, flat, config=em_cfg, peft=p, peft_config=sim.peft_emulators[0]), flat)

    grads = jax.grad(union_loss)(state.peft)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.peft, grads)
    assert tree_close(new.peft, expected, atol=1e-5)


def test_vmapped_clients_equal_one_at_a_time(params, data):
    cfg = fed()
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(3))
    hyper = Hyper.from_config(cfg)
    new, metrics = jax.jit(lambda s: sim.round(s, data, hyper))(state)

    k_sample, k_train, _, _ = sim.round_keys(state)
    ids, valid = sim.sample(k_sample, data.levels)[0]
    keys = sim.client_keys(k_train, 0, ids.shape[0])
    base = sim.base_params(state, 0)
    one = jax.jit(lambda tok, msk, cnt, key: local_train(
        base, state.peft, tok, msk, cnt, key, hyper, model=sim.specs[0].emulator_config(MODEL),
        peft=sim.peft_emulators[0], fed=cfg, n_steps=cfg.local_steps, batch=cfg.local_batch).peft)
    clients = [one(data.tokens[i], data.mask[i], data.counts[i], k) for i, k in zip(np.asarray(ids), keys)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *clients)
    res = aggregate.fedavg(aggregate.client_deltas(stacked, state.peft), data.counts[ids], valid)
    expected = jax.tree.map(lambda g, d: g + d, state.peft, res.mean)
    assert len(set(np.asarray(ids).tolist())) == 3
    assert int(metrics.participants) == 3
    assert tree_close(new.peft, expected, atol=1e-5)


def test_exact_lora_aggregation_merges_mean_of_products(params, data):
    cfg = fed(lora_aggregation="exact", client_optimizer="sgd", client_lr=0.3)
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(4))
    hyper = Hyper.from_config(cfg)
    new, _ = jax.jit(lambda s: sim.round(s, data, hyper))(state)

    k_sample, k_train, _, _ = sim.round_keys(state)
    ids, valid = sim.sample(k_sample, data.levels)[0]
    keys = sim.client_keys(k_train, 0, ids.shape[0])
    run = jax.vmap(lambda tok, msk, cnt, key: local_train(
        sim.base_params(state, 0), state.peft, tok, msk, cnt, key, hyper, model=sim.specs[0].emulator_config(MODEL),
        peft=sim.peft_emulators[0], fed=cfg, n_steps=cfg.local_steps, batch=cfg.local_batch).peft)
    clients = run(data.tokens[ids], data.mask[ids], data.counts[ids], keys)["blocks"]["lora"]
    w = np.asarray(data.counts[ids], np.float64)
    w = w / w.sum()
    for group, name in (("attn", "c_attn"), ("mlp", "c_proj")):
        a = np.asarray(clients[group][name]["a"], np.float64)
        b = np.asarray(clients[group][name]["b"], np.float64)
        mean_product = np.einsum("k,knir,knro->nio", w, a, b) * LORA.lora_scale
        np.testing.assert_allclose(np.asarray(new.adapter_delta[group][name]), mean_product, atol=1e-6)
    # LoRA restarts with B = 0, so the new global model is exactly the merged one.
    assert all(float(jnp.abs(t["b"]).max()) == 0 for g in new.peft["blocks"]["lora"].values() for t in g.values())


def test_nan_client_is_dropped_and_reported(params, data):
    cfg = fed(clients_per_round=C)
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    poisoned = data._replace(mask=data.mask.at[2].set(jnp.nan))
    state = sim.init(jax.random.key(5))
    new, metrics = jax.jit(lambda s, d: sim.round(s, d, Hyper.from_config(cfg)))(state, poisoned)
    assert int(metrics.dropped) == 1 and int(metrics.participants) == C - 1
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new.peft))
    clean, _ = jax.jit(lambda s, d: sim.round(s, d, Hyper.from_config(cfg)))(state, data)
    assert not tree_close(new.peft, clean.peft, atol=0)  # the poisoned client's absence shows


def test_dp_noise_has_configured_scale(params, data):
    """With a vanishing learning rate the clients' deltas are ~0, so the update is the noise:
    std = sigma * clip / participants per coordinate."""
    sigma, clip, m = 2.0, 0.5, 4
    cfg = fed(clients_per_round=m, client_optimizer="sgd", client_lr=1e-12, dp_clip=clip, dp_noise=sigma)
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(6))
    new, _ = jax.jit(lambda s: sim.round(s, data, Hyper.from_config(cfg)))(state)
    noise = np.concatenate([np.ravel(n - o) for n, o in zip(jax.tree.leaves(new.peft), jax.tree.leaves(state.peft))])
    assert noise.size > 1000
    np.testing.assert_allclose(noise.std(), sigma * clip / m, rtol=0.05)
    assert abs(noise.mean()) < 5 * (sigma * clip / m) / np.sqrt(noise.size)  # zero-mean within 5 standard errors


def test_secure_aggregation_equals_plain_sum(params, data):
    plain = FedPEAT(params, MODEL, LORA, fed(), n_clients=C)
    secure = FedPEAT(params, MODEL, LORA, fed(secure_aggregation=True), n_clients=C)
    state = plain.init(jax.random.key(7))
    a, _ = jax.jit(lambda s: plain.round(s, data, Hyper.from_config(plain.fed)))(state)
    b, _ = jax.jit(lambda s: secure.round(s, data, Hyper.from_config(secure.fed)))(state)
    assert tree_close(a.peft, b.peft, atol=1e-5)


def test_heterogeneous_emulators_and_server_participation(params, data):
    levels = jnp.asarray([0, 1, 0, 1, 0, 1])
    cfg = fed(emulator_levels=(0, 1), level_slots=(2, 1), server_participation=True)
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    server_data = (data.tokens[0], data.mask[0])
    state, metrics = jax.jit(lambda s: sim.run_rounds(s, data._replace(levels=levels), 2, server_data=server_data))(sim.init(jax.random.key(8)))
    assert np.asarray(metrics.participants).tolist() == [4, 4]  # 2 + 1 clients + the server
    assert np.isfinite(np.asarray(metrics.loss)).all()


def test_kill_and_resume_equals_uninterrupted(params, data, tmp_path):
    cfg = fed(rounds=4, rounds_per_chunk=2)
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    full = driver.train(sim, data, seed=9, show_progress=False)
    driver.train(sim, data, seed=9, ckpt_dir=tmp_path / "ck", logdir=tmp_path / "log", stop_after_chunks=1, show_progress=False)
    resumed = driver.train(sim, data, seed=9, ckpt_dir=tmp_path / "ck", logdir=tmp_path / "log", show_progress=False)
    assert int(resumed.state.round) == 4
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), (full.state.peft, full.state.opt_state), (resumed.state.peft, resumed.state.opt_state))
    assert all(jax.tree.leaves(same))
    assert bool(jnp.array_equal(jax.random.key_data(full.state.key), jax.random.key_data(resumed.state.key)))
    rounds = [r["step"] for r in read_metrics(tmp_path / "log")]
    assert rounds == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="other settings"):
        other = FedPEAT(params, MODEL, LORA, fed(rounds=4, rounds_per_chunk=2, client_lr=0.5), n_clients=C)
        driver.train(other, data, seed=9, ckpt_dir=tmp_path / "ck", show_progress=False)


def test_study_vmaps_over_seeds_and_hyperparameters(params, data):
    cfg = fed()
    sim = FedPEAT(params, MODEL, LORA, cfg, n_clients=C)
    base = Hyper.from_config(cfg)
    hypers = Hyper(*[jnp.stack([x, x, 3 * x]) for x in base])
    states, metrics, _ = driver.study(sim, data, [1, 2, 1], hypers, rounds=2)
    alone, _ = jax.jit(lambda s: sim.run_rounds(s, data, 2, base))(sim.init(jax.random.key(2), base))
    assert tree_close(jax.tree.map(lambda x: x[1], states.peft), alone.peft, atol=1e-6)
    assert not tree_close(jax.tree.map(lambda x: x[0], states.peft), jax.tree.map(lambda x: x[2], states.peft), atol=1e-6)


@pytest.mark.parametrize(
    "kw, n_clients, match",
    [
        (dict(clients_per_round=7), C, "more than the 6 clients"),
        (dict(emulator_levels=(3,)), C, "larger than the model's middle"),
        (dict(level_slots=(2,)), C, "sum to clients_per_round"),
    ],
)
def test_bad_configs_fail_before_compiling(params, kw, n_clients, match):
    with pytest.raises(ValueError, match=match):
        FedPEAT(params, MODEL, LORA, fed(**kw), n_clients=n_clients)


def test_rank_larger_than_width_fails(params):
    with pytest.raises(ValueError, match="larger than the model width"):
        FedPEAT(params, MODEL, PeftConfig(kind="lora", lora_rank=32), fed(), n_clients=C)


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
    from fedpeat_jax.fed.simulation import FedData, FedPEAT
    from fedpeat_jax.fed.sharding import client_mesh, shard_clients
    from fedpeat_jax.model import gpt2
    assert len(jax.devices()) == 8
    model = GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=5, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params = gpt2.init(jax.random.key(0), model)
    rs = np.random.RandomState(0)
    data = FedData.from_arrays(rs.randint(0, 61, (16, 4, 8)), np.ones((16, 4, 8)), rs.randint(1, 5, 16))
    cfg = FedConfig(clients_per_round=8, local_steps=2, emulator_levels=(1,), log_lora_gap=False)
    lora = PeftConfig(kind="lora", lora_rank=2)
    plain = FedPEAT(params, model, lora, cfg, n_clients=16)
    mesh = client_mesh()
    sharded = FedPEAT(params, model, lora, cfg, n_clients=16, mesh=mesh)
    state = plain.init(jax.random.key(1))
    a, _ = jax.jit(lambda s, d: plain.run_rounds(s, d, 2))(state, data)
    b, _ = jax.jit(lambda s, d: sharded.run_rounds(s, d, 2))(state, shard_clients(data, mesh))
    ok = all(bool(jnp.allclose(x, y, atol=1e-5)) for x, y in zip(jax.tree.leaves(a.peft), jax.tree.leaves(b.peft)))
    print("SHARDED_EQUAL", ok)
    """
)


def test_sharded_over_8_cpu_devices_equals_unsharded():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_EQUAL True" in out.stdout
