"""Baseline policies, the jitted evaluator, SABPPO as a policy, and train_controller end to end.

Environments use the SYNTHETIC perplexity table: the tests check mechanics, not FedPEAT numbers.
"""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import FedPEATMEC, decode_action, preset_params, synthetic_table
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl.sabppo import SABPPOConfig, make_trainer

TABLE = synthetic_table(GPT2Config.preset("default"))


@pytest.fixture(scope="module")
def env():
    return FedPEATMEC(preset="default", calibration=TABLE, n_devices=4, max_steps_in_episode=8)


@pytest.fixture(scope="module")
def tight_env():
    """Memory capacities that fit no emulator (0.2 GB), only the smallest (0.3 GB) or all (1 GB)."""
    return FedPEATMEC(preset="default", calibration=TABLE, n_devices=6, max_steps_in_episode=8,
                      mem_choices_gb=(0.2, 0.3, 1.0))


def _first_state(env, seed=0):
    return jax.jit(env.reset)(jax.random.key(seed), env.default_params)


# ------------------------------------------------------------------------------------ policies
def test_all_largest_and_no_server_actions(env):
    obs, state = _first_state(env)
    p = env.default_params
    for policy, server in ((B.all_largest_policy(env), 1), (B.no_server_policy(env), 0)):
        a = decode_action(np.asarray(policy.apply(policy.params, obs, state, p, jax.random.key(0))), env.n_devices)
        assert int(a["server"]) == server
        np.testing.assert_array_equal(a["participate"], 1)
        np.testing.assert_array_equal(a["level"], int(np.argmax(p.level_k)))
        assert len(set(a["bandwidth"].tolist())) == 1  # equal weights -> equal shares


def test_random_policy_is_uniform_over_every_branch(env):
    obs, state = _first_state(env)
    pol = B.random_policy(env)
    keys = jax.random.split(jax.random.key(1), 8000)
    acts = np.asarray(jax.jit(jax.vmap(lambda k: pol.apply(None, obs, state, env.default_params, k)))(keys))
    for b, n in enumerate(env.nvec):
        freq = np.bincount(acts[:, b], minlength=n) / len(acts)
        assert len(freq) == n
        np.testing.assert_allclose(freq, 1.0 / n, atol=0.03)


def test_greedy_takes_best_channels_with_the_largest_fitting_emulator(tight_env):
    env, p = tight_env, tight_env.default_params
    need = np.asarray(B.level_memory_bytes(p))
    assert need[0] <= 0.3e9 < need[1] and need[-1] <= 1e9  # the capacities split the levels as intended
    k_sel = 3
    pol = B.greedy_policy(env, k_sel)
    act = jax.jit(lambda o, s, k: pol.apply(None, o, s, p, k))
    seen_excluded = seen_small = 0
    for seed in range(12):
        obs, state = _first_state(env, seed)
        a = decode_action(np.asarray(act(obs, state, jax.random.key(seed))), env.n_devices)
        cap, gain = np.asarray(state.mem_capacity), np.asarray(state.gain)
        # reference in numpy: fitting devices ranked by channel gain, largest fitting level each
        fits = need[None, :] <= cap[:, None]
        can = fits.any(1)
        ranked = [i for i in np.argsort(-gain) if can[i]][:k_sel]
        expected = np.zeros(env.n_devices, int)
        expected[ranked] = 1
        np.testing.assert_array_equal(a["participate"], expected)
        for i in ranked:
            assert np.asarray(p.level_k)[a["level"][i]] == np.asarray(p.level_k)[fits[i]].max()
        assert int(a["server"]) == 1
        seen_excluded += int((~can).sum())
        seen_small += int((fits.sum(1) == 1).sum())
    assert seen_excluded > 0 and seen_small > 0  # both memory cases really occurred


def test_greedy_rejects_an_impossible_selection(env):
    with pytest.raises(ValueError, match="n_select"):
        B.greedy_policy(env, env.n_devices + 1)


def test_without_server_turns_off_the_server_of_any_policy(env):
    obs, state = _first_state(env)
    pol = B.without_server(B.random_policy(env))
    keys = jax.random.split(jax.random.key(2), 200)
    acts = np.asarray(jax.vmap(lambda k: pol.apply(None, obs, state, env.default_params, k))(keys))
    assert np.all(acts[:, 0] == 0) and acts[:, 1:].std() > 0


