"""Many federated runs of one configuration in one compiled program: the engine of `fedpeat sweep`.

A *cohort* is a set of runs that share every static setting (one `FedPEAT`: model, PEFT module,
FedConfig) and differ in their seed and their traced hyperparameters (`Hyper`). `run_cohort`
advances all of them `FedConfig.rounds_per_chunk` rounds at a time:

  * a few compiled programs, each `jax.vmap` over runs: the start, the rounds of a chunk (in a
    `lax.scan`, with a finiteness check; one per chunk length) and the held-out evaluation (the
    same program before training and at every chunk end); the frozen weights, the client data and
    the held-out windows are shared arguments (`in_axes=None`), never constants of a program.
    They are compiled once per cohort configuration, concurrently, before anything runs;
  * the run axis in calls of `run_chunk` runs (`Cohort.fit`): the fewest equal calls of at most
    `runs_per_call` runs (on a CPU a few per device, where more buy no throughput; on an
    accelerator all), fewer while XLA's memory analysis of the compiled programs says they do not
    fit the memory budget; a multiple of the devices, split over a 1-D "runs" mesh spanning every
    device of every process (runs never communicate);
  * a run whose update, training loss, state or held-out loss stops being finite is stopped: it
    keeps its last finite state and its history up to the round it diverged, and leaves the run
    axis (later chunks pack only the live runs); the other runs are independent lanes of the
    vmap and do not notice;
  * after every chunk of rounds the states, metrics and divergence records of all runs are
    checkpointed atomically; a cohort killed at any moment resumes from its last checkpoint and
    ends as an uninterrupted one (every random draw derives from (seed, round)).

Run i of a cohort equals `driver.train` with the same seed and hyperparameters (same rounds, same
evaluation points, rows of the same form).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fedpeat_jax.fed import driver, sharding
from fedpeat_jax.fed.client import Hyper
from fedpeat_jax.fed.simulation import FedData, FedPEAT, ServerState
from fedpeat_jax.fed.sweep_record import REASONS, chunk_lengths, empty_record, fold_chunk, histories
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.io.fingerprint import fingerprint as settings_fingerprint
from fedpeat_jax.io.loop import restore_latest, run_chunks

RUNS = "runs"  # the mesh axis the run axis is split over
CPU_RUNS_PER_DEVICE = 8  # runs per call on a CPU device (see `runs_per_call`)


def run_mesh(devices=None):
    """A 1-D mesh named "runs" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (RUNS,), axis_types=(AxisType.Auto,), devices=devices)


def place(tree, mesh=None):
    """Shared arguments (weights, data, held-out windows) on the device, or replicated over the
    mesh; arrays already placed so are kept, so cohorts of several groups share one copy."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    whole = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == whole:
            return x
        return sharding.replicate(x, mesh)

    return jax.tree.map(put, tree)


# Compiled programs by everything they depend on (configuration, shapes, devices, runs, rounds):
# the weights and data are arguments, so cohorts of the same configuration share them.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
MAX_COMPILED = 32


class RunsTooBig(ValueError):
    """The compiled program of `runs` runs at once does not fit the memory budget."""

    def __init__(self, message: str, runs: int, need: float, budget: float, fits: int):
        super().__init__(message)
        self.runs, self.need, self.budget, self.fits = runs, need, budget, fits


def _finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def _bytes(tree) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _as(x, dtype):
    """`x` with `dtype`: placed arrays are kept (no copy), anything else becomes numpy."""
    return x if isinstance(x, jax.Array) and x.dtype == dtype else np.asarray(x, dtype)


def _take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def _gather(tree):
    """Host copies of outputs whose run axis is split over the devices (of every process)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def runs_per_call(n_devices: int) -> int:
    """Runs per compiled call when none is asked for: as many as fit the memory budget on an
    accelerator; on a CPU `CPU_RUNS_PER_DEVICE` per device, since there larger calls buy no
    throughput (their working set falls out of the caches) and cost memory."""
    if jax.default_backend() == "cpu":
        return CPU_RUNS_PER_DEVICE * n_devices
    return 2**31 - 1


