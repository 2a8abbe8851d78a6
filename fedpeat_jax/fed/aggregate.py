"""Server-side aggregation: FedAvg, FedOpt, FedProx, SCAFFOLD, LoRA-aware and robust rules.

Every function here is pure and jittable. Client quantities are pytrees whose leaves carry a leading
**client axis** ``C``: ``leaf.shape == (C, ...)``. Client weights are example counts
``num_examples: (C,)`` and an optional participation mask ``mask: (C,)`` (0/1, any float or bool);
a client with ``mask == 0`` or ``num_examples == 0`` contributes nothing.

Fault handling (NaN/Inf guard): a participating client whose update has any non-finite value is
excluded from the aggregate, the remaining weights are renormalized, and the client is reported in
``AggregateResult.dropped``. If no client contributes (all masked out or all dropped),
``AggregateResult.empty`` is True, ``mean`` is all zeros, and the ``*_params`` / ``server_update``
helpers leave the global state (parameters *and* optimizer state) unchanged. Nothing here branches
in Python on traced values: the guard is ``jnp.where`` selects, so it compiles once.

Optax-style pieces:

* ``server_optimizer(name, lr, **kw)`` -> ``optax.GradientTransformation`` applied to the
  pseudo-gradient ``g = global - mean(client params) = -mean(delta)`` by ``server_update``.
* ``ScaffoldState`` with ``scaffold_init`` / ``scaffold_server_update``.

References: McMahan et al. 2017 (FedAvg); Hsu et al. 2019 (FedAvgM); Reddi et al. 2021, "Adaptive
Federated Optimization" (FedAdagrad/FedAdam/FedYogi); Li et al. 2020 (FedProx); Karimireddy et al.
2020 (SCAFFOLD); Sun et al. 2024 (FFA-LoRA); Wang et al. 2024 (FLoRA); Yin et al. 2018 (median,
trimmed mean); Sun et al. 2019 "Can you really backdoor federated learning?" (norm bounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Array = jax.Array
ScalarOrSchedule = Union[float, Array, optax.Schedule]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Small tree helpers
# --------------------------------------------------------------------------------------------------


def _expand(w: Array, x: Array) -> Array:
    """Reshape ``w`` (leading dims of ``x``) so that it broadcasts against ``x``."""
    w = jnp.asarray(w)
    return jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim))


def num_clients(tree: PyTree) -> int:
    """Static size of the leading client axis; raises ValueError if leaves disagree or lack it."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("expected a non-empty pytree whose leaves have a leading client axis")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) > 0 else None for x in leaves}
    if None in sizes:
        raise ValueError("every leaf of a client pytree needs a leading client axis; found a scalar leaf")
    if len(sizes) != 1:
        raise ValueError(f"leaves of a client pytree disagree on the client-axis size: {sorted(sizes)}")
    return sizes.pop()


def select_tree(pred: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """``jnp.where(pred, on_true, on_false)`` leaf by leaf, with a scalar predicate (jittable)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def client_deltas(client_params: PyTree, global_params: PyTree) -> PyTree:
    """Per-client update ``delta_k = y_k - x`` (client params minus the broadcast global params)."""
    return jax.tree_util.tree_map(lambda y, x: y - jnp.asarray(x)[None], client_params, global_params)


def client_weights(num_examples: Array, mask: Optional[Array] = None) -> Array:
    """Unnormalized client weights ``w_k = max(n_k, 0) * m_k`` as float32, shape (C,)."""
    w = jnp.maximum(jnp.asarray(num_examples, jnp.float32), 0.0)
    if mask is not None:
        w = w * jnp.asarray(mask, jnp.float32)
    return w


def finite_clients(tree: PyTree) -> Array:
    """(C,) bool: True where every value of that client's slice of every leaf is finite."""
    c = num_clients(tree)
    ok = jnp.ones((c,), bool)
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x).reshape(c, -1), axis=1)
    return ok


