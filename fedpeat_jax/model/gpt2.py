"""GPT-2 as pure functions of a parameter pytree, with the blocks stacked on a leading layer axis.

Params layout (every leaf under "blocks" has a leading axis of size n_layer)::

    {"wte": (V, d), "wpe": (P, d),
     "blocks": {"ln_1": {"scale", "bias"},
                "attn": {"c_attn": {"kernel": (d, 3d), "bias"}, "c_proj": {"kernel": (d, d), "bias"}},
                "ln_2": {"scale", "bias"},
                "mlp": {"c_fc": {"kernel": (d, m), "bias"}, "c_proj": {"kernel": (m, d), "bias"}}},
     "ln_f": {"scale", "bias"}}

Kernels are (in, out) and compute `x @ kernel + bias`, the layout of Hugging Face's `Conv1D`, so
weights move between the two without transposes. Because the blocks are one stacked tree, an
emulator, an adapter or the full model is an index operation on it (`select_blocks`), and the
forward runs any stack with `lax.scan` (unrolled for short runs of blocks, `UNROLL_BLOCKS`), so
compile time does not grow with depth.

PEFT enters in two ways. Selective kinds ("bitfit", "full") overwrite leaves of the blocks they
live in before the scan; additive kinds ("lora", "adapter") are passed into the scanned block
function; "prompt" prepends soft tokens at the embedding. The stack is cut into contiguous
segments with and without PEFT (`peft_segments`), one scan per segment.

Execution options of `GPT2Config` change how the model runs, not what it computes:
`attention="dot_product"` calls `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU),
`remat=True` recomputes each block in the backward pass (`jax.checkpoint` in the layer scan:
activation memory of one block instead of all). With `dtype="bfloat16"` every dense layer and the
LM head multiply bfloat16 operands into float32 (`matmul`, forward and backward: the native
kernel of CPUs with AVX512-BF16). The frozen weights may be held in bfloat16; they are cast to the
compute dtype where used. Training losses come from the hidden states (`loss`, `head_nll`), which
never build full-vocabulary one-hots.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import LORA_TARGETS, GPT2Config, PeftConfig
from fedpeat_jax.tree import overwrite

Params = Any


# --------------------------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------------------------
def init(rng: jax.Array, config: GPT2Config) -> Params:
    """Random GPT-2 parameters initialized as transformers does (normal(0.02), scaled residual
    projections, zero biases, unit LayerNorm scales)."""
    config.validate()
    d, m, n, std = config.n_embd, config.d_mlp, config.n_layer, config.initializer_range
    proj_std = std / math.sqrt(2 * n)  # GPT-2 scales the residual projections by 1/sqrt(2 n_layer)
    keys = iter(jax.random.split(rng, 6))

    def normal(key, shape, s):
        return s * jax.random.normal(key, shape, jnp.float32)

    def layer_norm(*lead):
        return {"scale": jnp.ones(lead + (d,), jnp.float32), "bias": jnp.zeros(lead + (d,), jnp.float32)}

    def dense(key, d_in, d_out, s):
        return {"kernel": normal(key, (n, d_in, d_out), s), "bias": jnp.zeros((n, d_out), jnp.float32)}

    return {
        "wte": normal(next(keys), (config.vocab_size, d), std),
        "wpe": normal(next(keys), (config.n_positions, d), 0.01),
        "blocks": {
            "ln_1": layer_norm(n),
            "attn": {"c_attn": dense(next(keys), d, 3 * d, std), "c_proj": dense(next(keys), d, d, proj_std)},
            "ln_2": layer_norm(n),
            "mlp": {"c_fc": dense(next(keys), d, m, std), "c_proj": dense(next(keys), m, d, proj_std)},
        },
        "ln_f": layer_norm(),
    }


def check_params(params: Params, config: GPT2Config) -> None:
    """Raise a ValueError naming the first leaf whose shape does not match `config`."""
    expected = jax.eval_shape(lambda: init(jax.random.key(0), config))
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if set(jax.tree_util.keystr(p) for p, _ in got) != set(jax.tree_util.keystr(p) for p in want):
        missing = sorted(set(jax.tree_util.keystr(p) for p in want) - set(jax.tree_util.keystr(p) for p, _ in got))
        extra = sorted(set(jax.tree_util.keystr(p) for p, _ in got) - set(jax.tree_util.keystr(p) for p in want))
        raise ValueError(f"GPT-2 parameters do not match the config: missing {missing}, unexpected {extra}")
    for path, leaf in got:
        shape = want[path].shape
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(
                f"GPT-2 parameter {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}, "
                f"but the config (n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
                f"n_positions={config.n_positions}) needs {tuple(shape)}"
            )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


@jax.custom_batching.custom_vmap
def _mixed_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """(n, k) @ (k, o), bfloat16 operands, float32 accumulation and result."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


