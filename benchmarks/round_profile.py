"""Profile one vectorized FedPEAT round: time, MFU and where the time goes.

    python -m benchmarks.round_profile                           # default model, 16 clients, float32, all cores
    python -m benchmarks.round_profile --dtype bfloat16 --cores 1 --trace
    python benchmarks/round_profile.py --code /path/to/other/checkout       # the same round on other code
    python -m benchmarks.round_profile --clients 64 --dtype float32,bfloat16 --chunk 8,16,32,64 --cores 1 --write round_chunks

The round is the one benchmarks/fl_throughput.py times (2-2-2 emulator of the default model, LoRA
r=8 on the adapter blocks, 4 local Adam steps of 2 x 64 tokens per client, FedAvg), built with
`fl_throughput.make_sim` of the checkout `--code` names (default: this one), so before/after
figures come from one script; the matmul peaks always come from this script's benchmarks/common.py.
Reported: median wall time and process CPU time per round, MFU against the matmul peak of the same
dtype measured in this run on the same cores (bfloat16: float32 accumulation), and with --trace
the share of each kind of XLA operation in the round (from a jax.profiler trace).

`--cores 1` pins the process to one core before XLA starts, so XLA runs single-threaded and the
CPU time per round is the work itself: on a machine shared with other jobs that is the figure to
compare (wall time is not), together with a peak measured the same way. `--chunk` and `--dtype`
take lists: every combination is timed (how `fed.simulation.DEFAULT_CLIENT_CHUNK` was chosen), and
`--write NAME` keeps the table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(fn, runs: int):
    """Median (wall, CPU) seconds of `fn()` over `runs` calls after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def op_kind(name: str, hlo: str) -> str:
    """A readable kind for an XLA thunk name: library (YNNPACK) fusions and dots by output shape,
    other fusions by their name without the number."""
    m = re.search(r"^\s*(?:ROOT )?%?" + re.escape(name) + r" = (\S+) ", hlo, re.M)
    shape = m.group(1) if m else "?"
    if name.startswith("ynn_fusion") or name.startswith("dot"):
        return f"matmul {shape.split('{')[0]}"
    return re.sub(r"[\d.]+$", "", name)


def trace_breakdown(fn, hlo: str, top: int) -> list:
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            fn()
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    kinds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "python" in line.name:
                continue
            for ev in line.events:
                if "Thunk" not in ev.name and "Await" not in ev.name:
                    kinds[op_kind(ev.name, hlo)] += ev.duration_ns
    total = sum(kinds.values())
    return [(k, v / total) for k, v in kinds.most_common(top)]


