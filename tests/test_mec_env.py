"""The gymnax environment FedPEATMEC: API, episodes, penalties, vmap, determinism, bad input.

All tables here are SYNTHETIC placeholders (``synthetic_table``): the tests check mechanics,
not perplexity numbers.
"""

import dataclasses
import json

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import (
    ENV_ID,
    CalibrationMissingError,
    CalibrationTable,
    FedPEATMEC,
    calibration,
    load_calibration,
    make_params,
    synthetic_table,
)

N = 10


def _table(model="default", **kw):
    return synthetic_table(GPT2Config.preset(model), **kw)


@pytest.fixture(scope="module")
def env():
    return FedPEATMEC(preset="default", calibration=_table())


_JITTED = {}


def _round(env, state, action, params, key=0):
    """One round from ``state`` with the draws of ``key`` (jitted once per env)."""
    if env not in _JITTED:
        _JITTED[env] = jax.jit(env.step_with_draws)
    return _JITTED[env](env.draw(jax.random.key(key)), state, action, params)


def _action(env, server=1, participate=None, level=None, bw=None):
    n = env.n_devices
    participate = np.ones(n, int) if participate is None else np.asarray(participate)
    level = np.zeros(n, int) if level is None else np.broadcast_to(level, (n,))
    bw = np.zeros(n, int) if bw is None else np.broadcast_to(bw, (n,))
    return jnp.asarray(np.concatenate([[server], participate, level, bw]), jnp.int32)


def test_spaces_and_shapes(env):
    p = env.default_params
    assert env.num_actions == 3 * N + 1
    assert env.nvec.tolist() == [2] * (N + 1) + [4] * N + [4] * N
    assert env.observation_space(p).shape == (7 * N + 4,)
    obs, state = env.reset(jax.random.key(0), p)
    assert obs.shape == (7 * N + 4,) and obs.dtype == jnp.float32
    a = env.action_space(p).sample(jax.random.key(1))
    assert a.shape == (3 * N + 1,) and bool(env.action_space(p).contains(a))
    obs, state, reward, term, trunc, info = env.step(jax.random.key(2), state, a, p)
    assert obs.shape == (7 * N + 4,) and reward.shape == () and reward.dtype == jnp.float32
    assert not bool(term) and not bool(trunc)
    for k in ("perplexity", "latency", "memory", "bytes", "violations", "exchanges", "empty_round"):
        assert k in info
    # observation layout: fresh episode -> no stored emulator, nobody took part, t/T = 0
    obs0, _ = env.reset(jax.random.key(3), p)
    assert np.all(np.asarray(obs0[5 * N : 7 * N]) == 0)
    np.testing.assert_allclose(obs0[7 * N :], [0.0, 1.0, 0.0, 0.0], atol=1e-7)


def test_gymnax_registration():
    assert ENV_ID in gymnax.registered_envs
    env, params = gymnax.make(ENV_ID, calibration=_table())
    assert isinstance(env, FedPEATMEC) and params.n_devices == N


def test_sample_is_uniform_per_branch(env):
    keys = jax.random.split(jax.random.key(1), 3)
    batched = jax.vmap(env.action_space().sample)(keys)  # custom vmap rule: native batch
    for i in range(3):
        np.testing.assert_array_equal(batched[i], env.action_space().sample(keys[i]))
    a = np.asarray(env.action_space().sample_batch(jax.random.key(0), 20000))
    assert a.shape == (3 * N + 1, 20000)
    for branch, n in zip(a, env.nvec):
        counts = np.bincount(branch, minlength=n)
        assert len(counts) == n and np.all(np.abs(counts / 20000 - 1 / n) < 0.02)


def test_deterministic_given_key(env):
    p = env.default_params

    def rollout(key):
        obs, s = env.reset(key, p)
        out = []
        for _i in range(5):
            key, ka, ks = jax.random.split(key, 3)
            obs, s, r, *_ = env.step(ks, s, env.action_space().sample(ka), p)
            out.append((np.asarray(obs), float(r)))
        return out

    a, b, c = rollout(jax.random.key(7)), rollout(jax.random.key(7)), rollout(jax.random.key(8))
    for (oa, ra), (ob, rb) in zip(a, b):
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb
    assert any(not np.array_equal(oa, oc) for (oa, _), (oc, _) in zip(a, c))


