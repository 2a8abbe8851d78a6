"""Spreading the client axis over devices, and over processes, with `jax.sharding`.

Clients are independent within a round, so the only layout needed is the client axis split over
a one-dimensional mesh named "clients": the frozen weights and the server state are replicated,
each chunk's per-client arrays are sharded, and XLA inserts the reductions of the streamed
aggregate itself. The client data is sharded too, so each device holds only its share.

Beyond one process (several hosts, or several processes on one machine), every process calls
`initialize_distributed()` before any computation; the mesh from `client_mesh()` then spans all
processes' devices, each process passes only its own clients' data
(`fed.data.from_process_local`), and the jitted round runs as one program over all of them.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "clients"


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_cpu_devices: Optional[int] = None,
) -> None:
    """Join a run spanning processes (`jax.distributed.initialize`). With no arguments JAX detects
    the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes...); on one machine give the coordinator
    ("127.0.0.1:PORT"), the process count and this process's id. On CPUs, `local_cpu_devices`
    splits each process's CPU into that many devices, and collectives go through gloo."""
    if local_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_cpu_devices))
    if jax.config.jax_platforms in (None, "", "cpu") or local_cpu_devices is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def barrier(name: str, timeout_s: float = 900.0) -> None:
    """Wait until every process reaches `name` (no-op in one process). Processes compile at
    different speeds, and gloo gives up setting up a collective when a peer is 30 s late: meet
    here, through the coordination service, before running a freshly compiled program."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination-service client; JAX's own multihost code uses it too

    distributed.global_state.client.wait_at_barrier(f"fedpeat:{name}", timeout_in_ms=int(timeout_s * 1000))


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
    """Place arrays with a leading client axis on the mesh, split along that axis (one process;
    see `fed.data.from_process_local` for several)."""
    return jax.device_put(tree, client_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """The same values on every device of the mesh, also when it spans processes (every process
    passes the same host values, e.g. the frozen weights each one loaded)."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)
