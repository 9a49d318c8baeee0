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

import errno
import itertools
import json
import socket
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._program_store import stored_jit
from ._validate import example_keys, holds_example_keys

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
    initialization_timeout: int = 100,
) -> None:
    """Join a multi-process run with JAX's own runtime (`jax.distributed.initialize`).

    **Arguments:**

    - `coordinator`: "HOST:PORT" where process 0 serves the run's coordination service.
    - `num_processes`: the number of processes in the run.
    - `process_id`: this process's index in [0, num_processes).
    - `heartbeat_timeout_seconds`: a process silent for this long (dead or hung) makes the
      others stop instead of waiting forever in a collective.
    - `initialization_timeout`: every process must have joined within this many seconds.

    `coordinator`, `num_processes` and `process_id` are given together, or all None: then JAX
    detects them from the cluster's environment (SLURM, Open MPI, Kubernetes, Cloud TPU). On CPU
    the collectives go over gloo. Process 0 first checks that the coordinator's port is free
    (ValueError naming `coordinator` if not). Call it before anything else touches JAX's
    devices. JAX's runtime ends the process with SIGABRT when a peer is missing or dies; the
    `probflow` command line supervises its processes to turn that into one line
    (docs/scaling.md).
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "coordinator, num_processes and process_id must be given together (or none, to "
            f"detect them from the cluster's environment), got coordinator={coordinator!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    for name, value in (("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                        ("initialization_timeout", initialization_timeout)):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                and value >= 1):
            raise ValueError(f"{name} must be an int >= 1 (seconds), got {value!r}")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
        if not (isinstance(num_processes, int) and num_processes >= 1):
            raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
        if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
            raise ValueError(
                f"process_id must be an int in [0, num_processes={num_processes}), "
                f"got {process_id!r}"
            )
        if process_id == 0:
            _check_port_free(coordinator, int(port))
    # CPU collectives across processes (jax 0.10 defaults to gloo; set it explicitly).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
            initialization_timeout=int(initialization_timeout),
        )
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot join the run at coordinator {coordinator!r}: {first}") from None


def _check_port_free(coordinator: str, port: int) -> None:
    """Process 0 serves on [::]:port; refuse at once if something already listens there (JAX's
    own error comes only after the others' start-up timeout). gRPC binds with SO_REUSEPORT,
    so a plain bind is what detects a second coordinator on the same port."""
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("", port))):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(
                        f"coordinator {coordinator!r}: port {port} is already in use on this "
                        "host (another run's coordinator, or a second process given process "
                        "id 0?); choose a free port"
                    ) from None
                continue
            return


def check_processes_agree(settings: dict, *, timeout_seconds: int = 120) -> None:
    """Every process of a multi-process run was given the same `settings` (a JSON-able dict of
    what determines the work: options, file digests); raises ValueError naming the first
    difference (in sorted key order, against process 0) on every process if not.

    The settings go through the coordination service's key-value store; a barrier after every
    process has read them all means that each one reaches the same verdict and none leaves
    while another still reads. Nothing to do in a single-process run.
    """
    n = jax.process_count()
    if n == 1:
        return
    client = _client()
    me = jax.process_index()
    ms = int(timeout_seconds * 1000)
    client.key_value_set(f"probflow/settings/{me}", json.dumps(settings, sort_keys=True,
                                                               default=repr))
    everyone = []
    for i in range(n):
        try:
            everyone.append(json.loads(client.blocking_key_value_get(f"probflow/settings/{i}",
                                                                     ms)))
        except jax.errors.JaxRuntimeError:
            raise RuntimeError(
                f"process {i} did not report its settings within {timeout_seconds} s"
            ) from None
    client.wait_at_barrier("probflow/settings-read", ms)
    first = everyone[0]
    for i, other in enumerate(everyone[1:], start=1):
        for name in sorted(set(first) | set(other)):
            if first.get(name) != other.get(name):
                raise ValueError(
                    f"the processes disagree about the run: {name} is {first.get(name)!r} in "
                    f"process 0 but {other.get(name)!r} in process {i}; give every process "
                    "the same options and files"
                )


def process_slice(num_items: int) -> tuple[int, int]:
    """This process's contiguous share [start, stop) of `num_items` (as np.array_split)."""
    return _slices(num_items)[jax.process_index()]


@stored_jit
def image_keys(key, indices):
    """The keys of a data set's images `indices` (an int array): image i draws from
    `fold_in(key, i)`."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def distributed_bits_per_dim(model, sde, x_int, *, key, batch_size: int = 100, **options):
    """`bits_per_dim` over a data set, its batches split across the processes.

    Example i draws its dequantization noise and probes from its own key, `fold_in(key, i)`
    (`image_keys`) or `key[i]` when `key` holds one key per example, so its draws do not depend
    on the batch size or the number of processes.
    Each process solves a contiguous run of batches (examples [b * batch_size, (b + 1) *
    batch_size)) with no communication (the adaptive per-example solves are independent); one
    all-gather at the end returns every example's `BitsPerDimResult` fields, in order, on every
    process. With one process it is the plain batched loop.

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `x_int`: integer images [N, ...].
    - `key`: the PRNG key (example i draws from `fold_in(key, i)`), or one key per example
      (shape [N]).
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
    keys = (example_keys(key, n) if holds_example_keys(key)
            else image_keys(key, np.arange(n, dtype=np.int32)))
    mine = [
        bits_per_dim(model, sde, x_int[s : s + batch_size], key=keys[s : s + batch_size],
                     **options)
        for s in starts[first:last]
    ]
    fields = ("bpd", "logp", "z", "nfe", "num_steps", "bpd_probes", "log_weights")
    if mine:
        fields = tuple(f for f in fields if getattr(mine[0], f) is not None)  # z: None for ELBO
        local = {f: np.concatenate([np.asarray(getattr(r, f)) for r in mine]) for f in fields}
        exact = mine[0].exact_trace
    else:
        # More processes than batches: this one holds no rows. The fields' shapes come from the
        # first example solved here (bits_per_dim checks its input on the host and raises on
        # failures, so it cannot be traced abstractly); it costs one example's solve.
        shaped = bits_per_dim(model, sde, x_int[:1], key=keys[:1], **options)
        fields = tuple(f for f in fields if getattr(shaped, f) is not None)
        local = {f: np.zeros((0, *getattr(shaped, f).shape[1:]), getattr(shaped, f).dtype)
                 for f in fields}
        exact = shaped.exact_trace
    # Rows of a contiguous run of batches = a contiguous run of examples; gather by batches.
    rows = [min(s + batch_size, n) - s for s in starts]
    counts = [sum(rows[a:b]) for a, b in _slices(len(starts))]
    gathered = _gather_counts(local, counts)
    from ._results import BitsPerDimResult

    fields_out = {"z": None, **{f: jax.numpy.asarray(gathered[f]) for f in fields}}
    return BitsPerDimResult(**fields_out, exact_trace=exact)


#: How long `wait_for_all` waits (a dead peer ends the wait sooner, through its heartbeat).
_WAIT_MS = 24 * 3600 * 1000
_barriers = itertools.count()


def wait_for_all(name: str) -> None:
    """Wait until every process of a multi-process run reaches this point.

    A collective's gloo set-up gives up after 30 s, so a process that reaches a collective long
    before the others (less work, or process 0 writing a checkpoint) would fail; a barrier of
    the coordination service waits as long as the work takes, and a peer that dies ends it
    through the heartbeat. Nothing to do in a single-process run.
    """
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(f"probflow/{name}/{next(_barriers)}", _WAIT_MS)


def _client():
    """JAX's coordination-service client of this multi-process run."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("not in a multi-process run: call initialize_distributed first")
    return client


def _slices(num_items: int) -> list[tuple[int, int]]:
    p = jax.process_count()
    size, extra = divmod(num_items, p)
    return [(i * size + min(i, extra), (i + 1) * size + min(i + 1, extra)) for i in range(p)]


def _gather_counts(tree, counts: list[int]):
    """All processes' rows of `tree` in process order; process i holds `counts[i]` rows."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    wait_for_all("gather")  # the shares may take very different times (see wait_for_all)

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
