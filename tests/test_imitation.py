"""Behaviour cloning (rl.imitation) and train_controller's warm start from the best rule.

A tiny FedPEATMEC (4 devices, 8-round episodes, the SYNTHETIC perplexity table): these tests check
the machinery, not FedPEAT numbers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import FedPEATMEC, preset_params, synthetic_table
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl import imitation
from fedpeat_jax.rl.rollout import rollout_episodes
from fedpeat_jax.rl.rules import Rule, rule_policy
from fedpeat_jax.rl.sabppo import SABPPOConfig, make_trainer

TABLE = synthetic_table(GPT2Config.preset("default"))
ROUNDS = 8
CONFIG = SABPPOConfig(
    num_envs=8, num_steps=ROUNDS, total_timesteps=8 * ROUNDS * 2, num_minibatches=2, hidden_sizes=(32,)
)


@pytest.fixture(scope="module")
def env():
    return FedPEATMEC(preset="default", calibration=TABLE, n_devices=4, max_steps_in_episode=ROUNDS)


@pytest.fixture(scope="module")
def teacher(env):
    # two devices by compute, each at the largest emulator it can hold, bandwidth to the downloads
    return rule_policy(env, Rule.of(0, "compute", 2, int(env.n_levels), "exchange_first"), "teacher")


def test_teacher_data_returns_are_the_rollouts_episode_returns(env, teacher):
    key = jax.random.key(3)
    data = imitation.teacher_data(teacher, env, env.default_params, 16, ROUNDS, 1.0, key)
    assert data.obs.shape == (16 * ROUNDS, env.observation_space(env.default_params).shape[0])
    assert data.action.shape == (16 * ROUNDS, 1 + 3 * env.n_devices)
    # the same draws as the evaluation's rollout: at the first round the undiscounted return to go is the
    # episode's return, summed there round by round in a forward scan
    episodes = rollout_episodes(teacher.apply, env, 16, ROUNDS, teacher.params, env.default_params, key)
    np.testing.assert_allclose(np.asarray(data.returns[:16]), np.asarray(episodes["return"]), rtol=1e-5)
    # discounting: G_t = r_t + gamma G_{t+1}, so with gamma = 0 the returns are the rewards, whose sum is the return
    rewards = imitation.teacher_data(teacher, env, env.default_params, 16, ROUNDS, 0.0, key).returns
    np.testing.assert_allclose(
        np.asarray(rewards).reshape(ROUNDS, 16).sum(0), np.asarray(episodes["return"]), rtol=1e-5
    )
    # the actions are the teacher's on the recorded observations' states: every round picks two devices
    assert np.all(np.asarray(data.action)[:, 1 : 1 + env.n_devices].sum(1) == 2)


def test_clone_imitates_the_teacher_and_fits_its_returns(env, teacher):
    trainer = make_trainer(CONFIG, env)
    data = imitation.teacher_data(teacher, env, env.default_params, 64, ROUNDS, 0.99, jax.random.key(0))
    state = trainer.init(jax.random.key(1))
    before = float(imitation.action_agreement(trainer, state, data))
    cloned = jax.jit(lambda s, d: imitation.clone(trainer, s, d, epochs=100, minibatch_size=64))(state, data)
    after = float(imitation.action_agreement(trainer, cloned, data))
    assert before < 0.05 and after > 0.9, (before, after)
    # the critic learned the returns to go: most of their variance explained
    _, value = trainer.policy_logits(cloned, data.obs)
    residual = float(jnp.mean(jnp.square(value - data.returns)))
    assert residual < 0.2 * float(jnp.var(data.returns)), (residual, float(jnp.var(data.returns)))
    # the cloned policy acts like the teacher on fresh episodes; the optimizer state is the fresh one
    kw = dict(env=env, episodes=64, rng=7)
    assert B.evaluate(B.sabppo_policy(trainer, cloned), **kw)["return_mean"] == pytest.approx(
        B.evaluate(teacher, **kw)["return_mean"], abs=0.1
    )
    assert all(
        jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(cloned.opt_state), jax.tree.leaves(state.opt_state))
    )


def test_train_controller_warm_starts_from_the_best_rule(env, tmp_path):
    from fedpeat_jax.rl.controller import ControllerConfig, train_controller

    params = preset_params("default", calibration=TABLE, n_devices=4, max_steps_in_episode=ROUNDS)
    ctl = ControllerConfig(
        seeds=2,
        eval_episodes=16,
        rule_search_episodes=2,
        rule_finalists=2,
        behaviour_episodes=0,
        warm_start="best_rule",
        clone_episodes=16,
        clone_epochs=2,  # the wiring, not the fit (tested above)
    )
    out = tmp_path / "run"
    summary = train_controller(CONFIG, params, out, controller=ctl, env=env, show_progress=False)
    report = summary["warm_start"]
    assert report["teacher"] == summary["best_rule"]["description"]
    assert len(report["action_agreement"]) == 2 and all(0 <= a <= 1 for a in report["action_agreement"])
    assert report["rounds"] == ctl.clone_episodes * ROUNDS
    assert json.loads((out / "warm_start.json").read_text()) == report
    # a warm-started run is other settings than a cold one: it never resumes as one
    with pytest.raises(ValueError, match="other settings"):
        train_controller(CONFIG, params, out, controller=ControllerConfig(**{**ctl.__dict__, "warm_start": "none"}))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"warm_start": "rule"}, "warm_start"),
        ({"warm_start": "best_rule", "rule_search_episodes": 0}, "rule_search_episodes"),
        ({"clone_epochs": 0}, "clone_epochs"),
    ],
)
def test_warm_start_settings_are_validated(fields, match):
    from fedpeat_jax.rl.controller import ControllerConfig

    with pytest.raises(ValueError, match=match):
        ControllerConfig(**fields)
