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


# ------------------------------------------------------------------------ multi-process runs


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 100,
    initialization_timeout: int = 300,
) -> None:
    """Join a multi-process run with JAX's own runtime (`jax.distributed.initialize`).

    `coordinator` "HOST:PORT" (process 0 serves there), `num_processes` and `process_id` are
    given together, or all None: then JAX detects them from the cluster's environment (SLURM,
    Open MPI, Kubernetes, Cloud TPU). On CPU the collectives go over gloo. A process that stops
    sending heartbeats for `heartbeat_timeout_seconds` makes the others fail instead of hang.
    Call it before anything else touches JAX's devices.

    **Arguments:**

    - `coordinator`: "HOST:PORT" of process 0 (None: detected from the cluster's environment).
    - `num_processes`: the number of processes (with `coordinator`).
    - `process_id`: this process's index (with `coordinator`).
    - `heartbeat_timeout_seconds`: how long a silent process may stay silent before the others fail.
    - `initialization_timeout`: seconds to wait for every process to join.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "coordinator, num_processes and process_id must be given together (or none, to "
            f"detect them from the cluster's environment), got coordinator={coordinator!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
        if not (isinstance(num_processes, int) and num_processes >= 1):
            raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
        if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
            raise ValueError(
                f"process_id must be an int in [0, num_processes={num_processes}), "
                f"got {process_id!r}"
            )
    # CPU collectives across processes (jax 0.10 defaults to gloo; set it explicitly).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout,
    )


def process_slice(num_items: int) -> tuple[int, int]:
    """This process's contiguous share [start, stop) of `num_items` (as np.array_split)."""
    return _slices(num_items)[jax.process_index()]


def distributed_bits_per_dim(model, sde, x_int, *, key, batch_size: int = 100, **options):
    """`bits_per_dim` over a data set, its batches split across the processes.

    Batch b (examples [b * batch_size, (b + 1) * batch_size)) uses the key `fold_in(key, b *
    batch_size)` whatever the number of processes, and each process solves a contiguous run of
    batches with no communication (the adaptive per-example solves are independent); one
    all-gather at the end returns every example's `BitsPerDimResult` fields, in order, on every
    process. With one process it is the plain batched loop.

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `x_int`: integer images [N, ...].
    - `key`: the PRNG key; batch b uses `fold_in(key, b * batch_size)`.
    - `batch_size`: images per call of `bits_per_dim`.
    - `options`: `bits_per_dim`'s options (`num_bins`, `data_range`, `trace`, `options=` or the
      solve keywords).
    """
    from ._likelihood import bits_per_dim

    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    x_int = np.asarray(x_int)
    if x_int.ndim < 1 or x_int.shape[0] < 1:
        raise ValueError(f"x_int must have a leading batch axis, got shape {x_int.shape}")
    n = int(x_int.shape[0])
    starts = list(range(0, n, batch_size))
    first, last = process_slice(len(starts))
    mine = [
        bits_per_dim(model, sde, x_int[s : s + batch_size], key=jax.random.fold_in(key, s),
                     **options)
        for s in starts[first:last]
    ]
    fields = ("bpd", "logp", "z", "nfe", "num_steps", "bpd_probes")
    if mine:
        local = {f: np.concatenate([np.asarray(getattr(r, f)) for r in mine]) for f in fields}
        exact = mine[0].exact_trace
    else:  # more processes than batches: this one holds no rows (shapes from a traced call)
        shaped = jax.eval_shape(
            lambda x: bits_per_dim(model, sde, x, key=key, **options), x_int[:1]
        )
        local = {f: np.zeros((0, *getattr(shaped, f).shape[1:]), getattr(shaped, f).dtype)
                 for f in fields}
        exact = shaped.exact_trace
    # Rows of a contiguous run of batches = a contiguous run of examples; gather by batches.
    rows = [min(s + batch_size, n) - s for s in starts]
    counts = [sum(rows[a:b]) for a, b in _slices(len(starts))]
    gathered = _gather_counts(local, counts)
    from ._results import BitsPerDimResult

    return BitsPerDimResult(**{f: jax.numpy.asarray(gathered[f]) for f in fields},
                            exact_trace=exact)


def _slices(num_items: int) -> list[tuple[int, int]]:
    p = jax.process_count()
    size, extra = divmod(num_items, p)
    return [(i * size + min(i, extra), (i + 1) * size + min(i + 1, extra)) for i in range(p)]


def _gather_counts(tree, counts: list[int]):
    """All processes' rows of `tree` in process order; process i holds `counts[i]` rows."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    size = max(max(counts), 1)

    def pad(x):
        x = np.asarray(x)
        out = np.zeros((size, *x.shape[1:]), x.dtype)
        out[: x.shape[0]] = x
        return out

    stacked = multihost_utils.process_allgather(jax.tree.map(pad, tree), tiled=False)
    return jax.tree.map(
        lambda s: np.concatenate([np.asarray(s)[i, :c] for i, c in enumerate(counts)]), stacked
    )
