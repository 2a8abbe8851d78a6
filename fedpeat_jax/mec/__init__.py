"""The FedPEAT mobile-edge-computing environment.

* :mod:`.system`      pure physics functions (radio, payloads, compute, memory, latency, perplexity)
* :mod:`.calibration` the perplexity response table (``CalibrationTable``, ``load_calibration``)
* :mod:`.env`         ``FedPEATMEC``, the jitted gymnax environment (registered as ``FedPEAT-MEC-v0``)
* :mod:`.params`      ``EnvParams``, presets, ``make_params`` (sizes and response from model and table)
* :mod:`.spaces`      the action / observation layout, the invalid-action rule, ``MultiDiscrete``
* :mod:`.twin`        ``FedPEATTwin``, the same environment in numpy as a ``gymnasium.Env``,
                      and ``NumpyFedPEAT``, its vectorized numpy core (the test oracle)
* :mod:`.vector`      ``FedPEATVectorEnv``: a ``gymnasium.vector.VectorEnv`` stepped by the jitted
                      environment (``gymnasium.make_vec("FedPEAT-MEC-v0", num_envs)``)
* :mod:`.calibrate`   ``fedpeat calibrate``: real FedPEAT runs -> the calibration table
* :mod:`.live`        ``LiveFedPEATMEC``: the same environment with a real jitted FedPEAT round
                      in every step (``make_live_env``; ``fedpeat live``)

Quick start::

    import jax
    from fedpeat_jax.mec import FedPEATMEC

    env = FedPEATMEC()                      # 'default' model, the table `fedpeat calibrate` wrote
    params = env.default_params
    obs, state = env.reset(jax.random.key(0), params)
    action = env.action_space(params).sample(jax.random.key(1))
    obs, state, reward, terminated, truncated, info = env.step(jax.random.key(2), state, action, params)

    # many environments: the gymnax way ...
    keys = jax.random.split(jax.random.key(3), 1024)
    obs, states = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    # ... or the native batched layout (env axis last), one key per step
    obs, states = env.reset_batch(jax.random.key(4), 1024, params)

    # other models: presets 'default', 'gpt2-small', 'gpt2-xl' need a table fitted for them
    # (``FedPEATMEC(preset=..., calibration=path_or_table)``); ``synthetic_table(model)`` gives a
    # clearly marked placeholder for tests and throughput runs.

    # PyTorch / stable-baselines3 users: FedPEATTwin(...) is the same environment as a gymnasium.Env,
    # FedPEATVectorEnv(num_envs) a gymnasium VectorEnv of many, stepped by one jitted call
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
from fedpeat_jax.mec.env import ENV_ID, EnvState, FedPEATMEC, RoundOutcome, make
from fedpeat_jax.mec.params import PRESETS, EnvParams, make_params, preset_params, reference_latency, validate_params
from fedpeat_jax.mec.spaces import MultiDiscrete, action_nvec, clip_action, decode_action, encode_action
from fedpeat_jax.mec.twin import FedPEATTwin, NumpyFedPEAT, TwinState
from fedpeat_jax.mec.vector import FedPEATVectorEnv

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
    "FedPEATVectorEnv",
    "MultiDiscrete",
    "NumpyFedPEAT",
    "PRESETS",
    "RoundOutcome",
    "action_nvec",
    "clip_action",
    "decode_action",
    "default_table",
    "encode_action",
    "load_calibration",
    "make",
    "make_params",
    "preset_params",
    "reference_latency",
    "synthetic_table",
    "system",
    "TwinState",
    "validate_params",
]
