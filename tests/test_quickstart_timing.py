"""scripts/quickstart_timing.py's load record: its process-tree CPU count includes children (live or
reaped), and a run during which other processes took the CPU is flagged as shared."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart_timing.py"


@pytest.fixture(scope="module")
def timing():
    spec = importlib.util.spec_from_file_location("quickstart_timing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_process_tree_count_includes_a_reaped_child(timing):
    before = timing.tree_ticks(os.getpid())
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    used = (timing.tree_ticks(os.getpid()) - before) / timing.HZ
    assert used >= 0.45  # the child's own CPU time, now in this process's cutime


def test_a_run_is_flagged_shared_when_others_used_the_cpu(timing):
    quiet = [{"t": i, "own_cores": 1.9, "other_cores": 0.02, "loadavg_1": 2.0} for i in range(10)]
    busy = quiet[:5] + [dict(s, other_cores=1.0) for s in quiet[5:]]
    assert timing.summarize_load(quiet, 5.0)["shared_cpu"] is False
    summary = timing.summarize_load(busy, 5.0)
    assert summary["shared_cpu"] is True and summary["other_busy_fraction"] == 0.5
    assert "SHARED" in timing.load_line({**summary, "own_cpu_seconds": 95.0})
    assert "quiet" in timing.load_line({**timing.summarize_load(quiet, 5.0), "own_cpu_seconds": 95.0})
    assert timing.summarize_load([], 5.0)["shared_cpu"] is None
