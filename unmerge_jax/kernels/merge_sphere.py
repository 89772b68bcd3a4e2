"""Kernels of the spherical and other per-tensor merges: ``slerp``, ``nuslerp``, ``multislerp``,
``karcher``, ``nearswap``, ``arcee_fusion``.

Every spherical method is a *linear combination* of its inputs whose coefficients depend only on
their inner products. So one tensor is merged in two passes over its chunks, with O(K²) state:

* :func:`gram` — the statistics pass: the float64 Gram matrix ``X Xᵀ`` of the method's vectors
  (``X = [θ_base, θ_1]`` for ``slerp``, the task vectors ``δ_k`` for ``nuslerp``/``multislerp``,
  the weights ``θ_k`` for ``karcher``), accumulated over the chunks;
* the coefficients, found on the host from the Gram (``unmerge_jax.merge.methods.slerp`` and
  ``karcher``; the formulas are :func:`slerp_coefs` and :func:`nuslerp_coefs`, written for jnp or
  NumPy arrays);
* :func:`combine` — the apply kernel ``θ = [θ_base] + Σ_j c_j X_j``, elementwise.

Row-wise ``nuslerp`` (``nuslerp_flatten: false``) uses vectors along a row (:func:`nuslerp_rows`,
one pass over chunks of whole rows) or along a column (:func:`column_gram` then
:func:`combine_columns`; along axis 0 of a tensor with more axes, :func:`column_gram_at` then
:func:`combine_columns_at`, which locate each entry's column from the chunk's flat offset). ``nearswap`` is elementwise (:func:`nearswap_kernel`); ``arcee_fusion``
needs each row's KL divergence (:func:`row_kl`), then a whole-tensor threshold on the importance
``|δ|·KL_row`` (found on the host by ``unmerge_jax.orderstats``) and an elementwise apply
(:func:`fusion_kernel`).

As in ``kernels/merge.py``: the tensors are fine-tuned weights (``deltas=False``) or task vectors
(``deltas=True``, then ``θ_k = θ_base + δ_k``); every apply kernel marks entries whose inputs are
not all finite, or whose merged value is not below ``limit``, as NaN (``_flag_nonfinite``).
Inner products are accumulated in float64 and the linear combinations are formed in float64 and
rounded once to float32 (:func:`_lincomb`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from unmerge_jax.kernels.merge import _flag_nonfinite, _task_vectors

# mergekit 0.1.5's constants: slerp's near-parallel threshold on the cosine and its norm floor;
# nuslerp's normalisation floor and its colinearity test (1 − cos² ≤ eps²).
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
NUSLERP_NORM_EPS = 1e-7
NUSLERP_EPS = 1e-8
NEARSWAP_FLOOR = 1e-6
FUSION_EPS = 1e-8

SPACES = ("slerp", "delta", "weights")


def _vectors(base, tensors, deltas: bool, space: str):
    """The flat float32 vectors a method combines, and the flat base.

    ``space``: ``"slerp"`` → ``[θ_base, θ_1]``; ``"delta"`` → the task vectors ``δ_k``;
    ``"weights"`` → the weights ``θ_k``."""
    b = base.reshape(-1).astype(jnp.float32)
    ts = [t.reshape(-1).astype(jnp.float32) for t in tensors]
    if space == "delta":
        return (ts if deltas else [t - b for t in ts]), b
    thetas = [b + t for t in ts] if deltas else ts
    return ([b, *thetas] if space == "slerp" else thetas), b


@partial(jax.jit, static_argnames=("deltas", "space"))
def gram(base, tensors, *, deltas: bool, space: str):
    """Statistics pass on one chunk: the float64 (m, m) Gram ``G_ij = x_i · x_j`` of the method's
    vectors (see :func:`_vectors`; additive over chunks, zero-padded tails add nothing)."""
    xs, _ = _vectors(base, tensors, deltas, space)
    m = len(xs)
    x64 = [x.astype(jnp.float64) for x in xs]
    rows = []
    for i in range(m):
        rows.append(jnp.stack([jnp.sum(x64[i] * x64[j]) if j >= i else jnp.float64(0.0) for j in range(m)]))
    g = jnp.stack(rows)
    return g + jnp.triu(g, 1).T


def _lincomb(coefs, xs, b=None):
    """``[b +] Σ c_j x_j`` per entry in float64, rounded once to float32. One rounding makes the
    result independent of how XLA vectorises the loop for a chunk's shape (whether it fuses a
    multiply-add), so chunked and whole-tensor merges agree to the bit."""
    out = sum((c.astype(jnp.float64) * x.astype(jnp.float64) for c, x in zip(coefs[1:], xs[1:])),
              coefs[0].astype(jnp.float64) * xs[0].astype(jnp.float64))
    if b is not None:
        out = b.astype(jnp.float64) + out
    return out.astype(jnp.float32)


@partial(jax.jit, static_argnames=("deltas", "space", "add_base"))
def combine(base, tensors, coefs, limit=None, *, deltas: bool, space: str, add_base: bool):
    """Apply kernel: ``θ = [θ_base +] Σ_j c_j x_j`` on one chunk (``x_j`` as :func:`_vectors`;
    ``coefs`` (m,) float64; :func:`_lincomb`). Returns float32 of the chunk's shape, non-finite entries NaN."""
    xs, b = _vectors(base, tensors, deltas, space)
    out = _lincomb([coefs[j] for j in range(len(xs))], xs, b if add_base else None)
    rows, _ = _task_vectors(base, tensors, deltas)
    return _flag_nonfinite(out, b, rows, limit).reshape(base.shape)