def test_truncates_after_T_rounds_and_resets(env):
    p = env.default_params.replace(max_steps_in_episode=4)
    obs, s = env.reset(jax.random.key(0), p)
    a = _action(env, level=3)
    for t in range(1, 5):
        obs, s, r, term, trunc, info = env.step(jax.random.key(t), s, a, p)
        assert bool(trunc) == (t == 4) and not bool(term)
        if t < 4:
            assert int(s.time) == t and float(info["perplexity"]) < p.ppl0
    assert int(s.time) == 0 and float(s.ppl) == pytest.approx(p.ppl0)  # auto-reset
    assert np.all(np.asarray(s.stored_level) == -1)
    # the observation before the reset, as gymnax's base step gives it
    assert float(info["final_observation"][7 * N]) == pytest.approx(1.0)  # t/T = 1 before the reset
    assert float(obs[7 * N]) == 0.0
    walked, _, _, _ = env.step_env(jax.random.key(4), s, a, p)[1:]  # the gymnax hook: no auto-reset
    assert int(walked.time) == 1


def test_stragglers_past_the_deadline_are_dropped():
    env = FedPEATMEC(preset="default", calibration=_table(), mem_choices_gb=(1.0,))  # every emulator fits
    p = env.default_params
    _, s = env.reset(jax.random.key(0), p)
    a = _action(env, server=0, level=3)
    _, s_loose, _, _, _, loose = _round(env, s, a, p.replace(round_deadline=1e6))
    assert int(loose["stragglers"]) == 0 and float(loose["data_fraction"]) == pytest.approx(1.0, rel=1e-6)
    tight = p.replace(round_deadline=0.5 * float(loose["latency"]))
    _, s_tight, r, _, _, info = _round(env, s, a, tight)
    assert 0 < int(info["stragglers"]) <= N and float(info["latency"]) == pytest.approx(tight.round_deadline)
    assert float(info["data_fraction"]) < 1.0
    very = p.replace(round_deadline=1e-3)  # nobody makes it: no data, the time capped, nothing stored
    _, s_none, _, _, _, none = _round(env, s, a, very)
    assert int(none["stragglers"]) == N and float(none["data_fraction"]) == 0.0
    assert float(none["perplexity"]) == pytest.approx(p.ppl0) and float(none["latency"]) == pytest.approx(1e-3)
    assert np.all(np.asarray(s_none.stored_level) == -1) and np.all(np.asarray(s_loose.stored_level) == 3)


