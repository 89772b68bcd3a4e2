"""Persistent XLA compilation cache: on by default for the CLI, the test suite and library users.

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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax

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
