"""What a study leaves behind: a tidy table (CSV and JSON), a markdown report, plots and
TensorBoard hparams, from rows of any study (federated runs or controller training).

A row is one run at one evaluation point: the run's identity ("run", "group", "group_label",
"setting", "seed", and optionally "trial"), its structural choices and hyperparameters, the step
("round" or environment steps), the metrics measured there, and "status" ("ok", or "diverged" on
the last row of a stopped run). `Layout` says which columns are which and what is optimized.

The best setting of a structural group is the one with the best seed-mean final objective among
settings none of whose seeds diverged; its uncertainty is the standard error over seeds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from fedpeat_jax.io.plots import pyplot


class Layout(NamedTuple):
    title: str
    objective: str  # the column optimized, e.g. "plugin_ppl"
    objective_label: str  # its name in words
    minimize: bool
    step: str  # the step column ("round")
    axes: tuple  # numeric axes that vary
    structure: tuple  # structural columns
    log_axes: tuple = ()  # axes plotted on a log scale


def _clean(value):
    """JSON/CSV-safe: NaN and infinities become None, numpy scalars Python numbers."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return _clean(x)

    _atomic_write(Path(path), json.dumps(clean(data), indent=1) + "\n")


def write_csv(path: Path, rows: list) -> None:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if _clean(v) is None else _clean(v) for k, v in row.items()})
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Summary: the best setting per group
# --------------------------------------------------------------------------------------------
def finals(rows: list, layout: Layout) -> dict:
    """{run: its last row} (the final evaluation point, or the row it diverged at)."""
    last = {}
    for row in rows:
        if row["run"] not in last or row[layout.step] >= last[row["run"]][layout.step]:
            last[row["run"]] = row
    return last


def summarize(rows: list, layout: Layout) -> list:
    """Per group (in order): {"group", "label", "settings": [...] best first}; a setting holds its
    axis values, the final objective of every seed, their mean and standard error, and how many
    seeds diverged. Settings with a diverged seed rank after the others."""
    sign = 1.0 if layout.minimize else -1.0
    groups = {}
    for row in finals(rows, layout).values():
        g = groups.setdefault(row["group"], {"group": row["group"], "label": row["group_label"], "settings": {}})
        s = g["settings"].setdefault(
            row["setting"],
            {
                "setting": row["setting"],
                "values": {a: row[a] for a in layout.axes},
                "trial": row.get("trial"),
                "finals": [],
                "seeds": [],
                "diverged": 0,
            },
        )
        s["seeds"].append(row["seed"])
        if row["status"] == "diverged" or row.get(layout.objective) is None or not math.isfinite(row[layout.objective]):
            s["diverged"] += 1
        else:
            s["finals"].append(float(row[layout.objective]))
    out = []
    for g in sorted(groups.values(), key=lambda g: g["group"]):
        settings = []
        for s in g["settings"].values():
            x = np.asarray(s["finals"], np.float64)
            s["mean"] = float(x.mean()) if len(x) else math.nan
            s["se"] = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
            settings.append(s)
        settings.sort(
            key=lambda s: (
                s["diverged"] > 0 or not math.isfinite(s["mean"]),
                sign * s["mean"] if math.isfinite(s["mean"]) else 0.0,
            )
        )
        best = settings[0] if settings and settings[0]["diverged"] == 0 and math.isfinite(settings[0]["mean"]) else None
        out.append({"group": g["group"], "label": g["label"], "settings": settings, "best": best})
    return out


