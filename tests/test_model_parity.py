"""Our GPT-2 forward against transformers' PyTorch GPT2LMHeadModel on the same weights."""

import functools

import jax
import numpy as np
import pytest
from hf_reference import CONFIGS, batch, hf_logits, random_hf_model

from fedpeat_jax.model import gpt2, hf


@functools.partial(jax.jit, static_argnames="config")
def logits_of(params, ids, mask, config):
    return gpt2.apply(params, ids, mask, config=config)


def real(logits, mask):
    """Logits at real (unpadded) positions only: what a padded row computes at pads is undefined."""
    return logits[mask.astype(bool)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_float32(name):
    shape = CONFIGS[name]
    model = random_hf_model(shape, seed=1)
    params, cfg = hf.from_torch_model(model)
    # Full-length rows (every position embedding used): row 0 unpadded, rows 1-2 right-padded.
    ids, mask = batch(shape["vocab_size"], shape["n_positions"])
    ref = hf_logits(model, ids, mask)
    ours = np.asarray(logits_of(params, ids, mask, cfg))
    assert ours.shape == ref.shape == ids.shape + (shape["vocab_size"],)
    assert np.abs(ref).max() > 1.0  # the perturbed weights give logits far from zero
    np.testing.assert_allclose(real(ours, mask), real(ref, mask), atol=1e-4, rtol=0)


def test_sdpa_attention_reference_agrees():
    """transformers' default (SDPA) attention path gives the same logits as the eager one we match."""
    shape = CONFIGS["pow2"]
    model = random_hf_model(shape, seed=4, attn_implementation="sdpa")
    params, cfg = hf.from_torch_model(model)
    ids, mask = batch(shape["vocab_size"], shape["n_positions"])
    ours = np.asarray(logits_of(params, ids, mask, cfg))
    np.testing.assert_allclose(real(ours, mask), real(hf_logits(model, ids, mask), mask), atol=1e-4, rtol=0)


def test_bfloat16_compute_close_to_float32_reference():
    shape = CONFIGS["odd_heads"]
    model = random_hf_model(shape, seed=5)
    params, cfg = hf.from_torch_model(model, dtype="bfloat16")
    ids, mask = batch(shape["vocab_size"], shape["n_positions"])
    ref = real(hf_logits(model, ids, mask), mask)
    ours = real(np.asarray(logits_of(params, ids, mask, cfg)), mask)
    assert ours.dtype == np.float32  # logits come back in float32 whatever the compute dtype
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 3e-2, f"bfloat16 relative error {err:.3g}"
    assert err > 1e-5, "bfloat16 compute should not be bit-identical to float32 (is dtype ignored?)"
    # Greedy choices agree almost everywhere.
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
