"""Federated tuning from settings to an exported model: what `fedpeat tune` runs.

    summary = run_tune(TaskConfig(text=TextConfig(corpus="~/books")), PeftConfig(), FedConfig(rounds=10),
                       model_dir="~/gpt2", out="runs/books")

Order of work, so that a mistake costs nothing: the settings are checked against the model's
shape (config.json only), then the text is loaded, held out and partitioned (every data check),
and only then are weights loaded (or a foundation model pretrained), the text tokenized and the
rounds run. The run directory holds TensorBoard/JSONL logs, checkpoints (an interrupted run
resumes; a corrupt newest checkpoint is set aside and the previous one used) and the tuned model
in Hugging Face format.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from fedpeat_jax.config import FedConfig, PeftConfig
from fedpeat_jax.peat.pretrained import load_model, model_config
from fedpeat_jax.tasks import Task, TaskConfig, plan_task, tokenize_task

EXPORTABLE = ("lora", "bitfit", "full")  # PEFT kinds that merge into plain GPT-2 weights
DEFAULT_PEFT = PeftConfig(
    kind="lora", lora_rank=8, lora_alpha=16.0
)  # what `fedpeat tune` and `fedpeat sweep` tune by default


def _perplexity(nll_and_count) -> Optional[float]:
    """exp(mean NLL), or None when nothing was evaluated (never an invented 1.0)."""
    if nll_and_count is None:
        return None
    total, count = (float(x) for x in nll_and_count)
    return float(np.exp(total / count)) if count > 0 else None


def _federate(
    params, model, peft_cfg: PeftConfig, fed_cfg: FedConfig, task: Task, out: Path, *, resume: bool, show_progress: bool
) -> dict:
    """The engine's part of a run (the only place this module calls it): zero-shot evaluation,
    the rounds, and the tuned weights. Returns {"round", "history", "zero_shot", "merged", "peft_state", "peft_full"} on the host.

    With several devices (or processes started by `fed.sharding.initialize_distributed`) the
    clients are split over all of them; each process puts only its own clients on its devices."""
    import jax
    import jax.numpy as jnp

    from fedpeat_jax.fed import driver, sharding
    from fedpeat_jax.fed.data import FedData, from_process_local, pad_clients, process_slice
    from fedpeat_jax.fed.simulation import FedPEAT

    train, mesh = task.train, None
    if jax.device_count() > 1:  # several devices, or several processes: split the clients over all of them
        mesh = sharding.client_mesh()
        train = pad_clients(train, mesh.size)
        n = train.n_clients
        train = from_process_local(FedData(*(np.asarray(x)[process_slice(n)] for x in train)), n, mesh)
        params = sharding.replicate(params, mesh)
    sim = FedPEAT(model, peft_cfg, fed_cfg, n_clients=int(train.tokens.shape[0]), mesh=mesh)
    zero = None
    if task.heldout is not None:
        state0 = jax.jit(sim.init)(jax.random.key(fed_cfg.seed), params)
        zero = driver._host(jax.jit(sim.eval_nll)(state0, params, *map(jnp.asarray, task.heldout)))
    server = tuple(map(jnp.asarray, task.server)) if fed_cfg.server_participation else None
    result = driver.train(
        sim,
        params,
        train,
        seed=fed_cfg.seed,
        eval_data=task.heldout,
        server_data=server,
        logdir=out / "logs",
        ckpt_dir=out / "checkpoints",
        resume=resume,
        show_progress=show_progress,
    )
    if sim.learner.kind == "model":  # full fine-tuning: the trained tree is the model itself
        merged, peft_state, peft_full = result.state.trainable, None, None
    else:
        merged, peft_state, peft_full = sim.base_params(result.state, params), result.state.trainable, sim.peft_full
    return {
        "round": int(driver._host(result.state.round)),
        "history": result.history,
        "zero_shot": zero,
        "merged": driver._host(merged),
        "peft_state": driver._host(peft_state),
        "peft_full": peft_full,
    }


def set_aside(path: Path) -> Optional[Path]:
    """Rename an existing run directory to `<name>.old-<time>` (nothing is deleted); its new path."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    path.rename(target)
    return target


