"""Files and the host loop: atomic checkpoints, run logs, digests, machine records, plots.

* :mod:`.checkpoint`  ``CheckpointManager``: atomic orbax checkpoints, newest good one restored
* :mod:`.loop`        ``run_chunks`` / ``restore_latest``: the one host loop of every long job
* :mod:`.fingerprint` ``fingerprint`` (settings) and ``tree_digest`` (exact weights)
* :mod:`.logging`     ``RunLogger`` (TensorBoard + JSONL) and ``progress`` bars
* :mod:`.files`       ``file_lock``, ``write_json_atomic``, ``file_sha256``
* :mod:`.machine`     ``machine_info``, recorded with every result; :mod:`.plots` matplotlib setup
"""

from fedpeat_jax.io.checkpoint import CheckpointError, CheckpointManager
from fedpeat_jax.io.files import file_lock, file_sha256, write_json_atomic
from fedpeat_jax.io.fingerprint import fingerprint, tree_digest
from fedpeat_jax.io.logging import RunLogger, progress, read_metrics
from fedpeat_jax.io.loop import restore_latest, run_chunks
from fedpeat_jax.io.machine import machine_info

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "RunLogger",
    "file_lock",
    "file_sha256",
    "fingerprint",
    "machine_info",
    "progress",
    "read_metrics",
    "restore_latest",
    "run_chunks",
    "tree_digest",
    "write_json_atomic",
]
