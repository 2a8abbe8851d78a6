"""The spec of a controller study (`kind: controller`): SABPPO trained in the MEC environment,
many runs over its hyperparameters, the environment's parameters and seeds. Checked field by
field, every environment built, before anything compiles.

    kind: controller
    name: sabppo-lr
    base:
      env: {preset: default, n_devices: 10}        # the MEC environment: preset, calibration, make_params settings
      sabppo: {total_timesteps: 160000, num_envs: 32}   # SABPPOConfig fields
      controller: {chunk_updates: 10, eval_episodes: 256}  # evaluation and checkpoint interval
    seeds: 3
    axes:                                          # traced: every value runs in one compiled call
      lr: {low: 1.0e-4, high: 1.0e-3, log: true, num: 3}
      ent_coef: [0.0, 0.01]
      w_latency: [0.5, 1.0, 2.0]                   # any float field of EnvParams
    structure:                                     # static: each combination compiles separately
      sabppo.hidden_sizes: [[64, 64], [128, 128]]
      env.n_devices: [5, 10]
    sampler: grid                                  # grid | random (trials, sampler_seed)

The objective is the evaluated return (deterministic policy, higher is better).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from fedpeat_jax.sweep.spec_fields import (
    SpecError,
    Study,
    axis_points,
    parse_axes,
    parse_name,
    parse_search,
    parse_seeds,
    show,
)

KEYS = ("kind", "name", "base", "seeds", "axes", "structure", "sampler", "trials", "sampler_seed")
SAMPLERS = ("grid", "random")
# make_params' settings that are not EnvParams fields (they fix shapes or derive several fields)
ENV_SETTINGS = (
    "l",
    "r",
    "n_devices",
    "emulator_k",
    "bw_levels",
    "bw_weights",
    "mem_choices_gb",
    "server_domain",
    "participation_drift",
)
# the ControllerConfig fields a study uses (seeds are the spec's; checkpoints and plots are the study's own)
CONTROLLER_FIELDS = (
    "chunk_updates",
    "eval_episodes",
    "eval_seed",
    "greedy_devices",
    "rule_search_episodes",
    "rule_finalists",
    "deterministic_eval",
)


def agent_fields() -> tuple:
    """SABPPO's traced hyperparameters (`HParams` but the environment's parameters)."""
    from fedpeat_jax.rl.sabppo_config import HParams

    return tuple(f.name for f in dataclasses.fields(HParams) if f.name != "env_params")


def env_fields() -> tuple:
    """The environment's traced numbers: the float fields of `EnvParams`."""
    from fedpeat_jax.mec import EnvParams

    return tuple(f.name for f in dataclasses.fields(EnvParams) if f.type in ("float", float))


@dataclass(frozen=True)
class ControllerGroup:
    """One structural combination: its own trainer and compiled program."""

    index: int
    choices: tuple  # ((structure key, value), ...)
    sabppo: Any  # SABPPOConfig
    env: dict  # make_params settings of the group (the base's with the group's choices)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={show(v)}" for k, v in self.choices) or "base"


