"""Frozen, validated configuration dataclasses, and the base they all share.

Every config is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`) that
derives from `Config`: building one checks every field against its annotation (an `int` field
refuses "32", 4.0 and True; a `tuple[int, ...]` field refuses a scalar; lists from JSON become
tuples; ints are accepted where floats are expected) and then runs the class's `validate()`, so
an invalid config cannot exist. Errors are `ValueError`s that start with `Class.field`, which the
command line rewrites into the option the user typed (`--lora-rank (PeftConfig.lora_rank) ...`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import numbers
import re
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("einsum", "dot_product")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


require = _require  # public name for config classes outside this module


# --------------------------------------------------------------------------------------------
# Field types, checked from the annotations
# --------------------------------------------------------------------------------------------
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _what(value) -> str:
    """'4.0 (a float)', "'32' (a string)", 'True (a bool)' for error messages."""
    word = {bool: "a bool", int: "an integer", float: "a float", str: "a string", list: "a list", tuple: "a tuple",
            dict: "a JSON object", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({word})"


def _describe(hint) -> str:
    """Words for an annotation: 'an integer', 'a tuple of integers', 'null or a number'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _KIND_WORDS:
        return _KIND_WORDS[hint]
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return "null or " + " or ".join(_describe(a) for a in rest)
    if hint is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        if args:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return "a list"
    return f"a {getattr(hint, '__name__', hint)}"


class _Mismatch(Exception):
    pass


