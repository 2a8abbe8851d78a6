"""Frozen, validated configuration dataclasses.

Every config is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`) with a
`validate()` method that raises `ValueError` naming the offending field *before* anything is
compiled. Constructors call `validate()` themselves, so an invalid config cannot exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("einsum", "dot_product")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class GPT2Config:
    """Shape and regularisation of a GPT-2 model (names follow transformers' GPT2Config)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd, as in GPT-2
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters are stored in float32 (a frozen base may be bfloat16)
    attention: str = "einsum"  # execution only: "dot_product" runs jax.nn.dot_product_attention (fused kernels on GPU; einsum under attention dropout)
    remat: bool = False  # execution only: recompute each block's activations in the backward pass (jax.checkpoint), less memory for more compute

    def __post_init__(self):
        self.validate()

    @property
    def d_mlp(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"GPT2Config.{name} must be a positive integer, got {value!r}")
        _require(
            self.n_embd % self.n_head == 0,
            f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        _require(
            self.n_inner is None or (isinstance(self.n_inner, int) and self.n_inner > 0),
            f"GPT2Config.n_inner must be None or a positive integer, got {self.n_inner!r}",
        )
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"GPT2Config.{name} must be in [0, 1), got {value!r}")
        _require(self.layer_norm_epsilon > 0, "GPT2Config.layer_norm_epsilon must be > 0")
        _require(self.dtype in DTYPES, f"GPT2Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.attention in ATTENTION_IMPLS, f"GPT2Config.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        _require(isinstance(self.remat, bool), f"GPT2Config.remat must be True or False, got {self.remat!r}")

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

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
    def preset(cls, name: str, **overrides) -> "GPT2Config":
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
class PeftConfig:
    """What is trained, and where.

    kind:   "lora" (reparameterized), "adapter" (bottleneck, additive), "bitfit" (biases and
            LayerNorms, selective), "prompt" (soft tokens, additive), "full" (the chosen blocks
            themselves, as in offsite tuning's full adapter tuning) or "none".
    layers: indices of the blocks the PEFT module lives in (None: every block). Prompt tuning
            ignores it (the soft tokens sit before the first block).
    """

    kind: str = "lora"
    layers: Optional[tuple] = None
    lora_rank: int = 4
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple = LORA_TARGETS
    lora_freeze_a: bool = False  # FFA-LoRA: A stays at its shared random init, only B trains
    adapter_size: int = 64
    n_prompt_tokens: int = 8

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.validate()

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def validate(self, model: Optional[GPT2Config] = None) -> None:
        """Check the config on its own, and against `model` when one is given."""
        _require(self.kind in PEFT_KINDS, f"PeftConfig.kind must be one of {PEFT_KINDS}, got {self.kind!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        _require(not unknown, f"PeftConfig.lora_targets: unknown LoRA target(s) {unknown}; allowed: {LORA_TARGETS}")
        _require(len(self.lora_targets) > 0, "PeftConfig.lora_targets must name at least one target")
        _require(self.lora_rank >= 1, f"PeftConfig.lora_rank must be >= 1, got {self.lora_rank}")
        _require(0.0 <= self.lora_dropout < 1.0, f"PeftConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _require(self.adapter_size >= 1, f"PeftConfig.adapter_size must be >= 1, got {self.adapter_size}")
        _require(self.n_prompt_tokens >= 1, f"PeftConfig.n_prompt_tokens must be >= 1, got {self.n_prompt_tokens}")
        if self.layers is not None:
            _require(len(set(self.layers)) == len(self.layers), f"PeftConfig.layers has duplicates: {self.layers}")
            _require(list(self.layers) == sorted(self.layers), f"PeftConfig.layers must be increasing: {self.layers}")
        if model is None:
            return
        n = model.n_layer
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n]
            _require(not bad, f"PeftConfig.layers {bad} out of range for a model with {n} blocks (valid: 0..{n - 1})")
        if self.kind == "lora":
            width = min(model.n_embd, model.d_mlp)
            _require(
                self.lora_rank <= width,
                f"PeftConfig.lora_rank ({self.lora_rank}) is larger than the model width ({width})",
            )
        if self.kind == "prompt":
            _require(
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

    def replace(self, **changes) -> "PeftConfig":
        return dataclasses.replace(self, **changes)


CLIENT_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ALGORITHMS = ("fedavg", "fedprox", "scaffold")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "norm_bound")
LORA_AGGREGATIONS = ("mean", "exact")


@dataclass(frozen=True)
class FedConfig:
    """One federated tuning run: sampling, local training, aggregation, privacy, emulators.

    Emulators: every client trains on an `l-k-r` emulator with k from `emulator_levels`; which
    level each client holds is given per client (`ClientData`-side or by the controller). Each
    round has `level_slots[j]` client slots on level j (default: all `clients_per_round` slots on
    the first level), so a round pays for each client's own emulator, never the largest on all.
    """

    clients_per_round: int = 8
    rounds: int = 20
    local_steps: int = 4
    local_batch: int = 2
    client_optimizer: str = "adam"
    client_lr: float = 1e-3
    algorithm: str = "fedavg"
    prox_mu: float = 0.01
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    norm_bound: float = 1.0
    lora_aggregation: str = "mean"
    log_lora_gap: bool = True  # costs a dense product per client and target each round
    dp_clip: Optional[float] = None  # client-level DP-FedAvg when set
    dp_noise: float = 0.0  # noise multiplier sigma (std = sigma * dp_clip on the sum)
    dp_delta: float = 1e-6
    secure_aggregation: bool = False
    server_participation: bool = False
    server_batch: int = 2
    adapter_l: int = 2
    adapter_r: int = 2
    emulator_levels: tuple = (2,)  # k values (middle blocks kept) devices may hold
    level_slots: Optional[tuple] = None
    rounds_per_chunk: int = 5
    eval_batch: int = 16
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "emulator_levels", tuple(int(k) for k in self.emulator_levels))
        if self.level_slots is not None:
            object.__setattr__(self, "level_slots", tuple(int(s) for s in self.level_slots))
        self.validate()

    @property
    def slots(self) -> tuple:
        """Client slots per emulator level in each round."""
        if self.level_slots is not None:
            return self.level_slots
        return (self.clients_per_round,) + (0,) * (len(self.emulator_levels) - 1)

    def validate(self, n_clients: Optional[int] = None, model: Optional[GPT2Config] = None) -> None:
        """Check the config alone, and against the data (`n_clients`) and `model` when given."""
        for name in ("clients_per_round", "rounds", "local_steps", "local_batch", "rounds_per_chunk", "eval_batch"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"FedConfig.{name} must be an integer >= 1, got {value!r}")
        _require(self.client_optimizer in CLIENT_OPTIMIZERS, f"FedConfig.client_optimizer must be one of {CLIENT_OPTIMIZERS}, got {self.client_optimizer!r}")
        _require(self.server_optimizer in SERVER_OPTIMIZERS, f"FedConfig.server_optimizer must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
        _require(self.algorithm in ALGORITHMS, f"FedConfig.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        _require(self.aggregation in AGGREGATIONS, f"FedConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _require(self.lora_aggregation in LORA_AGGREGATIONS, f"FedConfig.lora_aggregation must be one of {LORA_AGGREGATIONS}, got {self.lora_aggregation!r}")
        _require(self.client_lr > 0, f"FedConfig.client_lr must be > 0, got {self.client_lr}")
        _require(self.server_lr > 0, f"FedConfig.server_lr must be > 0, got {self.server_lr}")
        _require(self.prox_mu >= 0, f"FedConfig.prox_mu must be >= 0, got {self.prox_mu}")
        _require(0 <= self.trim_fraction < 0.5, f"FedConfig.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        _require(self.norm_bound > 0, f"FedConfig.norm_bound must be > 0, got {self.norm_bound}")
        _require(self.dp_clip is None or self.dp_clip > 0, f"FedConfig.dp_clip must be None or > 0, got {self.dp_clip}")
        _require(self.dp_noise >= 0, f"FedConfig.dp_noise must be >= 0, got {self.dp_noise}")
        _require(self.dp_noise == 0 or self.dp_clip is not None, "FedConfig.dp_noise needs dp_clip (noise is scaled by the clipping norm)")
        _require(0 < self.dp_delta < 1, f"FedConfig.dp_delta must be in (0, 1), got {self.dp_delta}")
        _require(len(self.emulator_levels) >= 1, "FedConfig.emulator_levels must name at least one emulator size k")
        _require(len(set(self.emulator_levels)) == len(self.emulator_levels), f"FedConfig.emulator_levels has duplicates: {self.emulator_levels}")
        _require(all(k >= 0 for k in self.emulator_levels), f"FedConfig.emulator_levels must be >= 0, got {self.emulator_levels}")
        slots = self.slots
        _require(len(slots) == len(self.emulator_levels), f"FedConfig.level_slots {slots} must have one entry per emulator level {self.emulator_levels}")
        _require(all(s >= 0 for s in slots) and sum(slots) == self.clients_per_round,
                 f"FedConfig.level_slots {slots} must be >= 0 and sum to clients_per_round ({self.clients_per_round})")
        if n_clients is not None:
            _require(
                self.clients_per_round <= n_clients,
                f"FedConfig.clients_per_round ({self.clients_per_round}) is more than the {n_clients} clients that exist",
            )
        if model is not None:
            n_middle = model.n_layer - self.adapter_l - self.adapter_r
            _require(self.adapter_l >= 0 and self.adapter_r >= 0 and n_middle >= 1,
                     f"FedConfig adapter l={self.adapter_l}, r={self.adapter_r} leaves no middle in a {model.n_layer}-block model")
            too_big = [k for k in self.emulator_levels if k > n_middle]
            _require(not too_big, f"FedConfig.emulator_levels {too_big} larger than the model's middle ({n_middle} blocks)")

    def replace(self, **changes) -> "FedConfig":
        return dataclasses.replace(self, **changes)


def adapter_layers(n_layer: int, l: int = 2, r: int = 2) -> tuple:
    """Offsite tuning's adapter: the bottom `l` and top `r` blocks of an `n_layer` model."""
    _require(l >= 0 and r >= 0, f"adapter sizes must be >= 0, got l={l}, r={r}")
    _require(l + r < n_layer, f"adapter l={l} + r={r} leaves no middle in a model with {n_layer} blocks")
    return tuple(range(l)) + tuple(range(n_layer - r, n_layer))


__all__ = [
    "GPT2Config",
    "GPT2_PRESETS",
    "PeftConfig",
    "PEFT_KINDS",
    "LORA_TARGETS",
    "adapter_layers",
]