def client_norms(tree: PyTree) -> Array:
    """(C,) global L2 norm of each client's update over all leaves, ``||delta_k||_2`` (float32)."""
    c = num_clients(tree)
    sq = jnp.zeros((c,), jnp.float32)
    for x in jax.tree_util.tree_leaves(tree):
        sq = sq + jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(c, -1), axis=1)
    return jnp.sqrt(sq)


def clip_by_client_norm(tree: PyTree, max_norm: Union[float, Array]) -> tuple[PyTree, Array]:
    """Clip each client's update to global L2 norm at most ``M``.

    ``delta_k <- delta_k * min(1, M / ||delta_k||)``. Returns ``(clipped_tree, norms)`` where
    ``norms`` are the norms *before* clipping (so ``norms > M`` says who was clipped).
    """
    norms = client_norms(tree)
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-30))
    clipped = jax.tree_util.tree_map(lambda x: (x * _expand(factor, x)).astype(x.dtype), tree)
    return clipped, norms


def _weighted_sum(tree: PyTree, p: Array) -> PyTree:
    """``sum_k p_k x_k`` per leaf, accumulated in float32 and cast back; rows with p_k == 0 are
    zeroed first so that a NaN/Inf row cannot leak through ``0 * NaN``. Elementwise (no dot), so
    the result is exact float32 on every backend (no TF32/bf16 matmul passes)."""

    def one(x):
        keep = _expand(p != 0, x)
        xs = jnp.where(keep, x.astype(jnp.float32), 0.0)
        return jnp.sum(xs * _expand(p, xs), axis=0).astype(x.dtype)

    return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------------------------------
# FedAvg with participation mask and NaN/Inf guard
# --------------------------------------------------------------------------------------------------


class AggregateResult(NamedTuple):
    """Outcome of an aggregation.

    mean:    the aggregate (no client axis); all zeros when ``empty``.
    weights: (C,) normalized weights actually used (sum to 1 unless ``empty``; 0 for excluded).
    dropped: (C,) bool, participating clients (w_k > 0) excluded because of a non-finite value.
    empty:   () bool, no client contributed: the caller must keep its global state.
    """

    mean: PyTree
    weights: Array
    dropped: Array
    empty: Array


def aggregation_weights(
    updates: PyTree, num_examples: Array, mask: Optional[Array] = None
) -> tuple[Array, Array, Array]:
    """Guarded, normalized FedAvg weights.

    ``w_k = n_k m_k [delta_k finite]``, ``p_k = w_k / sum_j w_j`` (0 if the sum is 0).
    Returns ``(p, dropped, empty)`` as in :class:`AggregateResult`.
    """
    w = client_weights(num_examples, mask)
    finite = finite_clients(updates)
    dropped = (w > 0) & ~finite
    w = jnp.where(finite, w, 0.0)
    total = jnp.sum(w)
    empty = total <= 0
    p = jnp.where(empty, 0.0, w / jnp.where(empty, 1.0, total))
    return p, dropped, empty


def fedavg(updates: PyTree, num_examples: Array, mask: Optional[Array] = None) -> AggregateResult:
    """Example-weighted FedAvg (McMahan et al. 2017) of client params or deltas.

    ``mean = sum_k p_k u_k`` with ``p_k = n_k m_k / sum_j n_j m_j`` over clients whose update is
    finite. Works on any pytree with a leading client axis, e.g. a LoRA tree (then it is the plain
    mean of A and of B separately, FedIT).
    """
    p, dropped, empty = aggregation_weights(updates, num_examples, mask)
    return AggregateResult(_weighted_sum(updates, p), p, dropped, empty)


def fedavg_params(
    global_params: PyTree, client_params: PyTree, num_examples: Array, mask: Optional[Array] = None
) -> tuple[PyTree, AggregateResult]:
    """FedAvg on client *parameters*: new global = weighted mean, or the old global if empty."""
    res = fedavg(client_params, num_examples, mask)
    return select_tree(res.empty, global_params, res.mean), res


