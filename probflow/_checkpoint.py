"""Checkpoints: a JSON header, then `eqx.tree_serialise_leaves` of the model (and optionally of
the training state), written atomically.

Layout: the 16-byte magic `MAGIC`, the header's length (8 bytes, little endian), the header
(UTF-8 JSON: model class and hyperparameters, SDE class and parameters, data range and bins, step,
config, versions, and the length and SHA-256 of each payload), then the payloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import equinox as eqx
import jax

from ._sde import VESDE, VPSDE, AbstractSDE, SubVPSDE
from .models import MLP, DDPMpp, UNet
from .models._base import AbstractScoreModel

MAGIC = b"PROBFLOW-CKPT-1\n"
_FORMAT_VERSION = 1

# The classes probflow ships, by the names written in headers (needed only to rebuild them).
_MODEL_CLASSES: dict[str, type[AbstractScoreModel]] = {"MLP": MLP, "UNet": UNet, "DDPMpp": DDPMpp}
_SDE_CLASSES: dict[str, type[AbstractSDE]] = {
    "VPSDE": VPSDE,
    "SubVPSDE": SubVPSDE,
    "VESDE": VESDE,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or not a probflow checkpoint."""


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("probflow", "jax", "equinox"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _sde_params(sde: AbstractSDE) -> dict:
    return {f.name: float(getattr(sde, f.name)) for f in dataclasses.fields(sde)}


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


def _serialise(tree) -> bytes:
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, tree)
    return buf.getvalue()


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
    """Save `model` (a probflow score model), its `sde` and `config` atomically to `path`.

    `config` is a `TrainConfig`, a JSON-serialisable dict or None. `num_bins`, `data_range` and
    `data` (a dataset name) record how the model's data were quantised. `state` (used by
    `train` to resume) is any pytree, saved after the model.
    """
    if not isinstance(model, AbstractScoreModel):
        raise ValueError(
            f"model must be a probflow.models score model (MLP, UNet), got {type(model).__name__}"
        )
    model_cls = type(model).__name__
    if _MODEL_CLASSES.get(model_cls) is not type(model):
        raise ValueError(f"model class {model_cls} cannot be saved: not a class probflow ships")
    if not isinstance(sde, AbstractSDE) or _SDE_CLASSES.get(type(sde).__name__) is not type(sde):
        raise ValueError(f"sde must be a VPSDE, SubVPSDE or VESDE, got {type(sde).__name__}")
    if type(model.sde) is not type(sde) or _sde_params(model.sde) != _sde_params(sde):
        raise ValueError(f"sde {sde} differs from the model's own SDE {model.sde}")
    cfg = _config_dict(config)
    if num_bins is None:
        num_bins = cfg.get("num_bins")
    if data_range is None:
        data_range = cfg.get("data_range")
    model_bytes = _serialise(model)
    state_bytes = b"" if state is None else _serialise(state)
    header = {
        "format": "probflow-checkpoint",
        "format_version": _FORMAT_VERSION,
        "model": {"class": model_cls, "hyperparameters": model.hyperparameters},
        "sde": {"class": type(sde).__name__, "params": _sde_params(sde)},
        "data": {
            "name": data,
            "num_bins": None if num_bins is None else int(num_bins),
            "data_range": None if data_range is None else [float(v) for v in data_range],
        },
        "step": None if step is None else int(step),
        "config": cfg,
        "versions": _versions(),
        "payload": {
            "model_bytes": len(model_bytes),
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "state_bytes": len(state_bytes),
            "state_sha256": hashlib.sha256(state_bytes).hexdigest(),
        },
    }
    try:
        header_bytes = json.dumps(header, sort_keys=True).encode()
    except TypeError as e:
        raise ValueError(f"config must be JSON-serialisable: {e}") from None
    blob = MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + model_bytes + state_bytes
    write_atomically(path, blob)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, bytes, bytes]:
    """(header, model payload, state payload) of the checkpoint at `path`, all checked."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}") from None
    if not blob.startswith(MAGIC):
        if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
            raise CheckpointError(f"checkpoint file is truncated: {path}")
        raise CheckpointError(f"not a probflow checkpoint (bad magic bytes): {path}")
    start = len(MAGIC) + 8
    if len(blob) < start:
        raise CheckpointError(f"checkpoint file is truncated: {path}")
    (n_header,) = struct.unpack("<Q", blob[len(MAGIC) : start])
    if len(blob) < start + n_header:
        raise CheckpointError(f"checkpoint file is truncated (in its header): {path}")
    try:
        header = json.loads(blob[start : start + n_header].decode())
        payload = header["payload"]
        n_model, n_state = int(payload["model_bytes"]), int(payload["state_bytes"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint header is corrupted: {path}") from None
    off = start + n_header
    if len(blob) < off + n_model + n_state:
        raise CheckpointError(
            f"checkpoint file is truncated ({len(blob)} bytes, expected "
            f"{off + n_model + n_state}): {path}"
        )
    if len(blob) > off + n_model + n_state:
        raise CheckpointError(f"checkpoint file has trailing bytes (corrupted): {path}")
    model_bytes = blob[off : off + n_model]
    state_bytes = blob[off + n_model : off + n_model + n_state]
    if (
        hashlib.sha256(model_bytes).hexdigest() != payload["model_sha256"]
        or hashlib.sha256(state_bytes).hexdigest() != payload["state_sha256"]
    ):
        raise CheckpointError(f"checkpoint payload is corrupted (checksum mismatch): {path}")
    return header, model_bytes, state_bytes


def _rebuild(header: dict, path) -> tuple[AbstractScoreModel, AbstractSDE]:
    try:
        sde_cls = _SDE_CLASSES[header["sde"]["class"]]
        model_cls = _MODEL_CLASSES[header["model"]["class"]]
        sde = sde_cls(**header["sde"]["params"])
        hp = dict(header["model"]["hyperparameters"])
        for k in ("shape", "channels"):
            if k in hp:
                hp[k] = tuple(hp[k])
        skeleton = model_cls(**hp, sde=sde, key=jax.random.key(0))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint header names an unknown model or SDE ({e}): {path}"
        ) from None
    return skeleton, sde


def load_checkpoint(path: str | os.PathLike):
    """`(model, sde, config)` from a checkpoint written by `save_checkpoint`.

    `config` is a dict: the saved config plus `step`, `num_bins`, `data_range` and `data`.
    """
    header, model_bytes, _ = read_checkpoint(path)
    skeleton, sde = _rebuild(header, path)
    try:
        model = eqx.tree_deserialise_leaves(io.BytesIO(model_bytes), skeleton)
    except Exception as e:  # a header/payload mismatch
        raise CheckpointError(
            f"checkpoint payload does not match its header ({e}): {path}"
        ) from None
    config = dict(header.get("config") or {})
    data = header.get("data") or {}
    config["step"] = header.get("step")
    config["num_bins"] = data.get("num_bins")
    dr = data.get("data_range")
    config["data_range"] = None if dr is None else tuple(dr)
    config["data"] = data.get("name")
    return model, sde, config


def load_training_state(path: str | os.PathLike, like):
    """The training state saved with the checkpoint at `path`, deserialised into `like`."""
    header, _, state_bytes = read_checkpoint(path)
    if not state_bytes:
        raise CheckpointError(f"checkpoint holds no training state (cannot resume): {path}")
    try:
        return header, eqx.tree_deserialise_leaves(io.BytesIO(state_bytes), like)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint training state does not match ({e}): {path}"
        ) from None
