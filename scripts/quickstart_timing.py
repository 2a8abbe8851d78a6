"""Time `fedpeat quickstart` as a new user meets it: a fresh cache (corpus fetched, foundation model
pretrained), a fresh report folder, one process; writes `benchmarks/results/quickstart.{json,md}`.

    python scripts/quickstart_timing.py            # the real quickstart (budget: 15 minutes on 2 CPU cores)
    python scripts/quickstart_timing.py --tiny     # the smoke-test sizes

The quickstart's own output streams through, progress bars included. The table gives each stage's
time (from the run's `stages.json`) and the whole command's wall time against the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from fedpeat_jax.io.machine import machine_info  # noqa: E402
from fedpeat_jax.quickstart import STAGES, headline  # noqa: E402

BUDGET_S = 15 * 60


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="time `fedpeat quickstart --tiny` instead")
    parser.add_argument("--workdir", default=None, help="where the fresh cache and report go (default: a temporary folder, removed after)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for quickstart.{json,md}")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fedpeat-quickstart-") as tmp:
        work = Path(args.workdir or tmp)
        cache, out = work / "cache", work / "report"
        if cache.exists() or out.exists():
            raise SystemExit(f"{work} already holds a cache or report: the timing needs a fresh start; pass an empty --workdir")
        cmd = [sys.executable, "-m", "fedpeat_jax.cli", "quickstart", "--cache-dir", str(cache), "--out", str(out)] + (["--tiny"] if args.tiny else [])
        print("$", " ".join(cmd), flush=True)
        start_info = machine_info()
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "FEDPEAT_CACHE": str(cache)})
        wall = time.perf_counter() - start
        done = json.loads((out / "stages.json").read_text())["done"]

    record = {
        "command": "fedpeat quickstart" + (" --tiny" if args.tiny else ""),
        "wall_seconds": round(wall, 1),
        "budget_seconds": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "stage_seconds": {name: done[name]["seconds"] for name in STAGES},
        "headline": headline(done),
        "machine_at_start": start_info,
        "machine_at_end": machine_info(),
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "quickstart_tiny" if args.tiny else "quickstart"
    (results / f"{name}.json").write_text(json.dumps(record, indent=2))
    (results / f"{name}.md").write_text(to_markdown(record))
    print(f"\nwall time {wall / 60:.1f} min (budget {BUDGET_S / 60:.0f} min); wrote {results / name}.{{json,md}}")
    return 0


def to_markdown(r: dict) -> str:
    m0, m1 = r["machine_at_start"], r["machine_at_end"]
    load = lambda m: ", ".join(f"{x:.2f}" for x in m["loadavg_1_5_15"])  # noqa: E731
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
        "- Fresh cache and report folder: the corpus is fetched with pip and checked, the foundation model pretrained; "
        "a second run reuses both and every finished stage.",
        *[f"- Result: {line[2:]}" for line in r["headline"] if line.startswith("- ") and "Stage times" not in line],
        f"- Machine: {m0['cpu_model']}, {m0['cpus_usable']} usable CPUs, jax {m0['jax']} ({m0['jax_backend']}); "
        f"load average (1/5/15 min) at start {load(m0)}, at end {load(m1)}; code {m0['git_commit']}. "
        f"Written by `python scripts/quickstart_timing.py{' --tiny' if 'tiny' in r['command'] else ''}` on {m0['timestamp']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