# --------------------------------------------------------------------------------------------------
# FedOpt server optimizers (Reddi et al. 2021)
# --------------------------------------------------------------------------------------------------


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
        m = jax.tree_util.tree_map(jnp.zeros_like, params)
        v = jax.tree_util.tree_map(lambda x: jnp.full_like(x, tau**2), params)
        return FedAdaptiveState(m, v)

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        if kind == "adagrad":
            v = jax.tree_util.tree_map(lambda v, g: v + g * g, state.v, updates)
        elif kind == "adam":
            v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, updates)
        else:
            v = jax.tree_util.tree_map(
                lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, updates
            )
        out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
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

SERVER_OPTIMIZERS = tuple(_SERVER_OPTIMIZERS)


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
    grads = jax.tree_util.tree_map(jnp.negative, mean_delta)
    updates, new_state = tx.update(grads, opt_state, global_params)
    new_params = optax.apply_updates(global_params, updates)
    empty = jnp.asarray(empty)
    return select_tree(empty, global_params, new_params), select_tree(empty, opt_state, new_state)


# --------------------------------------------------------------------------------------------------
# FedProx
# --------------------------------------------------------------------------------------------------


def prox_penalty(params: PyTree, global_params: PyTree, mu: Union[float, Array]) -> Array:
    """FedProx proximal term (Li et al. 2020): ``mu / 2 * ||w - w_g||_2^2`` summed over all leaves.

    Add it to the local loss; its gradient is ``mu (w - w_g)``. Works per client (vmap it) or on
    client-stacked trees (then the squared norms of all clients are summed).
    """
    sq = sum(
        jnp.sum(jnp.square(w.astype(jnp.float32) - jnp.asarray(g, jnp.float32)))
        for w, g in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(global_params))
    )
    return 0.5 * mu * sq


# --------------------------------------------------------------------------------------------------
# SCAFFOLD (Karimireddy et al. 2020, option II)
# --------------------------------------------------------------------------------------------------


class ScaffoldState(NamedTuple):
    """Server control variate ``c`` (no client axis) and the control variates ``c_i`` of ALL
    ``N`` clients (leading axis of size N, persistent across rounds)."""

    c: PyTree
    c_clients: PyTree


def scaffold_init(params: PyTree, total_clients: int) -> ScaffoldState:
    """Zero control variates: ``c = 0``, ``c_i = 0`` for every one of ``total_clients`` clients."""
    c = jax.tree_util.tree_map(jnp.zeros_like, params)
    c_clients = jax.tree_util.tree_map(lambda x: jnp.zeros((total_clients,) + jnp.shape(x), x.dtype), params)
    return ScaffoldState(c, c_clients)


def scaffold_cohort_controls(state: ScaffoldState, client_ids: Array) -> PyTree:
    """Gather the sampled clients' control variates ``c_i``: leaves (C, ...)."""
    return jax.tree_util.tree_map(lambda cc: cc[client_ids], state.c_clients)


def scaffold_correct_grads(grads: PyTree, c_i: PyTree, c: PyTree) -> PyTree:
    """Corrected local gradient ``g - c_i + c`` (used for every local step ``y <- y - lr (g - c_i + c)``).

    Works per client, or with a client axis on ``grads`` and ``c_i`` (``c`` broadcasts).
    """
    return jax.tree_util.tree_map(lambda g, ci, cg: g - ci + cg, grads, c_i, c)


def scaffold_client_control(
    c_i: PyTree, c: PyTree, x: PyTree, y_i: PyTree, num_steps: Union[int, Array], lr: Union[float, Array]
) -> PyTree:
    """Option II control-variate update ``c_i+ = c_i - c + (x - y_i) / (K lr)``.

    ``x`` is the global model the client started from, ``y_i`` its model after ``K = num_steps``
    local steps of size ``lr``. Works per client, or with a leading client axis on ``c_i`` and
    ``y_i`` (then ``num_steps``/``lr`` may be scalars or (C,)). A client with ``K lr == 0`` keeps
    its ``c_i``.
    """
    denom = jnp.asarray(num_steps, jnp.float32) * jnp.asarray(lr, jnp.float32)

    def one(ci, cg, xg, yi):
        d = _expand(denom, yi)
        new = ci - cg + (xg - yi) / jnp.where(d > 0, d, 1.0)
        return jnp.where(d > 0, new, ci).astype(ci.dtype)

    return jax.tree_util.tree_map(one, c_i, c, x, y_i)


