"""Baseline policies, the jitted evaluator, SABPPO as a policy, and train_controller end to end.

Environments use the SYNTHETIC perplexity table: the tests check mechanics, not FedPEAT numbers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import FedPEATMEC, decode_action, encode_action, make_params, preset_params, synthetic_table
from fedpeat_jax.mec.params import level_memory_bytes
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl import rules as R
from fedpeat_jax.rl.sabppo import SABPPOConfig, make_trainer

TABLE = synthetic_table(GPT2Config.preset("default"))


@pytest.fixture(scope="module")
def env():
    return FedPEATMEC(preset="default", calibration=TABLE, n_devices=4, max_steps_in_episode=8)


@pytest.fixture(scope="module")
def tight_env():
    """Memory capacities that fit no emulator, only the smallest, or all (1 GB)."""
    need = make_params("default", TABLE)
    need = np.asarray(level_memory_bytes(jax.tree.map(np.asarray, need)))
    return FedPEATMEC(
        preset="default",
        calibration=TABLE,
        n_devices=6,
        max_steps_in_episode=8,
        mem_choices_gb=(0.9 * need[0] / 1e9, 1.01 * need[0] / 1e9, 1.0),
    )


def _first_state(env, seed=0):
    return jax.jit(env.reset)(jax.random.key(seed), env.default_params)


# ------------------------------------------------------------------------------------ policies
def test_server_only_and_all_devices_actions(env):
    obs, state = _first_state(env)
    p = env.default_params
    act = lambda pol: decode_action(np.asarray(pol.apply(pol.params, obs, state, p, jax.random.key(0))), env.n_devices)  # noqa: E731
    srv = act(B.server_only_policy(env))
    assert int(srv["server"]) == 1 and np.all(srv["participate"] == 0)
    for server in (True, False):
        a = act(B.all_devices_policy(env, server=server))
        assert int(a["server"]) == int(server)
        np.testing.assert_array_equal(a["participate"], 1)  # default capacities: every device holds some emulator
        need = np.asarray(level_memory_bytes(p))
        cap = np.asarray(state.mem_capacity)
        largest = [int(np.flatnonzero(need <= c).max()) for c in cap]
        np.testing.assert_array_equal(a["level"], largest)
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
    need = np.asarray(level_memory_bytes(p))
    cap = np.asarray(p.mem_choices)
    assert cap[0] < need[0] <= cap[1] < need[1] and need[-1] <= cap[2]  # the capacities split the levels as intended
    k_sel = 3
    pol = B.greedy_policy(env, k_sel)
    act = jax.jit(lambda o, s, k: pol.apply(pol.params, o, s, p, k))
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
    full = B.evaluate(B.all_devices_policy(env), env, episodes=32, rng=3)
    again = B.evaluate(B.all_devices_policy(env), env, episodes=32, rng=3)
    off = B.evaluate(B.all_devices_policy(env, server=False), env, episodes=32, rng=3)
    assert full == again
    for name in B.EPISODE_METRICS:
        assert np.isfinite(full[f"{name}_mean"]) and np.isfinite(full[f"{name}_std"])
    assert full["completed_fraction"] == 1.0  # every episode runs from reset to its last round
    assert full["participants_mean"] == pytest.approx(env.n_devices + 1)
    assert off["participants_mean"] == pytest.approx(env.n_devices)
    assert full["violations_mean"] == 0.0  # the largest emulator that fits never exceeds a capacity
    np.testing.assert_allclose(full["total_latency_mean"], full["latency_mean"] * 8, rtol=1e-5)
    # the same draws; the synthetic server data ('modern', another domain) pulls the perplexity up
    assert off["final_perplexity_mean"] < full["final_perplexity_mean"]


def test_evaluate_counts_memory_violations(tight_env):
    n, top = tight_env.n_devices, tight_env.n_levels - 1

    def largest(obs, state, env_params, rng):  # every device on the largest emulator, fitting or not
        return encode_action(jnp.ones(n, jnp.int32), jnp.full(n, top, jnp.int32), jnp.zeros(n, jnp.int32))

    r = B.evaluate(largest, tight_env, episodes=16, rng=0)
    g = B.evaluate(B.greedy_policy(tight_env, 6), tight_env, episodes=16, rng=0)
    assert r["violations_mean"] > 0  # the largest emulator on small devices fails
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


# ---------------------------------------------------------------------------------------- rules
def test_rules_match_a_numpy_reference_ranking(env):
    obs, state = _first_state(env, 3)
    p = env.default_params
    apply = R.RuleApply(env.n_devices, env.n_bw_levels)
    keys = {"channel": state.gain, "compute": state.flops, "data": state.data}
    for score, values in keys.items():
        for n in (1, 2, env.n_devices):
            a = decode_action(np.asarray(apply(R.Rule.of(0, score, n, 0), obs, state, p, None)), env.n_devices)
            expected = np.zeros(env.n_devices, int)
            expected[np.argsort(-np.asarray(values))[:n]] = 1
            np.testing.assert_array_equal(a["participate"], expected)
            assert int(a["server"]) == 0 and np.all(a["level"] == 0)
    grid = R.rule_grid(env)
    n_rules = 1 + 2 * len(R.SCORES) * env.n_devices * (env.n_levels + 1) * len(R.BANDWIDTH_RULES)
    assert grid.n.shape == (n_rules,)


def test_exchange_first_bandwidth_favours_devices_that_download(env):
    obs, state = _first_state(env)
    p = env.default_params
    state = state.replace(stored_level=state.stored_level.at[0].set(1))  # device 1 already holds level 1
    a = decode_action(
        np.asarray(
            R.RuleApply(env.n_devices, env.n_bw_levels)(
                R.Rule.of(1, "channel", env.n_devices, 1, "exchange_first"), obs, state, p, None
            )
        ),
        env.n_devices,
    )
    assert a["bandwidth"][0] == 0 and np.all(a["bandwidth"][1:] == env.n_bw_levels - 1)


def test_rule_search_finds_the_best_rule_on_its_own_draws(env):
    res = R.search_rules(env, episodes=4, finalists=3, final_episodes=8, rng=0)
    assert len(res["screen"]) == len(R.rule_grid(env).n) and len(res["finals"]) == 3
    best = B.evaluate(res["policy"], env, episodes=8, rng=1)
    assert best["return_mean"] == pytest.approx(max(r for _, r in res["finals"]), rel=1e-5)
    assert "server" in res["description"]


def test_default_problem_has_no_trivial_optimum():
    """On the defaults, server only and all devices are each beaten by another fixed policy."""
    env = FedPEATMEC()
    search = R.search_rules(env, episodes=16, finalists=4, final_episodes=32, rng=0)
    kw = dict(env=env, episodes=32, rng=7)
    best = B.evaluate(search["policy"], **kw)["return_mean"]
    for trivial in (B.server_only_policy(env), B.all_devices_policy(env), B.all_devices_policy(env, server=False)):
        assert B.evaluate(trivial, **kw)["return_mean"] < best, trivial.name


# ----------------------------------------------------------------------------- train_controller
def test_train_controller_resumes_evaluates_and_plots(tmp_path):
    from fedpeat_jax.rl.controller import ControllerConfig, load_policy, train_controller

    params = preset_params("default", calibration=TABLE, n_devices=2, max_steps_in_episode=5)
    cfg = SABPPOConfig(
        num_envs=4, num_steps=5, total_timesteps=4 * 5 * 4, num_minibatches=2, update_epochs=1, hidden_sizes=(16,)
    )
    ctl = ControllerConfig(
        seeds=2,
        chunk_updates=2,
        eval_episodes=16,
        rule_search_episodes=0,  # searched in its own test
        behaviour_episodes=4,
    )
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
    assert set(summary["baselines"]) == {"random", "server_only", "all_devices", "greedy"}
    assert len(summary["sabppo"]["per_seed_return_mean"]) == 2
    assert summary["beats_every_baseline"] == all(
        summary["sabppo"]["return_mean"] > b["return_mean"] for b in summary["baselines"].values()
    )
    for name in ("summary.json", "controller.json", "learning_curve.png", "comparison.png", "behaviour.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["updates"] == 4
    # one log record per update, none duplicated by the resume
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60, 80]
    # the saved policy of seed 1 reproduces its evaluation
    policy, _, _ = load_policy(out, env, seed_index=1)
    again = B.evaluate(policy, env, episodes=16, rng=ctl.eval_seed)
    assert again["return_mean"] == pytest.approx(summary["sabppo"]["per_seed_return_mean"][1], rel=1e-6)
