"""pf.enable_compilation_cache: a second new process loads every compiled program of the first
(nothing compiles again), because no compiled solve holds a host callback, and loads the traced
likelihood and encode solves from the program store instead of tracing them."""

import os
import subprocess
import sys

import pytest

import probflow as pf

# One process: turn the cache on, then solve with the library (a 2-d mixture, quick to compile),
# counting the persistent cache's hits and misses and every program JAX compiles or loads.
_PROBE = """
import sys
import jax, jax.monitoring
import numpy as np
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
traced = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: traced.append(kw.get("fun_name"))
    if name == "/jax/core/compile/jaxpr_trace_duration" else None)
import probflow as pf
pf.enable_compilation_cache(sys.argv[1])
mix = pf.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]],
                         [np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]])
sde = pf.VPSDE()
model = pf.MixtureScore(mix, sde)
x_int = np.array([[3, 9], [12, 5], [0, 16]])
key = jax.random.key(0)
r = pf.bits_per_dim(model, sde, x_int, key=key, num_bins=17, rtol=1e-3, atol=1e-3)
r2 = pf.bits_per_dim(model, sde, x_int, key=key, num_bins=17, rtol=1e-3, atol=1e-3, slots=None)
s = pf.sample_sde(model, sde, 3, (2,), key=key, steps=20)
p = pf.sample_pc(model, sde, 3, (2,), key=key, steps=20)
e = pf.encode(model, sde, np.asarray(s.x), solver=__import__("diffrax").Heun(), steps=8)
hits = events.count("/jax/compilation_cache/cache_hits")
misses = events.count("/jax/compilation_cache/cache_misses")
print("CACHE", hits, misses, float(np.mean(r.bpd)), float(np.mean(r2.bpd)),
      traced.count("_log_likelihood") + traced.count("_encode"))
"""


def _run(cache):
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(cache)], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits, misses, bpd, bpd_lockstep, solves_traced = proc.stdout.split("CACHE")[1].split()
    return int(hits), int(misses), float(bpd), float(bpd_lockstep), int(solves_traced)


def test_second_process_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    hits1, misses1, bpd1, lock1, traced1 = _run(cache)
    stored = [p for p in cache.iterdir() if p.name.endswith("-cache")]
    assert misses1 > 0 and stored  # the first process compiled and stored its programs
    # Three solves traced to be stored (bits/dim with two schedulers, encode), and stored with
    # the small programs around the likelihood (the dequantization, the bits/dim formula).
    assert traced1 == 3 and len(list((cache / "programs").glob("*.jaxexport"))) > 3
    hits2, misses2, bpd2, lock2, traced2 = _run(cache)
    assert misses2 == 0 and hits2 > 0  # the second compiles nothing: it loads every program
    assert traced2 == 0  # and traces no likelihood or encode solve: it loads them too
    # The loaded programs compute the same thing (the same program, run twice).
    assert (bpd2, lock2) == (bpd1, lock1)


def test_enable_compilation_cache_arguments(tmp_path):
    with pytest.raises(ValueError, match="min_compile_time_secs must be a number >= 0"):
        pf.enable_compilation_cache(tmp_path, min_compile_time_secs=-1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="path: cannot create the cache directory"):
        pf.enable_compilation_cache(blocker / "sub")