class Cohort:
    """Compiled programs advancing runs of one `FedPEAT` configuration, on one device or a mesh.

    States travel as host (numpy) pytrees with a leading run axis and the PRNG key as key data,
    so that runs can be packed into run chunks, stopped and checkpointed between calls.
    """

    def __init__(
        self,
        sim: FedPEAT,
        params,
        data: FedData,
        *,
        eval_data: Optional[tuple] = None,
        server_data: Optional[tuple] = None,
        mesh=None,
    ):
        if sim.mesh is not None:
            raise ValueError("a cohort splits its runs over devices: build its FedPEAT without a client mesh")
        self.sim, self.mesh = sim, mesh
        self.n_devices = 1 if mesh is None else int(mesh.size)
        if eval_data is not None:
            eval_data = (_as(eval_data[0], np.int32), _as(eval_data[1], np.float32))
            if eval_data[0].shape[0] == 0:
                raise ValueError("eval_data holds no held-out windows; pass eval_data=None to run without evaluation")
        if server_data is not None:
            server_data = (_as(server_data[0], np.int32), _as(server_data[1], np.float32))
        shared = (params, FedData(*data), eval_data, server_data)
        self.shared_bytes = _bytes(shared)
        self.shared = place(shared, mesh)
        self.sampling_rate = sim.fed.clients_per_round / int(data.tokens.shape[0])
        shapes = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), shared)
        devices = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
        fed = sim.fed.replace(memory_budget_gb=None)  # the budget chooses programs, it does not change them
        self._signature = (
            sim.model,
            sim.peft,
            fed,
            sim.n_clients,
            devices,
            str(jax.tree.structure(shared)),
            str(shapes),
        )

    # ----------------------------------------------------------------------------------------
    # Programs
    # ----------------------------------------------------------------------------------------
    def _jit(self, fn, n_run_args: int, donate: tuple = ()):
        """jit `fn` whose first `n_run_args` arguments carry the run axis and whose other arguments
        are shared; on a mesh the run axis of arguments and outputs is split over its devices."""
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=donate)
        runs, whole = NamedSharding(self.mesh, P(RUNS)), NamedSharding(self.mesh, P())
        return jax.jit(fn, in_shardings=(runs,) * n_run_args + (whole,) * 4, out_shardings=runs, donate_argnums=donate)

    def _put(self, tree):
        """Host arrays with a leading run axis, as (global) arrays split over the mesh."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        runs = NamedSharding(self.mesh, P(RUNS))
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), runs, lambda index: np.asarray(x)[index]), tree
        )

    def _start(self, seed, hyper, params):
        return self.sim.init(jax.random.key(seed), params, hyper)

    def _init_program(self, seeds, hypers, params, data, eval_data, server_data):
        state = jax.vmap(self._start, in_axes=(0, 0, None))(seeds, hypers, params)
        return state._replace(key=jax.random.key_data(state.key))

    def _rounds_program(self, n_rounds: int):
        sim = self.sim

        def one(state, hyper, params, data, server_data):
            state = state._replace(key=jax.random.wrap_key_data(state.key))
            state, metrics = sim.run_rounds(state, params, data, n_rounds, hyper, server_data)
            finite = _finite(state._replace(key=None, round=None))
            return state._replace(key=jax.random.key_data(state.key)), metrics, finite

        vmapped = jax.vmap(one, in_axes=(0, 0, None, None, None))
        return lambda states, hypers, params, data, eval_data, server_data: vmapped(
            states, hypers, params, data, server_data
        )

    def _eval_program(self, states, params, data, eval_data, server_data):
        """Held-out (nll, count) of every run's state: one program for the untrained states and
        for the states at every chunk end."""

        def one(state):
            return self.sim.eval_nll(state._replace(key=jax.random.wrap_key_data(state.key)), params, *eval_data)

        return jax.vmap(one)(states)

    def _abstract_runs(self, n: int):
        seeds = jax.ShapeDtypeStruct((n,), jnp.int32)
        hypers = Hyper(*(jax.ShapeDtypeStruct((n,), jnp.float32) for _ in Hyper._fields))
        states = jax.eval_shape(self._init_program, seeds, hypers, *self.shared)
        return seeds, hypers, states

    def _programs(self, n_rounds: Optional[int], run_chunk: int) -> dict:
        """name -> (cache key, function, abstract run arguments, donated arguments) of the programs
        of `run_chunk` runs at once: the start, `n_rounds` rounds (unless None) and, with held-out
        windows, the evaluation."""
        seeds, hypers, states = self._abstract_runs(run_chunk)
        out = {"init": (("init", run_chunk), self._init_program, (seeds, hypers), ())}
        if n_rounds is not None:
            out["rounds"] = (("rounds", n_rounds, run_chunk), self._rounds_program(n_rounds), (states, hypers), (0,))
        if self.shared[2] is not None:
            out["eval"] = (("eval", run_chunk), self._eval_program, (states,), ())
        return out

    def _compile(self, specs: list) -> list:
        """The compiled programs of `specs` ((key, fn, run_args, donate), ...), cached under the key
        and the cohort's configuration and shapes (a resumed or repeated study does not compile
        again). The uncached ones are traced here and compiled concurrently: XLA compiles outside
        Python's lock, so the small programs compile beside the big one."""
        keys = [key + self._signature for key, *_ in specs]
        todo = {}
        for key, (_, fn, run_args, donate) in zip(keys, specs):
            if key not in _COMPILED and key not in todo:
                todo[key] = self._jit(fn, len(run_args), donate).lower(*run_args, *self.shared)
        if todo:
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                done = dict(zip(todo, pool.map(lambda lowered: lowered.compile(), todo.values())))
            sharding.barrier(f"sweep compiled {[key[:3] for key in todo]}")
            _COMPILED.update(done)
        for key in keys:
            _COMPILED.move_to_end(key)
        while len(_COMPILED) > MAX_COMPILED:
            _COMPILED.popitem(last=False)
        return [_COMPILED[key] for key in keys]

    def programs(self, n_rounds: Optional[int], run_chunk: int) -> dict:
        """name -> the compiled program ("init", "rounds" of `n_rounds` unless None, "eval" with
        held-out windows) for `run_chunk` runs at once (cached)."""
        specs = self._programs(n_rounds, run_chunk)
        return dict(zip(specs, self._compile(list(specs.values()))))

    def compile(self, lengths, run_chunk: int) -> None:
        """Compile, together, every program a cohort of chunks of rounds of `lengths` needs."""
        specs = {}
        for n in lengths:
            specs.update({spec[0]: spec for spec in self._programs(n, run_chunk).values()})
        self._compile(list(specs.values()))

    def memory(self, n_rounds: int, run_chunk: int) -> float:
        """Peak bytes of a call of `run_chunk` runs by XLA's memory analysis: its largest program."""
        return max(driver.round_memory(p) for p in self.programs(n_rounds, run_chunk).values())

    def state_bytes(self, n_runs: int = 1) -> int:
        """Bytes of `n_runs` runs' server states (what the host keeps between chunks)."""
        return _bytes(self._abstract_runs(n_runs)[2])

    # ----------------------------------------------------------------------------------------
    # Memory and throughput
    # ----------------------------------------------------------------------------------------
    def fit(self, n_runs: int, n_rounds: int, run_chunk: Optional[int] = None) -> int:
        """Runs per call: `run_chunk` if given (RunsTooBig if it does not fit `driver.memory_budget`),
        otherwise the fewest equal calls of at most `runs_per_call()` runs, shrunk (re-checked) while
        XLA's memory analysis says they do not fit; a multiple of the devices. Each size tried is
        compiled once, and the one chosen is the program that then runs."""
        dev, budget = self.n_devices, driver.memory_budget(self.sim.fed)
        if run_chunk is not None:
            want = dev * math.ceil(run_chunk / dev)
        else:
            calls = math.ceil(n_runs / max(runs_per_call(dev), dev))
            want = dev * math.ceil(n_runs / calls / dev)
        while True:
            need = self.memory(n_rounds, want)
            if need <= budget:
                return want
            per_run = max((need - self.shared_bytes) / (want / dev), 1.0)
            fits = dev * int(max(budget - self.shared_bytes, 0) / per_run)
            if run_chunk is not None or want <= dev:
                raise RunsTooBig(
                    f"{want} runs at once need {driver._size(need)}, more than the memory budget of {driver._size(budget)} "
                    f"(FedConfig.memory_budget_gb); about {fits} fit",
                    want,
                    need,
                    budget,
                    fits,
                )
            calls = math.ceil(n_runs / max(fits, dev))  # as few calls as fit, of equal size (little padding)
            want = max(dev, min(want - dev, dev * math.ceil(n_runs / calls / dev)))

    # ----------------------------------------------------------------------------------------
    # Calls
    # ----------------------------------------------------------------------------------------
    def _run(self, call, run_args: tuple, run_chunk: int):
        """`call(*run_args, *shared)` over the runs of `run_args` (host, leading run axis)
        `run_chunk` at a time, the last chunk padded with copies of its last run; host outputs
        for the real runs."""
        n = len(jax.tree.leaves(run_args)[0])
        outs = []
        for start in range(0, n, run_chunk):
            idx = np.arange(start, min(start + run_chunk, n))
            padded = np.concatenate([idx, np.full(run_chunk - len(idx), idx[-1])])
            out = call(*self._put(_take(run_args, padded)), *self.shared)
            outs.append(_take(_gather(out), slice(0, len(idx))))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def init(self, seeds: np.ndarray, hypers: Hyper, run_chunk: int):
        """Host states of runs starting from `seeds` with `hypers` (the key as key data)."""
        init = self.programs(None, run_chunk)["init"]
        return self._run(init, (seeds, hypers), run_chunk)

    def zero_shot(self, seeds: np.ndarray, hypers: Hyper, run_chunk: int) -> tuple:
        """Held-out (nll, count) of the untrained state of each of `seeds`."""
        p = self.programs(None, run_chunk)
        return self._run(lambda s, h, *shared: p["eval"](p["init"](s, h, *shared), *shared), (seeds, hypers), run_chunk)

    def advance(self, states, hypers: Hyper, n_rounds: int, run_chunk: int) -> tuple:
        """Run `n_rounds` rounds of every run in `states` (host, leading run axis); returns host
        (states, metrics (runs, n_rounds), (nll, count), finite)."""
        p = self.programs(n_rounds, run_chunk)

        def call(states, hypers, *shared):
            states, metrics, finite = p["rounds"](states, hypers, *shared)
            return states, metrics, p["eval"](states, *shared) if "eval" in p else None, finite

        states, metrics, nll, finite = self._run(call, (states, hypers), run_chunk)
        if nll is None:  # no held-out windows: no evaluation
            nll = (np.zeros(len(finite)), np.zeros(len(finite)))
        return states, metrics, nll, finite


