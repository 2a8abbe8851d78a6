"""Digests that name what a result was computed from.

`fingerprint` hashes settings (dataclasses, dicts, numbers): checkpoints, caches and tables store
it, so that resuming or reusing with other settings is refused instead of silently mixing runs.
`tree_digest` hashes the exact values of a pytree of arrays (weights, environment parameters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np


def _json_default(obj):
    """Dataclasses as dicts; anything else JSON cannot write as its str."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else str(obj)


def fingerprint(settings, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of `settings` written as sorted JSON."""
    blob = json.dumps(settings, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def tree_digest(tree) -> str:
    """sha256 of a pytree's paths and float32 values: which exact weights a result was measured on
    (a float16 copy and its float32 upcast give the same digest)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()
