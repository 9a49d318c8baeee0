"""probflow's one file format, for score models (checkpoints) and classifiers alike: a checksummed
JSON header, then `eqx.tree_serialise_leaves` of the module (and optionally of a training
state), written atomically.

Layout: the 16-byte magic `MAGIC`, the header's length (8 bytes, little endian), the header
(UTF-8 JSON), the SHA-256 (32 bytes) of everything before it, then the payloads. The header holds
the format and its version, the kind of file ("score-model" or "classifier"), the module's class
and hyperparameters, its SDE, the kind's own fields (data range and bins, step and config for a
score model; info for a classifier), package versions, and the length and SHA-256 of each
payload. So every byte of a file is covered by a checksum, and every header field is checked on
loading: a damaged file raises `CheckpointError` and never loads as something else.

Any `AbstractScoreModel` (or `AbstractClassifier`) can be saved, users' own included: its class is
recorded by name and found among the subclasses defined in the running program (import the module
that defines it before loading), then rebuilt as `cls(**hyperparameters, sde=sde, key=key)`
(`sde` left out when there is none) with JSON lists turned into tuples. The rebuild is a shape-only
skeleton (`eqx.filter_eval_shape`) that the stored leaves fill in.

Arrays take the dtype that the constructor gives them in the loading session (float64 with
`jax_enable_x64` on, float32 otherwise); the stored values are cast, which is exact when widening
(the shipped float32 models under x64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._sde import AbstractSDE
from .models._base import AbstractScoreModel

MAGIC = b"PROBFLOW-CKPT-2\n"
FORMAT = "probflow"
FORMAT_VERSION = 2
SCORE_MODEL = "score-model"
CLASSIFIER = "classifier"
_KINDS = (SCORE_MODEL, CLASSIFIER)
# Files of format 1 (probflow before issue 11): checkpoints and classifiers had their own magic.
_OLD_MAGICS = (b"PROBFLOW-CKPT-1\n", b"PROBFLOW-CLSF-1\n")
_PREFIX = len(MAGIC) + 8
_DIGEST = 32

# Bounds on what a file can make the loader do, checked before anything is built, so that a
# crafted file fails with a CheckpointError in bounded time and memory: the header's size and
# JSON nesting (the shipped headers are ~1 KiB, 4 deep), the number of arrays in a payload (the
# paper's deepest network has ~960), and the Python calls that building the module's skeleton
# from the header's hyperparameters may take (a header can claim a network far larger than its
# payload: MLP depth=40000 would take minutes to build before the payload mismatch shows; a
# shipped U-Net takes ~130k calls, ~1200 per array, in a fresh process).
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_LEAVES = 10_000
_BUILD_CALLS = 500_000
_BUILD_CALLS_PER_LEAF = 3_000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or not a probflow checkpoint."""


class _Invalid(Exception):
    """A header field that fails its check (turned into a CheckpointError naming the file)."""