# ---------------------------------------------------------------------------------- evaluation
def test_evaluate_reports_every_metric_and_is_reproducible(env):
    full = B.evaluate(B.all_largest_policy(env), env, episodes=32, rng=3)
    again = B.evaluate(B.all_largest_policy(env), env, episodes=32, rng=3)
    off = B.evaluate(B.no_server_policy(env), env, episodes=32, rng=3)
    assert full == again
    for name in B.EPISODE_METRICS:
        assert np.isfinite(full[f"{name}_mean"]) and np.isfinite(full[f"{name}_std"])
    assert full["completed_fraction"] == 1.0  # every episode runs from reset to its last round
    assert full["participants_mean"] == pytest.approx(env.n_devices + 1)
    assert off["participants_mean"] == pytest.approx(env.n_devices)
    assert full["violations_mean"] == 0.0  # default capacities hold every emulator of this model
    np.testing.assert_allclose(full["total_latency_mean"], full["latency_mean"] * 8, rtol=1e-5)
    # the same fading draws, without the server's data: perplexity falls more slowly
    assert off["final_perplexity_mean"] > full["final_perplexity_mean"]


def test_evaluate_counts_memory_violations(tight_env):
    r = B.evaluate(B.all_largest_policy(tight_env), tight_env, episodes=16, rng=0)
    g = B.evaluate(B.greedy_policy(tight_env, 6), tight_env, episodes=16, rng=0)
    assert r["violations_mean"] > 0  # largest emulator on 0.2/0.3 GB devices fails
    assert g["violations_mean"] == 0.0  # greedy never exceeds the capacity


def test_evaluate_rejects_bad_arguments(env):
    with pytest.raises(ValueError, match="episodes"):
        B.evaluate(B.random_policy(env), env, episodes=0)
    with pytest.raises(TypeError, match="policy"):
        B.evaluate("random", env)


def test_sabppo_policy_evaluates_without_recompiling_for_new_weights(env):
    cfg = SABPPOConfig(num_envs=4, num_steps=8, total_timesteps=32, num_minibatches=1, hidden_sizes=(16,))
    trainer = make_trainer(cfg, env)
    init = jax.jit(trainer.init)
    s0, s1 = init(jax.random.key(0)), init(jax.random.key(1))
    r0 = B.evaluate(B.sabppo_policy(trainer, s0), env, episodes=8, rng=0)
    n_compiled = B.rollout_episodes._cache_size()
    r1 = B.evaluate(B.sabppo_policy(trainer, s1), env, episodes=8, rng=0)
    assert B.rollout_episodes._cache_size() == n_compiled
    assert r0["return_mean"] != r1["return_mean"]
    stochastic = B.evaluate(B.sabppo_policy(trainer, s0, deterministic=False), env, episodes=8, rng=0)
    assert stochastic["return_mean"] != r0["return_mean"]
    batched = jax.tree.map(lambda a, b: jnp.stack([a, b]), s0, s1)
    with pytest.raises(ValueError, match="ONE run"):
        B.sabppo_policy(trainer, batched)


# ----------------------------------------------------------------------------- train_controller
def test_train_controller_resumes_evaluates_and_plots(tmp_path):
    from fedpeat_jax.rl.controller import ControllerConfig, load_policy, train_controller

    params = preset_params("default", calibration=TABLE, n_devices=2, max_steps_in_episode=5)
    cfg = SABPPOConfig(num_envs=4, num_steps=5, total_timesteps=4 * 5 * 4, num_minibatches=2, update_epochs=1,
                       hidden_sizes=(16,))
    ctl = ControllerConfig(seeds=2, chunk_updates=2, eval_episodes=16)
    out = tmp_path / "run"
    env = FedPEATMEC(params)  # one env object for all calls: compiled evaluations are reused
    part = train_controller(cfg, params, out, controller=ctl, env=env, show_progress=False, stop_after_chunks=1)
    assert part == {"run_dir": str(out), "updates": 2, "total_updates": 4, "finished": False}
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_controller(cfg, params, out, resume=False, controller=ctl, show_progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_controller(cfg, params.replace(w_latency=2.0), out, controller=ctl, show_progress=False)
    summary = train_controller(cfg, params, out, controller=ctl, env=env, show_progress=False)
    assert summary["finished"] and summary["resumed"] and summary["updates"] == 4
    assert set(summary["baselines"]) == {"random", "all_largest", "greedy", "no_server"}
    assert len(summary["sabppo"]["per_seed_return_mean"]) == 2
    assert summary["beats_every_baseline"] == all(
        summary["sabppo"]["return_mean"] > b["return_mean"] for b in summary["baselines"].values())
    for name in ("summary.json", "controller.json", "learning_curve.png", "comparison.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["updates"] == 4
    # one log record per update, none duplicated by the resume
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60, 80]
    # the saved policy of seed 1 reproduces its evaluation
    policy, _, _ = load_policy(out, env, seed_index=1)
    again = B.evaluate(policy, env, episodes=16, rng=ctl.eval_seed)
    assert again["return_mean"] == pytest.approx(summary["sabppo"]["per_seed_return_mean"][1], rel=1e-6)
