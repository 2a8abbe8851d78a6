"""Perplexity calibration tables: the data that ties the MEC environment to real FedPEAT runs.

The environment's perplexity follows the response model of mec_model.md ("surrogate" mode):

    ppl_t = ppl_inf(kbar) + (ppl_{t-1} - ppl_inf(kbar)) * exp(-eta(kbar) * data_fraction_t)

with one converged plug-in perplexity ``ppl_inf`` and one rate ``eta`` per emulator level
(k = number of middle blocks the emulator keeps), interpolated linearly in k between levels, and
``ppl0`` the plug-in perplexity of the untuned foundation model (before any round; it does not
depend on the emulator). These numbers must come from the project's own runs (``fedpeat
calibrate``); this module only defines, validates, reads and writes the table.

JSON schema (``schema`` = "fedpeat_jax.mec.calibration/1")::

    {
      "schema": "fedpeat_jax.mec.calibration/1",
      "model": {"name": "default", "vocab_size": 8192, "n_positions": 256, "n_embd": 256,
                "n_layer": 8, "n_head": 4, "d_mlp": 1024},
      "adapter": {"l": 2, "r": 2},
      "ppl0": 310.2,
      "levels": [{"k": 1, "ppl_inf": 95.0, "eta": 0.8}, ...],   # strictly increasing k
      "synthetic": false,
      "source": "fedpeat calibrate --model default ...",          # provenance, free text
      "meta": {...}                                               # optional: PEFT, corpus, fit residuals
    }

A table is tied to one model shape and adapter split: :meth:`CalibrationTable.check_model` raises
a ``ValueError`` naming every mismatch when the environment is built for another model.
``synthetic_table`` builds a clearly marked placeholder table (``synthetic: true``) for tests and
benchmarks, whose numbers are *not* measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

SCHEMA = "fedpeat_jax.mec.calibration/1"
DEFAULT_TABLE_PATH = Path(__file__).with_name("calibration_default.json")
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "d_mlp")


class CalibrationMissingError(FileNotFoundError):
    """No calibration table was given and the package ships no default table."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def model_shape(model) -> dict:
    """The shape fields of a GPT2Config that a calibration table is tied to."""
    return {name: int(getattr(model, name)) for name in SHAPE_FIELDS}


@dataclass(frozen=True)
class CalibrationTable:
    """A validated perplexity response table (see the module docstring for the JSON schema).

    model_name: preset name or label of the model the table was fitted on.
    model:      its shape (``SHAPE_FIELDS``); the env checks it against its GPT2Config.
    l, r:       the adapter split (bottom / top blocks); k counts middle blocks of that split.
    k:          emulator levels (strictly increasing middle-block counts, 0 <= k <= n_layer - l - r).
    ppl_inf:    converged plug-in perplexity per level (>= 1).
    eta:        rate of approach per level, per unit data fraction (> 0).
    ppl0:       plug-in perplexity before any tuning round (>= 1).
    synthetic:  True for placeholder tables that were not measured.
    source:     provenance (command line, commit, date); meta: free-form extra data.
    """

    model_name: str
    model: dict
    l: int
    r: int
    k: tuple
    ppl_inf: tuple
    eta: tuple
    ppl0: float
    synthetic: bool = False
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "k", tuple(int(v) for v in self.k))
        object.__setattr__(self, "ppl_inf", tuple(float(v) for v in self.ppl_inf))
        object.__setattr__(self, "eta", tuple(float(v) for v in self.eta))
        object.__setattr__(self, "ppl0", float(self.ppl0))
        object.__setattr__(self, "model", dict(self.model))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        missing = [f for f in SHAPE_FIELDS if f not in self.model]
        _require(not missing, f"calibration table: model shape lacks {missing} (need {list(SHAPE_FIELDS)})")
        for name in SHAPE_FIELDS:
            v = self.model[name]
            _require(isinstance(v, int) and v > 0, f"calibration table: model.{name} must be a positive integer, got {v!r}")
        n_layer = self.model["n_layer"]
        _require(self.l >= 0 and self.r >= 0, f"calibration table: adapter l, r must be >= 0, got l={self.l}, r={self.r}")
        k_full = n_layer - self.l - self.r
        _require(k_full > 0, f"calibration table: adapter l={self.l} + r={self.r} leaves no middle in {n_layer} blocks")
        _require(len(self.k) >= 1, "calibration table: needs at least one emulator level")
        _require(
            len(self.k) == len(self.ppl_inf) == len(self.eta),
            f"calibration table: k, ppl_inf, eta must have equal lengths, got {len(self.k)}, {len(self.ppl_inf)}, {len(self.eta)}",
        )
        _require(
            all(b > a for a, b in zip(self.k, self.k[1:])),
            f"calibration table: emulator levels k must be strictly increasing, got {list(self.k)}",
        )
        bad = [k for k in self.k if not 0 <= k <= k_full]
        _require(
            not bad,
            f"calibration table: emulator level(s) k={bad} do not exist for a {n_layer}-block model with "
            f"l={self.l}, r={self.r} (valid: 0..{k_full} middle blocks)",
        )
        for k, p, e in zip(self.k, self.ppl_inf, self.eta):
            _require(math.isfinite(p) and p >= 1.0, f"calibration table: ppl_inf at k={k} must be a finite perplexity >= 1, got {p}")
            _require(math.isfinite(e) and e > 0.0, f"calibration table: eta at k={k} must be finite and > 0, got {e}")
        _require(math.isfinite(self.ppl0) and self.ppl0 >= 1.0, f"calibration table: ppl0 must be a finite perplexity >= 1, got {self.ppl0}")

    def check_model(self, model, l: int, r: int) -> None:
        """Raise ValueError unless the table was fitted for ``model`` (GPT2Config) with split (l, r)."""
        shape = model_shape(model)
        diffs = [f"{k}: table {self.model[k]} vs env {shape[k]}" for k in SHAPE_FIELDS if self.model[k] != shape[k]]
        if (self.l, self.r) != (l, r):
            diffs.append(f"adapter (l, r): table {(self.l, self.r)} vs env {(l, r)}")
        _require(
            not diffs,
            f"calibration table for model {self.model_name!r} does not match the environment's model: "
            + "; ".join(diffs)
            + ". Run `fedpeat calibrate` for this model or pass the matching table.",
        )

    @property
    def k_full(self) -> int:
        return self.model["n_layer"] - self.l - self.r

    # -- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": {"name": self.model_name, **self.model},
            "adapter": {"l": self.l, "r": self.r},
            "ppl0": self.ppl0,
            "levels": [{"k": k, "ppl_inf": p, "eta": e} for k, p, e in zip(self.k, self.ppl_inf, self.eta)],
            "synthetic": self.synthetic,
            "source": self.source,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration table") -> "CalibrationTable":
        _require(isinstance(data, dict), f"{where}: expected a JSON object, got {type(data).__name__}")
        _require(data.get("schema") == SCHEMA, f"{where}: schema must be {SCHEMA!r}, got {data.get('schema')!r}")
        for key in ("model", "adapter", "ppl0", "levels"):
            _require(key in data, f"{where}: missing key {key!r}")
        model = dict(data["model"])
        name = str(model.pop("name", "unnamed"))
        levels = data["levels"]
        _require(isinstance(levels, list) and levels, f"{where}: 'levels' must be a non-empty list")
        for i, lv in enumerate(levels):
            _require(
                isinstance(lv, dict) and {"k", "ppl_inf", "eta"} <= set(lv),
                f"{where}: levels[{i}] must have keys 'k', 'ppl_inf', 'eta', got {lv!r}",
            )
        try:
            return cls(
                model_name=name,
                model=model,
                l=int(data["adapter"]["l"]),
                r=int(data["adapter"]["r"]),
                k=[lv["k"] for lv in levels],
                ppl_inf=[lv["ppl_inf"] for lv in levels],
                eta=[lv["eta"] for lv in levels],
                ppl0=data["ppl0"],
                synthetic=bool(data.get("synthetic", False)),
                source=str(data.get("source", "")),
                meta=dict(data.get("meta", {})),
            )
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def replace(self, **changes) -> "CalibrationTable":
        return dataclasses.replace(self, **changes)


