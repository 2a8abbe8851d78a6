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
from fedpeat_jax.fed.client import Hyper, local_update
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.io.logging import read_metrics
from fedpeat_jax.model import gpt2

# Five blocks: a 2-1-2 emulator keeps the one middle block; small enough to compile fast.
MODEL = GPT2Config(
    vocab_size=61, n_positions=16, n_embd=16, n_layer=5, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)
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
    base = dict(
        clients_per_round=3,
        local_steps=2,
        local_batch=2,
        emulator_levels=(1,),
        rounds=2,
        rounds_per_chunk=1,
        log_lora_gap=False,
    )
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
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(2), params)
    # Make B nonzero so every LoRA factor gets a gradient.
    state = state._replace(trainable=jax.tree.map(lambda x: x + 0.1, state.trainable))
    new, _ = jax.jit(lambda s: sim.round(s, params, data, Hyper.from_config(cfg)))(state)

    emulator = sim.learner.frozen(sim.base_params(state, params), 0)
    em_cfg = sim.specs[0].emulator_config(MODEL)

    def union_loss(p):
        flat = jnp.asarray(tokens.reshape(C * b, T))
        return gpt2.lm_loss(
            gpt2.apply(emulator, flat, config=em_cfg, peft=p, peft_config=sim.learner.peft_levels[0]), flat
        )

    grads = jax.grad(union_loss)(state.trainable)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.trainable, grads)
    assert tree_close(new.trainable, expected, atol=1e-5)


def test_vmapped_clients_equal_one_at_a_time(params, data):
    cfg = fed()
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(3), params)
    hyper = Hyper.from_config(cfg)
    new, metrics = jax.jit(lambda s: sim.round(s, params, data, hyper))(state)

    k_sample, k_train, _, _ = sim.round_keys(state)
    ids, valid = sim.sample(k_sample, data.levels)[0]
    keys = sim.client_keys(k_train, 0, ids.shape[0])
    base = sim.learner.frozen(sim.base_params(state, params), 0)
    loss = sim.learner.loss(0)
    one = jax.jit(
        lambda tok, msk, cnt, key: (
            local_update(
                lambda t, x, m, k: loss(t, base, x, m, k),
                state.trainable,
                state.trainable,
                tok,
                msk,
                cnt,
                key,
                hyper,
                fed=cfg,
                batch=cfg.local_batch,
            ).tree
        )
    )
    clients = [one(data.tokens[i], data.mask[i], data.counts[i], k) for i, k in zip(np.asarray(ids), keys)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *clients)
    res = aggregate.fedavg(aggregate.client_deltas(stacked, state.trainable), data.counts[ids], valid)
    expected = jax.tree.map(lambda g, d: g + d, state.trainable, res.mean)
    assert len(set(np.asarray(ids).tolist())) == 3
    assert int(metrics.participants) == 3
    assert tree_close(new.trainable, expected, atol=1e-5)


def test_exact_lora_aggregation_merges_mean_of_products(params, data):
    cfg = fed(lora_aggregation="exact", client_optimizer="sgd", client_lr=0.3)
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(4), params)
    hyper = Hyper.from_config(cfg)
    new, _ = jax.jit(lambda s: sim.round(s, params, data, hyper))(state)

    k_sample, k_train, _, _ = sim.round_keys(state)
    ids, valid = sim.sample(k_sample, data.levels)[0]
    keys = sim.client_keys(k_train, 0, ids.shape[0])
    base, loss = sim.learner.frozen(sim.base_params(state, params), 0), sim.learner.loss(0)
    run = jax.vmap(
        lambda tok, msk, cnt, key: (
            local_update(
                lambda t, x, m, k: loss(t, base, x, m, k),
                state.trainable,
                state.trainable,
                tok,
                msk,
                cnt,
                key,
                hyper,
                fed=cfg,
                batch=cfg.local_batch,
            ).tree
        )
    )
    clients = run(data.tokens[ids], data.mask[ids], data.counts[ids], keys)["blocks"]["lora"]
    w = np.asarray(data.counts[ids], np.float64)
    w = w / w.sum()
    for group, name in (("attn", "c_attn"), ("mlp", "c_proj")):
        a = np.asarray(clients[group][name]["a"], np.float64)
        b = np.asarray(clients[group][name]["b"], np.float64)
        mean_product = np.einsum("k,knir,knro->nio", w, a, b) * LORA.lora_scale
        np.testing.assert_allclose(np.asarray(new.adapter_delta[group][name]), mean_product, atol=1e-6)
    # LoRA restarts with B = 0, so the new global model is exactly the merged one.
    assert all(float(jnp.abs(t["b"]).max()) == 0 for g in new.trainable["blocks"]["lora"].values() for t in g.values())


