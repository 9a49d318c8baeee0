"""The process options of `probflow train` and `probflow bpd`: joining a multi-process run and
checking, before any work, that every process was given the same run.

`add_process_options` adds --coordinator/--num-processes/--process-id (or --distributed),
--init-timeout and --heartbeat-timeout; `init_processes` joins the run (`_supervise` runs it in a
supervised child, so that JAX's aborts become one line) and compares `run_settings` across the
processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import _signals
from ._common import CLIError, positive_int

#: Options that may differ between the processes of one run (they do not change the work).
_PER_PROCESS = frozenset({"process_id", "coordinator", "distributed", "no_progress", "json",
                          "no_compile_cache", "heartbeat_timeout", "init_timeout"})

#: The start-up timeout's default (seconds): the others wait this long for a missing process.
INIT_TIMEOUT = 100


def add_process_options(p) -> None:
    """--coordinator/--num-processes/--process-id (or --distributed): a multi-process run."""
    g = p.add_argument_group("processes (multi-host runs, jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address; with --num-processes and --process-id (default: "
                        "a single process)")
    g.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                   help="processes in the run, one per host (default: 1)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's index in [0, N) (default: 0 of 1)")
    g.add_argument("--distributed", action="store_true",
                   help="detect the processes from the cluster's environment (SLURM, Open MPI, "
                        "Kubernetes) and join them")
    g.add_argument("--init-timeout", type=positive_int, default=INIT_TIMEOUT, metavar="S",
                   help="fail when not every process has joined within S seconds")
    g.add_argument("--heartbeat-timeout", type=positive_int, default=100, metavar="S",
                   help="fail (instead of hanging) when a process is silent for S seconds")


def is_multiprocess(args) -> bool:
    """The command line asks for a multi-process run."""
    explicit = (getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                getattr(args, "process_id", None))
    return bool(getattr(args, "distributed", False)) or any(v is not None for v in explicit)


def init_processes(args) -> None:
    """Join the multi-process run the options describe and check that every process was given
    the same run (nothing for a single process)."""
    if not is_multiprocess(args):
        return
    from .._distributed import check_processes_agree, initialize_distributed

    explicit = (args.coordinator, args.num_processes, args.process_id)
    try:
        initialize_distributed(*explicit, heartbeat_timeout_seconds=args.heartbeat_timeout,
                               initialization_timeout=args.init_timeout)
    except ValueError as e:
        raise CLIError(f"--coordinator/--num-processes/--process-id: {e}") from None
    except RuntimeError as e:
        raise CLIError(str(e)) from None
    _signals.reinstall()  # JAX's runtime has just installed its own SIGTERM handler
    try:
        check_processes_agree(run_settings(args), timeout_seconds=args.init_timeout)
    except (ValueError, RuntimeError) as e:
        import jax

        # Every process reached the same verdict at the same point: leave together, so that
        # process 0's coordination service is not gone while another still talks to it.
        jax.distributed.shutdown()
        raise CLIError(f"refusing to start: {e}") from None


def run_settings(args) -> dict:
    """What every process of a run must agree on: the parsed options (less those in
    `_PER_PROCESS`), the versions of probflow and JAX, and the sha256 of every input file."""
    import jax

    import probflow

    settings: dict = {"probflow version": getattr(probflow, "__version__", None),
                      "jax version": jax.__version__}
    for name, value in vars(args).items():
        if name in _PER_PROCESS or name.startswith("_") or callable(value):
            continue
        settings["--" + name.replace("_", "-")] = value
    for flag, path in _input_files(args):
        settings[f"sha256 of {flag} {path}"] = _sha256(path)
    return settings


def _input_files(args) -> list[tuple[str, Path]]:
    """The files a run reads: the checkpoint (a file, a run directory's checkpoint or a shipped
    model's), a JSON --config, npz data and, for a resumed training run, its checkpoint."""
    from .._pretrained import PRETRAINED_NAMES, pretrained_path

    files = []
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None:
        p = Path(checkpoint)
        if checkpoint in PRETRAINED_NAMES and not p.exists():
            files.append(("--checkpoint", pretrained_path(checkpoint)))
        elif p.is_dir():
            files.append(("--checkpoint", p / "checkpoint.eqx"))
        else:
            files.append(("--checkpoint", p))
    config = getattr(args, "config", None)
    if isinstance(config, str) and config.endswith(".json"):
        files.append(("--config", Path(config)))
    data = getattr(args, "data", None)
    if isinstance(data, str) and data.startswith("npz:"):
        files.append(("--data", Path(data[len("npz:"):])))
    if getattr(args, "resume", False) and getattr(args, "out", None) is not None:
        files.append(("--out", Path(args.out) / "checkpoint.eqx"))
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    return h.hexdigest()
