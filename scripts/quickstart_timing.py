"""Time `fedpeat quickstart` as a new user meets it: a fresh cache (the corpus fetched; the shipped
foundation model loaded and its checksums verified), a fresh report folder, one process; records
the machine's load during the run; writes `benchmarks/results/quickstart.{json,md}`.

    python scripts/quickstart_timing.py            # the real quickstart (budget: 8 minutes on 2 CPU cores)
    python scripts/quickstart_timing.py --tiny     # the smoke-test sizes
    flock /tmp/bench.lock python scripts/quickstart_timing.py    # on a shared machine: one timing at a time

The quickstart's own output streams through, progress bars included. The table gives each stage's
time (from the run's `stages.json`) and the whole command's wall time against the budget.

While it runs, a sampler reads every few seconds the machine's busy CPU time (/proc/stat) and the
CPU time of the quickstart's own process tree (/proc/<pid>/stat); the difference is what OTHER
processes used. A run during which they used more than SHARED_CORES cores on average is flagged
as having shared the CPU: its wall time is pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from fedpeat_jax.io.machine import machine_info  # noqa: E402
from fedpeat_jax.quickstart import STAGES  # noqa: E402
from fedpeat_jax.quickstart_report import headline  # noqa: E402

BUDGET_S = 8 * 60
SAMPLE_S = 5.0
SHARED_CORES = 0.1  # other processes' mean CPU use (cores) above which a run counts as shared
HZ = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Load during the run
# --------------------------------------------------------------------------------------------
def machine_busy_ticks() -> int:
    """Busy CPU time of the whole machine, all cores (user, nice, system, irq, softirq; not idle,
    iowait or steal), in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return user + nice + system + irq + softirq


def tree_ticks(root: int) -> int:
    """CPU time of `root` and its live descendants, each with its reaped children (utime + stime +
    cutime + cstime), in clock ticks: a child that exits moves into its parent's cutime."""
    parent, ticks = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        rest = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces
        parent[int(entry.name)] = int(rest[1])
        ticks[int(entry.name)] = sum(int(x) for x in rest[11:15])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parent.items() if pp == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(p, 0) for p in tree)


class LoadSampler(threading.Thread):
    """Samples, every `period` seconds, the cores used by other processes and by this process tree,
    and the 1-minute load average."""

    def __init__(self, period: float = SAMPLE_S):
        super().__init__(daemon=True)
        self.period, self.samples, self.stopped = period, [], threading.Event()
        self.start_ticks = tree_ticks(os.getpid())

    def run(self) -> None:
        me = os.getpid()
        t0, busy0, own0 = time.perf_counter(), machine_busy_ticks(), tree_ticks(me)
        while not self.stopped.wait(self.period):
            t1, busy1, own1 = time.perf_counter(), machine_busy_ticks(), tree_ticks(me)
            dt = t1 - t0
            own = (own1 - own0) / HZ / dt
            others = max(0.0, (busy1 - busy0) / HZ / dt - own)
            self.samples.append(
                {
                    "t": round(t1, 1),
                    "own_cores": round(own, 3),
                    "other_cores": round(others, 3),
                    "loadavg_1": os.getloadavg()[0],
                }
            )
            t0, busy0, own0 = t1, busy1, own1

    def stop(self) -> dict:
        """Stop sampling (after the quickstart exited, so that its CPU time is in this process's cutime)."""
        self.stopped.set()
        self.join()
        return {
            **summarize_load(self.samples, self.period),
            "own_cpu_seconds": round((tree_ticks(os.getpid()) - self.start_ticks) / HZ, 1),
        }


def summarize_load(samples: list, period: float) -> dict:
    if not samples:
        return {"samples": 0, "shared_cpu": None}
    others = [s["other_cores"] for s in samples]
    loads = [s["loadavg_1"] for s in samples]
    mean_others = sum(others) / len(others)
    return {
        "samples": len(samples),
        "sample_seconds": period,
        "other_cores_mean": round(mean_others, 3),
        "other_cores_max": max(others),
        "other_busy_fraction": round(
            sum(o > 0.5 for o in others) / len(others), 3
        ),  # of the samples with > 0.5 core used by others
        "own_cores_mean": round(sum(s["own_cores"] for s in samples) / len(samples), 3),
        "loadavg_1_min": min(loads),
        "loadavg_1_max": max(loads),
        "shared_cpu_threshold_cores": SHARED_CORES,
        "shared_cpu": mean_others > SHARED_CORES,
        "trace": samples,
    }


