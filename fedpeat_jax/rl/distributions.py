"""Factorized categorical distributions for multi-discrete actions: one categorical per branch.

Any JAX agent can use them for the FedPEAT MEC environment (or any ``MultiDiscrete`` space):
the policy network emits the concatenated logits of every branch, ``sum(nvec)`` numbers, and

    pi = MultiCategorical(logits, nvec)        # logits (..., sum(nvec))
    action = pi.sample(seed=key)               # (..., n_branches) int32
    logp = pi.log_prob(action)                 # (...,)  sum of the branch log-probs
    ent = pi.entropy()                         # (...,)  sum of the branch entropies
    greedy = pi.mode()                         # (..., n_branches) most likely choice per branch

which is the method set PureJaxRL's PPO uses on ``distrax.Categorical``, so such code swaps it in
unchanged (``examples/purejaxrl_ppo.py``). ``branch_log_probs`` / ``branch_entropies`` give the
per-branch values (the action-branching variant of PPO clips each branch's ratio).

How the softmax is computed: every branch's logits are shifted by that branch's first logit (a
constant for the gradient, so exp() = 1 there and no branch's sum underflows), and each run of
consecutive branches of equal size is summed by one reshape + reduction (:func:`branch_groups`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax import cpu_tricks

EXP_CLAMP = 80.0  # logits more than 80 nats above their branch's first: the branch is already deterministic


def branch_groups(nvec) -> tuple:
    """Runs of consecutive branches of equal size: ((first_branch, n_branches, size, logit_offset), ...).

    The logits of a run are one contiguous (n_branches * size) slice, so each run is handled
    with a single reshape (per-branch sums, the argmax of :func:`mode_branches`).
    """
    nvec = [int(n) for n in np.asarray(nvec).ravel()]
    if not nvec or min(nvec) < 1:
        raise ValueError(f"every action branch needs at least one choice, got nvec={nvec}")
    groups, start, offset = [], 0, 0
    while start < len(nvec):
        end = start
        while end < len(nvec) and nvec[end] == nvec[start]:
            end += 1
        groups.append((start, end - start, nvec[start], offset))
        offset += (end - start) * nvec[start]
        start = end
    return tuple(groups)


class BranchLayout(NamedTuple):
    """Where each of the sum(nvec) = K logits sits (constant index arrays) and the runs of branches."""

    nvec: tuple  # (n_branches,) choices per branch
    groups: tuple  # branch_groups(nvec)
    branch: np.ndarray  # (K,) int32: the branch of logit k
    first: np.ndarray  # (K,) int32: the index of the first logit of logit k's branch
    choice: np.ndarray  # (K,) float32: the index of logit k within its branch
    branch_first: np.ndarray  # (n_branches,) int32: the index of branch b's first logit


def branch_layout(nvec) -> BranchLayout:
    """The (cached) :class:`BranchLayout` of a multi-discrete action with sizes ``nvec``."""
    return _branch_layout(tuple(int(n) for n in np.asarray(nvec).ravel()))


@functools.cache
def _branch_layout(nvec: tuple) -> BranchLayout:
    groups = branch_groups(nvec)  # validates
    sizes = np.asarray(nvec)
    branch = np.repeat(np.arange(len(nvec)), nvec)
    choice = np.concatenate([np.arange(n) for n in nvec])
    branch_first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return BranchLayout(
        nvec,
        groups,
        branch.astype(np.int32),
        branch_first[branch].astype(np.int32),
        choice.astype(np.float32),
        branch_first.astype(np.int32),
    )


def _branch_sum(x: jax.Array, layout: BranchLayout) -> jax.Array:
    """Per-branch sums of (..., K) values -> (..., n_branches): one reshape + reduction per run."""
    lead = x.shape[:-1]
    return jnp.concatenate(
        [x[..., off : off + nb * size].reshape(lead + (nb, size)).sum(-1) for _, nb, size, off in layout.groups],
        axis=-1,
    )


class BranchSoftmax(NamedTuple):
    """Every branch's softmax statistics, computed once and shared by log-probs and entropy."""

    layout: BranchLayout
    z: jax.Array  # (..., K) logits shifted by their branch's first logit
    e: jax.Array  # (..., K) exp(z)
    s: jax.Array  # (..., n_branches) per-branch sum of e
    lse: jax.Array  # (..., n_branches) log(s): the branch's log-normalizer relative to the shift

    def log_probs(self, actions: jax.Array) -> jax.Array:
        """log pi_b(a_b | s) of every branch, (..., n_branches)."""
        return _branch_sum(self.chosen(actions) * self.z, self.layout) - self.lse

    def joint_log_prob(self, actions: jax.Array) -> jax.Array:
        """The sum over branches of log pi_b(a_b | s), without the per-branch split."""
        return jnp.sum(self.chosen(actions) * self.z, axis=-1) - jnp.sum(self.lse, axis=-1)

    def entropies(self) -> jax.Array:
        """Entropy of every branch, (..., n_branches): log s - sum_k p_k z_k."""
        return self.lse - _branch_sum(self.e * self.z, self.layout) / self.s

    def chosen(self, actions: jax.Array) -> jax.Array:
        # one-hot of the chosen logit of every branch (a multiply in the gradient, not a scatter)
        return (jnp.take(actions, self.layout.branch, axis=-1) == self.layout.choice).astype(self.z.dtype)


