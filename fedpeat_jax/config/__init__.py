"""Frozen, validated configuration dataclasses, and the base they all share.

Every config is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`) that
derives from `Config`: building one checks every field against its annotation (an `int` field
refuses "32", 4.0 and True; a `tuple[int, ...]` field refuses a scalar; lists from JSON become
tuples; ints are accepted where floats are expected) and then runs the class's `validate()`, so
an invalid config cannot exist. Errors are `ValueError`s that start with `Class.field`, which the
command line rewrites into the option the user typed (`--lora-rank (PeftConfig.lora_rank) ...`).

* :mod:`.base`  `Config`, `require`, type checks, field descriptions
* :mod:`.model` `GPT2Config` (+ `GPT2_PRESETS`), `PeftConfig`
* :mod:`.fed`   `FedConfig`, `adapter_layers`
"""

from fedpeat_jax.config.base import Config, check_types, docstring_entries, field_docs, field_sources, require
from fedpeat_jax.config.fed import (
    AGGREGATIONS,
    ALGORITHMS,
    CLIENT_OPTIMIZERS,
    LORA_AGGREGATIONS,
    SERVER_OPTIMIZERS,
    TRAINABLES,
    FedConfig,
    adapter_layers,
)
from fedpeat_jax.config.model import (
    ATTENTION_IMPLS,
    DTYPES,
    GPT2_PRESETS,
    LORA_TARGETS,
    PEFT_KINDS,
    GPT2Config,
    PeftConfig,
)

__all__ = [
    "AGGREGATIONS",
    "ALGORITHMS",
    "ATTENTION_IMPLS",
    "CLIENT_OPTIMIZERS",
    "Config",
    "DTYPES",
    "FedConfig",
    "GPT2Config",
    "GPT2_PRESETS",
    "LORA_AGGREGATIONS",
    "LORA_TARGETS",
    "PEFT_KINDS",
    "PeftConfig",
    "SERVER_OPTIMIZERS",
    "TRAINABLES",
    "adapter_layers",
    "check_types",
    "docstring_entries",
    "field_docs",
    "field_sources",
    "require",
]
