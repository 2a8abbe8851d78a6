"""Model configs: GPT-2's shape (`GPT2Config`, with presets) and what is trained (`PeftConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from fedpeat_jax.config.base import Config, require

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("einsum", "dot_product")


@dataclass(frozen=True)
class GPT2Config(Config):
    """Shape and regularisation of a GPT-2 model (names follow transformers' GPT2Config)."""

    vocab_size: int = 50257
    """Token vocabulary (embedding rows; the LM head is tied to `wte`)."""
    n_positions: int = 1024
    """Maximum sequence length (position embeddings)."""
    n_embd: int = 768
    """Hidden width d."""
    n_layer: int = 12
    """Number of transformer blocks L."""
    n_head: int = 12
    """Attention heads; must divide n_embd."""
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd, as in GPT-2
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    embd_pdrop: float = 0.1
    """Dropout on the embeddings (the CLI runs set all three dropouts to 0)."""
    attn_pdrop: float = 0.1
    """Dropout on the attention probabilities."""
    resid_pdrop: float = 0.1
    """Dropout on the residual branches."""
    initializer_range: float = 0.02
    """Std of the normal initialization (residual projections scaled by 1/sqrt(2 n_layer))."""
    dtype: str = "float32"
    """Compute dtype: 'bfloat16' runs the dense products on bfloat16 operands with float32 accumulation; parameters are
    stored in float32 (a frozen base may be bfloat16)."""
    attention: str = "einsum"
    """Execution only: 'dot_product' runs jax.nn.dot_product_attention (fused kernels on GPU; einsum under attention
    dropout)."""
    remat: bool = False
    """Execution only: recompute each block's activations in the backward pass (jax.checkpoint): less memory, more compute."""

    @property
    def d_mlp(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0, f"GPT2Config.{name} must be a positive integer, got {value!r}"
            )
        require(
            self.n_embd % self.n_head == 0,
            f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        require(
            self.n_inner is None or (isinstance(self.n_inner, int) and self.n_inner > 0),
            f"GPT2Config.n_inner must be None or a positive integer, got {self.n_inner!r}",
        )
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"GPT2Config.{name} must be in [0, 1), got {value!r}")
        require(self.layer_norm_epsilon > 0, "GPT2Config.layer_norm_epsilon must be > 0")
        require(self.dtype in DTYPES, f"GPT2Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(
            self.attention in ATTENTION_IMPLS,
            f"GPT2Config.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}",
        )
        require(isinstance(self.remat, bool), f"GPT2Config.remat must be True or False, got {self.remat!r}")

    def block_param_count(self) -> int:
        """Parameters of one transformer block (GPT-2 small: 7,087,872)."""
        d, m = self.n_embd, self.d_mlp
        attn = d * 3 * d + 3 * d + d * d + d
        mlp = d * m + m + m * d + d
        return attn + mlp + 4 * d  # + two LayerNorms

    def embedding_param_count(self) -> int:
        """Token + position embeddings (GPT2-XL: 82,049,600; the LM head is tied to wte)."""
        return self.vocab_size * self.n_embd + self.n_positions * self.n_embd

    def param_count(self) -> int:
        """All parameters: embeddings, blocks and the final LayerNorm."""
        return self.embedding_param_count() + self.n_layer * self.block_param_count() + 2 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides) -> GPT2Config:
        if name not in GPT2_PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(GPT2_PRESETS)}")
        return dataclasses.replace(GPT2_PRESETS[name], **overrides)


GPT2_PRESETS = {
    # Real GPT-2 shapes (for real weights, accelerators and the MEC cost model).
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    # The project's own foundation model: pretrains on a 2-core CPU in minutes.
    "default": GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=8, n_head=4),
    # A larger foundation model for accelerators.
    "base": GPT2Config(vocab_size=16384, n_positions=512, n_embd=512, n_layer=12, n_head=8),
    # Tiny shapes for tests and smoke runs.
    "tiny": GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=6, n_head=4),
}