def test_nan_client_is_dropped_and_reported(params, data):
    cfg = fed(clients_per_round=C)
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    poisoned = data._replace(mask=data.mask.at[2].set(jnp.nan))
    state = sim.init(jax.random.key(5), params)
    new, metrics = jax.jit(lambda s, d: sim.round(s, params, d, Hyper.from_config(cfg)))(state, poisoned)
    assert int(metrics.dropped) == 1 and int(metrics.participants) == C - 1
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new.trainable))
    clean, _ = jax.jit(lambda s, d: sim.round(s, params, d, Hyper.from_config(cfg)))(state, data)
    assert not tree_close(new.trainable, clean.trainable, atol=0)  # the poisoned client's absence shows


def test_dp_noise_has_configured_scale(params, data):
    """With a vanishing learning rate the clients' deltas are ~0, so the update is the noise:
    std = sigma * clip / participants per coordinate."""
    sigma, clip, m = 2.0, 0.5, 4
    cfg = fed(clients_per_round=m, client_optimizer="sgd", client_lr=1e-12, dp_clip=clip, dp_noise=sigma)
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(6), params)
    new, _ = jax.jit(lambda s: sim.round(s, params, data, Hyper.from_config(cfg)))(state)
    noise = np.concatenate(
        [np.ravel(n - o) for n, o in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable))]
    )
    assert noise.size > 1000
    np.testing.assert_allclose(noise.std(), sigma * clip / m, rtol=0.05)
    assert abs(noise.mean()) < 5 * (sigma * clip / m) / np.sqrt(noise.size)  # zero-mean within 5 standard errors


def test_secure_aggregation_equals_plain_sum(params, data):
    plain = FedPEAT(MODEL, LORA, fed(), n_clients=C)
    secure = FedPEAT(MODEL, LORA, fed(secure_aggregation=True), n_clients=C)
    state = plain.init(jax.random.key(7), params)
    a, _ = jax.jit(lambda s: plain.round(s, params, data, Hyper.from_config(plain.fed)))(state)
    b, _ = jax.jit(lambda s: secure.round(s, params, data, Hyper.from_config(secure.fed)))(state)
    assert tree_close(a.trainable, b.trainable, atol=1e-5)


def test_heterogeneous_emulators_and_server_participation(params, data):
    levels = jnp.asarray([0, 1, 0, 1, 0, 1])
    cfg = fed(emulator_levels=(0, 1), level_slots=(2, 1), server_participation=True)
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    server_data = (data.tokens[0], data.mask[0])
    state, metrics = jax.jit(
        lambda s: sim.run_rounds(s, params, data._replace(levels=levels), 2, server_data=server_data)
    )(sim.init(jax.random.key(8), params))
    assert np.asarray(metrics.participants).tolist() == [4, 4]  # 2 + 1 clients + the server
    assert np.isfinite(np.asarray(metrics.loss)).all()


def test_kill_and_resume_equals_uninterrupted(params, data, tmp_path):
    cfg = fed(rounds=4, rounds_per_chunk=2)
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    full = driver.train(sim, params, data, seed=9, show_progress=False)
    driver.train(
        sim,
        params,
        data,
        seed=9,
        ckpt_dir=tmp_path / "ck",
        logdir=tmp_path / "log",
        stop_after_chunks=1,
        show_progress=False,
    )
    resumed = driver.train(
        sim, params, data, seed=9, ckpt_dir=tmp_path / "ck", logdir=tmp_path / "log", show_progress=False
    )
    assert int(resumed.state.round) == 4
    same = jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)),
        (full.state.trainable, full.state.opt_state),
        (resumed.state.trainable, resumed.state.opt_state),
    )
    assert all(jax.tree.leaves(same))
    assert bool(jnp.array_equal(jax.random.key_data(full.state.key), jax.random.key_data(resumed.state.key)))
    rounds = [r["step"] for r in read_metrics(tmp_path / "log")]
    assert rounds == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="other settings"):
        other = FedPEAT(MODEL, LORA, fed(rounds=4, rounds_per_chunk=2, client_lr=0.5), n_clients=C)
        driver.train(other, params, data, seed=9, ckpt_dir=tmp_path / "ck", show_progress=False)


