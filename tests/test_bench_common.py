"""benchmarks/common.py: results go where FEDPEAT_RESULTS_DIR says (results of another machine beside
the committed CPU ones), and the tables' machine line names an accelerator when JAX ran on one."""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import common  # noqa: E402


def test_results_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPEAT_RESULTS_DIR", str(tmp_path / "h200"))
    try:
        moved = importlib.reload(common)
        assert moved.RESULTS_DIR == (tmp_path / "h200").resolve()
        assert moved.write_json("probe", {"x": 1}).parent == moved.RESULTS_DIR
    finally:
        monkeypatch.delenv("FEDPEAT_RESULTS_DIR")
        assert importlib.reload(common).RESULTS_DIR == Path(common.__file__).resolve().parent / "results"


def test_hardware_names_the_accelerator():
    cpu = {"cpu_model": "AMD EPYC", "cpus_usable": 2, "jax_backend": "cpu"}
    assert common.hardware(cpu) == "AMD EPYC, 2 usable cores"
    gpu = cpu | {"cpus_usable": 16, "jax_backend": "gpu", "jax_devices": ["cuda:0"], "jax_device_kind": "NVIDIA H200"}
    assert common.hardware(gpu) == "1 x NVIDIA H200 (jax backend gpu); host CPU AMD EPYC, 16 usable cores"