def branch_softmax(logits: jax.Array, nvec) -> BranchSoftmax:
    """The :class:`BranchSoftmax` of ``logits`` (..., sum nvec)."""
    layout = branch_layout(nvec)
    z = logits - jax.lax.stop_gradient(jnp.take(logits, layout.first, axis=-1))
    e = jnp.exp(jnp.minimum(z, EXP_CLAMP))
    s = _branch_sum(e, layout)
    return BranchSoftmax(layout, z, e, s, jnp.log(s))


def branch_log_probs(logits: jax.Array, actions: jax.Array, nvec) -> jax.Array:
    """log pi_b(a_b | s) of every branch: logits (..., sum nvec), actions (..., n_branches) -> (..., n_branches)."""
    return branch_softmax(logits, nvec).log_probs(actions)


def joint_log_prob(logits: jax.Array, actions: jax.Array, nvec) -> jax.Array:
    """log pi(a | s) = sum over branches of log pi_b(a_b | s)."""
    return branch_softmax(logits, nvec).joint_log_prob(actions)


def branch_entropies(logits: jax.Array, nvec) -> jax.Array:
    """Entropy of every branch's categorical, shape (..., n_branches)."""
    return branch_softmax(logits, nvec).entropies()


def sample_with_log_probs(key: jax.Array, logits: jax.Array, nvec):
    """(actions (..., n_branches) int32, their branch log-probs): one sample per branch by inversion.

    x_j = choice j of every branch (one gather of constant indices; a branch with fewer choices
    repeats its last one, masked out), shifted by choice 0. With a uniform u per branch
    (``cpu_tricks.uniforms``), the sample is the number of choices, other than the last, whose
    running sum e_0 + ... + e_j is below u * s.
    """
    layout = branch_layout(nvec)
    sizes = np.asarray(layout.nvec)
    last = layout.branch_first + sizes - 1
    x = [jnp.take(logits, np.minimum(layout.branch_first + j, last), axis=-1) for j in range(int(sizes.max()))]
    z = [xj - jax.lax.stop_gradient(x[0]) for xj in x]
    e = [jnp.exp(jnp.minimum(zj, EXP_CLAMP)) * (j < sizes) for j, zj in enumerate(z)]
    s = sum(e)
    threshold = cpu_tricks.uniforms(key, logits.shape[:-1] + (len(sizes),), rolled=False) * s
    actions, running = jnp.zeros(s.shape, jnp.int32), jnp.zeros_like(s)
    for j in range(len(e) - 1):
        running = running + e[j]
        actions = actions + ((running < threshold) & (j < sizes - 1)).astype(jnp.int32)
    chosen = z[0]
    for j in range(1, len(z)):
        chosen = jnp.where(actions == j, z[j], chosen)
    return cpu_tricks.materialize(actions), chosen - jnp.log(s)


def sample_branches(key: jax.Array, logits: jax.Array, nvec) -> jax.Array:
    """One sample per branch (see :func:`sample_with_log_probs`): (..., n_branches) int32."""
    return sample_with_log_probs(key, logits, nvec)[0]


def mode_branches(logits: jax.Array, nvec) -> jax.Array:
    """The most likely choice of every branch (the deterministic policy)."""
    parts = [
        jnp.argmax(logits[..., off : off + nb * size].reshape(logits.shape[:-1] + (nb, size)), axis=-1)
        for _, nb, size, off in branch_groups(nvec)
    ]
    return jnp.concatenate(parts, axis=-1).astype(jnp.int32)


class MultiCategorical:
    """A factorized categorical over a multi-discrete action (the distrax-style object).

    ``logits``: (..., sum(nvec)), the branches' logits concatenated in branch order; ``nvec``:
    the number of choices per branch (e.g. ``env.nvec`` or ``action_space.nvec``). Methods follow
    ``distrax.Categorical``: ``sample(seed=key)``, ``log_prob(value)``, ``entropy()``,
    ``mode()``, ``sample_and_log_prob(seed=key)``; values are (..., n_branches) int32 actions and
    log-probs / entropies are the sums over branches.
    """

    def __init__(self, logits: jax.Array, nvec):
        self.logits = logits
        self.nvec = tuple(int(n) for n in np.asarray(nvec).ravel())
        if logits.shape[-1] != sum(self.nvec):
            raise ValueError(
                f"logits must end in sum(nvec) = {sum(self.nvec)} entries for nvec={list(self.nvec)}, "
                f"got shape {logits.shape}"
            )

    @functools.cached_property
    def _softmax(self) -> BranchSoftmax:
        return branch_softmax(self.logits, self.nvec)

    def sample(self, seed: jax.Array, sample_shape=()) -> jax.Array:
        if sample_shape != ():
            raise NotImplementedError("MultiCategorical.sample draws one sample per batch entry (sample_shape=())")
        return sample_branches(seed, self.logits, self.nvec)

    def sample_and_log_prob(self, seed: jax.Array):
        actions, logp_b = sample_with_log_probs(seed, self.logits, self.nvec)
        return actions, jnp.sum(logp_b, axis=-1)

    def log_prob(self, value: jax.Array) -> jax.Array:
        return self._softmax.joint_log_prob(value)

    def branch_log_prob(self, value: jax.Array) -> jax.Array:
        return self._softmax.log_probs(value)

    def entropy(self) -> jax.Array:
        return jnp.sum(self._softmax.entropies(), axis=-1)

    def mode(self) -> jax.Array:
        return mode_branches(self.logits, self.nvec)


__all__ = [
    "BranchLayout",
    "BranchSoftmax",
    "MultiCategorical",
    "branch_entropies",
    "branch_groups",
    "branch_layout",
    "branch_log_probs",
    "branch_softmax",
    "joint_log_prob",
    "mode_branches",
    "sample_branches",
    "sample_with_log_probs",
]
