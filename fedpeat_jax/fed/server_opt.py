"""FedOpt server optimizers (Reddi et al. 2021): optax transformations of the pseudo-gradient.

    tx = server_optimizer("fedadam", lr=1e-2)
    new_global, new_opt_state = server_update(tx, opt_state, global_params, mean_delta, empty)

`server_update` applies `tx` to ``g = -mean(delta)`` and leaves the global parameters and the
optimizer state unchanged in a round where no client contributed (`AggregateResult.empty`).
FedAvgM is Hsu et al. 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from fedpeat_jax.config import SERVER_OPTIMIZERS
from fedpeat_jax.fed.aggregate import select_tree

PyTree = Any
Array = jax.Array
ScalarOrSchedule = Union[float, Array, optax.Schedule]


class FedAdaptiveState(NamedTuple):
    """First moment ``m`` and second-moment accumulator ``v`` of a FedOpt adaptive server."""

    m: PyTree
    v: PyTree


def scale_by_fed_adaptive(kind: str, b1: float, b2: float, tau: float) -> optax.GradientTransformation:
    """Server preconditioner of Reddi et al. 2021, Algorithm 2 (no bias correction).

    With pseudo-gradient ``g_t = -Delta_t``::

        m_t = b1 m_{t-1} + (1 - b1) g_t
        adagrad: v_t = v_{t-1} + g_t^2
        adam:    v_t = b2 v_{t-1} + (1 - b2) g_t^2
        yogi:    v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)
        update   = m_t / (sqrt(v_t) + tau)              (then scaled by -lr)

    ``v_{-1} = tau^2`` (the paper requires ``v_{-1} >= tau^2``), ``m_{-1} = 0``.
    """
    if kind not in ("adagrad", "adam", "yogi"):
        raise ValueError(f"unknown adaptive kind {kind!r}; expected 'adagrad', 'adam' or 'yogi'")

    def init_fn(params):
        m = jax.tree.map(jnp.zeros_like, params)
        v = jax.tree.map(lambda x: jnp.full_like(x, tau**2), params)
        return FedAdaptiveState(m, v)

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        if kind == "adagrad":
            v = jax.tree.map(lambda v, g: v + g * g, state.v, updates)
        elif kind == "adam":
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, updates)
        else:
            v = jax.tree.map(lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return out, FedAdaptiveState(m, v)

    return optax.GradientTransformation(init_fn, update_fn)


# name -> (defaults, builder(lr, **kw))
_SERVER_OPTIMIZERS: dict[str, tuple[dict, Callable[..., optax.GradientTransformation]]] = {
    "fedavg": ({}, lambda lr: optax.sgd(lr)),
    "fedavgm": (
        {"momentum": 0.9, "nesterov": False},
        lambda lr, momentum, nesterov: optax.sgd(lr, momentum=momentum, nesterov=nesterov),
    ),
    "fedadagrad": (
        {"b1": 0.0, "tau": 1e-3},
        lambda lr, b1, tau: optax.chain(
            scale_by_fed_adaptive("adagrad", b1, 0.0, tau), optax.scale_by_learning_rate(lr)
        ),
    ),
    "fedadam": (
        {"b1": 0.9, "b2": 0.99, "tau": 1e-3},
        lambda lr, b1, b2, tau: optax.chain(
            scale_by_fed_adaptive("adam", b1, b2, tau), optax.scale_by_learning_rate(lr)
        ),
    ),
    "fedyogi": (
        {"b1": 0.9, "b2": 0.99, "tau": 1e-3},
        lambda lr, b1, b2, tau: optax.chain(
            scale_by_fed_adaptive("yogi", b1, b2, tau), optax.scale_by_learning_rate(lr)
        ),
    ),
}

assert set(_SERVER_OPTIMIZERS) == set(SERVER_OPTIMIZERS), "config.SERVER_OPTIMIZERS names the builders here"


def server_optimizer(name: str, lr: ScalarOrSchedule = 1.0, **kw) -> optax.GradientTransformation:
    """FedOpt server optimizer applied to the pseudo-gradient ``-mean(delta)``.

    =============  ===============================================================================
    ``fedavg``     ``optax.sgd(lr)``; with ``lr=1`` the new global is exactly the FedAvg mean.
    ``fedavgm``    SGD with server momentum (Hsu et al. 2019): ``momentum=0.9``, ``nesterov=False``.
    ``fedadagrad`` Reddi et al. 2021: ``b1=0.0`` (plain Adagrad, as in the paper's Keras server),
                   ``tau=1e-3``.
    ``fedadam``    Reddi et al. 2021: ``b1=0.9, b2=0.99`` (the values fixed in the paper),
                   ``tau=1e-3``.
    ``fedyogi``    as ``fedadam`` with the Yogi second-moment rule.
    =============  ===============================================================================

    ``tau`` is the adaptivity constant; the paper tunes it (and both learning rates) on a log grid,
    so pass ``tau=`` explicitly to reproduce a specific table. Adaptive servers follow the paper's
    Algorithm 2 exactly (no bias correction; ``v`` starts at ``tau**2``).
    """
    key = name.lower()
    if key not in _SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; expected one of {SERVER_OPTIMIZERS}")
    defaults, build = _SERVER_OPTIMIZERS[key]
    unknown = set(kw) - set(defaults)
    if unknown:
        raise ValueError(
            f"server optimizer {name!r} got unexpected options {sorted(unknown)}; "
            f"it accepts {sorted(defaults) or 'none'}"
        )
    return build(lr, **{**defaults, **kw})


def server_update(
    tx: optax.GradientTransformation,
    global_params: PyTree,
    opt_state: optax.OptState,
    mean_delta: PyTree,
    empty: Union[bool, Array] = False,
) -> tuple[PyTree, optax.OptState]:
    """One FedOpt server step: ``x <- x + tx(-mean_delta)``.

    The pseudo-gradient is ``g = x - mean_k y_k = -mean_delta``. When ``empty`` is True (no client
    contributed) both the parameters and the optimizer state are returned unchanged, so a round
    with every client dropped cannot move the model through momentum either.
    """
    grads = jax.tree.map(jnp.negative, mean_delta)
    updates, new_state = tx.update(grads, opt_state, global_params)
    new_params = optax.apply_updates(global_params, updates)
    empty = jnp.asarray(empty)
    return select_tree(empty, global_params, new_params), select_tree(empty, opt_state, new_state)
