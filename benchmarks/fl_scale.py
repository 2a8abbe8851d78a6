"""Round memory, time and compile time against clients per round: chunks keep them flat.

    python -m benchmarks.fl_scale              # 16 .. 4096 clients, GPT-2 small, two processes (~1.5 h on 2 cores)
    python -m benchmarks.fl_scale --quick      # 16 .. 256 clients, GPT-2 small analysis only, no processes

One round = m clients, each 4 local Adam steps of LoRA r=8 (the four adapter blocks) on a 2-2-2
emulator of the default foundation model shape (random weights: time and memory do not depend on
the values), 2 x 64 tokens per step, then FedAvg. Every point runs in a fresh subprocess so its
process RSS is its own:

  chunked    the round as shipped: clients trained `client_chunk` at a time (the automatic
             default), the aggregate streamed through a scan over chunks;
  unchunked  the same round with every client vmapped at once (client_chunk = m): the baseline,
             run while XLA's memory analysis says it fits in the machine's available memory.

Reported per point: seconds per round and per client (median of the timed rounds, compile
excluded), XLA's memory analysis of the compiled round (arguments + outputs + temporaries -
donated), the process's peak RSS, compile time, and model FLOP utilization against the fp32
matmul peak measured in this run. Then GPT-2 small's shape (124M, random weights, 2-8-2 emulator):
the compiled memory analysis at 1024 clients with and without gradient checkpointing of the
blocks, and one round run at 64 clients. Then one round of the default model over two processes
(one CPU device each, `jax.distributed` with gloo) against one process with two devices, same
clients and seeds, with the parameters compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

NAME = "fl_scale"
RESULTS = Path(__file__).resolve().parent / "results"
RANK, LOCAL_STEPS, BATCH, SEQ = 8, 4, 2, 64
GiB = 2**30


# --------------------------------------------------------------------------------------------
# One point, in its own process
# --------------------------------------------------------------------------------------------
def run_point(point: dict) -> dict:
    """Compile (and unless `compile_only`, run) one round; returns the measurements."""
    import jax
    import numpy as np

    if point.get("processes", 1) > 1:
        from fedpeat_jax.fed import sharding

        sharding.initialize_distributed(
            f"127.0.0.1:{point['port']}", point["processes"], point["process_id"], local_cpu_devices=point["devices"]
        )
    elif point.get("devices", 1) > 1:
        jax.config.update("jax_num_cpu_devices", point["devices"])

    from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
    from fedpeat_jax.fed import driver, sharding
    from fedpeat_jax.fed.client import Hyper
    from fedpeat_jax.fed.data import FedData, from_process_local, process_slice
    from fedpeat_jax.fed.simulation import FedPEAT
    from fedpeat_jax.model import gpt2
    from fedpeat_jax.model.flops import train_flops_per_token

    extra = {"remat": True} if point.get("remat") else {}
    model = GPT2Config.preset(point["preset"], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, **extra)
    m, k = point["clients"], point["k"]
    fed = FedConfig(
        clients_per_round=m,
        local_steps=LOCAL_STEPS,
        local_batch=BATCH,
        emulator_levels=(k,),
        client_chunk=point.get("chunk"),
        log_lora_gap=False,
        rounds_per_chunk=1,
    )
    peft = PeftConfig(kind="lora", lora_rank=RANK, lora_alpha=2.0 * RANK)
    n = BATCH * LOCAL_STEPS  # every client holds one epoch of local batches
    rs = np.random.RandomState(0)
    everything = FedData(
        rs.randint(0, model.vocab_size, (m, n, SEQ)).astype(np.int32),
        np.ones((m, n, SEQ), np.float32),
        np.full(m, n, np.int32),
        np.zeros(m, np.int32),
    )
    mesh = sharding.client_mesh() if point.get("devices", 1) > 1 or point.get("processes", 1) > 1 else None
    params = gpt2.init(jax.random.key(0), model)
    if mesh is not None:
        data = from_process_local(FedData(*(x[process_slice(m)] for x in everything)), m, mesh)
        params = sharding.replicate(params, mesh)
    else:
        data = FedData(*map(jax.numpy.asarray, everything))
    sim = FedPEAT(model, peft, fed, n_clients=m, mesh=mesh)
    hyper = Hyper.from_config(fed)
    state = jax.jit(sim.init)(jax.random.key(1), params, hyper)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(sim.run_rounds, static_argnums=3, donate_argnums=0).lower(state, params, data, 1, hyper).compile()
    )
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    out = {
        **point,
        "client_chunk": sim.effective_chunk,
        "compile_s": compile_s,
        "xla_peak_bytes": driver.round_memory(compiled),
        "xla_temp_bytes": int(analysis.temp_size_in_bytes),
        "xla_argument_bytes": int(analysis.argument_size_in_bytes),
        "flops_per_round": m
        * LOCAL_STEPS
        * BATCH
        * SEQ
        * train_flops_per_token(
            model, 2 + k + 2, SEQ, lora_params=peft.replace(layers=(0, 1, 2, 3)).param_count(model)
        ),
    }
    available = driver.memory_budget(fed.replace(memory_budget_gb=None)) * 2  # the budget is half of what is available
    if not point.get("compile_only") and out["xla_peak_bytes"] > 0.9 * available:
        out["skipped"] = f"needs {out['xla_peak_bytes'] / GiB:.1f} GiB of the {available / GiB:.1f} GiB available"
    elif not point.get("compile_only"):
        sharding.barrier("compiled")
        times = []
        for _ in range(point.get("runs", 1)):
            t0 = time.perf_counter()
            state, metrics = compiled(state, params, data, hyper)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        out.update(round_s=times, median_s=float(np.median(times)), loss=float(driver._host(metrics.loss)[0]))
        out["s_per_client"] = out["median_s"] / m
        if point.get("save_params"):
            leaves = jax.tree.leaves(driver._host(state.trainable))
            out["params_digest"] = [float(np.sum(np.asarray(x, np.float64))) for x in leaves]
    out["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def in_subprocess(point: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.fl_scale", "--point", json.dumps(point)]
    try:
        run = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1]
        )
    except subprocess.TimeoutExpired:
        return {**point, "skipped": f"over the {timeout:.0f} s time limit"}
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        return {
            **point,
            "skipped": f"failed (exit {run.returncode}): {run.stderr.strip().splitlines()[-1][:200] if run.stderr.strip() else ''}",
        }
    return json.loads(lines[-1])


def two_processes(point: dict, timeout: float) -> list:
    """The same point as two processes of one CPU device each; returns both processes' results."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.fl_scale",
                "--point",
                json.dumps({**point, "processes": 2, "process_id": i, "devices": 1, "port": port}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = "", "timed out"
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {**point, "skipped": f"failed: {err.strip()[-200:]}"})
    return results


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--quick", action="store_true", help="16..256 clients, GPT-2 small analysis only, no two-process run"
    )
    parser.add_argument("--max-clients", type=int, default=4096)
    parser.add_argument("--point-timeout", type=float, default=3600.0, help="seconds before a point is given up")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: run one point and print its JSON
    parser.add_argument(
        "--render", action="store_true", help="only redraw the table and plot from benchmarks/results/fl_scale.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads((RESULTS / f"{NAME}.json").read_text()))
        return {}
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))), flush=True)
        return {}

    from benchmarks.common import machine_info, matmul_peak, write_json

    started = time.time()
    machine = machine_info()
    peak = matmul_peak("float32")
    max_clients = 256 if args.quick else args.max_clients
    counts = [c for c in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if c <= max_clients]
    rows = []

    def record(row):
        rows.append(row)
        shown = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in row.items()
            if k not in ("round_s", "params_digest")
        }
        print(shown, flush=True)

    for mode in ("chunked", "unchunked"):
        for m in counts:
            point = {
                "preset": "default",
                "k": 2,
                "clients": m,
                "chunk": None if mode == "chunked" else m,
                "runs": 3 if m <= 256 else 1,
            }
            row = {"mode": mode, **in_subprocess(point, args.point_timeout)}
            record(row)
            if "skipped" in row:
                break
    gpt2_rows = []
    for remat in (False, True):
        point = {"preset": "gpt2", "k": 8, "clients": 1024, "chunk": None, "remat": remat, "compile_only": True}
        gpt2_rows.append({"mode": "gpt2 analysis", **in_subprocess(point, args.point_timeout)})
        print(gpt2_rows[-1], flush=True)
    if not args.quick:
        gpt2_rows.append(
            {
                "mode": "gpt2 run",
                **in_subprocess(
                    {"preset": "gpt2", "k": 8, "clients": 64, "chunk": None, "runs": 1}, args.point_timeout
                ),
            }
        )
        print(gpt2_rows[-1], flush=True)
    process_rows = []
    if not args.quick:
        point = {"preset": "default", "k": 2, "clients": 64, "chunk": 32, "runs": 2, "save_params": True}
        process_rows.append(
            {"mode": "1 process x 2 devices", **in_subprocess({**point, "devices": 2}, args.point_timeout)}
        )
        process_rows += [
            {"mode": f"2 processes x 1 device (process {i})", **r}
            for i, r in enumerate(two_processes(point, args.point_timeout))
        ]
        for r in process_rows:
            print({k: v for k, v in r.items() if k not in ("params_digest",)}, flush=True)

    result = {
        "name": NAME,
        "machine": machine,
        "matmul_peak_fp32": peak,
        "rows": rows,
        "gpt2_small": gpt2_rows,
        "processes": process_rows,
        "settings": {
            "lora_rank": RANK,
            "local_steps": LOCAL_STEPS,
            "batch": BATCH,
            "seq": SEQ,
            "emulator": "2-2-2 (default), 2-8-2 (gpt2)",
        },
        "loadavg_end": list(os.getloadavg()),
        "wall_s": time.time() - started,
    }
    result["summary"] = summarize(result)
    write_json(NAME, result)
    render(result)
    return result


