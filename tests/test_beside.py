"""Work run beside the caller's (`_beside.py`): the solver check's re-solves in a second thread
give the numbers they give alone, errors come back to the caller, and a caller inside a JAX
context (thread-local) runs the work itself."""

import threading
import time

import jax
import numpy as np
import pytest

import probflow as pf
from probflow import _beside, _evaluate


def _where():
    return threading.current_thread()


def test_result_errors_and_the_thread_it_runs_in():
    here = threading.current_thread()
    beside = _beside.run_beside(_where)
    assert beside.result() is not here and beside.result().name == "probflow-beside"
    assert _beside.run_beside(_where, alone=True).result() is here

    def fails():
        raise ValueError("num_images must be >= 1, got 0")

    with pytest.raises(ValueError, match="num_images must be >= 1, got 0"):
        _beside.run_beside(fails).result()
    # JAX's contexts hold for one thread: inside one, the caller runs the work itself.
    with jax.default_matmul_precision("highest"):
        assert _beside.run_beside(_where).result() is here
    with jax.default_device(jax.devices()[0]):
        assert _beside.run_beside(_where).result() is here


def _evaluate_mixture(model, sde, x):
    ev = pf.evaluate_bits_per_dim(model, sde, x, key=jax.random.key(7), check_solver=3,
                                  num_bins=17, rtol=1e-3, atol=1e-3)
    assert ev.solver is not None
    return ev


def test_the_check_beside_the_evaluation_gives_its_numbers_alone(mixture2d, monkeypatch):
    sde = pf.VPSDE()
    model = pf.MixtureScore(mixture2d, sde)
    x = np.random.default_rng(1).integers(0, 17, size=(6, 2))
    threads = []
    tight_solve = _evaluate._tight_solve

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return tight_solve(*args, **kwargs)

    monkeypatch.setattr(_evaluate, "_tight_solve", spy)
    beside = _evaluate_mixture(model, sde, x)
    monkeypatch.setattr(_evaluate, "run_beside",
                        lambda fn, alone=False: _beside.run_beside(fn, alone=True))
    alone = _evaluate_mixture(model, sde, x)
    assert threads == ["probflow-beside", threading.current_thread().name]
    # The same programs on the same inputs, in one process: bit for bit.
    np.testing.assert_array_equal(beside.results[0].bpd, alone.results[0].bpd)
    for field in ("bpd", "bpd_tight", "nfe", "nfe_tight"):
        np.testing.assert_array_equal(getattr(beside.solver, field),
                                      getattr(alone.solver, field))
    assert beside.solver_bias == alone.solver_bias and beside.solver_bias is not None
    assert beside.solver.nfe_tight.mean() > beside.solver.nfe.mean()  # 100x tighter


def test_an_error_of_the_evaluation_waits_for_the_check(mixture2d, monkeypatch):
    """The evaluation's error leaves only once the re-solves beside it have ended: nothing is
    left running behind the caller."""
    sde = pf.VPSDE()
    model = pf.MixtureScore(mixture2d, sde)
    x = np.random.default_rng(1).integers(0, 17, size=(6, 2))
    ended = threading.Event()

    def slow_check(*args, **kwargs):
        time.sleep(0.5)
        ended.set()
        return np.arange(3), None

    def failing_evaluation(*args, **kwargs):
        raise pf.SolveError("the ODE solve reached max_steps=8 before t=1 in 6 of 6 examples")

    monkeypatch.setattr(_evaluate, "_tight_solve", slow_check)
    monkeypatch.setattr(_evaluate, "distributed_bits_per_dim", failing_evaluation)
    with pytest.raises(pf.SolveError, match="reached max_steps=8"):
        pf.evaluate_bits_per_dim(model, sde, x, key=jax.random.key(7), check_solver=3,
                                 num_bins=17)
    assert ended.is_set()
