"""A client's local update: a `lax.scan` over local steps on its own data, vmapped over clients.

The update is generic over what is trained: any trainable tree with a loss
`loss_fn(tree, tokens, mask, key)` (a PEFT state on a frozen emulator, or a whole model; see
`fed.learner`). Ragged data: a client's examples are padded to a common count N; local steps read
the client's `count` real examples in a random order, `local_batch` at a time, and padded tokens
are masked out of the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import drift
from fedpeat_jax.model import gpt2


class Hyper(NamedTuple):
    """Numeric hyperparameters that a study may vmap over (traced, not static)."""

    client_lr: jax.Array
    server_lr: jax.Array
    prox_mu: jax.Array
    dp_noise: jax.Array

    @classmethod
    def from_config(cls, fed: FedConfig) -> Hyper:
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return cls(f(fed.client_lr), f(fed.server_lr), f(fed.prox_mu), f(fed.dp_noise))


def client_optimizer(fed: FedConfig, lr) -> optax.GradientTransformation:
    if fed.client_optimizer == "sgd":
        return optax.sgd(lr)
    return optax.adam(lr)


def batch_loss(base, peft_state, tokens, mask, rng, model: GPT2Config, peft: PeftConfig):
    """Mean next-token loss of a batch. Training windows are right-padded, so causal attention
    never lets a real token see a pad: only the loss needs the mask, not the attention."""
    return gpt2.loss(base, tokens, mask, config=model, peft=peft_state, peft_config=peft, rng=rng)


def local_steps(
    loss_fn,
    init,
    tokens,
    mask,
    count,
    rng,
    tx: optax.GradientTransformation,
    *,
    n_steps: int,
    batch: int,
    correct_grads=None,
):
    """`n_steps` steps of `tx` on `loss_fn(tree, tokens, mask, key)` from `init` over one client's
    data; returns (tree, mean loss over the steps). `correct_grads` adjusts gradients (SCAFFOLD).

    Sampling without replacement: the client's real examples in one random order (pads last),
    read `batch` at a time and wrapped around, so `count` examples are all seen before repeats.
    """
    k_order, k_steps = jax.random.split(rng)
    is_pad = jnp.arange(tokens.shape[0]) >= count
    order = jnp.argsort(jax.random.uniform(k_order, (tokens.shape[0],)) + is_pad)

    def step(carry, xs):
        tree, opt_state = carry
        i, k_drop = xs
        idx = order[(i * batch + jnp.arange(batch)) % jnp.maximum(count, 1)]
        loss, grads = jax.value_and_grad(loss_fn)(tree, tokens[idx], mask[idx], k_drop)
        if correct_grads is not None:
            grads = correct_grads(grads)
        updates, opt_state = tx.update(grads, opt_state, tree)
        return (optax.apply_updates(tree, updates), opt_state), loss

    steps = (jnp.arange(n_steps), jax.random.split(k_steps, n_steps))
    (tree, _), losses = jax.lax.scan(step, (init, tx.init(init)), steps)
    return tree, losses.mean()


class LocalResult(NamedTuple):
    tree: object  # the client's trainable tree after local training
    loss: jax.Array  # mean training loss over its local steps
    control: object  # SCAFFOLD's new client control variate (None otherwise)


def local_update(
    loss_fn: Callable,
    start,
    global_tree,
    tokens: jax.Array,  # (N, T) this client's examples, padded
    mask: jax.Array,  # (N, T)
    count: jax.Array,  # () real examples
    rng: jax.Array,
    hyper: Hyper,
    *,
    fed: FedConfig,
    batch: int,
    control: Optional[tuple] = None,  # SCAFFOLD (c, c_i)
) -> LocalResult:
    """`fed.local_steps` optimizer steps from `start` (the global tree, or a local-only client's
    own tree) on this client's data, with FedProx's pull towards `global_tree` and SCAFFOLD's
    gradient correction when the algorithm asks for them."""

    def objective(tree, tok, msk, key):
        loss = loss_fn(tree, tok, msk, key)
        if fed.algorithm == "fedprox":
            loss = loss + drift.prox_penalty(tree, global_tree, hyper.prox_mu)
        return loss

    correct = None
    if control is not None:
        correct = lambda grads: drift.scaffold_correct_grads(grads, control[1], control[0])  # noqa: E731
    tree, loss = local_steps(
        objective,
        start,
        tokens,
        mask,
        count,
        rng,
        client_optimizer(fed, hyper.client_lr),
        n_steps=fed.local_steps,
        batch=batch,
        correct_grads=correct,
    )
    new_control = None
    if control is not None:
        new_control = drift.scaffold_client_control(
            control[1], control[0], global_tree, tree, fed.local_steps, hyper.client_lr
        )
    return LocalResult(tree, loss, new_control)
