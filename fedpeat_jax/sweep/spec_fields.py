"""What every study spec of `fedpeat sweep` shares, whatever it runs (`spec.py`: federated runs;
`controller_spec.py`: SABPPO runs): reading the file and its `--set` overrides, numeric axes
(lists and ranges), seeds, the sampler and its trial counts, the name. Every error names the
field and says what is wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SAMPLERS = ("grid", "random", "optuna")
OPTUNA_SAMPLERS = ("tpe", "random", "qmc")


class SpecError(ValueError):
    """A bad spec: the message names the file and the field."""


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


class Study:
    """What every kind of spec has: its file, its resolved fields, seeds, numeric axes and a sampler."""

    def error(self, field: str, message: str) -> SpecError:
        return SpecError(f"spec {self.path}: {field}: {message}")

    @property
    def axis_names(self) -> tuple:
        return tuple(a.name for a in self.axes)

    def settings_per_group(self) -> int:
        if self.sampler == "grid":
            return math.prod(len(a.grid()) for a in self.axes)
        return self.trials

    def log_axes(self) -> tuple:
        """Axes plotted on a log scale: log ranges, and lists spanning two decades or more."""
        out = []
        for a in self.axes:
            points = axis_points(a)
            if (a.is_range and a.log) or (not a.is_range and min(points) > 0 and max(points) / min(points) >= 100):
                out.append(a.name)
        return tuple(out)


def show(value) -> str:
    """A setting's value in labels and messages: 0.001, [1,2], lora."""
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def axis_points(axis: Axis) -> tuple:
    return axis.values if not axis.is_range else (axis.low, axis.high)


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
        raise SpecError(f"spec {path} must hold a mapping of fields (name, seeds, axes, ...; see docs/sweep.md)")
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


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_axis(path: str, name: str, raw) -> Axis:
    field = f"axes.{name}"
    fail = lambda message: SpecError(f"spec {path}: {field}: {message}")  # noqa: E731
    if isinstance(raw, list):
        if not raw:
            raise fail("the axis is empty: give at least one value")
        if not all(number(v) for v in raw):
            raise fail(f"values must be numbers, got {raw}")
        if len(set(raw)) != len(raw):
            raise fail(f"values repeat: {raw}")
        return Axis(name, values=tuple(float(v) for v in raw))
    if number(raw):
        return Axis(name, values=(float(raw),))
    if not isinstance(raw, dict):
        raise fail(f"expected a list of values or a range {{low, high, log, num}}, got {raw!r}")
    unknown = sorted(set(raw) - {"low", "high", "log", "num"})
    if unknown:
        raise fail(f"unknown range field(s) {unknown}; a range has low, high, log (true/false) and num (grid points)")
    low, high, log, num = raw.get("low"), raw.get("high"), raw.get("log", False), raw.get("num")
    if not (number(low) and number(high)):
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


def integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_seeds(data: dict, fail) -> tuple:
    """The field seeds: a count n (seeds 0..n-1) or a list of distinct integers >= 0."""
    seeds = data.get("seeds", 1)
    if integer(seeds):
        if seeds < 1:
            raise fail("seeds", f"must be >= 1 (a count) or a list of seeds, got {seeds}")
        return tuple(range(seeds))
    if isinstance(seeds, list) and seeds and all(integer(s) and s >= 0 for s in seeds):
        if len(set(seeds)) != len(seeds):
            raise fail("seeds", f"seeds repeat: {seeds}")
        return tuple(seeds)
    raise fail("seeds", f"expected a count >= 1 or a non-empty list of integers >= 0, got {seeds!r}")


def parse_axes(path: str, data: dict, resolve, check) -> tuple:
    """The field axes: `resolve(path, name)` gives a name's hyperparameter (or raises naming it);
    `check(name, value)` raises ValueError for a value that cannot run."""
    raw_axes = data.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise SpecError(f"spec {path}: axes: expected a mapping of hyperparameter: values, got {raw_axes!r}")
    axes = []
    for name, raw in raw_axes.items():
        axis = parse_axis(path, resolve(path, name), raw)
        if axis.name in {a.name for a in axes}:
            raise SpecError(f"spec {path}: axes.{name}: {axis.name} is given twice")
        for value in axis_points(axis):  # each value alone (negative learning rates, ...); per group later
            try:
                check(axis.name, value)
            except ValueError as e:
                raise SpecError(f"spec {path}: axes.{name}: {e}") from None
        axes.append(axis)
    return tuple(axes)


def parse_search(data: dict, axes: tuple, fail, samplers=SAMPLERS) -> dict:
    """The fields sampler, trials, batch, optuna_sampler and sampler_seed, checked together."""
    sampler = data.get("sampler", "grid")
    if sampler not in samplers:
        raise fail("sampler", f"must be one of {samplers}, got {sampler!r}")
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
        if not (integer(trials) and trials >= 1):
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
            if not (integer(batch) and 1 <= batch <= trials):
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
    if not integer(sampler_seed):
        raise fail("sampler_seed", f"must be an integer, got {sampler_seed!r}")
    return {
        "sampler": sampler,
        "trials": trials,
        "batch": batch,
        "optuna_sampler": optuna_sampler,
        "sampler_seed": sampler_seed,
    }


def parse_name(data: dict, path: str, fail) -> str:
    name = data.get("name") or Path(path).stem
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise fail("name", f"must be a word (letters, digits, _ . -), got {name!r}")
    return name


__all__ = [
    "Axis",
    "SpecError",
    "Study",
    "SAMPLERS",
    "OPTUNA_SAMPLERS",
    "apply_overrides",
    "axis_points",
    "integer",
    "number",
    "parse_axes",
    "parse_axis",
    "parse_name",
    "parse_search",
    "parse_seeds",
    "read_file",
    "show",
]