def scaffold_server_update(
    state: ScaffoldState,
    x: PyTree,
    y: PyTree,
    c_new: PyTree,
    client_ids: Array,
    mask: Optional[Array] = None,
    num_examples: Optional[Array] = None,
    server_lr: Union[float, Array] = 1.0,
) -> tuple[PyTree, ScaffoldState, AggregateResult]:
    """SCAFFOLD server step for a cohort ``S`` of ``C`` clients out of ``N``.

    ``y`` (C, ...) are the clients' local models, ``c_new`` (C, ...) their updated control
    variates (``scaffold_client_control``), ``client_ids`` (C,) their indices in ``0..N-1``
    (distinct: sample without replacement)::

        x <- x + server_lr * mean_{i in S} (y_i - x)        (uniform, or example-weighted)
        c <- c + 1/N * sum_{i in S} (c_i+ - c_i)            (= |S|/N * mean of delta c_i)
        c_i <- c_i+  for i in S

    Clients masked out, with zero examples, or with a non-finite ``y_i`` or ``c_i+`` are excluded
    from both sums and keep their old ``c_i``; if none remains, ``x`` and the state are unchanged.
    ``num_examples=None`` gives the paper's uniform mean; the ``c`` update is always uniform over
    the N clients, as in the paper's objective ``f = 1/N sum_i f_i``.
    """
    n_total = num_clients(state.c_clients)
    c_old = scaffold_cohort_controls(state, client_ids)
    dy = client_deltas(y, x)
    dc = jax.tree_util.tree_map(lambda a, b: a - b, c_new, c_old)
    cohort = num_clients(dy)
    counts = jnp.ones((cohort,), jnp.float32) if num_examples is None else num_examples
    res = fedavg((dy, dc), counts, mask)
    used = res.weights > 0
    mean_dy = res.mean[0]
    new_x = jax.tree_util.tree_map(
        lambda xg, d: jnp.where(res.empty, xg, xg + server_lr * d).astype(xg.dtype), x, mean_dy
    )
    sum_dc = _weighted_sum(dc, used.astype(jnp.float32))
    new_c = jax.tree_util.tree_map(lambda cg, s: (cg + s / n_total).astype(cg.dtype), state.c, sum_dc)

    def scatter(cc, cn, co):
        return cc.at[client_ids].set(jnp.where(_expand(used, cn), cn, co).astype(cc.dtype))

    new_clients = jax.tree_util.tree_map(scatter, state.c_clients, c_new, c_old)
    return new_x, ScaffoldState(new_c, new_clients), res._replace(mean=mean_dy)


# --------------------------------------------------------------------------------------------------
# LoRA aggregation: plain mean, FFA-LoRA, exact stacked (FLoRA), and the gap diagnostic
# --------------------------------------------------------------------------------------------------


def _is_lora_target(node: Any) -> bool:
    return isinstance(node, Mapping) and "a" in node and "b" in node


def map_lora_targets(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, _path: str = "") -> PyTree:
    """Apply ``fn(target, *rest_targets)`` to every LoRA target (a mapping with keys 'a' and 'b')
    of a nested-dict LoRA tree, keeping the nesting. Raises ValueError on any other leaf."""
    if _is_lora_target(tree):
        return fn(tree, *rest)
    if isinstance(tree, Mapping):
        return {k: map_lora_targets(fn, tree[k], *(r[k] for r in rest), _path=f"{_path}/{k}") for k in tree}
    raise ValueError(
        f"expected a LoRA tree of nested dicts whose targets hold 'a' and 'b'; found a "
        f"{type(tree).__name__} at {_path or '/'}"
    )


def _lora_leaves(tree: PyTree, name: str) -> list:
    out = []
    map_lora_targets(lambda t: out.append(t[name]), tree)
    return out


