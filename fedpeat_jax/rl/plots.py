"""The controller's training plots: the learning curve and the comparison with the baselines
(``train_controller`` writes them; what a policy does, round by round, is :mod:`.behaviour`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from fedpeat_jax.io.plots import pyplot


def plot_learning_curve(history: list, summary: Optional[dict], path, seeds: int = 1):
    """Training episode return vs env steps (mean over seeds, each seed faint), baselines dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = np.array([h["step"] for h in history])
    for j in range(seeds if seeds > 1 else 0):
        y = np.array([h.get(f"train/seed{j}/episode_return", np.nan) for h in history])
        ax.plot(steps, y, lw=0.7, alpha=0.35, color="C0")
    y = np.array([h.get("train/episode_return", np.nan) for h in history])
    ok = np.isfinite(y)
    ax.plot(
        steps[ok], y[ok], lw=1.8, color="C0", label=f"SABPPO (training, mean of {seeds} seed{'s' if seeds > 1 else ''})"
    )
    if summary is not None:
        for c, (name, b) in enumerate(summary["baselines"].items(), start=1):
            ax.axhline(b["return_mean"], ls="--", lw=1.0, color=f"C{c}", label=f"{name} ({b['return_mean']:.1f})")
    ax.set_xlabel("environment steps (per seed)")
    ax.set_ylabel("episode return")
    ax.set_title("SABPPO learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_comparison(summary: dict, path):
    """Bar chart: mean episode return of SABPPO (error bar: std across seeds) and each baseline
    (error bar: standard error over episodes)."""
    plt = pyplot()
    names = ["SABPPO"] + list(summary["baselines"])
    means = [summary["sabppo"]["return_mean"]] + [b["return_mean"] for b in summary["baselines"].values()]
    errs = [summary["sabppo"]["return_std_across_seeds"]] + [
        b["return_std"] / math.sqrt(max(b["episodes"], 1)) for b in summary["baselines"].values()
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(names, means, yerr=errs, capsize=4, color=["C0"] + [f"C{i}" for i in range(1, len(names))])
    for bar, m in zip(bars, means):
        ax.annotate(
            f"{m:.1f}",
            (bar.get_x() + bar.get_width() / 2, m),
            ha="center",
            va="top" if m < 0 else "bottom",
            fontsize=8,
            xytext=(0, -3 if m < 0 else 3),
            textcoords="offset points",
        )
    ax.set_ylabel("mean episode return (higher is better)")
    ax.set_title(f"SABPPO vs baselines ({summary['eval_episodes']} evaluation episodes each)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = ["plot_comparison", "plot_learning_curve"]