def render(result: dict) -> None:
    """The table and the plot of a result (`--render` redraws them from the saved JSON)."""
    from benchmarks.common import write_markdown

    write_markdown(*tables(result))
    plot(result, RESULTS / f"{NAME}.png")
    print(json.dumps(result["summary"], indent=1))


def _by(rows, mode):
    return {r["clients"]: r for r in rows if r["mode"] == mode and "median_s" in r}


def summarize(result: dict) -> dict:
    chunked, unchunked = _by(result["rows"], "chunked"), _by(result["rows"], "unchunked")
    s = {}
    if 64 in chunked:
        ref = chunked[64]
        top = max(chunked)
        s.update(
            max_clients=top,
            memory_ratio_vs_64=chunked[top]["xla_peak_bytes"] / ref["xla_peak_bytes"],
            rss_ratio_vs_64=chunked[top]["rss_peak_bytes"] / ref["rss_peak_bytes"],
            s_per_client_ratio_vs_64=chunked[top]["s_per_client"] / ref["s_per_client"],
            compile_s_range=[
                min(r["compile_s"] for r in chunked.values()),
                max(r["compile_s"] for r in chunked.values()),
            ],
        )
    both = sorted(set(chunked) & set(unchunked))
    if both:
        m = both[-1]
        s.update(
            largest_unchunked=m,
            unchunked_over_chunked_memory=unchunked[m]["xla_peak_bytes"] / chunked[m]["xla_peak_bytes"],
            unchunked_over_chunked_time=unchunked[m]["median_s"] / chunked[m]["median_s"],
        )
    analyses = [r for r in result["gpt2_small"] if r["mode"] == "gpt2 analysis" and "xla_peak_bytes" in r]
    for r in analyses:
        s[f"gpt2_1024_peak_gib_remat_{r.get('remat', False)}"] = r["xla_peak_bytes"] / GiB
    procs = result["processes"]
    if len(procs) == 3 and all("median_s" in r for r in procs):
        s["two_process_over_one_process_time"] = max(r["median_s"] for r in procs[1:]) / procs[0]["median_s"]
        s["two_process_params_equal"] = all(
            abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(procs[0]["params_digest"], procs[1]["params_digest"])
        )
    return s