@_mixed_dot.def_vmap
def _mixed_dot_vmap(axis_size, in_batched, x, w):
    # XLA's CPU runtime multiplies bfloat16 into float32 only in plain 2-D products (YNNPACK);
    # a batched one fails to run. With a shared weight the batch joins the rows (one 2-D product:
    # vmapped clients on a frozen base, the hot path); per-example weights multiply in float32.
    x_batched, w_batched = in_batched
    if not w_batched:
        return jnp.matmul(x, w, preferred_element_type=jnp.float32), True
    x = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
    return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32)), True


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _mixed_dot(x, w)


def _bf16_matmul_fwd(x, w):
    return _mixed_dot(x, w), (x, w)


def _bf16_matmul_bwd(res, g):
    # The cotangent rounded to bfloat16 so that the backward products stay bfloat16 x bfloat16
    # too: autodiff would multiply the float32 cotangent by an upcast weight, at float32 speed.
    x, w = res
    g = g.astype(x.dtype)
    dx = _mixed_dot(g, w.T).astype(x.dtype)
    dw = _mixed_dot(x.T, g).astype(w.dtype)  # dead code for a frozen w
    return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(N, k) @ (k, n) in float32, or for bfloat16 compute with bfloat16 operands, float32
    accumulation and a float32 result in the forward and backward passes (the native kernel on
    CPUs with AVX512-BF16; callers cast the result). Reverse-mode differentiable (custom VJP)."""
    if x.dtype == jnp.float32:
        return x @ w.astype(jnp.float32)
    return _bf16_matmul(x, w.astype(x.dtype))


def dense(p: Params, x: jax.Array, lora: Optional[Params] = None, lora_ctx=None) -> jax.Array:
    # Tokens flattened to one matrix axis: XLA's CPU backend runs (B*T, d) @ (d, o) and, above
    # all, the LoRA factors' gradients (contractions over B and T) far faster in 2-D.
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    y = (matmul(x, p["kernel"]) + p["bias"].astype(jnp.float32)).astype(x.dtype)
    if lora is not None:
        y = y + peft_lib.lora.delta(lora, x, *lora_ctx)
    return y.reshape(shape[:-1] + y.shape[-1:])


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class KVCache(NamedTuple):
    """Keys and values of every block for incremental decoding: (n_layer, B, S_max, H, hd)."""

    k: jax.Array
    v: jax.Array


class Ctx(NamedTuple):
    """Per-call, non-parameter inputs of a block (kept together so `scan` carries them once)."""

    config: GPT2Config
    peft_config: Optional[PeftConfig]
    bias: Optional[jax.Array]  # additive attention bias (B, 1, Tq, Tk); None: plain causal, Tq == Tk
    train: bool


def _split_rng(rng, n):
    return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def attention(q, k, v, bias: Optional[jax.Array], cfg: GPT2Config, rng=None) -> jax.Array:
    """softmax(q k^T / sqrt(hd) + bias) v over (B, T, H, hd) inputs, the softmax in float32.

    `bias` None means plain causal attention (Tq == Tk), which lets the fused path use its causal
    kernels instead of reading a bias. `cfg.attention == "dot_product"` runs
    `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU when it applies, XLA elsewhere);
    it has no attention dropout, so a train step with dropout (`rng` given) takes the einsum path.
    """
    drop = rng is not None and cfg.attn_pdrop > 0
    if cfg.attention == "dot_product" and not drop:
        return jax.nn.dot_product_attention(
            q, k, v, bias=None if bias is None else bias.astype(q.dtype), is_causal=bias is None
        )
    if bias is None:
        bias = attention_bias(None, q.shape[1], k.shape[1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(scores / math.sqrt(cfg.head_dim) + bias, axis=-1)
    probs = dropout(probs, cfg.attn_pdrop, rng).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def block(p: Params, h: jax.Array, ctx: Ctx, peft_p: Optional[Params], rng, kv=None, index=None):
    """One pre-LN transformer block. `kv` = (k, v) cache for this block, written at `index`."""
    cfg = ctx.config
    r_attn, r_resid1, r_resid2, r_lora = _split_rng(rng if ctx.train else None, 4)
    lora = peft_p.get("lora") if peft_p else None
    adapter = peft_p.get("adapter") if peft_p else None

    def maybe_lora(group, name):
        if lora is None or name not in lora.get(group, {}):
            return None, None
        key = None if r_lora is None else jax.random.fold_in(r_lora, LORA_TARGETS.index(f"{group}.{name}"))
        return lora[group][name], (ctx.peft_config, key)  # each target its own dropout mask

    # Attention.
    x = layer_norm(p["ln_1"], h, cfg.layer_norm_epsilon)
    qkv = dense(p["attn"]["c_attn"], x, *maybe_lora("attn", "c_attn"))
    B, T, _ = qkv.shape
    q, k, v = jnp.split(qkv.reshape(B, T, 3, cfg.n_head, cfg.head_dim), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, T, H, hd)
    if kv is not None:
        k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
        kv = (k, v)
    a = attention(q, k.astype(q.dtype), v.astype(q.dtype), ctx.bias, cfg, r_attn).reshape(B, T, cfg.n_embd)
    a = dense(p["attn"]["c_proj"], a, *maybe_lora("attn", "c_proj"))
    if adapter is not None:
        a = peft_lib.adapters.apply(adapter["attn"], a)
    h = h + dropout(a, cfg.resid_pdrop, r_resid1)

    # MLP.
    x = layer_norm(p["ln_2"], h, cfg.layer_norm_epsilon)
    x = jax.nn.gelu(dense(p["mlp"]["c_fc"], x, *maybe_lora("mlp", "c_fc")), approximate=True)
    x = dense(p["mlp"]["c_proj"], x, *maybe_lora("mlp", "c_proj"))
    if adapter is not None:
        x = peft_lib.adapters.apply(adapter["mlp"], x)
    h = h + dropout(x, cfg.resid_pdrop, r_resid2)
    return h, kv


# --------------------------------------------------------------------------------------------
# Stacks of blocks
# --------------------------------------------------------------------------------------------
def peft_segments(n_layer: int, peft_config: Optional[PeftConfig]):
    """Cut blocks 0..n_layer-1 into maximal runs that do or do not carry PEFT.

    Returns a tuple of (start, stop, peft_start) with peft_start the row of the PEFT stack that
    block `start` uses, or None for a run without PEFT. All static: segments are Python ints.
    """
    if peft_config is None or peft_config.kind in ("none", "prompt"):
        return ((0, n_layer, None),)
    ids = peft_config.block_ids(n_layer)
    bad = [i for i in ids if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"PEFT layers {bad} out of range for a stack of {n_layer} blocks")
    row_of = {b: i for i, b in enumerate(ids)}
    segments, start = [], 0
    for i in range(1, n_layer + 1):
        if i == n_layer or (i in row_of) != (start in row_of) or (i in row_of and row_of[i] != row_of[i - 1] + 1):
            segments.append((start, i, row_of.get(start)))
            start = i
    return tuple(segments)


# Segments of at most this many blocks are unrolled: a rolled scan stacks every block's saved
# activations into (n, ...) buffers with dynamic-update-slices and reads them back in the
# backward pass, which cost a third of a vectorized tiny-model round on CPU (measured: round
# 1.48 -> 0.99 s at 64 clients). Longer segments stay rolled so compile time stays flat in depth.
UNROLL_BLOCKS = 8


def run_blocks(
    blocks: Params,
    h: jax.Array,
    ctx: Ctx,
    peft_blocks: Optional[Params] = None,
    rng: Optional[jax.Array] = None,
    cache: Optional[KVCache] = None,
    index=None,
):
    """Run a stack of blocks over hidden states `h` with `lax.scan`, one scan per PEFT segment.

    `peft_blocks` is the per-block part of a PEFT state (leading axis over the PEFT's blocks,
    listed by `ctx.peft_config.layers` as indices into *this* stack). Returns (h, cache).
    """
    n = blocks["ln_1"]["scale"].shape[0]
    kind = None if ctx.peft_config is None else ctx.peft_config.kind
    rngs = None if rng is None else jax.random.split(rng, n)
    new_k, new_v = [], []
    for start, stop, row in peft_segments(n, ctx.peft_config if peft_blocks is not None else None):
        seg = jax.tree.map(lambda x: x[start:stop], blocks)
        seg_peft = None
        if row is not None:
            seg_peft = jax.tree.map(lambda x: x[row : row + stop - start], peft_blocks)
            if kind in ("bitfit", "full"):  # selective: trained leaves replace the frozen ones
                seg = overwrite(seg, seg_peft)
                seg_peft = None
        xs = {
            "p": seg,
            "peft": seg_peft,
            "rng": None if rngs is None else rngs[start:stop],
            "kv": None if cache is None else (cache.k[start:stop], cache.v[start:stop]),
        }

        def step(h, x):
            h, kv = block(x["p"], h, ctx, x["peft"], x["rng"], x["kv"], index)
            return h, kv

        unroll = (stop - start) <= UNROLL_BLOCKS
        if ctx.config.remat:
            # Keep only each block's input for the backward pass and recompute the rest. Rolled:
            # unrolled, XLA schedules the recomputation early and the memory is not saved.
            step, unroll = jax.checkpoint(step), False
        h, kv = jax.lax.scan(step, h, xs, unroll=unroll)
        if cache is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
    new_cache = None if cache is None else KVCache(jnp.concatenate(new_k), jnp.concatenate(new_v))
    return h, new_cache


# --------------------------------------------------------------------------------------------
# Embedding, head, full forward
# --------------------------------------------------------------------------------------------
def attention_bias(attention_mask: Optional[jax.Array], q_len: int, k_len: int, q_offset=0) -> jax.Array:
    """Additive bias (B or 1, 1, q_len, k_len): causal, plus padding of the keys.

    Query i sits at absolute position q_offset + i; key j at position j.
    """
    q_pos = q_offset + jnp.arange(q_len)[:, None]
    allowed = jnp.arange(k_len)[None, :] <= q_pos
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :k_len] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def embed(params: Params, input_ids: jax.Array, config: GPT2Config, prompt=None, positions=None, rng=None):
    """Token + position embeddings (with soft prompt tokens prepended when `prompt` is given)."""
    dtype = jnp.dtype(config.dtype)
    # Summed in float32 whatever the weights' dtype (a frozen base may be held in bfloat16).
    h = jnp.take(params["wte"], input_ids, axis=0).astype(jnp.float32)
    if prompt is not None:
        h = peft_lib.prompt.prepend(prompt, h)
    if positions is None:
        positions = jnp.arange(h.shape[1])
    h = h + jnp.take(params["wpe"], positions, axis=0).astype(jnp.float32)
    return dropout(h.astype(dtype), config.embd_pdrop, rng)


def head(params: Params, h: jax.Array, config: GPT2Config) -> jax.Array:
    """Final LayerNorm and the LM head tied to wte; logits in float32."""
    h = layer_norm(params["ln_f"], h, config.layer_norm_epsilon)
    return matmul(h.reshape(-1, h.shape[-1]), params["wte"].T).reshape(h.shape[:-1] + (-1,))


def check_inputs(
    input_ids, config: GPT2Config, peft_config: Optional[PeftConfig] = None, n_layer: Optional[int] = None
) -> None:
    """Checks that must fail before anything runs or compiles (sequence longer than n_positions,
    PEFT blocks outside the stack...)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if peft_config is not None and n_layer is not None:
        peft_segments(n_layer, peft_config)  # raises on PEFT layers outside the stack
    extra = peft_config.n_prompt_tokens if peft_config is not None and peft_config.kind == "prompt" else 0
    if input_ids.shape[1] + extra > config.n_positions:
        raise ValueError(
            f"sequence length {input_ids.shape[1]}"
            + (f" + {extra} prompt tokens" if extra else "")
            + f" exceeds the model's n_positions ({config.n_positions})"
        )


def hidden_states(
    params: Params,
    input_ids: jax.Array,
    attention_mask: Optional[jax.Array] = None,
    *,
    config: GPT2Config,
    peft: Optional[Params] = None,
    peft_config: Optional[PeftConfig] = None,
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Hidden states before ln_f, (B, T, d). `rng` given means train mode (dropout on)."""
    check_inputs(input_ids, config, peft_config, params["blocks"]["ln_1"]["scale"].shape[0])
    if peft is not None and peft_config is None:
        raise ValueError("a PEFT state was given without its PeftConfig")
    r_embd, r_blocks = _split_rng(rng, 2)
    prompt = peft.get("prompt") if peft is not None and peft_config.kind == "prompt" else None
    h = embed(params, input_ids, config, prompt, rng=r_embd)
    n_prompt = h.shape[1] - input_ids.shape[1]
    if attention_mask is not None and n_prompt:
        attention_mask = jnp.concatenate(
            [jnp.ones((attention_mask.shape[0], n_prompt), attention_mask.dtype), attention_mask], axis=1
        )
    bias = None if attention_mask is None else attention_bias(attention_mask, h.shape[1], h.shape[1])
    ctx = Ctx(config, peft_config, bias, rng is not None)
    peft_blocks = peft.get("blocks") if peft is not None else None
    h, _ = run_blocks(params["blocks"], h, ctx, peft_blocks, r_blocks)
    return h[:, n_prompt:]


def apply(
    params: Params,
    input_ids: jax.Array,
    attention_mask: Optional[jax.Array] = None,
    *,
    config: GPT2Config,
    peft: Optional[Params] = None,
    peft_config: Optional[PeftConfig] = None,
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Logits (B, T, V) in float32. Pass `rng` to train with dropout; omit it to evaluate."""
    h = hidden_states(params, input_ids, attention_mask, config=config, peft=peft, peft_config=peft_config, rng=rng)
    return head(params, h, config)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def token_nll(logits: jax.Array, input_ids: jax.Array, mask: Optional[jax.Array] = None):
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Position t predicts token t+1; a target counts when it is a real token (mask 1). Returning
    (sum, count) lets callers average exactly across batches, clients and devices.
    """
    logits, targets = logits[:, :-1].astype(jnp.float32), input_ids[:, 1:]
    weight = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    # logsumexp minus the target logit, picked by a one-hot contraction: XLA fuses the one-hot,
    # and its gradient is a dense multiply instead of a scatter (faster on CPU).
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return (nll * weight).sum(), weight.sum()


def lm_loss(logits: jax.Array, input_ids: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean next-token cross-entropy over real targets."""
    total, count = token_nll(logits, input_ids, mask)
    return total / jnp.maximum(count, 1.0)


def head_nll(
    params: Params, h: jax.Array, input_ids: jax.Array, mask: Optional[jax.Array] = None, *, config: GPT2Config
):
    """`token_nll(head(params, h), input_ids, mask)` from the hidden states `h` (B, T, d), cheaper.

    The head runs on the T-1 positions that predict a token (not on all T, then sliced), and the
    target logit is the dot product of a position's state with its target's embedding row, so
    nothing of full-vocabulary size is built besides the logits themselves (no one-hot, no slice
    copy of the logits). Same (sum, count).
    """
    h = layer_norm(params["ln_f"], h[:, :-1], config.layer_norm_epsilon)
    targets = input_ids[:, 1:]
    weight = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    logits = matmul(h.reshape(-1, h.shape[-1]), params["wte"].T).reshape(h.shape[:-1] + (-1,))
    rows = jnp.take(params["wte"], targets, axis=0).astype(h.dtype)
    target_logit = jnp.einsum("btd,btd->bt", h, rows, preferred_element_type=jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return (nll * weight).sum(), weight.sum()


def loss(
    params: Params,
    input_ids: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    config: GPT2Config,
    peft: Optional[Params] = None,
    peft_config: Optional[PeftConfig] = None,
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Mean next-token loss of right-padded windows: `mask` (1 on real tokens) weights the targets
    only, since causal attention never lets a real token see a pad that follows it."""
    h = hidden_states(params, input_ids, config=config, peft=peft, peft_config=peft_config, rng=rng)
    total, count = head_nll(params, h, input_ids, mask, config=config)
    return total / jnp.maximum(count, 1.0)


def perplexity(total_nll, count) -> jax.Array:
    return jnp.exp(total_nll / jnp.maximum(count, 1.0))


def evaluate_nll(params, peft_state, tokens, mask, model: GPT2Config, peft: PeftConfig, batch: int):
    """Summed next-token NLL and count over (E, T) windows, scanned in batches (pads masked)."""
    n = tokens.shape[0]
    pad = (-n) % batch
    tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, pad), (0, 0)))
    tokens = tokens.reshape(-1, batch, tokens.shape[-1])
    mask = mask.reshape(-1, batch, mask.shape[-1])

    def body(acc, xs):
        tok, msk = xs
        h = hidden_states(params, tok, config=model, peft=peft_state, peft_config=peft)
        total, count = head_nll(params, h, tok, msk, config=model)
        return (acc[0] + total, acc[1] + count), None

    (total, count), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (tokens, mask))
    return total, count
