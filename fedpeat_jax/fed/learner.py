"""What a federated run trains, on which frozen weights, and how it is evaluated.

One round implementation (`fed.simulation`) serves every method; the methods differ only in the
trainable tree and the frozen weights a client trains it on (`FedConfig.trainable`):

  "adapter"     FedPEAT: the PEFT module lives in the adapter blocks (bottom l, top r); a client
                of emulator level j trains it on the l-k_j-r emulator; plug-in runs the same state
                in the full model.
  "all_blocks"  the PEFT module in every block, trained on the full model (e.g. FedIT's LoRA).
  "model"       every weight of the model (embeddings, blocks, final LayerNorm): full fine-tuning.

The frozen weights are always an argument (`params`), never a constant of the compiled program.
"""

from __future__ import annotations

from typing import Optional

import jax

from fedpeat_jax import peft as peft_lib
from fedpeat_jax.config import FedConfig, GPT2Config, PeftConfig
from fedpeat_jax.fed.client import batch_loss
from fedpeat_jax.model import gpt2
from fedpeat_jax.peat.emulator import EmulatorSpec
from fedpeat_jax.peat.emulator import build as build_emulator


class Learner:
    """The trainable tree of one method: its init, the frozen weights per emulator level, the
    loss a client minimizes, and the plug-in evaluation."""

    def __init__(self, model: GPT2Config, peft: PeftConfig, fed: FedConfig):
        self.model, self.fed, self.kind = model, fed, fed.trainable
        self.specs = tuple(EmulatorSpec(model.n_layer, fed.adapter_l, fed.adapter_r, k) for k in fed.emulator_levels)
        if self.kind == "adapter":
            self.peft_full = self.specs[0].full_peft(peft)
            self.peft_levels = tuple(spec.emulator_peft(peft) for spec in self.specs)
            self.model_levels = tuple(spec.emulator_config(model) for spec in self.specs)
        else:
            self.peft_full = None if self.kind == "model" else peft.replace(layers=None)
            self.peft_levels = (self.peft_full,) * len(self.specs)
            self.model_levels = (model,) * len(self.specs)
        if self.peft_full is not None:
            self.peft_full.validate(model)
            for pc, mc in zip(self.peft_levels, self.model_levels):
                pc.validate(mc)

    @property
    def tuned_blocks(self) -> tuple:
        """Full-model indices of the blocks the PEFT module lives in."""
        return self.peft_full.block_ids(self.model.n_layer)

    def init(self, key: jax.Array, params):
        """The global trainable tree at round 0."""
        if self.kind == "model":
            return jax.tree.map(lambda x: x.astype(jax.numpy.float32), params)
        return peft_lib.init(key, params, self.model, self.peft_full)

    def frozen(self, params, level: Optional[int]):
        """The frozen weights a client of emulator `level` holds (the full model for None)."""
        if self.kind == "model":
            return None
        if level is None or self.kind == "all_blocks":
            return params
        return build_emulator(params, self.specs[level])

    def loss(self, level: Optional[int]):
        """`loss(tree, frozen, tokens, mask, key)` of a client on `level` (None: the full model)."""
        if self.kind == "model":
            return lambda tree, frozen, tok, msk, key: batch_loss(tree, None, tok, msk, key, self.model, None)
        model = self.model if level is None else self.model_levels[level]
        pc = self.peft_full if level is None else self.peft_levels[level]
        return lambda tree, frozen, tok, msk, key: batch_loss(frozen, tree, tok, msk, key, model, pc)

    def eval_nll(self, tree, params, tokens, mask, level: Optional[int] = None):
        """Summed held-out NLL and token count of `tree` plugged into the full model (or run on
        emulator `level`), in batches of `FedConfig.eval_batch`."""
        if self.kind == "model":
            return gpt2.evaluate_nll(tree, None, tokens, mask, self.model, None, self.fed.eval_batch)
        model = self.model if level is None else self.model_levels[level]
        pc = self.peft_full if level is None else self.peft_levels[level]
        return gpt2.evaluate_nll(self.frozen(params, level), tree, tokens, mask, model, pc, self.fed.eval_batch)

    def param_count(self) -> int:
        """Scalars in the trainable tree: what a device sends each way per round."""
        if self.kind == "model":
            return self.model.param_count()
        return self.peft_full.param_count(self.model)

    def device_params(self, level: int) -> int:
        """Frozen scalars a device of `level` holds (the emulator, or the full model)."""
        if self.kind == "adapter":
            spec = self.specs[level]
            return (
                self.model.embedding_param_count() + spec.depth * self.model.block_param_count() + 2 * self.model.n_embd
            )
        return self.model.param_count()
