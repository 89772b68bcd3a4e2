"""Persistent XLA compilation cache for the CLI and the test suite.

Solvers are compiled once per (method, K, T, grid size, seeds); across processes (CLI calls, CI
runs) the persistent cache turns the 1–3 s compiles into millisecond loads. Libraries importing
``unmerge_jax`` are not affected unless they call :func:`enable_compilation_cache` themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
    root = os.environ.get("UNMERGE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "unmerge_jax" / "xla"


def enable_compilation_cache(path=None) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (default: ``~/.cache/unmerge_jax/xla``).

    Set ``UNMERGE_COMPILE_CACHE=0`` to disable. Returns the directory used, or None.
    """
    if os.environ.get("UNMERGE_COMPILE_CACHE", "1") in ("0", "false", "no"):
        return None
    path = Path(path) if path else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
