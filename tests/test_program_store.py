"""The store of traced programs (`_program_store.py`): a stored solve is the same program as the
plain `eqx.filter_jit` one (bit for bit, in one process), is loaded instead of traced, and is
never used where its key could not pin its code (a user's own model class)."""

import diffrax
import equinox as eqx
import jax
import jax.monitoring
import numpy as np
import pytest

import probflow as pf
from probflow import _flow, _likelihood, _program_store

_X_INT = np.array([[3, 9], [12, 5], [0, 16], [7, 7]])


@pytest.fixture
def traces():
    """The names of the functions JAX traces while the test runs."""
    names = []

    def listener(event: str, duration_secs: float, **kw: str | int) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            names.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def store(tmp_path):
    path = _program_store.open_program_store(tmp_path / "programs")
    _forget_loaded()
    yield path
    _program_store.close_program_store()


def _forget_loaded():
    """As a new process: nothing held in memory, only the files."""
    for wrapper in (_likelihood._log_likelihood, _flow._encode, _flow._decode):
        assert isinstance(wrapper, _program_store._StoredJit)
        wrapper._loaded.clear()
        wrapper._not_stored.clear()


def _bpd(model, sde, rtol=1e-3):
    r = pf.bits_per_dim(model, sde, _X_INT, key=jax.random.key(3), num_bins=17, rtol=rtol,
                        atol=rtol)
    return np.asarray(r.bpd), np.asarray(r.nfe)


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
    (path,) = store.glob("*.jaxexport")  # the likelihood solve
    assert traces.count("flat") == 1  # traced once, to be exported
    _forget_loaded()
    traces.clear()
    loaded = _bpd(model, sde)
    assert "flat" not in traces and "_log_likelihood" not in traces  # loaded, not traced
    for a, b, c in zip(plain, exported, loaded):
        np.testing.assert_array_equal(a, b)  # the same program, run in one process
        np.testing.assert_array_equal(a, c)
    # The tolerances are arrays of the plan: another one runs the same program.
    _bpd(model, sde, rtol=1e-4)
    assert list(store.glob("*.jaxexport")) == [path] and "flat" not in traces
    # A damaged file (one flipped byte: its checksum no longer matches) is traced again.
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    _forget_loaded()
    again = _bpd(model, sde)
    assert traces.count("flat") == 1
    np.testing.assert_array_equal(plain[0], again[0])
    assert _program_store._read(path) is not None  # written again, whole
    # Another solve is another program, stored beside the first.
    pf.encode(model, sde, _X_INT / 16.0, solver=diffrax.Heun(), steps=6)
    assert len(list(store.glob("*.jaxexport"))) == 2 and traces.count("flat") == 2


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
    assert not list(store.glob("*.jaxexport"))
    with pytest.raises(_program_store._NotStorable):
        _program_store._describe(lambda x: x)


def test_store_programs_argument(tmp_path):
    with pytest.raises(ValueError, match="store_programs must be True or False"):
        pf.enable_compilation_cache(tmp_path, store_programs="yes")  # type: ignore[arg-type]
