"""Provenance: the JSON record of what a set of statistics was computed from.

One function, :func:`provenance`, for both kinds of input, so the keys that mean the same thing
are the same: ``created_by``, ``mode`` (``"checkpoints"`` | ``"arrays"``), ``dictionary``,
``targets``, ``atom_names``, ``target_names``, ``n_rows``, ``seeds``, ``key``,
``bootstrap_block``, ``seconds``. Checkpoint inputs add ``base``, ``base_dtypes``, ``n_tensors``,
``tensors``, ``mask`` (the selection's spec), ``row_order`` and ``compute``, and describe each
entry as ``{name, path, kind, dtypes[, lora_modules]}``; array inputs list the files' paths and
``dtypes``. Saved with the statistics (``save_stats``) and in ``unmerge decompose --json``;
``unmerge sweep --stats`` reads the names back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unmerge_jax.version import __version__

CREATED_BY = f"unmerge_jax {__version__}"
ROW_ORDER = "selection order (the base's sorted tensor names), C-order flat indices inside a tensor"


def _dtype_counts(src, names) -> dict[str, int]:
    """``{stored dtype tag: number of tensors}`` of ``src`` over ``names``."""
    out: dict[str, int] = {}
    for n in names:
        tag = src.dtype(n)
        out[tag] = out.get(tag, 0) + 1
    return out


def _entry_record(entry, tv, names) -> dict:
    d = {"name": entry.name, "path": str(Path(entry.path).resolve()), "kind": tv.origin}
    if tv.origin == "adapter":
        d["lora_modules"] = len(tv.source.adapter.base_names)
        d["dtypes"] = tv.source.adapter.factor_dtypes()
    else:
        d["dtypes"] = _dtype_counts(tv.source, names)
    return d


def provenance(d_entries, t_entries, *, atom_names, target_names, n_rows: int, seeds: int, key: int,
               bootstrap_block: int, seconds: float, base=None, task_vectors=None, selection=None, dtypes=None,
               **extra) -> dict:
    """The provenance record of statistics over checkpoint inputs (``base`` given) or array files.

    Args:
      d_entries, t_entries: the dictionary and target :class:`~unmerge_jax.entries.Entry` lists.
      atom_names, target_names: the names of the statistics' K atoms and T targets.
      n_rows, seeds, key, bootstrap_block, seconds: what the statistics pass did.
      base, task_vectors, selection: checkpoint inputs — the base source, the K + T task vectors
        (dictionary first) and the :class:`~unmerge_jax.passes.mask.Selection` of rows.
      dtypes: array inputs — the arrays' dtypes.
      **extra: fields of one pass (``block_rows``, ``n_blocks``, ``n_processes``, ``mask_file``).

    Returns:
      a JSON-serialisable dict.
    """
    record = {"created_by": CREATED_BY, "mode": "checkpoints" if base is not None else "arrays"}
    if base is not None:
        names = selection.names
        K = len(d_entries)
        record.update({
            "base": str(Path(base.path).resolve()),
            "base_dtypes": _dtype_counts(base, names),
            "dictionary": [_entry_record(e, tv, names) for e, tv in zip(d_entries, task_vectors[:K])],
            "targets": [_entry_record(e, tv, names) for e, tv in zip(t_entries, task_vectors[K:])],
            "n_tensors": len(names),
            "mask": dict(selection.spec),
            "tensors": list(names),
            "row_order": ROW_ORDER,
            "compute": "float32 task vectors, float64 accumulation",
        })
    else:
        record.update({
            "dictionary": [str(Path(e.path).resolve()) for e in d_entries],
            "targets": [str(Path(e.path).resolve()) for e in t_entries],
            "dtypes": sorted({str(d) for d in dtypes or ()}),
        })
    record.update({"atom_names": list(atom_names), "target_names": list(target_names), "n_rows": int(n_rows),
                   "seeds": int(seeds), "key": int(key) if isinstance(key, (int, np.integer)) else key, "bootstrap_block": int(bootstrap_block),
                   "seconds": float(seconds), **extra})
    return record
