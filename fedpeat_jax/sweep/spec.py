"""The study spec of `fedpeat sweep`: a small YAML or JSON file, checked field by field before
anything is loaded or compiled.

    name: lr-study
    model: {preset: tiny}                 # or {dir: ~/gpt2}: a Hugging Face GPT-2 directory
    base:                                 # the sections of `fedpeat tune --config`: text, task, peft, fed
      fed: {rounds: 10, clients_per_round: 16}
    seeds: 4                              # seeds 0..3, or a list [0, 7, 9]
    axes:                                 # traced hyperparameters: every value runs in one compiled call
      client_lr: {low: 1.0e-4, high: 1.0e-2, log: true, num: 4}
      server_lr: [0.5, 1.0, 2.0, 4.0]
    structure:                            # static choices: each combination compiles separately
      peft.lora_rank: [4, 8]
      emulator_k: [1, 2]
    sampler: grid                         # grid | random | optuna
    trials: 16                            # random, optuna: settings per structural group
    batch: 8                              # optuna: trials asked, run vmapped and told at a time

With `kind: controller` the spec is one of SABPPO training runs instead (`controller_spec.py`);
the fields both kinds share are read in `spec_fields.py`.

Overrides on the command line (`--set base.fed.rounds=20 --set axes.client_lr=[1e-3,1e-2]`) change
the file's values before the checks. Every error names the field (`axes.client_lr`, `structure.
fed.algorithm`, `batch`) and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Optional

from fedpeat_jax.config import GPT2_PRESETS, FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.sweep.spec_fields import (
    SAMPLERS,
    Axis,
    SpecError,
    Study,
    apply_overrides,
    axis_points,
    integer,
    parse_axes,
    parse_name,
    parse_search,
    parse_seeds,
    read_file,
    show,
)
from fedpeat_jax.tasks import TaskConfig
from fedpeat_jax.tune import DEFAULT_PEFT

HYPERPARAMETERS = ("client_lr", "server_lr", "prox_mu", "dp_noise")  # `fed.client.Hyper`'s fields: traced, vmappable
OBJECTIVES = ("plugin_ppl", "loss")  # minimized: held-out plug-in perplexity, or the final training loss
SECTIONS = {"text": TextConfig, "task": TaskConfig, "peft": PeftConfig, "fed": FedConfig}
ALIASES = {"emulator_k": ("fed", "emulator_levels")}  # structure: emulator_k: [1, 2] -> fed.emulator_levels (1,), (2,)
KINDS = ("federated", "controller")  # what a study runs: FedPEAT runs, or SABPPO training runs (controller_spec.py)
KEYS = (
    "kind",
    "name",
    "model",
    "base",
    "seeds",
    "axes",
    "structure",
    "sampler",
    "trials",
    "batch",
    "sampler_seed",
    "optuna_sampler",
    "objective",
    "run_chunk",
)


def _defaults() -> dict:
    return {"text": TextConfig(), "task": TaskConfig(), "peft": DEFAULT_PEFT, "fed": FedConfig()}


@dataclass(frozen=True)
class Group:
    """One structural combination: its own compiled program."""

    index: int
    choices: tuple  # ((structure key, value), ...)
    peft: PeftConfig
    fed: FedConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={show(v)}" for k, v in self.choices) or "base"


@dataclass(frozen=True)
class Spec(Study):
    """A federated study (`kind: federated`, the default)."""

    path: str  # the file (for messages)
    name: str
    preset: str
    model_dir: Optional[str]
    text: TextConfig
    task: TaskConfig
    peft: PeftConfig
    fed: FedConfig
    seeds: tuple
    axes: tuple  # Axis, in the file's order
    structure: tuple  # ((key, (values...)), ...); key "peft.x" / "fed.x"
    sampler: str
    trials: Optional[int]
    batch: Optional[int]
    sampler_seed: int
    optuna_sampler: str
    objective: str
    run_chunk: Optional[int]
    resolved: dict  # the spec as run (overrides applied), written next to the results

    def groups(self, model: GPT2Config, n_clients: int) -> list:
        """Every structural combination as a validated (PEFT, FedConfig) pair, checked against the
        model's shape and the clients that exist: a value that cannot run is refused here, naming it."""
        from fedpeat_jax.fed.simulation import FedPEAT

        keys = [k for k, _ in self.structure]
        out = []
        for index, values in enumerate(itertools.product(*(v for _, v in self.structure))):
            choices = tuple(zip(keys, values))
            field = "structure " + ", ".join(f"{k}={show(v)}" for k, v in choices) if choices else "base"
            changes = {"peft": {}, "fed": {}}
            for key, value in choices:
                section, name = key.split(".")
                changes[section][name] = value
            try:
                peft, fed = self.peft.replace(**changes["peft"]), self.fed.replace(**changes["fed"])
                FedPEAT(model, peft, fed, n_clients=n_clients)
            except ValueError as e:
                raise self.error(field, f"cannot run: {e}") from None
            for axis in self.axes:
                if axis.name == "prox_mu" and fed.algorithm != "fedprox":
                    raise self.error(
                        "axes.prox_mu",
                        f"FedProx's mu acts only with fed.algorithm 'fedprox'; {field} has {fed.algorithm!r}",
                    )
                for value in axis_points(axis):
                    try:
                        fed.replace(**{axis.name: value})
                    except ValueError as e:
                        raise self.error(f"axes.{axis.name}", f"{show(value)} cannot run with {field}: {e}") from None
            out.append(Group(index, choices, peft, fed))
        return out


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------
def _axis_name(path: str, name: str) -> str:
    bare = name[4:] if name.startswith("fed.") else name
    if bare in HYPERPARAMETERS:
        return bare
    hint = ""
    if _structure_key(name) is not None:
        hint = f"; {name} is a static setting: put it under structure (each value compiles separately)"
    raise SpecError(
        f"spec {path}: axes.{name}: unknown hyperparameter; numeric axes are the traced hyperparameters "
        f"{', '.join(HYPERPARAMETERS)}{hint}"
    )