def own_common():
    """This script's benchmarks/common.py, whichever checkout --code imports the round from."""
    spec = importlib.util.spec_from_file_location("_round_profile_common", HERE / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated: float32, bfloat16")
    parser.add_argument(
        "--chunk", default="", help="client chunk(s), comma-separated (default: the engine's default chunk)"
    )
    parser.add_argument("--cores", type=int, default=0, help="pin to this many cores before XLA starts (0: all usable)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--code", type=Path, default=HERE.parent, help="checkout whose fedpeat_jax and fl_throughput build the round"
    )
    parser.add_argument("--trace", action="store_true", help="also show the share of each kind of XLA operation")
    parser.add_argument(
        "--write", metavar="NAME", default="", help="also write the rows to benchmarks/results/NAME.json and .md"
    )
    args = parser.parse_args(argv)
    dtypes = args.dtype.split(",")
    if set(dtypes) - {"float32", "bfloat16"}:
        parser.error(f"--dtype: choose float32 and/or bfloat16, got {args.dtype!r}")
    try:
        chunks = [int(c) for c in args.chunk.split(",")] if args.chunk else [None]
    except ValueError:
        parser.error(f"--chunk: comma-separated positive integers, got {args.chunk!r}")
    if any(c is not None and c < 1 for c in chunks) or args.clients < 1 or args.runs < 1:
        parser.error("--clients, --runs and every --chunk must be >= 1")
    usable = sorted(os.sched_getaffinity(0))
    if args.cores:
        if not 1 <= args.cores <= len(usable):
            parser.error(f"--cores must be in 1..{len(usable)}")
        os.sched_setaffinity(0, usable[: args.cores])
    if not (args.code / "fedpeat_jax").is_dir() or not (args.code / "benchmarks" / "fl_throughput.py").is_file():
        parser.error(f"--code: {args.code} is not a fedpeat_jax checkout with benchmarks/fl_throughput.py")
    sys.path.insert(0, str(args.code.resolve()))

    import jax

    from benchmarks.fl_throughput import LOCAL_STEPS, client_data, flops_per_client_step, make_sim
    from fedpeat_jax.config import GPT2Config
    from fedpeat_jax.fed.client import Hyper
    from fedpeat_jax.model import gpt2

    common = own_common()
    start_info = common.machine_info()
    cfg = GPT2Config.preset("default", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params = gpt2.init(jax.random.key(0), cfg)
    data = client_data(args.clients, 2, 64, cfg.vocab_size)
    flops = flops_per_client_step(cfg, 6, 2, 64) * args.clients * LOCAL_STEPS
    cores = len(os.sched_getaffinity(0))
    rows = []
    for dtype in dtypes:
        peak = common.matmul_peak(dtype)
        peak_cpu = peak["flops_per_call"] / statistics.median(timed_calls(peak, common, dtype))
        for chunk in chunks:
            sim = make_sim(params, cfg, args.clients, 2, dtype, **({} if chunk is None else {"chunk": chunk}))
            hyper = Hyper.from_config(sim.fed)
            state = sim.init(jax.random.key(0), params, hyper)
            compiled, compile_s = common.compile_jax(jax.jit(sim.round), state, params, data, hyper)

            def one_round(compiled=compiled, state=state, hyper=hyper):
                jax.block_until_ready(compiled(state, params, data, hyper))

            wall, cpu = timed(one_round, args.runs)
            row = {
                "dtype": dtype,
                "clients": args.clients,
                "chunk": sim.effective_chunk,
                "cores": cores,
                "wall_s": wall,
                "cpu_s": cpu,
                "cpu_s_per_client": cpu / args.clients,
                "gflop": flops / 1e9,
                "peak_flops_per_s": peak["flops_per_s"],
                "peak_flops_per_cpu_s": peak_cpu,
                "mfu_wall": flops / wall / peak["flops_per_s"],
                "mfu_cpu": flops / cpu / peak_cpu,
                "compile_s": compile_s,
                "load_1min": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"code {args.code} ({dtype}, {args.clients} clients in chunks of {row['chunk']}, {cores} core(s), "
                f"load {row['load_1min']:.2f}; compile {compile_s:.0f} s)"
            )
            print(
                f"round: wall {wall:.2f} s, CPU {cpu:.2f} s ({1e3 * cpu / args.clients:.0f} ms per client); {flops / 1e9:.0f} GFLOP"
            )
            print(f"MFU (wall) {row['mfu_wall']:.1%} of the {dtype} peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
            print(
                f"MFU (CPU time) {row['mfu_cpu']:.1%} of the {dtype} peak in CPU time {peak_cpu / 1e9:.1f} GFLOP/cpu-s",
                flush=True,
            )
            if args.trace:
                for kind, share in trace_breakdown(one_round, compiled.as_text(), 25):
                    print(f"  {100 * share:5.1f}%  {kind}")
    if args.write:
        write(
            common,
            args.write,
            {
                "machine": start_info,
                "machine_at_end": common.machine_info(),
                "code": "this checkout" if args.code.resolve() == HERE.parent.resolve() else args.code.name,
                "rows": rows,
            },
        )


def write(common, name: str, result: dict) -> None:
    table = [
        [
            r["dtype"],
            r["clients"],
            r["chunk"],
            r["cores"],
            f"{r['wall_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            f"{1e3 * r['cpu_s_per_client']:.0f}",
            f"{100 * r['mfu_wall']:.1f}%",
            f"{100 * r['mfu_cpu']:.1f}%",
            f"{r['load_1min']:.2f}",
        ]
        for r in result["rows"]
    ]
    m0, m1 = result["machine"], result["machine_at_end"]
    loaded = common.under_load(
        m0["loadavg_1_5_15"][0], m1["loadavg_1_5_15"][0], *(r["load_1min"] for r in result["rows"])
    )
    notes = (
        [
            f"MEASURED UNDER LOAD (1-minute load average above {common.LOADED}): other jobs shared the cores; the CPU-time "
            "figures compare chunks and dtypes, the wall times do not."
        ]
        if loaded
        else []
    )
    notes += [
        f"Machine: {m0['cpu_model']}, jax {m0['jax']}; load average at start {m0['loadavg_1_5_15']}, at end {m1['loadavg_1_5_15']}.",
        "One FedPEAT round of benchmarks/fl_throughput.py's workload (2-2-2 emulator of the default model, LoRA r=8, "
        "4 local Adam steps of 2 x 64 tokens per client), median of the timed rounds after one warm-up.",
        "MFU (CPU time): the round's FLOPs / its process CPU time / the matmul peak of the same dtype in CPU time, "
        "measured in this run on the same cores: on a shared machine the figure that load disturbs least.",
    ]
    common.write_json(name, result)
    common.write_markdown(
        name,
        "Vectorized round by compute dtype and client chunk",
        [
            "dtype",
            "clients",
            "chunk",
            "cores",
            "wall s",
            "CPU s",
            "CPU ms per client",
            "MFU (wall)",
            "MFU (CPU time)",
            "load",
        ],
        table,
        notes=notes,
    )


def timed_calls(peak: dict, common, dtype: str) -> list:
    """CPU seconds of the peak's matmul, called again (the peak dict has wall times only)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = peak["n"]
    a = jnp.asarray(np.random.RandomState(0).standard_normal((n, n)), dtype)
    fn, _ = common.compile_jax(jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)), a, a)
    return [timed(lambda: jax.block_until_ready(fn(a, a)), 1)[1] for _ in range(5)]


if __name__ == "__main__":
    main()