def slerp_coefs(aa, bb, ab, t, xp=jnp):
    """mergekit's ``slerp`` coefficients ``(c_a, c_b)`` of ``v_t = c_a a + c_b b`` from
    ``‖a‖², ‖b‖², a·b`` (any array module ``xp``).

    ``‖·‖`` floored: a norm ≤ 1e-8 counts as 1; ``cos = clip(a·b / (‖a‖‖b‖), −1, 1)``. Where
    ``|cos| > 0.9995`` (near-parallel or antipodal) it is linear interpolation ``(1 − t, t)``; else
    with ``θ = arccos(cos)``: ``(sin((1−t)θ)/sin θ, sin(tθ)/sin θ)``.
    """
    na, nb = xp.sqrt(aa), xp.sqrt(bb)
    na = xp.where(na > SLERP_EPS, na, 1.0)
    nb = xp.where(nb > SLERP_EPS, nb, 1.0)
    dot = xp.clip(ab / (na * nb), -1.0, 1.0)
    linear = xp.abs(dot) > SLERP_DOT_THRESHOLD
    theta = xp.arccos(xp.where(linear, 0.0, dot))
    s = xp.where(linear, 1.0, xp.sin(theta))
    return (xp.where(linear, 1.0 - t, xp.sin((1.0 - t) * theta) / s),
            xp.where(linear, t, xp.sin(t * theta) / s))


def nuslerp_coefs(aa, bb, ab, t, xp=jnp):
    """mergekit's ``nuslerp`` coefficients ``(c_0, c_1)`` of ``c_0 v_0 + c_1 v_1`` from
    ``‖v_0‖², ‖v_1‖², v_0·v_1`` (any array module ``xp``).

    ``cos = clip(v_0·v_1 / (max(‖v_0‖, 1e-7) max(‖v_1‖, 1e-7)), −1, 1)``; colinear where
    ``1 − cos² ≤ (1e-8)²``: ``(1 − t, t)``; else ``θ = arccos(cos)``, ``(sin((1−t)θ)/sin θ,
    sin(tθ)/sin θ)`` (a zero vector gives cos 0, θ = π/2).
    """
    n0 = xp.maximum(xp.sqrt(aa), NUSLERP_NORM_EPS)
    n1 = xp.maximum(xp.sqrt(bb), NUSLERP_NORM_EPS)
    cos = xp.clip(ab / (n0 * n1), -1.0, 1.0)
    colinear = (1.0 - cos * cos) <= NUSLERP_EPS ** 2
    theta = xp.arccos(xp.where(colinear, 0.0, cos))
    s = xp.where(colinear, 1.0, xp.sin(theta))
    return (xp.where(colinear, 1.0 - t, xp.sin((1.0 - t) * theta) / s),
            xp.where(colinear, t, xp.sin(t * theta) / s))


