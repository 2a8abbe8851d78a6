"""Live mode: the MEC environment whose step runs a real FedPEAT round.

Checked against the simulator itself (a live step = FedPEAT.round with the action's devices,
levels and server choice, then the plug-in perplexity) and against the surrogate environment
(radio, latency, memory and bytes are the same physics; only the perplexity differs). One
representative case runs by default; the rest with --runslow.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.mec import FedPEATMEC, encode_action, live_fit, make_params, synthetic_table
from fedpeat_jax.mec.live import LiveConfig, LiveFedPEATMEC
from fedpeat_jax.model import gpt2
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl.live_eval import run_policy

MODEL = GPT2Config(
    vocab_size=61, n_positions=16, n_embd=16, n_layer=6, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)
PEFT = PeftConfig(kind="lora", lora_rank=2, lora_alpha=8.0)
N, KS = 3, (0, 2)
TABLE = synthetic_table(MODEL, k=(0, 1, 2), ppl0=61.0)  # an untrained 61-token model starts near 61


def _task():
    """A learnable task: every client and the server repeat one short token pattern."""
    pattern = np.random.RandomState(0).randint(0, 61, 8)
    tokens = np.tile(pattern, (N, 4, 1))
    counts = np.array([4, 3, 2])
    data = FedData.from_arrays(tokens, np.ones_like(tokens), counts)
    server = (tokens[0], np.ones_like(tokens[0], np.float32))
    heldout = (np.tile(pattern, (2, 1)), np.ones((2, 8), np.float32))
    return data, server, heldout


def _env_params(**overrides):
    settings = dict(
        peft=PEFT,
        n_devices=N,
        emulator_k=KS,
        seq_len=8.0,
        local_steps=2.0,
        batch_size=2.0,
        server_data=4.0,
        max_steps_in_episode=4,
        round_deadline=1e6,
        mem_choices_gb=(1.0,),
    )
    return make_params(MODEL, TABLE, **{**settings, **overrides})


def _sim(server=True):
    fed = FedConfig(
        clients_per_round=N * len(KS),
        level_slots=(N,) * len(KS),
        emulator_levels=KS,
        local_steps=2,
        local_batch=2,
        client_lr=1e-2,
        server_participation=server,
        log_lora_gap=False,
    )
    return FedPEAT(MODEL, PEFT, fed)


WEIGHTS = gpt2.init(jax.random.key(0), MODEL)


@pytest.fixture(scope="module")
def live():
    data, server, heldout = _task()
    return LiveFedPEATMEC(_sim(), WEIGHTS, data, heldout, _env_params(), server_data=server)


def _action(participate, level, server=1):
    return jnp.asarray(encode_action(np.asarray(participate), np.asarray(level), np.zeros(N, int), server=server))


@pytest.mark.slow
def test_reset_starts_from_the_measured_zero_shot_perplexity(live):
    obs, state = live.reset(jax.random.key(0), live.default_params)
    assert float(state.ppl) == pytest.approx(
        float(live.plugin_perplexity(live.default_params.fresh_learner, live.default_params))
    )
    assert float(live.default_params.ppl0) == pytest.approx(float(state.ppl))
    np.testing.assert_array_equal(np.asarray(state.data), [4.0, 3.0, 2.0])  # devices hold their clients' data
    assert obs.shape == live.obs_shape


def test_a_live_step_is_the_simulators_round_with_the_chosen_devices(live):
    _, state = live.reset(jax.random.key(0), live.default_params)
    level = np.array([1, 0, 1])
    action = _action([1, 0, 1], level, server=0)
    _, stepped, reward, _, _, info = live.step(jax.random.key(1), state, action, live.default_params)

    data, _, heldout = _task()
    sim = live.sim
    ref, metrics = jax.jit(
        lambda s: sim.round(
            s,
            WEIGHTS,
            data._replace(levels=jnp.asarray(level)),
            Hyper.from_config(sim.fed),
            live.default_params.server_windows,
            available=jnp.array([True, False, True]),
            server_available=jnp.asarray(False),
        )
    )(state.learner)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
        (stepped.learner.trainable, stepped.learner.opt_state, stepped.learner.round),
        (ref.trainable, ref.opt_state, ref.round),
    )
    nll, count = sim.eval_nll(ref, WEIGHTS, *(jnp.asarray(x) for x in heldout))
    assert float(info["perplexity"]) == pytest.approx(float(np.exp(nll / count)), rel=1e-5)
    assert int(info["clients_trained"]) == 2 == int(metrics.participants)
    assert float(info["perplexity"]) < float(state.ppl)  # two clients' tuning already helps on this task
    assert np.isfinite(float(info["surrogate_perplexity"])) and np.isfinite(float(reward))
    # what the round brought, as the surrogate sees it: devices 1 and 3 (4 + 2 of 9 windows) on k = 2
    assert float(info["k_bar"]) == pytest.approx(2.0)
    assert float(info["data_fraction"]) == pytest.approx(6 / 9)
    assert float(info["server_fraction"]) == 0.0 and float(info["repeat_share"]) == 0.0
    # ... enough for mec.live_fit to redo the env's own surrogate prediction of this round
    record = {k: float(v) for k, v in info.items() if np.ndim(v) == 0}
    data = live_fit.transitions([record], float(state.ppl))
    assert float(live_fit.predict(live.default_params, data)[0]) == pytest.approx(
        float(info["surrogate_perplexity"]), rel=1e-6
    )


@pytest.mark.slow
def test_physics_is_the_surrogate_environments(live):
    surrogate = FedPEATMEC(live.default_params.surrogate())
    action = _action([1, 1, 0], [0, 1, 1])
    _, s_live = live.reset(jax.random.key(3), live.default_params)
    _, s_sur = surrogate.reset(jax.random.key(3))
    _, _, _, _, _, i_live = live.step(jax.random.key(4), s_live, action, live.default_params)
    _, _, _, _, _, i_sur = surrogate.step(jax.random.key(4), s_sur, action)
    for name in ("latency", "memory", "bytes", "violations", "n_participants", "exchanges"):
        assert float(i_live[name]) == pytest.approx(float(i_sur[name]), rel=1e-6), name


@pytest.mark.slow
def test_devices_over_memory_train_nobody(live):
    params = live.default_params.replace(mem_choices=jnp.full_like(live.default_params.mem_choices, 1.0))  # 1 byte each
    _, state = live.reset(jax.random.key(0), params)
    _, stepped, _, _, _, info = live.step(jax.random.key(1), state, _action([1, 1, 1], [1, 1, 1], server=0), params)
    assert int(info["violations"]) == N and int(info["clients_trained"]) == 0
    assert float(info["perplexity"]) == pytest.approx(float(state.ppl), rel=1e-6)  # nothing was learned
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        stepped.learner.trainable,
        state.learner.trainable,
    )


@pytest.mark.slow
def test_episode_end_resets_the_federated_state(live):
    _, state = live.reset(jax.random.key(0), live.default_params)
    step = live.step  # jitted already
    action = _action([1, 1, 1], [1, 1, 1])
    ppls = []
    for t in range(4):  # max_steps_in_episode = 4
        _, state, _, _, truncated, info = step(jax.random.key(10 + t), state, action, live.default_params)
        ppls.append(float(info["perplexity"]))
    assert bool(truncated) and ppls[-1] < ppls[0]
    assert int(state.time) == 0 and int(state.learner.round) == 0
    assert float(state.ppl) == pytest.approx(float(live.default_params.ppl0))


@pytest.mark.slow
def test_stragglers_do_not_train(live):
    params = live.default_params.replace(round_deadline=1e-9)  # nobody makes it, the server neither
    _, state = live.reset(jax.random.key(0), params)
    _, stepped, _, _, _, info = live.step(jax.random.key(1), state, _action([1, 1, 1], [1, 1, 1]), params)
    assert int(info["stragglers"]) == N + 1 and int(info["clients_trained"]) == 0
    assert float(info["perplexity"]) == pytest.approx(float(state.ppl), rel=1e-6)


def test_the_lowered_live_step_holds_no_weights_or_data():
    """The frozen weights, the clients' data and the held-out windows reach the compiled step as
    arguments (LiveParams), never as constants: two environments that differ only in them lower
    to the same program, whose text is far smaller than the weights."""
    data, server, heldout = _task()
    other_weights = gpt2.init(jax.random.key(1), MODEL)
    other_data = data._replace(tokens=(data.tokens + 1) % 61)
    texts = []
    for weights, d in ((WEIGHTS, data), (other_weights, other_data)):
        env = LiveFedPEATMEC(_sim(), weights, d, heldout, _env_params(), server_data=server)
        params = env.default_params
        _, state = env.reset(jax.random.key(0), params)
        lowered = jax.jit(lambda k, s, a, p, env=env: env.step(k, s, a, p)).lower(
            jax.random.key(1), state, _action([1, 0, 1], [1, 0, 1]), params
        )
        texts.append(lowered.as_text())
    assert texts[0] == texts[1]
    # no constant in the program is as large as the smallest weight matrix (hex constants: 2 characters a byte)
    largest_constant = max((len(h) // 2 for h in re.findall(r'dense<"0x([0-9A-Fa-f]+)"', texts[0])), default=0)
    assert largest_constant < min(x.nbytes for x in jax.tree.leaves(WEIGHTS) if x.ndim == 2)


def test_bad_live_setups_are_refused():
    data, server, heldout = _task()
    with pytest.raises(ValueError, match="one client per device"):
        LiveFedPEATMEC(_sim(), WEIGHTS, data, heldout, _env_params(n_devices=2), server_data=server)
    with pytest.raises(ValueError, match="emulator_levels"):
        LiveFedPEATMEC(_sim(), WEIGHTS, data, heldout, _env_params(emulator_k=(0, 1)), server_data=server)
    with pytest.raises(ValueError, match="server_data"):
        LiveFedPEATMEC(_sim(server=False), WEIGHTS, data, heldout, _env_params(), server_data=server)
    with pytest.raises(ValueError, match="n_devices must be >= 1"):
        LiveConfig(n_devices=0)


@pytest.mark.slow
def test_a_trained_controller_loads_and_runs_live(live, tmp_path):
    from fedpeat_jax.rl.controller import ControllerConfig, load_policy, train_controller
    from fedpeat_jax.rl.sabppo import SABPPOConfig

    cfg = SABPPOConfig(
        num_envs=4, num_steps=4, total_timesteps=4 * 4 * 2, num_minibatches=2, update_epochs=1, hidden_sizes=(8,)
    )
    params = _env_params()  # the surrogate env with the live env's layout
    # One checkpointed chunk is enough to load a policy (and skips the baseline evaluation).
    train_controller(
        cfg,
        params,
        tmp_path / "ctl",
        controller=ControllerConfig(seeds=1, chunk_updates=1, eval_episodes=4),
        show_progress=False,
        stop_after_chunks=1,
    )
    policy, _, _ = load_policy(tmp_path / "ctl", live)
    records = run_policy(live, policy, rounds=2, show_progress=False)
    greedy = run_policy(live, B.greedy_policy(live), rounds=2, show_progress=False)
    for r in records + greedy:
        assert {"round", "reward", "perplexity", "surrogate_perplexity", "latency", "clients_trained"} <= set(r)
        assert np.isfinite(r["reward"]) and r["perplexity"] > 0


def test_the_live_workload_is_the_calibrated_one():
    """The surrogate a live controller is trained on was fitted by `fedpeat calibrate`: the live
    rounds must be the same workload, measured on the same held-out windows, or the real and the
    surrogate perplexities are on different scales."""
    from fedpeat_jax.mec.calibrate import CalibrateConfig

    live, cal = LiveConfig(), CalibrateConfig()
    assert live.eval_windows == cal.max_eval_windows
    assert live.n_devices == cal.population
    for name in ("seq_len", "max_examples", "server_windows", "local_steps", "local_batch", "client_lr", "lora_rank"):
        assert getattr(live, name) == getattr(cal, name), name
    assert live.lora_alpha == cal.lora_alpha