@dataclass(frozen=True)
class ControllerSpec(Study):
    path: str
    name: str
    env_preset: str
    table: Any = field(repr=False)  # the calibration table (None: the one shipped with the package)
    env: dict  # make_params settings shared by every run
    sabppo: Any  # SABPPOConfig
    controller: Any  # ControllerConfig (evaluation, chunks)
    seeds: tuple
    axes: tuple
    structure: tuple  # ((key, (values...)), ...); key "sabppo.x" / "env.x"
    sampler: str
    trials: Optional[int]
    sampler_seed: int
    resolved: dict
    batch: Optional[int] = None
    objective: str = "eval_return"

    def env_params(self, settings: dict):
        """EnvParams of the base settings with `settings` (a group's and a setting's) on top,
        built by make_params, so derived scales (deadline, latency_ref) follow."""
        from fedpeat_jax.mec import preset_params

        return preset_params(self.env_preset, calibration=self.table, **{**self.env, **settings})

    def groups(self) -> list:
        """Every structural combination, each checked with every axis value (cheap: no compiling)."""
        agent, keys, out = agent_fields(), [k for k, _ in self.structure], []
        for index, values in enumerate(itertools.product(*(v for _, v in self.structure))):
            choices = tuple(zip(keys, values))
            where = "structure " + ", ".join(f"{k}={show(v)}" for k, v in choices) if choices else "base"
            changes = {"sabppo": {}, "env": {}}
            for key, value in choices:
                section, name = key.split(".", 1)
                changes[section][name] = value
            try:
                sabppo, env = self.sabppo.replace(**changes["sabppo"]), {**self.env, **changes["env"]}
                self.env_params(changes["env"])
            except ValueError as e:
                raise self.error(where, f"cannot run: {e}") from None
            for axis in self.axes:
                for value in axis_points(axis):
                    try:
                        if axis.name in agent:
                            sabppo.replace(**{axis.name: value})
                        else:
                            self.env_params({**changes["env"], axis.name: value})
                    except ValueError as e:
                        raise self.error(f"axes.{axis.name}", f"{show(value)} cannot run with {where}: {e}") from None
            out.append(ControllerGroup(index, choices, sabppo, env))
        return out


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------
def _axis_name(path: str, name: str) -> str:
    section, _, bare = name.rpartition(".")
    agent, env = agent_fields(), env_fields()
    if (bare in agent and section in ("", "sabppo")) or (bare in env and section in ("", "env")):
        return bare
    from fedpeat_jax.rl.sabppo_config import SABPPOConfig

    static = bare in {f.name for f in dataclasses.fields(SABPPOConfig)} or bare in ENV_SETTINGS
    hint = f"; {name} is a static setting: put it under structure (each value compiles separately)" if static else ""
    raise SpecError(
        f"spec {path}: axes.{name}: unknown hyperparameter; numeric axes are SABPPO's {', '.join(agent)} and the "
        f"environment's EnvParams float fields (w_ppl, w_latency, cell_radius, ...){hint}"
    )


def _in_section(message: str, cls: str, section: str) -> str:
    return re.sub(rf"\b{cls}\.(\w+)", rf"base.{section}.\1", message)


def _table(path: str, preset: str, calibration):
    from fedpeat_jax.config import GPT2Config
    from fedpeat_jax.mec import PRESETS, load_calibration, synthetic_table

    if preset not in PRESETS:
        raise SpecError(f"spec {path}: base.env.preset: unknown MEC preset {preset!r}; choose one of {sorted(PRESETS)}")
    if calibration is None:
        return None
    if calibration == "synthetic":
        return synthetic_table(GPT2Config.preset(PRESETS[preset]["model"]))
    try:
        return load_calibration(calibration)
    except (OSError, ValueError) as e:
        raise SpecError(f"spec {path}: base.env.calibration: {str(e).splitlines()[0]}") from None


def _base(path: str, raw) -> dict:
    from fedpeat_jax.mec import EnvParams
    from fedpeat_jax.rl.controller import ControllerConfig
    from fedpeat_jax.rl.sabppo_config import SABPPOConfig

    raw = raw or {}
    fail = lambda field, message: SpecError(f"spec {path}: base.{field}: {message}")  # noqa: E731
    if not isinstance(raw, dict) or set(raw) - {"env", "sabppo", "controller"}:
        raise SpecError(f"spec {path}: base: expected a mapping with sections env, sabppo and controller, got {raw!r}")
    sections = {k: raw.get(k) or {} for k in ("env", "sabppo", "controller")}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise fail(name, "expected a mapping of fields")
    env = dict(sections["env"])
    preset, calibration = env.pop("preset", "default"), env.pop("calibration", None)
    known = set(ENV_SETTINGS) | {f.name for f in dataclasses.fields(EnvParams)}
    if set(env) - known:
        raise fail(
            "env",
            f"unknown field(s) {sorted(set(env) - known)}; use preset, calibration, {', '.join(ENV_SETTINGS)} or EnvParams fields",
        )
    bad = sorted(set(sections["controller"]) - set(CONTROLLER_FIELDS))
    if bad:
        why = " (seeds are set by the top-level field seeds)" if {"seeds", "seed"} & set(bad) else ""
        raise fail("controller", f"unknown field(s) {bad}{why}; a study uses {', '.join(CONTROLLER_FIELDS)}")
    bad = sorted(set(sections["sabppo"]) - {f.name for f in dataclasses.fields(SABPPOConfig)})
    if bad:
        raise fail("sabppo", f"unknown field(s) {bad}; the fields of SABPPOConfig: docs/config.md")
    try:
        sabppo = SABPPOConfig(**sections["sabppo"])
    except ValueError as e:
        raise SpecError(f"spec {path}: {_in_section(str(e), 'SABPPOConfig', 'sabppo')}") from None
    try:
        controller = ControllerConfig(**sections["controller"])
    except ValueError as e:
        raise SpecError(f"spec {path}: {_in_section(str(e), 'ControllerConfig', 'controller')}") from None
    return {
        "preset": preset,
        "table": _table(path, preset, calibration),
        "env": env,
        "sabppo": sabppo,
        "controller": controller,
    }


