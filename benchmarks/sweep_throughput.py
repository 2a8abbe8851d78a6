"""Runs per hour of a hyperparameter study three ways: `fedpeat sweep`, sequential `fedpeat tune`
processes (what users do today), and a Python loop of `driver.train` calls in one process.

    python -m benchmarks.sweep_throughput             # the two studies below (tens of minutes on 2 cores)
    python -m benchmarks.sweep_throughput --quick     # small versions of both, to check the script

The studies: Folio-spelling role clients of Shakespeare (the default task), LoRA r=8 in the adapter
of the 2-2-2 emulator, 4 local Adam steps of 2 x 64 tokens, FedAvg, held-out plug-in perplexity
before training and after every 5 rounds:

  tiny      foundation preset 'tiny': 4 seeds x 16 settings (client_lr x server_lr, 4 x 4),
            10 rounds of 16 clients: 64 runs
  default   foundation preset 'default': 4 seeds x 4 settings (2 x 2), 5 rounds of 8 clients: 16 runs

Each study is run three ways, each in fresh processes, timed from the command's start to its end
(start-up, loading, compiling, training, writing included):

  sweep     `fedpeat sweep SPEC`: every run of the study, one compiled program, the report included;
  tune      `fedpeat tune` once per run, one after another, with the run's settings and seed: a stated
            subset of the runs (--tune-runs, spread over the study), runs per hour from their total time;
  loop      one Python process that loads the model and text once and calls `driver.train` for a
            stated subset of the runs (--loop-runs).

The three ways run the same rounds on the same data: the final perplexities of the runs they share
are compared (the sweep's runs are vmapped, so they agree to float tolerance, not bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also runnable as a plain script

NAME = "sweep_throughput"

STUDIES = {
    "tiny": {
        "preset": "tiny",
        "seeds": 4,
        "client_lr": [3e-4, 1e-3, 3e-3, 1e-2],
        "server_lr": [0.5, 1.0, 1.5, 2.0],
        "rounds": 10,
        "clients": 16,
        "tune_runs": 8,
        "loop_runs": 8,
    },
    "default": {
        "preset": "default",
        "seeds": 4,
        "client_lr": [1e-3, 3e-3],
        "server_lr": [1.0, 2.0],
        "rounds": 5,
        "clients": 8,
        "tune_runs": 4,
        "loop_runs": 4,
    },
}
QUICK = {
    "tiny": {
        "preset": "tiny",
        "seeds": 2,
        "client_lr": [1e-3, 3e-3],
        "server_lr": [1.0],
        "rounds": 2,
        "clients": 4,
        "tune_runs": 2,
        "loop_runs": 2,
    },
    "default": {
        "preset": "default",
        "seeds": 2,
        "client_lr": [3e-3],
        "server_lr": [1.0],
        "rounds": 2,
        "clients": 4,
        "tune_runs": 1,
        "loop_runs": 2,
    },
}


def spec_of(name: str, study: dict) -> dict:
    return {
        "name": name,
        "model": {"preset": study["preset"]},
        "seeds": study["seeds"],
        "base": {"fed": {"rounds": study["rounds"], "clients_per_round": study["clients"]}},
        "axes": {"client_lr": study["client_lr"], "server_lr": study["server_lr"]},
    }


def runs_of(study: dict) -> list:
    """(client_lr, server_lr, seed) of every run, in the sweep's order (settings x seeds)."""
    return [(c, s, seed) for c in study["client_lr"] for s in study["server_lr"] for seed in range(study["seeds"])]


def spread(n_runs: int, k: int) -> list:
    """`k` run indices spread evenly over the study."""
    k = min(k, n_runs)
    return sorted({round(i * (n_runs - 1) / max(k - 1, 1)) for i in range(k)})


def _env() -> dict:
    return dict(
        os.environ,
        FEDPEAT_NO_PROGRESS="1",
        JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list, log) -> tuple:
    """(wall seconds, CPU seconds) of the process `cmd`: the CPU time (user + system, all its
    threads) is the work it did, which other processes on a shared machine do not inflate."""
    cmd = [str(c) for c in cmd]
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"    {seconds:7.1f} s ({cpu:.0f} CPU-s)  {' '.join(map(str, cmd[3:6]))} ...")
    return seconds, cpu


