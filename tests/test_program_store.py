"""The store of traced programs (`_program_store.py`): a stored solve is the same program as the
plain `eqx.filter_jit` one (bit for bit, in one process), is loaded instead of traced, and is
never used where its key could not pin its code (a user's own model class)."""

import os
import subprocess
import sys

import diffrax
import equinox as eqx
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow import _distributed, _evaluate, _flow, _likelihood, _program_store
from probflow.models import UNet

_X_INT = np.array([[3, 9], [12, 5], [0, 16], [7, 7]])


def _function_names(event: str):
    """The names of the functions of JAX's duration `event` while the test runs."""
    names = []

    def listener(name: str, duration_secs: float, **kw: str | int) -> None:
        if name == event:
            names.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def traces():
    """The names of the functions JAX traces while the test runs."""
    yield from _function_names("/jax/core/compile/jaxpr_trace_duration")


@pytest.fixture
def lowerings():
    """The names of the functions JAX lowers to MLIR while the test runs."""
    yield from _function_names("/jax/core/compile/jaxpr_to_mlir_module_duration")


@pytest.fixture
def store(tmp_path):
    path = _program_store.open_program_store(tmp_path / "programs")
    _forget_loaded()
    yield path
    _program_store.close_program_store()


def _forget_loaded():
    """As a new process: nothing held in memory, only the files."""
    for wrapper in (_likelihood._log_likelihood, _likelihood._dequantize,
                    _likelihood._row_keys, _likelihood._bits_per_dim_of, _flow._encode,
                    _flow._decode, _distributed.image_keys, _evaluate._choose):
        assert isinstance(wrapper, _program_store._StoredJit)
        wrapper._loaded.clear()
        wrapper._not_stored.clear()


def _bpd(model, sde, rtol=1e-3):
    r = pf.bits_per_dim(model, sde, _X_INT, key=jax.random.key(3), num_bins=17, rtol=rtol,
                        atol=rtol)
    return np.asarray(r.bpd), np.asarray(r.nfe)


def _solve_files(store):
    """The likelihood solve's traced program and its executable for this machine."""
    (key,) = _likelihood._log_likelihood._loaded
    return (store / (key + _program_store._SUFFIX),
            store / f"{key}-{_program_store._machine()}{_program_store._EXE_SUFFIX}")


def test_stored_programs_are_the_plain_programs_and_load_without_tracing(
    mixture2d, store, traces
):
    sde = pf.VPSDE()
    model = pf.MixtureScore(mixture2d, sde)
    # JAX's cache, so that the programs loaded below are compiled once (conftest turns it off).
    pf.enable_compilation_cache(store.parent / "compiled", store_programs=False)
    plain = _bpd(model, sde)
    _program_store.open_program_store(store)
    traces.clear()
    exported = _bpd(model, sde)
    path, exe = _solve_files(store)
    programs = sorted(store.glob("*.jaxexport"))
    # The solve, the dequantization and the bits/dim formula: each traced once, to be exported.
    assert path in programs and len(programs) == 3
    assert [traces.count(f) for f in ("_log_likelihood", "_dequantize", "_bits_per_dim_of")] == [
        1, 1, 1]
    # The mixture's score calls LAPACK (a Cholesky factor): its solve keeps no executable.
    assert not exe.exists() and len(list(store.glob("*.xlaexe"))) == 2
    _forget_loaded()
    traces.clear()
    loaded = _bpd(model, sde)
    assert not {"_log_likelihood", "_dequantize", "_bits_per_dim_of"} & set(traces)  # loaded
    for a, b, c in zip(plain, exported, loaded):
        np.testing.assert_array_equal(a, b)  # the same program, run in one process
        np.testing.assert_array_equal(a, c)
    # The tolerances are arrays of the plan: another one runs the same program.
    _bpd(model, sde, rtol=1e-4)
    assert sorted(store.glob("*.jaxexport")) == programs and "_log_likelihood" not in traces
    # A damaged file (one flipped byte: its checksum no longer matches) is traced again.
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    _forget_loaded()
    again = _bpd(model, sde)
    assert traces.count("_log_likelihood") == 1
    np.testing.assert_array_equal(plain[0], again[0])
    assert _program_store._read(path) is not None  # written again, whole
    # Another solve is another program, stored beside the first.
    pf.encode(model, sde, _X_INT / 16.0, solver=diffrax.Heun(), steps=6)
    assert len(list(store.glob("*.jaxexport"))) == 4 and traces.count("_encode") == 1


@pytest.fixture(scope="module")
def tiny_unet():
    sde = pf.VPSDE()
    return UNet(sde=sde, channels=(8,), key=jax.random.key(5)), sde


_DIGITS = np.random.default_rng(0).integers(0, 17, size=(2, 8, 8, 1))


def _unet_bpd(model, sde):
    r = pf.bits_per_dim(model, sde, _DIGITS, key=jax.random.key(3), num_bins=17, rtol=1e-2,
                        atol=1e-2)
    return np.asarray(r.bpd), np.asarray(r.nfe)


