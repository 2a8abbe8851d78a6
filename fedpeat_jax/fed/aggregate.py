"""Server-side aggregation of client updates: FedAvg, LoRA-aware and robust rules.

Every function here is pure and jittable. Client quantities are pytrees whose leaves carry a leading
**client axis** ``C``: ``leaf.shape == (C, ...)``. Client weights are example counts
``num_examples: (C,)`` and an optional participation mask ``mask: (C,)`` (0/1, any float or bool);
a client with ``mask == 0`` or ``num_examples == 0`` contributes nothing.

Fault handling (NaN/Inf guard): a participating client whose update has any non-finite value is
excluded from the aggregate, the remaining weights are renormalized, and the client is reported in
``AggregateResult.dropped``. If no client contributes (all masked out or all dropped),
``AggregateResult.empty`` is True and ``mean`` is all zeros; `fed.server_opt.server_update` then
leaves the global state (parameters *and* optimizer state) unchanged. Nothing here branches in
Python on traced values: the guard is ``jnp.where`` selects, so it compiles once.

LoRA: the plain mean of the factors (FedIT; exact with FFA-LoRA's shared, frozen ``a``), the exact
stacked aggregate (FLoRA) and the gap between them. The server optimizers live in
`fed.server_opt`, FedProx and SCAFFOLD in `fed.drift`.

References: McMahan et al. 2017 (FedAvg); Sun et al. 2024 (FFA-LoRA); Wang et al. 2024 (FLoRA);
Yin et al. 2018 (median, trimmed mean); Sun et al. 2019 "Can you really backdoor federated
learning?" (norm bounding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

PyTree = Any
Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Small tree helpers
# --------------------------------------------------------------------------------------------------


def expand_weights(w: Array, x: Array) -> Array:
    """Reshape ``w`` (leading dims of ``x``) so that it broadcasts against ``x``."""
    w = jnp.asarray(w)
    return jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim))


def num_clients(tree: PyTree) -> int:
    """Static size of the leading client axis; raises ValueError if leaves disagree or lack it."""
    leaves = jax.tree.leaves(tree)
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
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def client_deltas(client_params: PyTree, global_params: PyTree) -> PyTree:
    """Per-client update ``delta_k = y_k - x`` (client params minus the broadcast global params)."""
    return jax.tree.map(lambda y, x: y - jnp.asarray(x)[None], client_params, global_params)


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
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x).reshape(c, -1), axis=1)
    return ok


def client_norms(tree: PyTree) -> Array:
    """(C,) global L2 norm of each client's update over all leaves, ``||delta_k||_2`` (float32)."""
    c = num_clients(tree)
    sq = jnp.zeros((c,), jnp.float32)
    for x in jax.tree.leaves(tree):
        sq = sq + jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(c, -1), axis=1)
    return jnp.sqrt(sq)


def clip_by_client_norm(tree: PyTree, max_norm: Union[float, Array]) -> tuple[PyTree, Array]:
    """Clip each client's update to global L2 norm at most ``M``.

    ``delta_k <- delta_k * min(1, M / ||delta_k||)``. Returns ``(clipped_tree, norms)`` where
    ``norms`` are the norms *before* clipping (so ``norms > M`` says who was clipped).
    """
    norms = client_norms(tree)
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-30))
    clipped = jax.tree.map(lambda x: (x * expand_weights(factor, x)).astype(x.dtype), tree)
    return clipped, norms


def weighted_sum(tree: PyTree, p: Array) -> PyTree:
    """``sum_k p_k x_k`` per leaf, accumulated in float32 and cast back; rows with p_k == 0 are
    zeroed first so that a NaN/Inf row cannot leak through ``0 * NaN``. Elementwise (no dot), so
    the result is exact float32 on every backend (no TF32/bf16 matmul passes)."""

    def one(x):
        keep = expand_weights(p != 0, x)
        xs = jnp.where(keep, x.astype(jnp.float32), 0.0)
        return jnp.sum(xs * expand_weights(p, xs), axis=0).astype(x.dtype)

    return jax.tree.map(one, tree)


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
    return AggregateResult(weighted_sum(updates, p), p, dropped, empty)


# --------------------------------------------------------------------------------------------------
# LoRA aggregation: exact stacked (FLoRA), the product mean, and the gap to the plain mean
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


