"""Model FLOPs of GPT-2 training steps: the one formula every benchmark and study uses."""

from __future__ import annotations

from fedpeat_jax.config import GPT2Config


def train_flops_per_token(
    model: GPT2Config, depth: int, seq_len: int, *, trained_matmul: int = 0, lora_params: int = 0
) -> float:
    """Training FLOPs per token of a `depth`-block model of `model`'s width with a frozen base:
    forward and activation gradients through every block's dense weights and the tied LM head
    (4 per weight), weight gradients of the trained dense weights (2 per weight), attention
    scores and values forward and backward (12 L T d), and LoRA's own matmuls (6 per factor
    weight). Embedding lookups, LayerNorms and softmaxes are not counted (as in MFU practice)."""
    return (
        4.0 * matmul_param_count(model, depth)
        + 2.0 * trained_matmul
        + 12.0 * depth * seq_len * model.n_embd
        + 6.0 * lora_params
    )


def matmul_param_count(model: GPT2Config, depth: int) -> int:
    """Weights that tokens multiply: the dense weights of `depth` blocks and the tied LM head."""
    return depth * model.block_param_count() + model.vocab_size * model.n_embd
