"""The FedPEAT controller: SABPPO (action-branching PPO, PureJaxRL style), baselines, training driver.

* :mod:`.distributions` ``MultiCategorical``: the factorized categorical of a multi-discrete action,
                     usable by any JAX agent (sample / log_prob / entropy / mode)
* :mod:`.normalize`  running observation / return statistics
* :mod:`.sabppo`     ``SABPPOConfig``, ``make_trainer`` / ``make_train`` (pure, jittable, vmappable
                     over seeds and ``HParams``), GAE, PPO losses
* :mod:`.rules`      simple fixed rules and ``search_rules``, the search for the best of them
* :mod:`.imitation`  behaviour cloning of a teacher policy (``teacher_data``, ``clone``): SABPPO's
                     warm start from the best rule (``ControllerConfig.warm_start``)
* :mod:`.baselines`  random / server-only / all-devices / greedy policies, ``sabppo_policy`` and the
                     jitted ``evaluate`` for any policy
* :mod:`.controller` ``train_controller``: chunked training with checkpoints, TensorBoard logs,
                     evaluation against the baselines and plots (``fedpeat train-controller``)

The controller module is imported lazily (it pulls in orbax and the logging stack).
"""

from fedpeat_jax.rl.baselines import (
    Policy,
    all_devices_policy,
    as_policy,
    baseline_policies,
    evaluate,
    greedy_policy,
    random_policy,
    sabppo_policy,
    server_only_policy,
    without_server,
)
from fedpeat_jax.rl.distributions import MultiCategorical
from fedpeat_jax.rl.rules import Rule, rule_policy, search_rules
from fedpeat_jax.rl.sabppo import (
    HParams,
    SABPPOConfig,
    Trainer,
    TrainState,
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
    "MultiCategorical",
    "Rule",
    "all_devices_policy",
    "as_policy",
    "baseline_policies",
    "default_hparams",
    "evaluate",
    "greedy_policy",
    "load_policy",
    "make_train",
    "make_trainer",
    "random_policy",
    "rule_policy",
    "sabppo_policy",
    "search_rules",
    "server_only_policy",
    "stack_hparams",
    "train_controller",
    "without_server",
]