def stack_target(t: Mapping, p: Array) -> dict:
    # a: (C, ..., d_in, r) -> (..., d_in, C*r) with client k's block scaled by p_k;
    # b: (C, ..., r, d_out) -> (..., C*r, d_out). float32 throughout, so p_k is not rounded.
    a, b = t["a"].astype(jnp.float32), t["b"].astype(jnp.float32)
    a = jnp.where(expand_weights(p != 0, a), a * expand_weights(p, a), 0.0)
    b = jnp.where(expand_weights(p != 0, b), b, 0.0)
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
    return AggregateResult(map_lora_targets(lambda t: stack_target(t, p), client_lora), p, dropped, empty)


def lora_product(a: Array, b: Array) -> Array:
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)


def lora_product_mean(
    client_lora: PyTree, num_examples: Array, mask: Optional[Array] = None, scale: Union[float, Array] = 1.0
) -> AggregateResult:
    """Exact mean LoRA delta per target: ``scale * sum_k p_k a_k @ b_k``, shape (..., d_in, d_out).

    Computed as ``A_s @ B_s`` (see :func:`lora_stack`) without materializing per-client dense
    products. ``result.mean`` mirrors the LoRA tree with each target replaced by its dense delta.
    """
    stacked = lora_stack(client_lora, num_examples, mask)
    dense = map_lora_targets(lambda t: scale * lora_product(t["a"], t["b"]), stacked.mean)
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
        s = stack_target(t, w)
        return {"a": weighted_sum(t["a"], w), "b": weighted_sum(t["b"], w), "ab": lora_product(s["a"], s["b"])}

    return map_lora_targets(one, client_lora)


def lora_gap_from_sums(sums: PyTree, total: Array, empty: Array) -> LoraGap:
    """:class:`LoraGap` from :func:`lora_sums` accumulated with total weight `total`."""
    scale = 1.0 / jnp.where(total > 0, total, 1.0)

    def one(t):
        prod_mean = t["ab"] * scale
        diff = lora_product(t["a"] * scale, t["b"] * scale) - prod_mean
        return jnp.sqrt(jnp.sum(diff * diff)), jnp.sqrt(jnp.sum(prod_mean * prod_mean))

    is_sums = lambda x: isinstance(x, Mapping) and "ab" in x  # noqa: E731
    pairs = jax.tree.map(one, sums, is_leaf=is_sums)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    gap_abs = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    norms = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    gap_rel = jax.tree.map(_safe_ratio, gap_abs, norms)
    total_abs = jnp.sqrt(sum(g * g for g in jax.tree.leaves(gap_abs)))
    total_norm = jnp.sqrt(sum(n * n for n in jax.tree.leaves(norms)))
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
        xs = jnp.where(expand_weights(used, x), x.astype(jnp.float32), jnp.nan)
        med = jnp.nanmedian(xs, axis=0)
        return jnp.where(empty, 0.0, med).astype(x.dtype)

    return AggregateResult(jax.tree.map(one, updates), p, dropped, empty)


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
        xs = jnp.where(expand_weights(used, x), x.astype(jnp.float32), jnp.inf)  # excluded sort last
        xs = jnp.sort(xs, axis=0)
        rank = expand_weights(jnp.arange(x.shape[0]), xs)
        keep = (rank >= t) & (rank < k - t)
        mean = jnp.sum(jnp.where(keep, xs, 0.0), axis=0) / count
        return jnp.where(empty, 0.0, mean).astype(x.dtype)

    return AggregateResult(jax.tree.map(one, updates), p, dropped, empty)


def norm_bounded_mean(
    updates: PyTree, max_norm: Union[float, Array], num_examples: Array, mask: Optional[Array] = None
) -> AggregateResult:
    """Norm bounding (Sun et al. 2019): clip each client's delta to ``||delta_k|| <= M``, then the
    example-weighted FedAvg of the clipped deltas (``sum_k p_k delta_k min(1, M/||delta_k||)``).
    Non-finite clients are dropped before clipping."""
    p, dropped, empty = aggregation_weights(updates, num_examples, mask)
    safe = jax.tree.map(lambda x: jnp.where(expand_weights(p > 0, x), x, 0).astype(x.dtype), updates)
    clipped, _ = clip_by_client_norm(safe, max_norm)
    return AggregateResult(weighted_sum(clipped, p), p, dropped, empty)