@partial(jax.jit, static_argnames=("deltas", "row_len"))
def nuslerp_rows(base, tensors, t, limit=None, *, deltas: bool, row_len: int):
    """Row-wise ``nuslerp`` on a chunk of whole rows (``row_len`` entries each): per row,
    ``θ_base + c_0 δ_0 + c_1 δ_1`` with :func:`nuslerp_coefs` of the row's float64 inner products
    (no statistics pass: a row is inside one chunk)."""
    (d0, d1), b = _vectors(base, tensors, deltas, "delta")
    r0, r1 = d0.reshape(-1, row_len), d1.reshape(-1, row_len)
    x0, x1 = r0.astype(jnp.float64), r1.astype(jnp.float64)
    c0, c1 = nuslerp_coefs(jnp.sum(x0 * x0, 1), jnp.sum(x1 * x1, 1), jnp.sum(x0 * x1, 1), t.astype(jnp.float64))
    # Per-entry coefficients on the flat chunk: the same 1-D loop whatever the number of rows (a
    # (rows, row_len) broadcast compiled to code that rounded differently for one-row chunks).
    e0 = jnp.repeat(c0, row_len, total_repeat_length=d0.shape[0])
    e1 = jnp.repeat(c1, row_len, total_repeat_length=d0.shape[0])
    out = _lincomb([e0, e1], [d0, d1], b)
    return _flag_nonfinite(out, b, [d0, d1], limit).reshape(base.shape)


@partial(jax.jit, static_argnames=("deltas", "row_len"))
def column_gram(base, tensors, *, deltas: bool, row_len: int):
    """Statistics pass of column-wise ``nuslerp`` on a chunk of whole rows: float64 (3, row_len)
    ``[‖δ_0‖², ‖δ_1‖², δ_0·δ_1]`` of every column's part in this chunk (additive over chunks)."""
    (d0, d1), _ = _vectors(base, tensors, deltas, "delta")
    x0 = d0.reshape(-1, row_len).astype(jnp.float64)
    x1 = d1.reshape(-1, row_len).astype(jnp.float64)
    return jnp.stack([jnp.sum(x0 * x0, 0), jnp.sum(x1 * x1, 0), jnp.sum(x0 * x1, 0)])


@partial(jax.jit, static_argnames=("deltas", "row_len"))
def combine_columns(base, tensors, coefs, limit=None, *, deltas: bool, row_len: int):
    """Apply kernel of column-wise ``nuslerp``: ``θ_base + c_0[col] δ_0 + c_1[col] δ_1`` on a chunk
    of whole rows; ``coefs`` (2, row_len) float64."""
    (d0, d1), b = _vectors(base, tensors, deltas, "delta")
    rows = d0.shape[0] // row_len
    out = _lincomb([jnp.tile(coefs[0], rows), jnp.tile(coefs[1], rows)], [d0, d1], b)   # flat, as in nuslerp_rows
    return _flag_nonfinite(out, b, [d0, d1], limit).reshape(base.shape)


def _columns(start, n: int, n_cols: int):
    """Column of each entry of a flat chunk of ``n`` entries starting at flat offset ``start`` of
    a tensor viewed as ``(rows, n_cols)``."""
    return (jnp.asarray(start, jnp.int64) + jnp.arange(n, dtype=jnp.int64)) % n_cols


@partial(jax.jit, static_argnames=("deltas", "n_cols"))
def column_gram_at(base, tensors, start, *, deltas: bool, n_cols: int):
    """Statistics pass of axis-0 ``nuslerp`` on a tensor of more than two axes, viewed as
    ``(shape[0], n_cols)`` with ``n_cols = prod(shape[1:])``: float64 (3, n_cols)
    ``[‖δ_0‖², ‖δ_1‖², δ_0·δ_1]`` of every column's part in this chunk, whose first entry is at flat
    offset ``start`` (chunks need not hold whole columns' rows; additive over chunks, zero-padded
    tails add nothing)."""
    (d0, d1), _ = _vectors(base, tensors, deltas, "delta")
    col = _columns(start, d0.shape[0], n_cols)
    x0, x1 = d0.astype(jnp.float64), d1.astype(jnp.float64)
    return jnp.stack([jax.ops.segment_sum(v, col, num_segments=n_cols) for v in (x0 * x0, x1 * x1, x0 * x1)])


