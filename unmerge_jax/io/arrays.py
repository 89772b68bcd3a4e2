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
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.io.atomic import atomic_file, os_error

JSON_SUFFIX = "_json"


# What a damaged or foreign array file raises inside NumPy / zipfile: turned into one line.
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


def _read_error(path, what: str, err: Exception) -> UnmergeError:
    if isinstance(err, OSError) and err.errno is not None:
        return os_error(err, path, "read")
    detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return UnmergeError(f"cannot read {what} {path}: {detail}; the file is truncated, empty or not what it should be "
                        f"— write it again")


def load_array(path, what: str = "array file") -> np.ndarray:
    """One ``.npy`` array (no pickles), loaded in memory; a damaged file is a one-line error naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise UnmergeError(f"{what} {path} " + ("is a directory; give a .npy file" if path.is_dir()
                                                 else "does not exist"))
    try:
        arr = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise _read_error(path, what, err) from None
    if not isinstance(arr, np.ndarray):
        raise UnmergeError(f"{what} {path} is an .npz archive; give one array as .npy")
    return arr


def load_columns(path) -> tuple[np.ndarray, list[str]]:
    """Load a matrix of column vectors and their names from ``.npy`` or ``.safetensors``.

    Refused with one line: a missing, truncated or empty file, an archive or pickle, an array that
    is not (rows,) or (rows, columns), or one with no rows or no columns.
    """
    path = Path(path)
    if not path.exists():
        raise UnmergeError(f"{path} does not exist")
    if path.is_dir():
        raise UnmergeError(f"{path} is a directory; give a .npy or .safetensors array file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except _READ_ERRORS as err:
            if isinstance(err, OSError) and err.errno is not None:
                raise os_error(err, path, "read") from None
            raise UnmergeError(f"cannot read {path} as a .npy array: {err}") from None
        if not isinstance(arr, np.ndarray):
            raise UnmergeError(f"{path} is an .npz archive, not a .npy array; save the columns with np.save")
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise UnmergeError(f"{path} holds a {arr.ndim}-D array; expected (rows,) or (rows, columns)")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise UnmergeError(f"{path} holds an empty array of shape {arr.shape}; expected (rows, columns) with at "
                               f"least one of each")
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
        if sizes == {0}:
            raise UnmergeError(f"the tensors in {path} are empty; each must be one flattened vector")
        if len(sizes) != 1:
            raise UnmergeError(f"tensors in {path} have different sizes {sorted(sizes)}; each tensor must be one "
                               f"flattened vector of the same length")
        return np.stack(cols, axis=1), names
    raise UnmergeError(f"{path}: unsupported array file (use .npy or .safetensors)")


def write_npz(path, arrays: Mapping, meta: Mapping | None = None, *, inputs=()) -> None:
    """Write ``arrays`` and JSON-serialisable ``meta`` fields to an ``.npz``, atomically.

    Each ``meta`` field ``key`` is stored as the string array ``key_json`` (``json.dumps`` with
    sorted keys; values JSON cannot encode are written as ``str``). ``inputs``: paths the file must
    not overwrite or sit inside.
    """
    out = {str(k): np.asarray(v) for k, v in arrays.items()}
    for k, v in (meta or {}).items():
        out[f"{k}{JSON_SUFFIX}"] = np.asarray(json.dumps(v, sort_keys=True, default=str))
    with atomic_file(path, suffix=".npz", inputs=inputs) as tmp:
        np.savez(tmp, **out)


def read_npz(path, what: str = "file") -> tuple[dict, dict]:
    """Read an ``.npz`` written by :func:`write_npz`: ``(arrays, meta)``, both ``{key: value}``.

    Args:
      path: the file.
      what: what the file should be, for the one-line error (``"statistics file"``, ``"mask file"``).
    """
    if Path(path).is_dir():
        raise UnmergeError(f"{what} {path} is a directory; give the .npz file")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an .npz archive")
        with z:
            arrays = {k: np.asarray(z[k]) for k in z.files if not k.endswith(JSON_SUFFIX)}
            meta = {k[:-len(JSON_SUFFIX)]: json.loads(str(z[k])) for k in z.files if k.endswith(JSON_SUFFIX)}
    except _READ_ERRORS as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise os_error(err, path, "read") from None
        raise UnmergeError(f"cannot read {what} {path}: {err}") from None
    return arrays, meta