# --------------------------------------------------------------------------------------------
# The three ways
# --------------------------------------------------------------------------------------------
def time_sweep(name: str, study: dict, work: Path, log) -> dict:
    spec = work / f"{name}.json"
    spec.write_text(json.dumps(spec_of(name, study)))
    seconds, cpu = _timed([sys.executable, "-m", "fedpeat_jax.cli", "sweep", spec, "--out", work / "sweep"], log)
    results = json.loads((work / "sweep" / "results.json").read_text())
    finals = [rec["history"][-1].get("plugin_ppl") for rec in results["runs"]]
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "runs": len(finals),
        "finals": finals,
        "inner_timing": results["timing"],
        "run_chunk": json.loads(next((work / "sweep" / "cohorts").glob("*.json")).read_text())["run_chunk"],
    }


def time_tune(study: dict, picks: list, work: Path, log) -> dict:
    runs, seconds, cpu, finals = runs_of(study), [], [], {}
    for i in picks:
        client_lr, server_lr, seed = runs[i]
        out = work / f"tune-{i}"
        wall, work_s = _timed(
            [
                sys.executable,
                "-m",
                "fedpeat_jax.cli",
                "tune",
                "--preset",
                study["preset"],
                "--rounds",
                study["rounds"],
                "--clients-per-round",
                study["clients"],
                "--client-lr",
                client_lr,
                "--server-lr",
                server_lr,
                "--fed-seed",
                seed,
                "--out",
                out,
            ],
            log,
        )
        seconds.append(wall)
        cpu.append(work_s)
        finals[i] = json.loads((out / "summary.json").read_text())["plugin_ppl"]
    return {
        "seconds": sum(seconds),
        "cpu_s": sum(cpu),
        "per_run_s": seconds,
        "runs": len(picks),
        "picked": picks,
        "finals": finals,
    }


def time_loop(name: str, study: dict, picks: list, work: Path, log) -> dict:
    spec, result = work / f"{name}-loop.json", work / "loop-result.json"
    spec.write_text(json.dumps({"study": study, "picks": picks}))
    seconds, cpu = _timed(
        [sys.executable, "-m", "benchmarks.sweep_throughput", "--loop-worker", spec, "--result", result], log
    )
    inner = json.loads(result.read_text())
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "runs": len(picks),
        "picked": picks,
        "finals": {int(k): v for k, v in inner["finals"].items()},
        "load_s": inner["load_s"],
        "per_run_s": inner["per_run_s"],
    }


def loop_worker(spec_path: Path, result_path: Path) -> None:
    """The loop way, in its own process: load once, then `driver.train` per run."""
    t0 = time.perf_counter()
    from fedpeat_jax.config import FedConfig
    from fedpeat_jax.fed import driver
    from fedpeat_jax.fed.simulation import FedPEAT
    from fedpeat_jax.tasks import TaskConfig, plan_task
    from fedpeat_jax.tune import DEFAULT_PEFT, load_task

    job = json.loads(Path(spec_path).read_text())
    study, picks = job["study"], job["picks"]
    task_cfg = TaskConfig()
    params, model, _, task = load_task(plan_task(task_cfg), task_cfg, study["preset"])
    fed = FedConfig(rounds=study["rounds"], clients_per_round=study["clients"])
    n_clients = int(task.train.tokens.shape[0])
    load_s, finals, per_run = time.perf_counter() - t0, {}, []
    runs = runs_of(study)
    for i in picks:
        start = time.perf_counter()
        client_lr, server_lr, seed = runs[i]
        sim = FedPEAT(model, DEFAULT_PEFT, fed.replace(client_lr=client_lr, server_lr=server_lr), n_clients=n_clients)
        history = driver.train(sim, params, task.train, seed=seed, eval_data=task.heldout, show_progress=False).history
        finals[i] = history[-1]["plugin_ppl"]
        per_run.append(time.perf_counter() - start)
    Path(result_path).write_text(json.dumps({"finals": finals, "load_s": load_s, "per_run_s": per_run}))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _agreement(sweep: dict, other: dict) -> float:
    """Largest relative difference of final perplexity over the runs both ran."""
    diffs = [abs(sweep["finals"][i] - v) / v for i, v in other["finals"].items()]
    return max(diffs) if diffs else float("nan")