def test_data_fractions_count_devices_data_and_the_server_apart():
    """phi_dev is the devices' share of all devices' data; the server's data never enters it (also
    with the server disabled), it pulls on its own towards its domain's fixed point."""
    env = FedPEATMEC(preset="default", calibration=_table(), round_deadline=1e6, mem_choices_gb=(1.0,))
    p = env.default_params
    _, s = env.reset(jax.random.key(0), p)
    half = (np.arange(N) < N // 2).astype(int)
    share = float(np.sum(np.asarray(s.data)[: N // 2]) / np.sum(np.asarray(s.data)))
    for params in (p, p.replace(server_enabled=0.0)):
        _, _, _, _, _, info = _round(env, s, _action(env, server=1, participate=half), params)
        assert float(info["data_fraction"]) == pytest.approx(share, rel=1e-6)
    # server only: moves towards srv_ppl_inf at rate srv_eta * server_data / sum(data)
    _, _, _, _, _, srv = _round(env, s, _action(env, server=1, participate=np.zeros(N, int)), p)
    pull = p.srv_eta * p.server_data / float(np.sum(np.asarray(s.data)))
    want = p.srv_ppl_inf + (p.ppl0 - p.srv_ppl_inf) * np.exp(-pull)
    assert float(srv["perplexity"]) == pytest.approx(want, rel=1e-5)
    _, _, _, _, _, off = _round(
        env, s, _action(env, server=1, participate=np.zeros(N, int)), p.replace(server_enabled=0.0)
    )
    assert float(off["perplexity"]) == pytest.approx(p.ppl0) and bool(off["empty_round"])


def test_reward_terms_have_their_documented_ranges(env):
    """Perplexity term in [0, 1] from ppl_ref to ppl_best, latency term T / deadline in [0, 1]."""
    p = env.default_params
    keys = jax.random.split(jax.random.key(0), 256)
    obs, s = jax.vmap(env.reset, in_axes=(0, None))(keys, p)
    sample = jax.vmap(env.action_space(p).sample)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    for t in range(60):
        k = jax.random.split(jax.random.key(t + 1), 512)
        obs, s, r, _, _, info = step(k[:256], s, sample(k[256:]), p)
        gap = np.asarray(obs[:, 7 * N + 1])
        lat = np.asarray(obs[:, 7 * N + 2])
        assert gap.min() >= -1e-6 and gap.max() <= 1 + 1e-6
        assert lat.min() >= 0 and lat.max() <= 1 + 1e-6
        assert np.all(np.asarray(r) >= -(p.w_ppl + p.w_latency + 2 * p.w_memory + N * p.w_violation + p.w_empty) - 1e-4)


def test_gymnax_wrappers_step_the_environment_under_jit(env):
    from gymnax.wrappers.dm_env import GymnaxToDmEnvWrapper
    from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper

    p = env.default_params.replace(max_steps_in_episode=3)
    a = _action(env, level=1)
    wrapped = LogWrapper(FlattenObservationWrapper(env))

    @jax.jit
    def run(key):
        obs, s = wrapped.reset(key, p)

        def body(s, k):
            obs, s, r, term, trunc, info = wrapped.step(k, s, a, p)
            return s, (r, info["returned_episode"], info["returned_episode_returns"], info["final_observation"])

        return jax.lax.scan(body, s, jax.random.split(key, 7))

    _, (r, ended, returns, final) = run(jax.random.key(0))
    assert np.flatnonzero(np.asarray(ended)).tolist() == [2, 5]
    assert float(returns[2]) == pytest.approx(float(np.sum(r[:3])), rel=1e-5)
    assert final.shape == (7, 7 * N + 4)
    dm = GymnaxToDmEnvWrapper(env)
    ts = dm.reset(jax.random.key(1), p)
    for t in range(3):
        ts = dm.step(jax.random.key(2 + t), ts, a, p)
    assert float(ts.final_observation[7 * N]) == pytest.approx(1.0) and float(ts.observation[7 * N]) == 0.0


def test_memory_violation_is_penalized():
    # GPT-2 small shape with 4 GB devices: the largest emulator (k = 8) does not fit
    env = FedPEATMEC(preset="gpt2-small", calibration=_table("gpt2"), mem_choices_gb=(4.0,))
    p = env.default_params
    _, s = env.reset(jax.random.key(0), p)
    big, small = _action(env, server=0, level=3), _action(env, server=0, level=0)
    _, _, r_big, _, _, info_big = _round(env, s, big, p)
    _, _, r_small, _, _, info_small = _round(env, s, small, p)
    assert int(info_big["violations"]) == N and int(info_small["violations"]) == 0
    assert float(info_big["memory"]) > 1.0
    p2 = p.replace(w_violation=p.w_violation + 2.0)
    _, _, r_big2, _, _, _ = _round(env, s, big, p2)
    assert float(r_big - r_big2) == pytest.approx(2.0 * N, rel=1e-5)
    # failed devices contribute no data: perplexity unchanged
    assert float(info_big["perplexity"]) == pytest.approx(p.ppl0)


def test_round_with_no_participant_is_penalized(env):
    p = env.default_params
    _, s = env.reset(jax.random.key(0), p)
    nobody = _action(env, server=0, participate=np.zeros(N, int))
    _, s1, r, _, _, info = _round(env, s, nobody, p)
    assert bool(info["empty_round"]) and float(info["latency"]) == 0.0
    assert float(info["perplexity"]) == pytest.approx(p.ppl0)
    assert float(r) == pytest.approx(-p.w_ppl - p.w_empty, rel=1e-6)  # the perplexity term is 1 at ppl0
    _, _, r_server, _, _, info_server = _round(env, s, _action(env, server=1, participate=np.zeros(N, int)), p)
    assert not bool(info_server["empty_round"]) and float(info_server["perplexity"]) < p.ppl0
    assert float(r_server) > float(r)


def test_emulator_exchange_only_when_stored_differs(env):
    p = env.default_params.replace(round_deadline=1e6)  # every download completes
    _, s = env.reset(jax.random.key(0), p)
    a = _action(env, server=0, level=2)
    _, s1, _, _, _, info1 = _round(env, s, a, p)
    assert int(info1["exchanges"]) == N
    # same channel and devices, emulator already stored: only the PEFT state travels
    s1 = s1.replace(distance=s.distance, gain=s.gain)
    _, _, _, _, _, info2 = _round(env, s1, a, p)
    peft_bytes = p.q_bits * p.p_peft / 8.0
    assert int(info2["exchanges"]) == 0
    assert float(info2["bytes"]) == pytest.approx(N * 2 * peft_bytes, rel=1e-5)
    assert float(info1["bytes"]) > float(info2["bytes"])
    assert float(info2["latency"]) < float(info1["latency"])
    # a different level is exchanged again
    _, _, _, _, _, info3 = _round(env, s1, _action(env, server=0, level=1), p)
    assert int(info3["exchanges"]) == N


def test_larger_emulator_raises_latency_and_memory(env):
    p = env.default_params.replace(round_deadline=1e6)  # no time capped
    _, s = env.reset(jax.random.key(0), p)
    lat, mem, byt = [], [], []
    for level in range(env.n_levels):
        _, _, _, _, _, info = _round(env, s, _action(env, server=0, level=level), p)
        (
            lat.append(float(info["latency"])),
            mem.append(float(info["memory_peak_bytes"])),
            byt.append(float(info["bytes"])),
        )
    assert lat == sorted(lat) and mem == sorted(mem) and byt == sorted(byt) and lat[0] < lat[-1]


def test_vmap_over_envs_matches_single_steps(env):
    p = env.default_params
    keys = jax.random.split(jax.random.key(0), 6)
    obs, s = jax.vmap(env.reset, in_axes=(0, None))(keys, p)
    acts = jax.vmap(env.action_space().sample)(jax.random.split(jax.random.key(1), 6))
    skeys = jax.random.split(jax.random.key(2), 6)
    out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(skeys, s, acts, p)
    for i in range(6):
        s_i = jax.tree.map(lambda x: x[i], s)
        single = env.step(skeys[i], s_i, acts[i], p)
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(jax.tree.map(lambda x: x[i], out))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-6)
    # unbatched state with batched keys broadcasts
    _, s0 = env.reset(jax.random.key(5), p)
    o, *_ = jax.vmap(env.step, in_axes=(0, None, None, None))(skeys, s0, acts[0], p)
    assert o.shape == (6, 7 * N + 4) and not np.allclose(o[0], o[1])


def test_vmap_over_params():
    env = FedPEATMEC(preset="default", calibration=_table())
    base = env.default_params
    variants = [
        base,
        base.replace(w_latency=3.0, cell_radius=250.0),
        base.replace(bw_weights=jnp.array([1.0, 1.0, 1.0, 8.0])),
    ]
    stacked = jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *variants)
    keys = jax.random.split(jax.random.key(0), 3)
    obs, s = jax.vmap(env.reset)(keys, stacked)
    a = jnp.stack([_action(env, level=1, bw=np.arange(N) % 4)] * 3)
    out = jax.vmap(env.step)(keys, s, a, stacked)
    for i, params in enumerate(variants):
        o_i, s_i = env.reset(keys[i], params)
        np.testing.assert_allclose(obs[i], o_i, rtol=1e-6)
        single = env.step(keys[i], s_i, a[i], params)
        np.testing.assert_allclose(out[0][i], single[0], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(out[2][i], single[2], rtol=2e-6)
    assert float(out[2][0]) != float(out[2][1])


def test_step_batch_is_the_native_layout(env):
    p = env.default_params
    obs, s = env.reset_batch(jax.random.key(0), 5, p)
    assert obs.shape == (7 * N + 4, 5) and s.distance.shape == (N, 5)
    a = env.action_space().sample_batch(jax.random.key(1), 5)
    out = env.step_batch(jax.random.key(2), s, a, p)
    u = env.draw(jax.random.key(2), (5,))
    ref = jax.jit(env.step_with_draws)(u, s, a, p)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    # env b of the batch equals stepping env b on its own with the same draws
    s_b = jax.tree.map(lambda x: x[..., 3], s)
    single = _round(env, s_b, a[:, 3], p)  # (draws of key 0 differ:) compare with b's own draws
    single = _JITTED[env](u[..., 3], s_b, a[:, 3], p)
    np.testing.assert_allclose(single[0], out[0][:, 3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(single[2], out[2][3], rtol=1e-6)


def test_jit_scan_rollout_runs(env):
    p = env.default_params

    @jax.jit
    def rollout(key):
        obs, s = env.reset(key, p)

        def body(c, k):
            s, ret = c
            ka, ks = jax.random.split(k)
            obs, s, r, term, trunc, info = env.step(ks, s, env.action_space().sample(ka), p)
            return (s, ret + r), (trunc, info["latency"])

        (s, ret), (trunc, lat) = jax.lax.scan(body, (s, 0.0), jax.random.split(key, 120))
        return ret, trunc, lat

    ret, trunc, lat = rollout(jax.random.key(0))
    assert np.isfinite(float(ret)) and np.all(np.isfinite(np.asarray(lat)))
    assert np.flatnonzero(np.asarray(trunc)).tolist() == [49, 99]


# -- bad input ---------------------------------------------------------------------------------
def test_no_devices_is_rejected():
    with pytest.raises(ValueError, match="no devices"):
        FedPEATMEC(preset="default", calibration=_table(), n_devices=0)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (1.0, -2.0), (float("nan"), 1.0), ()])
def test_bandwidth_levels_that_cannot_be_normalized(weights):
    with pytest.raises(ValueError, match="bandwidth"):
        FedPEATMEC(preset="default", calibration=_table(), bw_weights=weights)
    with pytest.raises(ValueError, match="bw_levels"):
        make_params("default", _table(), bw_levels=0)


def test_emulator_level_that_does_not_exist():
    with pytest.raises(ValueError, match="do not exist"):
        FedPEATMEC(preset="default", calibration=_table(), emulator_k=(1, 9))
    with pytest.raises(ValueError, match="no entry in the calibration table"):
        FedPEATMEC(preset="default", calibration=_table(k=(1, 2, 4)), emulator_k=(1, 3))
    p = make_params("default", _table())
    with pytest.raises(ValueError, match="do not exist"):
        FedPEATMEC(p.replace(level_k=jnp.array([1.0, 2.0, 3.0, 7.0])))


def test_calibration_for_a_different_model():
    with pytest.raises(ValueError, match="does not match the environment's model.*n_embd"):
        FedPEATMEC(preset="default", calibration=_table("gpt2"))
    with pytest.raises(ValueError, match="adapter"):
        FedPEATMEC(preset="default", calibration=_table("default", l=1, r=1))


def test_other_bad_params():
    with pytest.raises(ValueError, match="unknown EnvParams field"):
        FedPEATMEC(preset="default", calibration=_table(), cell_radus=3.0)
    with pytest.raises(ValueError, match="n_positions"):
        FedPEATMEC(preset="default", calibration=_table(), seq_len=4096.0)
    with pytest.raises(ValueError, match="cell_radius"):
        FedPEATMEC(preset="default", calibration=_table(), min_distance=600.0)
    with pytest.raises(ValueError, match="unknown MEC preset"):
        FedPEATMEC(preset="gpt5", calibration=_table())


def test_missing_default_table_points_to_calibrate(monkeypatch, tmp_path):
    monkeypatch.setattr(calibration, "DEFAULT_TABLE_PATH", tmp_path / "calibration_default.json")
    with pytest.raises(CalibrationMissingError, match="fedpeat calibrate"):
        FedPEATMEC()
    # once a table exists there, it is the default
    _table().save(tmp_path / "calibration_default.json")
    assert FedPEATMEC().default_params.n_devices == N


def test_calibration_table_json_roundtrip_and_validation(tmp_path):
    t = _table("gpt2")
    assert t.synthetic and "synthetic" in t.source
    path = t.save(tmp_path / "t.json")
    assert load_calibration(path) == t
    data = json.loads(path.read_text())
    for mutate, msg in [
        (lambda d: d.update(schema="other"), "schema"),
        (lambda d: d["levels"].reverse(), "strictly increasing"),
        (lambda d: d["levels"][0].update(eta=0.0), "eta"),
        (lambda d: d["levels"][0].update(ppl_inf=0.5), "ppl_inf"),
        (lambda d: d["levels"][-1].update(k=99), "do not exist"),
        (lambda d: d["model"].pop("n_embd"), "n_embd"),
    ]:
        bad = json.loads(json.dumps(data))
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            load_calibration(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(tmp_path / "broken.json")
    with pytest.raises(ValueError):
        CalibrationTable(**{**dataclasses.asdict(t), "ppl0": float("nan")})
