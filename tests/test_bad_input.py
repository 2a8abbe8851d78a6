"""Configs and inputs that cannot work raise a ValueError that names the problem, before anything
is compiled (the checks run on static Python values: config fields and array shapes)."""

from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.monitoring
import numpy as np
import pytest

from fedpeat_jax import peft
from fedpeat_jax.config import GPT2Config, PeftConfig, adapter_layers
from fedpeat_jax.model import gpt2

CFG = GPT2Config(
    vocab_size=97, n_positions=32, n_embd=24, n_layer=4, n_head=3, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
)


_jitted_apply = jax.jit(gpt2.apply, static_argnames=("config", "peft_config"))
KEY = jax.random.key(0)  # made once, up front: creating a key compiles


def zeros_params(config: GPT2Config):
    """Params of the right structure (numpy zeros: nothing is computed or compiled)."""
    shapes = jax.eval_shape(lambda: gpt2.init(jax.random.key(0), config))
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)


@pytest.fixture(scope="module")
def params():
    return zeros_params(CFG)


def ids_of(length: int, batch: int = 2):
    return np.zeros((batch, length), np.int32)


@contextlib.contextmanager
def no_compilation():
    """Fail if XLA compiles anything inside the block."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not compiled, "something was compiled before the error was raised"


def test_no_compilation_guard_sees_compiles():
    """The guard itself works: a fresh jitted function compiles inside it."""
    with pytest.raises(AssertionError, match="compiled"):
        with no_compilation():
            jax.jit(lambda x: x * 3 + 1)(np.arange(5.0)).block_until_ready()


# ------------------------------------------------------------------------------------------
# Model config
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_embd,n_head", [(25, 3), (24, 5), (10, 4)])
def test_n_embd_not_divisible_by_n_head(n_embd, n_head):
    with pytest.raises(ValueError, match=rf"n_embd \({n_embd}\) must be divisible by n_head \({n_head}\)"):
        GPT2Config(n_embd=n_embd, n_head=n_head)
    with pytest.raises(ValueError, match="divisible by n_head"):
        CFG.replace(n_head=n_head, n_embd=n_embd)


@pytest.mark.parametrize("field", ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"])
@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_non_positive_sizes(field, value):
    with pytest.raises(
        ValueError, match=rf"GPT2Config.{field} must be (a positive integer|an integer, got 2.5 \(a float\))"
    ):
        CFG.replace(**{field: value})


def test_bad_n_inner():
    with pytest.raises(ValueError, match="n_inner"):
        CFG.replace(n_inner=0)


@pytest.mark.parametrize("dtype", ["float16", "int32", "fp32", None])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match=r"dtype must be (one of \('float32', 'bfloat16'\)|a string, got None)"):
        CFG.replace(dtype=dtype)


def test_float_input_ids_are_rejected(params):
    with pytest.raises(ValueError, match="integer"):
        gpt2.apply(params, np.zeros((1, 4), np.float32), config=CFG)


@pytest.mark.parametrize("field", ["embd_pdrop", "attn_pdrop", "resid_pdrop"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be in \[0, 1\)"):
        CFG.replace(**{field: value})


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_lora_dropout_out_of_range(value):
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        PeftConfig(kind="lora", lora_dropout=value)


def test_bad_layer_norm_epsilon():
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        CFG.replace(layer_norm_epsilon=0.0)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown GPT-2 preset 'gpt3'.*gpt2-xl"):
        GPT2Config.preset("gpt3")
    # Known presets still build, and overrides are validated too.
    assert GPT2Config.preset("tiny").n_layer == 6
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT2Config.preset("tiny", n_head=5)


# ------------------------------------------------------------------------------------------
# PEFT config against the model
# ------------------------------------------------------------------------------------------
def test_unknown_peft_kind():
    with pytest.raises(ValueError, match=r"PeftConfig.kind must be one of .*'qlora'"):
        PeftConfig(kind="qlora")


@pytest.mark.parametrize("targets", [("attn.q_proj",), ("c_attn",), ("attn.c_attn", "mlp.c_proj", "mlp.fc_in")])
def test_unknown_lora_target(targets):
    bad = [t for t in targets if t not in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) " + re.escape(str(bad))):
        PeftConfig(kind="lora", lora_targets=targets)


def test_no_lora_targets():
    with pytest.raises(ValueError, match="at least one target"):
        PeftConfig(kind="lora", lora_targets=())


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_lora_rank(rank):
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        PeftConfig(kind="lora", lora_rank=rank)


def test_lora_rank_larger_than_width(params):
    pc = PeftConfig(kind="lora", lora_rank=25)  # fine on its own, n_embd = 24 is too narrow
    with pytest.raises(ValueError, match=r"lora_rank \(25\) is larger than the model width \(24\)"):
        pc.validate(CFG)
    with no_compilation(), pytest.raises(ValueError, match="larger than the model width"):
        peft.init(KEY, params, CFG, pc)
    # The width is min(n_embd, d_mlp): a narrow MLP bounds the rank too.
    narrow = CFG.replace(n_inner=8)
    with pytest.raises(ValueError, match=r"lora_rank \(9\) is larger than the model width \(8\)"):
        PeftConfig(kind="lora", lora_rank=9).validate(narrow)
    PeftConfig(kind="lora", lora_rank=24).validate(CFG)  # rank == width is allowed


@pytest.mark.parametrize("layers", [(2, 4), (7,), (-1,), (0, 1, 2, 3, 4)])
def test_block_range_out_of_range(layers, params):
    pc = PeftConfig(kind="lora", layers=layers, lora_rank=2)
    with pytest.raises(ValueError, match=r"layers \[.*\] out of range for a model with 4 blocks"):
        pc.validate(CFG)
    with no_compilation(), pytest.raises(ValueError, match="out of range"):
        peft.init(KEY, params, CFG, pc)
    # A state built for a deeper model and run on this one: the forward refuses the block range too.
    shapes = jax.eval_shape(lambda: peft.lora.init(KEY, CFG, pc, len(layers)))
    state = {"blocks": {"lora": jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)}}
    with no_compilation(), pytest.raises(ValueError, match="out of range"):
        _jitted_apply(params, ids_of(5), config=CFG, peft=state, peft_config=pc)


def test_block_range_out_of_range_eager_apply_compiles_nothing(params):
    pc = PeftConfig(kind="lora", layers=(2, 4), lora_rank=2)
    shapes = jax.eval_shape(lambda: peft.lora.init(KEY, CFG, pc, 2))
    state = {"blocks": {"lora": jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)}}
    with pytest.raises(ValueError, match="out of range"):  # it does raise ...
        gpt2.apply(params, ids_of(6), config=CFG, peft=state, peft_config=pc)
    with no_compilation(), pytest.raises(ValueError, match="out of range"):  # ... but not up front
        gpt2.apply(params, ids_of(23, batch=3), config=CFG, peft=state, peft_config=pc)


@pytest.mark.parametrize("kind", ["adapter", "bitfit", "full"])
def test_block_range_out_of_range_other_kinds(kind, params):
    pc = PeftConfig(kind=kind, layers=(1, 4))
    with no_compilation(), pytest.raises(ValueError, match=r"layers \[4\] out of range"):
        peft.init(KEY, params, CFG, pc)


@pytest.mark.parametrize("layers,problem", [((1, 1), "duplicates"), ((3, 1), "increasing")])
def test_bad_layer_lists(layers, problem):
    with pytest.raises(ValueError, match=problem):
        PeftConfig(kind="lora", layers=layers)


def test_adapter_split_leaves_no_middle():
    with pytest.raises(ValueError, match="leaves no middle"):
        adapter_layers(4, 2, 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        adapter_layers(4, -1, 2)
    assert adapter_layers(12) == (0, 1, 10, 11)


def test_bad_adapter_size_and_prompt_count():
    with pytest.raises(ValueError, match="adapter_size must be >= 1"):
        PeftConfig(kind="adapter", adapter_size=0)
    with pytest.raises(ValueError, match="n_prompt_tokens must be >= 1"):
        PeftConfig(kind="prompt", n_prompt_tokens=0)


def test_peft_state_without_config(params):
    with no_compilation(), pytest.raises(ValueError, match="without its PeftConfig"):
        gpt2.apply(params, ids_of(5), config=CFG, peft={"prompt": np.zeros((2, 24), np.float32)})


# ------------------------------------------------------------------------------------------
# Sequence length
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [33, 100])
def test_sequence_longer_than_n_positions(length, params):
    ids = ids_of(length)
    match = rf"sequence length {length} exceeds the model's n_positions \(32\)"
    with no_compilation(), pytest.raises(ValueError, match=match):
        gpt2.apply(params, ids, config=CFG)
    # Under jit with a static config the check fires while tracing: nothing reaches XLA.
    with no_compilation(), pytest.raises(ValueError, match=match):
        _jitted_apply(params, ids, config=CFG)
    with no_compilation(), pytest.raises(ValueError, match=match):
        jax.make_jaxpr(functools.partial(gpt2.apply, config=CFG))(params, ids)
    with no_compilation(), pytest.raises(ValueError, match=match):
        gpt2.hidden_states(params, ids, np.ones(ids.shape, np.int32), config=CFG)


def test_input_ids_must_be_2d(params):
    with no_compilation(), pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\), got shape \(5,\)"):
        gpt2.apply(params, np.zeros((5,), np.int32), config=CFG)


def test_prompt_tokens_plus_sequence_longer_than_n_positions(params):
    pc = PeftConfig(kind="prompt", n_prompt_tokens=8)
    state = {"prompt": np.zeros((8, CFG.n_embd), np.float32)}
    match = r"sequence length 25 \+ 8 prompt tokens exceeds the model's n_positions \(32\)"
    with no_compilation(), pytest.raises(ValueError, match=match):
        gpt2.apply(params, ids_of(25), config=CFG, peft=state, peft_config=pc)
    with no_compilation(), pytest.raises(ValueError, match=match):
        _jitted_apply(params, ids_of(25), config=CFG, peft=state, peft_config=pc)
    # The prompt alone must leave room for at least one token.
    with pytest.raises(ValueError, match=r"n_prompt_tokens \(32\) must be < n_positions \(32\)"):
        PeftConfig(kind="prompt", n_prompt_tokens=32).validate(CFG)
    with no_compilation(), pytest.raises(ValueError, match="n_prompt_tokens"):
        peft.init(KEY, params, CFG, PeftConfig(kind="prompt", n_prompt_tokens=40))


def test_boundary_lengths_are_accepted(params):
    """n_positions tokens, and n_positions - n_prompt tokens with a prompt, pass the checks."""
    gpt2.check_inputs(ids_of(32), CFG)
    gpt2.check_inputs(ids_of(24), CFG, PeftConfig(kind="prompt", n_prompt_tokens=8))


# ------------------------------------------------------------------------------------------
# Weights that do not match the config
# ------------------------------------------------------------------------------------------
def test_matching_params_pass(params):
    gpt2.check_params(params, CFG)


@pytest.mark.parametrize(
    "other,leaf",
    [
        (CFG.replace(n_embd=30), r"\[.*\]"),
        (CFG.replace(vocab_size=98), r"\['wte'\]"),
        (CFG.replace(n_positions=64), r"\['wpe'\]"),
        (CFG.replace(n_layer=3), r"\['blocks'\]"),
        (CFG.replace(n_inner=40), r"\['blocks'\]\['mlp'\]"),
    ],
    ids=["n_embd", "vocab", "n_positions", "n_layer", "n_inner"],
)
def test_params_whose_shapes_do_not_match_the_config(other, leaf, params):
    with no_compilation(), pytest.raises(ValueError, match=rf"GPT-2 parameter {leaf}.* has shape .* needs"):
        gpt2.check_params(zeros_params(other), CFG)
    with no_compilation(), pytest.raises(ValueError, match="has shape"):
        gpt2.check_params(params, other)


def test_params_with_missing_or_extra_leaves(params):
    missing = dict(params, blocks={k: v for k, v in params["blocks"].items() if k != "ln_2"})
    with pytest.raises(ValueError, match=r"do not match the config: missing \[.*ln_2.*\]"):
        gpt2.check_params(missing, CFG)
    extra = dict(params, lm_head=np.zeros((97, 24), np.float32))
    with pytest.raises(ValueError, match=r"unexpected \[.*lm_head.*\]"):
        gpt2.check_params(extra, CFG)


# ------------------------------------------------------------------------------------------
# PEFT operations that cannot apply
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adapter", "prompt"])
def test_merge_of_architectural_peft_is_refused(kind, params):
    pc = PeftConfig(kind=kind, adapter_size=4, n_prompt_tokens=2)
    shapes = jax.eval_shape(lambda: peft.init(KEY, params, CFG, pc))
    state = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    with pytest.raises(ValueError, match=rf"PEFT kind '{kind}' adds modules to the architecture and cannot be merged"):
        peft.merge(params, state, CFG, pc)
