"""JAX's persistent compilation cache, turned on with one call (`enable_compilation_cache`).

A new process otherwise compiles every solve again: the first `bits_per_dim` of a U-Net spends
most of its time compiling (docs/benchmarks.md, "Time to first result"). With the cache on, a
program compiled once is loaded from disk by every later process. probflow's compiled solves
hold no host callback (`_failures.py`), so JAX can store them; the command line turns the cache
on by default. The same call opens the store of traced solves (`_program_store.py`), so that a
later process need not trace them either.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._program_store import close_program_store, open_program_store

#: The environment variable that moves the cache (read by `default_cache_dir`).
CACHE_ENV = "PROBFLOW_CACHE_DIR"


def default_cache_dir() -> Path:
    """$PROBFLOW_CACHE_DIR, else $XDG_CACHE_HOME/probflow/jax, else ~/.cache/probflow/jax."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "probflow" / "jax"


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    *,
    min_compile_time_secs: float = 0.0,
    store_programs: bool = True,
) -> Path:
    """Turn on JAX's persistent compilation cache in `path`, so that later processes load
    compiled solves from disk instead of compiling them again. Returns the directory.

    **Arguments:**

    - `path`: the cache directory, created if missing (default: `$PROBFLOW_CACHE_DIR`, else
      `$XDG_CACHE_HOME/probflow/jax`, else `~/.cache/probflow/jax`).
    - `min_compile_time_secs`: store only programs that took at least this long to compile
      (JAX's default is 1 s, which would leave out the small programs around a solve; 0 stores
      every program).
    - `store_programs`: also keep the traced solves of `encode`, `decode`, `sample_ode`,
      `log_likelihood` and `bits_per_dim` (`jax.export`, in `path/programs`), so that a later
      process skips tracing them too, with their compiled executables for this machine (a
      later process skips lowering them and JAX's cache lookup). Only solves whose model, SDE
      and plan are probflow's, equinox's, diffrax's or JAX's own classes are stored; a model
      class of your own is traced in every process (its code may change under the same name).
      False: trace every solve.

    It applies to every later compilation in this process, also after earlier ones. Raises
    `ValueError` if the directory cannot be created.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if not isinstance(store_programs, bool):
        raise ValueError(f"store_programs must be True or False, got {store_programs!r}")
    if isinstance(min_compile_time_secs, bool) or not isinstance(
        min_compile_time_secs, (int, float)
    ) or not min_compile_time_secs >= 0:
        raise ValueError(
            f"min_compile_time_secs must be a number >= 0, got {min_compile_time_secs!r}"
        )
    directory = default_cache_dir() if path is None else Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"path: cannot create the cache directory {directory}: {exc}") from None
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.set_cache_dir(str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether the cache is used (at its first compilation); let it
    # decide again now that the cache is on.
    compilation_cache.reset_cache()
    if store_programs:
        try:
            open_program_store(directory / "programs")
        except OSError:  # a directory that cannot hold it: solves are traced as usual
            close_program_store()
    else:
        close_program_store()
    return directory
