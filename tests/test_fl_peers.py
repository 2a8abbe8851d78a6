"""benchmarks/fl_peers.py times the same work on both sides: fedpeat_jax's round and the torch
client that Flower's actors run (called here directly, without Flower), from the same initial
LoRA on the same data, give the same mean training loss round after round."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import fl_peers  # noqa: E402
from benchmarks.common import torch_lora_emulator  # noqa: E402
from fedpeat_jax.config import GPT2Config  # noqa: E402
from fedpeat_jax.model import gpt2  # noqa: E402


def test_fedpeat_round_and_torch_clients_do_the_same_work():
    cfg = GPT2Config.preset("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params = gpt2.init(jax.random.key(0), cfg)
    m, rounds = 3, 3
    tokens = fl_peers.client_tokens(m, cfg.vocab_size)
    round_fn, state = fl_peers.fedpeat_round(params, cfg, tokens)
    ours = fl_peers.run_fedpeat(round_fn, state, rounds)["loss"]

    spec = fl_peers.emulator_spec(cfg)
    model = torch_lora_emulator(params, cfg, spec, fl_peers.RANK, threads=1)
    lora = fl_peers.initial_lora(state, spec)
    names = sorted(lora)
    global_lora, ref = [lora[k] for k in names], []
    for r in range(rounds):  # Flower's FedAvg, without Flower: every client from the global LoRA, then the mean
        fits = [
            fl_peers.torch_fit(model, torch.as_tensor(tokens[c], dtype=torch.long), names, global_lora, seed=10 * r + c)
            for c in range(m)
        ]
        global_lora = [np.mean([arrays[i] for arrays, _ in fits], axis=0) for i in range(len(names))]
        ref.append(np.mean([loss for _, loss in fits]))
    assert ref[0] - ref[-1] > 5 * fl_peers.LOSS_RTOL * ref[0]  # training moves the loss far more than the tolerance
    np.testing.assert_allclose(ours, ref, rtol=fl_peers.LOSS_RTOL)


def test_implementation_selection():
    """A default run times the client-split rounds and both Flower configurations; a float32
    fedpeat_jax round (the loss reference) always runs; unknown names are refused."""
    impls = fl_peers.implementations(2)
    assert list(fl_peers.select(impls, "", 2)) == [
        "fedpeat_jax_sharded",
        "fedpeat_jax_bf16_sharded",
        "flower_1cpu",
        "flower_2cpu",
    ]
    assert fl_peers.select(impls, "all", 2) == impls
    assert list(fl_peers.select(impls, "flower_1cpu", 2)) == ["fedpeat_jax", "flower_1cpu"]
    assert fl_peers.reference(fl_peers.select(impls, "", 2)) == "fedpeat_jax_sharded"
    assert list(fl_peers.select(fl_peers.implementations(1), "", 1)) == [
        "fedpeat_jax",
        "fedpeat_jax_bf16",
        "flower_1cpu",
    ]
    with pytest.raises(ValueError, match="unknown implementation"):
        fl_peers.select(impls, "flower_9cpu", 2)
