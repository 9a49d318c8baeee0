import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

import probflow as pf

# Every test process (each xdist worker, and the probflow commands it starts) gets its own JAX
# persistent compilation cache: the CLI turns the cache on in-process, and a cache shared with
# other test runs or the user's own (written while it is read) must not leak into the suite.
os.environ["PROBFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="probflow-test-cache-")
atexit.register(shutil.rmtree, os.environ["PROBFLOW_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def mixture2d():
    """A 2-d, two-component mixture with correlated covariances."""
    return pf.GaussianMixture(
        [0.3, 0.7],
        [[-1.0, 0.5], [1.5, -0.5]],
        [np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]],
    )


ALL_SDES = [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE()]
SDE_IDS = ["vp", "subvp", "ve"]


@pytest.fixture(params=ALL_SDES, ids=SDE_IDS)
def sde(request):
    return request.param


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the previous setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)