def _lora_weights(client_lora, num_examples, mask, names=("a", "b")):
    guard = [leaf for n in names for leaf in _lora_leaves(client_lora, n)]
    return aggregation_weights(guard, num_examples, mask)


def lora_mean(client_lora: PyTree, num_examples: Array, mask: Optional[Array] = None) -> AggregateResult:
    """Plain FedAvg of a LoRA tree (FedIT): ``mean(a)`` and ``mean(b)`` separately.

    Inexact: ``mean(a) @ mean(b) != mean(a @ b)`` in general; see :func:`lora_gap`."""
    return fedavg(client_lora, num_examples, mask)


def ffa_lora_aggregate(
    global_lora: PyTree, client_lora: PyTree, num_examples: Array, mask: Optional[Array] = None
) -> tuple[PyTree, AggregateResult]:
    """FFA-LoRA (Sun et al., ICLR 2024): ``a`` frozen at a shared init, only ``b`` averaged.

    New global target = ``{"a": a_global, "b": sum_k p_k b_k}``; exact because
    ``a @ sum_k p_k b_k == sum_k p_k a @ b_k``. Only the clients' ``b`` is read (and guarded).
    Returns ``(new_global_lora, result)``; the global is unchanged when ``result.empty``.
    """
    p, dropped, empty = _lora_weights(client_lora, num_examples, mask, names=("b",))

    def one(g, t):
        b = _weighted_sum(t["b"], p)
        return {**g, "b": jnp.where(empty, g["b"], b)}

    new = map_lora_targets(one, global_lora, client_lora)
    return new, AggregateResult(new, p, dropped, empty)


def _stack_target(t: Mapping, p: Array) -> dict:
    # a: (C, ..., d_in, r) -> (..., d_in, C*r) with client k's block scaled by p_k;
    # b: (C, ..., r, d_out) -> (..., C*r, d_out). float32 throughout, so p_k is not rounded.
    a, b = t["a"].astype(jnp.float32), t["b"].astype(jnp.float32)
    a = jnp.where(_expand(p != 0, a), a * _expand(p, a), 0.0)
    b = jnp.where(_expand(p != 0, b), b, 0.0)
    c, r = a.shape[0], a.shape[-1]
    if b.shape[-2] != r:
        raise ValueError(f"LoRA factors disagree on the rank: a {t['a'].shape}, b {t['b'].shape}")
    a_s = jnp.moveaxis(a, 0, -2).reshape(a.shape[1:-1] + (c * r,))
    b_s = jnp.moveaxis(b, 0, -3).reshape(b.shape[1:-2] + (c * r, b.shape[-1]))
    return {"a": a_s, "b": b_s}


def lora_stack(client_lora: PyTree, num_examples: Array, mask: Optional[Array] = None) -> AggregateResult:
    """Exact LoRA aggregation by stacking (FLoRA, Wang et al. NeurIPS 2024).

    Per target, ``A_s = [p_1 a_1, ..., p_C a_C]`` (concatenated on the rank axis, shape
    (..., d_in, C r)) and ``B_s = [b_1; ...; b_C]`` (shape (..., C r, d_out)), so that
    ``A_s @ B_s == sum_k p_k a_k @ b_k`` exactly. Excluded clients contribute zero blocks (shapes
    stay static). Heterogeneous ranks are handled by zero-padding clients to a common ``r``.
    Clients then merge ``A_s @ B_s`` into their base weights and restart LoRA.
    ``result.mean`` holds the stacked tree (rank ``C r``, float32; the LoRA ``scale`` is not
    applied, so ``scale * A_s @ B_s`` is the mean delta kernel).
    """
    p, dropped, empty = _lora_weights(client_lora, num_examples, mask)
    return AggregateResult(map_lora_targets(lambda t: _stack_target(t, p), client_lora), p, dropped, empty)


def _product(a: Array, b: Array) -> Array:
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)


