"""Atomic orbax checkpoints of arbitrary pytrees plus a small JSON metadata dict.

``CheckpointManager`` is a thin wrapper over :class:`orbax.checkpoint.CheckpointManager`:

* ``save(step, state, metadata)`` writes ``<dir>/<step>/{state,meta}``. Orbax writes into
  ``<dir>/<step>.orbax-checkpoint-tmp-<n>`` and renames it to ``<dir>/<step>`` only once every file
  is written (on a local/POSIX file system; on GCS/S3 a ``commit_success`` marker plays that role),
  so a process killed mid-write leaves at most a temporary directory, which ``all_steps`` /
  ``latest_step`` / ``restore`` never consider and which is deleted the next time a manager opens
  the directory.
* ``restore(step=None, target=like)`` returns the same tree structure, dtypes (incl. bfloat16),
  shardings and leaf kinds (jax arrays, numpy arrays, Python scalars) as ``target``.
* Typed PRNG keys (``jax.random.key``) are stored as their ``key_data`` with the implementation
  name recorded in the metadata, and come back as typed keys (``wrap_key_data``). Raw uint32
  keys (``jax.random.PRNGKey``) are ordinary arrays.
* ``max_to_keep=N`` keeps the last N checkpoints.

Errors: a missing directory, a missing step, and a corrupt/incomplete or target-mismatched
checkpoint raise :class:`FileNotFoundError` / :class:`CheckpointError` naming the path.

Unreadable newest checkpoints (a disk filled up, a file truncated by a copy): ``restore()`` and
``metadata()`` without a step use the newest checkpoint that reads, with a
:class:`CheckpointWarning` naming the ones skipped; nothing is deleted. When a run saves that
step number again, the unreadable directory is first renamed ``<step>.unreadable`` (kept for
inspection), so the run continues exactly as an uninterrupted one from the good checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PyTree = Any

_STATE = "state"
_META = "meta"
_KEYS_FIELD = "prng_keys"
_USER_FIELD = "user"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read back (corrupt, incomplete, or not like ``target``)."""


class CheckpointWarning(UserWarning):
    """The newest checkpoint could not be read and an older one is used."""


