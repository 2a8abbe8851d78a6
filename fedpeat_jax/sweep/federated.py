"""`fedpeat sweep` for federated tuning: a study of FedPEAT runs, from spec to report.

    from fedpeat_jax.sweep import spec as spec_lib, federated
    result = federated.run(spec_lib.load("study.yaml"), out="runs/sweep/study")

Order of work, so that a mistake costs nothing: the spec is checked (`spec.parse`); the model's
shape is read and the text planned; every structural group is built against both (a value that
cannot run is refused, naming it); then the weights are loaded and the text tokenized; every
unfinished group is compiled with its run axis fitted to the memory budget (an Optuna batch that
does not fit is refused, naming `batch`); only then does anything train.

Each structural group is one `fed.sweep.Cohort` (one compiled program); grid and random studies
run all of a group's settings x seeds as one cohort, Optuna studies one cohort per batch (ask,
run vmapped, tell). In-progress cohorts checkpoint after every chunk of rounds under
`out/checkpoints/`; a finished cohort's runs are kept in `out/cohorts/*.json`; rerunning the
command resumes where it stopped. At the end: `out/results.csv`, `results.json`, `report.md`,
`plots/` and `tensorboard/` (`sweep.report`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from fedpeat_jax.sweep import report, search
from fedpeat_jax.sweep.spec import HYPERPARAMETERS, Spec
from fedpeat_jax.sweep.store import Store, fingerprint

CLASS_FIELDS = {
    "FedConfig": "base.fed",
    "PeftConfig": "base.peft",
    "TaskConfig": "base.task",
    "TextConfig": "base.text",
}


def _in_spec(spec: Spec, err: Exception):
    """A config error of the base settings, naming the spec's field (base.task.n_clients)."""
    import re

    message = str(err)
    for cls, section in CLASS_FIELDS.items():
        message = re.sub(rf"\b{cls}\.(\w+)", rf"{section}.\1", message)
    return spec.error("base", message)


def _eval_rounds(fed) -> list:
    ends, r = [], 0
    while r < fed.rounds:
        r = min(r + fed.rounds_per_chunk, fed.rounds)
        ends.append(r)
    return ends


def layout(spec: Spec) -> report.Layout:
    label = "held-out plug-in perplexity" if spec.objective == "plugin_ppl" else "final training loss"
    return report.Layout(
        title=f"Sweep {spec.name}",
        objective=spec.objective,
        objective_label=label,
        minimize=True,
        step="round",
        axes=spec.axis_names,
        structure=tuple(k for k, _ in spec.structure),
        log_axes=spec.log_axes(),
    )


# --------------------------------------------------------------------------------------------
# Runs and rows
# --------------------------------------------------------------------------------------------
def _hypers(group, settings: list, seeds: tuple):
    """Seeds and `Hyper` arrays of the runs settings x seeds (run = setting * S + seed index)."""
    from fedpeat_jax.fed.client import Hyper

    values = [{h: float(s.get(h, getattr(group.fed, h))) for h in HYPERPARAMETERS} for s in settings for _ in seeds]
    return (
        np.asarray([seed for _ in settings for seed in seeds], np.int32),
        Hyper(*(np.asarray([v[h] for v in values], np.float32) for h in HYPERPARAMETERS)),
        values,
    )


def _records(group, settings: list, trials: list, seeds: tuple, result, first_setting: int) -> list:
    """One record per run: who it is, its full per-round history and how it ended."""
    _, _, values = _hypers(group, settings, seeds)
    out = []
    for i, trial in enumerate(trials):
        for j, seed in enumerate(seeds):
            r = i * len(seeds) + j
            out.append(
                {
                    "group": group.index,
                    "group_label": group.label,
                    "structure": {k: v for k, v in group.choices},
                    "setting": first_setting + i,
                    "trial": trial,
                    "hyper": values[r],
                    "seed": int(seed),
                    "zero_shot_ppl": float(result.zero_shot[r]),
                    "history": result.histories[r],
                    "diverged": result.diverged.get(r),
                }
            )
    return out