def plot(result: dict, path: Path) -> None:
    from fedpeat_jax.io.plots import pyplot

    plt = pyplot()
    ways = [("sweep", "fedpeat sweep"), ("tune", "sequential fedpeat tune"), ("loop", "driver.train loop")]
    names = list(result["studies"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.26
    for j, (key, label) in enumerate(ways):
        values = [result["studies"][n][key]["runs_per_hour"] for n in names]
        bars = ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, label=label, color=f"C{j}")
        for b, n in zip(bars, names):
            if key != "sweep":
                ax.annotate(
                    f"sweep {result['studies'][n]['speedup_vs_' + key]:.1f}x",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n} model, {result['studies'][n]['runs']} runs" for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("runs per hour (log)")
    ax.set_title("a hyperparameter study three ways", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small studies, to check the script (results named sweep_throughput_quick)"
    )
    parser.add_argument("--studies", default="tiny,default", help="comma-separated: tiny, default")
    parser.add_argument(
        "--tune-runs",
        type=int,
        default=None,
        help="sequential `fedpeat tune` runs timed per study (default: 8 tiny, 4 default)",
    )
    parser.add_argument(
        "--loop-runs",
        type=int,
        default=None,
        help="`driver.train` loop runs timed per study (default: 8 tiny, 4 default)",
    )
    parser.add_argument("--loop-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    studies = [s for s in args.studies.split(",") if s]
    if not studies or any(s not in STUDIES for s in studies):
        parser.error(f"--studies: comma-separated names from {', '.join(STUDIES)}, got {args.studies!r}")
    for flag in ("tune_runs", "loop_runs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.loop_worker:
        loop_worker(Path(args.loop_worker), Path(args.result))
        return {}

    from benchmarks.common import RESULTS_DIR, machine_info, write_json, write_markdown

    name = NAME + ("_quick" if args.quick else "")
    table = QUICK if args.quick else STUDIES
    start_machine, result = machine_info(), {"studies": {}}
    log = lambda s: print(s, flush=True)  # noqa: E731
    for study_name in studies:
        study = dict(table[study_name])
        study.update({k: v for k, v in (("tune_runs", args.tune_runs), ("loop_runs", args.loop_runs)) if v is not None})
        n_runs = len(runs_of(study))
        log(
            f"{study_name}: {n_runs} runs ({len(study['client_lr']) * len(study['server_lr'])} settings x {study['seeds']} seeds, "
            f"{study['rounds']} rounds of {study['clients']} clients)"
        )
        from fedpeat_jax.peat.foundation import load_foundation

        load_foundation(study["preset"])  # pretrained once and cached before any timing: no way pays for it
        with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
            work = Path(tmp)
            log("  fedpeat sweep")
            sweep = time_sweep(study_name, study, work, log)
            sweep["load_after"] = os.getloadavg()[0]
            log("  sequential fedpeat tune")
            tune = time_tune(study, spread(n_runs, study["tune_runs"]), work, log)
            tune["load_after"] = os.getloadavg()[0]
            log("  driver.train loop")
            loop = time_loop(study_name, study, spread(n_runs, study["loop_runs"]), work, log)
            loop["load_after"] = os.getloadavg()[0]
        entry = {
            "runs": n_runs,
            "settings": {k: study[k] for k in ("preset", "seeds", "client_lr", "server_lr", "rounds", "clients")},
        }
        for key, way in (("sweep", sweep), ("tune", tune), ("loop", loop)):
            way["runs_per_hour"] = way["runs"] / way["seconds"] * 3600
            way["cpu_s_per_run"] = way["cpu_s"] / way["runs"]
            entry[key] = way
        for key in ("tune", "loop"):
            entry[f"speedup_vs_{key}"] = sweep["runs_per_hour"] / entry[key]["runs_per_hour"]
            entry[f"cpu_speedup_vs_{key}"] = entry[key]["cpu_s_per_run"] / sweep["cpu_s_per_run"]
            entry[f"max_rel_ppl_difference_vs_{key}"] = _agreement(sweep, entry[key])
        result["studies"][study_name] = entry
        log(
            f"  runs per hour: sweep {sweep['runs_per_hour']:,.0f}, tune {tune['runs_per_hour']:,.0f} "
            f"({entry['speedup_vs_tune']:.1f}x), loop {loop['runs_per_hour']:,.0f} ({entry['speedup_vs_loop']:.1f}x); CPU-seconds per run: "
            f"sweep {sweep['cpu_s_per_run']:.1f}, tune {tune['cpu_s_per_run']:.1f}, loop {loop['cpu_s_per_run']:.1f}"
        )
    result["machine"] = start_machine
    result["load_at_end"] = list(os.getloadavg())
    write_json(name, result)
    plot(result, RESULTS_DIR / f"{name}.png")

    rows = []
    for study_name, e in result["studies"].items():
        for key, label in (
            ("sweep", "`fedpeat sweep`"),
            ("tune", "sequential `fedpeat tune`"),
            ("loop", "`driver.train` loop"),
        ):
            w = e[key]
            rows.append(
                [
                    f"{study_name} ({e['runs']} runs)",
                    label,
                    f"{w['runs']} of {e['runs']}",
                    w["seconds"],
                    w["seconds"] / w["runs"],
                    f"{w['runs_per_hour']:,.0f}",
                    "1.00" if key == "sweep" else f"{e['speedup_vs_' + key]:.2f}",
                    w["cpu_s_per_run"],
                    "1.00" if key == "sweep" else f"{e['cpu_speedup_vs_' + key]:.2f}",
                    f"{w['load_after']:.1f}",
                    "-" if key == "sweep" else f"{e['max_rel_ppl_difference_vs_' + key]:.1e}",
                ]
            )
    load0, load1 = start_machine["loadavg_1_5_15"], result["load_at_end"]
    busiest = max(
        [load0[0], load1[0]]
        + [e[k]["load_after"] for e in result["studies"].values() for k in ("sweep", "tune", "loop")]
    )
    command = "python -m benchmarks.sweep_throughput" + "".join(
        f" {flag}"
        for flag in (["--quick"] if args.quick else [])
        + ([f"--studies {args.studies}"] if args.studies != "tiny,default" else [])
        + [
            f"--{k.replace('_', '-')} {v}"
            for k, v in (("tune_runs", args.tune_runs), ("loop_runs", args.loop_runs))
            if v is not None
        ]
    )
    notes = [
        "Each way in fresh processes, timed from start to end (start-up, loading the model and text, compiling, training, "
        "evaluating and writing included; the foundation model was pretrained and cached before any timing). The tune and loop "
        "rows time the stated subset of the study's runs, spread over it; runs per hour is runs timed / seconds.",
        "Work per run: `fedpeat tune` evaluates held-out perplexity before training and after every 5 rounds and exports the "
        "tuned model; the sweep evaluates after every 5 rounds and once per seed before training, and writes its report; the "
        "loop (`driver.train`) evaluates after every 5 rounds.",
        "Speed-up: the sweep's runs per hour over that way's. CPU-s per run: the processes' user + system CPU time (all "
        "threads) per run, the work done, which other load on the machine does not inflate as it does wall time; CPU speed-up: "
        "that way's CPU-s per run over the sweep's. Load: the 1-minute load average when that way ended. Agreement: the "
        "largest relative difference of final held-out perplexity between the sweep and that way over the runs both ran (vmapped runs agree to float tolerance on "
        "stable settings; a setting whose perplexity climbs, such as client_lr 1e-2 with server_lr 2, amplifies the rounding "
        "differences of the vmapped program to a few percent).",
        *(
            f"{n}: foundation preset {e['settings']['preset']!r}, client_lr {e['settings']['client_lr']} x server_lr "
            f"{e['settings']['server_lr']} x {e['settings']['seeds']} seeds, {e['settings']['rounds']} rounds of "
            f"{e['settings']['clients']} clients; the sweep compiled for {e['sweep']['inner_timing']['compile_s']:.0f} s and trained "
            f"{e['sweep']['inner_timing']['run_s']:.0f} s ({e['sweep']['run_chunk']} runs per call); the loop loaded for "
            f"{e['loop']['load_s']:.0f} s, then {sum(e['loop']['per_run_s']) / len(e['loop']['per_run_s']):.1f} s per run"
            for n, e in result["studies"].items()
        ),
        f"Machine: {start_machine['cpu_model']}, {start_machine['cpus_usable']} usable CPUs, jax {start_machine['jax']} "
        f"({start_machine['jax_backend']}); load average (1/5/15 min) at start {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}, "
        f"at end {load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f}"
        + (
            f" (A BUSY MACHINE, 1-minute load up to {busiest:.1f} on {start_machine['cpus_usable']} CPUs: other work slowed the ways "
            "unequally; not figures to quote)"
            if busiest > 2.5
            else ""
        )
        + f"; code {start_machine['git_commit']}. Written by `{command}` on {start_machine['timestamp']}.",
    ]
    write_markdown(
        name,
        "A hyperparameter study three ways: runs per hour",
        [
            "study",
            "way",
            "runs timed",
            "seconds",
            "s per run",
            "runs per hour",
            "sweep speed-up",
            "CPU-s per run",
            "CPU speed-up",
            "load",
            "ppl agreement",
        ],
        rows,
        notes,
    )
    log(f"wrote benchmarks/results/{name}.json, .md and .png")
    return result


if __name__ == "__main__":
    main()