def _structure(path: str, raw) -> tuple:
    from fedpeat_jax.rl.sabppo_config import SABPPOConfig

    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise SpecError(f"spec {path}: structure: expected a mapping of setting: [values], got {raw!r}")
    static = {
        "sabppo": {f.name for f in dataclasses.fields(SABPPOConfig)} - set(agent_fields()),
        "env": set(ENV_SETTINGS) | {"max_steps_in_episode"},
    }
    out = []
    for name, values in raw.items():
        section, _, bare = name.partition(".")
        if bare not in static.get(section, ()):
            traced = bare in agent_fields() or bare in env_fields()
            why = (
                f"{bare} is traced: put it under axes (its values then run in one compiled call)"
                if traced
                else (
                    "unknown setting; use sabppo.FIELD (a static SABPPOConfig field: num_envs, hidden_sizes, network, ...) "
                    f"or env.FIELD ({', '.join(sorted(static['env']))})"
                )
            )
            raise SpecError(f"spec {path}: structure.{name}: {why}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecError(f"spec {path}: structure.{name}: the axis is empty: give at least one value")
        out.append((name, tuple(tuple(v) if isinstance(v, list) else v for v in values)))
    return tuple(out)


def parse_controller(data: dict, path: str) -> ControllerSpec:
    """A checked `ControllerSpec`; every group's environment is built and every axis value tried."""
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise SpecError(f"spec {path}: unknown field(s) {unknown}; a controller spec has {', '.join(KEYS)}")
    fail = lambda field, message: SpecError(f"spec {path}: {field}: {message}")  # noqa: E731
    if data.get("sampler") == "optuna":
        raise fail("sampler", "optuna runs federated studies only, so far; a controller study takes grid or random")
    base = _base(path, data.get("base"))
    try:
        base_env = dict(base["env"])
        from fedpeat_jax.mec import preset_params

        preset_params(base["preset"], calibration=base["table"], **base_env)
    except ValueError as e:
        raise fail("base.env", str(e)) from None
    agent = agent_fields()

    def check(name, value):
        if name in agent:
            base["sabppo"].replace(**{name: value})

    axes = parse_axes(path, data, _axis_name, check)
    spec = ControllerSpec(
        path=str(path),
        name=parse_name(data, path, fail),
        env_preset=base["preset"],
        table=base["table"],
        env=base_env,
        sabppo=base["sabppo"],
        controller=base["controller"],
        seeds=parse_seeds(data, fail),
        axes=axes,
        structure=_structure(path, data.get("structure")),
        resolved=data,
        **{
            k: v
            for k, v in parse_search(data, axes, fail, samplers=SAMPLERS).items()
            if k not in ("batch", "optuna_sampler")
        },
    )
    spec.groups()  # every environment and config of every group, with every axis value
    return spec


__all__ = ["ControllerGroup", "ControllerSpec", "agent_fields", "env_fields", "parse_controller"]
