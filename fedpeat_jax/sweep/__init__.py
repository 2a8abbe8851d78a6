"""Hyperparameter studies (`fedpeat sweep`): a spec, samplers, one compiled call per structural
group, and the report; of federated runs (`federated.py`, on `fed.sweep`) or of SABPPO training
runs (`controller.py`, spec `kind: controller`).

    from fedpeat_jax.sweep import run_spec
    result = run_spec("study.yaml", ["base.fed.rounds=20"], out="runs/sweep/study")
"""

from __future__ import annotations

from pathlib import Path


def run_spec(
    path,
    overrides=(),
    *,
    out=None,
    resume: bool = True,
    cache_dir=None,
    dry_run: bool = False,
    show_progress: bool = True,
    log=print,
) -> dict:
    """Load and check the spec at `path` (with `KEY=VALUE` overrides) and run its study in `out`
    (default runs/sweep/<name>): federated runs, or with `kind: controller` SABPPO runs; prints
    where the report is."""
    from fedpeat_jax.sweep import controller, federated, report
    from fedpeat_jax.sweep import spec as spec_lib

    spec = spec_lib.load(path, overrides)
    out = Path(out if out is not None else Path("runs") / "sweep" / spec.name)
    common = dict(resume=resume, show_progress=show_progress, log=log, dry_run=dry_run)
    if isinstance(spec, spec_lib.Spec):
        kind = federated
        result = federated.run(spec, out, cache_dir=cache_dir, **common)
    else:
        kind = controller
        result = controller.run(spec, out, **common)
    if result.get("files"):
        layout = kind.layout(spec)
        best = [f"  group {g['group']} ({g['label']}): {report.best_line(g, layout)}" for g in result["summary"]]
        log("\n".join(["best settings (seed mean ± standard error):", *best]))
        log(f"report: {result['files']['report']}")
    return result


__all__ = ["run_spec"]