@partial(jax.jit, static_argnames=("deltas", "n_cols"))
def combine_columns_at(base, tensors, coefs, start, limit=None, *, deltas: bool, n_cols: int):
    """Apply kernel of axis-0 ``nuslerp`` on a tensor of more than two axes (see
    :func:`column_gram_at`): ``θ_base + c_0[col] δ_0 + c_1[col] δ_1`` per entry, ``coefs`` (2,
    n_cols) float64, the chunk's first entry at flat offset ``start``."""
    (d0, d1), b = _vectors(base, tensors, deltas, "delta")
    col = _columns(start, d0.shape[0], n_cols)
    out = _lincomb([coefs[0][col], coefs[1][col]], [d0, d1], b)
    return _flag_nonfinite(out, b, [d0, d1], limit).reshape(base.shape)


@partial(jax.jit, static_argnames=("deltas",))
def nearswap_kernel(base, tensors, t, limit=None, *, deltas: bool):
    """mergekit's ``nearswap`` of the base ``a`` and one model ``b``:
    ``w = clip(t / max(|a − b|, 1e-6), 0, 1)``, ``θ = w b + (1 − w) a`` (entries where the two are
    within ``t`` of each other take ``b``; farther ones move towards it by ``t / |a − b|``)."""
    (theta,), a = _vectors(base, tensors, deltas, "weights")
    w = jnp.clip(t.astype(jnp.float32) / jnp.maximum(jnp.abs(a - theta), jnp.float32(NEARSWAP_FLOOR)), 0.0, 1.0)
    out = _lincomb([w, 1.0 - w], [theta, a])    # float64, one rounding: a = b gives a exactly
    rows, _ = _task_vectors(base, tensors, deltas)
    return _flag_nonfinite(out, a, rows, limit).reshape(base.shape)


@partial(jax.jit, static_argnames=("deltas", "row_len"))
def row_kl(base, tensors, *, deltas: bool, row_len: int):
    """``arcee_fusion``'s per-row divergence on a chunk of whole rows, (rows,) float32:
    ``KL_row = Σ_j p_j log(p_j / q_j)`` with ``p = softmax(θ_row) + 1e-8``,
    ``q = softmax(θ_base,row) + 1e-8`` (the softmax over the row's entries). Computed in float64:
    for a fine-tune ``p/q`` is within ~1e-2 of 1, and float32 rounding of the ratio alone moves
    the KL by ~1e-5 relative — enough to flip entries near the threshold."""
    (theta,), b = _vectors(base, tensors, deltas, "weights")
    p = jax.nn.softmax(theta.reshape(-1, row_len).astype(jnp.float64), axis=-1) + FUSION_EPS
    q = jax.nn.softmax(b.reshape(-1, row_len).astype(jnp.float64), axis=-1) + FUSION_EPS
    return jnp.sum(p * jnp.log(p / q), axis=-1).astype(jnp.float32)


@partial(jax.jit, static_argnames=("deltas", "row_len"))
def fusion_importance(base, tensors, kl, *, deltas: bool, row_len: int):
    """``arcee_fusion``'s importance ``|δ| · KL_row`` on a chunk of whole rows (float32, flat),
    given the chunk's (rows,) ``kl``; ``δ = θ − θ_base`` (or the given task vector)."""
    (d,), _ = _task_vectors(base, tensors, deltas)
    return (jnp.abs(d).reshape(-1, row_len) * kl[:, None]).reshape(-1)


@partial(jax.jit, static_argnames=("deltas", "row_len"))
def fusion_kernel(base, tensors, kl, thr, limit=None, *, deltas: bool, row_len: int):
    """``arcee_fusion`` apply: ``θ = θ_base + δ·[|δ|·KL_row ≥ thr]`` on a chunk of whole rows
    (``kl`` (rows,), ``thr`` the tensor's float32 threshold)."""
    rows, b = _task_vectors(base, tensors, deltas)
    d = rows[0]
    imp = (jnp.abs(d).reshape(-1, row_len) * kl[:, None]).reshape(-1)
    out = b + d * (imp >= thr.astype(jnp.float32)).astype(jnp.float32)
    return _flag_nonfinite(out, b, rows, limit).reshape(base.shape)
