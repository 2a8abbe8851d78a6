"""Client-level differential privacy and secure-aggregation simulation.

* :func:`dp_fedavg` - DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): per-client L2 clipping, Gaussian noise on the sum, fixed or actual
  denominator. Pure and jittable; takes a PRNG key.
* :func:`dp_epsilon`, :func:`dp_noise_for_epsilon`, :class:`DPAccountant` - privacy accounting with
  Google's ``dp-accounting`` (RDP or PLD) for the Poisson-subsampled Gaussian mechanism composed
  over rounds. Host-side Python (not jittable): call it from the driver's logging loop.
* :func:`secagg_mask`, :func:`secagg_unmask_sum`, :func:`secure_sum` - pairwise-mask secure
  aggregation (Bonawitz et al. 2017) simulated in modular uint32 arithmetic on fixed-point encoded
  values, so the masks cancel *exactly*.

Client pytrees have a leading client axis (C, ...) as in :mod:`fedpeat_jax.fed.aggregate`.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax.fed.aggregate import (
    clip_by_client_norm,
    expand_weights,
    finite_clients,
    num_clients,
)

PyTree = Any
Array = jax.Array

ACCOUNTANTS = ("rdp", "pld")
DEFAULT_FRAC_BITS = 20  # fixed-point fraction bits of the secure-aggregation encoding


# --------------------------------------------------------------------------------------------------
# DP-FedAvg
# --------------------------------------------------------------------------------------------------


class DPResult(NamedTuple):
    """Outcome of :func:`dp_fedavg`.

    mean:        noised aggregate ``(sum_k w_k clip(delta_k) + N(0, (sigma C)^2 I)) / D``.
    noised_sum:  the numerator (useful to re-normalize differently).
    norms:       (C,) client update norms before clipping (only meaningful for used clients).
    clipped:     (C,) bool, used clients whose norm exceeded ``clip_norm``.
    dropped:     (C,) bool, participating clients excluded for a non-finite update.
    num_used:    () float32, sum of weights of the clients used (= count with unit weights).
    denominator: () float32, the ``D`` actually divided by.
    empty:       () bool, no client used; ``mean`` is then pure noise / D (still a valid DP output;
                 the driver decides whether to apply it).
    """

    mean: PyTree
    noised_sum: PyTree
    norms: Array
    clipped: Array
    dropped: Array
    num_used: Array
    denominator: Array
    empty: Array


def gaussian_noise_like(key: Array, tree: PyTree, std: Union[float, Array]) -> PyTree:
    """Independent ``N(0, std^2)`` noise for every coordinate of every leaf (float32 draws, cast to
    the leaf dtype); one subkey per leaf, derived by ``fold_in(key, leaf_index)``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    noise = [
        (std * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)).astype(x.dtype)
        for i, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)


