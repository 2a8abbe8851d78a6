"""`fedpeat sweep` on a controller spec (`kind: controller`): a tiny SABPPO study through the
command writes its results; run i equals a single `trainer.train` with the same seed and
hyperparameters; a study killed and resumed equals the uninterrupted one; bad specs are refused
with one line naming the field, before anything compiles.

The environment is a 2-device, 10-round MEC preset on the SYNTHETIC table (learning machinery,
not FedPEAT numbers); the network is the MLP, whose vmapped runs stay within float noise of single
runs (tests/test_sabppo.py says why the device network may not)."""

import csv
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from fedpeat_jax import cli
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.mec import FedPEATMEC, preset_params, synthetic_table
from fedpeat_jax.rl import baselines as B
from fedpeat_jax.rl import sabppo
from fedpeat_jax.sweep import controller
from fedpeat_jax.sweep import spec as spec_lib

ENV = {"preset": "default", "calibration": "synthetic", "n_devices": 2, "max_steps_in_episode": 10}
SABPPO = dict(num_envs=8, num_steps=10, total_timesteps=320, num_minibatches=2, update_epochs=2, network="mlp")
EVAL = {"chunk_updates": 2, "eval_episodes": 16, "rule_search_episodes": 0}


def write_spec(tmp_path, name="ctl", **fields):
    spec = {
        "kind": "controller",
        "name": name,
        "base": {"env": ENV, "sabppo": {**SABPPO, "hidden_sizes": [16, 16]}, "controller": EVAL},
        "seeds": [0, 3],
        "axes": {"lr": [1e-3, 3e-3], "w_latency": [0.5, 1.0]},
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fedpeat(capsys, *args) -> tuple:
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run once through the command: (spec path, study folder)."""
    root = tmp_path_factory.mktemp("ctl")
    path = write_spec(root)
    out = root / "study"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == 0
    return path, out


def test_a_tiny_controller_study_through_the_command_writes_its_results(study, capsys):
    path, out = study
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    runs = 4 * 2  # (lr x w_latency) x seeds
    assert len({r["run"] for r in rows}) == runs and len(rows) == runs * 3  # before training, after updates 2 and 4
    assert {r["env_steps"] for r in rows} == {"0", "160", "320"} and {r["status"] for r in rows} == {"ok"}
    assert {"lr", "ent_coef", "w_latency", "seed", "eval_return", "train_return", "best_baseline_return"} <= set(
        rows[0]
    )
    assert {r["lr"] for r in rows} == {"0.001", "0.003"} and {r["seed"] for r in rows} == {"0", "3"}
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "controller" and len(results["summary"]) == 1
    best = results["summary"][0]["best"]
    finals = [float(r["eval_return"]) for r in rows if r["env_steps"] == "320"]
    assert best["mean"] == pytest.approx(max(np.mean(finals[i : i + 2]) for i in range(0, runs, 2)))  # maximized
    assert {b["env"]["w_latency"] for b in results["baselines"]} == {0.5, 1.0}  # per environment setting
    report = (out / "report.md").read_text()
    assert "## Group 0: base" in report and "**Best: lr=" in report and "higher is better" in report
    for plot in ("final_vs_axes.png", "best_curves.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG" and f"plots/{plot}" in report
    assert list((out / "tensorboard" / "run-0000").glob("events.out.tfevents.*"))
    # Rerunning the finished study trains nothing and reports the same.
    rc, stdout, err = fedpeat(capsys, "sweep", path, "--out", out)
    assert rc == 0, err
    assert "best settings (seed mean ± standard error):" in stdout and "SABPPO updates" not in err
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


def test_run_i_equals_a_single_trainer_run_with_its_seed_and_hyperparameters(study):
    """Run 5 (lr 3e-3, w_latency 0.5, seed 3) against `trainer.train` built here from the same
    numbers: the final network parameters, the last training return and the evaluated return."""
    _, out = study
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["run"] == 5]
    assert (rows[0]["lr"], rows[0]["w_latency"], rows[0]["seed"]) == (3e-3, 0.5, 3)
    params = preset_params(
        "default",
        calibration=synthetic_table(GPT2Config.preset("default")),
        n_devices=2,
        max_steps_in_episode=10,
        w_latency=0.5,
    )
    env = FedPEATMEC(params)
    trainer = sabppo.make_trainer(sabppo.SABPPOConfig(**SABPPO, hidden_sizes=(16, 16), lr=3e-3), env, params)
    state, metrics = jax.jit(trainer.train)(jax.random.key(3), trainer.default_hparams())

    with CheckpointManager(out / "checkpoints" / "g000", create=False) as manager:
        assert manager.latest_step() == 4
        saved = manager.restore()
    mine, ref = jax.tree.leaves(saved["params"]), jax.tree.leaves(state.params)
    assert len(mine) == len(ref)
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(np.asarray(a)[5], np.asarray(b), rtol=1e-4, atol=1e-5)
    ret = np.asarray(metrics["episode_return"])
    assert rows[-1]["train_return"] == pytest.approx(float(ret[np.isfinite(ret)][-1]), rel=1e-4)
    evaluation = B.evaluate(B.sabppo_policy(trainer, state), env, params, episodes=16, rng=12345)
    assert rows[-1]["eval_return"] == pytest.approx(evaluation["return_mean"], rel=1e-4, abs=1e-4)


def test_a_killed_controller_study_resumes_to_the_uninterrupted_result(study, tmp_path):
    path, out = study
    spec = spec_lib.load(path)
    quiet = dict(show_progress=False, log=lambda *_: None)
    part = controller.run(spec, tmp_path / "killed", stop_after_chunks=1, **quiet)
    assert not part["done"] and (tmp_path / "killed" / "checkpoints" / "g000" / "2").is_dir()
    resumed = controller.run(spec, tmp_path / "killed", **quiet)
    assert resumed["done"]
    whole = json.loads((out / "results.json").read_text())["rows"]
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["rows"] == whole


BAD = [
    ({"axes": {"lrr": [0.1]}}, "axes.lrr: unknown hyperparameter"),
    ({"axes": {"num_envs": [8, 16]}}, "axes.num_envs: unknown hyperparameter.*put it under structure"),
    ({"axes": {"lr": []}}, "axes.lr: the axis is empty"),
    ({"axes": {"lr": [-1e-3, 1e-3]}}, "axes.lr: SABPPOConfig.lr must be finite and > 0, got -0.001"),
    ({"axes": {"gamma": {"low": 0.9, "high": 1.5, "num": 3}}}, "axes.gamma: SABPPOConfig.gamma must be in \\[0, 1\\]"),
    ({"axes": {"cell_radius": [5.0]}}, "axes.cell_radius: 5 cannot run with base: invalid EnvParams: cell_radius"),
    ({"base": {"env": {**ENV, "n_devise": 3}}}, "base.env: unknown field\\(s\\) \\['n_devise'\\]"),
    ({"base": {"env": {**ENV, "preset": "gpt5"}}}, "base.env.preset: unknown MEC preset 'gpt5'"),
    ({"base": {"sabppo": {**SABPPO, "num_minibatches": 3}}}, "base.sabppo.num_minibatches \\(3\\) must divide"),
    ({"base": {"controller": {"seeds": 3}}}, "base.controller: unknown field\\(s\\) \\['seeds'\\] \\(seeds are set by"),
    ({"structure": {"sabppo.lr": [1e-3]}}, "structure.sabppo.lr: lr is traced: put it under axes"),
    ({"structure": {"env.n_devices": [2, 0]}}, "structure env.n_devices=0: cannot run: invalid EnvParams: n_devices"),
    ({"structure": {"peft.lora_rank": [2]}}, "structure.peft.lora_rank: unknown setting; use sabppo.FIELD"),
    ({"sampler": "optuna", "trials": 2}, "sampler: optuna runs federated studies only"),
    ({"kind": "robot"}, "kind: must be one of \\('federated', 'controller'\\)"),
    ({"model": {"preset": "tiny"}}, "unknown field\\(s\\) \\['model'\\]; a controller spec has"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_controller_specs_fail_before_compiling_naming_the_field(tmp_path, capsys, monkeypatch, fields, message):
    def never(*args, **kwargs):
        raise AssertionError("a trainer was built (compiling) for a bad spec")

    monkeypatch.setattr(sabppo, "make_trainer", never)
    path = write_spec(tmp_path, "bad", **fields)
    rc, _, err = fedpeat(capsys, "sweep", path, "--out", tmp_path / "out")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedpeat sweep: error: spec {path}: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_controller_axes_structure_and_overrides():
    """The example spec with overrides: a structure axis, an environment axis by its dotted name."""
    spec = spec_lib.load(
        "examples/sweep_controller.yaml",
        [
            "seeds=2",
            "structure.sabppo.hidden_sizes=[[32, 32], [64, 64]]",
            "axes.env.w_latency=[0.5, 2.0]",
            "axes.lr={low: 1.0e-4, high: 1.0e-2, log: true, num: 3}",
        ],
    )
    assert spec.objective == "eval_return" and spec.seeds == (0, 1)
    assert spec.axis_names == ("lr", "ent_coef", "w_latency") and spec.settings_per_group() == 3 * 3 * 2
    assert [g.sabppo.hidden_sizes for g in spec.groups()] == [(32, 32), (64, 64)]
    assert spec.axes[0].grid() == (1e-4, 1e-3, 1e-2)
    assert controller.layout(spec).minimize is False and controller.layout(spec).log_axes == ("lr",)
    params = spec.env_params({"w_latency": 2.0})
    assert float(jnp.asarray(params.w_latency)) == 2.0
