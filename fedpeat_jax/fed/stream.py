"""Aggregation streamed over chunks of clients, so a round's memory is flat in clients per round.

A round trains its cohort a chunk at a time; after each chunk `add` folds the chunk's results
into running `Totals`, and `finish` turns them into the round's aggregate. For every rule the
totals are sums, so chunking changes only the order of float additions:

  mean (FedAvg, FedProx, FedOpt)   sum_k w_k delta_k and sum_k w_k        (w_k = n_k, finite clients)
  norm_bound                       sum_k w_k clip(delta_k, M)
  dp (DP-FedAvg)                   sum_k clip(delta_k, C) and the count; Gaussian noise once on the sum
  secure                           sum_k of the masked fixed-point uploads (uint32; masks cancel
                                   over the whole cohort)
  exact_lora (FLoRA)               sum_k w_k a_k @ b_k (one stacked matmul per chunk)
  scaffold                         sum_k w_k delta_k and sum_k (c_k+ - c_k)
  robust (median, trimmed mean)    the chunk's deltas themselves: robust statistics need every
                                   client's (PEFT deltas are small)
  local                            nothing: local-only clients keep their own trees

A client is *used* when its slot is valid, it holds data (w_k > 0) and its update is finite; a
non-finite update is dropped and counted. Secure aggregation is the one rule where the client
itself must notice a non-finite update (the server sees only masked sums): it then uploads zeros,
still masked, so the masks of the cohort fixed before training still cancel.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedpeat_jax.config import FedConfig
from fedpeat_jax.fed import aggregate, privacy

PyTree = Any


def rule(fed: FedConfig) -> str:
    """The aggregation rule a FedConfig asks for (see the module docstring)."""
    if fed.algorithm in ("local", "scaffold"):
        return fed.algorithm
    if fed.lora_aggregation == "exact":
        return "exact_lora"
    if fed.dp_clip is not None:
        return "dp"
    if fed.aggregation in ("median", "trimmed_mean"):
        return "robust"
    if fed.aggregation == "norm_bound":
        return "norm_bound"
    return "secure" if fed.secure_aggregation else "mean"


class Chunk(NamedTuple):
    """One chunk of clients' results; every field has a leading client axis (B, ...)."""

    trees: PyTree  # the clients' trained trees
    deltas: PyTree  # trees minus the global tree
    weight: jax.Array  # FedAvg weight n_k, 0 for an invalid slot or a client without data
    loss: jax.Array  # mean local training loss
    slot: jax.Array  # int32 position in the round's cohort (secure-aggregation pairs)
    control_delta: PyTree = None  # SCAFFOLD: c_k+ - c_k


class Totals(NamedTuple):
    weight: jax.Array  # sum of w_k over used clients (their examples)
    used: jax.Array  # number of used clients
    dropped: jax.Array  # clients with data whose update was not finite
    loss: jax.Array  # sum of the used clients' losses
    payload: PyTree  # the rule's running sums (None for robust and local)
    gap: PyTree  # LoRA gap sums (aggregate.lora_sums), or None


class Cohort(NamedTuple):
    """What every chunk of a round needs to know about the whole cohort (secure aggregation)."""

    key: jax.Array  # the round's aggregation key
    members: jax.Array  # (S,) bool, slots that take part (masks are formed among them)
    total_weight: jax.Array  # () sum of the members' weights, fixed before training


def used_weights(chunk: Chunk) -> tuple:
    """(w_k for used clients else 0, finite (B,))."""
    finite = aggregate.finite_clients(chunk.deltas)
    if chunk.control_delta is not None:
        finite = finite & aggregate.finite_clients(chunk.control_delta)
    return jnp.where(finite, chunk.weight, 0.0), finite


def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def _dense_zeros(target) -> jax.Array:
    """Zeros shaped like a LoRA target's dense product a @ b: (..., d_in, d_out)."""
    return jnp.zeros(target["a"].shape[:-1] + target["b"].shape[-1:], jnp.float32)


def _flat_size(tree: PyTree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def init(fed: FedConfig, template: PyTree, gap: bool) -> Totals:
    """Zero totals for a round whose global trainable tree is `template`."""
    kind = rule(fed)
    if kind in ("mean", "norm_bound", "dp"):
        payload = _zeros(template)
    elif kind == "scaffold":
        payload = (_zeros(template), _zeros(template))
    elif kind == "exact_lora":
        payload = aggregate.map_lora_targets(_dense_zeros, template["blocks"]["lora"])
    elif kind == "secure":
        payload = jnp.zeros((_flat_size(template),), jnp.uint32)
    else:
        payload = None
    sums = None
    if gap:
        zeros = lambda t: {"a": jnp.zeros_like(t["a"]), "b": jnp.zeros_like(t["b"]), "ab": _dense_zeros(t)}  # noqa: E731
        sums = aggregate.map_lora_targets(zeros, template["blocks"]["lora"])
    z = jnp.zeros((), jnp.float32)
    return Totals(z, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), z, payload, sums)