def dp_fedavg(
    key: Array,
    updates: PyTree,
    clip_norm: Union[float, Array],
    noise_multiplier: Union[float, Array],
    mask: Optional[Array] = None,
    weights: Optional[Array] = None,
    expected_weight: Optional[Union[float, Array]] = None,
) -> DPResult:
    """Client-level DP-FedAvg aggregate of client deltas (McMahan et al. 2018, Algorithm 1).

    ``u_k = delta_k * min(1, C / ||delta_k||_2)`` (global norm over the whole pytree), then::

        S    = sum_{k used} w_k u_k + N(0, (sigma C)^2 I)       (noise on every coordinate)
        mean = S / D

    Weights ``w_k`` are 1 by default (uniform averaging); if given they are clipped to ``[0, 1]``
    so that one client still moves the sum by at most ``C`` (McMahan's capped weights
    ``min(n_k / n_cap, 1)``). The sensitivity of ``S`` to adding/removing one client is ``C``, so
    ``sigma = noise_multiplier`` is the quantity accounted by :func:`dp_epsilon`.

    Denominator ``D`` (document your choice when reporting epsilon):

    * ``expected_weight`` given (recommended, the paper's fixed-denominator estimator): ``D = q W``,
      the *expected* total weight of a Poisson-sampled cohort (``q N`` with unit weights). ``D``
      does not depend on who took part, so the DP guarantee of ``S`` carries over unchanged.
    * ``expected_weight=None``: ``D = max(sum of used weights, 1)``, the *actual* participant
      count. Lower variance, but it reveals the cohort size, which the accounting above does not
      cover (common in practice; acceptable when the cohort size is public, e.g. fixed-size
      sampling with a known count).

    Non-finite client updates are dropped before clipping (a fault guard) and reported.
    """
    c = num_clients(updates)
    m = jnp.ones((c,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    w = jnp.ones((c,), jnp.float32) if weights is None else jnp.clip(jnp.asarray(weights, jnp.float32), 0.0, 1.0)
    w = w * (m > 0)
    finite = finite_clients(updates)
    dropped = (w > 0) & ~finite
    w = jnp.where(finite, w, 0.0)
    used = w > 0
    safe = jax.tree.map(lambda x: jnp.where(expand_weights(used, x), x, 0).astype(x.dtype), updates)
    clipped_tree, norms = clip_by_client_norm(safe, clip_norm)
    summed = jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32) * expand_weights(w, x), axis=0), clipped_tree)
    noise = gaussian_noise_like(key, summed, noise_multiplier * clip_norm)
    noised = jax.tree.map(jnp.add, summed, noise)
    num_used = jnp.sum(w)
    if expected_weight is None:
        denom = jnp.maximum(num_used, 1.0)
    else:
        denom = jnp.asarray(expected_weight, jnp.float32)
    leaves_like = jax.tree.leaves(updates)
    mean = jax.tree_util.tree_unflatten(
        jax.tree.structure(summed),
        [(s / denom).astype(x.dtype) for s, x in zip(jax.tree.leaves(noised), leaves_like)],
    )
    return DPResult(
        mean=mean,
        noised_sum=noised,
        norms=norms,
        clipped=used & (norms > clip_norm),
        dropped=dropped,
        num_used=num_used,
        denominator=denom,
        empty=~jnp.any(used),
    )


# --------------------------------------------------------------------------------------------------
# Privacy accounting (dp-accounting; host-side)
# --------------------------------------------------------------------------------------------------


def _check_accounting_args(noise_multiplier, sampling_rate, rounds, delta):
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier!r}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not (isinstance(rounds, numbers.Integral) and rounds >= 0):
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _make_accountant(accountant: str, pld_discretization: float = 1e-4):
    import dp_accounting

    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=pld_discretization)
    raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


def _round_event(noise_multiplier: float, sampling_rate: float):
    import dp_accounting

    gauss = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gauss
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gauss)


