"""Autoregressive generation with a KV cache, jitted end to end.

    out = generate(params, ids, mask, config=cfg, max_new_tokens=20)                       # greedy
    out = generate(params, ids, mask, config=cfg, max_new_tokens=20, do_sample=True,
                   temperature=0.8, top_k=40, rng=jax.random.key(0))                      # sampling

Padding. Prompts may be padded on either side (any layout: the real tokens of a row need not even
be contiguous). Inside, every row is compacted to *left* padding, so all rows end at the same
cache slot and each step writes one shared slot: no per-row scatter. Position ids count real
tokens only (cumsum of the mask, as transformers' `generate` does), so a left-padded row gets the
same positions as the unpadded prompt. The output is left-padded: `sequences` = compacted prompt
followed by the new tokens, with `attention_mask` marking real tokens.

Stopping. A row that emitted `eos_token_id` emits `pad_token_id` from then on (transformers'
convention); the loop (`lax.while_loop`) ends early once every row has stopped.

PEFT. LoRA, BitFit and full tuning are merged into the weights once, before decoding (cheaper per
step and exactly the exported model); adapters run inside the blocks; soft prompts are prefilled
in front of the prompt (positions 0..n-1, real tokens after them, as in `gpt2.hidden_states`).

Compilation. One program per (config, PEFT config, prompt batch shape, max_new_tokens): the
decoding options (greedy or sampling, temperature, top_k, eos and pad ids) are traced values
chosen with `lax.cond`, so sweeping them does not recompile, and merged PEFT kinds reuse the plain
model's program.

The forward is gpt2's own pieces (`embed`, `run_blocks` with a `KVCache`, `head`); the prefill is
one cached call over the whole prompt, then one cached call per new token.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.model import gpt2

MERGEABLE = ("lora", "bitfit", "full")


class Generation(NamedTuple):
    sequences: jax.Array  # (B, T + N): left-padded prompt, then the new tokens (pads after eos)
    attention_mask: jax.Array  # (B, T + N): 1 on real prompt tokens and new tokens up to and including eos
    new_tokens: jax.Array  # (B, N): the generated part of `sequences`


class Sampling(NamedTuple):
    """Decoding options as traced values: changing them does not recompile."""

    do_sample: jax.Array  # bool: sample, else argmax
    temperature: jax.Array  # float32 > 0
    top_k: jax.Array  # int32: keep the k most likely tokens; 0 keeps all
    eos_token_id: jax.Array  # int32; -1: no eos
    pad_token_id: jax.Array  # int32


def generate(
    params,
    input_ids,
    attention_mask=None,
    *,
    config: GPT2Config,
    max_new_tokens: int,
    peft=None,
    peft_config: Optional[PeftConfig] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    rng: Optional[jax.Array] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
) -> Generation:
    """Generate `max_new_tokens` tokens after each prompt (greedy unless `do_sample`).

    Sampling draws from softmax(logits / temperature), restricted to the `top_k` most likely
    tokens when `top_k` is given. `pad_token_id` defaults to `eos_token_id`, else 0. All checks
    run here, before anything is traced.
    """
    input_ids = jnp.asarray(input_ids)
    gpt2.check_inputs(input_ids, config)
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape {input_ids.shape}")
    if not isinstance(attention_mask, jax.core.Tracer) and not bool(np.all(np.asarray(attention_mask).sum(1) > 0)):
        raise ValueError("every prompt needs at least one real token (a row of attention_mask is all zeros)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if peft is not None and peft_config is None:
        raise ValueError("a PEFT state was given without its PeftConfig")
    if peft_config is not None:
        peft_config.validate(config)
    n_soft = peft_config.n_prompt_tokens if peft is not None and peft_config.kind == "prompt" else 0
    total = n_soft + input_ids.shape[1] + max_new_tokens
    if total > config.n_positions:
        raise ValueError(
            f"prompt length {input_ids.shape[1]}"
            + (f" + {n_soft} soft prompt tokens" if n_soft else "")
            + f" + max_new_tokens {max_new_tokens} = {total} exceeds the model's n_positions ({config.n_positions})"
        )
    if do_sample:
        if rng is None:
            raise ValueError("sampling (do_sample=True) needs an rng key")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if top_k is not None and not 1 <= top_k <= config.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {top_k!r}")
    for name, tok in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tok is not None and not 0 <= tok < config.vocab_size:
            raise ValueError(f"{name} {tok} is outside the vocabulary [0, {config.vocab_size})")
    pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)

    if peft_config is not None and peft_config.kind in MERGEABLE and peft is not None:
        params, peft = _merge(params, peft, config, peft_config), None  # fold once; decode the plain model
    if peft is None or peft_config.kind == "none":
        peft, peft_config = None, None
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding; a key keeps one compiled program for both
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # legacy uint32 keys
    sampling = Sampling(
        do_sample=jnp.asarray(do_sample, bool),
        temperature=jnp.asarray(temperature if do_sample else 1.0, jnp.float32),
        top_k=jnp.asarray(top_k if do_sample and top_k is not None else 0, jnp.int32),
        eos_token_id=jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32),
        pad_token_id=jnp.asarray(pad_token_id, jnp.int32),
    )
    return _generate(
        params,
        input_ids.astype(jnp.int32),
        attention_mask.astype(jnp.int32),
        peft,
        rng,
        sampling,
        config=config,
        peft_config=peft_config,
        max_new_tokens=int(max_new_tokens),
    )


_merge = jax.jit(peft_lib.merge, static_argnums=(2, 3))


def left_pad(input_ids: jax.Array, attention_mask: jax.Array):
    """Move each row's pads to the front, keeping the real tokens in order (stable sort on the mask)."""
    order = jnp.argsort(attention_mask, axis=1, stable=True)
    return jnp.take_along_axis(input_ids, order, axis=1), jnp.take_along_axis(attention_mask, order, axis=1)


