"""`fedpeat sweep` as a user runs it: a spec file on a folder of text and a tiny local model; the
results it writes; an Optuna study killed and resumed; and bad specs refused with one line
naming the field, before anything compiles."""

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from fedpeat_jax import cli
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.fed import sweep as engine
from fedpeat_jax.sweep import federated, search
from fedpeat_jax.sweep import spec as spec_lib

WORDS = (
    "river mill stone meadow lantern harbour orchard winter letter garden candle bridge shepherd "
    "quiet bright slowly under across towards whispered carried remembered gathered"
).split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of six documents and a tiny random GPT-2 with a BPE tokenizer trained on it."""
    from fedpeat_jax.data.tokenizer import train_bpe_tokenizer
    from fedpeat_jax.model import gpt2, hf

    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    books, texts = root / "books", []
    books.mkdir()
    for d in range(6):
        paras = [" ".join(rng.choice(WORDS, size=rng.integers(18, 30))).capitalize() + "." for _ in range(14)]
        texts += paras
        (books / f"book{d}.txt").write_text(f"Chapter {d}\n\n" + "\n\n".join(paras) + "\n")
    model = GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=5, n_head=2)
    hf.save_pretrained(
        gpt2.init(jax.random.key(0), model), model, root / "model", tokenizer=train_bpe_tokenizer(texts, vocab_size=300)
    )
    return root


def write_spec(world: Path, name: str, **fields) -> Path:
    spec = {
        "name": name,
        "model": {"dir": str(world / "model")},
        "base": {
            "text": {"corpus": str(world / "books")},
            "task": {"partition": "iid", "n_clients": 8, "seq_len": 32, "max_examples": 4, "max_eval_windows": 8},
            "peft": {"lora_rank": 2},
            "fed": {
                "rounds": 2,
                "rounds_per_chunk": 1,
                "clients_per_round": 3,
                "local_steps": 1,
                "emulator_levels": [1],
            },
        },
        "seeds": 2,
        "axes": {"client_lr": {"low": 1e-3, "high": 1e-1, "log": True, "num": 2}},
        **fields,
    }
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fedpeat(capsys, *args) -> tuple:
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_tiny_study_through_the_command_writes_its_results(world, tmp_path, capsys):
    path = write_spec(world, "tiny", structure={"peft.lora_rank": [2, 4]})
    rc, out, err = fedpeat(capsys, "sweep", path, "--out", tmp_path / "study", "--set", "axes.server_lr=[0.5, 1.0]")
    assert rc == 0, err
    study = tmp_path / "study"
    assert "best settings (seed mean ± standard error):" in out and f"report: {study / 'report.md'}" in out
    with open(study / "results.csv") as f:
        rows = list(csv.DictReader(f))
    runs = 2 * 4 * 2  # groups x (client_lr x server_lr) x seeds
    assert len({r["run"] for r in rows}) == runs and len(rows) == runs * 3  # rounds 0, 1 and 2
    assert {
        "peft.lora_rank",
        "client_lr",
        "server_lr",
        "prox_mu",
        "dp_noise",
        "seed",
        "round",
        "plugin_ppl",
        "loss",
        "bytes_up",
        "bytes_down",
        "status",
    } <= set(rows[0])
    assert {r["client_lr"] for r in rows} == {"0.001", "0.1"} and {r["server_lr"] for r in rows} == {"0.5", "1.0"}
    assert all(float(r["plugin_ppl"]) > 1 for r in rows) and {r["status"] for r in rows} == {"ok"}
    results = json.loads((study / "results.json").read_text())
    assert len(results["runs"]) == runs and len(results["summary"]) == 2
    assert len(results["runs"][0]["history"]) == 2 and results["runs"][0]["history"][0]["round"] == 1
    report = (study / "report.md").read_text()
    assert (
        "## Group 0: peft.lora_rank=2" in report
        and "## Group 1: peft.lora_rank=4" in report
        and "**Best: client_lr=" in report
    )
    for plot in ("final_vs_axes.png", "best_curves.png"):
        assert (study / "plots" / plot).read_bytes()[:4] == b"\x89PNG" and f"plots/{plot}" in report
    events = list((study / "tensorboard" / "run-0000").glob("events.out.tfevents.*"))
    assert events and any(b"hparams" in e.read_bytes() for e in events)
    # Rerunning the finished study recomputes nothing and reports the same.
    rc, out2, err = fedpeat(capsys, "sweep", path, "--out", study, "--set", "axes.server_lr=[0.5, 1.0]")
    assert rc == 0, err
    assert json.loads((study / "results.json").read_text())["rows"] == results["rows"]
    # Another spec in the same folder is refused.
    rc, _, err = fedpeat(capsys, "sweep", path, "--out", study)
    assert rc == 2 and "holds a study of another spec" in err and len(err.strip().splitlines()) == 1


def test_an_optuna_study_killed_and_resumed_equals_the_uninterrupted_study(world, tmp_path):
    """Optuna's TPE in batches of 2 trials (ask, run vmapped, tell): a study stopped in the middle
    of its second batch and resumed asks the same trials and ends with the same rows."""
    path = write_spec(
        world,
        "tpe",
        sampler="optuna",
        trials=4,
        batch=2,
        seeds=1,
        axes={"client_lr": {"low": 1e-3, "high": 1e-1, "log": True}, "server_lr": [0.5, 1.0]},
    )
    spec = spec_lib.load(path)
    quiet = dict(show_progress=False, log=lambda *_: None)
    whole = federated.run(spec, tmp_path / "whole", **quiet)
    assert whole["done"] and len(whole["records"]) == 4 and [r["trial"] for r in whole["records"]] == [0, 1, 2, 3]
    part = federated.run(
        spec, tmp_path / "killed", stop_after_chunks=3, **quiet
    )  # batch 1 (2 chunks) and half of batch 2
    assert not part["done"]
    assert (tmp_path / "killed" / "cohorts" / "g000-b001.asked.json").is_file()
    resumed = federated.run(spec, tmp_path / "killed", **quiet)
    assert resumed["done"]

    def strip(rows):
        return [{k: v for k, v in r.items()} for r in rows]

    assert strip(resumed["rows"]) == strip(whole["rows"])
    asked = [r["hyper"]["client_lr"] for r in whole["records"]]
    assert len(set(asked)) == 4 and all(1e-3 <= a <= 1e-1 for a in asked)


BAD = [
    ({"axes": {"client_lrr": [0.1]}}, "axes.client_lrr: unknown hyperparameter"),
    ({"axes": {"lora_rank": [2, 4]}}, "axes.lora_rank: unknown hyperparameter.*put it under structure"),
    ({"axes": {"client_lr": []}}, "axes.client_lr: the axis is empty"),
    ({"axes": {"server_lr": {"low": 1.0, "high": 0.5, "num": 2}}}, "axes.server_lr: the range is empty"),
    ({"axes": {"client_lr": [-0.01, 0.1]}}, "axes.client_lr: FedConfig.client_lr must be > 0, got -0.01"),
    ({"axes": {"prox_mu": [0.0, 0.1]}}, "axes.prox_mu: FedProx's mu acts only with fed.algorithm 'fedprox'"),
    (
        {"structure": {"peft.lora_rank": [2, 64]}},
        "structure peft.lora_rank=64: cannot run: .*lora_rank \\(64\\) is larger than the model width",
    ),
    (
        {"structure": {"emulator_k": [1, 5]}},
        "structure fed.emulator_levels=\\[5\\]: cannot run: .*larger than the model's middle",
    ),
    (
        {"structure": {"fed.algorithm": ["fedavg", "scaffold"]}},
        "structure.fed.algorithm: FedConfig.algorithm='scaffold' assumes plain SGD",
    ),
    (
        {"structure": {"fed.server_optimizer": ["fedavg", "fedadam"]}, "--set": "base.fed.lora_aggregation=exact"},
        "structure.fed.server_optimizer: FedConfig.lora_aggregation='exact' .*combines only with server_optimizer='fedavg'",
    ),
    (
        {"structure": {"peft.kind": ["lora", "adapter"], "fed.lora_aggregation": ["mean", "exact"]}},
        "structure peft.kind=adapter, fed.lora_aggregation=exact: cannot run: .*needs PeftConfig.kind='lora'",
    ),
    (
        {"structure": {"fed.clients_per_round": [3, 50]}},
        "structure fed.clients_per_round=50: cannot run: .*more than the 8 clients",
    ),
    (
        {"structure": {"task.n_clients": [4, 8]}},
        "structure.task.n_clients: unknown setting \\(task and text settings are shared",
    ),
    (
        {"sampler": "optuna", "trials": 4, "batch": 8, "axes": {"client_lr": [0.01, 0.1]}},
        "batch: trials per Optuna batch must be an integer in 1..trials",
    ),
    ({"sampler": "random"}, "trials: sampler random needs trials"),
    ({"seeds": 0}, "seeds: must be >= 1"),
    ({"learning_rate": 0.1}, "unknown field\\(s\\) \\['learning_rate'\\]"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_specs_fail_before_compiling_naming_the_field(world, tmp_path, capsys, monkeypatch, fields, message):
    def never(*args, **kwargs):
        raise AssertionError("a cohort was built (compiling) for a bad spec")

    monkeypatch.setattr(engine.Cohort, "__init__", never)
    fields = dict(fields)
    sets = ["--set", fields.pop("--set")] if "--set" in fields else []
    path = write_spec(world, "bad", **fields)
    rc, _, err = fedpeat(capsys, "sweep", path, "--out", tmp_path / "out", *sets)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedpeat sweep: error: spec {path}: "), err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_an_optuna_batch_larger_than_memory_allows_is_refused_before_anything_runs(
    world, tmp_path, capsys, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(engine, "run_cohort", never)
    path = write_spec(
        world, "big", sampler="optuna", trials=8, batch=8, axes={"client_lr": {"low": 1e-3, "high": 1e-1, "log": True}}
    )
    rc, _, err = fedpeat(capsys, "sweep", path, "--out", tmp_path / "out", "--set", "base.fed.memory_budget_gb=0.0005")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "batch: 8 trials x 2 seeds = 16 runs at once need" in err and "memory budget of 0.00 GiB" in err
    assert not (tmp_path / "out" / "spec.json").exists()


def test_axes_overrides_and_samplers(world):
    path = write_spec(
        world, "axes", axes={"client_lr": {"low": 1e-4, "high": 1e-2, "log": True, "num": 3}, "server_lr": [1.0, 2.0]}
    )
    spec = spec_lib.load(path, ["seeds=[3, 5]", "base.fed.rounds=7", "structure.fed.aggregation=[mean, median]"])
    assert (
        spec.seeds == (3, 5) and spec.fed.rounds == 7 and spec.structure == (("fed.aggregation", ("mean", "median")),)
    )
    assert spec.axes[0].grid() == (1e-4, 1e-3, 1e-2)
    points = search.grid(spec)
    assert len(points) == 6 and points[0] == {"client_lr": 1e-4, "server_lr": 1.0}
    drawn = spec_lib.load(path, ["sampler=random", "trials=5", "axes.client_lr={low: 1.0e-4, high: 1.0e-2, log: true}"])
    settings = search.random(drawn)
    assert settings == search.random(drawn) and len(settings) == 5  # seeded: the same draws every time
    assert all(1e-4 <= s["client_lr"] <= 1e-2 and s["server_lr"] in (1.0, 2.0) for s in settings)
    with pytest.raises(spec_lib.SpecError, match="--set seeds: expected KEY=VALUE"):
        spec_lib.load(path, ["seeds"])
    with pytest.raises(spec_lib.SpecError, match="axes.client_lr.num: sampler random draws from the whole range"):
        spec_lib.load(path, ["sampler=random", "trials=5"])
