"""The examples run for a few updates, against the public API only (imported as a user would)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (flax modules) resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_purejaxrl_ppo_example_trains():
    out = _load("purejaxrl_ppo").main(["--total-timesteps", str(16 * 50 * 3), "--num-envs", "16", "--seeds", "2"])
    returns = out["returns"]
    assert returns.shape == (2, 3) and np.all(np.isfinite(returns))


def test_torch_vector_env_example_trains():
    out = _load("torch_ppo_vector_env").main(["--total-timesteps", str(8 * 50 * 2), "--num-envs", "8"])
    assert len(out["returns"]) == 16 and np.all(np.isfinite(out["returns"]))  # every env finished 2 episodes
