"""Hugging Face import/export: configs, state dicts, local directories, merged PEFT, bad input."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import CONFIGS, batch, hf_logits, random_hf_model
from transformers import GPT2LMHeadModel, GPT2Model

from fedpeat_jax import peft
from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.model import gpt2, hf

SHAPE = CONFIGS["odd_heads"]
CFG = GPT2Config(**SHAPE)


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)


def perturbed(tree, seed, scale=0.1):
    """`tree` plus noise on every leaf (turns zero-initialized biases and LoRA B into real values)."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * rs.standard_normal(x.shape), jnp.float32), tree)


# One compiled forward for the whole module (eager JAX would compile every primitive separately).
forward = jax.jit(gpt2.apply, static_argnames=("config", "peft_config"))


@pytest.fixture(scope="module")
def params():
    # Built in torch (gpt2.init's random draws compile per shape; torch's are free here).
    params, cfg = hf.from_torch_model(random_hf_model(SHAPE, seed=0))
    assert cfg == CFG
    return params


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def test_config_round_trip():
    cfg = GPT2Config(**CONFIGS["n_inner"], attn_pdrop=0.0, layer_norm_epsilon=1e-6)
    hf_cfg = hf.to_hf_config(cfg)
    assert hf_cfg.eos_token_id is None  # 50256 is not in a 97-token vocabulary
    assert hf.config_from_hf(hf_cfg) == cfg
    assert hf.config_from_hf(hf_cfg.to_dict()) == cfg
    assert hf.config_from_hf(hf_cfg, dtype="bfloat16") == cfg.replace(dtype="bfloat16")
    assert hf.to_hf_config(GPT2Config.preset("gpt2")).eos_token_id == 50256


@pytest.mark.parametrize(
    "change, field",
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_hf_config_is_refused(change, field):
    config = dict(hf.to_hf_config(CFG).to_dict(), **change)
    with pytest.raises(ValueError, match=field):
        hf.config_from_hf(config)


# --------------------------------------------------------------------------------------------
# Export -> transformers -> import
# --------------------------------------------------------------------------------------------
def test_export_loads_in_transformers_and_imports_back_exactly(params, tmp_path):
    path = hf.save_pretrained(params, CFG, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    # transformers holds exactly our numbers, head tied ...
    state = model.state_dict()
    for key, value in hf.state_dict_from_params(params).items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # ... computes our logits ...
    ids, mask = batch(CFG.vocab_size, 13)
    ours = np.asarray(forward(params, ids, mask, config=CFG))
    np.testing.assert_allclose(hf_logits(model, ids, mask)[mask > 0], ours[mask > 0], atol=1e-4, rtol=0)
    # ... and both import routes give the params back bit for bit.
    for back, cfg in (hf.load_pretrained(path), hf.from_torch_model(model)):
        assert cfg == CFG
        assert_trees_equal(back, params)


def test_pytorch_bin_checkpoint_with_buffers_and_tied_head(tmp_path):
    model = random_hf_model(SHAPE, seed=3)
    state = dict(model.state_dict())
    assert "lm_head.weight" in state  # the tied head is in the .bin, as in the original GPT-2 files
    # Old checkpoints also carry the causal-mask buffers; they must be skipped.
    n = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model.config.to_json_file(tmp_path / "config.json")
    params, cfg = hf.load_pretrained(tmp_path)
    assert cfg == CFG
    assert_trees_equal(params, hf.from_torch_model(model)[0])
    np.testing.assert_array_equal(
        np.asarray(params["blocks"]["attn"]["c_attn"]["bias"][2]),
        model.transformer.h[2].attn.c_attn.bias.detach().numpy(),
    )


def test_sharded_and_bfloat16_safetensors(tmp_path):
    model = random_hf_model(SHAPE, seed=4)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_trees_equal(hf.load_pretrained(tmp_path / "sharded")[0], hf.from_torch_model(model)[0])

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # numpy has no bfloat16
    params, _ = hf.load_pretrained(tmp_path / "bf16")
    assert params["wte"].dtype == np.float32
    assert_trees_equal(params, hf.from_torch_model(model)[0])


def test_state_dict_without_transformer_prefix(params):
    model = GPT2Model(hf.to_hf_config(CFG))  # the bare trunk: keys "h.0...", no lm_head
    model.load_state_dict(
        {k.removeprefix("transformer."): torch.tensor(v) for k, v in hf.state_dict_from_params(params).items()}
    )
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert not any(k.startswith("transformer.") for k in sd)
    assert_trees_equal(hf.params_from_state_dict(sd, CFG), params)


# --------------------------------------------------------------------------------------------
# PEFT export
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "bitfit", "full"])
def test_merged_peft_export_equals_unmerged_forward(params, kind, tmp_path):
    pc = PeftConfig(kind=kind, layers=(0, 2), lora_rank=3, lora_targets=("attn.c_attn", "mlp.c_proj"))
    state = perturbed(peft.init(jax.random.key(2), params, CFG, pc), seed=3)
    ids, mask = batch(CFG.vocab_size, 13)
    unmerged = np.asarray(forward(params, ids, mask, config=CFG, peft=state, peft_config=pc))
    base = np.asarray(forward(params, ids, mask, config=CFG))
    assert np.abs(unmerged - base)[mask > 0].max() > 1e-2  # the PEFT state really changes the model

    path = hf.save_pretrained(params, CFG, tmp_path / kind, peft_state=state, peft_config=pc)
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(model, ids, mask)[mask > 0], unmerged[mask > 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["adapter", "prompt"])
def test_unmergeable_peft_export_is_refused(params, kind, tmp_path):
    pc = PeftConfig(kind=kind, layers=(1,), adapter_size=4, n_prompt_tokens=2)
    state = peft.init(jax.random.key(2), params, CFG, pc)
    with pytest.raises(ValueError, match=f"cannot export PEFT kind '{kind}'"):
        hf.save_pretrained(params, CFG, tmp_path / kind, peft_state=state, peft_config=pc)
    assert not (tmp_path / kind).exists()


