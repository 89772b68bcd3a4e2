"""Dense arrays in: ``.npy`` matrices and ``.safetensors`` files of named vectors.

Conventions (used by ``unmerge decompose``/``sweep`` on arrays):
  * ``.npy``: a (n,) or (n, K) array; columns are atoms/targets, named by index.
  * ``.safetensors``: each tensor is one atom/target, flattened; all must have the same number of
    elements; names are the tensor names (in file order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unmerge_jax.errors import UnmergeError


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
