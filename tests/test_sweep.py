"""The sweep engine (`fed.sweep`): many runs of one configuration in one compiled program, against
`driver.train` run one at a time (the independent reference), with diverged runs, interruptions,
memory-fitted run chunks and several devices."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import driver, sweep
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedData, FedPEAT
from fedpeat_jax.model import gpt2

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


@pytest.fixture(scope="module")
def heldout():
    rs = np.random.RandomState(1)
    return rs.randint(0, 61, (5, T)).astype(np.int32), np.ones((5, T), np.float32)


def fed(**kw):
    base = dict(
        clients_per_round=3,
        local_steps=2,
        local_batch=2,
        emulator_levels=(1,),
        rounds=4,
        rounds_per_chunk=2,
        log_lora_gap=False,
    )
    return FedConfig(**{**base, **kw})


def hypers(client_lr, server_lr, prox_mu=None, dp_noise=None):
    n = len(client_lr)
    f = lambda x, default: np.asarray(x if x is not None else [default] * n, np.float32)  # noqa: E731
    return Hyper(f(client_lr, 0), f(server_lr, 0), f(prox_mu, 0.01), f(dp_noise, 0.0))


def run_alone(sim, params, data, heldout, seed, hyper):
    """`driver.train` of one run with the same settings (the reference)."""
    changed = sim.replace(
        client_lr=float(hyper.client_lr),
        server_lr=float(hyper.server_lr),
        prox_mu=float(hyper.prox_mu),
        dp_noise=float(hyper.dp_noise),
    )
    return driver.train(changed, params, data, seed=seed, eval_data=heldout, show_progress=False)


def run_of(tree, r):
    return jax.tree.map(lambda x: np.asarray(x)[r], tree)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def relative_distance(a, b) -> float:
    """max over leaves of ||x - y|| / ||y|| (elementwise tolerances do not suit Adam: a coordinate
    whose gradient is at noise level steps by +-lr whichever way the noise falls)."""
    return max(
        float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
        / max(float(np.linalg.norm(np.asarray(y, np.float64))), 1e-12)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def assert_trees_near(a, b, rel: float):
    distance = relative_distance(a, b)
    assert distance <= rel, distance


def assert_histories_close(a, b, rtol=1e-4):
    assert [row["round"] for row in a] == [row["round"] for row in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x.keys(), y.keys())
        for key in x:
            np.testing.assert_allclose(x[key], y[key], rtol=rtol, atol=1e-6, err_msg=f"round {x['round']}: {key}")


@pytest.mark.parametrize("setup", ["fedavg", pytest.param("dp_fedadam", marks=pytest.mark.slow)])
def test_run_i_of_a_cohort_equals_driver_train(params, data, heldout, setup):
    """Every run of a study (3 runs, chunks of 2 runs: the last chunk padded) ends where
    `driver.train` with its seed and hyperparameters ends, with the same per-round rows. Float
    tolerance: the vmapped program sums in another order, which Adam's normalized steps magnify
    on coordinates whose gradient is at noise level, by how much depends on the CPU (weights: up to
    2e-3 of a leaf's norm on AMD EPYC, 9e-3 on Intel Xeon; metrics: 2e-4); the check that another
    run's weights lie over ten times further shows the tolerance still tells runs apart."""
    if setup == "fedavg":
        cfg, hyp = fed(), hypers([1e-3, 3e-2, 1e-2], [1.0, 0.5, 1.0])
    else:  # DP-FedAvg with a FedAdam server: the noise and the epsilon per run come from its own dp_noise
        cfg = fed(dp_clip=0.5, dp_noise=0.0, server_optimizer="fedadam")
        hyp = hypers([1e-2, 1e-2, 3e-2], [1e-2, 3e-2, 1e-2], dp_noise=[0.5, 1.0, 0.0])
    sim = FedPEAT(MODEL, LORA, cfg, n_clients=C)
    seeds = [3, 4, 3]
    result = sweep.run_cohort(sweep.Cohort(sim, params, data, eval_data=heldout), seeds, hyp, run_chunk=2)
    assert result.done and result.run_chunk == 2 and not result.diverged
    for r in (1, 2) if setup == "fedavg" else range(3):  # run 1 from the first chunk, run 2 from the padded second
        seed = seeds[r]
        alone = run_alone(sim, params, data, heldout, seed, run_of(hyp, r))
        assert_trees_near(run_of(result.states.trainable, r), alone.state.trainable, rel=2e-2)
        assert relative_distance(run_of(result.states.trainable, (r + 1) % 3), alone.state.trainable) > 0.2
        assert_histories_close(result.histories[r], alone.history, rtol=1e-3)
        assert "plugin_ppl" in result.histories[r][1] and "plugin_ppl" in result.histories[r][3]
        assert ("epsilon" in result.histories[r][0]) == (setup != "fedavg" and hyp.dp_noise[r] > 0)
    assert (
        np.isfinite(result.zero_shot).all() and result.zero_shot[0] == result.zero_shot[2]
    )  # the same seed starts the same


def test_a_diverged_run_is_stopped_and_the_others_are_unchanged(params, data, heldout):
    """A run with an absurd server learning rate blows up; it is stopped (its last finite state
    kept, its history cut at the round it diverged, the reason reported) and the other runs end
    exactly as in a study without it."""
    sim = FedPEAT(MODEL, LORA, fed(), n_clients=C)
    cohort = sweep.Cohort(sim, params, data, eval_data=heldout)
    with_bad = sweep.run_cohort(cohort, [1, 2, 3], hypers([1e-2, 1e-2, 3e-2], [1.0, 1e38, 1.0]), run_chunk=3)
    without = sweep.run_cohort(cohort, [1, 3], hypers([1e-2, 3e-2], [1.0, 1.0]), run_chunk=3)
    assert list(with_bad.diverged) == [1]
    stop = with_bad.diverged[1]
    assert stop["reason"] == sweep.REASONS[1] and 1 <= stop["round"] <= 2
    assert len(with_bad.histories[1]) == stop["round"] and not np.isfinite(with_bad.histories[1][-1]["update_norm"])
    assert all(
        np.isfinite(x).all() for x in jax.tree.leaves(run_of(with_bad.states.trainable, 1))
    )  # its last finite state
    for r_bad, r_ok in ((0, 0), (2, 1)):
        assert_trees_close(run_of(with_bad.states, r_bad), run_of(without.states, r_ok), rtol=0, atol=0)
        assert with_bad.histories[r_bad] == without.histories[r_ok]


def test_a_killed_cohort_resumes_to_the_uninterrupted_result(params, data, heldout, tmp_path):
    sim = FedPEAT(MODEL, LORA, fed(), n_clients=C)
    cohort = sweep.Cohort(sim, params, data, eval_data=heldout)
    seeds, hyp = [0, 1], hypers([1e-2, 3e-2], [1.0, 1.0])
    whole = sweep.run_cohort(cohort, seeds, hyp, rounds=6)
    first = sweep.run_cohort(cohort, seeds, hyp, rounds=6, ckpt_dir=tmp_path / "ck", stop_after_chunks=1)
    assert not first.done and len(first.histories[0]) == 2
    second = sweep.run_cohort(cohort, seeds, hyp, rounds=6, ckpt_dir=tmp_path / "ck", stop_after_chunks=1)
    assert not second.done and second.chunks_run == 1 and len(second.histories[0]) == 4
    resumed = sweep.run_cohort(cohort, seeds, hyp, rounds=6, ckpt_dir=tmp_path / "ck")
    assert resumed.done and resumed.chunks_run == 1
    assert_trees_close(resumed.states, whole.states, rtol=0, atol=0)
    assert resumed.histories == whole.histories
    np.testing.assert_array_equal(resumed.zero_shot, whole.zero_shot)
    with pytest.raises(ValueError, match="other settings"):
        sweep.run_cohort(cohort, seeds, hypers([1e-2, 1e-2], [1.0, 1.0]), rounds=6, ckpt_dir=tmp_path / "ck")


def test_the_run_chunk_shrinks_to_fit_the_memory_budget(params, data, heldout):
    """With a budget between two and three runs' compiled memory, `fit` picks two runs per call;
    asking for a run chunk that does not fit is refused with the numbers."""
    probe = sweep.Cohort(FedPEAT(MODEL, LORA, fed(), n_clients=C), params, data, eval_data=heldout)
    need = {n: probe.memory(2, n) for n in (2, 3)}
    assert need[3] > need[2] > 0
    budget = (need[2] + need[3]) / 2 / driver.GiB
    cohort = sweep.Cohort(
        FedPEAT(MODEL, LORA, fed(memory_budget_gb=budget), n_clients=C), params, data, eval_data=heldout
    )
    assert cohort.fit(3, 2) == 2
    with pytest.raises(sweep.RunsTooBig, match=r"3 runs at once need .* memory budget .*; about \d+ fit"):
        cohort.fit(3, 2, run_chunk=3)


SHARDED = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax, numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath({test!r})))
    from test_sweep import C, LORA, MODEL, fed, hypers
    from fedpeat_jax.fed import sweep
    from fedpeat_jax.fed.simulation import FedData, FedPEAT
    from fedpeat_jax.model import gpt2
    assert len(jax.devices()) == 4
    params = gpt2.init(jax.random.key(0), MODEL)
    rs = np.random.RandomState(0)
    data = FedData.from_arrays(rs.randint(0, 61, (C, 4, 8)), np.ones((C, 4, 8)), rs.randint(1, 5, C))
    rs = np.random.RandomState(1)
    heldout = rs.randint(0, 61, (5, 8)).astype(np.int32), np.ones((5, 8), np.float32)
    sim = FedPEAT(MODEL, LORA, fed(), n_clients=C)
    res = sweep.run_cohort(sweep.Cohort(sim, params, data, eval_data=heldout, mesh=sweep.run_mesh()), [0, 1, 2, 3, 4],
                           hypers([1e-3, 1e-2, 3e-2, 1e-2, 1e-2], [1.0, 1.0, 1.0, 0.5, 2.0]))
    np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(res.states.trainable)], zero=res.zero_shot,
             ppl=np.array([[h["plugin_ppl"] for h in hist if "plugin_ppl" in h] for hist in res.histories]), chunk=res.run_chunk)
    print("DONE")
    """
)


def test_runs_split_over_four_devices_equal_one_device(params, data, heldout, tmp_path):
    """The run axis sharded over a 4-device "runs" mesh (5 runs: a padded chunk of 8) gives the
    single-device results."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(test=__file__, out=str(tmp_path / "sharded.npz")))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-3000:]
    sim = FedPEAT(MODEL, LORA, fed(), n_clients=C)
    one = sweep.run_cohort(
        sweep.Cohort(sim, params, data, eval_data=heldout),
        [0, 1, 2, 3, 4],
        hypers([1e-3, 1e-2, 3e-2, 1e-2, 1e-2], [1.0, 1.0, 1.0, 0.5, 2.0]),
        run_chunk=2,
    )
    got = np.load(tmp_path / "sharded.npz")
    assert int(got["chunk"]) == 8
    assert_trees_near(
        [got[f"arr_{i}"] for i in range(len(jax.tree.leaves(one.states.trainable)))],
        jax.tree.leaves(one.states.trainable),
        2e-3,
    )
    np.testing.assert_allclose(got["zero"], one.zero_shot, rtol=1e-6)
    np.testing.assert_allclose(
        got["ppl"], [[h["plugin_ppl"] for h in hist if "plugin_ppl" in h] for hist in one.histories], rtol=1e-5
    )


SWEEP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "multiprocess_sweep.py")


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    """A cohort's runs split over 2 processes x 2 CPU devices (jax.distributed, gloo), killed after a
    chunk and resumed from its checkpoint, end as in one process with 4 devices."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.Popen(
        [
            sys.executable,
            SWEEP_SCRIPT,
            "--devices",
            "4",
            "--out",
            str(tmp_path / "single.npz"),
            "--ckpt",
            str(tmp_path / "single"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                SWEEP_SCRIPT,
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
                str(tmp_path / "multi"),
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
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            assert "DONE" in out
    finally:
        for p in [single, *procs]:
            p.kill()
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