def _setting_text(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "(base hyperparameters)"


def _mean_se(s: dict) -> str:
    if not math.isfinite(s["mean"]):
        return "diverged"
    se = f" ± {s['se']:.2g}" if math.isfinite(s["se"]) else ""
    return f"{s['mean']:#.4g}{se}"


def best_line(group: dict, layout: Layout) -> str:
    """'client_lr=0.003, server_lr=1: held-out plug-in perplexity 153.2 ± 0.41' of a summarized group."""
    best = group["best"]
    return (
        f"{_setting_text(best['values'])}: {layout.objective_label} {_mean_se(best)}"
        if best
        else "no setting finished on every seed"
    )


def markdown(rows: list, layout: Layout, header: list, plots: list, top: int = 10) -> str:
    """The report: header lines, then per group its best setting and its `top` settings."""
    lines = [f"# {layout.title}", ""] + [f"{h}" for h in header] + [""]
    direction = "lower" if layout.minimize else "higher"
    for g in summarize(rows, layout):
        lines += [f"## Group {g['group']}: {g['label']}", ""]
        best = g["best"]
        if best is None:
            lines += ["No setting finished on every seed.", ""]
        else:
            lines += [
                f"**Best: {_setting_text(best['values'])}**: {layout.objective_label} {_mean_se(best)} "
                f"(mean ± standard error over {len(best['finals'])} seeds; {direction} is better)",
                "",
            ]
        cols = ["rank", *layout.axes, f"{layout.objective_label} (mean ± SE)", "seeds", "diverged"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for i, s in enumerate(g["settings"][:top]):
            cells = [
                str(i + 1),
                *(f"{s['values'][a]:.4g}" for a in layout.axes),
                _mean_se(s),
                str(len(s["seeds"])),
                str(s["diverged"]),
            ]
            if i == 0 and best is not None:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        if len(g["settings"]) > top:
            lines.append(f"\n{len(g['settings']) - top} more settings in the results table.")
        lines.append("")
    stopped = [r for r in finals(rows, layout).values() if r["status"] == "diverged"]
    if stopped:
        lines += ["## Diverged runs", "", f"{len(stopped)} run(s) stopped (the others ran on unchanged):", ""]
        for r in stopped[:50]:
            lines.append(
                f"- run {r['run']} (group {r['group']}, {_setting_text({a: r[a] for a in layout.axes})}, seed {r['seed']}): "
                f"{r.get('reason', 'diverged')} at {layout.step} {r[layout.step]}"
            )
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({path})" for title, path in plots] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def plot_finals(rows: list, layout: Layout, path: Path) -> Optional[Path]:
    """The seed-mean final objective (± SE) of every setting against each numeric axis."""
    if not layout.axes:
        return None
    plt = pyplot()
    summary = summarize(rows, layout)
    fig, axs = plt.subplots(1, len(layout.axes), figsize=(4.6 * len(layout.axes), 3.8), squeeze=False)
    for ax, name in zip(axs[0], layout.axes):
        for i, g in enumerate(summary):
            done = [s for s in g["settings"] if math.isfinite(s["mean"])]
            if not done:
                continue
            x = [s["values"][name] for s in done]
            y = [s["mean"] for s in done]
            err = [s["se"] if math.isfinite(s["se"]) else 0.0 for s in done]
            ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2, alpha=0.8, color=f"C{i % 10}", label=g["label"])
        if name in layout.log_axes:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"final {layout.objective_label}")
        ax.grid(alpha=0.3)
    if len(summary) > 1:
        axs[0][0].legend(fontsize=7)
    fig.suptitle(f"final {layout.objective_label} (mean ± SE over seeds) against each axis", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_best_curves(rows: list, layout: Layout, path: Path) -> Optional[Path]:
    """The objective over steps of each group's best setting: every seed, and their mean."""
    plt = pyplot()
    summary = [g for g in summarize(rows, layout) if g["best"] is not None]
    if not summary:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, g in enumerate(summary):
        best = g["best"]
        mine = [
            r
            for r in rows
            if r["group"] == g["group"] and r["setting"] == best["setting"] and r.get(layout.objective) is not None
        ]
        curves = {}
        for r in mine:
            curves.setdefault(r["seed"], []).append((r[layout.step], r[layout.objective]))
        for _seed, pts in curves.items():
            pts.sort()
            ax.plot(*zip(*pts), color=f"C{i % 10}", lw=0.7, alpha=0.35)
        steps = sorted({s for pts in curves.values() for s, _ in pts})
        mean = [np.mean([v for pts in curves.values() for s, v in pts if s == step]) for step in steps]
        ax.plot(
            steps,
            mean,
            color=f"C{i % 10}",
            lw=2,
            marker="o",
            ms=3,
            label=f"{g['label']}: {_setting_text(best['values'])}",
        )
    ax.set_xlabel(layout.step)
    ax.set_ylabel(layout.objective_label)
    ax.set_title("best setting of each group (thin: seeds, thick: mean)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------
def write_tensorboard(rows: list, layout: Layout, logdir: Path, metrics: tuple) -> None:
    """One TensorBoard run per study run: `metrics` over steps, and its hyperparameters with its
    final objective in the HPARAMS tab."""
    from tensorboardX import SummaryWriter

    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    for run, mine in sorted(by_run.items()):
        mine.sort(key=lambda r: r[layout.step])
        first, last = mine[0], mine[-1]
        hparams = {
            "group": first["group_label"],
            "seed": int(first["seed"]),
            **{a: float(first[a]) for a in layout.axes},
        }
        hparams.update({c: str(first[c]) for c in layout.structure})
        with SummaryWriter(str(Path(logdir) / f"run-{run:04d}")) as writer:
            for r in mine:
                for name in metrics:
                    value = r.get(name)
                    if value is not None and math.isfinite(value):
                        writer.add_scalar(name, value, int(r[layout.step]))
            final = last.get(layout.objective)
            final = float(final) if final is not None and math.isfinite(final) else float("nan")
            writer.add_hparams(
                hparams,
                {f"hparam/final_{layout.objective}": final, "hparam/diverged": float(last["status"] == "diverged")},
                name=".",
            )


def write_all(out: Path, rows: list, layout: Layout, header: list, extra: dict, tb_metrics: tuple) -> dict:
    """results.csv, results.json (rows, summary and `extra`), report.md, plots/, tensorboard/."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    summary = summarize(rows, layout)
    write_json(out / "results.json", {**extra, "summary": summary, "rows": rows})
    plots = []
    for title, fn, name in (
        ("final objective against each axis", plot_finals, "final_vs_axes.png"),
        ("best runs' curves", plot_best_curves, "best_curves.png"),
    ):
        if fn(rows, layout, out / "plots" / name) is not None:
            plots.append((title, f"plots/{name}"))
    _atomic_write(out / "report.md", markdown(rows, layout, header, plots))
    # TensorBoard appends events: write a fresh copy aside, then put it in place of the last one
    fresh = out / "tensorboard.new"
    shutil.rmtree(fresh, ignore_errors=True)
    write_tensorboard(rows, layout, fresh, tb_metrics)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    os.replace(fresh, out / "tensorboard")
    return {
        "csv": out / "results.csv",
        "json": out / "results.json",
        "report": out / "report.md",
        "plots": [out / p for _, p in plots],
        "tensorboard": out / "tensorboard",
        "summary": summary,
    }


__all__ = [
    "Layout",
    "best_line",
    "finals",
    "summarize",
    "markdown",
    "plot_finals",
    "plot_best_curves",
    "write_tensorboard",
    "write_all",
    "write_csv",
    "write_json",
]
