"""The quickstart's report: the one-line-per-stage summary (printed at the end and heading the
report) and `report.md` with its plot, written from the stages' summaries (`quickstart.run`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from fedpeat_jax.io.plots import pyplot


def headline(s: dict) -> list:
    """The result of every stage in a line each, with the stage times: printed at the end and heading the report."""
    fm, fed, ctl = s["foundation"], s["fedpeat"], s["controller"]
    rows = s["offsite"]["rows"]
    held = sum(all(r["pattern"].values()) for r in rows)
    best = max(ctl.get("baselines", {}).items(), key=lambda kv: kv[1], default=None)
    timed = {name: stage["seconds"] for name, stage in s.items() if "seconds" in stage}  # in stage order
    lines = [
        "## Summary",
        "",
        f"- Foundation model ({_origin(fm)}): {fm['params']:,} parameters, modern-spelling held-out perplexity {fm.get('heldout_ppl', float('nan')):.2f}.",
        f"- FedPEAT ({fed['clients']} {'role ' if fed.get('data', 'Shakespeare').startswith('Shakespeare') else ''}clients, {fed['rounds']} rounds): held-out plug-in perplexity {fed['zero_shot_ppl']:.2f} -> {fed['plugin_ppl']:.2f}.",
        f"- Offsite-tuning pattern (OT Plug-in < Full ZS and < OT Emulator, Emulator ZS > Full ZS) holds in {held} of {len(rows)} rows.",
    ]
    if best is not None:
        verdict = "beats every baseline" if ctl["beats_every_baseline"] else "does not beat every baseline"
        lines.append(
            f"- Controller: SABPPO mean return {ctl['sabppo']:.3f} {verdict} (best baseline {best[0]}: {best[1]:.3f})."
        )
    times = ", ".join(f"{name} {sec:.0f}" for name, sec in timed.items())
    lines.append(f"- Stage times in seconds (each from the run that did it): {times}; total {sum(timed.values()):.0f}.")
    return lines


def _origin(fm: dict) -> str:
    where = "shipped with the package" if fm.get("shipped") else "pretrained here"
    return f"{where}, fingerprint {fm['fingerprint']}" if "fingerprint" in fm else where


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _plot_fedpeat(out: Path) -> Optional[str]:
    from fedpeat_jax.io.logging import read_metrics

    logdir = out / "fedpeat" / "logs"
    if not (logdir / "metrics.jsonl").exists():
        return None
    plt = pyplot()

    records = read_metrics(logdir)
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/plugin_ppl"]) for r in records if "eval/plugin_ppl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(*zip(*train), marker=".")
    axes[0].set(xlabel="round", ylabel="mean local training loss", title="clients (on emulators)")
    if evals:
        axes[1].plot(*zip(*evals), marker="o", color="C1")
    axes[1].set(xlabel="round", ylabel="perplexity", title="plug-in, held-out plays")
    fig.tight_layout()
    path = out / "fedpeat.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(out: Path, config, s: dict) -> Path:
    """`<out>/report.md` from the stages' summaries ``s`` and the QuickstartConfig ``config``."""
    fed = s["fedpeat"]
    lines = [
        "# FedPEAT quickstart report",
        "",
        *headline(s),
        "",
        f"Settings: `{json.dumps(dataclasses.asdict(config))}`",
        "",
        "## Corpus",
        "",
        *[f"- {k}: {v}" for k, v in s["corpus"].items() if k != "seconds"],
        "",
        "## Foundation model",
        "",
        f"`{s['foundation']['path']}` ({_origin(s['foundation'])}): {s['foundation']['params']:,} parameters; modern-spelling "
        f"held-out perplexity {s['foundation'].get('heldout_ppl', float('nan')):.2f}.",
        "",
        "## Emulators (2-k-2)",
        "",
        "| emulator | kept middle blocks | parameters on the device |",
        "|---|---|---|",
        *[
            f"| {r['emulator']} | {r['middle_blocks']} | {r['params_on_device']:,} |"
            for r in s["emulators"]["emulators"]
        ],
        "",
        "## FedPEAT on Folio-spelling role clients"
        if fed.get("data", "Shakespeare").startswith("Shakespeare")
        else f"## FedPEAT on {fed['data']}",
        "",
        f"{fed['clients']} clients, {fed['rounds']} rounds: held-out plug-in perplexity {fed['zero_shot_ppl']:.2f} (untuned) -> "
        f"{fed['plugin_ppl']:.2f}. Logs: `fedpeat/logs` (TensorBoard), checkpoints: `fedpeat/checkpoints`, tuned model in "
        f"Hugging Face format: `fedpeat/model`.",
        "",
    ]
    plot = _plot_fedpeat(out)
    if plot:
        lines += [f"![FedPEAT]({plot})", ""]
    if (out / "offsite" / "table.md").exists():
        lines += ["## Offsite tuning", "", (out / "offsite" / "table.md").read_text().split("\n", 1)[1].strip(), ""]
    cal = s["calibrate"]
    origin = (
        "the table shipped with the package, fitted on this very model (`--recalibrate` fits it anew)"
        if cal.get("source") == "shipped"
        else "fitted here to real FedPEAT runs"
    )
    lines += [
        "## Environment calibration",
        "",
        f"Perplexity response of the MEC environment: {origin}.",
        "",
        "| k | ppl_inf | eta |",
        "|---|---|---|",
        *[f"| {k} | {p:.2f} | {e:.3f} |" for k, p, e in zip(cal["k"], cal["ppl_inf"], cal["eta"])],
        "",
    ]
    ctl = s["controller"]
    lines += ["## Controller (SABPPO) against the baselines", "", ctl.get("table", ""), ""]
    for name in ctl.get("plots", []):
        lines += [f"![{name}](controller/{name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