# --------------------------------------------------------------------------------------------
# Directories: atomic writes, tokenizer
# --------------------------------------------------------------------------------------------
def test_save_refuses_to_clobber_and_replaces_atomically(params, tmp_path):
    path = tmp_path / "ckpt"
    hf.save_pretrained(params, CFG, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save_pretrained(params, CFG, path)
    changed = dict(params, wte=params["wte"] + 1.0)
    hf.save_pretrained(changed, CFG, path, overwrite=True)
    np.testing.assert_array_equal(np.asarray(hf.load_pretrained(path)[0]["wte"]), np.asarray(changed["wte"]))
    # A failing save leaves the previous checkpoint and no temporary directories behind.
    with pytest.raises(ValueError):
        hf.save_pretrained(dict(params, wpe=params["wpe"][:5]), CFG, path, overwrite=True)
    np.testing.assert_array_equal(np.asarray(hf.load_pretrained(path)[0]["wte"]), np.asarray(changed["wte"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tokenizer_saved_alongside(params, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "to": 1, "be": 2, "or": 3, "not": 4, "[UNK]": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]")
    path = hf.save_pretrained(params, CFG, tmp_path / "ckpt", tokenizer=tok)
    loaded = hf.load_tokenizer(path)
    assert loaded("to be or not to be")["input_ids"] == [1, 2, 3, 4, 1, 2]
    assert loaded.eos_token == "<|endoftext|>"
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        hf.load_tokenizer(hf.save_pretrained(params, CFG, tmp_path / "bare"))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_weight_shapes_that_do_not_match_the_config(params, tmp_path):
    path = hf.save_pretrained(params, CFG, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, n_inner=64)))
    with pytest.raises(ValueError, match=r"'h\.0\.mlp\.c_fc\.weight' has shape \(30, 120\).*needs \(30, 64\)"):
        hf.load_pretrained(path)

    sd = hf.state_dict_from_params(params)
    with pytest.raises(ValueError, match=r"'wte\.weight' has shape \(203, 30\).*needs \(204, 30\)"):
        hf.params_from_state_dict(sd, CFG.replace(vocab_size=204))
    with pytest.raises(ValueError, match=r"have 3 blocks, the config n_layer=2.*unexpected \[.*'h\.2\.ln_1\.weight'"):
        hf.params_from_state_dict(sd, CFG.replace(n_layer=2))
    with pytest.raises(ValueError, match=r"have 3 blocks, the config n_layer=4.*missing \[.*'h\.3\.ln_1\.weight'"):
        hf.params_from_state_dict(sd, CFG.replace(n_layer=4))
    untied = dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"] + 1})
    with pytest.raises(ValueError, match="untied LM head"):
        hf.params_from_state_dict(untied, CFG)


def test_missing_directory_and_files(params, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such directory: .*nowhere.*config\.json and model\.safetensors"):
        hf.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        hf.load_pretrained(tmp_path / "empty")
    hf.to_hf_config(CFG).to_json_file(tmp_path / "empty" / "config.json")
    with pytest.raises(
        FileNotFoundError, match=r"no GPT-2 weights in .*empty.*model\.safetensors.*found \['config\.json'\]"
    ):
        hf.load_pretrained(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        hf.load_pretrained(tmp_path / "file")
