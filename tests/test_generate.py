"""Generation with a KV cache against transformers' `generate` and against teacher forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import CONFIGS, random_hf_model

from fedpeat_jax import peft
from fedpeat_jax.config import PeftConfig
from fedpeat_jax.model import generate as gen
from fedpeat_jax.model import gpt2, hf

SHAPE = CONFIGS["odd_heads"]
T, N = 9, 12  # prompt length, new tokens; every test uses 3 prompts, so most calls share one compile


@pytest.fixture(scope="module")
def model():
    return random_hf_model(SHAPE, seed=7)


@pytest.fixture(scope="module")
def converted(model):
    return hf.from_torch_model(model)


def left_padded_prompts():
    ids = np.random.RandomState(0).randint(0, SHAPE["vocab_size"], (3, T))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, : T - 1] = 0  # a one-token prompt
    return ids, mask


def to_right_padding(ids, mask):
    order = np.argsort(-mask, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)


def hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False, max_new_tokens=N, **kw
        )
    return out[:, ids.shape[1] :].numpy()


def test_greedy_matches_transformers_generate(model, converted):
    params, cfg = converted
    ids, mask = left_padded_prompts()
    ours = gen.generate(params, ids, mask, config=cfg, max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(ours.new_tokens), hf_generate(model, ids, mask, pad_token_id=0))
    assert len(set(np.asarray(ours.new_tokens).ravel())) > 3  # not a degenerate constant output
    np.testing.assert_array_equal(np.asarray(ours.sequences[:, :T]), ids)
    np.testing.assert_array_equal(np.asarray(ours.attention_mask), np.concatenate([mask, np.ones((3, N))], 1))

    # Right-padded prompts are compacted to the same left-padded batch: same output.
    right = gen.generate(params, *to_right_padding(ids, mask), config=cfg, max_new_tokens=N)
    for a, b in zip(right, ours):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_with_dot_product_attention_and_bfloat16_weights(model, converted):
    """The KV-cache path through jax.nn.dot_product_attention (bias, Tq != Tk) decodes as
    transformers does, and a frozen base held in bfloat16 decodes too."""
    params, cfg = converted
    ids, mask = left_padded_prompts()
    ours = gen.generate(params, ids, mask, config=cfg.replace(attention="dot_product"), max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(ours.new_tokens), hf_generate(model, ids, mask, pad_token_id=0))
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out16 = gen.generate(base16, ids, mask, config=cfg, max_new_tokens=N)
    assert (np.asarray(out16.new_tokens) == np.asarray(ours.new_tokens)).mean() > 0.5  # rounding may flip a few choices


def test_eos_stops_rows_and_pads_after(model, converted):
    params, cfg = converted
    ids, mask = left_padded_prompts()
    greedy = np.asarray(gen.generate(params, ids, mask, config=cfg, max_new_tokens=N).new_tokens)
    eos = int(greedy[0, 3])  # row 0 emits it at step 3 (maybe earlier too)
    ours = gen.generate(params, ids, mask, config=cfg, max_new_tokens=N, eos_token_id=eos, pad_token_id=1)
    ref = hf_generate(model, ids, mask, eos_token_id=eos, pad_token_id=1)
    tokens = np.asarray(ours.new_tokens)
    np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)  # transformers stops once all rows did
    assert (tokens[:, ref.shape[1] :] == 1).all()
    stop = int(np.argmax(greedy[0] == eos))
    assert (tokens[0, stop + 1 :] == 1).all() and tokens[0, stop] == eos
    new_mask = np.asarray(ours.attention_mask)[:, T:]
    assert new_mask[0].tolist() == [1] * (stop + 1) + [0] * (N - stop - 1)
    for row in (1, 2):  # rows that never emit eos stay real throughout
        if eos not in greedy[row]:
            assert new_mask[row].all()


def test_top_k_one_and_cold_sampling_equal_greedy(converted):
    params, cfg = converted
    ids, mask = left_padded_prompts()
    greedy = np.asarray(gen.generate(params, ids, mask, config=cfg, max_new_tokens=N).sequences)
    top1 = gen.generate(
        params, ids, mask, config=cfg, max_new_tokens=N, do_sample=True, top_k=1, temperature=1.7, rng=jax.random.key(3)
    )
    np.testing.assert_array_equal(np.asarray(top1.sequences), greedy)
    cold = gen.generate(
        params, ids, mask, config=cfg, max_new_tokens=N, do_sample=True, temperature=1e-4, rng=jax.random.key(4)
    )
    np.testing.assert_array_equal(np.asarray(cold.sequences), greedy)


forward = jax.jit(gpt2.apply, static_argnames=("config", "peft_config"))


def teacher_forced_logits(params, cfg, sequences, **peft_kw):
    """Logits for the new tokens from the plain (uncached) forward over the whole sequence."""
    logits = np.asarray(forward(params, sequences, config=cfg, **peft_kw))
    return logits[:, T - 1 : -1]


def test_top_k_sampling_draws_only_top_k_tokens(converted):
    params, cfg = converted
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, T))
    draws = [
        gen.generate(params, ids, config=cfg, max_new_tokens=N, do_sample=True, top_k=3, rng=jax.random.key(s))
        for s in (0, 0, 1)
    ]
    np.testing.assert_array_equal(np.asarray(draws[0].sequences), np.asarray(draws[1].sequences))  # same key
    assert (np.asarray(draws[0].new_tokens) != np.asarray(draws[2].new_tokens)).any()  # another key
    seq = np.asarray(draws[2].sequences)
    logits = teacher_forced_logits(params, cfg, seq)
    rank = (logits > np.take_along_axis(logits, seq[:, T:, None], -1)).sum(-1)
    assert rank.max() <= 2 and rank.max() > 0  # within the top 3, and not always the argmax


@pytest.mark.parametrize("kind", ["lora", "adapter", "prompt"])
def test_greedy_with_peft_follows_the_peft_model(converted, kind):
    """Merged (LoRA) and run-with-PEFT (adapter, soft prompt) decoding pick the argmax of the PEFT
    model's own uncached forward at every step."""
    params, cfg = converted
    pc = PeftConfig(kind=kind, layers=(1, 2), lora_rank=2, adapter_size=3, n_prompt_tokens=4)
    state = peft.init(jax.random.key(5), params, cfg, pc)
    rs = np.random.RandomState(6)
    state = jax.tree.map(lambda x: jnp.asarray(x + 0.3 * rs.standard_normal(x.shape), jnp.float32), state)
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (3, T))
    out = gen.generate(params, ids, config=cfg, max_new_tokens=N, peft=state, peft_config=pc)
    seq = np.asarray(out.sequences)
    np.testing.assert_array_equal(seq[:, :T], ids)
    logits = teacher_forced_logits(params, cfg, seq, peft=state, peft_config=pc)
    np.testing.assert_array_equal(logits.argmax(-1), seq[:, T:])
    plain = np.asarray(gen.generate(params, ids, config=cfg, max_new_tokens=N).new_tokens)
    assert (plain != seq[:, T:]).any()  # the PEFT state really changed what is generated


def test_bad_generation_requests(converted):
    params, cfg = converted
    ids = np.zeros((2, 30), np.int32)
    with pytest.raises(ValueError, match=r"prompt length 30 \+ max_new_tokens 8 = 38 exceeds .*n_positions \(37\)"):
        gen.generate(params, ids, config=cfg, max_new_tokens=8)
    pc = PeftConfig(kind="prompt", n_prompt_tokens=4)
    state = peft.init(jax.random.key(0), params, cfg, pc)
    with pytest.raises(ValueError, match=r"\+ 4 soft prompt tokens \+ max_new_tokens 7 = 41 exceeds"):
        gen.generate(params, ids, config=cfg, max_new_tokens=7, peft=state, peft_config=pc)
    mask = np.ones((2, 30), np.int32)
    mask[1] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        gen.generate(params, ids, mask, config=cfg, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs an rng"):
        gen.generate(params, ids, config=cfg, max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="top_k"):
        gen.generate(params, ids, config=cfg, max_new_tokens=2, do_sample=True, top_k=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(params, ids, config=cfg, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_id 203 is outside"):
        gen.generate(params, ids, config=cfg, max_new_tokens=2, eos_token_id=203)
