"""Stored traced programs: a solve traced once is kept on disk (`jax.export`), so that a new
process skips tracing and lowering it, as JAX's persistent cache lets it skip compiling it.

With the persistent cache alone, a warm new process still traces and lowers every solve, since
JAX needs the lowered program to look it up; for a U-Net likelihood solve that is most of a warm
start (docs/benchmarks.md, "Time to first result"). `stored_jit(fn)` is `eqx.filter_jit(fn)`
while no store is open. With one open (`pf.enable_compilation_cache`, `store_programs=True`),
a call's arguments are split into arrays and everything else, as `eqx.filter_jit` does, and the
program is looked up by a key made of: everything else, described exactly; the arrays' shapes,
dtypes and weak types; a digest of probflow's source; the versions of Python, jax, jaxlib,
equinox, diffrax, lineax and numpy; the device's platform and kind; and JAX's flags that change
what a trace makes.

A program is stored only if everything static in its arguments is named by probflow, JAX,
equinox, diffrax or numpy: a model class or a function of the user's own is traced every
time, since its code can change between runs under the same name. Arrays spread over several
devices or processes are traced every time too (the stored program is for one device). A store
that cannot be read or written is skipped, never an error: the solve is then traced as usual.

Beside each traced program the store keeps its compiled executable for this machine
(`jax.experimental.serialize_executable`), so that a new process skips lowering the program
and JAX's cache lookup too: it reads the executable and runs it. An executable is specific to
the machine that compiled it, so its file name adds a digest of jaxlib's version, the
backend's platform and version, `XLA_FLAGS` and the CPU's feature flags (`_machine`); another
machine, or the same one under another `XLA_FLAGS`, compiles its own. A program that calls
LAPACK (which JAX sets up while lowering) is loaded through JAX's cache instead.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.export
import jax.numpy as jnp
import numpy as np
from jax.experimental import serialize_executable

from ._failures import Failure

__all__ = ["close_program_store", "open_program_store", "program_store", "stored_jit"]

#: Top-level packages whose classes and functions may stand in a stored program's key: their
#: code is pinned by the versions (or, for probflow, the source digest) in the key.
_KNOWN_PACKAGES = frozenset(
    {"probflow", "jax", "jaxlib", "equinox", "diffrax", "lineax", "optimistix", "numpy",
     "builtins", "math", "operator"}
)
_VERSIONED = ("jax", "jaxlib", "equinox", "diffrax", "lineax", "numpy")
#: The environment variables that change what XLA compiles.
_COMPILE_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
#: JAX flags that change what a trace produces.
_TRACE_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
                "jax_numpy_dtype_promotion", "jax_default_prng_impl",
                "jax_threefry_partitionable")
# A file: its magic line, the payload's sha256 in hex and a newline, then the payload.
_MAGIC = b"probflow-program-1\n"  # a traced program (jax.export)
_EXE_MAGIC = b"probflow-executable-1\n"  # a compiled executable (serialize_executable)
_SUFFIX = ".jaxexport"
_EXE_SUFFIX = ".xlaexe"

_store: Path | None = None


class _NotStorable(Exception):
    """The call's static arguments cannot be named stably across processes."""


def open_program_store(path: str | os.PathLike) -> Path:
    """Store traced programs in `path` (created if missing) from now on in this process."""
    global _store
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _register_outputs()
    _store = directory
    return directory


def close_program_store() -> None:
    """Trace every solve again, as without a store (the files stay on disk)."""
    global _store
    _store = None


def program_store() -> Path | None:
    """The open store's directory, None if none is open."""
    return _store


# ------------------------------------------------------------------------ the program's key


def _name(obj) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)) or "<" in qualname:
        raise _NotStorable  # a lambda or a local function: no stable name
    if module.split(".")[0] not in _KNOWN_PACKAGES:
        raise _NotStorable  # the user's own code, which may change under the same name
    return f"{module}.{qualname}"


_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, np.ufunc,
                   type(jax.jit(lambda x: x)))