def _structure_key(name: str) -> Optional[tuple]:
    """('peft' | 'fed', field) of a structure key, or None."""
    if name in ALIASES:
        return ALIASES[name]
    if "." in name:
        section, field = name.split(".", 1)
        if section in ("peft", "fed") and field in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            return section, field
        return None
    owners = [s for s in ("peft", "fed") if name in {f.name for f in dataclasses.fields(SECTIONS[s])}]
    return (owners[0], name) if len(owners) == 1 else None


def _parse_structure(path: str, raw, base: dict) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise SpecError(f"spec {path}: structure: expected a mapping of setting: [values], got {raw!r}")
    out, seen = [], set()
    for name, values in raw.items():
        field = f"structure.{name}"
        key = _structure_key(name)
        if key is None:
            where = (
                " (task and text settings are shared by every group: set them under base)"
                if name.split(".")[0] in ("task", "text")
                else ""
            )
            raise SpecError(
                f"spec {path}: {field}: unknown setting{where}; use peft.FIELD or fed.FIELD (e.g. peft.lora_rank, "
                f"fed.aggregation) or emulator_k"
            )
        if key[1] in HYPERPARAMETERS:
            raise SpecError(
                f"spec {path}: {field}: {key[1]} is a traced hyperparameter: put it under axes (its values then run "
                "in one compiled call)"
            )
        if key[1] == "seed":
            raise SpecError(f"spec {path}: {field}: seeds are set by the top-level field seeds")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise SpecError(f"spec {path}: {field}: the axis is empty: give at least one value")
        if name in ALIASES:
            values = [tuple(v) if isinstance(v, list) else (v,) for v in values]
        else:
            values = [tuple(v) if isinstance(v, list) else v for v in values]
        dotted = ".".join(key)
        if dotted in seen:
            raise SpecError(f"spec {path}: {field}: {dotted} is given twice")
        seen.add(dotted)
        try:  # each value alone must make a valid config (types, ranges); combinations are checked in Spec.groups
            for v in values:
                base[key[0]].replace(**{key[1]: v})
        except ValueError as e:
            raise SpecError(f"spec {path}: {field}: {e}") from None
        out.append((dotted, tuple(values)))
    return tuple(out)


