"""Your own text and your own weights through the `fedpeat` command line, as a user runs it: a
folder of text files partitioned three ways, a tiny foundation model and tokenizer pretrained on
it, a short `tune` that survives a corrupt newest checkpoint, and every bad input answered with
one line and exit status 2.

Commands run in-process through `cli.main` (what the `fedpeat` script calls) where that is
faithful, and in a subprocess where the process matters (exit status, a second run resuming)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeat_jax import cli

WORDS = (
    "river mill stone meadow lantern harbour orchard winter letter garden candle bridge shepherd "
    "quiet bright slowly under across towards whispered carried remembered gathered"
).split()


def write_books(folder: Path, n_docs: int = 6, paragraphs: int = 14) -> Path:
    """Documents of distinct, repetitive-enough prose (a tokenizer can learn from it)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for d in range(n_docs):
        paras = [" ".join(rng.choice(WORDS, size=rng.integers(18, 30))).capitalize() + "." for _ in range(paragraphs)]
        (folder / f"book{d}.txt").write_text(f"Chapter {d}\n\n" + "\n\n".join(paras) + "\n")
    return folder


def fedpeat(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "fedpeat_jax.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def main(capsys, *args) -> tuple:
    """(exit status, stdout, stderr) of `fedpeat ARGS` run in this process (argparse's own errors
    leave through SystemExit, as from the shell)."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    return write_books(tmp_path_factory.mktemp("own") / "books")


PRETRAIN = ("--preset", "tiny", "--steps", "4", "--chunk", "2", "--warmup", "1", "--seq-len", "32", "--batch", "4")
TUNE = (
    "--rounds",
    "4",
    "--rounds-per-chunk",
    "2",
    "--clients-per-round",
    "2",
    "--local-steps",
    "1",
    "--seq-len",
    "32",
    "--lora-rank",
    "2",
    "--max-eval-windows",
    "8",
    "--max-examples",
    "4",
)


@pytest.fixture(scope="module")
def foundation(books, tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "books-tiny"
    run = fedpeat("pretrain", "--corpus", books, *PRETRAIN, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"foundation model: {out}" in run.stdout
    return out


@pytest.mark.parametrize("partition", ["natural", "iid", "dirichlet"])
def test_data_checks_and_partitions_a_folder(books, partition, capsys):
    rc, out, err = main(
        capsys, "data", "--corpus", books, "--partition", partition, "--n-clients", "7", "--dirichlet-alpha", "1.0"
    )
    assert rc == 0, err
    assert out.startswith("your text: 6 documents, 90 examples")
    clients = 5 if partition == "natural" else 7
    assert f"{clients} {partition} clients" in out and "1 held-out document (" in out
    assert "play" not in out and "speech" not in out and "role" not in out


def test_pretrain_a_foundation_model_and_tokenizer_on_your_text(foundation, books):
    info = json.loads((foundation / "foundation.json").read_text())
    assert info["pretrain"]["text"]["corpus"] == str(books)
    assert len(info["heldout_plays"]) == 1 and info["heldout_plays"][0].startswith("book")
    assert np.isfinite(info["heldout_ppl"]) and info["heldout_ppl"] > 1
    from fedpeat_jax.model import hf

    tokenizer = hf.load_tokenizer(foundation)
    assert len(tokenizer) <= 512  # the tiny preset's vocabulary, learned on the books
    assert len(tokenizer.encode("the shepherd whispered across the meadow")) < 12  # whole words learned from the books


def _corrupt(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")


def _weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_tune_on_your_text_and_resume_from_a_corrupt_newest_checkpoint(foundation, books, tmp_path, capsys):
    run = tmp_path / "run"
    first = fedpeat("tune", "--corpus", books, "--model-dir", foundation, "--out", run, *TUNE)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout[first.stdout.index("{") :])
    assert summary["clients"] == 5 and summary["rounds"] == 4 and len(summary["heldout_documents"]) == 1
    assert np.isfinite(summary["zero_shot_ppl"]) and np.isfinite(summary["plugin_ppl"])
    uninterrupted = _weights(run / "model")
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]

    _corrupt(checkpoints / "4")
    second = fedpeat("tune", "--corpus", books, "--model-dir", foundation, "--out", run, *TUNE)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "warning: checkpoint" in second.stderr and "using step 2" in second.stderr
    resumed = _weights(run / "model")
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # exactly the uninterrupted run
    assert json.loads(second.stdout[second.stdout.index("{") :])["plugin_ppl"] == summary["plugin_ppl"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "4.unreadable"]  # the bad one kept, not deleted

    for step in ("2", "4"):
        _corrupt(checkpoints / step)
    rc, _, err = main(capsys, "tune", "--corpus", books, "--model-dir", foundation, "--out", run, *TUNE)
    assert rc == 2 and err.strip().count("\n") == 0 and "no checkpoint in" in err and "can be read" in err, err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "4.unreadable"]  # nothing deleted


def test_tune_without_held_out_text_reports_no_perplexity(foundation, books, tmp_path, capsys):
    rc, out, err = main(
        capsys,
        "tune",
        "--corpus",
        books,
        "--model-dir",
        foundation,
        "--out",
        tmp_path / "run",
        *TUNE,
        "--heldout-fraction",
        "0",
        "--rounds",
        "2",
    )
    assert rc == 0, err
    summary = json.loads(out[out.index("{") :])
    assert summary["heldout_documents"] == [] and summary["zero_shot_ppl"] is None and summary["plugin_ppl"] is None
    assert "no held-out text" in out and summary["rounds"] == 2


def test_data_errors_stop_before_any_model_is_pretrained(books, tmp_path, capsys):
    cache = tmp_path / "cache"
    rc, _, err = main(
        capsys, "tune", "--corpus", books, "--min-client-size", "100", "--cache-dir", cache, "--preset", "tiny"
    )
    assert (
        rc == 2 and "--min-client-size (TaskConfig.min_client_size): none of the 5 documents has >= 100 examples" in err
    )
    assert not (cache / "foundation").exists()  # nothing was pretrained


# --------------------------------------------------------------------------------------------
# Bad inputs: one line, exit status 2, nothing lost
# --------------------------------------------------------------------------------------------
def _damaged_model(foundation: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "model"
    shutil.copytree(foundation, bad)
    if how == "truncated":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "empty":
        (bad / "model.safetensors").write_bytes(b"")
    elif how == "config":
        (bad / "config.json").write_text("{not json")
    elif how == "tokenizer":
        (bad / "tokenizer.json").write_text("{broken")
    elif how == "no weights":
        (bad / "model.safetensors").unlink()
    return bad


@pytest.mark.parametrize(
    "how, message",
    [
        (
            "truncated",
            r"weight file .*model/model.safetensors cannot be read \(\d[\d,]* bytes; .*\): it is probably truncated or corrupt",
        ),
        ("empty", r"weight file .*model/model.safetensors is empty \(0 bytes\): it is probably truncated or corrupt"),
        ("config", r".*model/config.json is not valid JSON"),
        ("tokenizer", r"the tokenizer in .*model cannot be loaded"),
        ("no weights", r"no GPT-2 weights in .*model.*expected one of \['model.safetensors'"),
    ],
)
def test_bad_weight_files_are_named(foundation, books, tmp_path, how, message, capsys):
    import re

    bad = _damaged_model(foundation, tmp_path, how)
    rc, _, err = main(capsys, "tune", "--corpus", books, "--model-dir", bad, "--out", tmp_path / "run", *TUNE)
    assert rc == 2, err
    assert err.startswith("fedpeat tune: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("fed", {"client_lr": "0.01"}, "fed.client_lr must be a number, got '0.01' (a string)"),
        ("fed", {"dp_clip": "1.0"}, "fed.dp_clip must be null or a number, got '1.0' (a string)"),
        ("task", {"seq_len": "32"}, "task.seq_len must be an integer, got '32' (a string)"),
        ("fed", {"emulator_levels": 2}, "fed.emulator_levels must be a list of integers, got 2 (an integer)"),
        ("peft", {"lora_rank": 4.0}, "peft.lora_rank must be an integer, got 4.0 (a float)"),
        ("fed", {"rounds": True}, "fed.rounds must be an integer, got True (a bool)"),
        (
            "text",
            {"heldout_docs": "book1"},
            "text.heldout_docs must be null or a list of strings, got 'book1' (a string)",
        ),
        ("fed", {"no_such": 1}, "section 'fed' has unknown field(s) ['no_such']"),
        ("task", {"text": {"corpus": "x"}}, "section 'task' has unknown field(s) ['text']"),
    ],
)
def test_config_file_values_of_the_wrong_type_name_the_file_and_field(
    books, tmp_path, section, values, message, capsys
):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({section: values}))
    rc, _, err = main(capsys, "tune", "--config", path, "--corpus", books)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--config {path}" in err and message in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "2.5"], "argument --rounds: expected an integer, got '2.5'"),
        (["--lora-rank", "4.0"], "argument --lora-rank: expected an integer, got '4.0'"),
        (["--secure-aggregation", "maybe"], "argument --secure-aggregation: expected true or false, got 'maybe'"),
        (
            ["--partition", "random"],
            "--partition (TaskConfig.partition) must be one of ('natural', 'iid', 'dirichlet')",
        ),
        (
            ["--n-clients", "500", "--partition", "iid"],
            "--n-clients (TaskConfig.n_clients) (500) is more than the 75 training examples",
        ),
        (["--heldout-docs", "nope"], "--heldout-docs (TextConfig.heldout_docs): unknown document(s) ['nope']"),
        (["--unit", "sentence"], "--unit (TextConfig.unit) must be one of ('paragraph', 'window')"),
        (
            ["--clients-per-round", "9"],
            "--clients-per-round (FedConfig.clients_per_round) (9) is more than the 5 clients that exist",
        ),
    ],
)
def test_bad_options_name_the_option(books, args, message, capsys):
    rc, _, err = main(capsys, "tune", "--corpus", books, "--preset", "tiny", *args)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_files_that_are_not_text(tmp_path, capsys):
    books = write_books(tmp_path / "books", n_docs=3)
    (books / "notes.txt").write_bytes("na\xefve caf\xe9\n".encode("latin-1"))
    rc, _, err = main(capsys, "data", "--corpus", books)
    assert rc == 2 and err.count("\n") == 1, err
    assert (
        f"{books / 'notes.txt'} is not valid utf-8 text" in err
        and "--undecodable (TextConfig.undecodable) to 'skip'" in err
    )
    rc, out, err = main(capsys, "data", "--corpus", books, "--undecodable", "skip")
    assert rc == 0 and f"warning: skipped {books / 'notes.txt'} is not valid utf-8 text" in err and "3 documents" in out
    rc, out, err = main(capsys, "data", "--corpus", books, "--encoding", "latin-1")
    assert rc == 0 and "4 documents" in out
    (books / "notes.txt").write_bytes(b"GIF89a\x00\x01\x02")
    rc, _, err = main(capsys, "data", "--corpus", books)
    assert rc == 2 and "notes.txt is not a text file (it contains NUL bytes)" in err


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "--corpus (TextConfig.corpus): {p} does not exist"),
        (lambda p: p.mkdir(), "--corpus (TextConfig.corpus): no files matching '*.txt' under {p}"),
        (
            lambda p: (p.mkdir(), (p / "a.txt").write_text("\n\n")),
            "--corpus (TextConfig.corpus): no text in the 1 file(s) of {p}",
        ),
    ],
)
def test_missing_or_empty_folders(tmp_path, setup, message, capsys):
    folder = tmp_path / "mine"
    setup(folder)
    rc, _, err = main(capsys, "data", "--corpus", folder)
    assert rc == 2 and message.format(p=folder) in err, err


def test_one_line_from_the_shell_and_debug_shows_the_traceback(books):
    out = fedpeat("data", "--corpus", books, "--min-client-size", "100")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    out = fedpeat("data", "--corpus", books, "--min-client-size", "100", "--debug")
    assert out.returncode == 1 and "Traceback" in out.stderr and "ValueError: TaskConfig.min_client_size" in out.stderr


def test_pretrain_out_never_overwrites_other_files(books, foundation, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, _, err = main(capsys, "pretrain", "--corpus", books, *PRETRAIN, "--out", mine)
    assert rc == 2 and "is not a foundation model directory" in err and (mine / "notes.txt").read_text() == "keep me"
    rc, _, err = main(capsys, "pretrain", "--corpus", books, *PRETRAIN[:-2], "--batch", "2", "--out", foundation)
    assert rc == 2 and "holds a foundation model pretrained with other settings" in err
    rc, out, err = main(
        capsys, "pretrain", "--corpus", books, *PRETRAIN, "--out", foundation
    )  # the same settings: reused
    assert rc == 0 and f"foundation model: {foundation}" in out


def test_fresh_sets_the_old_run_aside(tmp_path):
    from fedpeat_jax.tune import set_aside

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    old = set_aside(run)
    assert not run.exists() and (old / "summary.json").read_text() == "{}" and old.name.startswith("run.old-")
    run.mkdir()
    assert set_aside(run) != old and old.exists()  # a second one in the same second gets its own name
    assert set_aside(tmp_path / "nothing") is None
