"""Crafted and damaged model files fail with one line in bounded time (issue 19, item 5).

probflow checkpoints: the header's size and JSON nesting, the payload's number of arrays and the
cost of building the skeleton that the header's hyperparameters describe are bounded before
anything is built; non-finite weights are rejected at load. The paper's flax (msgpack) files:
malformed trees give a `ScoreSDEImportError`, not a TypeError/KeyError/ValueError traceback.
"""

import copy
import hashlib
import io
import json
import lzma
import struct
import sys
from pathlib import Path

import jax
import msgpack
import numpy as np
import pytest
from helpers import score_sde_fixture_config

import probflow as pf
from probflow import _checkpoint
from probflow._checkpoint import MAGIC
from probflow._score_sde import ScoreSDEImportError, load_score_model, load_score_sde
from probflow.models import MLP


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    sde = pf.VPSDE()
    model = MLP(2, sde=sde, width=8, depth=1, key=jax.random.key(0))
    path = tmp_path_factory.mktemp("crafted") / "m.eqx"
    pf.save_checkpoint(path, model, sde, None, num_bins=16, data_range=(0.0, 1.0))
    return path, model, sde


def _split(blob):
    (n,) = struct.unpack("<Q", blob[len(MAGIC) : len(MAGIC) + 8])
    return blob[len(MAGIC) + 8 : len(MAGIC) + 8 + n], len(MAGIC) + 8 + n


def _with_header(blob, header_bytes):
    """The file with its header replaced by `header_bytes`, checksummed again."""
    _, end = _split(blob)
    head = MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes
    return head + hashlib.sha256(head).digest() + blob[end + 32 :]


def _edited(blob, edit):
    header = json.loads(_split(blob)[0])
    edit(header)
    return _with_header(blob, json.dumps(header, sort_keys=True).encode())


def test_deeply_nested_json_header_is_one_clear_error(small, tmp_path):
    path, *_ = small
    bad = tmp_path / "deep.eqx"
    deep = b'{"format": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    bad.write_bytes(_with_header(path.read_bytes(), deep))
    with pytest.raises(pf.CheckpointError, match="nests JSON 200001 levels deep.*deep.eqx"):
        pf.load_checkpoint(bad)
    # Brackets inside strings do not count; 32 levels are allowed.
    ok = tmp_path / "ok.eqx"
    nested: dict = {"s": "[[[[{{{{" * 1000}
    for _ in range(25):
        nested = {"n": nested}
    ok.write_bytes(_edited(path.read_bytes(), lambda h: h["config"].update(extra=nested)))
    pf.load_checkpoint(ok)


def test_oversized_header_is_rejected_before_it_is_read(small, tmp_path):
    path, *_ = small
    blob = path.read_bytes()
    bad = tmp_path / "huge.eqx"
    bad.write_bytes(MAGIC + struct.pack("<Q", 2**62) + blob[len(MAGIC) + 8 :])
    with pytest.raises(pf.CheckpointError, match="header is 4611686018427387904 bytes, more "
                                                  "than the 1048576 allowed.*huge.eqx"):
        pf.load_checkpoint(bad)
    big = tmp_path / "big.eqx"
    big.write_bytes(_edited(blob, lambda h: h["config"].update(pad="x" * (1 << 20))))
    with pytest.raises(pf.CheckpointError, match="more than the 1048576 allowed"):
        pf.load_checkpoint(big)


