"""SABPPO: branch distributions, PPO clipping, GAE, normalizers, a real learning test, vmap over
seeds/hyperparameters, and chunked training resumed from a checkpoint.

The environment is a tiny FedPEATMEC preset (2 devices, 10-round episodes) on the SYNTHETIC
perplexity table: these tests check the learning machinery, not FedPEAT numbers. One config is
shared so that the jitted ``train`` compiles once for the module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.mec import FedPEATMEC, synthetic_table
from fedpeat_jax.rl import distributions as D
from fedpeat_jax.rl import normalize as Nz
from fedpeat_jax.rl import sabppo as S
from fedpeat_jax.rl.baselines import evaluate, random_policy, sabppo_policy

NVEC = (2, 2, 2, 4, 4, 3)

# network="mlp": the vmap test below asks vmapped runs to equal single runs to 1e-5 after 480 gradient
# steps. Vmapped and single matmuls differ in the last bit, and one sampled action that flips on such
# a difference sends two runs apart (with the device network's pooled features it does after 17
# updates); the MLP's runs stay within float noise here. The device network: its own tests below.
CONFIG = S.SABPPOConfig(
    num_envs=16,
    num_steps=10,
    total_timesteps=16 * 10 * 30,
    num_minibatches=4,
    update_epochs=4,
    hidden_sizes=(32, 32),
    lr=1e-3,
    network="mlp",
)


@pytest.fixture(scope="module")
def env():
    return FedPEATMEC(
        preset="default",
        calibration=synthetic_table(GPT2Config.preset("default")),
        n_devices=2,
        max_steps_in_episode=10,
    )


@pytest.fixture(scope="module")
def trainer(env):
    return S.make_trainer(CONFIG, env)


@pytest.fixture(scope="module")
def jit_train(trainer):
    return jax.jit(trainer.train)


@pytest.fixture(scope="module")
def trained(trainer, jit_train):
    # hparams passed explicitly: the vmap test calls the same compiled function with others
    return jax.block_until_ready(jit_train(jax.random.key(0), trainer.default_hparams()))


def _max_abs_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_envs", 0, "num_envs"),
        ("num_minibatches", 7, "num_minibatches"),
        ("total_timesteps", 10, "total_timesteps"),
        ("clip_mode", "both", "clip_mode"),
        ("activation", "gelu", "activation"),
        ("gamma", 1.5, "gamma"),
        ("lr", -1.0, "lr"),
        ("hidden_sizes", (64, 0), "hidden_sizes"),
        ("network", "cnn", "network"),
    ],
)
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        S.SABPPOConfig(**{field: value})


def test_config_derived_sizes():
    c = S.SABPPOConfig(num_envs=8, num_steps=5, total_timesteps=400, num_minibatches=4)
    assert (c.batch_size, c.minibatch_size, c.num_updates) == (40, 10, 10)


# ------------------------------------------------------------------------- branch distributions
def _reference_branch_logp(logits, actions):
    """Each branch on its own, in numpy: log-softmax of its slice, picked at its action."""
    logits, actions = np.asarray(logits, np.float64), np.asarray(actions)
    out, off = [], 0
    for b, n in enumerate(NVEC):
        z = logits[:, off : off + n]
        lp = z - z.max(1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
        out.append(lp[np.arange(len(z)), actions[:, b]])
        off += n
    return np.stack(out, 1)


def test_branch_groups_cover_the_logits():
    groups = D.branch_groups(NVEC)
    assert groups == ((0, 3, 2, 0), (3, 2, 4, 6), (5, 1, 3, 14))
    with pytest.raises(ValueError, match="at least one choice"):
        D.branch_groups((2, 0))


def test_joint_log_prob_equals_sum_of_branch_log_probs():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, sum(NVEC))) * 3, jnp.float32)
    actions = jnp.asarray(np.stack([rng.integers(0, n, 64) for n in NVEC], 1))
    ref = _reference_branch_logp(logits, actions)
    np.testing.assert_allclose(D.branch_log_probs(logits, actions, NVEC), ref, atol=1e-5)
    np.testing.assert_allclose(D.joint_log_prob(logits, actions, NVEC), ref.sum(1), atol=1e-4)
    # joint log-prob = log of the product of the branch probabilities
    np.testing.assert_allclose(np.exp(D.joint_log_prob(logits, actions, NVEC)), np.exp(ref).prod(1), rtol=1e-4)


def test_entropy_is_sum_of_branch_entropies():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(16, sum(NVEC))), jnp.float32)
    ent = np.asarray(jax.jit(lambda z: D.branch_entropies(z, NVEC))(logits))
    off = 0
    for b, n in enumerate(NVEC):
        z = np.asarray(logits[:, off : off + n], np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(ent[:, b], -(p * np.log(p)).sum(1), atol=1e-5)
        off += n
    uniform = D.branch_entropies(jnp.zeros((1, sum(NVEC))), NVEC).sum()
    np.testing.assert_allclose(uniform, np.log(NVEC).sum(), rtol=1e-6)


def test_sampling_follows_the_branch_probabilities_and_mode_is_argmax():
    rng = np.random.default_rng(2)
    logits1 = jnp.asarray(rng.normal(size=(sum(NVEC),)) * 1.5, jnp.float32)
    logits = jnp.broadcast_to(logits1, (20000, sum(NVEC)))
    a = np.asarray(jax.jit(lambda k, z: D.sample_branches(k, z, NVEC))(jax.random.key(0), logits))
    off = 0
    mode = np.asarray(D.mode_branches(logits1, NVEC))
    for b, n in enumerate(NVEC):
        z = np.asarray(logits1[off : off + n], np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        freq = np.bincount(a[:, b], minlength=n) / len(a)
        assert a[:, b].min() >= 0 and a[:, b].max() < n
        np.testing.assert_allclose(freq, p, atol=0.015)
        assert mode[b] == np.argmax(p)
        off += n


def test_multi_categorical_is_the_distrax_style_face_of_the_branch_functions():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(32, sum(NVEC))), jnp.float32)
    pi = D.MultiCategorical(logits, NVEC)
    a = pi.sample(seed=jax.random.key(1))
    np.testing.assert_array_equal(a, D.sample_branches(jax.random.key(1), logits, NVEC))
    np.testing.assert_allclose(pi.log_prob(a), D.joint_log_prob(logits, a, NVEC), rtol=1e-6)
    np.testing.assert_allclose(pi.branch_log_prob(a), D.branch_log_probs(logits, a, NVEC), rtol=1e-6)
    np.testing.assert_allclose(pi.entropy(), D.branch_entropies(logits, NVEC).sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(pi.mode(), D.mode_branches(logits, NVEC))
    a2, lp2 = pi.sample_and_log_prob(seed=jax.random.key(1))
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_allclose(lp2, pi.log_prob(a), atol=1e-5)
    with pytest.raises(ValueError, match="sum\\(nvec\\)"):
        D.MultiCategorical(logits[:, :-1], NVEC)


def test_branch_softmax_is_exact_for_logits_far_apart():
    # one branch far below the rest, one logit far above its branch's first, one branch spanning 60 nats
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, sum(NVEC)))
    logits[:, :2] -= 500.0
    logits[:, 7] += 60.0
    logits[:, 14:17] = [[-30.0, 0.0, 30.0]]
    actions = np.stack([rng.integers(0, n, 8) for n in NVEC], 1)
    lp = np.asarray(D.branch_log_probs(jnp.asarray(logits, jnp.float32), jnp.asarray(actions), NVEC))
    ent = np.asarray(D.branch_entropies(jnp.asarray(logits, jnp.float32), NVEC))
    assert np.isfinite(lp).all() and np.isfinite(ent).all()
    np.testing.assert_allclose(lp, _reference_branch_logp(logits, actions), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        lp.sum(1), np.asarray(D.joint_log_prob(jnp.asarray(logits, jnp.float32), jnp.asarray(actions), NVEC)), rtol=1e-5
    )


def test_sample_with_log_probs_returns_the_samples_log_probs():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(64, sum(NVEC))) * 2, jnp.float32)
    actions, logp = D.sample_with_log_probs(jax.random.key(3), logits, NVEC)
    np.testing.assert_array_equal(actions, D.sample_branches(jax.random.key(3), logits, NVEC))
    np.testing.assert_allclose(logp, _reference_branch_logp(logits, np.asarray(actions)), atol=1e-5)


# ------------------------------------------------------------------------------------- clipping
def test_branch_and_joint_clipping_agree_with_one_branch():
    rng = np.random.default_rng(3)
    logp = jnp.asarray(rng.normal(size=(256, 1)) * 0.3, jnp.float32)
    old = jnp.asarray(rng.normal(size=(256, 1)) * 0.3, jnp.float32)
    adv = jnp.asarray(rng.normal(size=(256,)), jnp.float32)
    joint = S.clipped_policy_loss(logp, old, adv, 0.2, "joint")
    branch = S.clipped_policy_loss(logp, old, adv, 0.2, "branch")
    np.testing.assert_allclose(joint[0], branch[0], rtol=1e-6)
    np.testing.assert_allclose(joint[1], branch[1], rtol=1e-6)
    assert 0.0 < float(joint[1]) < 1.0  # some ratios are clipped, some are not

    # reference: the PPO surrogate written out in numpy
    r = np.exp(np.asarray(logp - old)[:, 0])
    a = np.asarray(adv)
    np.testing.assert_allclose(joint[0], -np.mean(np.minimum(r * a, np.clip(r, 0.8, 1.2) * a)), rtol=1e-5)

    # with several branches the two modes are different objectives
    logp3 = jnp.asarray(rng.normal(size=(256, 3)) * 0.3, jnp.float32)
    old3 = jnp.asarray(rng.normal(size=(256, 3)) * 0.3, jnp.float32)
    j3 = S.clipped_policy_loss(logp3, old3, adv, 0.2, "joint")[0]
    b3 = S.clipped_policy_loss(logp3, old3, adv, 0.2, "branch")[0]
    assert abs(float(j3) - float(b3)) > 1e-3
    with pytest.raises(ValueError, match="clip mode"):
        S.clipped_policy_loss(logp, old, adv, 0.2, "neither")


# ------------------------------------------------------------------------------------------ GAE
def _numpy_gae(rewards, values, dones, last_value, gamma, lam):
    T = len(rewards)
    adv = np.zeros_like(rewards)
    gae = np.zeros_like(last_value)
    for t in reversed(range(T)):
        next_value = last_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        gae = delta + gamma * lam * nonterminal * gae
        adv[t] = gae
    return adv, adv + values


def test_gae_matches_plain_numpy():
    rng = np.random.default_rng(4)
    T, E = 9, 5
    rewards = rng.normal(size=(T, E)).astype(np.float32)
    values = rng.normal(size=(T, E)).astype(np.float32)
    dones = (rng.random((T, E)) < 0.25).astype(np.float32)
    last = rng.normal(size=(E,)).astype(np.float32)
    adv, ret = S.compute_gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(dones > 0), jnp.asarray(last), 0.97, 0.9
    )
    ref_adv, ref_ret = _numpy_gae(
        rewards.astype(np.float64), values.astype(np.float64), dones, last.astype(np.float64), 0.97, 0.9
    )
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(5)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 4)).astype(np.float32) for n in (7, 20, 3)]
    rms = Nz.rms_init((4,))
    for b in batches:
        rms = Nz.rms_update(rms, jnp.asarray(b))
    allx = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(rms.mean, allx.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-3)
    x = Nz.normalize_obs(jnp.asarray(allx, jnp.float32), rms, 10.0)
    np.testing.assert_allclose(np.mean(x, 0), 0.0, atol=1e-3)


# -------------------------------------------------------------------------------------- learning
def test_short_training_beats_the_random_policy(env, trainer, trained):
    state, metrics = trained
    n = CONFIG.num_updates
    # metrics are reduced inside the scan: one scalar per update, nothing per step
    assert all(np.shape(v) == (n,) for v in metrics.values())
    np.testing.assert_array_equal(metrics["env_steps"], np.arange(1, n + 1) * CONFIG.batch_size)
    assert np.all(np.asarray(metrics["episodes"]) == CONFIG.num_envs)  # 10-step rollouts, 10-step episodes
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    np.testing.assert_allclose(metrics["lr"][0], CONFIG.lr, rtol=1e-6)  # linear annealing from lr
    assert metrics["lr"][-1] < 0.1 * CONFIG.lr

    rand = evaluate(random_policy(env), env, episodes=256, rng=1)
    agent = evaluate(sabppo_policy(trainer, state), env, episodes=256, rng=1)
    margin = 0.15 * abs(rand["return_mean"])
    assert agent["return_mean"] > rand["return_mean"] + margin, (agent["return_mean"], rand["return_mean"])
    # the (stochastic) training returns improved too; the first updates ~ the near-uniform initial policy
    ret = np.asarray(metrics["episode_return"])
    assert ret[-5:].mean() > ret[:3].mean() + 0.05 * abs(ret[:3].mean())


def test_vmap_over_seeds_and_hyperparameters_equals_single_runs(trainer, jit_train, trained):
    hp = trainer.default_hparams()
    hps = S.stack_hparams(
        [
            hp,
            hp.replace(
                lr=jnp.float32(3e-4), ent_coef=jnp.float32(0.02), env_params=hp.env_params.replace(w_latency=0.5)
            ),
        ]
    )
    keys = jnp.stack([jax.random.key(0), jax.random.key(7)])
    v_state, v_metrics = jax.jit(jax.vmap(trainer.train))(keys, hps)
    # vmapped and single programs may sum in another order, and Adam magnifies that over the updates:
    # 2.2e-4 at most measured on an AMD EPYC (1e-5 elsewhere); two different runs differ by far more
    row = lambda i: jax.tree.map(lambda x: x[i], v_state.params)  # noqa: E731
    assert _max_abs_diff(row(0), row(1)) > 0.05
    for i in range(2):
        state_i, metrics_i = jit_train(keys[i], jax.tree.map(lambda x: x[i], hps))
        assert _max_abs_diff(row(i), state_i.params) < 1e-3
        # such a difference can flip a sampled action: one update's mean return moved by 6.4e-3 there
        np.testing.assert_allclose(v_metrics["episode_return"][i], metrics_i["episode_return"], rtol=2e-2, atol=1e-4)
        np.testing.assert_allclose(v_metrics["loss"][i], metrics_i["loss"], rtol=2e-2, atol=1e-3)
    # row 0 is the default run of the module's fixture; row 1 really is another run
    assert _max_abs_diff(row(0), trained[0].params) < 1e-3
    assert _max_abs_diff(row(1), trained[0].params) > 0.05
    np.testing.assert_allclose(v_metrics["lr"][:, 0], [CONFIG.lr, 3e-4], rtol=1e-6)


def test_chunked_run_resumed_from_a_checkpoint_equals_the_unchunked_run(trainer, trained, tmp_path):
    full_state, full_metrics = trained
    half = CONFIG.num_updates // 2
    run = jax.jit(trainer.run_updates, static_argnums=1)
    init = jax.jit(trainer.init)
    state = init(jax.random.key(0))
    state, m1 = run(state, half)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(half, state, {"update": half})
    fresh_target = init(jax.random.key(123))  # a different state of the same shape
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        restored = mgr.restore(target=fresh_target)
    assert int(restored.update) == half
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    state, m2 = run(restored, CONFIG.num_updates - half)
    assert _max_abs_diff(state.params, full_state.params) < 1e-6
    assert _max_abs_diff(state.obs_rms, full_state.obs_rms) < 1e-6
    assert _max_abs_diff(state.opt_state, full_state.opt_state) < 1e-5
    chunked = np.concatenate([m1["episode_return"], m2["episode_return"]])
    np.testing.assert_allclose(chunked, full_metrics["episode_return"], rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([m1["env_steps"], m2["env_steps"]]), full_metrics["env_steps"])


# -------------------------------------------------------------------------- other environments
@pytest.mark.slow
def test_trains_on_a_plain_gymnax_environment():
    """The generic path (jax.vmap of a gymnax env's step, Discrete action = one branch) learns CartPole."""
    import gymnax

    env, params = gymnax.make("CartPole-v1")
    cfg = S.SABPPOConfig(
        num_envs=16, num_steps=128, total_timesteps=16 * 128 * 60, lr=2.5e-3, num_minibatches=4, normalize_obs=False
    )
    _, metrics = jax.jit(S.make_train(cfg, env, params))(jax.random.key(0))
    ret = np.asarray(metrics["episode_return"])
    assert np.nanmean(ret[-5:]) > 2 * np.nanmean(ret[:5])


# ------------------------------------------------------------------------------------- networks
def test_device_network_is_equivariant_to_reordering_the_devices(env):
    from fedpeat_jax.rl.networks import DeviceActorCritic, make_network

    layout = env.agent_layout()
    net = DeviceActorCritic(layout=layout, hidden_sizes=(16, 16))
    n, f = layout.n_devices, layout.device_features
    obs = jnp.asarray(np.random.default_rng(0).normal(size=(3, f * n + layout.global_features)), jnp.float32)
    params = net.init(jax.random.key(0), obs)
    logits, value = net.apply(params, obs)
    assert logits.shape == (3, sum(env.nvec)) and value.shape == (3,)
    perm = np.array([1, 0])  # swap the two devices
    dev = np.asarray(obs[:, : f * n]).reshape(3, f, n)[:, :, perm].reshape(3, f * n)
    logits_p, value_p = net.apply(params, jnp.concatenate([jnp.asarray(dev), obs[:, f * n :]], -1))
    np.testing.assert_allclose(value_p, value, rtol=1e-5, atol=1e-6)  # the value does not depend on the order
    g = sum(layout.global_branches)
    np.testing.assert_allclose(logits_p[:, :g], logits[:, :g], rtol=1e-5, atol=1e-6)
    start = g
    for size in layout.device_branches:  # each device's branches follow it
        block = np.asarray(logits[:, start : start + n * size]).reshape(3, n, size)
        block_p = np.asarray(logits_p[:, start : start + n * size]).reshape(3, n, size)
        np.testing.assert_allclose(block_p, block[:, perm], rtol=1e-5, atol=1e-6)
        start += n * size
    assert type(make_network("auto", tuple(env.nvec), (8,), "tanh", layout)).__name__ == "DeviceActorCritic"
    assert type(make_network("auto", tuple(env.nvec), (8,), "tanh", None)).__name__ == "ActorCritic"
    with pytest.raises(ValueError, match="agent_layout"):
        make_network("devices", tuple(env.nvec), (8,), "tanh", None)
    with pytest.raises(ValueError, match="branches"):
        make_network("devices", (2, 2), (8,), "tanh", layout)


def test_device_network_trains(env):
    import dataclasses

    cfg = dataclasses.replace(CONFIG, network="devices", total_timesteps=16 * 10 * 3)
    trainer = S.make_trainer(cfg, env)
    assert type(trainer.network).__name__ == "DeviceActorCritic"
    state, metrics = jax.jit(trainer.train)(jax.random.key(0))
    assert np.shape(metrics["loss"]) == (3,) and np.all(np.isfinite(np.asarray(metrics["loss"])))
    init = trainer.init(jax.random.key(0))
    assert _max_abs_diff(state.params, init.params) > 1e-4  # the updates moved the weights


def test_orthogonal_init_is_flaxs_one_matrix_at_a_time_under_vmap():
    from flax import linen as nn

    from fedpeat_jax.rl.networks import orthogonal

    keys = jax.random.split(jax.random.key(3), 3)
    for shape in [(64, 64), (64, 7), (5, 64)]:
        vmapped = jax.jit(jax.vmap(lambda k, s=shape: orthogonal(2.0)(k, s)))(keys)
        for i in range(3):
            np.testing.assert_array_equal(
                np.asarray(vmapped[i]), np.asarray(nn.initializers.orthogonal(2.0)(keys[i], shape))
            )
    assert jax.vmap(jax.vmap(lambda k: orthogonal()(k, (4, 4))))(keys.reshape(3, 1)).shape == (3, 1, 4, 4)
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda k: orthogonal()(k, (8, 8))))(keys))
    assert "scan" in jaxpr  # the QRs run one matrix at a time


def test_vmapped_init_of_two_seeds_at_default_sizes_returns():
    """Batched QRs in the vmapped init deadlocked XLA:CPU on 2 cores (every pool worker waiting for
    work queued behind it): run the default networks' init at 2 seeds in a subprocess with a timeout."""
    import subprocess
    import sys

    code = (
        "import jax\n"
        "from fedpeat_jax.mec import FedPEATMEC\n"
        "from fedpeat_jax.rl.controller import init_runs\n"
        "from fedpeat_jax.rl.sabppo import SABPPOConfig, make_trainer, stack_hparams\n"
        "env = FedPEATMEC()\n"
        "trainer = make_trainer(SABPPOConfig(), env, env.default_params)\n"
        "keys = jax.random.split(jax.random.key(0), 2)\n"
        "state = init_runs(trainer, keys, stack_hparams([trainer.default_hparams()] * 2))\n"
        "print(state.obs.shape, float(state.obs.sum()))\n"  # the sum waits for the computation
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1].startswith("(2, 64,")