def test_study_vmaps_over_seeds_and_hyperparameters(params, data):
    cfg = fed()
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    base = Hyper.from_config(cfg)
    hypers = Hyper(*[jnp.stack([x, x, 3 * x]) for x in base])
    states, metrics, _ = driver.study(sim, params, data, [1, 2, 1], hypers, rounds=2)
    alone, _ = jax.jit(lambda s: sim.run_rounds(s, params, data, 2, base))(sim.init(jax.random.key(2), params, base))
    assert tree_close(jax.tree.map(lambda x: x[1], states.trainable), alone.trainable, atol=1e-6)
    assert not tree_close(
        jax.tree.map(lambda x: x[0], states.trainable), jax.tree.map(lambda x: x[2], states.trainable), atol=1e-6
    )


@pytest.mark.parametrize(
    "kw, n_clients, match",
    [
        (dict(clients_per_round=7), C, "more than the 6 clients"),
        (dict(emulator_levels=(3,)), C, "larger than the model's middle"),
        (dict(level_slots=(2,)), C, "sum to clients_per_round"),
    ],
)
def test_bad_configs_fail_before_compiling(kw, n_clients, match):
    with pytest.raises(ValueError, match=match):
        FedPEAT(MODEL, LORA, fed(**kw), n_clients=n_clients)


def test_rank_larger_than_width_fails():
    with pytest.raises(ValueError, match="larger than the model width"):
        FedPEAT(MODEL, PeftConfig(kind="lora", lora_rank=32), fed(), n_clients=C)


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
    plain = FedPEAT(model, lora, cfg, n_clients=16)
    mesh = client_mesh()
    sharded = FedPEAT(model, lora, cfg, n_clients=16, mesh=mesh)
    state = plain.init(jax.random.key(1), params)
    a, _ = jax.jit(lambda s, p, d: plain.run_rounds(s, p, d, 2))(state, params, data)
    b, _ = jax.jit(lambda s, p, d: sharded.run_rounds(s, p, d, 2))(state, params, shard_clients(data, mesh))
    ok = all(bool(jnp.allclose(x, y, atol=1e-5)) for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)))
    print("SHARDED_EQUAL", ok)
    """
)


def test_sharded_over_8_cpu_devices_equals_unsharded():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_EQUAL True" in out.stdout


# ------------------------------------------------------------------------------------------------
# Client chunks: a round trains its cohort a chunk at a time and streams the aggregate
# ------------------------------------------------------------------------------------------------
CHUNK_CASES = {
    "fedavg": dict(),
    "fedadam": dict(server_optimizer="fedadam", server_lr=0.05),
    "dp_fedavg": dict(dp_clip=0.05, dp_noise=0.7),
    "secure": dict(secure_aggregation=True),
    "exact_lora": dict(lora_aggregation="exact", client_optimizer="sgd", client_lr=0.3),
    "scaffold": dict(algorithm="scaffold", client_optimizer="sgd", client_lr=0.3),
    "trimmed_mean": dict(aggregation="trimmed_mean", trim_fraction=0.2),
    "levels_and_server": dict(emulator_levels=(0, 1), level_slots=(2, 3), server_participation=True, log_lora_gap=True),
}


FAST_CHUNK_CASES = (
    "fedavg",
    "levels_and_server",
)  # the rest behind --runslow: the default suite stays under 10 minutes


@pytest.mark.parametrize(
    "case", [c if c in FAST_CHUNK_CASES else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CHUNK_CASES)]
)
def test_chunked_round_equals_unchunked(params, data, case):
    """5 clients a round, 2 at a time (3 chunks, one padded slot) == all 5 at once, over 2 rounds."""
    kw = dict(clients_per_round=5, rounds_per_chunk=2, **CHUNK_CASES[case])
    levels = jnp.asarray([0, 1, 0, 1, 0, 1]) if "level_slots" in kw else data.levels
    d = data._replace(levels=levels)
    server = (data.tokens[0], data.mask[0]) if kw.get("server_participation") else None
    out = []
    for chunk in (5, 2):
        sim = FedPEAT(MODEL, LORA, fed(client_chunk=chunk, **kw), n_clients=C)
        state = sim.init(jax.random.key(11), params)
        run = jax.jit(lambda s, p, dd, srv: sim.run_rounds(s, p, dd, 2, server_data=srv))
        out.append(run(state, params, d, server))
    (a, ma), (b, mb) = out
    assert tree_close(
        (a.trainable, a.adapter_delta, a.control, a.clients),
        (b.trainable, b.adapter_delta, b.control, b.clients),
        atol=2e-6,
    )
    np.testing.assert_array_equal(np.asarray(ma.participants), np.asarray(mb.participants))
    np.testing.assert_allclose(np.asarray(ma.loss), np.asarray(mb.loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ma.lora_gap), np.asarray(mb.lora_gap), rtol=1e-4, atol=1e-7)
    assert float(np.asarray(ma.update_norm)[-1]) > 0  # the rounds moved the model


def test_chunk_layout_pads_at_most_one_slot_per_chunk():
    from fedpeat_jax.fed.simulation import chunk_layout

    assert chunk_layout(100, 64) == (2, 50)
    assert chunk_layout(5, 2) == (3, 2)
    assert chunk_layout(4096, 64) == (64, 64)
    assert chunk_layout(12, 8, n_devices=8) == (2, 8)
    for n in range(1, 70):
        chunks, size = chunk_layout(n, 16, 2)
        assert size <= 16 and size % 2 == 0 and 0 <= chunks * size - n < chunks * 2


# ------------------------------------------------------------------------------------------------
# Methods as configurations of the one round
# ------------------------------------------------------------------------------------------------
def test_whole_model_one_sgd_step_equals_centralized_step(params):
    """trainable='model': one local SGD step of every weight, full participation, equal weights =
    one SGD step of the whole model on the union of the clients' data."""
    b = 2
    tokens = np.random.RandomState(3).randint(0, 61, (C, b, T))
    d = FedData.from_arrays(tokens, np.ones((C, b, T)), np.full(C, b))
    cfg = fed(
        clients_per_round=C,
        local_steps=1,
        local_batch=b,
        client_optimizer="sgd",
        client_lr=0.5,
        trainable="model",
        emulator_levels=(1,),
        client_chunk=4,
    )
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(2), params)
    new, _ = jax.jit(lambda s, p: sim.round(s, p, d, Hyper.from_config(cfg)))(state, params)
    flat = jnp.asarray(tokens.reshape(C * b, T))
    grads = jax.grad(lambda p: gpt2.lm_loss(gpt2.apply(p, flat, config=MODEL), flat))(params)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert tree_close(new.trainable, expected, atol=1e-5)


