"""The FedPEAT controller: SABPPO (action-branching PPO, PureJaxRL style), baselines, training driver.

* :mod:`.sabppo`     ``SABPPOConfig``, ``make_trainer`` / ``make_train`` (pure, jittable, vmappable
                     over seeds and ``HParams``), the branch distribution helpers, GAE, PPO losses
* :mod:`.baselines`  random / all-largest / greedy / no-server policies, ``sabppo_policy`` and the
                     jitted ``evaluate`` for any policy
* :mod:`.controller` ``train_controller``: chunked training with checkpoints, TensorBoard logs,
                     evaluation against the baselines and plots (``fedpeat train-controller``)

The controller module is imported lazily (it pulls in orbax and the logging stack).
"""

from fedpeat_jax.rl.baselines import (
    Policy,
    all_largest_policy,
    as_policy,
    baseline_policies,
    evaluate,
    greedy_policy,
    no_server_policy,
    random_policy,
    sabppo_policy,
    without_server,
)
from fedpeat_jax.rl.sabppo import (
    HParams,
    SABPPOConfig,
    TrainState,
    Trainer,
    default_hparams,
    make_train,
    make_trainer,
    stack_hparams,
)


def __getattr__(name):
    if name in ("train_controller", "ControllerConfig", "load_policy"):
        from fedpeat_jax.rl import controller

        return getattr(controller, name)
    raise AttributeError(f"module 'fedpeat_jax.rl' has no attribute {name!r}")


__all__ = [
    "ControllerConfig",
    "HParams",
    "Policy",
    "SABPPOConfig",
    "TrainState",
    "Trainer",
    "all_largest_policy",
    "as_policy",
    "baseline_policies",
    "default_hparams",
    "evaluate",
    "greedy_policy",
    "load_policy",
    "make_train",
    "make_trainer",
    "no_server_policy",
    "random_policy",
    "sabppo_policy",
    "stack_hparams",
    "train_controller",
    "without_server",
]
