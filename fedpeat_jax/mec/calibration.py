"""Perplexity calibration tables: the data that ties the MEC environment to real FedPEAT runs.

The environment's perplexity follows a two-source response model (``system.two_source_perplexity``,
``docs/system_model.md``): the devices' data pulls the held-out plug-in perplexity towards
``ppl_inf(kbar)`` at rate ``eta(kbar)`` per unit of the devices' data fraction, the server's own
data towards its domain's ``ppl_inf`` at its own ``eta``, each scaled by its FedAvg weight in the
round (its share of the round's data)::

    a_dev = w_dev eta(kbar) phi_dev,   a_srv = w_srv eta_srv phi_srv,   w_j = phi_j / (phi_dev + phi_srv)
    ppl_t = P* + (ppl_{t-1} - P*) * exp(-A),   A = a_dev + a_srv,   P* = (a_dev ppl_inf(kbar) + a_srv ppl_inf_srv) / A

with one (ppl_inf, eta) per emulator level k (middle blocks the emulator keeps), interpolated
linearly in k, one per server data domain, and ``ppl0`` the plug-in perplexity of the untuned
model. The numbers come from the project's own runs (``fedpeat calibrate``); this module only
defines, validates, reads and writes the table.

JSON schema (``schema`` = "fedpeat_jax.mec.calibration/2")::

    {
      "schema": "fedpeat_jax.mec.calibration/2",
      "model": {"name": "default", "vocab_size": 8192, "n_positions": 256, "n_embd": 256,
                "n_layer": 8, "n_head": 4, "d_mlp": 1024},
      "adapter": {"l": 2, "r": 2},
      "ppl0": 310.2,
      "levels": [{"k": 0, "ppl_inf": 95.0, "eta": 0.8}, ...],   # device rounds, strictly increasing k
      "server": {"modern": {"ppl_inf": 300.1, "eta": 0.05, "data": 64}, ...},  # server-only rounds
      "server_domain": "modern",                                 # the default domain
      "drift": 2.8,        # optional (0): fixed-point rise when the same few devices keep training
      "population": [12, 7, 16, ...],          # examples of each device the fractions refer to
      "workload": {"local_steps": 4, "batch_size": 2, "seq_len": 64},  # one participant's round
      "synthetic": false,
      "source": "fedpeat calibrate ...",                          # provenance, free text
      "meta": {"model_fingerprint": ..., "model_params_sha256": ...,  # which weights were measured
               ...}                                               # measured curves, fit errors
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

import numpy as np

from fedpeat_jax.config import require

SCHEMA = "fedpeat_jax.mec.calibration/2"
WORKLOAD_FIELDS = ("local_steps", "batch_size", "seq_len")
DEFAULT_TABLE_PATH = Path(__file__).with_name("calibration_default.json")
SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "d_mlp")


class CalibrationMissingError(FileNotFoundError):
    """No calibration table was given and the package ships no default table."""


def model_shape(model) -> dict:
    """The shape fields of a GPT2Config that a calibration table is tied to."""
    return {name: int(getattr(model, name)) for name in SHAPE_FIELDS}


@dataclass(frozen=True)
class ServerResponse:
    """How server-only rounds on one data domain move the held-out perplexity."""

    ppl_inf: float  # the fixed point its data pulls towards (>= 1)
    eta: float  # rate per unit of server data / all devices' data (>= 0)
    data: float  # server examples the measurement used (the environment's default server_data)

    def __post_init__(self):
        for name in ("ppl_inf", "eta", "data"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class CalibrationTable:
    """A validated perplexity response table (see the module docstring for the JSON schema).

    model_name:   preset name or label of the model the table was fitted on.
    model:        its shape (``SHAPE_FIELDS``); the env checks it against its GPT2Config.
    l, r:         the adapter split (bottom / top blocks); k counts middle blocks of that split.
    k:            emulator levels (strictly increasing middle-block counts, 0 <= k <= n_layer - l - r).
    ppl_inf, eta: device rounds' fixed point (>= 1) and rate per unit data fraction (> 0), per level.
    ppl0:         plug-in perplexity before any tuning round (>= 1).
    server:       {domain: ServerResponse} of server-only rounds; ``server_domain`` names the default.
    drift:        how far the devices' fixed point rises when the same few devices keep training,
                  ``drift * (1/phi - 1)`` (``system.drifting_fixed_point``; fitted on fixed-subset
                  runs; 0 when not measured). The environment uses it only with
                  ``make_params(participation_drift=True)``.
    population:   examples held by each device of the measured population (the fractions' unit).
    workload:     {local_steps, batch_size, seq_len} of one participant's round, as measured.
    synthetic:    True for placeholder tables that were not measured.
    source:       provenance (command line, commit, date); meta: curves and fit errors.
    """

    model_name: str
    model: dict
    l: int
    r: int
    k: tuple
    ppl_inf: tuple
    eta: tuple
    ppl0: float
    server: dict
    server_domain: str
    population: tuple
    workload: dict
    drift: float = 0.0
    synthetic: bool = False
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "k", tuple(int(v) for v in self.k))
        object.__setattr__(self, "ppl_inf", tuple(float(v) for v in self.ppl_inf))
        object.__setattr__(self, "eta", tuple(float(v) for v in self.eta))
        object.__setattr__(self, "ppl0", float(self.ppl0))
        object.__setattr__(self, "drift", float(self.drift))
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "population", tuple(float(v) for v in self.population))
        object.__setattr__(self, "workload", {k: float(v) for k, v in dict(self.workload).items()})
        server = {}
        for domain, resp in dict(self.server).items():
            require(
                isinstance(resp, (ServerResponse, dict)),
                f"calibration table: server[{domain!r}] must be a ServerResponse or a dict, got {resp!r}",
            )
            server[str(domain)] = resp if isinstance(resp, ServerResponse) else ServerResponse(**resp)
        object.__setattr__(self, "server", server)
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        missing = [f for f in SHAPE_FIELDS if f not in self.model]
        require(not missing, f"calibration table: model shape lacks {missing} (need {list(SHAPE_FIELDS)})")
        for name in SHAPE_FIELDS:
            v = self.model[name]
            require(
                isinstance(v, int) and v > 0, f"calibration table: model.{name} must be a positive integer, got {v!r}"
            )
        n_layer = self.model["n_layer"]
        require(
            self.l >= 0 and self.r >= 0, f"calibration table: adapter l, r must be >= 0, got l={self.l}, r={self.r}"
        )
        k_full = n_layer - self.l - self.r
        require(k_full > 0, f"calibration table: adapter l={self.l} + r={self.r} leaves no middle in {n_layer} blocks")
        require(len(self.k) >= 1, "calibration table: needs at least one emulator level")
        require(
            len(self.k) == len(self.ppl_inf) == len(self.eta),
            f"calibration table: k, ppl_inf, eta must have equal lengths, got {len(self.k)}, {len(self.ppl_inf)}, {len(self.eta)}",
        )
        require(
            all(b > a for a, b in zip(self.k, self.k[1:])),
            f"calibration table: emulator levels k must be strictly increasing, got {list(self.k)}",
        )
        bad = [k for k in self.k if not 0 <= k <= k_full]
        require(
            not bad,
            f"calibration table: emulator level(s) k={bad} do not exist for a {n_layer}-block model with "
            f"l={self.l}, r={self.r} (valid: 0..{k_full} middle blocks)",
        )
        for k, p, e in zip(self.k, self.ppl_inf, self.eta):
            require(
                math.isfinite(p) and p >= 1.0,
                f"calibration table: ppl_inf at k={k} must be a finite perplexity >= 1, got {p}",
            )
            require(math.isfinite(e) and e > 0.0, f"calibration table: eta at k={k} must be finite and > 0, got {e}")
        require(
            math.isfinite(self.ppl0) and self.ppl0 >= 1.0,
            f"calibration table: ppl0 must be a finite perplexity >= 1, got {self.ppl0}",
        )
        require(math.isfinite(self.drift), f"calibration table: drift must be finite, got {self.drift}")
        require(self.server, "calibration table: 'server' must hold the response of at least one server data domain")
        for domain, resp in self.server.items():
            require(
                math.isfinite(resp.ppl_inf) and resp.ppl_inf >= 1.0,
                f"calibration table: server[{domain!r}].ppl_inf must be a finite perplexity >= 1, got {resp.ppl_inf}",
            )
            require(
                math.isfinite(resp.eta) and resp.eta >= 0.0,
                f"calibration table: server[{domain!r}].eta must be finite and >= 0, got {resp.eta}",
            )
            require(
                math.isfinite(resp.data) and resp.data > 0,
                f"calibration table: server[{domain!r}].data must be > 0 examples, got {resp.data}",
            )
        require(
            self.server_domain in self.server,
            f"calibration table: server_domain {self.server_domain!r} is not one of the measured domains {sorted(self.server)}",
        )
        require(
            len(self.population) >= 1 and all(math.isfinite(d) and d > 0 for d in self.population),
            f"calibration table: population must list every device's examples (> 0), got {list(self.population)}",
        )
        require(
            set(self.workload) == set(WORKLOAD_FIELDS) and all(v >= 1 for v in self.workload.values()),
            f"calibration table: workload must give {list(WORKLOAD_FIELDS)} (each >= 1), got {self.workload}",
        )

    def check_model(self, model, l: int, r: int) -> None:
        """Raise ValueError unless the table was fitted for ``model`` (GPT2Config) with split (l, r)."""
        shape = model_shape(model)
        diffs = [f"{k}: table {self.model[k]} vs env {shape[k]}" for k in SHAPE_FIELDS if self.model[k] != shape[k]]
        if (self.l, self.r) != (l, r):
            diffs.append(f"adapter (l, r): table {(self.l, self.r)} vs env {(l, r)}")
        require(
            not diffs,
            f"calibration table for model {self.model_name!r} does not match the environment's model: "
            + "; ".join(diffs)
            + ". Run `fedpeat calibrate` for this model or pass the matching table.",
        )

    @property
    def k_full(self) -> int:
        return self.model["n_layer"] - self.l - self.r

    def server_response(self, domain: Optional[str] = None) -> ServerResponse:
        """The server-only response of ``domain`` (default: the table's ``server_domain``)."""
        domain = self.server_domain if domain is None else domain
        require(
            domain in self.server,
            f"the calibration table has no server response for domain {domain!r}; measured: {sorted(self.server)}",
        )
        return self.server[domain]

    # -- (de)serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": {"name": self.model_name, **self.model},
            "adapter": {"l": self.l, "r": self.r},
            "ppl0": self.ppl0,
            "levels": [{"k": k, "ppl_inf": p, "eta": e} for k, p, e in zip(self.k, self.ppl_inf, self.eta)],
            "server": {d: dataclasses.asdict(resp) for d, resp in self.server.items()},
            "server_domain": self.server_domain,
            "drift": self.drift,
            "population": list(self.population),
            "workload": dict(self.workload),
            "synthetic": self.synthetic,
            "source": self.source,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration table") -> CalibrationTable:
        require(isinstance(data, dict), f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") == "fedpeat_jax.mec.calibration/1":
            raise ValueError(
                f"{where}: schema /1 (before server data domains and round deadlines); "
                "measure a new table with `fedpeat calibrate`"
            )
        require(data.get("schema") == SCHEMA, f"{where}: schema must be {SCHEMA!r}, got {data.get('schema')!r}")
        for key in ("model", "adapter", "ppl0", "levels", "server", "server_domain", "population", "workload"):
            require(key in data, f"{where}: missing key {key!r}")
        model = dict(data["model"])
        name = str(model.pop("name", "unnamed"))
        levels = data["levels"]
        require(isinstance(levels, list) and levels, f"{where}: 'levels' must be a non-empty list")
        for i, lv in enumerate(levels):
            require(
                isinstance(lv, dict) and {"k", "ppl_inf", "eta"} <= set(lv),
                f"{where}: levels[{i}] must have keys 'k', 'ppl_inf', 'eta', got {lv!r}",
            )
        server = data["server"]
        require(isinstance(server, dict), f"{where}: 'server' must map domains to {{ppl_inf, eta, data}}")
        for domain, resp in server.items():
            require(
                isinstance(resp, dict) and set(resp) == {"ppl_inf", "eta", "data"},
                f"{where}: server[{domain!r}] must have keys 'ppl_inf', 'eta', 'data', got {resp!r}",
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
                server=server,
                server_domain=str(data["server_domain"]),
                drift=data.get("drift", 0.0),
                population=data["population"],
                workload=data["workload"],
                synthetic=bool(data.get("synthetic", False)),
                source=str(data.get("source", "")),
                meta=dict(data.get("meta", {})),
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a table
        return path

    def replace(self, **changes) -> CalibrationTable:
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


def synthetic_table(
    model,
    l: int = 2,
    r: int = 2,
    k: Optional[tuple] = None,
    model_name: str = "synthetic",
    ppl0: float = 100.0,
    n_devices: int = 10,
) -> CalibrationTable:
    """A SYNTHETIC placeholder table (``synthetic=True``): for tests and throughput benchmarks only.

    Its numbers are made up, not measured: device rounds' ppl_inf falls linearly from 0.8 ppl0
    (k = 0) to 0.5 ppl0 (k = k_full) with eta = 1.0; the server domains 'modern' (out of the
    devices' domain: ppl_inf 0.95 ppl0, eta 0.5) and 'target' (in it: 0.6 ppl0, eta 1.0), each
    with data 40; a population of ``n_devices`` devices holding 5..16 examples; the workload
    4 local steps of 2 x 64 tokens. Nothing about FedPEAT can be concluded from an environment
    built on it.
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
        server={"modern": ServerResponse(0.95 * ppl0, 0.5, 40.0), "target": ServerResponse(0.6 * ppl0, 1.0, 40.0)},
        server_domain="modern",
        population=tuple(float(v) for v in np.linspace(5.0, 16.0, n_devices).round()),
        workload={"local_steps": 4, "batch_size": 2, "seq_len": 64},
        synthetic=True,
        source="synthetic placeholder (fedpeat_jax.mec.calibration.synthetic_table); not measured",
    )


__all__ = [
    "CalibrationMissingError",
    "CalibrationTable",
    "DEFAULT_TABLE_PATH",
    "SCHEMA",
    "ServerResponse",
    "default_levels",
    "default_table",
    "load_calibration",
    "model_shape",
    "resolve_table",
    "synthetic_table",
]