# --------------------------------------------------------------------------------------------------
# Typed PRNG keys <-> raw key data
# --------------------------------------------------------------------------------------------------


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _path_str(path) -> str:
    """Container-independent path: '/a/0/b' for dict keys, attributes and sequence indices alike,
    so paths match between a NamedTuple state and the plain containers of a target-less restore."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/" + "/".join(parts)


def _encode_keys(state: PyTree) -> tuple[PyTree, dict]:
    impls = {}

    def enc(path, x):
        if _is_typed_key(x):
            impls[_path_str(path)] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)
        return x

    return jax.tree_util.tree_map_with_path(enc, state), impls


def _abstract_target(target: PyTree) -> PyTree:
    """Target for orbax with typed-key leaves replaced by their key-data shape (uint32)."""

    def one(x):
        if _is_typed_key(x):
            return jax.eval_shape(jax.random.key_data, x)
        return x

    return jax.tree.map(one, target)


def _decode_keys(restored: PyTree, impls: dict, target: Optional[PyTree]) -> PyTree:
    if target is not None:

        def with_target(t, r):
            # A key dtype (key<fry>, key<rbg>, ...) names its implementation, for concrete and
            # abstract (ShapeDtypeStruct) targets alike.
            return jax.random.wrap_key_data(r, impl=t.dtype) if _is_typed_key(t) else r

        return jax.tree.map(with_target, target, restored)

    def without_target(path, r):
        impl = impls.get(_path_str(path))
        return jax.random.wrap_key_data(jnp.asarray(r), impl=impl) if impl else r

    return jax.tree_util.tree_map_with_path(without_target, restored)


# --------------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Step-indexed atomic checkpoints of ``(state pytree, JSON metadata)`` in one directory.

    >>> mgr = CheckpointManager("/tmp/run", max_to_keep=3)
    >>> mgr.save(10, {"params": params, "opt": opt_state, "key": key}, {"round": 10})
    >>> state = mgr.restore(target={"params": params, "opt": opt_state, "key": key})
    >>> meta = mgr.metadata()

    ``async_save=True`` lets ``save`` return while orbax writes in the background (still atomic);
    call ``wait_until_finished()`` (done automatically by ``restore``, ``close`` and the context
    manager) before relying on the files.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        max_to_keep: Optional[int] = None,
        async_save: bool = False,
        create: bool = True,
    ):
        if max_to_keep is not None and not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(f"max_to_keep must be None or a positive int, got {max_to_keep!r}")
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint path {self.directory} exists and is not a directory")
        if not self.directory.exists() and not create:
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=create,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))
        self._unreadable: set = set()  # steps that failed to restore while an older one restored
        # Close orbax's threads even when an error leaves the manager unclosed (else the
        # interpreter's shutdown prints pages of errors from them).
        self._finalizer = weakref.finalize(self, self._mgr.close)

    # ---------------------------------------------------------------------------------------- save
    def save(self, step: int, state: PyTree, metadata: Optional[dict] = None) -> None:
        """Atomically write ``state`` and the JSON-serializable ``metadata`` as checkpoint ``step``."""
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        metadata = {} if metadata is None else dict(metadata)
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"checkpoint metadata must be JSON-serializable: {e}") from e
        if step in self._unreadable:
            self._set_aside(step)
        if step in self.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {self.directory}")
        raw, impls = _encode_keys(state)
        meta = {_USER_FIELD: metadata, _KEYS_FIELD: impls}
        saved = self._mgr.save(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(raw), _META: ocp.args.JsonSave(meta)}),
            force=True,
        )
        if not saved:  # pragma: no cover - orbax only skips with save-interval policies we never set
            raise CheckpointError(f"orbax declined to save step {step} in {self.directory}")

    # ---------------------------------------------------------------------------------- inspection
    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending (temporary/unfinished directories excluded)."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        """Newest complete step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve(self, step: Optional[int]) -> int:
        self.wait_until_finished()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self._mgr.reload()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not found in {self.directory} (available steps: {steps})")
        return step

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _set_aside(self, step: int) -> Path:
        """Rename an unreadable step's directory to `<step>.unreadable[-n]` (kept, never deleted)."""
        target, n = self.directory / f"{step}.unreadable", 1
        while target.exists():
            target, n = self.directory / f"{step}.unreadable-{n}", n + 1
        self._step_dir(step).rename(target)
        self._unreadable.discard(step)
        self._mgr.reload()
        return target

    def _newest_readable(self, read):
        """`read(step)` of the newest step it succeeds on; the unreadable newer ones are reported
        (CheckpointWarning) and remembered. Raises CheckpointError if no step reads."""
        self._resolve(None)  # reloads; FileNotFoundError when there is no checkpoint at all
        steps, failed = self.all_steps(), []
        for step in reversed(steps):
            try:
                out = read(step)
            except CheckpointError as e:
                failed.append((step, e))
                continue
            for bad, err in failed:
                if bad in self._unreadable:
                    continue  # reported already
                self._unreadable.add(bad)
                warnings.warn(
                    f"checkpoint {self._step_dir(bad)} cannot be read ({str(err).splitlines()[0]}); using step {step}, "
                    f"the newest that can (the unreadable one is kept as {bad}.unreadable once the run passes it)",
                    CheckpointWarning,
                    stacklevel=3,
                )
            return out
        reasons = "; ".join(f"step {s}: {str(e).splitlines()[0]}" for s, e in failed)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be read ({reasons}); move the directory away to start over"
        )

    def _restore_meta(self, step: int) -> dict:
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
            meta = out[_META]
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise CheckpointError(
                f"checkpoint metadata at {self._step_dir(step) / _META} is missing or corrupt: {e}"
            ) from e
        if not isinstance(meta, dict) or _USER_FIELD not in meta:
            raise CheckpointError(f"checkpoint metadata at {self._step_dir(step) / _META} is not a fedpeat checkpoint")
        return meta

    # ------------------------------------------------------------------------------------- restore
    def metadata(self, step: Optional[int] = None) -> dict:
        """The user metadata dict saved with ``step`` (default: the newest readable one)."""
        if step is None:
            return self._newest_readable(self._restore_meta)[_USER_FIELD]
        return self._restore_meta(self._resolve(step))[_USER_FIELD]

    def restore(self, step: Optional[int] = None, target: Optional[PyTree] = None) -> PyTree:
        """Read checkpoint ``step`` (default: the newest readable one, see the module docstring).

        With ``target`` (a pytree of arrays, ``jax.ShapeDtypeStruct``s, numpy arrays or Python
        scalars, e.g. the freshly initialized state) the result has its structure, dtypes and
        shardings, and typed keys come back typed. Without ``target`` the result uses orbax's plain
        containers (dicts/lists), with typed keys still re-wrapped by path.
        """
        if step is None:
            return self._newest_readable(lambda s: self._restore_step(s, target))
        return self._restore_step(self._resolve(step), target)

    def _restore_step(self, step: int, target: Optional[PyTree]) -> PyTree:
        meta = self._restore_meta(step)
        restore_args = ocp.args.StandardRestore(None if target is None else _abstract_target(target))
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**{_STATE: restore_args}))
            raw = out[_STATE]
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise CheckpointError(
                f"failed to restore checkpoint {self._step_dir(step) / _STATE} (corrupt, incomplete, or "
                f"not matching `target`): {type(e).__name__}: {e}"
            ) from e
        return _decode_keys(raw, meta.get(_KEYS_FIELD, {}), target)

    # ------------------------------------------------------------------------------------ lifetime
    def wait_until_finished(self) -> None:
        """Block until a pending asynchronous save is fully committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._finalizer()  # closes orbax's manager once

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CheckpointError", "CheckpointWarning", "CheckpointManager"]
