"""Persistent caches of compiled programs: on by default for the CLI, the test suite and library users.

Solvers are compiled once per (program, K, and the buckets of T, grid size and seeds, see
``unmerge_jax.solve.bucket``); across processes (CLI calls, CI runs, a user's scripts) the
persistent cache turns the compiles into loads of a few milliseconds each.
Importing ``unmerge_jax`` calls :func:`enable_by_default`, which points JAX's cache at
``~/.cache/unmerge_jax/xla`` (``$UNMERGE_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move it) — a per-user
directory — unless

* ``UNMERGE_COMPILE_CACHE=0`` (or ``false``/``no``) is set: the opt-out;
* the process already chose a cache (``jax_compilation_cache_dir`` set, e.g. by
  ``JAX_COMPILATION_CACHE_DIR``): that choice is kept;
* the directory cannot be created or written (a read-only home): nothing is enabled, no error.

:func:`enable_compilation_cache` points it anywhere else explicitly.

The XLA cache keys a program by its lowered module, so a process must still *trace* and lower
every program before it can load one — for the solvers' vmapped loops that costs more than the
load itself (0.2–0.5 s per solver program). :func:`cached_program` therefore also keeps whole
compiled programs (``jax.experimental.serialize_executable``) in ``programs/`` inside the XLA
cache directory, keyed without tracing: by the program's name, static arguments, argument
shapes/dtypes and compiler options, and by everything around them that could change what they
compile to — the JAX/jaxlib/Python versions, the backend, its devices and ``XLA_FLAGS``, JAX's
trace-affecting flags (``jax_enable_x64`` among them) and a hash of this package's source, so an
edit or an upgrade never loads a stale program. A second process loads each in milliseconds.
``UNMERGE_PROGRAM_CACHE=0`` turns this layer off alone (tests that count traces do); it is off
under ``jax.distributed``, and programs are kept in memory only whenever the XLA cache is off.
Like JAX's own cache, the directory holds executables: keep it private.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

OFF = ("0", "false", "no")


def default_cache_dir() -> Path:
    root = os.environ.get("UNMERGE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "unmerge_jax" / "xla"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def enable_compilation_cache(path=None) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (default: ``~/.cache/unmerge_jax/xla``).

    Set ``UNMERGE_COMPILE_CACHE=0`` to disable. Returns the directory used, or None (disabled, or
    the directory is not writable).
    """
    if os.environ.get("UNMERGE_COMPILE_CACHE", "1").lower() in OFF:
        return None
    path = Path(path) if path else default_cache_dir()
    if not _writable(path):
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, however quick to compile: a second process then compiles nothing, and a
    # cache hit (a few ms) is cheaper than even a 0.1 s compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def enable_by_default() -> Path | None:
    """What ``import unmerge_jax`` does: :func:`enable_compilation_cache` at the default directory,
    unless opted out or the process already set a cache directory. Returns the directory or None."""
    if jax.config.jax_compilation_cache_dir:
        return None
    return enable_compilation_cache()


# ------------------------------------------------------------------------------------------------
# Compiled programs, stored whole.
# ------------------------------------------------------------------------------------------------

_PROGRAMS: dict = {}  # key -> jax.stages.Compiled
_LOADED: set = set()  # keys whose program came from disk


def programs_enabled() -> bool:
    """False when ``UNMERGE_PROGRAM_CACHE=0`` or under ``jax.distributed`` (several processes: a
    stored program names devices, which another process may not address): :func:`cached_program`
    is then a plain jit call."""
    return os.environ.get("UNMERGE_PROGRAM_CACHE", "1").lower() not in OFF and jax.process_count() == 1


