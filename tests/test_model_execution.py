"""Execution options of the model against transformers: the dot_product attention path, gradient
checkpointing (remat), the loss from hidden states, and a frozen base held in bfloat16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import CONFIGS, batch, hf_logits, random_hf_model

from fedpeat_jax import peft
from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.model import gpt2, hf

SHAPE = CONFIGS["odd_heads"]


@functools.partial(jax.jit, static_argnames="config")
def logits_of(params, ids, mask, config):
    return gpt2.apply(params, ids, mask, config=config)


@functools.partial(jax.jit, static_argnames=("config", "peft_config"))
def loss_and_grad(params, ids, mask, config, peft_state=None, peft_config=None, rng=None):
    """Gradient of the mean next-token loss with respect to the whole model (or the PEFT state)."""
    if peft_state is None:
        return jax.value_and_grad(lambda p: gpt2.loss(p, ids, mask, config=config, rng=rng))(params)
    return jax.value_and_grad(
        lambda s: gpt2.loss(params, ids, mask, config=config, peft=s, peft_config=peft_config, rng=rng)
    )(peft_state)


def torch_loss_and_grad(model, ids):
    """transformers' mean next-token loss and its gradient, as our params tree."""
    model.zero_grad()
    out = model(torch.as_tensor(ids), labels=torch.as_tensor(ids))
    out.loss.backward()
    grads = {name: p.grad.detach().numpy() for name, p in model.named_parameters()}  # lm_head is wte (tied)
    return out.loss.item(), hf.params_from_state_dict(grads, hf.config_from_hf(model.config))


def assert_trees_close(ours, ref, atol):
    for path, x in jax.tree_util.tree_flatten_with_path(ours)[0]:
        y = ref
        for key in path:
            y = y[key.key]
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("name", ["odd_heads", "one_head_one_block"])
def test_dot_product_attention_matches_transformers(name):
    shape = CONFIGS[name]
    model = random_hf_model(shape, seed=2)
    params, cfg = hf.from_torch_model(model)
    cfg = cfg.replace(attention="dot_product")
    ids, mask = batch(shape["vocab_size"], shape["n_positions"])
    real = mask.astype(bool)
    # With a padding mask (an additive bias) and without one (the causal kernel path).
    ours = np.asarray(logits_of(params, ids, mask, cfg))
    np.testing.assert_allclose(ours[real], hf_logits(model, ids, mask)[real], atol=1e-4, rtol=0)
    ours = np.asarray(logits_of(params, ids, None, cfg))
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("remat, attention", [(False, "einsum"), (True, "einsum"), (True, "dot_product")])
def test_loss_and_gradients_match_transformers(remat, attention):
    model = random_hf_model(SHAPE, seed=3)
    params, cfg = hf.from_torch_model(model)
    cfg = cfg.replace(remat=remat, attention=attention)
    ids, _ = batch(SHAPE["vocab_size"], SHAPE["n_positions"], seed=1)
    ref_loss, ref_grads = torch_loss_and_grad(model, ids)  # eval mode: no dropout, as ours without rng
    loss, grads = loss_and_grad(params, ids, None, cfg)
    assert np.isclose(float(loss), ref_loss, atol=1e-5, rtol=0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2  # gradients far from zero
    assert_trees_close(grads, ref_grads, atol=1e-4)


def test_remat_with_dropout_gives_the_same_gradients():
    """Recomputed blocks redraw exactly the dropout masks of the forward pass."""
    model = random_hf_model(SHAPE, seed=3)
    params, cfg = hf.from_torch_model(model)  # dropout 0.1 everywhere
    pc = PeftConfig(kind="lora", lora_rank=4, lora_dropout=0.1)
    state = jax.tree.map(lambda x: x + 0.05, peft.init(jax.random.key(0), params, cfg, pc))
    ids, mask = batch(SHAPE["vocab_size"], SHAPE["n_positions"], seed=2)
    rng = jax.random.key(7)
    plain = loss_and_grad(params, ids, mask, cfg, state, pc, rng)
    remat = loss_and_grad(params, ids, mask, cfg.replace(remat=True), state, pc, rng)
    other_key = loss_and_grad(params, ids, mask, cfg, state, pc, jax.random.key(8))
    assert not np.isclose(float(plain[0]), float(other_key[0]))  # dropout is on
    np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_remat_lowers_compiled_activation_memory():
    cfg = GPT2Config(
        vocab_size=64, n_positions=64, n_embd=32, n_layer=4, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
    )
    params = jax.eval_shape(lambda: gpt2.init(jax.random.key(0), cfg))
    ids = jax.ShapeDtypeStruct((8, 64), jnp.int32)  # activations dominate: 4 blocks' attention

    def temp_bytes(config):
        fn = jax.jit(jax.grad(lambda p, x: gpt2.loss(p, x, config=config)))
        return fn.lower(params, ids).compile().memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes(cfg), temp_bytes(cfg.replace(remat=True))
    assert remat < 0.75 * plain, (remat, plain)


def test_head_nll_equals_token_nll_of_logits():
    model = random_hf_model(SHAPE, seed=4)
    params, cfg = hf.from_torch_model(model)
    ids, mask = batch(SHAPE["vocab_size"], SHAPE["n_positions"], seed=3)
    h = gpt2.hidden_states(params, ids, config=cfg)
    total, count = gpt2.head_nll(params, h, ids, mask, config=cfg)
    ref_total, ref_count = gpt2.token_nll(gpt2.head(params, h, cfg), ids, mask)
    assert float(count) == float(ref_count) == mask[:, 1:].sum()
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)


