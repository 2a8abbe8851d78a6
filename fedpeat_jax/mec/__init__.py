"""The FedPEAT mobile-edge-computing environment.

* :mod:`.system`      pure physics functions (radio, payloads, compute, memory, latency, perplexity)
* :mod:`.calibration` the perplexity response table (``CalibrationTable``, ``load_calibration``)
* :mod:`.env`         ``FedPEATMEC``, the jitted gymnax environment (registered as ``FedPEAT-MEC-v0``)
* :mod:`.twin`        ``FedPEATTwin``, the same environment in numpy as a ``gymnasium.Env``,
                      and ``NumpyFedPEAT``, its vectorized numpy core

Quick start::

    from fedpeat_jax.mec import FedPEATMEC, synthetic_table
    from fedpeat_jax.config import GPT2Config
    table = synthetic_table(GPT2Config.preset("default"))   # placeholder numbers, not calibrated
    env = FedPEATMEC(preset="default", calibration=table)
    obs, state = env.reset(jax.random.key(0))
"""

import gymnax

from fedpeat_jax.mec import system
from fedpeat_jax.mec.calibration import (
    CalibrationMissingError,
    CalibrationTable,
    default_table,
    load_calibration,
    synthetic_table,
)
from fedpeat_jax.mec.env import (
    ENV_ID,
    PRESETS,
    EnvParams,
    EnvState,
    FedPEATMEC,
    MultiDiscrete,
    action_nvec,
    decode_action,
    encode_action,
    make,
    make_params,
    preset_params,
    validate_params,
)
from fedpeat_jax.mec.twin import FedPEATTwin, NumpyFedPEAT, TwinState

if ENV_ID not in gymnax.registered_envs:
    gymnax.register(ENV_ID, FedPEATMEC)

__all__ = [
    "CalibrationMissingError",
    "CalibrationTable",
    "ENV_ID",
    "EnvParams",
    "EnvState",
    "FedPEATMEC",
    "FedPEATTwin",
    "MultiDiscrete",
    "NumpyFedPEAT",
    "PRESETS",
    "action_nvec",
    "decode_action",
    "default_table",
    "encode_action",
    "load_calibration",
    "make",
    "make_params",
    "preset_params",
    "synthetic_table",
    "system",
    "TwinState",
    "validate_params",
]
