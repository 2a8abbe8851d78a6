"""`fedpeat sweep` for the controller: a study of SABPPO training runs, from spec to report.

    from fedpeat_jax.sweep import controller, spec as spec_lib
    result = controller.run(spec_lib.load("examples/sweep_controller.yaml"), out="runs/sweep/sabppo")

Each structural group is one trainer (`rl.sabppo.make_trainer`) whose runs, every setting x every
seed, train together: `jax.vmap(trainer.run_updates)` in chunks of `base.controller.chunk_updates`
updates, in `io.loop.run_chunks`, the host loop of every long job. Run (setting i, seed s) is
`trainer.train(jax.random.key(s), hparams_i)`: the base SABPPOConfig's hyperparameters with the
setting's on top, and EnvParams built by `make_params` with the setting's environment values.

Before training and after every chunk, every run's policy is evaluated (deterministic by default)
on the same episodes (`eval_seed`) as the baselines (`rl.controller.evaluate_baselines`) under
the same environment parameters. The states and the rows so far are checkpointed after every chunk
(`out/checkpoints/gNNN`), a finished group's rows kept in `out/cohorts/gNNN.json`: rerunning the
command resumes. A run whose network parameters stop being finite is reported as diverged and
leaves the table; the others are independent lanes of the vmap. The report (`sweep.report`)
ranks settings by their seed-mean final evaluated return, higher being better.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from fedpeat_jax.sweep import report, search
from fedpeat_jax.sweep.controller_spec import ControllerSpec, agent_fields
from fedpeat_jax.sweep.store import Store

# row column -> the evaluation's per-episode metric (rl.rollout), averaged over the episodes
EVAL_METRICS = {
    "eval_return": "return",
    "eval_perplexity": "perplexity",
    "eval_latency": "latency",
    "eval_participants": "participants",
}


def layout(spec: ControllerSpec) -> report.Layout:
    return report.Layout(
        title=f"Sweep {spec.name} (SABPPO)",
        objective="eval_return",
        objective_label="evaluated return",
        minimize=False,
        step="env_steps",
        axes=spec.axis_names,
        structure=tuple(k for k, _ in spec.structure),
        log_axes=spec.log_axes(),
    )


# --------------------------------------------------------------------------------------------
# One structural group: its runs, trained together
# --------------------------------------------------------------------------------------------
class _Group:
    """A group's trainer, environments, stacked hyperparameters and the identity of every run
    (run = setting * seeds + seed index), and the evaluation of all its policies at once."""

    def __init__(self, spec: ControllerSpec, group, settings: list, first_run: int):
        import jax
        import jax.numpy as jnp

        from fedpeat_jax.mec import FedPEATMEC
        from fedpeat_jax.rl import sabppo
        from fedpeat_jax.rl.controller import evaluate_baselines

        agent = agent_fields()
        self.spec, self.group, ctl = spec, group, spec.controller
        envs = {}  # distinct environment settings -> their EnvParams
        self.env_of = []  # per setting: its key in envs
        for setting in settings:
            env_values = {k: v for k, v in setting.items() if k not in agent}
            key = tuple(sorted(env_values.items()))
            if key not in envs:
                envs[key] = spec.env_params({**group.env, **env_values})
            self.env_of.append(key)
        self.envs = envs
        self.env = FedPEATMEC(next(iter(envs.values())))
        self.trainer = sabppo.make_trainer(group.sabppo, self.env, self.env.default_params)
        base, seeds = self.trainer.default_hparams(), spec.seeds
        self.hparams = sabppo.stack_hparams(
            [
                base.replace(env_params=envs[self.env_of[i]], **{k: jnp.float32(v) for k, v in s.items() if k in agent})
                for i, s in enumerate(settings)
                for _ in seeds
            ]
        )
        self.keys = jax.vmap(jax.random.key)(jnp.asarray([s for _ in settings for s in seeds], jnp.uint32))
        self.ids = [
            {
                "run": first_run + i * len(seeds) + j,
                "group": group.index,
                "group_label": group.label,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in group.choices},
                "setting": i,
                **{k: float(setting.get(k, getattr(group.sabppo, k))) for k in agent},
                **{k: float(v) for k, v in setting.items() if k not in agent},
                "seed": int(seed),
            }
            for i, setting in enumerate(settings)
            for j, seed in enumerate(seeds)
        ]
        self.baselines = {}  # env key -> {name: evaluation}
        for key, params in envs.items():
            self.baselines[key] = evaluate_baselines(self.env, params, ctl)[0]
        self.runs_of = {key: [r for r in range(len(self.ids)) if self.env_of[r // len(seeds)] == key] for key in envs}

    def init(self, shapes_only: bool = False):
        """The runs' initial states (or only their shapes: the target of a restore)."""
        import jax

        from fedpeat_jax.rl.controller import init_runs

        if shapes_only:
            return jax.eval_shape(lambda: init_runs(self.trainer, self.keys, self.hparams))
        return init_runs(self.trainer, self.keys, self.hparams)

    def evaluate(self, states, train_return) -> list:
        """One row per run: its policy's evaluation on the shared episodes, its last training return."""
        import jax
        import jax.numpy as jnp

        from fedpeat_jax.rl import baselines as B
        from fedpeat_jax.rl.controller import select_run
        from fedpeat_jax.rl.rollout import rollout_many

        ctl, batch = self.spec.controller, self.group.sabppo.batch_size
        updates = int(np.asarray(states.update)[0])
        finite = np.asarray(
            jax.vmap(lambda p: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])))(states.params)
        )
        rows = [None] * len(self.ids)
        for key, runs in self.runs_of.items():
            params = self.envs[key]
            policies = [B.sabppo_policy(self.trainer, select_run(states, r), ctl.deterministic_eval) for r in runs]
            stacked = jax.tree.map(lambda *x: jnp.stack(x), *[p.params for p in policies])
            steps = int(np.asarray(params.max_steps_in_episode))
            episodes = rollout_many(
                policies[0].apply, self.env, ctl.eval_episodes, steps, stacked, params, jax.random.key(ctl.eval_seed)
            )
            episodes = jax.device_get(episodes)
            best = max(self.baselines[key].items(), key=lambda kv: kv[1]["return_mean"])
            for j, r in enumerate(runs):
                rows[r] = {
                    **self.ids[r],
                    "update": updates,
                    "env_steps": updates * batch,
                    "train_return": None if train_return is None else train_return[r],
                    **{col: float(np.mean(episodes[m][j])) for col, m in EVAL_METRICS.items()},
                    "best_baseline": best[0],
                    "best_baseline_return": best[1]["return_mean"],
                    "status": "ok" if finite[r] else "diverged",
                    **({} if finite[r] else {"reason": "non-finite network parameters"}),
                }
        return rows


