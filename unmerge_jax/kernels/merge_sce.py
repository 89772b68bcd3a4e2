"""SCE kernels (arXiv:2408.07990, as mergekit 0.1.5's ``sce``): jit, one tensor or chunk at a time.

With task vectors ``δ_k = θ_k − θ_base``:

* *select*: with ``select_topk < 1`` keep the entries whose variance across the K models
  (population variance, ``var_e = mean_k δ_ke² − (mean_k δ_ke)²`` computed as the mean of squared
  deviations) is among the ``⌊select_topk · #{var ≠ 0}⌋`` largest of the tensor — an exact
  threshold found on the host by ``unmerge_jax.orderstats`` (:func:`sce_variance` gives the
  values), ties first by position; ``δ'_k = δ_k · mask``;
* *calculate*: per-model weights ``w_k = mean(δ'_k²) / Σ_j mean(δ'_j²)`` (``1/K`` each when the
  sum is below 1e-6) from the float64 sums of :func:`sce_sq_sums`;
* *erase*: the sign ``s = sign(Σ_k δ'_k)`` (ties → +) is elected and
  ``θ = θ_base + Σ_k w_k δ'_k [sign δ'_k = s] / max(Σ_k w_k [sign δ'_k = s], 1e-6)``
  (:func:`sce_kernel`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unmerge_jax.kernels.merge import _flag_nonfinite, _in_top, _task_vectors

WEIGHT_SUM_EPS = 1e-6   # below this Σ_k mean(δ'_k²) the weights are uniform (mergekit)
DIVISOR_EPS = 1e-6      # the erased weights' sum is clamped at this (mergekit)


class SCESelect(NamedTuple):
    """The variance threshold of one chunk: keep ``var > thr`` and ``var = thr`` before ``cut``
    (uint32 bits / int32 scalars); ``thr = 2³²−1, cut = 0`` keeps nothing."""

    thr: jax.Array | np.ndarray
    cut: jax.Array | np.ndarray


def _variance(rows):
    k = len(rows)
    mean = sum(rows[1:], rows[0]) / jnp.float32(k)
    return sum(((r - mean) ** 2 for r in rows[1:]), (rows[0] - mean) ** 2) / jnp.float32(k)


def _selected(rows, sel: SCESelect | None):
    if sel is None:
        return rows
    bits = jax.lax.bitcast_convert_type(_variance(rows), jnp.uint32)
    keep = _in_top(bits, sel.thr, sel.cut, jax.lax.iota(jnp.int32, bits.shape[0]))
    return [jnp.where(keep, r, 0.0) for r in rows]


@partial(jax.jit, static_argnames=("deltas",))
def sce_variance(base, tensors, *, deltas: bool = True):
    """Per-entry float32 population variance of the K task vectors of one chunk (≥ 0)."""
    rows, _ = _task_vectors(base, tensors, deltas)
    return _variance(rows)


@partial(jax.jit, static_argnames=("deltas",))
def sce_sq_sums(base, tensors, sel: SCESelect | None, *, deltas: bool = True):
    """(K,) float64 ``Σ δ'_k²`` over one chunk (additive over chunks); ``sel`` None: no selection."""
    rows = _selected(_task_vectors(base, tensors, deltas)[0], sel)
    return jnp.stack([jnp.sum(jnp.square(r.astype(jnp.float64))) for r in rows])


@partial(jax.jit, static_argnames=("deltas",))
def sce_kernel(base, tensors, weights, sel: SCESelect | None, limit=None, *, deltas: bool = True):
    """SCE's erase-and-merge on one chunk (module docstring), given the (K,) float32 ``weights``.

    Args:
      base, tensors: the chunk's base and K inputs (task vectors if ``deltas``), float32, flat.
      weights: (K,) float32 normalised SCE weights of the tensor.
      sel: the chunk's :class:`SCESelect`, or None (``select_topk ≥ 1``: every entry).
      limit: optional float32 scalar (non-finite inputs or ``|θ| ≥ limit`` → NaN).
    Returns:
      float32 array of ``base``'s shape.
    """
    rows, b = _task_vectors(base, tensors, deltas)
    sel_rows = _selected(rows, sel)
    votes = sum(sel_rows[1:], sel_rows[0])
    majority = jnp.where(votes >= 0, 1.0, -1.0).astype(jnp.float32)
    ew = [jnp.where(jnp.sign(r) == majority, weights[i].astype(jnp.float32), 0.0) for i, r in enumerate(sel_rows)]
    num = sum((r * e for r, e in zip(sel_rows[1:], ew[1:])), sel_rows[0] * ew[0])
    den = jnp.maximum(sum(ew[1:], ew[0]), jnp.float32(DIVISOR_EPS))
    return _flag_nonfinite(b + num / den, b, rows, limit).reshape(base.shape)
