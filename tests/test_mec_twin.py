"""The numpy/gymnasium twin: step-by-step agreement with the JAX environment, gymnasium/SB3 use.

The JAX environment and the numpy twin are fed the same uniform draws and must agree on
observations, rewards and infos within 1e-5 (relative to max(1, |value|); counts and flags
exactly) over many random episodes that exercise every part of the round: stragglers past the
deadline, memory violations, server rounds on its own domain, emulator exchanges, empty rounds,
auto-resets, the participation drift (``ppl_drift``), and invalid actions (out of range, floats),
which both treat by the same rule.
Tables are SYNTHETIC placeholders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import FedPEATMEC, FedPEATTwin, NumpyFedPEAT, synthetic_table

TOL = 1e-5
EXACT = (
    "violations",
    "stragglers",
    "n_participants",
    "exchanges",
    "empty_round",
    "terminated",
    "truncated",
    "memory_peak_bytes",
)


def _close(name, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    assert err.max() <= TOL, f"{name}: max scaled error {err.max():.2e} > {TOL}"


CASES = {
    # preset, model, overrides, episodes (batch), rounds
    "default": ("default", "default", {}, 48, 130),
    "default, in-domain server, tight deadline": (
        "default",
        "default",
        dict(server_domain="target", round_deadline=3.0),
        32,
        60,
    ),
    "default, participation drift": ("default", "default", dict(ppl_drift=6.0), 32, 60),
    "default, a response refitted to live rounds": (
        "default",
        "default",
        dict(ppl_drift=2.0, ppl_drift_fresh=7.0, data_exponent=0.4),
        32,
        60,
    ),
    "gpt2-small mobile, short episodes": (
        "gpt2-small",
        "gpt2",
        dict(mobility_step=40.0, max_steps_in_episode=9),
        32,
        40,
    ),
    "gpt2-xl no server, 3 devices": (
        "gpt2-xl",
        "gpt2-xl",
        dict(server_enabled=0.0, n_devices=3, bw_levels=3, max_steps_in_episode=15),
        32,
        40,
    ),
}


def _invalid(a, rng, nvec):
    """Some entries out of range (negative or too large) in some episodes: the same rule must apply."""
    a = a.copy()
    hit = rng.random(a.shape) < 0.05
    a[hit] = rng.integers(-3, 8, size=int(hit.sum()))
    return a


@pytest.mark.parametrize("case", list(CASES))
def test_jax_env_and_numpy_twin_agree_step_by_step(case):
    preset, model, overrides, n_env, rounds = CASES[case]
    env = FedPEATMEC(preset=preset, calibration=synthetic_table(GPT2Config.preset(model)), **overrides)
    p = env.default_params
    twin = NumpyFedPEAT(p)
    n = env.n_devices
    step = jax.jit(env.step_with_draws)
    draw = jax.jit(env.draw)  # the environment's own generator; the twin gets the same numbers

    u = np.asarray(draw(jax.random.split(jax.random.key(0), n_env)))  # (5, N, E)
    obs_j, s_j = jax.jit(env.reset_with_draws)(jnp.asarray(u), p)
    obs_t, s_t = twin.reset_from_draws(u)
    _close("reset obs", obs_j, obs_t)

    rng = np.random.default_rng(1)
    seen_violation = seen_empty = seen_trunc = seen_late = 0
    for t in range(rounds):
        u = np.asarray(draw(jax.random.split(jax.random.key(t + 1), n_env)))
        a = twin.sample_actions(rng, (n_env,))
        a[: n + 1, rng.random(n_env) < 0.1] = 0  # some empty rounds
        a[n + 1 : 2 * n + 1, rng.random(n_env) < 0.3] = env.n_levels - 1  # repeated levels: no exchange
        a = _invalid(a, rng, env.nvec)
        oj, s_j, rj, tej, trj, ij = step(jnp.asarray(u), s_j, jnp.asarray(a, jnp.int32), p)
        ot, s_t, rt, tet, trt, it = twin.step_from_draws(s_t, a, u)
        _close(f"obs t={t}", oj, ot)
        _close(f"reward t={t}", rj, rt)
        for key in ij:
            if key in EXACT:
                np.testing.assert_allclose(
                    np.asarray(ij[key], np.float64), np.asarray(it[key], np.float64), rtol=1e-6, err_msg=f"{key} t={t}"
                )
            else:
                _close(f"{key} t={t}", ij[key], it[key])
        np.testing.assert_array_equal(np.asarray(s_j.stored_level), s_t.stored_level)
        seen_violation += int(np.sum(it["violations"]))
        seen_late += int(np.sum(it["stragglers"]))
        seen_empty += int(np.sum(it["empty_round"]))
        seen_trunc += int(np.sum(it["truncated"]))
    assert seen_empty > 0 and seen_trunc > 0 and seen_violation > 0  # penalties and auto-resets exercised
    assert seen_late > 0  # stragglers dropped at the deadline


def test_gymnasium_twin_matches_the_vectorized_core():
    table = synthetic_table(GPT2Config.preset("default"))
    twin = FedPEATTwin(preset="default", calibration=table, max_steps_in_episode=6)
    core = NumpyFedPEAT(twin.params)
    rng = np.random.default_rng(0)
    u = core.draw(rng)
    obs, info = twin.reset_from_draws(u)
    obs_c, s_c = core.reset_from_draws(u)
    np.testing.assert_array_equal(obs, obs_c)
    for _t in range(6):
        u, a = core.draw(rng), core.sample_actions(rng)
        obs, r, term, trunc, info = twin.step_from_draws(a, u)
        obs_c, s_c, r_c, _, trunc_c, info_c = core.step_from_draws(s_c, a, u, autoreset=False)
        np.testing.assert_array_equal(obs, obs_c)
        assert (
            r == pytest.approx(float(r_c))
            and trunc == bool(trunc_c)
            and info["latency"] == pytest.approx(float(info_c["latency"]))
        )
    assert trunc and not term  # gymnasium semantics: truncated after T rounds, no auto-reset


def test_twin_passes_the_stable_baselines3_checker_and_vec_env():
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    table = synthetic_table(GPT2Config.preset("default"))
    twin = FedPEATTwin(preset="default", calibration=table)
    check_env(twin, warn=False)
    vec = DummyVecEnv([lambda: FedPEATTwin(preset="default", calibration=table, max_steps_in_episode=5)] * 3)
    vec.seed(0)
    obs = vec.reset()
    assert obs.shape == (3, twin.observation_space.shape[0])
    dones = []
    for _ in range(12):
        obs, rew, done, infos = vec.step(np.stack([vec.action_space.sample() for _ in range(3)]))
        dones.append(done)
        assert np.all(np.isfinite(rew))
    dones = np.asarray(dones)
    assert dones.sum() == 6 and np.all(dones[[4, 9]])  # every env truncated after rounds 5 and 10


def test_invalid_actions_follow_one_rule_in_both():
    """Out-of-range and float entries: the JAX env and the twin clip them into range alike, and the
    result equals stepping the clipped action; a wrong length fails in both, naming the length."""
    table = synthetic_table(GPT2Config.preset("default"))
    env = FedPEATMEC(preset="default", calibration=table)
    p = env.default_params
    twin = NumpyFedPEAT(p)
    u = np.asarray(env.draw(jax.random.key(0)))
    _, s_j = env.reset_with_draws(jnp.asarray(u), p)
    _, s_t = twin.reset_from_draws(u)
    bad = np.array([5] + [-1, 2] * 5 + [7] * 10 + [-4] * 10)
    fixed = np.clip(bad, 0, env.nvec - 1)
    step = jax.jit(env.step_with_draws)
    out_bad, out_fixed = (
        step(jnp.asarray(u), s_j, jnp.asarray(bad), p),
        step(jnp.asarray(u), s_j, jnp.asarray(fixed), p),
    )
    tw_bad = twin.step_from_draws(s_t, bad, u)
    np.testing.assert_array_equal(out_bad[0], out_fixed[0])
    assert float(out_bad[2]) == float(out_fixed[2])
    _close("invalid-action obs", out_bad[0], tw_bad[0])
    _close("invalid-action reward", out_bad[2], tw_bad[2])
    floats = fixed.astype(np.float64) + 0.7  # truncated toward zero: the same action
    _close("float-action reward", twin.step_from_draws(s_t, floats, u)[2], tw_bad[2])
    for wrong in (np.zeros(30, int), np.zeros(32, int)):
        with pytest.raises(ValueError, match="31 entries"):
            env.step(jax.random.key(1), jax.tree.map(lambda x: x, s_j), jnp.asarray(wrong), p)
        with pytest.raises(ValueError, match="31 entries"):
            twin.step_from_draws(s_t, wrong, u)


def test_twin_rejects_bad_actions_and_seeds_reproducibly():
    table = synthetic_table(GPT2Config.preset("default"))
    twin = FedPEATTwin(preset="default", calibration=table)
    with pytest.raises(RuntimeError, match="reset"):
        twin.step(twin.action_space.sample())
    obs1, _ = twin.reset(seed=3)
    a = twin.action_space.sample()
    step1 = twin.step(a)
    obs2, _ = twin.reset(seed=3)
    step2 = twin.step(a)
    np.testing.assert_array_equal(obs1, obs2)
    np.testing.assert_array_equal(step1[0], step2[0])
    with pytest.raises(ValueError, match="31 entries"):
        twin.step(np.zeros(5, int))


def test_gymnasium_make():
    import gymnasium

    table = synthetic_table(GPT2Config.preset("default"))
    env = gymnasium.make("FedPEAT-MEC-v0", calibration=table, disable_env_checker=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (74,)


def test_participation_drift_raises_the_fixed_point_only_for_repeated_few_devices():
    """ppl_drift moves the perplexity only when devices that took part last round train again
    and not every device takes part; both implementations agree on it."""
    table = synthetic_table(GPT2Config.preset("default"))
    runs = {}
    for drift in (0.0, 6.0):
        env = FedPEATMEC(calibration=table, ppl_drift=drift, server_enabled=0.0, mem_choices_gb=(1.0,))
        p, n = env.default_params, env.n_devices
        twin = NumpyFedPEAT(p)
        u = np.asarray(env.draw(jax.random.key(0)))
        _, s_j = env.reset_with_draws(jnp.asarray(u), p)
        _, s_t = twin.reset_from_draws(u)
        for devices in (2, 2, 2, n, n):  # the same two devices three times, then every device twice
            a = np.zeros(3 * n + 1, np.int32)
            a[1 : devices + 1] = 1
            _, s_j, _, _, _, ij = env.step_with_draws(jnp.asarray(u), s_j, jnp.asarray(a), p)
            _, s_t, _, _, _, it = twin.step_from_draws(s_t, a, u)
            _close("perplexity", ij["perplexity"], it["perplexity"])
            runs.setdefault(drift, []).append(float(ij["perplexity"]))
    plain, drifting = np.asarray(runs[0.0]), np.asarray(runs[6.0])
    assert plain[0] == drifting[0]  # the first round: nobody took part before
    assert np.all(drifting[1:3] > plain[1:3] + 1.0)  # the same two again: a higher fixed point
    # every device: no drift term, so both approach the same fixed point from where they were
    assert abs(drifting[4] - plain[4]) < abs(drifting[2] - plain[2])