def test_executables_run_as_they_are_stored(tiny_unet, store, lowerings, monkeypatch):
    """A U-Net's solve is stored with its executable; a new process runs it with nothing
    lowered or looked up, and the same numbers. A damaged executable is compiled again; another
    machine (another CPU, jaxlib or XLA_FLAGS: `_machine`) compiles its own beside it."""
    model, sde = tiny_unet
    # JAX's cache, so that each program is compiled once (conftest turns it off).
    pf.enable_compilation_cache(store.parent / "compiled", store_programs=False)
    _program_store.open_program_store(store)
    first = _unet_bpd(model, sde)
    path, exe = _solve_files(store)
    assert path.is_file() and exe.is_file()
    _forget_loaded()
    lowerings.clear()
    loaded = _unet_bpd(model, sde)
    assert lowerings == []  # no program lowered, none looked up in JAX's cache
    for a, b in zip(first, loaded):
        np.testing.assert_array_equal(a, b)  # the same program, run in one process
    # A damaged executable (one flipped byte) is compiled again and written again, whole.
    blob = bytearray(exe.read_bytes())
    blob[-10] ^= 0xFF
    exe.write_bytes(bytes(blob))
    _forget_loaded()
    again = _unet_bpd(model, sde)
    assert lowerings == ["jit(call)"]
    np.testing.assert_array_equal(first[0], again[0])
    assert _program_store._read_payload(exe, _program_store._EXE_MAGIC) is not None
    # Another machine: its own executable beside the first, from the same traced program.
    monkeypatch.setattr(_program_store, "_machine", lambda: "another-machine")
    _forget_loaded()
    other = _unet_bpd(model, sde)
    assert _solve_files(store) == (path, store / f"{path.stem}-another-machine.xlaexe")
    assert exe.is_file() and _solve_files(store)[1].is_file()
    np.testing.assert_array_equal(first[0], other[0])


def test_the_machine_digest_follows_xla_flags(monkeypatch):
    _program_store._machine.cache_clear()
    here = _program_store._machine()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=SSE4_2")
    _program_store._machine.cache_clear()
    assert _program_store._machine() != here
    monkeypatch.undo()
    _program_store._machine.cache_clear()
    assert _program_store._machine() == here


def _solve_3x3(a, b):
    return jnp.linalg.solve(a, b)


def test_a_program_that_calls_lapack_keeps_no_executable(store):
    """LAPACK is set up while JAX lowers a program: such a program is stored traced only and
    runs through JAX's cache."""
    solve = _program_store.stored_jit(_solve_3x3)
    a = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    b = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(solve(a, b)), np.linalg.solve(a, b), rtol=1e-5)
    assert len(list(store.glob("*.jaxexport"))) == 1 and not list(store.glob("*.xlaexe"))


class _OwnScore(eqx.Module):
    """A model class of the user's own: its code can change under the same name."""

    mixture: pf.GaussianMixture
    sde: pf.VPSDE

    def __call__(self, t, x):
        return 0.5 * pf.MixtureScore(self.mixture, self.sde)(t, x)


def test_a_users_model_class_is_never_stored(mixture2d, store):
    sde = pf.VPSDE()
    r = pf.bits_per_dim(_OwnScore(mixture2d, sde), sde, _X_INT, key=jax.random.key(0),
                        num_bins=17, rtol=1e-3, atol=1e-3)
    assert np.isfinite(np.asarray(r.bpd)).all()
    # The solve takes the model: not stored (the dequantization and the formula are).
    assert not _likelihood._log_likelihood._loaded
    assert len(list(store.glob("*.jaxexport"))) == 2
    with pytest.raises(_program_store._NotStorable):
        _program_store._describe(lambda x: x)


def test_store_programs_argument(tmp_path):
    with pytest.raises(ValueError, match="store_programs must be True or False"):
        pf.enable_compilation_cache(tmp_path, store_programs="yes")  # type: ignore[arg-type]


_TWO_DEVICES = """
import sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from probflow import _program_store
from probflow._likelihood import _bits_per_dim_of
_program_store.open_program_store(tempfile.mkdtemp())
args = (jnp.arange(4.0).reshape(4, 1), jnp.ones((4,)), jnp.ones((4,), jnp.int32),
        jnp.ones((4,), jnp.int32))
first = _bits_per_dim_of(*args, 1, 2, 0.5)
_bits_per_dim_of._loaded.clear()  # as a new process: the files only
loaded = _bits_per_dim_of(*args, 1, 2, 0.5)
(entry,) = _bits_per_dim_of._loaded.values()
elsewhere = _bits_per_dim_of(*jax.device_put(args, jax.devices()[1]), 1, 2, 0.5)
same = all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in
           zip(jax.tree.leaves(first), jax.tree.leaves(loaded), jax.tree.leaves(elsewhere)))
print("RESULT", entry[1] is not None, jax.tree.leaves(loaded)[0].devices() == {jax.devices()[0]},
      jax.tree.leaves(elsewhere)[0].devices() == {jax.devices()[1]}, same)
"""


def test_executables_on_a_machine_with_two_devices():
    """With two devices an executable is loaded for the first (JAX's default) and runs there;
    arrays on the other device run the stored program jitted where they are, with the same
    numbers."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("RESULT")[1].split() == ["True"] * 4