def tidy(records: list, spec: Spec, groups: list) -> list:
    """One row per run and evaluation point (round 0 = before training, then every chunk end)."""
    rows = []
    for run, rec in enumerate(records):
        fed = groups[rec["group"]].fed
        evals = set(_eval_rounds(fed))
        base = {
            "run": run,
            "group": rec["group"],
            "group_label": rec["group_label"],
            **{k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in rec["structure"].items()},
            "setting": rec["setting"],
            **({"trial": rec["trial"]} if rec["trial"] is not None else {}),
            **rec["hyper"],
            "seed": rec["seed"],
        }
        dp = fed.dp_clip is not None and rec["hyper"]["dp_noise"] > 0
        zero = rec["zero_shot_ppl"]
        rows.append(
            {
                **base,
                "round": 0,
                "plugin_ppl": zero if math.isfinite(zero) else None,
                "loss": None,
                "bytes_up": 0,
                "bytes_down": 0,
                **({"epsilon": 0.0} if dp else {}),
                "status": "ok",
            }
        )
        up = down = 0
        history = rec["history"]
        for k, h in enumerate(history):
            up, down = up + h["bytes_up"], down + h["bytes_down"]
            last = k == len(history) - 1
            stopped = last and rec["diverged"] is not None
            if h["round"] in evals or stopped:
                row = {
                    **base,
                    "round": h["round"],
                    "plugin_ppl": h.get("plugin_ppl"),
                    "loss": h["loss"],
                    "participants": h["participants"],
                    "dropped": h["dropped"],
                    "bytes_up": up,
                    "bytes_down": down,
                    **({"epsilon": h.get("epsilon", 0.0)} if dp else {}),
                    "status": "diverged" if stopped else "ok",
                }
                if stopped:
                    row["reason"] = rec["diverged"]["reason"]
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
def _prepare(spec: Spec, cache_dir, log) -> tuple:
    """Every check that needs no weights: (model shape, planned text, validated groups)."""
    from fedpeat_jax.peat.pretrained import model_config
    from fedpeat_jax.tasks import plan_task
    from fedpeat_jax.tune import check_seq_len

    shape = model_config(spec.preset, spec.model_dir).replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    try:
        check_seq_len(spec.task, shape)
        plan = plan_task(spec.task, cache_dir)
    except ValueError as e:
        raise _in_spec(spec, e) from None
    groups = spec.groups(shape, plan.n_clients)
    if spec.objective == "plugin_ppl" and not plan.heldout:
        raise spec.error(
            "objective",
            f"plugin_ppl needs held-out text and {spec.text.describe()} holds none out "
            "(base.text.heldout_fraction); set objective: loss",
        )
    runs = len(groups) * spec.settings_per_group() * len(spec.seeds)
    log(f"data: {plan.summary}")
    log(
        f"study {spec.name}: {len(groups)} structural group(s) x {spec.settings_per_group()} setting(s) ({spec.sampler}) x "
        f"{len(spec.seeds)} seed(s) = {runs} runs; one compiled program per group"
    )
    return shape, plan, groups