def _train_group(g: _Group, store: Store, name: str, show_progress: bool, stop_after_chunks) -> Optional[list]:
    """Train (or resume) the group; its rows, or None when stopped early."""

    from fedpeat_jax.io.checkpoint import CheckpointManager
    from fedpeat_jax.io.loop import restore_latest, run_chunks
    from fedpeat_jax.rl.controller import vmapped_updates

    digest, total = f"{store.digest}-{name}", g.group.sabppo.num_updates
    manager = CheckpointManager(store.checkpoints(name), max_to_keep=2)
    try:
        states, start = restore_latest(manager, g.init(shapes_only=True), digest)
        if start is None:
            states, start = g.init(), 0
            history = g.evaluate(states, None)
        else:
            history = manager.metadata()["rows"]
        stopped = {r["run"] for r in history if r["status"] == "diverged"}
        advance_updates = vmapped_updates(g.trainer)

        def advance(states, start, n):
            states, metrics = advance_updates(states, n)
            ret = np.asarray(metrics["episode_return"], np.float64)  # (runs, n); NaN: no episode ended
            last = [float(r[np.isfinite(r)][-1]) if np.isfinite(r).any() else None for r in ret]
            rows = [row for row in g.evaluate(states, last) if row["run"] not in stopped]
            stopped.update(r["run"] for r in rows if r["status"] == "diverged")
            history.extend(rows)
            return states, rows

        states, _ = run_chunks(
            states,
            advance,
            start=start,
            total=total,
            chunk=g.spec.controller.chunk_updates,
            desc=f"group {g.group.index}: SABPPO updates",
            checkpoints=manager,
            checkpoint_meta=lambda end: {"fingerprint": digest, "update": end, "rows": history},
            postfix=lambda row: {},
            show_progress=show_progress,
            stop_after_chunks=stop_after_chunks,
        )
    finally:
        manager.close()
    return history if int(np.asarray(states.update)[0]) >= total else None


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
def run(
    spec: ControllerSpec,
    out,
    *,
    resume: bool = True,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_chunks: Optional[int] = None,
    dry_run: bool = False,
) -> dict:
    """Run (or resume) the controller study of `spec` in `out`; returns {"done", "rows", "summary", "files", "timing"}."""
    from fedpeat_jax.tune import set_aside

    t_start = time.perf_counter()
    groups, settings = spec.groups(), search.settings(spec)
    runs = len(groups) * len(settings) * len(spec.seeds)
    log(
        f"study {spec.name}: {len(groups)} structural group(s) x {len(settings)} setting(s) ({spec.sampler}) x "
        f"{len(spec.seeds)} seed(s) = {runs} SABPPO runs; one compiled program per group"
    )
    if dry_run:
        for g in groups:
            log(f"  group {g.index}: {g.label} ({g.sabppo.num_updates} updates of {g.sabppo.batch_size} env steps)")
        return {"done": False, "groups": groups}
    out = Path(out).expanduser()
    if not resume:
        old = set_aside(out)
        if old is not None:
            log(f"the earlier study in {out} was moved to {old}")
    store = Store(out, spec)
    store.commit()
    rows, baselines = [], []
    for g in groups:
        name = f"g{g.index:03d}"
        done = store.cohort(name)
        if done is None:
            group = _Group(spec, g, settings, first_run=g.index * len(settings) * len(spec.seeds))
            history = _train_group(group, store, name, show_progress, stop_after_chunks)
            if history is None:
                return {"done": False, "rows": rows}
            done = {
                "rows": history,
                "baselines": [
                    {"group": g.index, "env": dict(k), **{n: b["return_mean"] for n, b in v.items()}}
                    for k, v in group.baselines.items()
                ],
            }
            store.finish(name, done)
        rows += done["rows"]
        baselines += done["baselines"]
    rows.sort(key=lambda r: (r["run"], r["update"]))
    timing = {"total_s": time.perf_counter() - t_start}
    files = _write(out, spec, groups, settings, rows, baselines, timing)
    return {
        "done": True,
        "rows": rows,
        "baselines": baselines,
        "timing": timing,
        "files": files,
        "summary": files["summary"],
    }