def program_cache_dir() -> Path | None:
    """Where :func:`cached_program` keeps compiled programs: ``programs/`` in the XLA cache
    directory; None (programs kept in this process only) when the XLA cache is off."""
    if not programs_enabled() or os.environ.get("UNMERGE_COMPILE_CACHE", "1").lower() in OFF:
        return None
    root = jax.config.jax_compilation_cache_dir
    return Path(root) / "programs" if root else None


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """sha256 of every ``.py`` file of this package and of its ``kernels`` subpackage (which may
    install from another directory), as sorted relative paths and contents."""
    import importlib.util

    h = hashlib.sha256()
    roots = {Path(__file__).resolve().parent}
    spec = importlib.util.find_spec("unmerge_jax.kernels")
    if spec and spec.origin:
        roots.add(Path(spec.origin).resolve().parent)
    for root in sorted(roots):
        for f in sorted(root.rglob("*.py")):
            h.update(f"{root.name}/{f.relative_to(root)}".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _environment() -> tuple:
    """Everything outside a program's arguments that can change what it compiles to."""
    import jaxlib
    from jax._src import config as jax_config

    devices = jax.devices()
    dev = devices[0]
    # JAX's own trace-affecting flags; skip entries whose repr is an object address.
    flags = tuple(r for r in map(repr, jax_config.trace_context()) if " at 0x" not in r)
    return (jax.__version__, jaxlib.__version__, sys.version, dev.platform, dev.device_kind, len(devices),
            getattr(dev.client, "platform_version", ""), os.environ.get("XLA_FLAGS", ""), flags, _source_hash())


def _program_key(name: str, specs, static: dict, compiler_options) -> str:
    leaves, tree = jax.tree_util.tree_flatten(specs)
    shapes = (str(tree), tuple((s.shape, str(s.dtype)) for s in leaves))
    text = repr((name, sorted(static.items()), shapes, sorted((compiler_options or {}).items()), _environment()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _program_devices(compiled) -> list[int]:
    """Ids of the devices a compiled program runs on (from its input shardings)."""
    ids = {d.id for sh in jax.tree_util.tree_leaves(compiled.input_shardings) for d in sh.device_set}
    return sorted(ids) or [jax.devices()[0].id]


def load_program(path: Path):
    """A stored program, or None (missing, truncated, or not loadable here: it is compiled again)."""
    from jax.experimental import serialize_executable

    try:
        blob, in_tree, out_tree, ids = pickle.loads(path.read_bytes())
        by_id = {d.id: d for d in jax.devices()}
        return serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                         execution_devices=[by_id[i] for i in ids])
    except Exception:
        return None


def _store_program(path: Path, compiled) -> None:
    from jax.experimental import serialize_executable

    try:
        blob = pickle.dumps((*serialize_executable.serialize(compiled), _program_devices(compiled)))
    except Exception:  # this backend's executables do not serialise: keep it in this process only
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            tmp = f.name
            f.write(blob)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or a whole one
    except OSError:  # a full or read-only disk costs a compile next time, nothing else
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _spec(a) -> jax.ShapeDtypeStruct:
    dtype = a.dtype if isinstance(a, jax.Array) else np.result_type(a)  # typed PRNG keys keep theirs
    return jax.ShapeDtypeStruct(np.shape(a), dtype)


class ProgramRequest(NamedTuple):
    """One call of a jitted function, as :func:`cached_program` and :func:`compile_programs` take it."""

    jitted: Any
    name: str
    args: tuple
    static: dict
    compiler_options: dict | None = None
    donate: tuple = ()  # positions in ``args`` the program donates

    def specs(self) -> tuple:
        return jax.tree_util.tree_map(_spec, self.args)

    def key(self) -> str:
        return _program_key(self.name, self.specs(), self.static, self.compiler_options)


def compile_programs(requests) -> None:
    """Load or compile the programs of several requests at once, compiling in parallel.

    Tracing and lowering hold the GIL; XLA's compile and its loading of a stored program do not.
    So stored programs load on a pool of one thread per core, and each missing one is lowered on
    this thread while those lowered before it compile on the pool. Loads and compiles what
    :func:`cached_program` would; results are the same.
    """
    if not programs_enabled():
        return
    where = program_cache_dir()
    todo = {}
    for req in requests:
        key = req.key()
        if key not in _PROGRAMS:
            todo.setdefault(key, req)
    if not todo:
        return
    pending = {}
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unmerge-compile") as pool:
        # Stored programs load side by side too (XLA links each one without the GIL).
        loads = {key: pool.submit(load_program, where / key) for key in todo} if where else {}
        for key, req in todo.items():
            program = loads[key].result() if where else None
            if program is not None:
                _PROGRAMS[key] = program
                _LOADED.add(key)
                continue
            lowered = req.jitted.trace(*req.specs(), **req.static).lower()
            pending[key] = pool.submit(lowered.compile)
        for key, future in pending.items():
            _PROGRAMS[key] = future.result()
            if where:
                _store_program(where / key, _PROGRAMS[key])


def cached_program(jitted, name: str, args, static: dict, *, compiler_options=None, donate: tuple = ()):
    """``jitted(*args, **static)``, traced, lowered and compiled at most once per key across
    processes (see the module docstring).

    Args:
      jitted: a ``jax.jit`` function whose static arguments are ``static``.
      name: a stable name of the program (part of the key).
      args: array arguments; their shapes and dtypes are part of the key.
      static: static keyword arguments (hashable, with a stable ``repr``).
      compiler_options: the XLA options ``jitted`` compiles with (part of the key).
      donate: positions in ``args`` that ``jitted`` donates (a loaded program's first run gets
        copies of them, so that a run that fails leaves them for the compiled one).

    Returns:
      What ``jitted`` returns — the same compiled program, so bit-identical results.
    """
    if not programs_enabled():
        return jitted(*args, **static)
    req = ProgramRequest(jitted, name, tuple(args), dict(static), compiler_options, tuple(donate))
    key = req.key()
    if key not in _PROGRAMS:
        compile_programs([req])
    if key not in _LOADED:
        return _PROGRAMS[key](*args)
    # The first run of a program loaded from disk waits for its result: XLA:CPU can load an
    # executable whose code this process already holds and then fail to run it ("Function …
    # not found", reported when the result is read). It is then compiled here, as without the
    # cache. Later runs dispatch asynchronously.
    _LOADED.discard(key)
    trial = [jax.tree_util.tree_map(jnp.copy, a) if i in req.donate else a for i, a in enumerate(args)]
    try:
        return jax.block_until_ready(_PROGRAMS[key](*trial))
    except jax.errors.JaxRuntimeError:
        _PROGRAMS[key] = req.jitted.trace(*req.specs(), **req.static).lower().compile()
        return _PROGRAMS[key](*args)