def lora_product_mean(
    client_lora: PyTree, num_examples: Array, mask: Optional[Array] = None, scale: Union[float, Array] = 1.0
) -> AggregateResult:
    """Exact mean LoRA delta per target: ``scale * sum_k p_k a_k @ b_k``, shape (..., d_in, d_out).

    Computed as ``A_s @ B_s`` (see :func:`lora_stack`) without materializing per-client dense
    products. ``result.mean`` mirrors the LoRA tree with each target replaced by its dense delta.
    """
    stacked = lora_stack(client_lora, num_examples, mask)
    dense = map_lora_targets(lambda t: scale * _product(t["a"], t["b"]), stacked.mean)
    return stacked._replace(mean=dense)


class LoraGap(NamedTuple):
    """Gap between averaging factors and averaging products, per target and overall.

    abs:       tree (targets -> scalar) of ``||mean(a) @ mean(b) - mean(a @ b)||_F``.
    rel:       tree of ``abs / ||mean(a @ b)||_F`` (0 if both are 0, inf if only the product is 0).
    total_abs: ``sqrt(sum over targets of abs^2)``.
    total_rel: ``total_abs / sqrt(sum over targets of ||mean(a @ b)||_F^2)``.
    empty:     no client contributed (all gaps are 0).
    """

    abs: PyTree
    rel: PyTree
    total_abs: Array
    total_rel: Array
    empty: Array


def _safe_ratio(num: Array, den: Array) -> Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


def lora_sums(client_lora: PyTree, w: Array) -> PyTree:
    """Per target, the weighted sums ``(sum_k w_k a_k, sum_k w_k b_k, sum_k w_k a_k @ b_k)`` that
    :func:`lora_gap` needs; sums over chunks of clients add up (the round streams them)."""

    def one(t):
        s = _stack_target(t, w)
        return {"a": _weighted_sum(t["a"], w), "b": _weighted_sum(t["b"], w), "ab": _product(s["a"], s["b"])}

    return map_lora_targets(one, client_lora)


def lora_gap_from_sums(sums: PyTree, total: Array, empty: Array) -> LoraGap:
    """:class:`LoraGap` from :func:`lora_sums` accumulated with total weight `total`."""
    scale = 1.0 / jnp.where(total > 0, total, 1.0)

    def one(t):
        prod_mean = t["ab"] * scale
        diff = _product(t["a"] * scale, t["b"] * scale) - prod_mean
        return jnp.sqrt(jnp.sum(diff * diff)), jnp.sqrt(jnp.sum(prod_mean * prod_mean))

    is_sums = lambda x: isinstance(x, Mapping) and "ab" in x  # noqa: E731
    pairs = jax.tree_util.tree_map(one, sums, is_leaf=is_sums)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    gap_abs = jax.tree_util.tree_map(lambda t: t[0], pairs, is_leaf=is_pair)
    norms = jax.tree_util.tree_map(lambda t: t[1], pairs, is_leaf=is_pair)
    gap_rel = jax.tree_util.tree_map(_safe_ratio, gap_abs, norms)
    total_abs = jnp.sqrt(sum(g * g for g in jax.tree_util.tree_leaves(gap_abs)))
    total_norm = jnp.sqrt(sum(n * n for n in jax.tree_util.tree_leaves(norms)))
    return LoraGap(gap_abs, gap_rel, total_abs, _safe_ratio(total_abs, total_norm), empty)


def lora_gap(client_lora: PyTree, num_examples: Array, mask: Optional[Array] = None) -> LoraGap:
    """Diagnostic of the FedIT inexactness: ``||mean(a) mean(b) - mean(a b)||_F`` (weighted means
    with the same guarded weights as :func:`fedavg`); zero when all clients agree, and for FFA-LoRA
    (shared ``a``). Norms are taken over all stacked layers of a target."""
    p, _, empty = _lora_weights(client_lora, num_examples, mask)
    return lora_gap_from_sums(lora_sums(client_lora, p), jnp.float32(1.0), empty)


# --------------------------------------------------------------------------------------------------
# Robust aggregation (unweighted statistics over participating, finite clients)
# --------------------------------------------------------------------------------------------------