def _coerce(value, hint):
    """`value` as the annotation `hint` wants it (int -> float, list -> tuple, numpy scalars -> Python),
    or _Mismatch. Annotations this does not understand (Any, arrays, callables) pass unchecked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _Mismatch
    if isinstance(value, (bool, np.bool_)) and hint in (int, float):
        raise _Mismatch  # True is an int to Python, never to a config
    if hint is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, numbers.Real):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_types(config) -> None:
    """Check (and normalize in place) every field of the frozen dataclass `config` against its
    annotation; the error names `Class.field`, the expected type and what was given."""
    cls = type(config)
    hints = _hints(cls)
    for f in dataclasses.fields(config):
        hint = hints.get(f.name)
        if hint is None:
            continue
        value = getattr(config, f.name)
        try:
            new = _coerce(value, hint)
        except _Mismatch:
            raise ValueError(f"{cls.__name__}.{f.name} must be {_describe(hint)}, got {_what(value)}") from None
        if new is not value:
            object.__setattr__(config, f.name, new)


class Config:
    """Base of every config dataclass: type checks from the annotations, then `validate()`.

    Subclasses are `@dataclass(frozen=True)` and put their range and consistency checks in
    `validate()` (which may take extra arguments with defaults, e.g. the model to check against).
    """

    def __post_init__(self):
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks; the types are already right when this runs."""

    def replace(self, **changes):
        """A copy with `changes` applied (checked like a new config)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Field descriptions, read from the source (for `fedpeat COMMAND --help` and docs/config.md)
# --------------------------------------------------------------------------------------------
def docstring_entries(doc: str) -> dict:
    """``name: text`` entries of a docstring (continuation lines indented deeper)."""
    entries, current = {}, None
    for line in inspect.cleandoc(doc or "").splitlines():
        m = re.match(r"^(\w+(?:\s*/\s*\w+)*)\s*:\s+(\S.*)$", line)
        if m and not line.startswith(" "):
            current = [n.strip() for n in m.group(1).split("/")]
            for n in current:
                entries[n] = m.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            for n in current:
                entries[n] += " " + line.strip()
        else:
            current = None
    return entries


@functools.lru_cache(maxsize=None)
def field_sources(cls) -> dict:
    """{field: {"doc", "default_src", "annotation", "section"}} of a dataclass, from its source.

    A field's description ("doc") is the string literal right below it (an attribute docstring),
    else its ``# comment`` (on its line, or the comment block just above), else its ``name: text``
    entry in the class docstring. A one-line comment of fewer than 60 characters without a final
    full stop above a field is a section label ("section") for the fields below it.
    """
    path = inspect.getsourcefile(cls)
    source = Path(path).read_text()
    node = next((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None)
    if node is None:
        return {}
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), lines[tok.start[0] - 1].strip().startswith("#"))
    entries = docstring_entries(ast.get_docstring(node) or "")
    out, section = {}, None
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        inline = [comments[r][0] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments and not comments[r][1]]
        above, row = [], stmt.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        if len(above) == 1 and len(above[0]) < 60 and not above[0].endswith("."):
            section, above = above[0], []
        after = body[i + 1] if i + 1 < len(body) else None
        docstring = None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docstring = inspect.cleandoc(after.value.value).replace("\n", " ")
        doc = docstring or " ".join(above + inline).strip() or entries.get(name, "")
        out[name] = {"doc": doc, "section": section, "annotation": ast.get_source_segment(source, stmt.annotation),
                     "default_src": ast.get_source_segment(source, stmt.value) if stmt.value is not None else None}
    return out


def field_docs(cls) -> dict:
    """{field: description} of a config class (see `field_sources`)."""
    return {name: s["doc"] for name, s in field_sources(cls).items()}


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


CLIENT_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "local")
TRAINABLES = ("adapter", "all_blocks", "model")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "norm_bound")
LORA_AGGREGATIONS = ("mean", "exact")


@dataclass(frozen=True)
class FedConfig(Config):
    """One federated tuning run: sampling, local training, aggregation, privacy, emulators.

    What devices train (`trainable`): "adapter" (FedPEAT: the PEFT module in the adapter blocks,
    tuned on an emulator), "all_blocks" (the PEFT module in every block, tuned on the full model,
    e.g. FedIT's LoRA) or "model" (every weight: full fine-tuning on the full model). The last two
    need the device to hold the whole model: `emulator_levels` is then the whole middle.
    `algorithm="local"` is local-only tuning: every client keeps and continues its own tree and
    nothing is aggregated.

    Emulators: every client trains on an `l-k-r` emulator with k from `emulator_levels`; which
    level each client holds is given per client (`ClientData`-side or by the controller). Each
    round has `level_slots[j]` client slots on level j (default: all `clients_per_round` slots on
    the first level), so a round pays for each client's own emulator, never the largest on all.

    Memory: a round trains its clients `client_chunk` at a time (vmapped inside a chunk, a scan
    over chunks, aggregation streamed through the scan), so its memory is flat in
    `clients_per_round`. None picks the chunk: at most `DEFAULT_CLIENT_CHUNK`, fewer when the
    compiled round would not fit in `memory_budget_gb` (None: most of the device's memory).
    """

    clients_per_round: int = 8
    """Clients sampled per round (distinct; split over emulator levels by level_slots)."""
    rounds: int = 20
    """Total rounds of `driver.train` (and `fedpeat tune`)."""
    local_steps: int = 4
    """Optimizer steps each client runs per round (one `lax.scan`)."""
    local_batch: int = 2
    """Windows per local step."""
    client_optimizer: str = "adam"
    """Local optimizer (a fresh optimizer state every round)."""
    client_lr: float = 1e-3
    """Local learning rate (traced: `Hyper.client_lr`)."""
    algorithm: str = "fedavg"
    """'fedprox' adds (prox_mu / 2) ||w - w_global||^2 to the local loss; 'scaffold' needs client_optimizer 'sgd'."""
    prox_mu: float = 0.01
    """FedProx proximal weight (traced: `Hyper.prox_mu`)."""
    server_optimizer: str = "fedavg"
    """FedOpt server optimizer on the pseudo-gradient -mean(delta) (`aggregate.server_optimizer`)."""
    server_lr: float = 1.0
    """Server learning rate; 1.0 with 'fedavg' is plain FedAvg (traced: `Hyper.server_lr`)."""
    aggregation: str = "mean"
    """Robust aggregation rule of the client deltas."""
    trim_fraction: float = 0.1
    """Fraction trimmed at each end by 'trimmed_mean'."""
    norm_bound: float = 1.0
    """L2 bound on each client delta for 'norm_bound'."""
    lora_aggregation: str = "mean"
    """'exact' (FLoRA) merges the exact mean of the LoRA products into the adapter kernels; LoRA only, FedAvg mean, no
    DP, no SCAFFOLD."""
    log_lora_gap: bool = True  # costs a dense product per client and target each round
    dp_clip: Optional[float] = None  # client-level DP-FedAvg when set
    dp_noise: float = 0.0  # noise multiplier sigma (std = sigma * dp_clip on the sum)
    dp_delta: float = 1e-6
    """Target delta of the reported epsilon (`privacy.dp_epsilon`)."""
    secure_aggregation: bool = False
    """Simulate pairwise-mask secure aggregation of the weighted deltas (mean aggregation only)."""
    server_participation: bool = False
    """The server tunes the same PEFT state on its own data with the full model and joins the aggregate as one more
    client."""
    server_batch: int = 2
    """The server's local batch (windows per step)."""
    adapter_l: int = 2
    """Bottom adapter blocks l."""
    adapter_r: int = 2
    """Top adapter blocks r."""
    emulator_levels: tuple[int, ...] = (2,)  # k values (middle blocks kept) devices may hold
    level_slots: Optional[tuple[int, ...]] = None
    """Client slots per emulator level in each round; None puts all clients_per_round slots on the first level."""
    trainable: str = "adapter"
    """What devices train: 'adapter' (FedPEAT: the PEFT module in the adapter blocks, on emulators), 'all_blocks' (the PEFT
    module in every block, on the full model) or 'model' (every weight: full fine-tuning); the last two need emulator_levels
    to be the whole middle."""
    client_chunk: Optional[int] = None
    """Clients trained at once (vmapped) inside a round; a scan runs the chunks and streams the aggregate, so memory is flat
    in clients_per_round. None: the default chunk, halved until the compiled round fits memory_budget_gb."""
    memory_budget_gb: Optional[float] = None
    """Memory a compiled round may use; None: 90% of an accelerator's memory, or half of the host's available memory."""
    rounds_per_chunk: int = 5
    """Rounds per jitted `lax.scan` call; the host evaluates, logs and checkpoints between chunks."""
    eval_batch: int = 16
    """Windows per batch of the held-out evaluation."""
    seed: int = 0
    """Run seed: every draw derives from (seed, round), which makes resume exact."""

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
        _require(self.trainable in TRAINABLES, f"FedConfig.trainable must be one of {TRAINABLES}, got {self.trainable!r}")
        _require(self.client_chunk is None or (isinstance(self.client_chunk, int) and self.client_chunk >= 1),
                 f"FedConfig.client_chunk must be None or an integer >= 1, got {self.client_chunk!r}")
        _require(self.memory_budget_gb is None or self.memory_budget_gb > 0,
                 f"FedConfig.memory_budget_gb must be None or > 0, got {self.memory_budget_gb!r}")
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
        self._check_combinations()
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
            if self.trainable != "adapter":
                _require(self.emulator_levels == (n_middle,),
                         f"FedConfig.trainable={self.trainable!r} trains on the full model: set FedConfig.emulator_levels to the "
                         f"whole middle ({n_middle},), got {self.emulator_levels}")

    def _check_combinations(self) -> None:
        """Options that do not combine, refused before anything is traced."""
        if self.lora_aggregation == "exact":
            _require(self.trainable != "model", "FedConfig.lora_aggregation='exact' needs a LoRA module, not FedConfig.trainable='model'")
            _require(self.server_optimizer == "fedavg" and self.aggregation == "mean" and self.dp_clip is None
                     and self.algorithm in ("fedavg", "fedprox"),
                     "FedConfig.lora_aggregation='exact' (FLoRA) combines only with server_optimizer='fedavg', "
                     "aggregation='mean', no DP, and algorithm 'fedavg' or 'fedprox'")
        if self.algorithm == "scaffold":
            _require(self.client_optimizer == "sgd", "FedConfig.algorithm='scaffold' assumes plain SGD: set FedConfig.client_optimizer='sgd'")
            _require(not self.server_participation, "FedConfig.algorithm='scaffold' keeps no control variate for the server: "
                     "set FedConfig.server_participation=False")
        if self.algorithm == "local":
            _require(not (self.server_participation or self.secure_aggregation or self.dp_clip is not None
                          or self.lora_aggregation == "exact" or self.aggregation != "mean" or self.server_optimizer != "fedavg"),
                     "FedConfig.algorithm='local' aggregates nothing: server_participation, secure_aggregation, dp_clip, "
                     "lora_aggregation='exact', robust aggregation and server optimizers do not apply")
        _require(not (self.secure_aggregation and (self.dp_clip is not None or self.aggregation != "mean")),
                 "FedConfig.secure_aggregation sums weighted uploads: it combines only with aggregation='mean' and no dp_clip")


def adapter_layers(n_layer: int, l: int = 2, r: int = 2) -> tuple:
    """Offsite tuning's adapter: the bottom `l` and top `r` blocks of an `n_layer` model."""
    _require(l >= 0 and r >= 0, f"adapter sizes must be >= 0, got l={l}, r={r}")
    _require(l + r < n_layer, f"adapter l={l} + r={r} leaves no middle in a model with {n_layer} blocks")
    return tuple(range(l)) + tuple(range(n_layer - r, n_layer))


__all__ = [
    "Config",
    "check_types",
    "require",
    "field_docs",
    "field_sources",
    "docstring_entries",
    "GPT2Config",
    "GPT2_PRESETS",
    "PeftConfig",
    "FedConfig",
    "PEFT_KINDS",
    "LORA_TARGETS",
    "adapter_layers",
    "FedConfig",
    "ALGORITHMS",
    "TRAINABLES",
]
