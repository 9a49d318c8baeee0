"""Convert files of probflow's file format 1 (checkpoints and classifiers) to the current format.

    python scripts/convert_checkpoints.py probflow/pretrained/*.eqx

Each file is rewritten in place (atomically) after checking its old checksum, and reloaded with
`pf.load_checkpoint` / `pf.load_classifier` to check that every leaf is bit-for-bit the old one.
Files already in the current format are left alone. Run without `jax_enable_x64`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import probflow as pf
from probflow._checkpoint import (
    MAGIC,
    _find_class,
    _tuples,
    deserialise_sde,
)
from probflow._classifier import AbstractClassifier
from probflow.models import AbstractScoreModel

OLD_CKPT = b"PROBFLOW-CKPT-1\n"
OLD_CLSF = b"PROBFLOW-CLSF-1\n"


def _build(base, name, hp, sde, payload):
    cls = _find_class(base, {"class": name, "module": ""}, "model")
    kwargs = dict(_tuples(hp), key=jax.random.key(0))
    if sde is not None:
        kwargs["sde"] = sde
    skeleton = eqx.filter_eval_shape(cls, **kwargs)
    # Format 1 stored the fields in the order of the class body; `AbstractClassifier.sde`
    # (an AbstractVar) has since moved `sde` ahead of the fields declared before it there.
    dynamic = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("static", False)}
    names = [n for n in cls.__annotations__ if n in dynamic]
    get = lambda m: tuple(getattr(m, n) for n in names)
    old = eqx.tree_deserialise_leaves(io.BytesIO(payload), get(skeleton))
    return eqx.tree_at(get, skeleton, old, is_leaf=lambda x: x is None)


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        type(x) is type(y) and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def convert(path: Path) -> str:
    blob = path.read_bytes()
    if blob.startswith(MAGIC):
        return "already current"
    magic = blob[:16]
    if magic not in (OLD_CKPT, OLD_CLSF):
        raise SystemExit(f"{path}: not a probflow file of format 1")
    (n,) = struct.unpack("<Q", blob[16:24])
    header = json.loads(blob[24 : 24 + n].decode())
    rest = blob[24 + n :]
    if magic == OLD_CKPT:
        p = header["payload"]
        model_bytes = rest[: p["model_bytes"]]
        state_bytes = rest[p["model_bytes"] :]
        assert len(state_bytes) == p["state_bytes"], "truncated or trailing bytes"
        assert hashlib.sha256(model_bytes).hexdigest() == p["model_sha256"]
        assert hashlib.sha256(state_bytes).hexdigest() == p["state_sha256"]
        sde = deserialise_sde({**header["sde"], "module": "probflow._sde"})
        model = _build(AbstractScoreModel, header["model"]["class"],
                       header["model"]["hyperparameters"], sde, model_bytes)
        data = header["data"]
        pf.save_checkpoint(path, model, sde, header["config"], step=header["step"],
                           num_bins=data["num_bins"], data_range=data["data_range"],
                           data=data["name"])
        again, sde2, _ = pf.load_checkpoint(path)
        assert sde2 == sde
    else:
        assert len(rest) == header["payload_bytes"]
        assert hashlib.sha256(rest).hexdigest() == header["payload_sha256"]
        sde = header["sde"]
        sde = None if sde is None else deserialise_sde({**sde, "module": "probflow._sde"})
        model = _build(AbstractClassifier, header["class"], header["hyperparameters"], sde, rest)
        pf.save_classifier(path, model, header["info"])
        again, _ = pf.load_classifier(path)
    if not _same(model, again):
        raise SystemExit(f"{path}: the converted file does not hold the same leaves")
    return "converted"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {convert(Path(arg))}")
