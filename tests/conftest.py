"""Shared pytest setup: `--runslow` enables the tests marked `slow` (the marker is registered in
pyproject.toml); without it they are skipped, so the default run stays fast.

The tests compile hundreds of tiny programs that then run for milliseconds, so compiling is most
of the suite's time: XLA's expensive optimizations are off (`JAX_DISABLE_MOST_OPTIMIZATIONS`, an
environment variable read when jax is first imported, after this file, and inherited by the
subprocesses the tests start): two of the heaviest tests took 43 s instead of 67 s. The programs compute the same
values (tests compare against references with tolerances, or a program with itself). For the same
reason XLA:CPU's older loop emitters are used (`--xla_cpu_use_fusion_emitters=false` in XLA_FLAGS):
they compile these programs in about half the CPU time of the default fusion emitters (three of
the heavy tests: 55 -> 30 CPU-s). Run with `JAX_DISABLE_MOST_OPTIMIZATIONS=0
XLA_FLAGS=--xla_cpu_use_fusion_emitters=true` to test what users and benchmarks get.
(A persistent compilation cache was tried too: it hit too rarely to pay for writing it.)
"""

import os

import pytest

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


# Files whose tests take minutes, longest first. They are collected first, so that under
# `-n 2 --dist loadfile` (the README's command) they start at once and the other worker runs the
# many short files meanwhile, instead of one of them starting last and running alone.
LONG_FILES = (
    "test_quickstart.py",
    "test_fed.py",
    "test_sweep.py",
    "test_own_data_cli.py",
    "test_sweep_cli.py",
    "test_calibrate.py",
    "test_mec_live.py",
    "test_baselines.py",
    "test_foundation.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below (not files by test count)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
