"""Client-drift corrections: FedProx's proximal term (Li et al. 2020) and SCAFFOLD's control
variates (Karimireddy et al. 2020, option II). Pure and jittable; client quantities carry a
leading client axis as in `fed.aggregate`."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from fedpeat_jax.fed.aggregate import AggregateResult, client_deltas, expand_weights, fedavg, num_clients, weighted_sum

PyTree = Any
Array = jax.Array


def prox_penalty(params: PyTree, global_params: PyTree, mu: Union[float, Array]) -> Array:
    """FedProx proximal term (Li et al. 2020): ``mu / 2 * ||w - w_g||_2^2`` summed over all leaves.

    Add it to the local loss; its gradient is ``mu (w - w_g)``. Works per client (vmap it) or on
    client-stacked trees (then the squared norms of all clients are summed).
    """
    sq = sum(
        jnp.sum(jnp.square(w.astype(jnp.float32) - jnp.asarray(g, jnp.float32)))
        for w, g in zip(jax.tree.leaves(params), jax.tree.leaves(global_params))
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
    c = jax.tree.map(jnp.zeros_like, params)
    c_clients = jax.tree.map(lambda x: jnp.zeros((total_clients,) + jnp.shape(x), x.dtype), params)
    return ScaffoldState(c, c_clients)


def scaffold_cohort_controls(state: ScaffoldState, client_ids: Array) -> PyTree:
    """Gather the sampled clients' control variates ``c_i``: leaves (C, ...)."""
    return jax.tree.map(lambda cc: cc[client_ids], state.c_clients)


def scaffold_correct_grads(grads: PyTree, c_i: PyTree, c: PyTree) -> PyTree:
    """Corrected local gradient ``g - c_i + c`` (used for every local step ``y <- y - lr (g - c_i + c)``).

    Works per client, or with a client axis on ``grads`` and ``c_i`` (``c`` broadcasts).
    """
    return jax.tree.map(lambda g, ci, cg: g - ci + cg, grads, c_i, c)


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
        d = expand_weights(denom, yi)
        new = ci - cg + (xg - yi) / jnp.where(d > 0, d, 1.0)
        return jnp.where(d > 0, new, ci).astype(ci.dtype)

    return jax.tree.map(one, c_i, c, x, y_i)


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
    dc = jax.tree.map(lambda a, b: a - b, c_new, c_old)
    cohort = num_clients(dy)
    counts = jnp.ones((cohort,), jnp.float32) if num_examples is None else num_examples
    res = fedavg((dy, dc), counts, mask)
    used = res.weights > 0
    mean_dy = res.mean[0]
    new_x = jax.tree.map(lambda xg, d: jnp.where(res.empty, xg, xg + server_lr * d).astype(xg.dtype), x, mean_dy)
    sum_dc = weighted_sum(dc, used.astype(jnp.float32))
    new_c = jax.tree.map(lambda cg, s: (cg + s / n_total).astype(cg.dtype), state.c, sum_dc)

    def scatter(cc, cn, co):
        return cc.at[client_ids].set(jnp.where(expand_weights(used, cn), cn, co).astype(cc.dtype))

    new_clients = jax.tree.map(scatter, state.c_clients, c_new, c_old)
    return new_x, ScaffoldState(new_c, new_clients), res._replace(mean=mean_dy)