def _robust_used(updates: PyTree, mask: Optional[Array]) -> tuple[Array, Array, Array]:
    c = num_clients(updates)
    m = jnp.ones((c,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    finite = finite_clients(updates)
    part = m > 0
    used = part & finite
    k = jnp.sum(used)
    p = jnp.where(used, 1.0 / jnp.maximum(k, 1), 0.0)
    return used, p, part & ~finite


def coordinate_median(updates: PyTree, mask: Optional[Array] = None) -> AggregateResult:
    """Coordinate-wise median over participating finite clients (Yin et al. 2018).

    Unweighted by example counts (a robust statistic); an even count averages the two middle
    values, as ``numpy.median``. ``result.weights`` is uniform over the clients used."""
    used, p, dropped = _robust_used(updates, mask)
    empty = ~jnp.any(used)

    def one(x):
        xs = jnp.where(_expand(used, x), x.astype(jnp.float32), jnp.nan)
        med = jnp.nanmedian(xs, axis=0)
        return jnp.where(empty, 0.0, med).astype(x.dtype)

    return AggregateResult(jax.tree_util.tree_map(one, updates), p, dropped, empty)


def trimmed_mean(updates: PyTree, beta: Union[float, Array], mask: Optional[Array] = None) -> AggregateResult:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018).

    Among the ``k`` participating finite clients, per coordinate drop the ``t = floor(beta k)``
    smallest and ``t`` largest values and average the remaining ``k - 2t``. ``0 <= beta < 0.5``
    (checked when ``beta`` is a Python number). Unweighted by example counts.
    """
    if isinstance(beta, (int, float)) and not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta!r}")
    used, p, dropped = _robust_used(updates, mask)
    k = jnp.sum(used)
    empty = k == 0
    t = jnp.floor(beta * k).astype(jnp.int32)
    count = jnp.maximum(k - 2 * t, 1)

    def one(x):
        xs = jnp.where(_expand(used, x), x.astype(jnp.float32), jnp.inf)  # excluded sort last
        xs = jnp.sort(xs, axis=0)
        rank = _expand(jnp.arange(x.shape[0]), xs)
        keep = (rank >= t) & (rank < k - t)
        mean = jnp.sum(jnp.where(keep, xs, 0.0), axis=0) / count
        return jnp.where(empty, 0.0, mean).astype(x.dtype)

    return AggregateResult(jax.tree_util.tree_map(one, updates), p, dropped, empty)


def norm_bounded_mean(
    updates: PyTree, max_norm: Union[float, Array], num_examples: Array, mask: Optional[Array] = None
) -> AggregateResult:
    """Norm bounding (Sun et al. 2019): clip each client's delta to ``||delta_k|| <= M``, then the
    example-weighted FedAvg of the clipped deltas (``sum_k p_k delta_k min(1, M/||delta_k||)``).
    Non-finite clients are dropped before clipping."""
    p, dropped, empty = aggregation_weights(updates, num_examples, mask)
    safe = jax.tree_util.tree_map(lambda x: jnp.where(_expand(p > 0, x), x, 0).astype(x.dtype), updates)
    clipped, _ = clip_by_client_norm(safe, max_norm)
    return AggregateResult(_weighted_sum(clipped, p), p, dropped, empty)


__all__ = [
    "AggregateResult",
    "FedAdaptiveState",
    "LoraGap",
    "SERVER_OPTIMIZERS",
    "ScaffoldState",
    "aggregation_weights",
    "client_deltas",
    "client_norms",
    "client_weights",
    "clip_by_client_norm",
    "coordinate_median",
    "fedavg",
    "fedavg_params",
    "ffa_lora_aggregate",
    "finite_clients",
    "lora_gap",
    "lora_gap_from_sums",
    "lora_sums",
    "lora_mean",
    "lora_product_mean",
    "lora_stack",
    "map_lora_targets",
    "norm_bounded_mean",
    "num_clients",
    "prox_penalty",
    "scaffold_client_control",
    "scaffold_cohort_controls",
    "scaffold_correct_grads",
    "scaffold_init",
    "scaffold_server_update",
    "select_tree",
    "server_optimizer",
    "server_update",
    "trimmed_mean",
]
