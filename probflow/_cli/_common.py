"""Helpers shared by the `probflow` subcommands.

Argument types, the one table format, JSON and PNG outputs, the persistent compilation cache, and
the one place where `--checkpoint` becomes a model (`load_model`). Nothing here imports a command
module; the command modules import this one; `_main` imports the command modules.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """A user's mistake on the command line: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    """One subcommand: its name, one-line help, description, options and runner."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def unit_float(text: str) -> float:
    """A number in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def _number_list(text: str, cast, ok, what: str) -> tuple:
    """Comma-separated numbers ("" for none), each `cast` and passing `ok`."""
    try:
        vals = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = None
    if vals is None or not all(ok(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return vals


def positive_floats(text: str) -> tuple[float, ...]:
    """Comma-separated positive numbers ("" for none)."""
    return _number_list(text, float, lambda v: math.isfinite(v) and v > 0, "positive numbers")


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers ("" for none)."""
    return _number_list(text, int, lambda v: v >= 1, "integers >= 1")


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names, lower-cased."""
    return tuple(v.strip().lower() for v in text.split(",") if v.strip())


# --------------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table of list rows under `headers`, in the one table format that probflow
    prints (`probflow._curves.format_rows`: floats to 4 significant digits, None as '-')."""
    from .._curves import format_rows

    return format_rows([dict(zip(headers, row, strict=True)) for row in rows], headers)