def run(
    spec: Spec,
    out,
    *,
    resume: bool = True,
    cache_dir=None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_chunks: Optional[int] = None,
    dry_run: bool = False,
) -> dict:
    """Run (or resume) the study of `spec` in `out`; returns {"done", "records", "rows", "summary", "files", "timing"}."""
    import jax

    from fedpeat_jax.fed import sharding
    from fedpeat_jax.fed import sweep as engine
    from fedpeat_jax.fed.simulation import FedPEAT
    from fedpeat_jax.io.logging import progress
    from fedpeat_jax.tune import load_task, set_aside

    t_start = time.perf_counter()
    shape, plan, groups = _prepare(spec, cache_dir, log)
    if dry_run:
        for g in groups:
            log(f"  group {g.index}: {g.label}")
        return {"done": False, "groups": groups}
    out = Path(out).expanduser()
    primary = jax.process_index() == 0  # in a study spanning processes, process 0 writes the files
    if not resume and primary:
        old = set_aside(out)
        if old is not None:
            log(f"the earlier study in {out} was moved to {old}")
    sharding.barrier("study directory ready")
    store = Store(out, spec)
    params, model, _, task = load_task(plan, spec.task, spec.preset, spec.model_dir, cache_dir)
    mesh = engine.run_mesh() if jax.device_count() > 1 else None
    server = task.server if spec.fed.server_participation or any(g.fed.server_participation for g in groups) else None
    shared = engine.place((params, task.train, task.heldout, server), mesh)
    n_clients = int(task.train.tokens.shape[0])
    per_group = spec.settings_per_group()
    batch = spec.batch if spec.sampler == "optuna" else per_group
    names = {
        g.index: [
            f"g{g.index:03d}" if spec.sampler != "optuna" else f"g{g.index:03d}-b{b:03d}"
            for b in range(math.ceil(per_group / batch))
        ]
        for g in groups
    }

    # Compile every unfinished group first: memory problems surface before anything trains.
    cohorts, t0 = {}, time.perf_counter()
    for g in groups:
        if all(store.cohort(n) is not None for n in names[g.index]):
            continue
        sim = FedPEAT(model, g.peft, g.fed, n_clients=n_clients)
        cohort = engine.Cohort(
            sim,
            shared[0],
            shared[1],
            eval_data=shared[2],
            server_data=shared[3] if g.fed.server_participation else None,
            mesh=mesh,
        )
        n_runs = batch * len(spec.seeds)
        host = cohort.state_bytes(n_runs if spec.sampler == "optuna" else per_group * len(spec.seeds))
        if host > 0.5 * _host_memory():
            raise spec.error(
                f"group {g.label}",
                f"its runs keep {host / 2**30:.1f} GiB of server state on the host, more than half of the "
                "memory available; run fewer settings or seeds per study",
            )
        try:
            chunk = cohort.fit(
                n_runs,
                min(g.fed.rounds_per_chunk, g.fed.rounds),
                run_chunk=n_runs if spec.sampler == "optuna" else spec.run_chunk,
            )
        except engine.RunsTooBig as e:
            if spec.sampler == "optuna":
                fits = e.fits // len(spec.seeds)
                advice = (
                    f"about {fits} trials fit: lower batch"
                    if fits
                    else "not one trial fits: raise base.fed.memory_budget_gb or use fewer seeds"
                )
                raise spec.error(
                    "batch",
                    f"{batch} trials x {len(spec.seeds)} seeds = {e.runs} runs at once need {e.need / 2**30:.2f} GiB "
                    f"(group {g.label}), more than the memory budget of {e.budget / 2**30:.2f} GiB "
                    f"(base.fed.memory_budget_gb); {advice}",
                ) from None
            raise spec.error("run_chunk", f"{e} (group {g.label}); lower run_chunk or set it to null") from None
        cohort.compile(sorted(set(_chunk_lengths(g.fed))), chunk)  # the other chunk lengths, if any
        cohorts[g.index] = (cohort, chunk)
    compile_s = time.perf_counter() - t0
    if primary:
        store.commit()

    total = len(groups) * per_group * len(spec.seeds)
    total_rounds = sum(per_group * len(spec.seeds) * g.fed.rounds for g in groups)
    bar = progress(total_rounds, "sweep", disable=not (show_progress and primary))
    bar.unit = " run-rounds"
    bar.set_postfix_str(f"{len(groups)} groups, {total} runs")
    records, chunks_left, t_run = [], stop_after_chunks, time.perf_counter()
    try:
        for g in groups:
            told = []  # Optuna: (setting, seed-mean objective or None) of every finished trial of this group
            for b, name in enumerate(names[g.index]):
                done = store.cohort(name)
                if done is None:
                    if chunks_left is not None and chunks_left <= 0:
                        return {"done": False, "records": records}
                    cohort, chunk = cohorts[g.index]
                    settings = _settings(spec, store, name, b, batch, told, per_group)
                    seeds, hypers, _ = _hypers(g, settings, spec.seeds)

                    def on_progress(n, info, g=g, b=b):
                        bar.update(n)
                        where = f"group {g.index + 1}/{len(groups)}" + (
                            f" batch {b + 1}/{len(names[g.index])}" if spec.sampler == "optuna" else ""
                        )
                        bar.set_postfix_str(
                            f"{where}, {info['live']}/{info['runs']} runs live, round {info['round']}/{info['rounds']}"
                        )

                    result = engine.run_cohort(
                        cohort,
                        seeds,
                        hypers,
                        rounds=g.fed.rounds,
                        run_chunk=chunk,
                        ckpt_dir=store.checkpoints(name),
                        resume=resume,
                        on_progress=on_progress,
                        stop_after_chunks=chunks_left,
                    )
                    if not result.done:
                        return {"done": False, "records": records}
                    if chunks_left is not None:
                        chunks_left -= result.chunks_run
                    trials = (
                        list(range(b * batch, b * batch + len(settings)))
                        if spec.sampler == "optuna"
                        else [None] * len(settings)
                    )
                    done = {
                        "settings": settings,
                        "records": _records(g, settings, trials, spec.seeds, result, b * batch),
                        "run_chunk": result.run_chunk,
                    }
                    if primary:
                        store.finish(name, done)
                else:
                    bar.update(len(done["records"]) * g.fed.rounds)
                records += done["records"]
                if spec.sampler == "optuna":
                    told += _tell(done, spec)
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run
    rows = tidy(records, spec, groups)
    timing = {"compile_s": compile_s, "run_s": run_s, "total_s": time.perf_counter() - t_start}
    result = {"done": True, "records": records, "rows": rows, "timing": timing}
    if primary:
        files = _write(out, spec, groups, records, rows, timing)
        result.update(files=files, summary=files["summary"])
    return result