def _describe(obj) -> Any:
    """A JSON-able description that is equal in two processes exactly when `obj` is."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return f"{type(obj).__name__}:{obj!r}"
    if isinstance(obj, (tuple, list)):
        return [type(obj).__name__, *map(_describe, obj)]
    if isinstance(obj, dict):
        return ["dict", *sorted(([_describe(k), _describe(v)] for k, v in obj.items()),
                                key=json.dumps)]
    if isinstance(obj, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
        return ["ndarray", obj.dtype.str, list(obj.shape), digest]
    if isinstance(obj, (np.dtype, np.generic)):
        return f"{type(obj).__name__}:{obj!r}"
    if isinstance(obj, type):
        return f"type:{_name(obj)}"
    if isinstance(obj, enum.Enum):
        return f"enum:{_name(type(obj))}.{obj.name}"
    if isinstance(obj, functools.partial):
        return ["partial", _describe(obj.func), _describe(obj.args), _describe(obj.keywords)]
    if isinstance(obj, _FUNCTION_TYPES):
        return f"function:{_name(obj)}"
    text = repr(obj)
    if "0x" in text:
        raise _NotStorable  # an address: not the same in another process
    return f"{_name(type(obj))}:{text}"


def _describe_tree(treedef, leaves) -> Any:
    """The tree's structure with its static leaves described and its arrays as (shape,
    dtype, weak type)."""
    node = treedef.node_data()
    if node is None:  # a leaf
        leaf = next(leaves)
        if isinstance(leaf, jax.Array):
            return ["array", list(leaf.shape), str(leaf.dtype), jax.typeof(leaf).weak_type]
        return _describe(leaf)
    kind, aux = node
    return [_name(kind), _describe(aux), *(_describe_tree(c, leaves) for c in treedef.children())]


@functools.cache
def _source_digest() -> str:
    """sha256 of probflow's Python source, so that a stored program changes with the code."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def _versions() -> list[str]:
    found = []
    for package in _VERSIONED:
        try:
            found.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{package}=none")
    return [platform.python_version(), *found, _source_digest()]


def _cpu_features() -> str:
    """The CPU's feature flags (Linux's /proc/cpuinfo), else what `platform` says of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.partition(":")[2].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


@functools.cache
def _machine() -> str:
    """A digest of what a compiled executable is specific to (see the module docstring)."""
    client = jax.devices()[0].client
    described = [_versions(), client.platform, client.platform_version,
                 [os.environ.get(name, "") for name in _COMPILE_ENV], _cpu_features()]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def _home():
    """The device an executable of the store runs on: JAX's first device (a stored program
    called with arrays elsewhere runs jitted, as JAX places it)."""
    return jax.devices()[0]


def _key(name: str, treedef, leaves) -> str:
    device = jax.devices()[0]
    described = [
        name, _versions(), device.platform, device.device_kind,
        [str(getattr(jax.config, flag, None)) for flag in _TRACE_FLAGS],
        _describe_tree(treedef, iter(leaves)),
    ]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


# ------------------------------------------------------------------------------ the files


def _read_payload(path: Path, magic: bytes) -> bytes | None:
    """The payload of the file at `path`, None if it is missing or damaged."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    header = len(magic) + 64 + 1
    if not blob.startswith(magic) or len(blob) < header:
        return None
    payload = blob[header:]
    if hashlib.sha256(payload).hexdigest().encode() != blob[len(magic):header - 1]:
        return None
    return payload


def _read(path: Path):
    """The stored program at `path`, None if it is missing or damaged."""
    payload = _read_payload(path, _MAGIC)
    if payload is None:
        return None
    try:
        return jax.export.deserialize(bytearray(payload))
    except Exception:  # written by another version of the format: trace again
        return None


def _read_executable(path: Path, exported, specs: list):
    """The executable of `exported` stored at `path`, None if it is missing, damaged or not
    loadable here."""
    payload = _read_payload(path, _EXE_MAGIC)
    if payload is None:
        return None
    try:
        return serialize_executable.deserialize_and_load(
            payload, jax.tree.structure((tuple(specs), {})), exported.out_tree,
            execution_devices=[_home()])
    except Exception:  # another jaxlib's format: compile again
        return None


def _write(path: Path, payload: bytes, magic: bytes = _MAGIC) -> None:
    """Write atomically (a file that is there is whole); a full disk only skips the store."""
    blob = magic + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