def tables(result: dict) -> tuple:
    peak = result["matmul_peak_fp32"]["flops_per_s"]
    rows = []
    for r in result["rows"] + result["gpt2_small"] + result["processes"]:
        model = "GPT-2 small, 2-8-2" if r["preset"] == "gpt2" else "default, 2-2-2"
        mfu = f"{100 * r['flops_per_round'] / r['median_s'] / peak:.0f}%" if "median_s" in r else ""
        rows.append(
            [
                r["mode"] + (" + remat" if r.get("remat") else ""),
                model,
                r["clients"],
                r.get("client_chunk", ""),
                f"{r['median_s']:.2f}" if "median_s" in r else r.get("skipped", "compile only"),
                f"{1000 * r['s_per_client']:.0f}" if "s_per_client" in r else "",
                mfu,
                f"{r['xla_peak_bytes'] / GiB:.2f}" if "xla_peak_bytes" in r else "",
                f"{r['rss_peak_bytes'] / GiB:.2f}" if "rss_peak_bytes" in r else "",
                f"{r['compile_s']:.1f}" if "compile_s" in r else "",
            ]
        )
    s, m = result["summary"], result["machine"]
    notes = [
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable CPUs, jax {m.get('jax')} ({m.get('jax_backend')}); fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s in this run; load average at start {m.get('loadavg_1_5_15')}, at end {result['loadavg_end']}; "
        f"{result['wall_s'] / 60:.0f} min in all; code {m.get('git_commit')}.",
        "Each client: 4 local Adam steps of LoRA r=8 on the four adapter blocks, 2 x 64 tokens per step; FedAvg. Random weights of the "
        "model's shape. Every point in a fresh process (peak RSS is its own).",
        "XLA GiB: the compiled round's memory analysis (arguments + outputs + temporaries - donated); RSS: the process's peak resident memory. "
        "MFU: model FLOPs (fedpeat_jax.model.flops) per second over the fp32 matmul peak.",
    ]
    if any("median_s" in r and r["flops_per_round"] / r["median_s"] > peak for r in result["gpt2_small"]):
        notes.append(
            "The peak is the rate of one jitted 2048 x 2048 x 2048 matmul, not the hardware's: GPT-2 small's larger matmuls "
            "(the 768 x 50257 LM head) run faster than it, hence an MFU above 100%."
        )
    if "memory_ratio_vs_64" in s:
        notes.append(
            f"Chunked, {s['max_clients']} clients against 64: XLA memory x{s['memory_ratio_vs_64']:.2f}, RSS x{s['rss_ratio_vs_64']:.2f}, "
            f"seconds per client x{s['s_per_client_ratio_vs_64']:.2f}; compile {s['compile_s_range'][0]:.1f}-{s['compile_s_range'][1]:.1f} s "
            "at every size."
        )
    if "largest_unchunked" in s:
        notes.append(
            f"Unchunked (every client at once) at {s['largest_unchunked']} clients: x{s['unchunked_over_chunked_memory']:.1f} the "
            f"chunked round's memory, x{s['unchunked_over_chunked_time']:.2f} its time; larger cohorts do not fit."
        )
    if "two_process_over_one_process_time" in s:
        notes.append(
            f"Two processes (1 device each, gloo) against one process with 2 devices, 64 clients: x{s['two_process_over_one_process_time']:.2f} "
            f"the time; final parameters equal: {s['two_process_params_equal']}."
        )
    return (
        NAME,
        "Round memory and time against clients per round",
        ["mode", "model", "clients", "chunk", "s/round", "ms/client", "MFU", "XLA GiB", "RSS GiB", "compile s"],
        rows,
        notes,
    )


def plot(result: dict, path: Path) -> None:
    from fedpeat_jax.io.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("chunked", "o-"), ("unchunked", "s--")):
        pts = sorted(_by(result["rows"], mode).items())
        if not pts:
            continue
        x = [c for c, _ in pts]
        axes[0].plot(x, [r["xla_peak_bytes"] / GiB for _, r in pts], style, label=f"{mode}, XLA analysis")
        axes[0].plot(x, [r["rss_peak_bytes"] / GiB for _, r in pts], style, alpha=0.5, label=f"{mode}, process RSS")
        axes[1].plot(x, [1000 * r["s_per_client"] for _, r in pts], style, label=mode)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients per round")
        ax.legend(fontsize=8)
    axes[0].set(ylabel="GiB", title="peak memory of one round")
    axes[1].set(ylabel="ms per client", title="time per client", ylim=(0, None))
    fig.suptitle("default foundation model shape, 2-2-2 emulator, LoRA r=8, 4 local steps of 2 x 64 tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