def test_all_blocks_lora_trains_every_block(params, data):
    cfg = fed(trainable="all_blocks", emulator_levels=(1,))
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(3), params)
    assert state.trainable["blocks"]["lora"]["attn"]["c_attn"]["a"].shape[0] == MODEL.n_layer
    new, metrics = jax.jit(lambda s, p: sim.round(s, p, data, Hyper.from_config(cfg)))(state, params)
    assert int(metrics.participants) == 3
    moved = (
        np.abs(np.asarray(new.trainable["blocks"]["lora"]["mlp"]["c_fc"]["b"])).reshape(MODEL.n_layer, -1).max(axis=1)
    )
    assert (moved > 0).all()  # the middle block (no adapter) trains too


def test_local_only_clients_continue_their_own_trees(params, data):
    """algorithm='local': each client trains its own tree (a round's client starts from where its
    last round left it), the global tree never moves."""
    cfg = fed(algorithm="local", clients_per_round=C, client_chunk=4)
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    state = sim.init(jax.random.key(4), params)
    step = jax.jit(lambda s, p: sim.round(s, p, data, Hyper.from_config(cfg)))
    one, _ = step(state, params)
    two, metrics = step(one, params)
    assert int(metrics.participants) == C
    assert tree_close(two.trainable, state.trainable, atol=0)
    # Client 1's second round starts from its own first-round tree: redo it by hand.
    k_sample, k_train, _, _ = sim.round_keys(one)
    ids, _ = sim.sample(k_sample, data.levels)[0]
    slot = int(np.flatnonzero(np.asarray(ids) == 1)[0])
    key = sim.client_keys(k_train, 0, C)[slot]
    base, loss = sim.learner.frozen(params, 0), sim.learner.loss(0)
    own = jax.tree.map(lambda x: x[1], one.clients)
    expected = local_update(
        lambda t, x, m, k: loss(t, base, x, m, k),
        own,
        state.trainable,
        data.tokens[1],
        data.mask[1],
        data.counts[1],
        key,
        Hyper.from_config(cfg),
        fed=cfg,
        batch=cfg.local_batch,
    ).tree
    assert tree_close(jax.tree.map(lambda x: x[1], two.clients), expected, atol=1e-6)
    assert not tree_close(
        jax.tree.map(lambda x: x[1], two.clients), jax.tree.map(lambda x: x[2], two.clients), atol=1e-6
    )