def _chunk_lengths(fed) -> list:
    ends = _eval_rounds(fed)
    return [e - s for s, e in zip([0] + ends[:-1], ends)]


def _settings(spec: Spec, store: Store, name: str, b: int, batch: int, told: list, per_group: int) -> list:
    """The settings of cohort `name`: the grid or random draws, or Optuna's asked batch (kept in
    the folder before it runs, so a resumed batch runs the same trials)."""
    if spec.sampler != "optuna":
        return search.settings(spec)
    path = store.out / "cohorts" / f"{name}.asked.json"
    if path.is_file():
        return json.loads(path.read_text())
    asked = search.OptunaSearch(spec).ask(told, b, min(batch, per_group - b * batch))
    report.write_json(path, asked)
    return asked


def _tell(done: dict, spec: Spec) -> list:
    """(setting, seed-mean final objective, or None if a seed diverged) of a finished batch."""
    out = []
    per = len(spec.seeds)
    for i, setting in enumerate(done["settings"]):
        finals = []
        for rec in done["records"][i * per : (i + 1) * per]:
            last = rec["history"][-1] if rec["history"] else {}
            value = last.get(spec.objective) if rec["diverged"] is None else None
            finals.append(value if value is not None and math.isfinite(value) else None)
        out.append((setting, None if None in finals else float(np.mean(finals))))
    return out


def _host_memory() -> float:
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 16 * 2**30


def _write(out: Path, spec: Spec, groups: list, records: list, rows: list, timing: dict) -> dict:
    lay = layout(spec)
    runs = len(records)
    rounds = sorted({g.fed.rounds for g in groups})
    header = [
        f"{runs} runs: {len(groups)} structural group(s) x {spec.settings_per_group()} setting(s) ({spec.sampler} sampler"
        + (f", batches of {spec.batch} trials" if spec.sampler == "optuna" else "")
        + f") x {len(spec.seeds)} seed(s), "
        f"{'/'.join(map(str, rounds))} rounds each; objective: {lay.objective_label} after the last round (lower is better).",
        "Axes: "
        + ("; ".join(f"{a.name} {a.describe()}" for a in spec.axes) or "none")
        + ". Structure: "
        + ("; ".join(f"{k} {list(v)}" for k, v in spec.structure) or "none")
        + f". Model: {spec.model_dir or spec.preset}.",
        f"Wall time {timing['total_s']:.0f} s (compiling {timing['compile_s']:.0f} s, training {timing['run_s']:.0f} s): "
        f"{runs / max(timing['total_s'], 1e-9) * 3600:,.0f} runs per hour. Results: `results.csv` (one row per run and evaluation point), "
        "`results.json`, TensorBoard logs in `tensorboard/` (HPARAMS tab).",
    ]
    extra = {"study": spec.name, "spec": spec.resolved, "timing": timing, "runs": records}
    metrics = ("plugin_ppl", "loss", "bytes_up", "epsilon")
    return report.write_all(out, rows, lay, header, extra, metrics)


__all__ = ["run", "tidy", "layout", "fingerprint"]