def load_calibration(path: Union[str, Path]) -> CalibrationTable:
    """Read and validate a calibration table from a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration table {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration table {str(path)!r} is not valid JSON: {err}") from None
    return CalibrationTable.from_dict(data, where=f"calibration table {str(path)!r}")


def default_table() -> CalibrationTable:
    """The table shipped with the package (written by ``fedpeat calibrate``), if there is one."""
    if not DEFAULT_TABLE_PATH.is_file():
        raise CalibrationMissingError(
            f"no perplexity calibration table: the package has no {DEFAULT_TABLE_PATH.name} yet. "
            "Run `fedpeat calibrate` to fit one from real FedPEAT runs, or pass a table explicitly "
            "(calibration=CalibrationTable | path to its JSON)."
        )
    return load_calibration(DEFAULT_TABLE_PATH)


def resolve_table(calibration: Union[CalibrationTable, str, Path, None]) -> CalibrationTable:
    """A table from a CalibrationTable, a JSON path, or None (the shipped default table)."""
    if calibration is None:
        return default_table()
    if isinstance(calibration, CalibrationTable):
        return calibration
    if isinstance(calibration, (str, Path)):
        return load_calibration(calibration)
    raise TypeError(f"calibration must be a CalibrationTable, a path or None, got {type(calibration).__name__}")


def default_levels(k_full: int, n_levels: int = 4) -> tuple:
    """Evenly spaced emulator levels k_full/n, 2 k_full/n, ..., k_full (deduplicated, >= 1)."""
    ks = sorted({max(1, int(round(k_full * (i + 1) / n_levels))) for i in range(n_levels)})
    return tuple(ks)


def synthetic_table(model, l: int = 2, r: int = 2, k: Optional[tuple] = None, model_name: str = "synthetic",
                    ppl0: float = 100.0) -> CalibrationTable:
    """A SYNTHETIC placeholder table (``synthetic=True``): for tests and throughput benchmarks only.

    Its numbers are made up, not measured: ppl_inf falls linearly from 0.8 ppl0 (k = 0) to
    0.5 ppl0 (k = k_full) and eta = 1.0 at every level. Nothing about FedPEAT can be concluded
    from an environment built on it.
    """
    from fedpeat_jax.config import adapter_layers

    adapter_layers(model.n_layer, l, r)
    k_full = model.n_layer - l - r
    ks = default_levels(k_full) if k is None else tuple(int(v) for v in k)
    return CalibrationTable(
        model_name=model_name,
        model=model_shape(model),
        l=l,
        r=r,
        k=ks,
        ppl_inf=[ppl0 * (0.8 - 0.3 * kk / k_full) for kk in ks],
        eta=[1.0] * len(ks),
        ppl0=ppl0,
        synthetic=True,
        source="synthetic placeholder (fedpeat_jax.mec.calibration.synthetic_table); not measured",
    )


__all__ = [
    "CalibrationMissingError",
    "CalibrationTable",
    "DEFAULT_TABLE_PATH",
    "SCHEMA",
    "default_levels",
    "default_table",
    "load_calibration",
    "model_shape",
    "resolve_table",
    "synthetic_table",
]
