"""Emulators for offsite tuning (Xiao et al. 2023): one function builds them, for training and
evaluation alike.

A model of L blocks is split into the adapter (bottom `l` and top `r` blocks, exact and trainable)
and the middle (`n = L - l - r` blocks, frozen). The emulator keeps `k` of the middle blocks by
uniform layer-drop: middle index `round(i * (n - 1) / (k - 1))` for i = 0..k-1 (Python's round,
half to even, as the reference code), so the first and last middle blocks are always kept.

PEFT states live on the adapter blocks and have the same shape on the emulator and on the full
model; only the block indices differ. `EmulatorSpec.emulator_peft` and `.full_peft` give the
PeftConfig for each, so *plug-in* is running the same state with the full model's config (and
`peft.merge` writes it into the weights for export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

from fedpeat_jax.config import GPT2Config, PeftConfig
from fedpeat_jax.tree import select_blocks, write_blocks


def layer_drop_ids(n_layer: int, l: int, r: int, k: int) -> tuple:
    """Full-model indices of the k middle blocks that uniform layer-drop keeps."""
    n = n_layer - l - r
    if l < 0 or r < 0 or n < 1:
        raise ValueError(f"adapter l={l}, r={r} leaves no middle in a model with {n_layer} blocks")
    if not 0 <= k <= n:
        raise ValueError(f"emulator size k={k} is out of range: the middle has {n} blocks (0 <= k <= {n})")
    if k == 0:
        return ()
    if k == 1:
        return (l,)
    return tuple(l + round(i * (n - 1) / (k - 1)) for i in range(k))


@dataclass(frozen=True)
class EmulatorSpec:
    """An l-k-r emulator of an n_layer model (hashable: usable as a static jit argument)."""

    n_layer: int
    l: int = 2
    r: int = 2
    k: int = 2

    def __post_init__(self):
        layer_drop_ids(self.n_layer, self.l, self.r, self.k)  # validates

    @property
    def n_middle(self) -> int:
        return self.n_layer - self.l - self.r

    @property
    def middle_ids(self) -> tuple:
        return layer_drop_ids(self.n_layer, self.l, self.r, self.k)

    @property
    def adapter_ids(self) -> tuple:
        """Adapter blocks in full-model indices."""
        return tuple(range(self.l)) + tuple(range(self.n_layer - self.r, self.n_layer))

    @property
    def block_ids(self) -> tuple:
        """Full-model indices of every emulator block, bottom to top."""
        return tuple(range(self.l)) + self.middle_ids + tuple(range(self.n_layer - self.r, self.n_layer))

    @property
    def depth(self) -> int:
        return self.l + self.k + self.r

    @property
    def emulator_adapter_ids(self) -> tuple:
        """Adapter blocks in emulator indices."""
        return tuple(range(self.l)) + tuple(range(self.l + self.k, self.depth))

    @property
    def name(self) -> str:
        return f"{self.l}-{self.k}-{self.r}"

    def emulator_peft(self, peft: PeftConfig) -> PeftConfig:
        """`peft` placed on the adapter blocks of the emulator."""
        return peft.replace(layers=self.emulator_adapter_ids)

    def full_peft(self, peft: PeftConfig) -> PeftConfig:
        """`peft` placed on the adapter blocks of the full model (plug-in)."""
        return peft.replace(layers=self.adapter_ids)

    def emulator_config(self, model: GPT2Config) -> GPT2Config:
        return model.replace(n_layer=self.depth)

    def check(self, model: GPT2Config) -> None:
        if model.n_layer != self.n_layer:
            raise ValueError(f"emulator spec {self.name} is for {self.n_layer} blocks, the model has {model.n_layer}")


def build(params, spec: EmulatorSpec):
    """The emulator's parameters: the full model's embeddings and ln_f, adapter blocks and the
    kept middle blocks, stacked bottom to top."""
    n = params["blocks"]["ln_1"]["scale"].shape[0]
    if n != spec.n_layer:
        raise ValueError(f"emulator spec {spec.name} is for {spec.n_layer} blocks, the params have {n}")
    return dict(params, blocks=select_blocks(params["blocks"], spec.block_ids))


def middle(params, spec: EmulatorSpec, emulator: bool):
    """The middle stack: the emulator's compressed middle or the full model's."""
    if emulator:
        return select_blocks(params["blocks"], range(spec.l, spec.l + spec.k))
    return select_blocks(params["blocks"], range(spec.l, spec.n_layer - spec.r))


def plug_in(full_params, emulator_params, spec: EmulatorSpec):
    """Write the emulator's adapter blocks back into the full model (full-adapter tuning, where
    the adapter blocks themselves were trained on the emulator)."""
    adapter = select_blocks(emulator_params["blocks"], spec.emulator_adapter_ids)
    return dict(full_params, blocks=write_blocks(full_params["blocks"], spec.adapter_ids, adapter))


def with_middle(emulator_params, spec: EmulatorSpec, middle_blocks):
    """Emulator params whose middle blocks are replaced (after distillation or compression)."""
    ids = tuple(range(spec.l, spec.l + spec.k))
    return dict(emulator_params, blocks=write_blocks(emulator_params["blocks"], ids, middle_blocks))


# --------------------------------------------------------------------------------------------
# Optional extra compression of the emulator's middle
# --------------------------------------------------------------------------------------------
def _kernels(fn, blocks):
    """Apply `fn` to every kernel (weight matrix) of a stack of blocks, leaving the rest."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: fn(x) if jax.tree_util.keystr(path).endswith("['kernel']") else x, blocks
    )


def magnitude_prune(blocks, sparsity: float):
    """Zero the `sparsity` fraction of smallest-magnitude weights of each kernel of each block."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")

    def prune(w):  # w: (n, in, out); threshold per block
        flat = jnp.abs(w.reshape(w.shape[0], -1))
        n_drop = int(sparsity * flat.shape[1])
        if n_drop == 0:
            return w
        threshold = jnp.sort(flat, axis=1)[:, n_drop - 1]
        return jnp.where(jnp.abs(w) > threshold[:, None, None], w, 0.0)

    return _kernels(prune, blocks)


def quantize(blocks, bits: int):
    """Uniform symmetric per-output-channel weight quantization (stored dequantized in float32)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"quantization bits must be in [2, 16], got {bits}")
    levels = 2 ** (bits - 1) - 1

    def q(w):
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / levels
        scale = jnp.where(scale == 0, 1.0, scale)
        return jnp.round(w / scale).clip(-levels, levels) * scale

    return _kernels(q, blocks)


def compress(emulator_params, spec: EmulatorSpec, sparsity: float = 0.0, bits: Optional[int] = None):
    """Prune and/or quantize the emulator's middle blocks (the adapter stays exact)."""
    mid = middle(emulator_params, spec, emulator=True)
    if sparsity:
        mid = magnitude_prune(mid, sparsity)
    if bits is not None:
        mid = quantize(mid, bits)
    return with_middle(emulator_params, spec, mid)