def test_bfloat16_frozen_base_trains_a_float32_lora():
    """The frozen weights held in bfloat16, computed in float32: logits within bfloat16 rounding of
    transformers', and LoRA gradients within it of the float32 base's."""
    model = random_hf_model(SHAPE, seed=5)
    params, cfg = hf.from_torch_model(model, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids, mask = batch(SHAPE["vocab_size"], SHAPE["n_positions"])
    real = mask.astype(bool)
    ref = hf_logits(model, ids, mask)[real]
    ours = np.asarray(logits_of(base16, ids, mask, cfg))[real]
    assert ours.dtype == np.float32
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert 1e-5 < err < 3e-2, f"relative error {err:.3g}"  # rounded weights, not ignored ones

    pc = PeftConfig(kind="lora", lora_rank=4)
    state = jax.tree.map(lambda x: x + 0.05, peft.init(jax.random.key(0), params, cfg, pc))
    loss16, grad16 = loss_and_grad(base16, ids, mask, cfg, state, pc)
    loss32, grad32 = loss_and_grad(params, ids, mask, cfg, state, pc)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad16))
    assert abs(float(loss16) - float(loss32)) < 2e-2 * float(loss32)
    for a, b in zip(jax.tree.leaves(grad16), jax.tree.leaves(grad32)):
        assert float(jnp.abs(a - b).max()) <= 5e-2 * float(jnp.abs(b).max()) + 1e-6


@pytest.mark.parametrize("change, field", [({"attention": "flash"}, "attention"), ({"remat": "yes"}, "remat")])
def test_bad_execution_options(change, field):
    with pytest.raises(ValueError, match=f"GPT2Config.{field}"):
        GPT2Config(**change)


def test_bfloat16_matmul_rounds_operands_but_accumulates_in_float32():
    """gpt2.matmul in bfloat16: bfloat16 operands, float32 products and sums, in both passes."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.standard_normal((64, 96)), jnp.float32)
    w = jnp.asarray(rs.standard_normal((96, 48)), jnp.float32)
    g = jnp.asarray(rs.standard_normal((64, 48)), jnp.float32)

    def grads(x, w):
        y, vjp = jax.vjp(gpt2.matmul, x, w)
        return (y, *vjp(g.astype(y.dtype)))

    y16, dx16, dw16 = jax.jit(grads)(x.astype(jnp.bfloat16), w)
    assert y16.dtype == jnp.float32 and dx16.dtype == jnp.bfloat16
    # Exactly what float32 math gives on the bfloat16-rounded operands (up to summation order) ...
    r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
    np.testing.assert_allclose(np.asarray(y16), r(x) @ r(w), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx16, np.float64), r(r(g) @ r(w).T), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw16, np.float64), r(r(x).T @ r(g)), rtol=1e-2, atol=1e-2)
    # ... and within bfloat16 rounding of the float32 products.
    y32, dx32, dw32 = jax.jit(grads)(x, w)
    for a, b in ((y16, y32), (dx16, dx32), (dw16, dw32)):
        b = np.asarray(b)
        assert np.abs(np.asarray(a, np.float32) - b).max() < 2e-2 * np.abs(b).max()


@pytest.mark.parametrize(
    "in_axes", [(0, None), (0, 0), (None, 0)], ids=["shared-weight", "per-example-weight", "shared-input"]
)
def test_bfloat16_matmul_under_vmap(in_axes):
    """Vmapped clients on a shared weight fold into one 2-D product; per-example weights (which
    XLA's CPU runtime cannot multiply bfloat16 -> float32 batched) still run, in float32."""
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.standard_normal((3, 5, 8)), jnp.bfloat16)
    w = jnp.asarray(rs.standard_normal((3, 8, 4)), jnp.float32)
    args = tuple(a if axis == 0 else a[0] for a, axis in zip((x, w), in_axes))

    def grads(matmul):
        f = lambda x, w: jnp.sum(matmul(x, w) ** 2)  # noqa: E731
        return jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=in_axes))(*args)

    ours = grads(gpt2.matmul)
    ref = grads(lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.bfloat16).astype(jnp.float32))
    for a, b in zip(ours, ref):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
