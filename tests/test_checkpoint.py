"""Tests of fedpeat_jax.io.checkpoint: exact round trips, keep-last-N, atomicity, clear errors."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedpeat_jax.fed import drift, server_opt
from fedpeat_jax.io.checkpoint import CheckpointError, CheckpointManager


def _state(seed=0):
    k = jax.random.key(seed)
    params = {"w": jax.random.normal(k, (3, 4)).astype(jnp.bfloat16), "b": jax.random.normal(k, (4,))}
    tx = server_opt.server_optimizer("fedadam", 0.1)
    opt = tx.update(params, tx.init(params), params)[1]  # non-trivial optimizer state
    return {
        "params": params,
        "opt": opt,
        "adam": optax.adam(1e-3).init(params),
        "scaffold": drift.scaffold_init(params, 3),
        "key": jax.random.fold_in(k, 11),
        "client_keys": jax.random.split(jax.random.key(seed + 1), 5),
        "rbg_key": jax.random.key(seed, impl="rbg"),
        "raw_key": jax.random.PRNGKey(seed + 2),
        "round": jnp.int32(17),
        "counts": np.arange(6, dtype=np.int32),
        "py_int": 5,
        "py_float": 0.125,
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y), (type(x), type(y))
        if hasattr(y, "dtype"):
            assert x.dtype == y.dtype
            if jnp.issubdtype(y.dtype, jax.dtypes.prng_key):
                assert jax.random.key_impl(x) == jax.random.key_impl(y)
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


def test_round_trip_is_exact_including_prng_keys(tmp_path):
    state = _state()
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.latest_step() is None
    mgr.save(3, state, {"round": 3, "epsilon": 1.5, "note": "x"})
    restored = mgr.restore(target=_state(seed=99))  # a differently-valued template of the same shape
    _assert_same(restored, state)
    assert mgr.metadata() == {"round": 3, "epsilon": 1.5, "note": "x"}
    # The restored key continues the same random stream.
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (4,)), jax.random.normal(state["key"], (4,)))
    # Abstract targets work too.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, state)
    _assert_same(mgr.restore(3, target=abstract), state)


def test_restore_without_target_rewraps_keys(tmp_path):
    state = {"params": {"w": jnp.arange(3.0)}, "rng": jax.random.key(4), "step": jnp.int32(2)}
    mgr = CheckpointManager(tmp_path)
    mgr.save(0, state)
    out = mgr.restore()
    assert jnp.issubdtype(out["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(state["rng"]))
    np.testing.assert_array_equal(out["params"]["w"], state["params"]["w"])


def test_keep_last_n_and_latest_step(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=2)
    for s in (1, 5, 9):
        mgr.save(s, {"x": jnp.full((2,), s, jnp.float32)}, {"s": s})
    assert mgr.all_steps() == [5, 9] and mgr.latest_step() == 9
    assert sorted(os.listdir(tmp_path)) == ["5", "9"]
    np.testing.assert_array_equal(mgr.restore(5, target={"x": jnp.zeros(2)})["x"], [5.0, 5.0])
    assert mgr.metadata(5) == {"s": 5}
    with pytest.raises(ValueError, match="already exists"):
        mgr.save(9, {"x": jnp.zeros(2)})
    # A fresh manager on the same directory sees the same steps (resume).
    assert CheckpointManager(tmp_path).latest_step() == 9


def test_async_save_is_committed_before_restore(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=2, async_save=True) as mgr:
        for s in range(4):
            mgr.save(s, {"x": jnp.full((50_000,), s, jnp.float32)}, {"s": s})
        out = mgr.restore(target={"x": jnp.zeros(50_000)})
        np.testing.assert_array_equal(out["x"], np.full(50_000, 3.0))
        assert mgr.all_steps() == [2, 3] and mgr.metadata() == {"s": 3}


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"x": jnp.ones(3)}, {"ok": True})
    # What a process killed mid-write leaves behind: a half-written temporary step directory.
    tmp = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00partial")
    assert mgr.latest_step() == 1
    reopened = CheckpointManager(tmp_path)
    assert reopened.all_steps() == [1]
    np.testing.assert_array_equal(reopened.restore(target={"x": jnp.zeros(3)})["x"], np.ones(3))
    assert not tmp.exists()  # cleaned on open


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import async_path
    from fedpeat_jax.io.checkpoint import CheckpointManager

    mgr = CheckpointManager(sys.argv[1])
    mgr.save(1, {"x": jnp.full((1000,), 1.0)}, {"step": 1})

    async def hang(*args, **kwargs):  # everything is written; stop right before the commit rename
        print("COMMITTING", flush=True)
        time.sleep(600)

    async_path.rename = hang
    mgr.save(2, {"x": jnp.full((1000,), 2.0)}, {"step": 2})
    print("UNREACHABLE", flush=True)
    """
)


def test_process_killed_during_save_leaves_previous_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    ckpt = tmp_path / "ckpt"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "COMMITTING", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in os.listdir(ckpt) if "tmp" in p]
    assert leftovers, "the killed save should have left its temporary directory"
    mgr = CheckpointManager(ckpt)
    assert mgr.latest_step() == 1
    np.testing.assert_array_equal(mgr.restore(target={"x": jnp.zeros(1000)})["x"], np.ones(1000))
    assert mgr.metadata() == {"step": 1}


def test_missing_and_corrupt_checkpoints_give_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        CheckpointManager(missing, create=False)
    mgr = CheckpointManager(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*run"):
        mgr.restore()
    mgr.save(1, {"x": jnp.ones(3)})
    mgr.save(2, {"x": jnp.ones(3)})
    with pytest.raises(FileNotFoundError, match=r"step 7 not found .*available steps: \[1, 2\]"):
        mgr.restore(7)
    # Corrupt step 2: its array data disappears.
    state_dir = tmp_path / "run" / "2" / "state"
    for entry in os.listdir(state_dir):
        p = state_dir / entry
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(CheckpointError, match=r"run/2/state"):
        mgr.restore(2, target={"x": jnp.zeros(3)})
    # Step 1 is still fine, and a wrong target is reported against the path too.
    np.testing.assert_array_equal(mgr.restore(1, target={"x": jnp.zeros(3)})["x"], np.ones(3))
    with pytest.raises(CheckpointError, match=r"run/1/state"):
        mgr.restore(1, target={"y": jnp.zeros(3)})
    with pytest.raises(TypeError, match="JSON"):
        mgr.save(3, {"x": jnp.ones(3)}, {"bad": object()})
    # The whole directory vanishes under a live manager.
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="run"):
        mgr.restore()