def test_header_claiming_a_far_larger_network_is_stopped_in_bounded_time(small, tmp_path,
                                                                         capsys):
    """MLP depth=40000 takes minutes to build (~3 s per 1000 layers on 2 cores); the payload holds
    13 arrays, so building stops after its call budget (0.54M calls, ~1 s), well before."""
    path, *_ = small
    bad = tmp_path / "claims.eqx"
    bad.write_bytes(_edited(path.read_bytes(),
                            lambda h: h["model"]["hyperparameters"].update(depth=40_000)))
    # `probflow sample` on it ran past 120 s and took 2.4 GB before (issue 19).
    from probflow._cli._main import main

    assert main(["sample", "--checkpoint", str(bad), "--no-compile-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ask for a MLP far larger than its payload of 13 arrays (building it was stopped)" in err
    assert "claims.eqx" in err


def test_build_budget_restores_a_running_profiler():
    seen = []

    def profiler(frame, event, arg):
        seen.append(event)

    sys.setprofile(profiler)
    try:
        with pytest.raises(_checkpoint._TooLarge):
            _checkpoint._bounded_build(lambda: [str(i) for i in range(10)] and _deep(50), 20)
        assert sys.getprofile() is profiler
        assert _checkpoint._bounded_build(lambda: 7, 20) == 7
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert seen


def _deep(n):
    return 0 if n == 0 else _deep(n - 1)


def test_payload_with_too_many_arrays(small, tmp_path, monkeypatch):
    path, *_ = small
    monkeypatch.setattr(_checkpoint, "MAX_LEAVES", 10)  # the small MLP has 13 (its SDE included)
    with pytest.raises(pf.CheckpointError, match="payload holds more than 10 arrays.*m.eqx"):
        pf.load_checkpoint(path)


def test_consistent_looking_file_of_a_huge_network_stops_before_building(small, tmp_path):
    """A header claiming MLP depth=5000 with a payload of 20013 arrays (what such a file would
    hold; tiny ones here) fails on the count of the payload's arrays, before any build."""
    path, *_ = small
    blob = path.read_bytes()
    record = io.BytesIO()
    np.save(record, np.zeros((1,), np.float32))
    payload = record.getvalue() * 20_013
    header = json.loads(_split(blob)[0])
    header["model"]["hyperparameters"]["depth"] = 5000
    header["payload"].update(model_bytes=len(payload),
                             model_sha256=hashlib.sha256(payload).hexdigest())
    hb = json.dumps(header, sort_keys=True).encode()
    head = MAGIC + struct.pack("<Q", len(hb)) + hb
    bad = tmp_path / "huge.eqx"
    bad.write_bytes(head + hashlib.sha256(head).digest() + payload)
    with pytest.raises(pf.CheckpointError, match="payload holds more than 10000 arrays.*huge"):
        pf.load_checkpoint(bad)


def test_payload_that_is_not_arrays(small, tmp_path):
    path, *_ = small
    blob = path.read_bytes()
    _, end = _split(blob)
    header = json.loads(_split(blob)[0])
    payload = b"not an npy record" * 8
    header["payload"].update(model_bytes=len(payload),
                             model_sha256=hashlib.sha256(payload).hexdigest())
    hb = json.dumps(header, sort_keys=True).encode()
    head = MAGIC + struct.pack("<Q", len(hb)) + hb
    bad = tmp_path / "junk.eqx"
    bad.write_bytes(head + hashlib.sha256(head).digest() + payload)
    with pytest.raises(pf.CheckpointError, match="payload is not a sequence of arrays.*junk"):
        pf.load_checkpoint(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_rejected_at_load(tmp_path, value):
    sde = pf.VPSDE()
    model = MLP(2, sde=sde, width=8, depth=2, key=jax.random.key(0))
    w = model.hidden[1].weight
    model = jax.tree_util.tree_map(lambda a: a, model)
    import equinox as eqx

    model = eqx.tree_at(lambda m: m.hidden[1].weight, model, w.at[3, 4].set(value))
    path = tmp_path / "nan.eqx"
    pf.save_checkpoint(path, model, sde, None)
    with pytest.raises(pf.CheckpointError,
                       match=r"non-finite weights \(NaN or inf\) in 1 array\(s\), first "
                             r"\.hidden\[1\]\.weight.*nan\.eqx"):
        pf.load_checkpoint(path)
    # The command line says the same in one line, before any solve.
    from probflow._cli._main import main

    assert main(["sample", "--checkpoint", str(path), "--num", "2", "--no-compile-cache"]) == 2


# ---------------------------------------------------------------------------------------------
# The paper's flax (msgpack) format.

DATA = Path(__file__).parent / "data" / "score_sde"
config_of = score_sde_fixture_config


def _ndarray(a):
    a = np.asarray(a)
    return msgpack.ExtType(1, msgpack.packb((a.shape, a.dtype.name, a.tobytes())))


def _write(tmp_path, obj, name="crafted.msgpack", **kw):
    path = tmp_path / name
    path.write_bytes(msgpack.packb(obj, **kw))
    return path


def _nested(depth):
    tree: dict = {"leaf": 1}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


@pytest.fixture(scope="module")
def flax_state():
    """A real score_sde flax checkpoint (a small vp_ddpmpp, tests/data/score_sde) as its tree."""
    blob = lzma.decompress((DATA / "vp_ddpmpp.msgpack.xz").read_bytes())
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _one_line(fn, match):
    with pytest.raises(ScoreSDEImportError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda ema: ema["Conv_0"].update(kernel="text"), "Conv_0/kernel is not an array"),
        (lambda ema: ema["Conv_0"].update(kernel=[1.0, 2.0]), "Conv_0/kernel is not an array"),
        (lambda ema: ema["Conv_0"].update(kernel={"x": _ndarray([1.0])}),
         "checkpoint has no parameter|Conv_0/kernel"),
        (lambda ema: ema.update({7: _ndarray([1.0])}), "key 7 .* is not a string"),
        (lambda ema: ema["Conv_0"].update(kernel={"__msgpack_chunked_array__": True,
                                                  "shape": {"0": 2}, "chunks": 5}),
         "Conv_0/kernel is a malformed chunked array"),
        (lambda ema: ema["Conv_0"].update(kernel={"__msgpack_chunked_array__": True,
                                                  "shape": {"0": 3},
                                                  "chunks": {"0": _ndarray([1.0, 2.0])}}),
         "Conv_0/kernel is a malformed chunked array"),
        (lambda ema: ema.update(deep=_nested(100)), "nests 65 levels deep, more than the 64"),
        (lambda ema: ema["Conv_0"].update(kernel=msgpack.ExtType(1, b"\x93\x01")), "neither"),
        (lambda ema: ema["Conv_0"].update(
            kernel=msgpack.ExtType(1, msgpack.packb(((2,), "no-such-dtype", b"")))), "neither"),
        (lambda ema: ema["Conv_0"].update(kernel=msgpack.ExtType(1, msgpack.packb(
            ((3, 3), "float32", b"\0" * 8)))), "neither"),
    ],
)
def test_crafted_flax_files_give_one_line_errors(flax_state, tmp_path, edit, match):
    state = copy.deepcopy(flax_state)
    edit(state["params_ema"])
    path = _write(tmp_path, state)
    _one_line(lambda: load_score_sde(path, config_of("vp_ddpmpp")), match)


def test_crafted_flax_tops(tmp_path):
    cfg = config_of("vp_ddpmpp")
    _one_line(lambda: load_score_sde(_write(tmp_path, {"params_ema": 3}), cfg),
              "must be a tree of named arrays, got int")
    _one_line(lambda: load_score_sde(_write(tmp_path, {"optimizer": 3}), cfg), "no EMA")
    _one_line(lambda: load_score_sde(_write(tmp_path, {"optimizer": 3}), cfg, ema=False),
              "no raw weights")
    # msgpack's own unpacker refuses nesting past its stack (1024 levels).
    deep = tmp_path / "deep.msgpack"
    deep.write_bytes(b"\x81\xa1a" * 5000 + b"\x01")
    _one_line(lambda: load_score_sde(deep, cfg), "neither")
    # A map claiming more entries than allowed is refused before it is built.
    wide = tmp_path / "wide.msgpack"
    wide.write_bytes(b"\xdf" + struct.pack(">I", 2**31) + b"\x00" * 64)
    _one_line(lambda: load_score_sde(wide, cfg), "neither")


def test_flax_file_with_non_finite_weights(flax_state, tmp_path):
    state = copy.deepcopy(flax_state)
    shape, dtype, buf = msgpack.unpackb(state["params_ema"]["Conv_0"]["bias"].data, raw=True)
    bias = np.frombuffer(buf, np.dtype(dtype.decode())).reshape(shape).copy()
    bias[0] = np.nan
    state["params_ema"]["Conv_0"]["bias"] = _ndarray(bias)
    path = _write(tmp_path, state, "nan.msgpack")
    _one_line(lambda: load_score_sde(path, config_of("vp_ddpmpp")),
              "parameter Conv_0/bias holds non-finite values")
    load_score_sde(path, config_of("vp_ddpmpp"), ema=False)  # the raw weights are finite


def test_npz_given_as_checkpoint_is_named(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, images=np.zeros((2, 2), np.int32))
    with pytest.raises(ScoreSDEImportError, match="numpy .npz archive, not a model checkpoint"
                                                  ) as info:
        load_score_model(path)
    assert "is a checkpoint of the paper's code" not in str(info.value)
    npy = tmp_path / "data.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(pf.CheckpointError, match="bad magic"):
        load_score_model(npy)


@pytest.mark.parametrize("name", ["digits-vp", "digits-color-vp"])
def test_shipped_models_load_well_within_the_bounds(name, monkeypatch):
    """The bounds leave room: a shipped U-Net builds in under a third of its call budget (so
    also in a fresh process, where first calls import more)."""
    budgets = []
    build = _checkpoint._bounded_build

    def spy(fn, budget):
        budgets.append(budget)
        return build(fn, budget // 3)

    monkeypatch.setattr(_checkpoint, "_bounded_build", spy)
    model, sde = pf.load_pretrained(name)
    assert budgets == [_checkpoint._BUILD_CALLS + _checkpoint._BUILD_CALLS_PER_LEAF * 113]  # arrays
    assert model.shape[:2] == (8, 8)