def _masked_uploads(
    deltas: PyTree, scale: jax.Array, member: jax.Array, slots: jax.Array, cohort: Cohort, frac_bits: int
) -> jax.Array:
    """Each member's upload enc(scale_k delta_k) + its pair masks, summed over the chunk (uint32).
    `member` (B,) marks the chunk's entries that are cohort members (not padding)."""
    b = scale.shape[0]
    flat = jnp.concatenate([jnp.reshape(x.astype(jnp.float32), (b, -1)) for x in jax.tree.leaves(deltas)], axis=1)
    flat = jnp.where(scale[:, None] > 0, flat * scale[:, None], 0.0)
    encoded, _ = privacy.secagg_encode(flat, frac_bits, cohort.members.shape[0])
    masks = jax.vmap(lambda i: privacy.secagg_pair_masks(cohort.key, i, cohort.members, flat.shape[1]))(slots)
    uploads = jnp.where(member[:, None], encoded + masks, jnp.uint32(0))
    return jnp.sum(uploads, axis=0, dtype=jnp.uint32)


def add(totals: Totals, chunk: Chunk, fed: FedConfig, cohort: Optional[Cohort] = None) -> tuple:
    """Fold one chunk into the totals. Returns (totals, kept) where `kept` is what a robust rule
    keeps of the chunk ((deltas, used) with the chunk's client axis) and None otherwise."""
    kind = rule(fed)
    w, finite = used_weights(chunk)
    used = w > 0
    dropped = jnp.sum((chunk.weight > 0) & ~finite).astype(jnp.int32)
    payload, kept = totals.payload, None
    if kind == "mean":
        payload = jax.tree.map(jnp.add, payload, aggregate.weighted_sum(chunk.deltas, w))
    elif kind in ("norm_bound", "dp"):
        safe = jax.tree.map(lambda x: jnp.where(aggregate.expand_weights(used, x), x, 0.0), chunk.deltas)
        clipped, _ = aggregate.clip_by_client_norm(safe, fed.norm_bound if kind == "norm_bound" else fed.dp_clip)
        weights = w if kind == "norm_bound" else used.astype(jnp.float32)  # DP-FedAvg: unit weights
        payload = jax.tree.map(jnp.add, payload, aggregate.weighted_sum(clipped, weights))
    elif kind == "scaffold":
        dy = aggregate.weighted_sum(chunk.deltas, w)
        dc = aggregate.weighted_sum(chunk.control_delta, used.astype(jnp.float32))
        payload = jax.tree.map(jnp.add, payload, (dy, dc))
    elif kind == "exact_lora":
        stacked = aggregate.map_lora_targets(lambda t: aggregate.stack_target(t, w), chunk.trees["blocks"]["lora"])
        products = aggregate.map_lora_targets(lambda t: aggregate.lora_product(t["a"], t["b"]), stacked)
        payload = jax.tree.map(jnp.add, payload, products)
    elif kind == "secure":
        scale = w / jnp.where(cohort.total_weight > 0, cohort.total_weight, 1.0)
        payload = payload + _masked_uploads(
            chunk.deltas, scale, chunk.weight > 0, chunk.slot, cohort, privacy.DEFAULT_FRAC_BITS
        )
    elif kind == "robust":
        kept = (chunk.deltas, used)
    gap = totals.gap
    if gap is not None:
        gap = jax.tree.map(jnp.add, gap, aggregate.lora_sums(chunk.trees["blocks"]["lora"], w))
    new = Totals(
        weight=totals.weight + jnp.sum(w),
        used=totals.used + jnp.sum(used).astype(jnp.int32),
        dropped=totals.dropped + dropped,
        loss=totals.loss + jnp.sum(jnp.where(used, chunk.loss, 0.0)),
        payload=payload,
        gap=gap,
    )
    return new, kept


def _divide(tree: PyTree, denominator: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: x / jnp.where(denominator > 0, denominator, 1.0), tree)


def _unflatten(flat: jax.Array, template: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(template)
    out, offset = [], 0
    for x in leaves:
        out.append(jnp.reshape(flat[offset : offset + x.size], x.shape))
        offset += x.size
    return jax.tree.unflatten(treedef, out)


def mean_delta(
    totals: Totals, kept, fed: FedConfig, template: PyTree, key: jax.Array, dp_noise, cohort: Optional[Cohort] = None
):
    """The round's aggregate (the mean delta; for exact LoRA the mean dense product delta, LoRA
    scale not applied; for SCAFFOLD (mean delta, sum of control deltas)) and whether it is empty
    (no client used: the caller keeps its global state)."""
    kind = rule(fed)
    empty = totals.used == 0
    if kind in ("mean", "norm_bound", "exact_lora"):
        return _divide(totals.payload, totals.weight), empty
    if kind == "scaffold":
        return (_divide(totals.payload[0], totals.weight), totals.payload[1]), empty
    if kind == "dp":
        noised = jax.tree.map(
            jnp.add, totals.payload, privacy.gaussian_noise_like(key, totals.payload, dp_noise * fed.dp_clip)
        )
        return _divide(noised, jnp.maximum(totals.used.astype(jnp.float32), 1.0)), empty
    if kind == "secure":
        decoded = privacy.secagg_decode(totals.payload, privacy.DEFAULT_FRAC_BITS)
        scale = cohort.total_weight / jnp.where(totals.weight > 0, totals.weight, 1.0)
        return _unflatten(decoded * scale, template), empty
    if kind == "robust":
        deltas, used = kept
        if fed.aggregation == "median":
            return aggregate.coordinate_median(deltas, used).mean, empty
        return aggregate.trimmed_mean(deltas, fed.trim_fraction, used).mean, empty
    return None, empty


def gap(totals: Totals) -> jax.Array:
    """Relative LoRA aggregation gap of the round (0 when not tracked)."""
    if totals.gap is None:
        return jnp.zeros(())
    return aggregate.lora_gap_from_sums(totals.gap, totals.weight, totals.used == 0).total_rel
