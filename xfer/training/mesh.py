"""The data-parallel layout every program of a run shares: one `Mesh(('data',))` of every device.

Parameters and optimizer state are replicated (`P()`), batches split along
their first axis (`P('data')`); XLA inserts the gradient all-reduce, so the
same code runs on one CPU, 8 simulated devices, a GPU box or a pod slice. On
several hosts each process contributes its local block through `global_batch`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh() -> Mesh:
    """Every device along 'data', grouped by process in process order: `global_batch` then puts
    process p's block of the batch after those of processes < p, as xfer.data.pipeline expects."""
    return Mesh(np.asarray(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ("data",))


def replicate(tree, mesh: Mesh):
    """Puts a host or single-device pytree on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> one global array split over 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
