"""A client's local update: a `lax.scan` over local steps on its own data, vmapped over clients.

The frozen base (an emulator, or the full model for the server) is shared by every client and
enters with `in_axes=None`; only the PEFT state, the client's data and its key carry the client
axis. Ragged data: a client's examples are padded to a common count N; local steps read the client's
`count` real examples in a random order, `local_batch` at a time, and padded tokens are masked
out of the loss.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed import aggregate
from fedpeat_jax.model import gpt2


class Hyper(NamedTuple):
    """Numeric hyperparameters that a study may vmap over (traced, not static)."""

    client_lr: jax.Array
    server_lr: jax.Array
    prox_mu: jax.Array
    dp_noise: jax.Array

    @classmethod
    def from_config(cls, fed: FedConfig) -> "Hyper":
        f = lambda x: jnp.asarray(x, jnp.float32)
        return cls(f(fed.client_lr), f(fed.server_lr), f(fed.prox_mu), f(fed.dp_noise))


def client_optimizer(fed: FedConfig, lr) -> optax.GradientTransformation:
    if fed.client_optimizer == "sgd":
        return optax.sgd(lr)
    return optax.adam(lr)


def batch_loss(base, peft_state, tokens, mask, rng, model: GPT2Config, peft: PeftConfig):
    """Mean next-token loss of a batch. Training windows are right-padded, so causal attention
    never lets a real token see a pad: only the loss needs the mask, not the attention."""
    return gpt2.loss(base, tokens, mask, config=model, peft=peft_state, peft_config=peft, rng=rng)


def local_steps(loss_fn, init, tokens, mask, count, rng, tx: optax.GradientTransformation, *, n_steps: int, batch: int,
                correct_grads=None):
    """`n_steps` steps of `tx` on `loss_fn(tree, tokens, mask, key)` from `init` over one client's
    data; returns (tree, mean loss over the steps). Any trainable tree works (a PEFT state, or
    whole-model weights for full fine-tuning); `correct_grads` adjusts gradients (SCAFFOLD).

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
    peft: object  # the client's PEFT state after local training
    loss: jax.Array  # mean training loss over its local steps
    control: object  # SCAFFOLD's new client control variate (None otherwise)


def local_train(
    base,
    global_peft,
    tokens: jax.Array,  # (N, T) this client's examples, padded
    mask: jax.Array,  # (N, T)
    count: jax.Array,  # () real examples
    rng: jax.Array,
    hyper: Hyper,
    *,
    model: GPT2Config,
    peft: PeftConfig,
    fed: FedConfig,
    n_steps: int,
    batch: int,
    control: Optional[tuple] = None,  # SCAFFOLD (c, c_i)
) -> LocalResult:
    """`n_steps` optimizer steps from the global PEFT state on this client's data."""
    use_prox = fed.algorithm == "fedprox"

    def loss_fn(state, tok, msk, key):
        loss = batch_loss(base, state, tok, msk, key, model, peft)
        if use_prox:
            loss = loss + aggregate.prox_penalty(state, global_peft, hyper.prox_mu)
        return loss

    correct = None
    if control is not None:
        correct = lambda grads: aggregate.scaffold_correct_grads(grads, control[1], control[0])  # noqa: E731
    state, loss = local_steps(loss_fn, global_peft, tokens, mask, count, rng, client_optimizer(fed, hyper.client_lr),
                              n_steps=n_steps, batch=batch, correct_grads=correct)
    new_control = None
    if control is not None:
        new_control = aggregate.scaffold_client_control(control[1], control[0], global_peft, state, n_steps, hyper.client_lr)
    return LocalResult(state, loss, new_control)