def _write(
    out: Path, spec: ControllerSpec, groups: list, settings: list, rows: list, baselines: list, timing: dict
) -> dict:
    lay = layout(spec)
    runs = len({r["run"] for r in rows})
    cfg = groups[0].sabppo
    ctl = spec.controller
    header = [
        f"{runs} SABPPO runs: {len(groups)} structural group(s) x {len(settings)} setting(s) ({spec.sampler} sampler) x "
        f"{len(spec.seeds)} seed(s); objective: the {lay.objective_label} after the last update (higher is better), "
        f"{'deterministic' if ctl.deterministic_eval else 'sampled'} policy, {ctl.eval_episodes} episodes (seed {ctl.eval_seed}), "
        f"evaluated every {ctl.chunk_updates} updates.",
        "Axes: "
        + ("; ".join(f"{a.name} {a.describe()}" for a in spec.axes) or "none")
        + ". Structure: "
        + ("; ".join(f"{k} {list(v)}" for k, v in spec.structure) or "none")
        + f". Environment: preset {spec.env_preset!r}"
        + (f" with {spec.env}" if spec.env else "")
        + f"; {cfg.total_timesteps} env steps per run in the base configuration.",
        "Baselines on the same episodes (evaluated return): "
        + "; ".join(
            f"group {b['group']}{''.join(f', {k}={v:g}' for k, v in b['env'].items())}: "
            + ", ".join(f"{n} {v:.3g}" for n, v in b.items() if n not in ("group", "env"))
            for b in baselines[:8]
        )
        + ("; ..." if len(baselines) > 8 else "")
        + ".",
        f"Wall time {timing['total_s']:.0f} s: {runs / max(timing['total_s'], 1e-9) * 3600:,.0f} runs per hour. "
        "Results: `results.csv` (one row per run and evaluation point), `results.json`, TensorBoard logs in `tensorboard/`.",
    ]
    extra = {"study": spec.name, "kind": "controller", "spec": spec.resolved, "timing": timing, "baselines": baselines}
    return report.write_all(out, rows, lay, header, extra, ("eval_return", "train_return", "eval_perplexity"))


__all__ = ["run", "layout"]