PEFT_KINDS = ("lora", "adapter", "bitfit", "prompt", "full", "none")
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class PeftConfig(Config):
    """What is trained, and where.

    kind:   "lora" (reparameterized), "adapter" (bottleneck, additive), "bitfit" (biases and
            LayerNorms, selective), "prompt" (soft tokens, additive), "full" (the chosen blocks
            themselves, as in offsite tuning's full adapter tuning) or "none".
    layers: indices of the blocks the PEFT module lives in (None: every block). Prompt tuning
            ignores it (the soft tokens sit before the first block).
    """

    kind: str = "lora"
    layers: Optional[tuple[int, ...]] = None
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Dense layers that get LoRA factors."""
    lora_freeze_a: bool = False  # FFA-LoRA: A stays at its shared random init, only B trains
    adapter_size: int = 64
    """Bottleneck width of kind 'adapter' (two adapters per block)."""
    n_prompt_tokens: int = 8
    """Soft tokens of kind 'prompt'."""

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def validate(self, model: Optional[GPT2Config] = None) -> None:
        """Check the config on its own, and against `model` when one is given."""
        require(self.kind in PEFT_KINDS, f"PeftConfig.kind must be one of {PEFT_KINDS}, got {self.kind!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        require(not unknown, f"PeftConfig.lora_targets: unknown LoRA target(s) {unknown}; allowed: {LORA_TARGETS}")
        require(len(self.lora_targets) > 0, "PeftConfig.lora_targets must name at least one target")
        require(self.lora_rank >= 1, f"PeftConfig.lora_rank must be >= 1, got {self.lora_rank}")
        require(0.0 <= self.lora_dropout < 1.0, f"PeftConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.adapter_size >= 1, f"PeftConfig.adapter_size must be >= 1, got {self.adapter_size}")
        require(self.n_prompt_tokens >= 1, f"PeftConfig.n_prompt_tokens must be >= 1, got {self.n_prompt_tokens}")
        if self.layers is not None:
            require(len(set(self.layers)) == len(self.layers), f"PeftConfig.layers has duplicates: {self.layers}")
            require(list(self.layers) == sorted(self.layers), f"PeftConfig.layers must be increasing: {self.layers}")
        if model is None:
            return
        n = model.n_layer
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n]
            require(not bad, f"PeftConfig.layers {bad} out of range for a model with {n} blocks (valid: 0..{n - 1})")
        if self.kind == "lora":
            width = min(model.n_embd, model.d_mlp)
            require(
                self.lora_rank <= width,
                f"PeftConfig.lora_rank ({self.lora_rank}) is larger than the model width ({width})",
            )
        if self.kind == "prompt":
            require(
                self.n_prompt_tokens < model.n_positions,
                f"PeftConfig.n_prompt_tokens ({self.n_prompt_tokens}) must be < n_positions ({model.n_positions})",
            )

    def block_ids(self, n_layer: int) -> tuple:
        """The blocks the module lives in, for a model of `n_layer` blocks."""
        return tuple(range(n_layer)) if self.layers is None else self.layers

    def param_count(self, model: GPT2Config) -> int:
        """Trainable parameters, in closed form (LoRA on all four targets: 16 r d per block).

        Tests check the initialized PEFT pytrees against this; the MEC cost model uses it for
        payload sizes.
        """
        d, m, r = model.n_embd, model.d_mlp, self.lora_rank
        n_blocks = len(self.block_ids(model.n_layer))
        if self.kind == "none":
            return 0
        if self.kind == "prompt":
            return self.n_prompt_tokens * d
        if self.kind == "full":
            return n_blocks * model.block_param_count()
        if self.kind == "bitfit":  # every 1-D parameter: 4 LayerNorm vectors and 4 biases
            return n_blocks * (4 * d + 3 * d + d + m + d)
        if self.kind == "adapter":  # two bottlenecks per block: down (d->s, +bias), up (s->d, +bias)
            s = self.adapter_size
            return n_blocks * 2 * (d * s + s + s * d + d)
        shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, m), "mlp.c_proj": (m, d)}
        per_block_in_out = sum(shapes[t][0] + shapes[t][1] for t in self.lora_targets)
        trained = per_block_in_out * r
        if self.lora_freeze_a:  # FFA-LoRA trains only B (out x r)
            trained = sum(shapes[t][1] for t in self.lora_targets) * r
        return n_blocks * trained