# --------------------------------------------------------------------------------------------
# The timing
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="time `fedpeat quickstart --tiny` instead")
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the fresh cache and report go (default: a temporary folder, removed after)",
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for quickstart.{json,md}")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fedpeat-quickstart-") as tmp:
        work = Path(args.workdir or tmp)
        cache, out = work / "cache", work / "report"
        if cache.exists() or out.exists():
            raise SystemExit(
                f"{work} already holds a cache or report: the timing needs a fresh start; pass an empty --workdir"
            )
        cmd = [sys.executable, "-m", "fedpeat_jax.cli", "quickstart", "--cache-dir", str(cache), "--out", str(out)] + (
            ["--tiny"] if args.tiny else []
        )
        print("$", " ".join(cmd), flush=True)
        start_info = machine_info()
        sampler = LoadSampler()
        sampler.start()
        start = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, env={**os.environ, "FEDPEAT_CACHE": str(cache)})
        finally:
            wall = time.perf_counter() - start
            load = sampler.stop()
        done = json.loads((out / "stages.json").read_text())["done"]

    record = {
        "command": "fedpeat quickstart" + (" --tiny" if args.tiny else ""),
        "wall_seconds": round(wall, 1),
        "budget_seconds": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "stage_seconds": {name: done[name]["seconds"] for name in STAGES},
        "calibration": done["calibrate"].get("source", "measured"),
        "headline": headline(done),
        "load": load,
        "machine_at_start": start_info,
        "machine_at_end": machine_info(),
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "quickstart_tiny" if args.tiny else "quickstart"
    (results / f"{name}.json").write_text(json.dumps(record, indent=2))
    (results / f"{name}.md").write_text(to_markdown(record))
    shared = " (the CPU was SHARED with other processes: pessimistic)" if load.get("shared_cpu") else ""
    print(
        f"\nwall time {wall / 60:.1f} min (budget {BUDGET_S / 60:.0f} min){shared}; wrote {results / name}.{{json,md}}"
    )
    return 0


def load_line(load: dict) -> str:
    if not load.get("samples"):
        return "- Load during the run: not sampled (the run was shorter than one sample)."
    verdict = (
        "the CPU was SHARED with other processes, so the wall time is pessimistic"
        if load["shared_cpu"]
        else "the machine was otherwise quiet"
    )
    return (
        f"- Load during the run ({load['samples']} samples, every {load['sample_seconds']:.0f} s): other processes used "
        f"{load['other_cores_mean']:.2f} cores on average (at most {load['other_cores_max']:.2f}; more than half a core in "
        f"{100 * load['other_busy_fraction']:.0f}% of the samples), the quickstart {load['own_cores_mean']:.2f} "
        f"({load['own_cpu_seconds']:,.0f} CPU-seconds in all); 1-minute load "
        f"average {load['loadavg_1_min']:.2f} to {load['loadavg_1_max']:.2f}: {verdict} "
        f"(threshold {load['shared_cpu_threshold_cores']} cores)."
    )


def to_markdown(r: dict) -> str:
    m0, m1 = r["machine_at_start"], r["machine_at_end"]
    load = lambda m: ", ".join(f"{x:.2f}" for x in m["loadavg_1_5_15"])  # noqa: E731
    calibration = (
        "the shipped calibration table, fitted on the shipped model, is reused"
        if r.get("calibration") == "shipped"
        else "the calibration table is fitted to real FedPEAT runs"
    )
    lines = [
        f"# `{r['command']}` on a fresh machine",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {name} | {sec:.1f} |" for name, sec in r["stage_seconds"].items()],
        f"| **whole command** (start-up included) | **{r['wall_seconds']:.1f}** |",
        "",
        f"- {r['wall_seconds'] / 60:.1f} minutes against a budget of {r['budget_seconds'] / 60:.0f}: "
        f"{r['wall_seconds'] / r['budget_seconds']:.2f} of it ({'within' if r['within_budget'] else 'OVER'} budget).",
        "- Fresh cache and report folder: the corpus is fetched with pip and checked, the foundation model shipped with the "
        f"package is loaded and its checksums verified, {calibration}; a second run reuses the corpus and every finished stage.",
        *[f"- Result: {line[2:]}" for line in r["headline"] if line.startswith("- ") and "Stage times" not in line],
        load_line(r.get("load", {})),
        f"- Machine: {m0['cpu_model']}, {m0['cpus_usable']} usable CPUs, jax {m0['jax']} ({m0['jax_backend']}); "
        f"load average (1/5/15 min) at start {load(m0)}, at end {load(m1)}; code {m0['git_commit']}. "
        f"Written by `python scripts/quickstart_timing.py{' --tiny' if 'tiny' in r['command'] else ''}` on {m0['timestamp']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