def check_seq_len(task_cfg: TaskConfig, model) -> None:
    if task_cfg.seq_len > model.n_positions:
        raise ValueError(
            f"TaskConfig.seq_len ({task_cfg.seq_len}) exceeds the model's n_positions ({model.n_positions})"
        )


def load_task(plan, task_cfg: TaskConfig, preset: str, model_dir=None, cache_dir=None) -> tuple:
    """(params, model config without dropout, tokenizer, tokenized task) of a planned run: the
    weights are loaded (or the foundation model pretrained) only here, after every check."""
    params, model, tokenizer = load_model(preset, model_dir, cache_dir)
    model = model.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    return params, model, tokenizer, tokenize_task(plan, task_cfg, tokenizer)


def run_tune(
    task_cfg: TaskConfig,
    peft_cfg: PeftConfig,
    fed_cfg: FedConfig,
    *,
    preset: str = "default",
    model_dir=None,
    out="runs/tune",
    resume: bool = True,
    cache_dir=None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Check, load, partition, run FedPEAT, export the plug-in model; returns a summary dict.

    resume=False sets an existing `out` aside (renamed, never deleted) and starts over.
    """
    import jax

    from fedpeat_jax.fed import sharding
    from fedpeat_jax.model import hf

    shape = model_config(preset, model_dir)  # config.json only: no weights yet
    fed_cfg.validate(model=shape)
    peft_cfg.validate(shape)
    check_seq_len(task_cfg, shape)
    plan = plan_task(task_cfg, cache_dir)  # every data check, before any weights are loaded or pretrained
    try:
        fed_cfg.validate(n_clients=plan.n_clients)
    except ValueError as e:
        if task_cfg.partition != "natural" or task_cfg.text.is_shakespeare:
            raise
        raise ValueError(
            f"{e}: the natural partition makes one client per document; TaskConfig.partition 'iid' or "
            "'dirichlet' with TaskConfig.n_clients makes any number"
        ) from None
    log(f"data: {plan.summary}")

    params, model, tokenizer, task = load_task(plan, task_cfg, preset, model_dir, cache_dir)
    if task.heldout is None:
        log("no held-out text (TextConfig.heldout_docs / heldout_fraction): no perplexity is measured or reported")
    out = Path(out).expanduser()
    primary = jax.process_index() == 0  # in a run spanning processes, process 0 writes the files
    if not resume and primary:
        old = set_aside(out)
        if old is not None:
            log(f"the earlier run in {out} was moved to {old}")
    sharding.barrier("run directory ready")
    run = _federate(params, model, peft_cfg, fed_cfg, task, out, resume=resume, show_progress=show_progress)

    export = out / "model"
    if primary and (peft_cfg.kind in EXPORTABLE or fed_cfg.trainable == "model"):
        hf.save_pretrained(
            run["merged"],
            model,
            export,
            peft_state=run["peft_state"],
            peft_config=run["peft_full"],
            tokenizer=tokenizer,
            overwrite=True,
        )
    history = run["history"]
    plugin_ppl = next((h["plugin_ppl"] for h in reversed(history) if "plugin_ppl" in h), None)
    if not history and (out / "summary.json").is_file():  # a finished run, rerun: nothing new was measured
        plugin_ppl = json.loads((out / "summary.json").read_text()).get("plugin_ppl")
    summary = {
        "data": plan.summary,
        "clients": int(task.train.tokens.shape[0]),
        "client_tokens": task.n_tokens,
        "heldout_documents": list(plan.heldout_docs),
        "rounds": run["round"],
        "zero_shot_ppl": _perplexity(run["zero_shot"]),
        "plugin_ppl": plugin_ppl,
        "run_dir": str(out),
        "exported_model": str(export) if export.exists() else None,
    }
    if primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["run_tune", "set_aside", "check_seq_len", "load_task", "DEFAULT_PEFT", "EXPORTABLE"]
