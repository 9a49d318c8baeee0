"""Data-parallel training over several devices (and hosts) with `jax.sharding`.

The parameters, optimiser state and EMA are replicated over a 1-d mesh with axis "data"; each
step's global batch is sharded on its leading axis, so every device computes the loss and
gradients of its slice and `jit` inserts the all-reduce that averages the gradients. Every
process holds the (in-memory) dataset and draws the same global batch indices from the shared
seed, and each device gathers only its own rows: the per-step host-to-device traffic is nil, and
the result equals single-device training up to the order of floating-point sums.

Multi-host: call `jax.distributed.initialize()` in every process before anything else touches
JAX, then train with `devices=jax.device_count()` (all devices of all processes). Process 0
writes the run directory; the others compute (see docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def _force_hint() -> str:
    return (
        "on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N (set before jax is "
        "imported) makes N devices"
    )


def select_devices(devices) -> list:
    """The devices to train on: `devices` an int N (the first N of `jax.devices()`) or a
    sequence of `jax.Device`s. Raises ValueError naming `devices` if they do not exist."""
    available = jax.devices()
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if n < 1:
            raise ValueError(f"devices must be a positive int or a list of devices, got {n}")
        if n > len(available):
            raise ValueError(
                f"devices={n} requested but only {len(available)} "
                f"{available[0].platform.upper()} device(s) exist "
                f"({', '.join(str(d) for d in available)}); {_force_hint()}"
            )
        chosen = list(available[:n])
    elif isinstance(devices, Sequence) and not isinstance(devices, str) and devices:
        chosen = list(devices)
        if not all(isinstance(d, jax.Device) for d in chosen):
            raise ValueError(f"devices must be an int or a list of jax.Device, got {devices!r}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"devices must not repeat a device, got {devices!r}")
        missing = [d for d in chosen if d not in available]
        if missing:
            raise ValueError(f"devices {missing} are not among jax.devices() = {available}")
    else:
        raise ValueError(f"devices must be a positive int or a list of jax.Device, got {devices!r}")
    if jax.process_count() > 1:
        procs = {d.process_index for d in chosen}
        if procs != set(range(jax.process_count())):
            raise ValueError(
                f"devices must span every process in a multi-host run (process_count="
                f"{jax.process_count()}); use devices=jax.device_count() = {len(available)}"
            )
    return chosen


def make_mesh(devices) -> Mesh:
    """A 1-d mesh with axis "data" over `devices` (see `select_devices`)."""
    return Mesh(np.asarray(select_devices(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch on its leading axis over the mesh (other axes replicated)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def put_global(tree, sharding: NamedSharding):
    """Place every array leaf of `tree` (identical on every process) with `sharding`.

    `jax.make_array_from_callback` builds a global array from each process's local data, so it
    also works when the mesh spans several processes.
    """

    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray)):
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch_size must be divisible by the number of devices ({n}) for data-parallel "
            f"training, got {batch_size}"
        )
