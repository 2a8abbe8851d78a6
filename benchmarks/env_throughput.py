"""Environment throughput: FedPEAT-MEC steps per second with a random policy.

Measured in one run, on the same machine, for N devices (default 10):

* ``jax vmap``   — the gymnax way: ``jax.vmap(env.step)`` over E environments inside a jitted
                   ``lax.scan``, a fresh key per env and step (``jax.random.split``), random
                   actions from ``env.action_space().sample`` (vmapped);
* ``jax batch``  — the environment's native batched layout: ``env.step_batch`` (env axis last,
                   one key per step for the whole batch) with ``action_space().sample_batch``;
* ``numpy batch``— the numpy twin (``NumpyFedPEAT``) vectorized over the same E environments
                   (numpy arrays with a trailing env axis, auto-reset, numpy random draws);
* ``sb3 DummyVecEnv`` — the gymnasium twin (``FedPEATTwin``) in stable-baselines3's
                   ``DummyVecEnv``, stepped the usual way (``vec_env.step(actions)`` with
                   ``action_space.sample()`` per env);
* ``gymnax CartPole-v1`` — a reference environment stepped like ``jax vmap`` at the largest E,
                   to show how loaded the machine was during the run (timed interleaved with the
                   two JAX variants of that size, so all three see the same conditions).

JAX timings exclude compilation (reported separately); every figure is the median of several
timed calls, each ending with ``block_until_ready``. The observation and reward of every step
are consumed (summed into the scan carry) so no work is dead code. The perplexity table is a
SYNTHETIC placeholder: throughput does not depend on its values.

On an accelerator the two JAX variants and CartPole run there; the numpy batch and SB3 always run
on the host CPU (numpy on one core), so their ratios compare the accelerator with that CPU.

Usage: python benchmarks/env_throughput.py [--quick] [--devices 10] [--sizes 1,64,8192,65536]
       [--out benchmarks/results]   (default: common.RESULTS_DIR, which FEDPEAT_RESULTS_DIR overrides)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import gymnax
import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fedpeat_jax.config import GPT2Config
from fedpeat_jax.mec import FedPEATMEC, FedPEATTwin, NumpyFedPEAT, synthetic_table

TARGET_STEPS = 2_000_000  # env steps per timed JAX call (fewer for tiny batches)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def jax_vmap_runner(env, params, n_envs, n_steps):
    """The gymnax way: jax.vmap of reset/step with one key per env, a random policy (any gymnax env)."""
    space = env.action_space(params)

    @jax.jit
    def run(rng):
        rng, k = jax.random.split(rng)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k, n_envs), params)

        def body(carry, _):
            state, obs, acc, rng = carry
            rng, k = jax.random.split(rng)
            keys = jax.random.split(k, (2, n_envs))
            action = jax.vmap(space.sample)(keys[0])
            obs, state, reward, term, trunc, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                keys[1], state, action, params
            )
            return (state, obs, acc + reward, rng), None

        (state, obs, acc, _), _ = jax.lax.scan(body, (state, obs, jnp.zeros(n_envs), rng), None, length=n_steps)
        return acc.sum() + obs.sum()

    return run


def jax_batch_runner(env, params, n_envs, n_steps):
    space = env.action_space(params)

    @jax.jit
    def run(rng):
        rng, k = jax.random.split(rng)
        obs, state = env.reset_batch(k, n_envs, params)

        def body(carry, _):
            state, obs, acc, rng = carry
            rng, ka, ks = jax.random.split(rng, 3)
            action = space.sample_batch(ka, n_envs)
            obs, state, reward, term, trunc, info = env.step_batch(ks, state, action, params)
            return (state, obs, acc + reward, rng), None

        (state, obs, acc, _), _ = jax.lax.scan(body, (state, obs, jnp.zeros(n_envs), rng), None, length=n_steps)
        return acc.sum() + obs.sum()

    return run


def cartpole_runner(n_envs, n_steps):
    env, params = gymnax.make("CartPole-v1")
    return jax_vmap_runner(env, params, n_envs, n_steps)


def bench_jax(env, params, sizes, repeats):
    """jax vmap and jax batch (plus CartPole at the largest size), timed interleaved per size.

    Other processes may share the machine; interleaving the timed calls of the variants of one
    size (A B C A B C ...) exposes them to the same conditions, so their ratios stay meaningful.
    """
    rows = []
    for n_envs in sizes:
        n_steps = int(min(4000, max(20, TARGET_STEPS // n_envs)))
        runners = {
            "jax vmap": jax_vmap_runner(env, params, n_envs, n_steps),
            "jax batch": jax_batch_runner(env, params, n_envs, n_steps),
        }
        if n_envs == max(sizes):
            runners["gymnax CartPole-v1 (vmap)"] = cartpole_runner(n_envs, n_steps)
        compile_s, times = {}, {k: [] for k in runners}
        for name, fn in runners.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(0)))
            compile_s[name] = time.perf_counter() - t0
        for i in range(repeats):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(jax.random.key(i + 1)))
                times[name].append(time.perf_counter() - t0)
        for name in runners:
            med = statistics.median(times[name])
            rows.append(
                dict(
                    impl=name,
                    n_envs=n_envs,
                    steps_per_call=n_envs * n_steps,
                    compile_s=round(compile_s[name], 3),
                    median_s=med,
                    steps_per_s=n_envs * n_steps / med,
                    best_steps_per_s=n_envs * n_steps / min(times[name]),
                )
            )
            print(
                f"  {name:10s} E={n_envs:5d}: {rows[-1]['steps_per_s'] / 1e6:7.3f} M steps/s "
                f"(best {rows[-1]['best_steps_per_s'] / 1e6:.3f}, compile {compile_s[name]:.1f}s)",
                flush=True,
            )
    return rows


def bench_numpy(params, sizes, repeats, seconds=1.0):
    rows = []
    for n_envs in sizes:
        sim = NumpyFedPEAT(params)
        rng = np.random.default_rng(0)
        obs, state = sim.reset_from_draws(sim.draw(rng, (n_envs,)))
        acc = np.zeros(n_envs)

        def run(n_steps):
            nonlocal state, acc
            for _ in range(n_steps):
                action = sim.sample_actions(rng, (n_envs,))
                obs, state, reward, term, trunc, info = sim.step_from_draws(state, action, sim.draw(rng, (n_envs,)))
                acc += reward + obs.sum(axis=0)

        t0 = time.perf_counter()
        run(3)
        per_step = (time.perf_counter() - t0) / 3
        n_steps = max(3, int(seconds / max(per_step, 1e-9)))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(n_steps)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append(
            dict(
                impl="numpy batch",
                n_envs=n_envs,
                steps_per_call=n_envs * n_steps,
                median_s=med,
                steps_per_s=n_envs * n_steps / med,
                best_steps_per_s=n_envs * n_steps / min(times),
            )
        )
        print(f"  numpy batch E={n_envs:5d}: {rows[-1]['steps_per_s'] / 1e6:7.3f} M steps/s", flush=True)
    return rows


def bench_sb3(table, params_overrides, n_envs_list, repeats, seconds=1.5):
    from stable_baselines3.common.vec_env import DummyVecEnv

    rows = []
    for n_envs in n_envs_list:
        vec = DummyVecEnv([lambda: FedPEATTwin(preset="default", calibration=table, **params_overrides)] * n_envs)
        vec.seed(0)
        vec.action_space.seed(0)
        vec.reset()

        def run(n_steps):
            for _ in range(n_steps):
                actions = np.stack([vec.action_space.sample() for _ in range(n_envs)])
                vec.step(actions)

        t0 = time.perf_counter()
        run(20)
        per_step = (time.perf_counter() - t0) / 20
        n_steps = max(20, int(seconds / per_step))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(n_steps)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append(
            dict(
                impl="sb3 DummyVecEnv",
                n_envs=n_envs,
                steps_per_call=n_envs * n_steps,
                median_s=med,
                steps_per_s=n_envs * n_steps / med,
                best_steps_per_s=n_envs * n_steps / min(times),
            )
        )
        print(f"  sb3 DummyVecEnv E={n_envs:3d}: {rows[-1]['steps_per_s']:9.0f} steps/s", flush=True)
    return rows


def _markdown(result) -> str:
    m = result["machine"]
    where = (
        f"{m['cpu_model']}, {m['cpu_count']} CPUs"
        if m.get("jax_backend", "cpu") == "cpu"
        else f"JAX on {common.hardware(m)} (the numpy batch and SB3 run on that CPU)"
    )
    lines = [
        "# FedPEAT-MEC environment throughput",
        "",
        f"{result['n_devices']} devices, model preset `{result['preset']}`, random policy, "
        f"synthetic perplexity table (throughput does not depend on it). "
        f"Machine: {where}, {m['platform']}, jax {m['jax']}, numpy {m['numpy']}; "
        f"load average {m['loadavg_start']} at the start, {m['loadavg_end']} at the end"
        + (
            " (other jobs shared the machine: absolute numbers are lower than on an idle one; "
            "the CartPole reference below, measured in the same run, shows by how much)."
            if m["loadavg_start"] and m["loadavg_start"][0] > 0.5 * m["cpu_count"]
            else "."
        )
        + f" Benchmark wall time {result['wall_s']:.0f} s.",
        "",
        "Env steps per second (median of the timed calls; JAX compile time excluded):",
        "",
        "| envs | jax vmap | jax batch | numpy batch | jax vmap / numpy | jax batch / numpy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["impl"], r["n_envs"]): r for r in result["rows"]}
    for n in result["sizes"]:
        v, b, npb = by.get(("jax vmap", n)), by.get(("jax batch", n)), by.get(("numpy batch", n))
        f = lambda r: f"{r['steps_per_s']:,.0f}" if r else "-"  # noqa: E731
        ratio = lambda a, c: f"{a['steps_per_s'] / c['steps_per_s']:.1f}x" if a and c else "-"  # noqa: E731
        lines.append(f"| {n} | {f(v)} | {f(b)} | {f(npb)} | {ratio(v, npb)} | {ratio(b, npb)} |")
    lines += [
        "",
        "JAX compile time (s): "
        + ", ".join(f"{r['impl']} E={r['n_envs']}: {r['compile_s']}" for r in result["rows"] if "compile_s" in r),
        "",
    ]
    s = result["summary"]
    lines += [
        "Summary:",
        "",
        f"- stable-baselines3 DummyVecEnv of the gymnasium twin: {s['sb3_steps_per_s']:,.0f} steps/s "
        f"(best over {result['sb3_envs']} envs)",
        f"- best over batch sizes: jax vmap {s['jax_vmap_best_steps_per_s']:,.0f} steps/s "
        f"(E={s['jax_vmap_best_envs']}), jax batch {s['jax_batch_best_steps_per_s']:,.0f} steps/s (E={s['jax_batch_best_envs']})",
        f"- jax vmap at {s['max_envs']} envs: {s['jax_vmap_steps_per_s']:,.0f} steps/s = "
        f"{s['jax_vmap_over_sb3']:.0f}x SB3, {s['jax_vmap_over_numpy']:.1f}x the numpy batch",
        f"- jax batch at {s['max_envs']} envs: {s['jax_batch_steps_per_s']:,.0f} steps/s = "
        f"{s['jax_batch_over_sb3']:.0f}x SB3, {s['jax_batch_over_numpy']:.1f}x the numpy batch",
        f"- reference gymnax CartPole-v1 (vmap, {s['max_envs']} envs, same run): {s['cartpole_steps_per_s']:,.0f} steps/s; "
        f"FedPEAT-MEC (10 devices) jax vmap runs at {s['jax_vmap_over_cartpole']:.2f}x and jax batch at "
        f"{s['jax_batch_over_cartpole']:.2f}x its speed",
        f"- done criterion (>= 2,000,000 steps/s and >= 100x SB3, at {s['max_envs']} envs): jax vmap "
        f"{'met' if s['jax_vmap_meets_target'] else 'NOT met'}, jax batch {'met' if s['jax_batch_meets_target'] else 'NOT met'} in this run",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--sizes",
        type=lambda text: sorted({int(x) for x in text.split(",")}),
        help="comma-separated batch sizes (envs), e.g. 1,64,8192,65536,262144 on an accelerator "
        "(default: 1,8,64,512,2048,8192; --quick: 1,64,1024,8192)",
    )
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = ap.parse_args(argv)

    sizes = args.sizes or ([1, 64, 1024, 8192] if args.quick else [1, 8, 64, 512, 2048, 8192])
    repeats = 3 if args.quick else args.repeats
    table = synthetic_table(GPT2Config.preset("default"))  # SYNTHETIC placeholder numbers
    overrides = dict(n_devices=args.devices)
    env = FedPEATMEC(preset="default", calibration=table, **overrides)
    params = env.default_params
    load_start = _loadavg()
    started = time.perf_counter()
    print(f"FedPEAT-MEC throughput, {args.devices} devices, load average {load_start}", flush=True)

    rows = []
    print("jax: vmap of env.step / env.step_batch (interleaved), CartPole reference at the largest size:", flush=True)
    rows += bench_jax(env, params, sizes, repeats)
    print("numpy twin, vectorized:", flush=True)
    rows += bench_numpy(params, sizes, repeats)
    sb3_envs = [1, 8] if args.quick else [1, 8, 64]
    print("stable-baselines3 DummyVecEnv of the gymnasium twin:", flush=True)
    rows += bench_sb3(table, overrides, sb3_envs, repeats)
    max_envs = max(sizes)
    cartpole = next(r["steps_per_s"] for r in rows if r["impl"].startswith("gymnax CartPole"))

    by = {(r["impl"], r["n_envs"]): r for r in rows}
    best = {
        k: max((r for r in rows if r["impl"] == k), key=lambda r: r["steps_per_s"]) for k in ("jax vmap", "jax batch")
    }
    sb3 = max(r["steps_per_s"] for r in rows if r["impl"] == "sb3 DummyVecEnv")
    vm, bt, npb = (by[(k, max_envs)]["steps_per_s"] for k in ("jax vmap", "jax batch", "numpy batch"))
    summary = dict(
        max_envs=max_envs,
        sb3_steps_per_s=sb3,
        jax_vmap_steps_per_s=vm,
        jax_batch_steps_per_s=bt,
        numpy_batch_steps_per_s=npb,
        cartpole_steps_per_s=cartpole,
        jax_vmap_over_sb3=vm / sb3,
        jax_batch_over_sb3=bt / sb3,
        jax_vmap_over_numpy=vm / npb,
        jax_batch_over_numpy=bt / npb,
        jax_vmap_over_cartpole=vm / cartpole,
        jax_batch_over_cartpole=bt / cartpole,
        jax_vmap_best_steps_per_s=best["jax vmap"]["steps_per_s"],
        jax_vmap_best_envs=best["jax vmap"]["n_envs"],
        jax_batch_best_steps_per_s=best["jax batch"]["steps_per_s"],
        jax_batch_best_envs=best["jax batch"]["n_envs"],
        jax_vmap_meets_target=bool(vm >= 2e6 and vm / sb3 >= 100),
        jax_batch_meets_target=bool(bt >= 2e6 and bt / sb3 >= 100),
    )
    result = dict(
        benchmark="env_throughput",
        n_devices=args.devices,
        preset="default",
        policy="uniform random over every action branch",
        calibration="synthetic placeholder table (fedpeat_jax.mec.calibration.synthetic_table)",
        sizes=sizes,
        sb3_envs=sb3_envs,
        repeats=repeats,
        machine=dict(
            **common.machine_info(),
            numpy=np.__version__,
            gymnax=getattr(gymnax, "__version__", "1.x"),
            loadavg_start=load_start,
            loadavg_end=_loadavg(),
        ),
        rows=rows,
        summary=summary,
        wall_s=round(time.perf_counter() - started, 1),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "env_throughput.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