# --------------------------------------------------------------------------------------------
# The host loop
# --------------------------------------------------------------------------------------------
class CohortResult(NamedTuple):
    states: (
        ServerState  # host arrays with a leading run axis (key as key data); a stopped run keeps its last finite state
    )
    histories: list  # per run: `driver.train`'s rows (plugin_ppl at chunk ends), up to the round a stopped run diverged
    zero_shot: np.ndarray  # (runs,) plug-in perplexity before training (NaN without held-out windows)
    diverged: dict  # run -> {"round": round it diverged at, "reason": text}
    run_chunk: int  # runs per compiled call
    done: bool  # every round ran (False after stop_after_chunks)
    chunks_run: int  # chunks of rounds run by this call (a resumed cohort skips the ones done)


def fingerprint(sim: FedPEAT, seeds, hypers: Hyper, rounds: int) -> str:
    """A digest of everything that determines a cohort's results (settings, seeds, hyperparameters, rounds)."""
    return settings_fingerprint(
        {
            "sim": driver.config_fingerprint(sim, 0),
            "seeds": np.asarray(seeds).tolist(),
            "hypers": [np.asarray(h, np.float32).tolist() for h in hypers],
            "rounds": rounds,
        }
    )


def run_cohort(
    cohort: Cohort,
    seeds,
    hypers: Hyper,
    *,
    rounds: Optional[int] = None,
    run_chunk: Optional[int] = None,
    ckpt_dir=None,
    resume: bool = True,
    on_progress: Optional[Callable[[int, dict], None]] = None,
    stop_after_chunks: Optional[int] = None,
) -> CohortResult:
    """Train run i from `seeds[i]` with `Hyper(*(h[i] for h in hypers))` for `rounds` rounds
    (default `FedConfig.rounds`), all runs together; see the module docstring.

    run_chunk:  runs per compiled call (None: `Cohort.fit` chooses, for throughput within the memory budget).
    ckpt_dir:   checkpoint after every chunk of rounds; with `resume`, continue from the newest.
    on_progress(run_rounds, info): called after every chunk of rounds with the run-rounds just done.
    stop_after_chunks: stop early (simulates an interruption in tests).
    """
    sim = cohort.sim
    rounds = sim.fed.rounds if rounds is None else int(rounds)
    seeds = np.asarray(seeds, np.int32)
    hypers = Hyper(*(np.asarray(h, np.float32) for h in hypers))
    if seeds.ndim != 1 or any(h.shape != seeds.shape for h in hypers):
        raise ValueError("seeds must be (runs,) and every Hyper field of that shape (one entry per run)")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    n_runs, chunks = len(seeds), chunk_lengths(rounds, sim.fed.rounds_per_chunk)
    run_chunk = cohort.fit(n_runs, chunks[0], run_chunk)
    digest = fingerprint(sim, seeds, hypers, rounds)

    per_chunk = sim.fed.rounds_per_chunk
    manager = None if ckpt_dir is None else CheckpointManager(ckpt_dir, max_to_keep=2)
    try:
        template = empty_record(cohort.init(seeds, hypers, run_chunk), n_runs, rounds, len(chunks))
        record, start = restore_latest(
            manager, template, digest, fresh=not resume, hint="resume, or pick a new directory"
        )
        start = start or 0
        if start == 0 and cohort.shared[2] is not None:
            unique, first = np.unique(seeds, return_index=True)
            zero = np.stack(cohort.zero_shot(unique, _take(hypers, first), run_chunk), axis=1).astype(
                np.float64
            )  # as checkpointed
            record["zero"] = zero[np.searchsorted(unique, seeds)]

        def advance(record, begin, n):
            live = np.flatnonzero(record["stopped"] < 0)
            if len(live):
                out = cohort.advance(_take(record["states"], live), _take(hypers, live), n, run_chunk)
                fold_chunk(record, live, begin, begin // per_chunk, out)
            if on_progress is not None:
                on_progress(
                    len(live) * n,
                    {"round": begin + n, "rounds": rounds, "live": int(np.sum(record["stopped"] < 0)), "runs": n_runs},
                )
            return record, [{"round": begin + n}]

        record, done_rows = run_chunks(
            record,
            advance,
            start=start,
            total=rounds,
            chunk=per_chunk,
            desc="sweep rounds",
            step_key="round",
            checkpoints=manager,
            checkpoint_meta=lambda end: {"fingerprint": digest, "round": end},
            show_progress=False,
            stop_after_chunks=stop_after_chunks,
        )
    finally:
        if manager is not None:
            manager.close()
    finished = (done_rows[-1]["round"] if done_rows else start) >= rounds
    return _result(cohort, record, hypers, rounds, run_chunk, finished, len(done_rows))


def _result(
    cohort: Cohort, record: dict, hypers: Hyper, rounds: int, run_chunk: int, done: bool, chunks_run: int
) -> CohortResult:
    sim = cohort.sim
    zero = record["zero"]
    zero_ppl = np.where(zero[:, 1] > 0, np.exp(zero[:, 0] / np.maximum(zero[:, 1], 1.0)), np.nan)
    diverged = {
        int(r): {"round": int(record["stopped"][r]), "reason": REASONS[int(record["reason"][r])]}
        for r in np.flatnonzero(record["stopped"] >= 0)
    }
    rows = histories(sim, record, hypers, rounds, sim.fed.rounds_per_chunk, cohort.sampling_rate)
    return CohortResult(record["states"], rows, zero_ppl, diverged, run_chunk, done, chunks_run)


__all__ = ["Cohort", "CohortResult", "REASONS", "RunsTooBig", "fingerprint", "place", "run_cohort", "run_mesh"]
