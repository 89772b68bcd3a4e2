"""Atomic outputs: write to a temporary sibling, then rename, so nothing is ever half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from unmerge_jax.errors import UnmergeError


@contextlib.contextmanager
def atomic_file(path, *, force: bool = True, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Args:
      path: final file path.
      force: when False, refuse to replace an existing file.
      suffix: suffix for the temporary name (some writers, e.g. ``np.savez``, append ``.npz``
        unless the name already ends with it).
    """
    path = Path(path)
    if path.exists() and not force:
        raise UnmergeError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path, *, force: bool = False):
    """Yield a temporary directory beside ``path``; move it onto ``path`` when the block succeeds.

    An existing ``path`` is replaced only with ``force=True`` (and only after success).
    """
    path = Path(path)
    if path.exists() and not force:
        raise UnmergeError(f"output {path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
