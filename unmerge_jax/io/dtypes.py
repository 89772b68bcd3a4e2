"""Safetensors dtype tags: the NumPy dtype of each tag, which tags are floating point, and the
user-facing names (``bfloat16``, ``bf16``, ``torch.bfloat16``) that map to them.

The one place these facts live: the checkpoint reader, the writer and the merge driver read them
from here.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from unmerge_jax.errors import UnmergeError

NP_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
             "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
             "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
             "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
             "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
BYTES_PER = {tag: dt.itemsize for tag, dt in NP_DTYPES.items()}

# Tags whose tensors hold weights a merge or a task vector works on.
FLOAT_TAGS = ("F32", "F16", "BF16", "F64")
# The float tags a merge can write, as NumPy dtypes.
ST_DTYPES = {tag: NP_DTYPES[tag] for tag in FLOAT_TAGS}
# User-facing dtype names (mergekit's `dtype:`/`out_dtype:`, `--dtype`) → tag.
DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
               "bfloat16": "BF16", "bf16": "BF16", "float64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16",
               "F64": "F64"}
# Tag → the torch dtype name transformers writes into config.json (`torch_dtype`).
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def dtype_tag(name) -> str:
    """Normalise a dtype name (``bfloat16``, ``bf16``, ``BF16``, ``torch.bfloat16``) to a safetensors tag."""
    tag = DTYPE_NAMES.get(str(name).replace("torch.", ""))
    if tag is None:
        raise UnmergeError(f"unsupported output dtype {name!r}; use float32, float16 or bfloat16")
    return tag


def to_float32(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``raw`` (any stored float dtype) as float32, written into ``out`` (same shape) if given.

    bfloat16 is the top half of a float32, so its conversion is a 16-bit shift of the bit patterns
    into a 32-bit word: exact for every pattern (NaN payloads included, as ``ml_dtypes``' own cast),
    and about 2.5× faster than that cast here (a pass converts every bf16 entry it reads).
    """
    if out is None:
        out = np.empty(raw.shape, np.float32)
    if raw.dtype == NP_DTYPES["BF16"]:
        np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


def is_float_tag(tag: str) -> bool:
    """True for the floating-point tags a task vector or a merge is formed on."""
    return tag in FLOAT_TAGS
