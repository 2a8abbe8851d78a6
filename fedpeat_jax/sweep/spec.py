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

Overrides on the command line (`--set base.fed.rounds=20 --set axes.client_lr=[1e-3,1e-2]`) change
the file's values before the checks. Every error names the field (`axes.client_lr`, `structure.
fed.algorithm`, `batch`) and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fedpeat_jax.config import GPT2_PRESETS, FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.data.source import TextConfig
from fedpeat_jax.tasks import TaskConfig
from fedpeat_jax.tune import DEFAULT_PEFT

HYPERPARAMETERS = ("client_lr", "server_lr", "prox_mu", "dp_noise")  # `fed.client.Hyper`'s fields: traced, vmappable
SAMPLERS = ("grid", "random", "optuna")
OPTUNA_SAMPLERS = ("tpe", "random", "qmc")
OBJECTIVES = ("plugin_ppl", "loss")  # minimized: held-out plug-in perplexity, or the final training loss
SECTIONS = {"text": TextConfig, "task": TaskConfig, "peft": PeftConfig, "fed": FedConfig}
ALIASES = {"emulator_k": ("fed", "emulator_levels")}  # structure: emulator_k: [1, 2] -> fed.emulator_levels (1,), (2,)
KEYS = (
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


class SpecError(ValueError):
    """A bad spec: the message names the file and the field."""


def _defaults() -> dict:
    return {"text": TextConfig(), "task": TaskConfig(), "peft": DEFAULT_PEFT, "fed": FedConfig()}


@dataclass(frozen=True)
class Axis:
    """A numeric axis: a list of values, or a range (low, high, linear or log; `num` grid points)."""

    name: str
    values: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    num: Optional[int] = None

    @property
    def is_range(self) -> bool:
        return self.values is None

    def grid(self) -> tuple:
        if not self.is_range:
            return self.values
        if self.num == 1:
            return (self.low,)
        if self.log:
            points = [
                math.exp(math.log(self.low) + i * (math.log(self.high) - math.log(self.low)) / (self.num - 1))
                for i in range(self.num)
            ]
        else:
            points = [self.low + i * (self.high - self.low) / (self.num - 1) for i in range(self.num)]
        return tuple(float(f"{p:.10g}") for p in points)

    def describe(self) -> str:
        if not self.is_range:
            return ", ".join(f"{v:g}" for v in self.values)
        scale = "log" if self.log else "linear"
        return f"{self.low:g} .. {self.high:g} ({scale}{'' if self.num is None else f', {self.num} points'})"


@dataclass(frozen=True)
class Group:
    """One structural combination: its own compiled program."""

    index: int
    choices: tuple  # ((structure key, value), ...)
    peft: PeftConfig
    fed: FedConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.choices) or "base"


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Spec:
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

    def error(self, field: str, message: str) -> SpecError:
        return SpecError(f"spec {self.path}: {field}: {message}")

    @property
    def axis_names(self) -> tuple:
        return tuple(a.name for a in self.axes)

    def settings_per_group(self) -> int:
        if self.sampler == "grid":
            return math.prod(len(a.grid()) for a in self.axes)
        return self.trials

    def groups(self, model: GPT2Config, n_clients: int) -> list:
        """Every structural combination as a validated (PEFT, FedConfig) pair, checked against the
        model's shape and the clients that exist: a value that cannot run is refused here, naming it."""
        from fedpeat_jax.fed.simulation import FedPEAT

        keys = [k for k, _ in self.structure]
        out = []
        for index, values in enumerate(itertools.product(*(v for _, v in self.structure))):
            choices = tuple(zip(keys, values))
            field = "structure " + ", ".join(f"{k}={_show(v)}" for k, v in choices) if choices else "base"
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
                for value in _axis_points(axis):
                    try:
                        fed.replace(**{axis.name: value})
                    except ValueError as e:
                        raise self.error(f"axes.{axis.name}", f"{_show(value)} cannot run with {field}: {e}") from None
            out.append(Group(index, choices, peft, fed))
        return out


def _axis_points(axis: Axis) -> tuple:
    return axis.values if not axis.is_range else (axis.low, axis.high)


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------
def read_file(path) -> dict:
    """The spec file as a dict (YAML, or JSON which YAML reads too)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise SpecError(f"spec {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"spec {path} is not valid YAML or JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec {path} must hold a mapping of fields ({', '.join(KEYS)})")
    return data


def apply_overrides(data: dict, overrides, path: str) -> dict:
    """`KEY=VALUE` overrides (KEY dotted, VALUE read as YAML: 3, 1e-3, [1, 2], {low: 1, high: 2})."""
    import yaml

    data = json.loads(json.dumps(data))
    for item in overrides or ():
        if "=" not in item:
            raise SpecError(f"--set {item}: expected KEY=VALUE, e.g. base.fed.rounds=20")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        # structure and axes keys may themselves hold a dot (structure.peft.lora_rank): the rest is one key
        if parts[0] in ("axes", "structure") and len(parts) > 2:
            parts = [parts[0], ".".join(parts[1:])]
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {key}: {part} is not a mapping in spec {path}")
        node[parts[-1]] = value
    return data


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_axis(path: str, name: str, raw) -> Axis:
    field = f"axes.{name}"
    fail = lambda message: SpecError(f"spec {path}: {field}: {message}")  # noqa: E731
    if isinstance(raw, list):
        if not raw:
            raise fail("the axis is empty: give at least one value")
        if not all(_number(v) for v in raw):
            raise fail(f"values must be numbers, got {raw}")
        if len(set(raw)) != len(raw):
            raise fail(f"values repeat: {raw}")
        return Axis(name, values=tuple(float(v) for v in raw))
    if _number(raw):
        return Axis(name, values=(float(raw),))
    if not isinstance(raw, dict):
        raise fail(f"expected a list of values or a range {{low, high, log, num}}, got {raw!r}")
    unknown = sorted(set(raw) - {"low", "high", "log", "num"})
    if unknown:
        raise fail(f"unknown range field(s) {unknown}; a range has low, high, log (true/false) and num (grid points)")
    low, high, log, num = raw.get("low"), raw.get("high"), raw.get("log", False), raw.get("num")
    if not (_number(low) and _number(high)):
        raise fail(f"a range needs numbers low and high, got low={low!r}, high={high!r}")
    if not low < high:
        raise fail(f"the range is empty: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise fail(f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise fail(f"a log range needs low > 0, got {low}")
    if num is not None and not (isinstance(num, int) and not isinstance(num, bool) and num >= 1):
        raise fail(f"num must be an integer >= 1, got {num!r}")
    return Axis(name, low=float(low), high=float(high), log=log, num=num)


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


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse(data: dict, path: str = "<spec>") -> Spec:
    """A checked `Spec` from the file's mapping (overrides applied)."""
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

    seeds = data.get("seeds", 1)
    if _integer(seeds):
        if seeds < 1:
            raise fail("seeds", f"must be >= 1 (a count) or a list of seeds, got {seeds}")
        seeds = tuple(range(seeds))
    elif isinstance(seeds, list) and seeds and all(_integer(s) and s >= 0 for s in seeds):
        if len(set(seeds)) != len(seeds):
            raise fail("seeds", f"seeds repeat: {seeds}")
        seeds = tuple(seeds)
    else:
        raise fail("seeds", f"expected a count >= 1 or a non-empty list of integers >= 0, got {seeds!r}")

    raw_axes = data.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise fail("axes", f"expected a mapping of hyperparameter: values, got {raw_axes!r}")
    axes = []
    for name, raw in raw_axes.items():
        axis = _parse_axis(path, _axis_name(path, name), raw)
        if axis.name in {a.name for a in axes}:
            raise fail(f"axes.{name}", f"{axis.name} is given twice")
        for value in _axis_points(axis):  # each value alone (negative learning rates, ...); per group in Spec.groups
            try:
                base["fed"].replace(**{axis.name: value})
            except ValueError as e:
                raise fail(f"axes.{name}", str(e)) from None
        axes.append(axis)
    structure = _parse_structure(path, data.get("structure"), base)

    sampler = data.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise fail("sampler", f"must be one of {SAMPLERS}, got {sampler!r}")
    trials, batch = data.get("trials"), data.get("batch")
    if sampler == "grid":
        for name, value in (("trials", trials), ("batch", batch)):
            if value is not None:
                raise fail(
                    name,
                    "the grid sampler runs every point of the grid; trials and batch are for sampler random or optuna",
                )
        for axis in axes:
            if axis.is_range and axis.num is None:
                raise fail(f"axes.{axis.name}", "a range on a grid needs num (the number of grid points)")
    else:
        if not axes:
            raise fail("axes", f"sampler {sampler} draws settings from the numeric axes; give at least one")
        if not (_integer(trials) and trials >= 1):
            raise fail("trials", f"sampler {sampler} needs trials (settings per structural group) >= 1, got {trials!r}")
        for axis in axes:
            if axis.is_range and axis.num is not None:
                raise fail(
                    f"axes.{axis.name}.num",
                    f"sampler {sampler} draws from the whole range; num is for the grid sampler",
                )
        if sampler == "random" and batch is not None:
            raise fail("batch", "the random sampler runs all its trials together; batch is for sampler optuna")
        if sampler == "optuna":
            batch = trials if batch is None else batch
            if not (_integer(batch) and 1 <= batch <= trials):
                raise fail(
                    "batch", f"trials per Optuna batch must be an integer in 1..trials ({trials}), got {batch!r}"
                )
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise fail(
                    "sampler", "optuna is not installed: pip install optuna (or pip install 'fedpeat_jax[sweep]')"
                ) from None
    optuna_sampler = data.get("optuna_sampler", "tpe")
    if optuna_sampler not in OPTUNA_SAMPLERS:
        raise fail("optuna_sampler", f"must be one of {OPTUNA_SAMPLERS}, got {optuna_sampler!r}")
    sampler_seed = data.get("sampler_seed", 0)
    if not _integer(sampler_seed):
        raise fail("sampler_seed", f"must be an integer, got {sampler_seed!r}")
    objective = data.get("objective", "plugin_ppl")
    if objective not in OBJECTIVES:
        raise fail("objective", f"must be one of {OBJECTIVES} (minimized), got {objective!r}")
    run_chunk = data.get("run_chunk")
    if run_chunk is not None and not (_integer(run_chunk) and run_chunk >= 1):
        raise fail(
            "run_chunk",
            f"runs vmapped at once must be null (chosen for throughput within the memory budget) or an integer >= 1, got {run_chunk!r}",
        )
    if run_chunk is not None and sampler == "optuna":
        raise fail("run_chunk", "an Optuna batch (batch trials x seeds) runs in one call: set batch instead")
    name = data.get("name") or Path(path).stem
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise fail("name", f"must be a word (letters, digits, _ . -), got {name!r}")
    return Spec(
        path=str(path),
        name=name,
        preset=preset,
        model_dir=model_dir,
        text=base["text"],
        task=base["task"],
        peft=base["peft"],
        fed=base["fed"],
        seeds=seeds,
        axes=tuple(axes),
        structure=structure,
        sampler=sampler,
        trials=trials,
        batch=batch,
        sampler_seed=sampler_seed,
        optuna_sampler=optuna_sampler,
        objective=objective,
        run_chunk=run_chunk,
        resolved=data,
    )


def load(path, overrides=()) -> Spec:
    """Read, override and check a spec file."""
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