def _pick(logits, key, sampling: Sampling):
    """Next token per row from (B, V) float32 logits. Branches are `lax.cond`s on traced options,
    so greedy decoding never pays for sampling and only top-k sampling pays for the sort."""

    def top_k_filter(logits):
        kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), logits.shape[-1] - sampling.top_k, axis=-1)
        return jnp.where(logits < kth, -jnp.inf, logits)

    def sample(logits):
        logits = logits / sampling.temperature
        logits = jax.lax.cond(sampling.top_k > 0, top_k_filter, lambda x: x, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(sampling.do_sample, sample, greedy, logits)


@partial(jax.jit, static_argnames=("config", "peft_config", "max_new_tokens"))
def _generate(
    params, input_ids, attention_mask, peft, rng, sampling: Sampling, *, config, peft_config, max_new_tokens
) -> Generation:
    kind = None if peft_config is None else peft_config.kind
    prompt = peft["prompt"] if kind == "prompt" else None
    peft_blocks = peft.get("blocks") if peft is not None else None

    ids, mask = left_pad(input_ids, attention_mask)
    B, T = ids.shape
    N = max_new_tokens
    n_soft = 0 if prompt is None else prompt.shape[0]
    S = n_soft + T + N  # cache slots: [soft prompt | left-padded prompt | new tokens]
    cache_mask = jnp.concatenate([jnp.ones((B, n_soft), jnp.int32), mask, jnp.ones((B, N), jnp.int32)], axis=1)
    dtype = jnp.dtype(config.dtype)
    shape = (config.n_layer, B, S, config.n_head, config.head_dim)
    cache = gpt2.KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def forward(h, cache, slot):
        """Blocks over h (B, t, d) sitting at cache slots slot..slot+t-1; logits of the last one."""
        bias = gpt2.attention_bias(cache_mask, h.shape[1], S, q_offset=slot)
        ctx = gpt2.Ctx(config, peft_config, bias, False)
        h, cache = gpt2.run_blocks(params["blocks"], h, ctx, peft_blocks, None, cache=cache, index=slot)
        return gpt2.head(params, h[:, -1], config), cache

    # Prefill: positions count real tokens only (soft tokens take 0..n_soft-1).
    positions = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(n_soft), (B, n_soft)), n_soft + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)],
        axis=1,
    )
    logits, cache = forward(gpt2.embed(params, ids, config, prompt, positions), cache, 0)
    next_position = n_soft + mask.sum(axis=1)  # (B,): position of the first new token

    def stopped(token):
        return token == sampling.eos_token_id

    first = _pick(logits, jax.random.fold_in(rng, 0), sampling)
    tokens = jnp.full((B, N), sampling.pad_token_id, jnp.int32).at[:, 0].set(first)

    # Decode: step i feeds token i-1 (at slot n_soft + T + i - 1) and picks token i.
    def cond(state):
        step, _, _, done = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, done = state
        previous = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=True)  # (B, 1)
        h = gpt2.embed(params, previous, config, positions=(next_position + step - 1)[:, None])
        logits, cache = forward(h, cache, n_soft + T + step - 1)
        token = jnp.where(done, sampling.pad_token_id, _pick(logits, jax.random.fold_in(rng, step), sampling))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token[:, None], step, axis=1)
        return step + 1, tokens, cache, done | stopped(token)

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, stopped(first)))

    # A new token is real while no eos came strictly before it.
    eos_before = jnp.cumsum(stopped(tokens), axis=1) - stopped(tokens)
    new_mask = (eos_before == 0).astype(jnp.int32)
    return Generation(
        sequences=jnp.concatenate([ids, tokens], axis=1),
        attention_mask=jnp.concatenate([mask, new_mask], axis=1),
        new_tokens=tokens,
    )


__all__ = ["generate", "Generation", "Sampling", "left_pad"]