class _TooLarge(Exception):
    """Building a module's skeleton exceeded its call budget (see `_bounded_build`)."""


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("probflow", "jax", "equinox"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _json_roundtrip(value):
    return json.loads(json.dumps(value, allow_nan=False))


def _tuples(value):
    """JSON lists back to the tuples that constructors take."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Classes by name, SDEs as JSON: the only place where either is (de)serialised.


def _subclasses(base: type) -> list[type]:
    out, stack = [], [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                stack.append(sub)
    return out


def _class_record(obj) -> dict:
    cls = type(obj)
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function; define it at module level so "
            "that it can be found again when loading"
        )
    return {"class": cls.__qualname__, "module": cls.__module__}


def _find_class(base: type, record: dict, what: str) -> type:
    """The subclass of `base` named by `record` ({"class", "module"}), among those defined now."""
    name, module = record["class"], record["module"]
    found = [c for c in _subclasses(base) if c.__qualname__ == name]
    if len(found) > 1:
        found = [c for c in found if c.__module__ == module] or found
    if not found:
        raise _Invalid(
            f"{what} class {name} (module {module}) is not defined in this program; import the "
            "module that defines it before loading"
        )
    if len(found) > 1:
        raise _Invalid(f"{what} class {name} is ambiguous: defined in several modules")
    return found[0]


def serialise_sde(sde: AbstractSDE) -> dict:
    """The JSON description of `sde`: its class and its fields (all JSON scalars)."""
    if not isinstance(sde, AbstractSDE):
        raise ValueError(f"sde must be a probflow SDE, got {type(sde).__name__}")
    params = {f.name: getattr(sde, f.name) for f in dataclasses.fields(sde)}
    for k, v in params.items():
        if not isinstance(v, (bool, int, float, str)):
            raise ValueError(
                f"SDE field {type(sde).__name__}.{k} must be a JSON scalar to be saved, got "
                f"{type(v).__name__}"
            )
    return {**_class_record(sde), "params": params}


def deserialise_sde(record) -> AbstractSDE:
    """The SDE that `serialise_sde` described. Raises ValueError if `record` is not one."""
    try:
        return _deserialise_sde(record)
    except _Invalid as e:
        raise ValueError(str(e)) from None


def _deserialise_sde(record) -> AbstractSDE:
    rec = _check_dict(record, "sde", {"class": str, "module": str, "params": dict})
    cls = _find_class(AbstractSDE, rec, "SDE")
    names = sorted(f.name for f in dataclasses.fields(cls))
    if sorted(rec["params"]) != names:
        raise _Invalid(
            f"sde.params must give exactly {names} of {rec['class']}, got {rec['params']}"
        )
    try:
        sde = cls(**rec["params"])
    except Exception as e:
        raise _Invalid(f"sde.params {rec['params']} do not make a {rec['class']} ({e})") from None
    if _json_roundtrip(serialise_sde(sde)) != rec:
        raise _Invalid(f"sde.params {rec['params']} do not describe {sde} exactly")
    return sde


# ---------------------------------------------------------------------------------------------
# Header checks.


def _check_dict(value, name: str, fields: Mapping[str, Any]) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(f"{name} must be an object, got {value!r}")
    for key, typ in fields.items():
        if key not in value:
            raise _Invalid(f"{name}.{key} is missing")
        if not isinstance(value[key], typ) or isinstance(value[key], bool) and typ is not bool:
            raise _Invalid(f"{name}.{key} must be of type {typ.__name__}, got {value[key]!r}")
    return value


def _optional_int(value, name: str, low: int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _Invalid(f"{name} must be null or an integer >= {low}, got {value!r}")
    return value


def _check_data(data) -> dict:
    data = _check_dict(data, "data", {})
    for key in ("name", "num_bins", "data_range"):
        if key not in data:
            raise _Invalid(f"data.{key} is missing")
    if data["name"] is not None and not isinstance(data["name"], str):
        raise _Invalid(f"data.name must be null or a string, got {data['name']!r}")
    _optional_int(data["num_bins"], "data.num_bins", 2)
    dr = data["data_range"]
    if dr is not None:
        ok = (
            isinstance(dr, list)
            and len(dr) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dr)
            and all(math.isfinite(v) for v in dr)
            and dr[0] < dr[1]
        )
        if not ok:
            raise _Invalid(
                f"data.data_range must be null or [low, high] with low < high, got {dr!r}"
            )
    return data


def _check_header(header, path) -> dict:
    """The common part of every header (format, version, kind, payload sizes and digests)."""
    try:
        _check_dict(header, "header", {"format": str, "format_version": int, "kind": str,
                                       "payload": dict, "versions": dict})
        if header["format"] != FORMAT:
            raise _Invalid(f"format must be {FORMAT!r}, got {header['format']!r}")
        if header["format_version"] != FORMAT_VERSION:
            raise _Invalid(
                f"format_version {header['format_version']} is not {FORMAT_VERSION} (written "
                "by another probflow version)"
            )
        if header["kind"] not in _KINDS:
            raise _Invalid(f"kind must be one of {_KINDS}, got {header['kind']!r}")
        payload = _check_dict(header["payload"], "payload", {
            "model_bytes": int, "model_sha256": str, "state_bytes": int, "state_sha256": str})
        for part in ("model", "state"):
            _optional_int(payload[f"{part}_bytes"], f"payload.{part}_bytes", 0)
            digest = payload[f"{part}_sha256"]
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise _Invalid(f"payload.{part}_sha256 must be 64 hex digits, got {digest!r}")
    except _Invalid as e:
        raise CheckpointError(f"checkpoint header is invalid ({e}): {path}") from None
    return header


# ---------------------------------------------------------------------------------------------
# Writing and reading files.


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one.

    A temporary file in the same directory is written, flushed and fsynced, renamed over `path`
    with `os.replace`, and the directory is fsynced so that the rename itself is durable.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shipped files unreadable
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _serialise(tree) -> bytes:
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, tree)
    return buf.getvalue()


def _save(path, kind: str, module, sde: AbstractSDE | None, fields: dict, state=None) -> None:
    hp = module.hyperparameters
    if not isinstance(hp, dict):
        raise ValueError(
            f"{type(module).__name__}.hyperparameters must be a dict, got {type(hp).__name__}"
        )
    model_bytes = _serialise(module)
    state_bytes = b"" if state is None else _serialise(state)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": {**_class_record(module), "hyperparameters": hp},
        "sde": None if sde is None else serialise_sde(sde),
        **fields,
        "versions": _versions(),
        "payload": {
            "model_bytes": len(model_bytes),
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "state_bytes": len(state_bytes),
            "state_sha256": hashlib.sha256(state_bytes).hexdigest(),
        },
    }
    try:
        header_bytes = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"the hyperparameters, config and info must be JSON-serialisable (finite numbers, "
            f"strings, lists, dicts): {e}"
        ) from None
    head = MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes
    write_atomically(path, head + hashlib.sha256(head).digest() + model_bytes + state_bytes)


def _read_file(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, bytes, bytes]:
    """(header, model payload, state payload) of the file at `path`, all checksums verified."""
    return _parse(_read_file(path), path)


def _parse(blob: bytes, path) -> tuple[dict, bytes, bytes]:
    """`read_checkpoint` of the file contents `blob` (`path` names it in errors)."""
    if not blob.startswith(MAGIC):
        if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
            raise CheckpointError(f"checkpoint file is truncated: {path}")
        if blob[: len(MAGIC)] in _OLD_MAGICS:
            raise CheckpointError(
                f"checkpoint is in probflow's old file format 1, which is no longer read; convert "
                f"it with `python scripts/convert_checkpoints.py PATH` from probflow's sources: "
                f"{path}"
            )
        raise CheckpointError(f"not a probflow checkpoint (bad magic bytes): {path}")
    if len(blob) < _PREFIX:
        raise CheckpointError(f"checkpoint file is truncated: {path}")
    (n_header,) = struct.unpack("<Q", blob[len(MAGIC) : _PREFIX])
    if n_header > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"checkpoint header is {n_header} bytes, more than the {MAX_HEADER_BYTES} allowed "
            f"(corrupted or crafted): {path}"
        )
    end = _PREFIX + n_header
    if len(blob) < end + _DIGEST:
        raise CheckpointError(
            f"checkpoint file is truncated (in its header), or its header length is corrupted: "
            f"{path}"
        )
    if hashlib.sha256(blob[:end]).digest() != blob[end : end + _DIGEST]:
        raise CheckpointError(f"checkpoint header is corrupted (checksum mismatch): {path}")
    depth = _json_depth(blob[_PREFIX:end])
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(
            f"checkpoint header nests JSON {depth} levels deep, more than the {MAX_JSON_DEPTH} "
            f"allowed (corrupted or crafted): {path}"
        )
    try:
        header = json.loads(blob[_PREFIX:end].decode())
    except (ValueError, RecursionError):
        raise CheckpointError(f"checkpoint header is not valid JSON: {path}") from None
    payload = _check_header(header, path)["payload"]
    off = end + _DIGEST
    n_model, n_state = payload["model_bytes"], payload["state_bytes"]
    if len(blob) < off + n_model + n_state:
        raise CheckpointError(
            f"checkpoint file is truncated ({len(blob)} bytes, expected "
            f"{off + n_model + n_state}): {path}"
        )
    if len(blob) > off + n_model + n_state:
        raise CheckpointError(f"checkpoint file has trailing bytes (corrupted): {path}")
    model_bytes = blob[off : off + n_model]
    state_bytes = blob[off + n_model :]
    if (
        hashlib.sha256(model_bytes).hexdigest() != payload["model_sha256"]
        or hashlib.sha256(state_bytes).hexdigest() != payload["state_sha256"]
    ):
        raise CheckpointError(f"checkpoint payload is corrupted (checksum mismatch): {path}")
    return header, model_bytes, state_bytes


def _json_depth(text: bytes) -> int:
    """How deep the arrays and objects of the JSON `text` nest (brackets inside strings left
    out), counted without parsing it (`json.loads` recurses, and fails deep inputs with a
    RecursionError)."""
    codes = np.frombuffer(_JSON_STRING.sub(b'""', text), np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _count_leaves(data: bytes, what: str, path) -> int:
    """The number of arrays in a payload (a sequence of `.npy` records), read from their headers
    without loading any; at most `MAX_LEAVES`."""
    f = io.BytesIO(data)
    count = 0
    while f.tell() < len(data):
        if count == MAX_LEAVES:
            raise CheckpointError(
                f"checkpoint {what} holds more than {MAX_LEAVES} arrays (crafted, or not a "
                f"model probflow can load): {path}"
            )
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
        except ValueError as e:
            raise CheckpointError(
                f"checkpoint {what} is not a sequence of arrays (array {count}: {e}): {path}"
            ) from None
        if dtype.hasobject:
            raise CheckpointError(
                f"checkpoint {what} holds an array of Python objects (array {count}): {path}"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > len(data) - f.tell():
            raise CheckpointError(
                f"checkpoint {what}'s array {count} of shape {shape} runs past its end: {path}"
            )
        f.seek(nbytes, io.SEEK_CUR)
        count += 1
    return count


def _bounded_build(build, budget: int):
    """`build()`, stopped with `_TooLarge` once it has made `budget` Python calls.

    A checkpoint's header names a class and its hyperparameters, and the skeleton they build must
    hold as many arrays as the payload; a crafted header can ask for a network many times larger
    (the build runs the class's constructor). The number of calls bounds the time and memory
    that can take, the same on every machine. The caller's own profile function (a profiler)
    is put back afterwards.
    """
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1
            if calls > budget:
                sys.setprofile(previous)
                raise _TooLarge

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        return build()
    finally:
        sys.setprofile(previous)


def _load_leaf(f, like):
    """Load one leaf, checking its shape and kind and casting it to the skeleton's dtype."""
    if isinstance(like, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
        arr = np.load(f, allow_pickle=False)
        want = np.dtype(like.dtype)
        if arr.shape != tuple(like.shape):
            raise ValueError(f"an array of shape {arr.shape} on disk, {like.shape} expected")
        if arr.dtype.kind != want.kind:
            raise ValueError(f"an array of dtype {arr.dtype} on disk, {want} expected")
        if isinstance(like, np.ndarray):
            return arr.astype(want)
        return jnp.asarray(arr, dtype=want)
    return eqx.default_deserialise_filter_spec(f, like)


def _deserialise(data: bytes, like, what: str, path, *, finite: bool = False):
    """`data` loaded into the structure of `like`; with `finite`, every floating array is checked
    to hold only finite values (a model with NaN weights fails at load, not after a solve)."""
    f = io.BytesIO(data)
    nonfinite = []  # the indices (among the leaves of `like`) of non-finite arrays
    index = -1

    def load_leaf(f, like_leaf):
        nonlocal index
        index += 1
        out = _load_leaf(f, like_leaf)
        if finite and isinstance(out, (jax.Array, np.ndarray)):
            host = np.asarray(out)
            if np.issubdtype(host.dtype, np.inexact) and not np.isfinite(host).all():
                nonfinite.append(index)
        return out

    try:
        out = eqx.tree_deserialise_leaves(f, like, filter_spec=load_leaf)
    except Exception as e:  # a header/payload mismatch
        raise CheckpointError(
            f"checkpoint {what} does not match its header ({e}): {path}"
        ) from None
    if f.tell() != len(data):
        raise CheckpointError(
            f"checkpoint {what} holds more leaves than its header's structure: {path}"
        )
    if nonfinite:
        names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(like)]
        raise CheckpointError(
            f"checkpoint {what} holds non-finite weights (NaN or inf) in {len(nonfinite)} "
            f"array(s), first {names[nonfinite[0]]}; the model cannot be used: {path}"
        )
    return out


def _load(blob: bytes, path, kind: str, base: type):
    """(module, sde, header) from the contents `blob` of a file of `kind` (`path` names it in
    errors), whose module is a subclass of `base`."""
    header, model_bytes, _ = _parse(blob, path)
    if header["kind"] != kind:
        raise CheckpointError(
            f"file holds a {header['kind']}, not a {kind} (use "
            f"{'load_checkpoint' if header['kind'] == SCORE_MODEL else 'load_classifier'}): "
            f"{path}"
        )
    try:
        own = "config" if kind == SCORE_MODEL else "info"
        _check_dict(header, "header", {"model": dict, "sde": object, own: dict})
        rec = _check_dict(header["model"], "model",
                          {"class": str, "module": str, "hyperparameters": dict})
        sde = None if header["sde"] is None else _deserialise_sde(header["sde"])
        if kind == SCORE_MODEL:
            if sde is None:
                raise _Invalid("sde is null (a score model needs one)")
            _check_dict(header, "header", {"data": dict, "step": object})
            _check_data(header["data"])
            _optional_int(header["step"], "step", 0)
        cls = _find_class(base, rec, "model")
    except _Invalid as e:
        raise CheckpointError(f"checkpoint header is invalid ({e}): {path}") from None
    hp = rec["hyperparameters"]
    kwargs: dict[str, Any] = dict(_tuples(hp), key=jax.random.key(0))
    if sde is not None:
        kwargs["sde"] = sde
    leaves = _count_leaves(model_bytes, "payload", path)
    budget = _BUILD_CALLS + _BUILD_CALLS_PER_LEAF * leaves
    try:
        skeleton = _bounded_build(lambda: eqx.filter_eval_shape(cls, **kwargs), budget)
    except _TooLarge:
        raise CheckpointError(
            f"checkpoint header's hyperparameters {hp} ask for a {rec['class']} far larger "
            f"than its payload of {leaves} arrays (building it was stopped): {path}"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"checkpoint header's hyperparameters do not build a {rec['class']} "
            f"({type(e).__name__}: {e}): {path}"
        ) from None
    if _json_roundtrip(skeleton.hyperparameters) != hp:
        raise CheckpointError(
            f"{rec['class']} built from the header's hyperparameters {hp} reports "
            f"{skeleton.hyperparameters} instead: {path}"
        )
    module = _deserialise(model_bytes, skeleton, "payload", path, finite=True)
    saved_sde = module.sde
    if (saved_sde is None) != (sde is None) or (
        sde is not None and serialise_sde(saved_sde) != serialise_sde(sde)
    ):
        raise CheckpointError(
            f"checkpoint payload's SDE {saved_sde} differs from its header's {sde}: {path}"
        )
    return module, sde, header


# ---------------------------------------------------------------------------------------------
# Score models.


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(
        f"config must be a TrainConfig, a dict or None, got {type(config).__name__}"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: AbstractScoreModel,
    sde: AbstractSDE,
    config=None,
    *,
    step: int | None = None,
    num_bins: int | None = None,
    data_range: tuple[float, float] | None = None,
    data: str | None = None,
    state=None,
) -> None:
    """Save `model` (any `AbstractScoreModel`), its `sde` and `config` atomically to `path`.

    `config` is a `TrainConfig`, a JSON-serialisable dict or None. `num_bins`, `data_range` and
    `data` (a dataset name) record how the model's data were quantised. `state` (used by
    `train` to resume) is any pytree, saved after the model.

    **Arguments:**

    - `path`: the file to write (atomically: a crash never leaves a broken file).
    - `model`: the score model, any `AbstractScoreModel`.
    - `sde`: its SDE.
    - `config`: a `TrainConfig`, a JSON-serialisable dict or None.
    - `step`: the training step reached (None: not recorded).
    - `num_bins`: the number of levels of the training data.
    - `data_range`: the model's data range (lo, hi).
    - `data`: the training data set's name.
    - `state`: any pytree saved after the model (`train`'s optimiser state, to resume).
    """
    if not isinstance(model, AbstractScoreModel):
        raise ValueError(
            f"model must be a probflow.models score model (an AbstractScoreModel such as MLP or "
            f"UNet), got {type(model).__name__}"
        )
    if not isinstance(sde, AbstractSDE):
        raise ValueError(f"sde must be a probflow SDE, got {type(sde).__name__}")
    if serialise_sde(model.sde) != serialise_sde(sde):
        raise ValueError(f"sde {sde} differs from the model's own SDE {model.sde}")
    cfg = _config_dict(config)
    if num_bins is None:
        num_bins = cfg.get("num_bins")
    if data_range is None:
        data_range = cfg.get("data_range")
    fields = {
        "data": {
            "name": data,
            "num_bins": None if num_bins is None else int(num_bins),
            "data_range": None if data_range is None else [float(v) for v in data_range],
        },
        "step": None if step is None else int(step),
        "config": cfg,
    }
    try:
        _check_data(_json_roundtrip(fields["data"]))
        _optional_int(fields["step"], "step", 0)
    except _Invalid as e:
        raise ValueError(str(e)) from None
    _save(path, SCORE_MODEL, model, sde, fields, state)


def load_checkpoint(path: str | os.PathLike):
    """`(model, sde, config)` from a checkpoint written by `save_checkpoint`; `model.sde == sde`.

    `config` is a dict: the saved config plus `step`, `num_bins`, `data_range` and `data`.

    **Arguments:**

    - `path`: a checkpoint file written by `save_checkpoint`.
    """
    return _checkpoint_from_bytes(_read_file(path), path)


def _checkpoint_from_bytes(blob: bytes, path):
    model, sde, header = _load(blob, path, SCORE_MODEL, AbstractScoreModel)
    config = dict(header["config"])
    data = header["data"]
    config["step"] = header["step"]
    config["num_bins"] = data["num_bins"]
    dr = data["data_range"]
    config["data_range"] = None if dr is None else tuple(float(v) for v in dr)
    config["data"] = data["name"]
    return model, sde, config


def load_training_state(path: str | os.PathLike, like):
    """The training state saved with the checkpoint at `path`, deserialised into `like`."""
    return _training_state_from_bytes(_read_file(path), path, like)


def _training_state_from_bytes(blob: bytes, path, like):
    header, _, state_bytes = _parse(blob, path)
    if not state_bytes:
        raise CheckpointError(f"checkpoint holds no training state (cannot resume): {path}")
    return header, _deserialise(state_bytes, like, "training state", path)


def save_module(path, kind: str, module, sde: AbstractSDE | None, fields: dict) -> None:
    """Write any saveable module (used by `save_classifier`); `fields` go into the header."""
    _save(path, kind, module, sde, fields)


def load_module(path, kind: str, base: type):
    """(module, sde, header) of a file written by `save_module` (used by `load_classifier`)."""
    return _load(_read_file(path), path, kind, base)