# ------------------------------------------------------------------------------------------------
# Weights are arguments, not constants of the compiled program
# ------------------------------------------------------------------------------------------------
def test_lowered_round_of_default_model_carries_no_weight_constants():
    model = GPT2Config.preset("default", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    lora = PeftConfig(kind="lora", lora_rank=8, lora_alpha=16.0)
    cfg = FedConfig(clients_per_round=4, local_steps=2, client_chunk=2, emulator_levels=(2,), rounds_per_chunk=1)
    rs = np.random.RandomState(0)
    d = FedData.from_arrays(rs.randint(0, model.vocab_size, (8, 4, 32)), np.ones((8, 4, 32)), np.full(8, 4))
    sim = FedPEAT(model, lora, cfg, n_clients=8)
    texts, weight_bytes = [], None
    for seed in (0, 1):
        params = gpt2.init(jax.random.key(seed), model)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        state = sim.init(jax.random.key(0), params)
        texts.append(jax.jit(sim.run_rounds, static_argnums=3).lower(state, params, d, 1).as_text())
    assert weight_bytes > 30e6
    assert len(texts[0]) < 0.05 * weight_bytes, f"HLO text {len(texts[0])} bytes for {weight_bytes} bytes of weights"
    assert texts[0] == texts[1]


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------
ROUNDS_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "multiprocess_rounds.py")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    """A mesh of 2 processes x 2 CPU devices (jax.distributed, gloo) runs the same 3 rounds as
    one process with 4 devices: each process feeds only its own clients."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.Popen(
        [sys.executable, ROUNDS_SCRIPT, "--devices", "4", "--out", str(tmp_path / "single.npz")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                ROUNDS_SCRIPT,
                "--devices",
                "2",
                "--processes",
                "2",
                "--process-id",
                str(i),
                "--port",
                str(port),
                "--out",
                str(tmp_path / "multi.npz"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        for p in [single, *procs]:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            assert "DONE" in out
    finally:
        for p in [single, *procs]:
            p.kill()
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isfinite(a["loss"]).all() and len(a["loss"]) == 3


@pytest.mark.slow
def test_automatic_chunk_fits_the_memory_budget_and_a_client_too_big_is_refused(params, data):
    """client_chunk=None: the driver halves the chunk until the compiled round fits
    FedConfig.memory_budget_gb; a round that does not fit one client at a time is refused."""
    cfg = fed(clients_per_round=C, rounds=1)
    hyper = Hyper.from_config(cfg)
    need = {}
    for chunk in (1, 2):
        sim = FedPEAT(MODEL, LORA, cfg.replace(client_chunk=chunk), n_clients=C)
        state = sim.init(jax.random.key(0), params)
        need[chunk] = driver.round_memory(
            jax.jit(sim.run_rounds, static_argnums=3).lower(state, params, data, 1, hyper).compile()
        )
    assert need[2] > need[1] > 0
    budget = (need[1] + need[2]) / 2 / driver.GiB
    result = driver.train(
        FedPEAT(MODEL, LORA, cfg.replace(memory_budget_gb=budget), n_clients=C), params, data, show_progress=False
    )
    assert result.client_chunk == 1 and int(result.state.round) == 1
    with pytest.raises(ValueError, match="one client at a time needs .* memory budget"):
        driver.train(
            FedPEAT(MODEL, LORA, cfg.replace(memory_budget_gb=need[1] / 2 / driver.GiB), n_clients=C),
            params,
            data,
            show_progress=False,
        )


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint(tmp_path):
    """Two processes killed after round 1 (orbax checkpoint of the replicated state) and started
    again end with the parameters of one uninterrupted process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.run(
        [sys.executable, ROUNDS_SCRIPT, "--devices", "4", "--out", str(tmp_path / "single.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    for stop in (["--stop-after-chunks", "1"], []):
        port = _free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    ROUNDS_SCRIPT,
                    "--devices",
                    "2",
                    "--processes",
                    "2",
                    "--process-id",
                    str(i),
                    "--port",
                    str(port),
                    "--out",
                    str(tmp_path / "multi.npz"),
                    "--ckpt",
                    str(tmp_path / "ckpt"),
                    *stop,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(2)
        ]
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    for name in a.files:
        if name != "loss":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(a["loss"][1:], b["loss"], rtol=1e-5)  # the resumed process logged rounds 2 and 3
