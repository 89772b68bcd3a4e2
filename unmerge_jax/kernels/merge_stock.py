"""Model Stock kernels (arXiv:2403.19522, as mergekit 0.1.5's ``model_stock``): jit, one tensor
or one chunk at a time.

With task vectors ``δ_k = θ_k − θ_base`` (K ≥ 2), the mean pairwise cosine

    cos = mean_{i<j} clip(⟨δ_i, δ_j⟩ / max(‖δ_i‖·‖δ_j‖, 1e-6), −1, 1)

gives the interpolation ratio ``t = K·cos / (1 + (K−1)·cos)`` (``t = 0`` where
``|1 + (K−1)·cos| < 1e-6``), and the merge is ``θ = t·mean_k θ_k + (1 − t)·θ_base``, computed as
``θ_base + t·mean_k δ_k``. Per tensor (one ``t``; the K×K Gram of the task vectors summed over
the chunks in float64 by :func:`stock_gram`, ``t`` formed on the host) or ``filter_wise`` per
row of the last axis (one ``t`` per row, in :func:`stock_kernel` itself on chunks of whole rows).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from unmerge_jax.kernels.merge import _flag_nonfinite, _task_vectors

NORM_EPS = 1e-6       # mergekit clamps the product of the norms at this
SINGULAR_EPS = 1e-6   # |1 + (K−1)·cos| below this keeps the base


@partial(jax.jit, static_argnames=("deltas",))
def stock_gram(base, tensors, *, deltas: bool = True):
    """(K, K) float64 ``Σ δ_i δ_j`` over one chunk (additive over chunks)."""
    rows, _ = _task_vectors(base, tensors, deltas)
    d = [r.astype(jnp.float64) for r in rows]
    k = len(d)
    g = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            g[i][j] = g[j][i] = jnp.sum(d[i] * d[j])
    return jnp.stack([jnp.stack(r) for r in g])


def stock_ratio(gram):
    """``t`` from Gram entries ``gram[..., i, j]`` (any leading shape; float64 or float32): the
    mean clipped pairwise cosine, then ``K·cos / (1 + (K−1)·cos)``, 0 at the singularity."""
    k = gram.shape[-1]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0))
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            prod = jnp.maximum(norms[..., i] * norms[..., j], NORM_EPS)
            cos.append(jnp.clip(gram[..., i, j] / prod, -1.0, 1.0))
    c = sum(cos[1:], cos[0]) / len(cos)
    den = 1.0 + (k - 1) * c
    singular = jnp.abs(den) < SINGULAR_EPS
    return jnp.where(singular, 0.0, k * c / jnp.where(singular, 1.0, den))


@partial(jax.jit, static_argnames=("row_len", "deltas"))
def stock_kernel(base, tensors, t, limit=None, *, row_len: int | None = None, deltas: bool = True):
    """Model Stock on one chunk: ``θ_base + t·mean_k δ_k``.

    Args:
      base, tensors: the base and K inputs of the chunk (task vectors if ``deltas``), float32,
        flat; with ``row_len`` a whole number of rows.
      t: scalar float32 ratio of the tensor (ignored with ``row_len``).
      limit: optional float32 scalar (non-finite inputs or ``|θ| ≥ limit`` → NaN).
      row_len: static; ``filter_wise``: one ``t`` per row of ``row_len`` entries, computed here
        from the rows' Gram (float64 sums of float32 products). None: the tensor's ``t``.
    Returns:
      float32 array of ``base``'s shape.
    """
    rows, b = _task_vectors(base, tensors, deltas)
    k = len(rows)
    mean = sum(rows[1:], rows[0]) / jnp.float32(k)
    if row_len is not None:
        length = row_len
        r = [x.reshape(-1, length).astype(jnp.float64) for x in rows]
        g = jnp.stack([jnp.stack([jnp.sum(r[i] * r[j], axis=-1) for j in range(k)], -1) for i in range(k)], -2)
        tr = stock_ratio(g).astype(jnp.float32)
        # t per entry behind a barrier: with one row per chunk XLA otherwise folds t into a scalar
        # and fuses the multiply-add differently, changing the last bit with the chunk size.
        t_entry = jax.lax.optimization_barrier(jnp.repeat(tr, length, total_repeat_length=b.shape[0]))
        merged = b + t_entry * mean
    else:
        merged = b + jnp.asarray(t, jnp.float32) * mean
    return _flag_nonfinite(merged, b, rows, limit).reshape(base.shape)