def _base(path: str, raw) -> dict:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise SpecError(f"spec {path}: base: expected a mapping with sections {sorted(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SpecError(f"spec {path}: base: unknown section(s) {unknown}; expected {sorted(SECTIONS)}")
    configs = _defaults()
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise SpecError(f"spec {path}: base.{name}: expected a mapping of fields")
        fields = {f.name for f in dataclasses.fields(cls)} - ({"text"} if name == "task" else set())
        bad = sorted(set(section) - fields)
        if bad:
            raise SpecError(f"spec {path}: base.{name}: unknown field(s) {bad}")
        if name == "fed" and "seed" in section:
            raise SpecError(f"spec {path}: base.fed.seed: a study's seeds are set by the top-level field seeds")
        try:
            configs[name] = dataclasses.replace(configs[name], **section)
        except ValueError as e:
            message = re.sub(rf"\b{cls.__name__}\.(\w+)", rf"base.{name}.\1", str(e))
            raise SpecError(f"spec {path}: {message}") from None
    configs["task"] = configs["task"].replace(text=configs["text"])
    return configs


def _check_hyper(base: dict):
    return lambda name, value: base["fed"].replace(**{name: value})


def parse(data: dict, path: str = "<spec>"):
    """A checked spec from the file's mapping (overrides applied): a `Spec` of federated runs, or
    with `kind: controller` a `controller_spec.ControllerSpec` of SABPPO runs."""
    kind = data.get("kind", "federated")
    if kind not in KINDS:
        raise SpecError(f"spec {path}: kind: must be one of {KINDS}, got {kind!r}")
    if kind == "controller":
        from fedpeat_jax.sweep.controller_spec import parse_controller

        return parse_controller(data, path)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise SpecError(f"spec {path}: unknown field(s) {unknown}; a spec has {', '.join(KEYS)}")
    fail = lambda field, message: SpecError(f"spec {path}: {field}: {message}")  # noqa: E731

    model = data.get("model") or {}
    if not isinstance(model, dict) or set(model) - {"preset", "dir"}:
        raise fail("model", f"expected {{preset: NAME}} or {{dir: PATH}}, got {model!r}")
    preset, model_dir = model.get("preset", "default"), model.get("dir")
    if model_dir is None and preset not in GPT2_PRESETS:
        raise fail("model.preset", f"unknown preset {preset!r}")
    base = _base(path, data.get("base"))
    seeds = parse_seeds(data, fail)
    axes = parse_axes(path, data, _axis_name, _check_hyper(base))
    structure = _parse_structure(path, data.get("structure"), base)
    search = parse_search(data, axes, fail)
    objective = data.get("objective", "plugin_ppl")
    if objective not in OBJECTIVES:
        raise fail("objective", f"must be one of {OBJECTIVES} (minimized), got {objective!r}")
    run_chunk = data.get("run_chunk")
    if run_chunk is not None and not (integer(run_chunk) and run_chunk >= 1):
        raise fail(
            "run_chunk",
            f"runs vmapped at once must be null (chosen for throughput within the memory budget) or an integer >= 1, got {run_chunk!r}",
        )
    if run_chunk is not None and search["sampler"] == "optuna":
        raise fail("run_chunk", "an Optuna batch (batch trials x seeds) runs in one call: set batch instead")
    return Spec(
        path=str(path),
        name=parse_name(data, path, fail),
        preset=preset,
        model_dir=model_dir,
        text=base["text"],
        task=base["task"],
        peft=base["peft"],
        fed=base["fed"],
        seeds=seeds,
        axes=axes,
        structure=structure,
        objective=objective,
        run_chunk=run_chunk,
        resolved=data,
        **search,
    )


def load(path, overrides=()):
    """Read, override and check a spec file (either kind)."""
    return parse(apply_overrides(read_file(path), overrides, str(path)), str(path))


__all__ = [
    "Axis",
    "Group",
    "Spec",
    "SpecError",
    "HYPERPARAMETERS",
    "SAMPLERS",
    "DEFAULT_PEFT",
    "load",
    "parse",
    "apply_overrides",
    "read_file",
]