def format_rows(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The same table of dict rows (e.g. those of `pf.nfe_curve`) with the given columns."""
    from .._curves import format_rows as format_dict_rows

    return format_dict_rows(list(rows), list(columns))


def write_json(path: str | None, payload: dict, flag: str = "--json") -> None:
    if path is None:
        return
    with writing(flag, path):
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def writing(flag: str, path):
    """Writes of an output that `out_path` checked: a failure that only shows while writing (a
    full disk) is one line naming the option, not a traceback."""
    try:
        yield
    except OSError as e:
        raise CLIError(f"{flag}: cannot write {str(path)!r} ({e.strerror or e})") from None


def out_path(path: str | None, suffix: str | None, flag: str = "--out", *,
             folder: bool = False, create: bool = True) -> Path | None:
    """THE check of an output path, done by every subcommand before its work starts, so that a
    long run never fails (and loses its results) at its last step.

    A file (`folder=False`): ends in `suffix` (None: any name), is not a directory, and its
    directory exists or is created, and takes a new file (a probe file is created and removed
    there, which also catches read-only file systems and /proc, where `os.access` says yes to
    root); an existing file must open for appending. A folder: not an existing file, created
    when `create` (else the nearest existing parent must take a new file). Raises `CLIError`
    (one line naming `flag`).
    """
    if path is None:
        return None
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            raise CLIError(f"{flag}: {path!r} exists and is not a folder")
        if create:
            _make_dirs(p, flag, path)
        _probe(p if p.is_dir() else _existing_parent(p, flag, path), flag, path)
        return p
    if p.is_dir():
        raise CLIError(f"{flag}: {path!r} is a directory; expected a file name"
                       + (f" ending in {suffix}" if suffix else ""))
    if suffix is not None and p.suffix.lower() != suffix:
        raise CLIError(f"{flag}: expected a {suffix} file name, got {path!r}")
    parent = p.parent if str(p.parent) else Path(".")
    _make_dirs(parent, flag, path)
    if p.exists():
        try:
            with open(p, "ab"):
                pass
        except OSError as e:
            raise CLIError(f"{flag}: cannot write {path!r} ({e.strerror or e})") from None
    else:
        _probe(parent, flag, path)
    return p


def _existing_parent(p: Path, flag: str, path) -> Path:
    q = p.absolute()
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise CLIError(f"{flag}: cannot create {path!r}: {str(q)!r} is a file, not a folder")
    return q


def _make_dirs(d: Path, flag: str, path) -> None:
    _existing_parent(d, flag, path)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(
            f"{flag}: cannot create the folder {str(d)!r} for {path!r} ({e.strerror or e})"
        ) from None


def _probe(d: Path, flag: str, path) -> None:
    """Create and remove a file in the folder `d`: the one test of writability that holds for
    every user and file system."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probflow-write-check-", dir=d)
    except OSError as e:
        raise CLIError(f"{flag}: cannot write {path!r}: the folder {str(d)!r} does not take "
                       f"new files ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def relative_error(a, b):
    """Per-example relative L2 distance ||a - b|| / ||b||."""
    import numpy as np

    a = np.asarray(a).reshape(len(a), -1)
    b = np.asarray(b).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------- compilation cache

def compile_cache_dir() -> Path:
    """Where the command line keeps compiled programs (`pf.enable_compilation_cache`'s default)."""
    from .._compilation_cache import default_cache_dir

    return default_cache_dir()


def enable_compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache (`pf.enable_compilation_cache`), so that a
    second `probflow` run loads the compiled solves instead of compiling them again. Returns the
    directory (None if it cannot be created: the run then compiles as usual)."""
    import jax

    from .._compilation_cache import enable_compilation_cache

    # Cache every program, the small eager ones around a solve included (JAX's default keeps
    # only those that took >= 1 s to compile): loading one is faster than compiling it again
    # in every run. PROBFLOW_CACHE_MIN_COMPILE_SECS sets another threshold in seconds.
    threshold = float(os.environ.get("PROBFLOW_CACHE_MIN_COMPILE_SECS", "0"))
    # The traced solves are stored beside them (pf.enable_compilation_cache's store_programs);
    # PROBFLOW_STORE_PROGRAMS=0 traces every solve in every run instead.
    store = os.environ.get("PROBFLOW_STORE_PROGRAMS", "1") != "0"
    try:
        path = enable_compilation_cache(min_compile_time_secs=threshold, store_programs=store)
    except ValueError:
        return None
    # XLA:CPU logs two spurious ERROR lines for every program loaded from the cache (its
    # machine-feature check does not know the tuning features +prefer-no-gather/scatter);
    # silence JAX's logs below CRITICAL so that stderr keeps one line per real problem
    # (errors still arrive as exceptions).
    jax.config.update("jax_logging_level", "CRITICAL")
    return path


# ------------------------------------------------------------------------- names to objects

ODE_SOLVERS = ("euler", "heun", "midpoint", "ralston", "bosh3", "tsit5", "dopri5", "dopri8",
               "reversibleheun")
#: probflow's own solvers by command-line name: (class in `probflow`, constructor keywords).
#: A new fixed-step solver is one line here, e.g. `"unipc3": ("UniPC", {"order": 3}),`.
PROBFLOW_SOLVERS: dict[str, tuple[str, dict]] = {
    "dpm1": ("DPMSolver", {"order": 1}),
    "dpm2": ("DPMSolver", {"order": 2}),
    "dpm3": ("DPMSolver", {"order": 3}),
    "dpm++2m": ("DPMSolverMultistep", {"order": 2}),
    "dpm++3m": ("DPMSolverMultistep", {"order": 3}),
    "unipc2": ("UniPC", {"order": 2}),
    "unipc3": ("UniPC", {"order": 3}),
    "ipndm": ("IPNDM", {"order": 4}),
    "deis3": ("DEIS", {"order": 3}),
}
DPM_SOLVERS = tuple(PROBFLOW_SOLVERS)
SDE_NAMES = ("vp", "subvp", "ve")


def make_solver(name: str, flag: str = "--solver"):
    """A solver object from its command-line name (case-insensitive diffrax class name, or one of
    `PROBFLOW_SOLVERS`: dpm1..dpm3, dpm++2m, dpm++3m, unipc2, unipc3, ipndm, deis3)."""
    import diffrax

    import probflow as pf

    key = name.lower()
    if key in ODE_SOLVERS:
        cls = {c.lower(): c for c in ("Euler", "Heun", "Midpoint", "Ralston", "Bosh3", "Tsit5",
                                      "Dopri5", "Dopri8", "ReversibleHeun")}[key]
        return getattr(diffrax, cls)()
    if key in PROBFLOW_SOLVERS:
        cls, kwargs = PROBFLOW_SOLVERS[key]
        return getattr(pf, cls)(**kwargs)
    raise CLIError(
        f"{flag}: unknown solver {name!r}; choose from {', '.join(ODE_SOLVERS + DPM_SOLVERS)}"
    )


def make_sde(name: str):
    """The SDE named on the command line (`--sde vp|subvp|ve`), with the paper's parameters."""
    # The short names are those of the training presets; `_train_presets.sde_from_name` is the
    # one map from them to classes.
    from .._train_presets import sde_from_name

    try:
        return sde_from_name(name)
    except ValueError as e:
        raise CLIError(f"--sde: {e}") from None


# --------------------------------------------------------------------- models and data


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A score model named by `--checkpoint [--config]`, with what its file records about its
    data."""

    name: str  # as given on the command line
    model: Any
    sde: Any
    data_range: tuple[float, float]
    num_bins: int | None  # None when the checkpoint does not record it
    config: str | None = None  # the paper config of a checkpoint of the paper's code

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.model.shape)


def load_model(spec: str, config: str | None = None, *, ema: bool = True) -> LoadedModel:
    """THE place where `--checkpoint SPEC [--config NAME]` becomes (model, sde): every
    subcommand calls this.

    Without `config`: a shipped model's name ("digits-vp"), a probflow checkpoint file, or a run
    directory holding checkpoint.eqx. With `config` (a name under the paper's configs/, e.g.
    "vp/cifar10_ddpmpp_continuous"): a checkpoint of the paper's PyTorch or JAX code
    (`pf.load_score_sde`), its EMA weights unless `ema=False`, the config's data range and 256
    bins.
    """
    from .._checkpoint import CheckpointError
    from .._score_sde import ScoreSDEImportError, load_score_model

    resolved: Any = config
    if config is not None and config.endswith(".json"):
        # An edited config: a JSON object of its model/data/training fields.
        try:
            resolved = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"--config: cannot read the config file {config!r} ({e})") from None
    try:
        model, sde, data_range, num_bins = load_score_model(spec, resolved, ema=ema)
    except (ScoreSDEImportError, CheckpointError) as e:
        flags = "--checkpoint" if config is None else f"--checkpoint {spec} --config {config}"
        raise CLIError(f"{flags}: {e}") from None
    return LoadedModel(name=spec, model=model, sde=sde,
                       data_range=(float(data_range[0]), float(data_range[1])),
                       num_bins=num_bins, config=config)


def load_args_model(args, spec: str | None = None) -> LoadedModel:
    """`load_model` for a parsed command line (`add_checkpoint_option`'s options)."""
    return load_model(args.checkpoint if spec is None else spec, args.config,
                      ema=not args.raw_weights)


def load_data(name: str, split: str, data_dir=None, flag: str = "--data"):
    import probflow.data

    try:
        return probflow.data.load(name, split, data_dir=data_dir)
    except ValueError as e:
        raise CLIError(f"{flag}: {e}") from None


def check_data_matches(ds, loaded: LoadedModel, flag: str = "--data") -> None:
    """The data fit the model: the same example shape and number of bins."""
    if tuple(ds.shape) != loaded.shape:
        raise CLIError(
            f"{flag} {ds.name}: examples have shape {tuple(ds.shape)} but the checkpoint's model "
            f"expects {loaded.shape}"
        )
    if loaded.num_bins not in (None, ds.num_bins):
        raise CLIError(
            f"{flag} {ds.name} has {ds.num_bins} bins but the model was trained on "
            f"{loaded.num_bins}"
        )


def load_model_and_data(args, check_model: Callable[[LoadedModel], None] | None = None):
    """`(loaded, ds, x)`: the command line's model (first passed to `check_model`), its data set
    checked against it, and the first `--limit` examples at their bins' centres in the model's
    data range."""
    loaded = load_args_model(args)
    if check_model is not None:
        check_model(loaded)
    ds = load_data(args.data, args.split, data_dir=args.data_dir)
    check_data_matches(ds, loaded)
    n = min(args.limit, len(ds))
    return loaded, ds, model_space(ds, loaded, n)


def model_space(ds, loaded: LoadedModel, n: int | None = None):
    """The first `n` examples of `ds` at their bins' centres in the model's data range."""
    import dataclasses as dc

    import numpy as np

    ds = ds if n is None else ds.take(slice(0, n))
    ds = dc.replace(ds, data_range=loaded.data_range)
    return np.asarray(ds.to_model_space(), np.float32)


def digits_classifier_for(ds):
    """The shipped clean digits classifier when `ds` is the digits data (for Frechet distances
    and accuracies), else None."""
    import probflow as pf

    if ds.name == "digits":
        return pf.load_pretrained_classifier("digits-classifier")
    return None


# ------------------------------------------------------------------------ shared options


def add_checkpoint_option(p, default: str | None = "digits-vp", **kw) -> None:
    """`--checkpoint` and, for the paper's own checkpoints, `--config` and `--raw-weights`."""
    p.add_argument(
        "--checkpoint", default=default, metavar="PATH|NAME",
        help=kw.pop("help", "a checkpoint file, a run directory, or a shipped model's name "
                            "(digits-vp, digits-subvp, digits-color-vp)"),
        **kw,
    )
    p.add_argument(
        "--config", default=None, metavar="NAME",
        help="--checkpoint is a checkpoint of the paper's code (score_sde_pytorch .pth or "
             "score_sde flax file) trained with this config: its path under configs/ without "
             ".py, e.g. subvp/cifar10_ddpmpp_deep_continuous (docs/paper_checkpoints.md), or "
             "a .json file of an edited config's model/data/training fields; default: a "
             "probflow checkpoint",
    )
    p.add_argument(
        "--raw-weights", action="store_true",
        help="with --config: load the raw weights instead of the EMA weights",
    )


def add_data_options(p, *, data: str | None = "digits", split: str = "test",
                     limit: int | None = None, limit_help: str = "use the first N examples"
                     ) -> None:
    p.add_argument("--data", default=data, required=data is None,
                   help="a dataset name that probflow.data.load knows (digits, digits-color, "
                        "mnist-5k, toy:NAME, tfds:NAME, npz:PATH with an images array)")
    p.add_argument("--split", default=split, help="the dataset split")
    p.add_argument("--data-dir", default=None,
                   help="directory of prepared tensorflow-datasets data, for tfds:NAME "
                        "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--limit", type=positive_int, default=limit,
                   help=limit_help if limit is not None else limit_help + " (default: all)")


def add_ode_options(p, *, preset: str = "pf.ODEOptions'", eps: float | None = 1e-3,
                    eps_help: str = "the time the ODE stops at (data end), 0 < eps < T") -> None:
    """The probability-flow ODE's solver options: adaptive tolerances or N uniform steps. A flag
    left out leaves the library's default (`preset` names the plan the command starts from)."""
    p.add_argument("--solver", default=None, metavar="NAME",
                   help=f"ODE solver: {', '.join(ODE_SOLVERS + DPM_SOLVERS)} (default: "
                        f"{preset}, tsit5)")
    p.add_argument("--rtol", type=positive_float, default=None,
                   help=f"relative tolerance of an adaptive solve (default: {preset})")
    p.add_argument("--atol", type=positive_float, default=None,
                   help=f"absolute tolerance of an adaptive solve (default: {preset})")
    p.add_argument("--ode-steps", "--steps", dest="ode_steps", type=positive_int, default=None,
                   metavar="N",
                   help="N fixed solver steps instead of adaptive tolerances (default: adaptive; "
                        "needed by solvers without an error estimate)")
    p.add_argument("--eps", type=positive_float, default=eps, help=eps_help)


def ode_plan(args, preset=None, **extra):
    """The one solve plan of a command: `preset` (default `pf.ODEOptions`) given the solver
    flags that were set (and `extra` settings); the library owns every default."""
    import probflow as pf

    given: dict[str, Any] = dict(
        solver=None if args.solver is None else make_solver(args.solver), rtol=args.rtol,
        atol=args.atol, steps=getattr(args, "ode_steps", None), time=getattr(args, "time", None),
        **extra,
    )
    given = {k: v for k, v in given.items() if v is not None}
    try:
        return (pf.ODEOptions if preset is None else preset)(**given)
    except ValueError as e:
        raise CLIError(str(e)) from None


def ode_kwargs(args, preset=None) -> dict:
    return dict(options=ode_plan(args, preset), eps=args.eps)


def add_output_options(p, *, out: str | None, suffix: str = ".png", out_help: str | None = None,
                       required: bool = False) -> None:
    p.add_argument("--out", default=out, required=required,
                   help=out_help or f"the {suffix} file to write"
                        + (" (default: none)" if out is None and not required else ""))
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (default: none)")
