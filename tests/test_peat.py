"""Emulators, plug-in, the generic training loop and distillation, on tiny random models."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.io.checkpoint import CheckpointManager
from fedpeat_jax.model import gpt2
from fedpeat_jax.peat import emulator as emu
from fedpeat_jax.peat.distill import DistillConfig, distill, distill_metrics, kd_loss
from fedpeat_jax.peat.train import TrainConfig, drop_blocks, fit, lm_objective, step_memory

# Dropout off: these tests compare exact outputs and deterministic training.
TINY = GPT2Config.preset(
    "tiny", vocab_size=97, n_positions=16, n_embd=32, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)
SPEC = emu.EmulatorSpec(TINY.n_layer, l=2, r=2, k=1)  # 6 blocks: adapter 0,1,4,5; middle 2,3 -> keeps 2


@pytest.fixture(scope="module")
def params():
    return gpt2.init(jax.random.PRNGKey(0), TINY)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (64, 12), 0, TINY.vocab_size)


_apply = jax.jit(gpt2.apply, static_argnames=("config", "peft_config"))


def logits(p, ids, config=TINY, state=None, peft=None):
    return np.asarray(_apply(p, ids, config=config, peft=state, peft_config=peft))


# --- layer-drop -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layer, k, expected",
    [
        (48, 16, (2, 5, 8, 11, 13, 16, 19, 22, 25, 28, 31, 34, 36, 39, 42, 45)),  # GPT2-XL 2-16-2
        (24, 8, (2, 5, 7, 10, 13, 16, 18, 21)),  # OPT-1.3B 2-8-2
        (32, 18, (2, 4, 5, 7, 8, 10, 12, 13, 15, 16, 18, 19, 21, 23, 24, 26, 27, 29)),  # OPT-6.7B 2-18-2
        (30, 12, (2, 4, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27)),  # BLOOM-7.1B 2-12-2
        (12, 4, (2, 4, 7, 9)),  # GPT-2 small 2-4-2
    ],
)
def test_layer_drop_ids_equal_published(n_layer, k, expected):
    spec = emu.EmulatorSpec(n_layer, l=2, r=2, k=k)
    assert spec.middle_ids == expected
    assert emu.layer_drop_ids(n_layer, 2, 2, k) == expected
    assert spec.block_ids == (0, 1) + expected + (n_layer - 2, n_layer - 1)


# --- plug-in and emulator identities ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_plugin_of_untouched_adapter_is_the_full_model(params, tokens, kind):
    emulator = emu.build(params, SPEC)
    pc = PeftConfig(kind=kind, lora_rank=2)
    state = peft_lib.init(jax.random.PRNGKey(2), emulator, SPEC.emulator_config(TINY), SPEC.emulator_peft(pc))
    np.testing.assert_array_equal(logits(params, tokens, TINY, state, SPEC.full_peft(pc)), logits(params, tokens))
    # Plug-in by writing the emulator's (untouched) adapter blocks back: the very same params.
    plugged = emu.plug_in(params, emulator, SPEC)
    jax.tree.map(np.testing.assert_array_equal, plugged, params)


def test_emulator_keeping_every_middle_block_is_the_full_model(params, tokens):
    spec = emu.EmulatorSpec(TINY.n_layer, l=2, r=2, k=TINY.n_layer - 4)
    emulator = emu.build(params, spec)
    jax.tree.map(np.testing.assert_array_equal, emulator, params)
    np.testing.assert_array_equal(logits(emulator, tokens, spec.emulator_config(TINY)), logits(params, tokens))


def test_layerdrop_skips_exactly_the_dropped_blocks(params, tokens):
    middle = (2, 3)
    # rate 0 changes nothing; a block whose gate is 0 is the identity: dropping both middle
    # blocks gives the 2-0-2 emulator, whose stack has no middle at all
    np.testing.assert_array_equal(
        logits(drop_blocks(params, jax.random.key(0), 0.0, middle), tokens), logits(params, tokens)
    )
    spec0 = emu.EmulatorSpec(TINY.n_layer, l=2, r=2, k=0)
    dropped = drop_blocks(params, jax.random.key(0), 1.0 - 1e-7, middle)
    np.testing.assert_allclose(
        logits(dropped, tokens),
        logits(emu.build(params, spec0), tokens, spec0.emulator_config(TINY)),
        rtol=1e-5,
        atol=1e-5,
    )
    # a dropped block gets no gradient; the others do
    loss = lm_objective(TINY, layerdrop=1.0 - 1e-7, layerdrop_blocks=middle)
    grads = jax.grad(loss)(params, None, {"tokens": tokens[:4]}, jax.random.key(3))
    norms = np.asarray(jax.vmap(lambda b: sum(jnp.sum(x**2) for x in jax.tree.leaves(b)))(grads["blocks"]))
    assert (norms[[2, 3]] == 0).all() and (norms[[0, 1, 4, 5]] > 0).all()


def test_layer_drop_emulator_differs_from_the_full_model(params, tokens):
    # The counterpart of the identities above: dropping a middle block must change the output.
    assert not np.allclose(logits(emu.build(params, SPEC), tokens, SPEC.emulator_config(TINY)), logits(params, tokens))


# --- training touches only what it should --------------------------------------------------------


def _changed_rows(before, after):
    """Block rows whose parameters differ, and whether any non-block leaf differs."""
    rows = set()
    for b, a in zip(jax.tree.leaves(before["blocks"]), jax.tree.leaves(after["blocks"])):
        diff = np.asarray(b != a).reshape(b.shape[0], -1).any(axis=1)
        rows |= set(np.flatnonzero(diff).tolist())
    rest = [k for k in before if k != "blocks" and not np.array_equal(before[k], after[k])]
    return rows, rest


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_offsite_training_touches_only_the_adapter_peft(params, tokens, kind):
    emulator = emu.build(params, SPEC)
    emu_cfg = SPEC.emulator_config(TINY)
    pc = PeftConfig(kind=kind, lora_rank=2)
    state = peft_lib.init(jax.random.PRNGKey(3), emulator, emu_cfg, SPEC.emulator_peft(pc))
    frozen_copy = jax.tree.map(np.array, emulator)
    cfg = TrainConfig(steps=6, batch=8, lr=1e-2, chunk=3)
    result = fit(
        lm_objective(emu_cfg, SPEC.emulator_peft(pc)), state, emulator, {"tokens": tokens}, cfg, show_progress=False
    )
    jax.tree.map(np.testing.assert_array_equal, emulator, frozen_copy)  # the frozen base is untouched
    merged = peft_lib.merge(params, result.params, TINY, SPEC.full_peft(pc))
    rows, rest = _changed_rows(params, merged)
    assert rows == set(SPEC.adapter_ids) and rest == []
    # The tuned adapter does change the plugged-in full model's output.
    assert not np.allclose(logits(params, tokens, TINY, result.params, SPEC.full_peft(pc)), logits(params, tokens))


# --- the training loop ---------------------------------------------------------------------------


def test_fit_resumes_bit_exactly_from_a_checkpoint(params, tokens, tmp_path):
    objective = lm_objective(TINY)
    cfg = TrainConfig(steps=8, batch=4, lr=3e-3, warmup=2, weight_decay=0.1, chunk=4)
    with CheckpointManager(tmp_path / "a") as ckpt:
        straight = fit(objective, params, None, {"tokens": tokens}, cfg, checkpoints=ckpt, show_progress=False)
        assert ckpt.all_steps() == [4, 8]
    shutil.copytree(tmp_path / "a" / "4", tmp_path / "b" / "4")  # as if killed after the first chunk
    with CheckpointManager(tmp_path / "b") as ckpt:
        resumed = fit(objective, params, None, {"tokens": tokens}, cfg, checkpoints=ckpt, show_progress=False)
    assert resumed.resumed_from == 4 and [h["step"] for h in resumed.history] == [8]
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


def test_train_config_and_data_errors_are_clear(params):
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(steps=5, batch=2, lr=1e-3, warmup=5)
    with pytest.raises(ValueError, match="leading"):
        fit(
            lm_objective(TINY),
            params,
            None,
            {"tokens": jnp.zeros((3, 8), jnp.int32), "mask": jnp.ones((4, 8))},
            TrainConfig(steps=1, batch=2, lr=1e-3),
            show_progress=False,
        )


def test_step_memory_counts_the_state_it_trains(params, tokens):
    cfg = TrainConfig(steps=2, batch=4, lr=1e-3)
    batch = {"tokens": tokens[:4]}
    full = step_memory(lm_objective(TINY), params, None, batch, cfg)
    pc = SPEC.emulator_peft(PeftConfig(kind="lora", lora_rank=2))
    emulator, emu_cfg = emu.build(params, SPEC), SPEC.emulator_config(TINY)
    state = peft_lib.init(jax.random.PRNGKey(0), emulator, emu_cfg, pc)
    lora = step_memory(lm_objective(emu_cfg, pc), state, emulator, batch, cfg)
    n_full = sum(x.size for x in jax.tree.leaves(params))
    assert full["peak_bytes"] >= 3 * 4 * n_full  # params + two Adam moments, float32
    assert lora["peak_bytes"] < full["peak_bytes"]


# --- distillation ------------------------------------------------------------------------------


def test_kd_loss_is_normalized_by_the_teacher_rms():
    t = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    assert float(kd_loss(t, t)) == 0.0
    np.testing.assert_allclose(float(kd_loss(t, jnp.zeros_like(t))), 1.0, rtol=1e-6)
    s = t + 0.1 * jax.random.normal(jax.random.PRNGKey(1), t.shape)
    np.testing.assert_allclose(float(kd_loss(3 * t, 3 * s)), float(kd_loss(t, s)), rtol=1e-5)
    mask = jnp.ones((2, 5)).at[:, 3:].set(0)
    np.testing.assert_allclose(float(kd_loss(t, s, mask)), float(kd_loss(t[:, :3], s[:, :3])), rtol=1e-5)


def test_distillation_lowers_kd_and_trains_only_the_middle(params, tokens):
    train, held = np.asarray(tokens[:48]), np.asarray(tokens[48:])
    cfg = DistillConfig(steps=20, batch=8, seq_len=12, lr=3e-3, warmup=2, chunk=10)
    result = distill(params, TINY, SPEC, train, cfg, heldout=held, show_progress=False)
    student = emu.middle(emu.build(params, SPEC), SPEC, emulator=True)
    assert result.before == pytest.approx(distill_metrics(params, student, held, TINY, SPEC))
    assert result.after["kd"] < 0.7 * result.before["kd"]
    assert result.history[-1]["kd"] < result.history[0]["kd"]
    # Adapter blocks, embeddings and ln_f are the full model's; only the kept middle moved.
    layer_drop = emu.build(params, SPEC)
    rows, rest = _changed_rows(layer_drop, result.params)
    assert rows == set(range(SPEC.l, SPEC.l + SPEC.k)) and rest == []
