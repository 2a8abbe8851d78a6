"""Spreading the client axis over devices (and hosts) with `jax.sharding`.

Clients are independent within a round, so the only layout needed is the client axis split over
a one-dimensional mesh named "clients": the frozen base and the global state are replicated,
every per-client array is sharded, and XLA inserts the all-reduce of the aggregation itself.
Beyond one host, call `initialize_distributed()` first on every process; the mesh then spans
all processes' devices and each process feeds its own clients.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "clients"


def client_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process).

    Auto axis types let the vmapped round mix sharded client arrays with replicated keys and
    parameters without explicit resharding (jax >= 0.8 defaults `make_mesh` to Explicit).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def client_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_clients(tree, mesh: Optional[Mesh]):
    """Inside jit: ask for the leading (client) axis of every leaf to be split over the mesh."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: client_sharding(mesh), tree))


def shard_clients(tree, mesh: Mesh):
    """Place arrays with a leading client axis on the mesh, split along that axis."""
    return jax.device_put(tree, client_sharding(mesh))


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
    """Join a multi-host run (a thin wrapper of `jax.distributed.initialize`; arguments may also
    come from the cluster environment, e.g. SLURM or TPU metadata)."""
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
