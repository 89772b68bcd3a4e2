"""Array files: dense column inputs (``.npy``, ``.safetensors``) and ``.npz`` files with JSON metadata.

Column inputs (``unmerge decompose``/``stats``/``sweep`` on arrays), :func:`load_columns`:
  * ``.npy``: a (n,) or (n, K) array; columns are atoms/targets, named by index.
  * ``.safetensors``: each tensor is one atom/target, flattened; all must have the same number of
    elements; names are the tensor names (in file order).

``.npz`` with metadata (:func:`write_npz`, :func:`read_npz`): named arrays plus JSON fields, each
stored as a string array ``<key>_json`` — the format of saved statistics and saved masks.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_file

JSON_SUFFIX = "_json"


def load_columns(path) -> tuple[np.ndarray, list[str]]:
    """Load a matrix of column vectors and their names from ``.npy`` or ``.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise UnmergeError(f"{path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UnmergeError(f"cannot read {path} as a .npy array: {err}") from None
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise UnmergeError(f"{path} holds a {arr.ndim}-D array; expected (rows,) or (rows, columns)")
        return arr, [str(i) for i in range(arr.shape[1])]
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
                cols = [np.asarray(f.get_tensor(n)).reshape(-1) for n in names]
        except Exception as err:  # safetensors raises several types for corrupt files
            raise UnmergeError(f"cannot read {path} as safetensors: {err}") from None
        if not cols:
            raise UnmergeError(f"{path} holds no tensors")
        sizes = {c.size for c in cols}
        if len(sizes) != 1:
            raise UnmergeError(f"tensors in {path} have different sizes {sorted(sizes)}; each tensor must be one "
                               f"flattened vector of the same length")
        return np.stack(cols, axis=1), names
    raise UnmergeError(f"{path}: unsupported array file (use .npy or .safetensors)")


def write_npz(path, arrays: Mapping, meta: Mapping | None = None) -> None:
    """Write ``arrays`` and JSON-serialisable ``meta`` fields to an ``.npz``, atomically.

    Each ``meta`` field ``key`` is stored as the string array ``key_json`` (``json.dumps`` with
    sorted keys; values JSON cannot encode are written as ``str``).
    """
    out = {str(k): np.asarray(v) for k, v in arrays.items()}
    for k, v in (meta or {}).items():
        out[f"{k}{JSON_SUFFIX}"] = np.asarray(json.dumps(v, sort_keys=True, default=str))
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **out)


def read_npz(path, what: str = "file") -> tuple[dict, dict]:
    """Read an ``.npz`` written by :func:`write_npz`: ``(arrays, meta)``, both ``{key: value}``.

    Args:
      path: the file.
      what: what the file should be, for the one-line error (``"statistics file"``, ``"mask file"``).
    """
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an .npz archive")
        with z:
            arrays = {k: np.asarray(z[k]) for k in z.files if not k.endswith(JSON_SUFFIX)}
            meta = {k[:-len(JSON_SUFFIX)]: json.loads(str(z[k])) for k in z.files if k.endswith(JSON_SUFFIX)}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UnmergeError(f"cannot read {what} {path}: {err}") from None
    return arrays, meta