def dp_epsilon(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon spent after ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism.

    Each round samples every client independently with probability ``q = sampling_rate`` and
    releases the clipped sum plus ``N(0, (sigma C)^2)`` noise (add/remove-one-client adjacency).
    ``accountant='rdp'`` (Renyi DP, Mironov 2017) or ``'pld'`` (privacy loss distributions; tighter).
    Returns 0.0 for ``rounds == 0``.
    """
    _check_accounting_args(noise_multiplier, sampling_rate, rounds, delta)
    if rounds == 0:
        return 0.0
    import dp_accounting

    acc = _make_accountant(accountant)
    acc.compose(dp_accounting.SelfComposedDpEvent(_round_event(noise_multiplier, sampling_rate), rounds))
    return float(acc.get_epsilon(delta))


def dp_noise_for_epsilon(
    target_epsilon: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier ``sigma`` whose epsilon after ``rounds`` rounds is at most
    ``target_epsilon`` (bisection by ``dp_accounting.calibrate_dp_mechanism``)."""
    _check_accounting_args(1.0, sampling_rate, rounds, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if rounds == 0:
        raise ValueError("rounds must be >= 1 to calibrate a noise multiplier")
    import dp_accounting

    def make_event(sigma):
        return dp_accounting.SelfComposedDpEvent(_round_event(sigma, sampling_rate), rounds)

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant),
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


class DPAccountant:
    """Running accountant for a training run whose DP parameters may change between rounds.

    >>> acc = DPAccountant(delta=1e-6)
    >>> acc.step(noise_multiplier=1.0, sampling_rate=0.01, rounds=100)
    >>> acc.epsilon()
    """

    def __init__(self, delta: float, accountant: str = "rdp"):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
        _check_accounting_args(1.0, 1.0, 0, delta)
        self.delta = delta
        self.accountant = accountant
        self._acc = _make_accountant(accountant)
        self.rounds = 0

    def step(self, noise_multiplier: float, sampling_rate: float, rounds: int = 1) -> None:
        """Record ``rounds`` more rounds with the given mechanism."""
        _check_accounting_args(noise_multiplier, sampling_rate, rounds, self.delta)
        if rounds == 0:
            return
        import dp_accounting

        self._acc.compose(dp_accounting.SelfComposedDpEvent(_round_event(noise_multiplier, sampling_rate), rounds))
        self.rounds += rounds

    def epsilon(self) -> float:
        """Epsilon spent so far at this accountant's delta (0.0 before any round)."""
        return 0.0 if self.rounds == 0 else float(self._acc.get_epsilon(self.delta))


# --------------------------------------------------------------------------------------------------
# Secure aggregation by pairwise masks (simulation)
# --------------------------------------------------------------------------------------------------


class SecAggMasked(NamedTuple):
    """Masked client uploads.

    masked:    tree of uint32 (C, ...) leaves: fixed-point encoding of each client's update plus
               its pairwise masks, modulo 2^32. Individually indistinguishable from uniform.
    used:      (C,) bool, clients that took part in masking (participating and finite).
    saturated: (C,) bool, used clients with a value clipped to the encodable range.
    dropped:   (C,) bool, participating clients excluded for a non-finite update.
    """

    masked: PyTree
    used: Array
    saturated: Array
    dropped: Array


def _clip_limit(c: int) -> float:
    """Largest per-client fixed-point magnitude (exactly representable in float32) such that a sum
    over ``c`` clients fits in int32."""
    lim = (2**31 - 1) // c
    lim32 = np.float32(lim)
    while int(lim32) > lim:
        lim32 = np.nextafter(lim32, np.float32(0))
    return float(lim32)


def secagg_encode(x: Array, frac_bits: int, num_clients_: int = 1) -> tuple[Array, Array]:
    """Fixed-point encode ``round(x * 2^frac_bits)`` as uint32 (two's complement, i.e. mod 2^32).

    Values are clipped to ``+-(2^31 - 1) // num_clients_`` units so that the sum of that many
    clients cannot overflow. Returns ``(encoded, saturated_mask)``."""
    lim = _clip_limit(num_clients_)
    q = jnp.round(x.astype(jnp.float32) * (2.0**frac_bits))
    sat = jnp.abs(q) > lim
    q = jnp.clip(q, -lim, lim).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(q, jnp.uint32), sat


def secagg_decode(u: Array, frac_bits: int) -> Array:
    """Inverse of :func:`secagg_encode`: uint32 -> int32 (two's complement) -> float32."""
    return jax.lax.bitcast_convert_type(u, jnp.int32).astype(jnp.float32) / (2.0**frac_bits)


def _pair_key(key: Array, i: Array, j: Array) -> Array:
    lo, hi = jnp.minimum(i, j), jnp.maximum(i, j)
    return jax.random.fold_in(jax.random.fold_in(key, lo), hi)


def secagg_pair_masks(key: Array, i: Array, members: Array, size: int) -> Array:
    """Client ``i``'s signed sum of pair masks, ``sum_{j > i} r_ij - sum_{j < i} r_ji (mod 2^32)``,
    over the other `members` ((C,) bool) of the masking cohort; zeros when ``i`` is not a member.
    One uniform uint32 stream of length `size` per pair, from the pair key, scanned over partner
    offsets so memory stays ``O(size)``."""
    c = members.shape[0]

    def body(acc, o):
        j = (i + o) % c
        r = jax.random.bits(_pair_key(key, i, j), (size,), jnp.uint32)
        r = jnp.where(members[i] & members[j], r, jnp.uint32(0))
        return jnp.where(i < j, acc + r, acc - r), None  # uint32 wraps mod 2^32

    out, _ = jax.lax.scan(body, jnp.zeros((size,), jnp.uint32), jnp.arange(1, c))
    return out


def secagg_mask(
    key: Array, updates: PyTree, mask: Optional[Array] = None, frac_bits: int = DEFAULT_FRAC_BITS
) -> SecAggMasked:
    """Pairwise-masked uploads (Bonawitz et al. 2017, without the secret sharing).

    Client ``i`` uploads ``y_i = enc(x_i) + sum_{j used, j > i} r_ij - sum_{j used, j < i} r_ji
    (mod 2^32)`` where ``r_ij`` is a uniform uint32 stream from the pair key
    ``fold_in(fold_in(key, min(i, j)), max(i, j))`` (one per pair, shared by both ends, covering
    the client's whole flattened update). Summed over the used clients every ``r_ij`` appears once
    with each sign, so ``sum_i y_i = sum_i enc(x_i) (mod 2^32)`` *exactly* (integer arithmetic):
    decoding recovers the fixed-point sum with error ``<= C * 2^-(frac_bits+1)`` from rounding only.

    Dropouts: masks are formed only among clients that are used (participating, finite update).
    This simulates the outcome of SecAgg's dropout recovery (the server reconstructs a dropped
    client's pairwise seeds from secret shares and removes its masks) without simulating the
    cryptography; the set of used clients must be known before masking.

    Range: the sum must fit in int32 fixed point, i.e. ``|sum| < 2^(31 - frac_bits)``; per-client
    values are clipped to ``(2^31 - 1) / C`` units and reported in ``saturated``. With the default
    ``frac_bits=20``: resolution 9.5e-7, per-client range +-2048 / C (e.g. +-32 for 64 clients).
    Pre-weighted uploads ``p_k delta_k`` are small, so they rarely saturate; raise ``frac_bits``
    for tiny updates, lower it for large ones.

    Cost: ``C (C - 1)`` mask streams the size of one update (complete graph), computed with a scan
    over partner offsets so memory stays ``O(C * update)``.
    """
    if isinstance(frac_bits, numbers.Integral) and not 0 <= frac_bits <= 30:
        raise ValueError(f"frac_bits must be in [0, 30] for int32 fixed point, got {frac_bits}")
    c = num_clients(updates)
    m = jnp.ones((c,), bool) if mask is None else (jnp.asarray(mask) > 0)
    finite = finite_clients(updates)
    used = m & finite
    dropped = m & ~finite
    leaves, treedef = jax.tree_util.tree_flatten(updates)

    # One flat (C, P) fixed-point matrix, so each pair needs a single PRG stream.
    flat = jnp.concatenate([jnp.reshape(x.astype(jnp.float32), (c, -1)) for x in leaves], axis=1)
    flat = jnp.where(used[:, None], flat, 0.0)
    encoded, sat = secagg_encode(flat, frac_bits, c)
    encoded = jnp.where(used[:, None], encoded, jnp.uint32(0))
    saturated = used & jnp.any(sat, axis=1)
    size = flat.shape[1]
    masks = jax.vmap(lambda i: secagg_pair_masks(key, i, used, size))(jnp.arange(c))
    masked = jnp.where(used[:, None], encoded + masks, jnp.uint32(0))
    out, offset = [], 0
    for x in leaves:
        k = int(np.prod(jnp.shape(x)[1:], dtype=np.int64))
        out.append(jnp.reshape(masked[:, offset : offset + k], jnp.shape(x)))
        offset += k
    return SecAggMasked(jax.tree_util.tree_unflatten(treedef, out), used, saturated, dropped)


def secagg_unmask_sum(masked: SecAggMasked, frac_bits: int = DEFAULT_FRAC_BITS) -> PyTree:
    """Server side: sum the used clients' uploads modulo 2^32 (masks cancel) and decode to float32."""

    def one(y):
        y = jnp.where(expand_weights(masked.used, y), y, jnp.uint32(0))
        return secagg_decode(jnp.sum(y, axis=0, dtype=jnp.uint32), frac_bits)

    return jax.tree.map(one, masked.masked)


def secure_sum(
    key: Array, updates: PyTree, mask: Optional[Array] = None, frac_bits: int = DEFAULT_FRAC_BITS
) -> tuple[PyTree, SecAggMasked]:
    """Mask, then unmask: the float32 sum over used clients as the server would learn it, with the
    masked uploads for inspection. Divide by the used weight to average (weighted averaging: have
    clients upload ``n_k * delta_k`` and ``n_k`` and divide the two secure sums)."""
    masked = secagg_mask(key, updates, mask, frac_bits)
    return secagg_unmask_sum(masked, frac_bits), masked


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_FRAC_BITS",
    "DPAccountant",
    "DPResult",
    "SecAggMasked",
    "dp_epsilon",
    "dp_fedavg",
    "dp_noise_for_epsilon",
    "gaussian_noise_like",
    "secagg_decode",
    "secagg_encode",
    "secagg_mask",
    "secagg_pair_masks",
    "secagg_unmask_sum",
    "secure_sum",
]
