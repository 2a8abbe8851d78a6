"""The gymnasium vector environment backed by the jitted FedPEAT MEC environment.

Checked with gymnasium's own tools: its observation checker on every returned batch, its
``data_equivalence`` for seeded determinism, its batched spaces and vector wrappers, and its
``SyncVectorEnv`` of numpy twins as the reference for the autoreset protocol of both modes.
Tables are SYNTHETIC placeholders.
"""

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.utils.passive_env_checker import check_obs
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import ENV_ID, FedPEATTwin, FedPEATVectorEnv, synthetic_table

TABLE = synthetic_table(GPT2Config.preset("default"))
E, T = 4, 3


def _venv(mode="next_step", **kw):
    return FedPEATVectorEnv(E, calibration=TABLE, max_steps_in_episode=T, autoreset_mode=mode, **kw)


def _sync(mode):
    return SyncVectorEnv([lambda: FedPEATTwin(calibration=TABLE, max_steps_in_episode=T)] * E, autoreset_mode=mode)


@pytest.mark.parametrize("mode", ["next_step", "same_step"])
def test_vector_env_follows_gymnasiums_autoreset_protocol(mode):
    venv, sync = _venv(mode), _sync(AutoresetMode(mode.title().replace("_", "")))
    assert venv.metadata["autoreset_mode"] == sync.metadata["autoreset_mode"]
    assert venv.action_space == sync.action_space and venv.observation_space == sync.observation_space
    assert venv.single_action_space == sync.single_action_space
    obs, info = venv.reset(seed=0)
    obs_s, _ = sync.reset(seed=0)
    check_obs(obs, venv.observation_space, "reset")
    n = venv.env.n_devices
    venv.action_space.seed(0)
    for _t in range(2 * T + 2):
        a = venv.action_space.sample()
        obs, r, term, trunc, info = venv.step(a)
        obs_s, r_s, term_s, trunc_s, info_s = sync.step(a)
        check_obs(obs, venv.observation_space, "step")
        assert r.dtype == r_s.dtype and r.shape == (E,) and term.dtype == trunc.dtype == bool
        # the episode clock (t / T) and the end flags follow the reference step for step
        np.testing.assert_allclose(obs[:, 7 * n], obs_s[:, 7 * n], atol=1e-7)
        np.testing.assert_array_equal(trunc, trunc_s)
        np.testing.assert_array_equal(r == 0.0, r_s == 0.0)  # next_step: reward 0 exactly on the reset steps
        assert ("final_obs" in info) == ("final_obs" in info_s)
        if "final_obs" in info:
            np.testing.assert_array_equal(info["_final_obs"], info_s["_final_obs"])
            for i in np.flatnonzero(info["_final_obs"]):
                assert info["final_obs"][i][7 * n] == pytest.approx(1.0)  # the last observation of the episode
        for key in ("perplexity", "latency"):
            assert info[key].shape == (E,) and info[f"_{key}"].dtype == bool
            np.testing.assert_array_equal(info[f"_{key}"], info_s.get(f"_{key}", np.zeros(E, bool)))


def test_vector_env_is_deterministic_given_the_seed_and_checks_actions():
    runs = []
    for _ in range(2):
        venv = _venv()
        out = [venv.reset(seed=5)]
        rng = np.random.default_rng(1)
        for _ in range(4):
            out.append(venv.step(rng.integers(0, venv.env.nvec, (E, len(venv.env.nvec)))))
        runs.append(out)
    assert data_equivalence(runs[0], runs[1])
    other = _venv()
    assert not data_equivalence(other.reset(seed=6)[0], runs[0][0][0])
    with pytest.raises(ValueError, match="31 entries"):
        other.step(np.zeros((E, 30), int))
    with pytest.raises(ValueError, match="num_envs"):
        other.step(np.zeros((E + 1, 31), int))
    with pytest.raises(ValueError, match="one int seed"):
        other.reset(seed=[1, 2])
    with pytest.raises(ValueError, match="autoreset_mode"):
        FedPEATVectorEnv(E, calibration=TABLE, autoreset_mode="disabled")


def test_make_vec_and_gymnasium_vector_wrappers():
    venv = gymnasium.make_vec(ENV_ID, num_envs=E, calibration=TABLE, max_steps_in_episode=T)
    assert isinstance(venv, FedPEATVectorEnv)
    stats = gymnasium.wrappers.vector.RecordEpisodeStatistics(venv)
    stats.reset(seed=0)
    episodes = []
    for _ in range(T + 1):
        _, r, _, _, info = stats.step(stats.action_space.sample())
        if "episode" in info:
            episodes.append(info["episode"])
    assert len(episodes) == 1 and np.all(episodes[0]["l"] == T)