@functools.cache
def _register_outputs() -> None:
    """The output types of stored programs, so that `jax.export` can serialise their trees
    (once, when a store is first opened: importing probflow starts no JAX backend)."""
    node = jax.tree.structure(Failure(0, 0.0)).node_data()  # pyright: ignore[reportArgumentType]
    assert node is not None
    aux = node[1]
    try:
        jax.export.register_pytree_node_serialization(
            Failure, serialized_name="probflow.Failure",
            serialize_auxdata=lambda _: b"", deserialize_auxdata=lambda _: aux,
        )
    except ValueError:  # registered already (a reloaded module)
        pass


# --------------------------------------------------------------------------- the wrapper


class _StoredJit:
    """`eqx.filter_jit(fn)`, looked up in the open program store first."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self._jit = eqx.filter_jit(fn)
        self._name = f"{fn.__module__}.{fn.__qualname__}"
        # key -> (the stored program's jitted call, its executable for `_home` or None)
        self._loaded: dict[str, tuple[Callable, Callable | None]] = {}
        self._not_stored: set[str] = set()
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        store = _store
        if store is None:
            return self._jit(*args)
        leaves, treedef = jax.tree.flatten(args)
        leaves = [jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x
                  for x in leaves]
        arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
        if jax.process_count() > 1 or any(
            isinstance(leaves[i], jax.core.Tracer) or len(leaves[i].sharding.device_set) > 1
            for i in arrays
        ):  # inside another trace, or spread over devices: as without a store
            return self._jit(*args)
        try:
            key = _key(self._name, treedef, leaves)
        except Exception:  # _NotStorable, or a tree this description does not know: no store
            return self._jit(*args)
        if key in self._not_stored:
            return self._jit(*args)
        loaded = self._loaded.get(key)
        if loaded is None:
            loaded = self._load_or_export(store, key, treedef, leaves, arrays)
            if loaded is None:
                self._not_stored.add(key)
                return self._jit(*args)
            self._loaded[key] = loaded
        call, executable = loaded
        dynamic = [leaves[i] for i in arrays]
        home = {_home()}
        if executable is not None and all(x.sharding.device_set == home for x in dynamic):
            return executable(*dynamic)
        return call(*dynamic)  # arrays on another device: the stored program, jitted there

    def lower(self, *args):
        """The plain jit's lowering (as `eqx.filter_jit(fn).lower`), for inspection."""
        return self._jit.lower(*args)

    def _load_or_export(self, store, key, treedef, leaves, arrays):
        path = store / (key + _SUFFIX)
        specs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype,
                                      weak_type=jax.typeof(leaves[i]).weak_type)
                 for i in arrays]
        exported = _read(path)
        if exported is None:
            fn = self._fn

            def flat(*dynamic):
                full = list(leaves)
                for i, x in zip(arrays, dynamic):
                    full[i] = x
                return fn(*jax.tree.unflatten(treedef, full))

            flat.__name__ = flat.__qualname__ = fn.__name__  # JAX's events name the function
            try:
                exported = jax.export.export(jax.jit(flat))(*specs)
                payload = exported.serialize()
            except Exception:
                # Not exportable (an error of the inputs, a custom call without a stability
                # guarantee, an output type export cannot name): the plain jit runs the call
                # and raises whatever error it has.
                return None
            _write(path, bytes(payload))
        call = jax.jit(exported.call)
        if b"lapack" in exported.mlir_module_serialized:
            return call, None  # LAPACK is set up by lowering: through JAX's cache
        # The executable runs on the default device (`_home`), where the arrays usually are.
        home = jax.sharding.SingleDeviceSharding(_home())
        specs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=home, weak_type=s.weak_type)
                 for s in specs]
        exe_path = store / f"{key}-{_machine()}{_EXE_SUFFIX}"
        compiled = _read_executable(exe_path, exported, specs)
        if compiled is None:
            try:
                compiled = call.lower(*specs).compile()
                payload, _, _ = serialize_executable.serialize(compiled)
            except Exception:  # an executable that cannot be serialised: JAX's cache only
                return call, None
            _write(exe_path, payload, _EXE_MAGIC)
        return call, compiled


def stored_jit(fn: Callable) -> Callable:
    """`eqx.filter_jit(fn)` that uses the open program store (positional arguments only)."""
    return _StoredJit(fn)

