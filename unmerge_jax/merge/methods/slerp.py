"""Spherical interpolation: ``slerp``, ``nuslerp``, ``multislerp`` (mergekit 0.1.5 semantics).

Each is a linear combination of its inputs with coefficients from their inner products, so a
tensor takes a statistics pass (the float64 Gram of the vectors, O(K²) numbers:
:func:`~unmerge_jax.kernels.merge_sphere.gram`) and an elementwise apply pass
(:func:`~unmerge_jax.kernels.merge_sphere.combine`); no tensor-sized temporary.

* ``slerp`` (``t``, required): the base ``a`` and the one other model ``b``, whole tensors:
  ``cos = a·b / (‖a‖‖b‖)`` (a norm ≤ 1e-8 counts as 1), linear ``(1−t) a + t b`` where
  ``|cos| > 0.9995``, else ``(sin((1−t)θ) a + sin(tθ) b) / sin θ``, ``θ = arccos cos``.
  ``t = 0`` is the base, ``t = 1`` the other model; ``t`` may be a gradient over the layers.
* ``nuslerp`` (per-model ``weight``; ``nuslerp_flatten`` true, ``nuslerp_row_wise`` false): two
  models, ``t = w_1 / (w_0 + w_1)`` (0.5 where ``|w_0 + w_1| < 1e-6``); with a base it
  interpolates the task vectors and adds the base back. Vectors are the whole tensor (flatten),
  each row (``nuslerp_flatten: false``) or each column (and ``nuslerp_row_wise: true``, mergekit's
  ``dim=0``). Colinear (``1 − cos² ≤ 1e-16``) → linear; norms floored at 1e-7.
* ``multislerp`` (per-model ``weight``; ``normalize_weights`` true, ``eps`` 1e-8): K models (task
  vectors with a base), ``u_k = x_k / (‖x_k‖ + eps)``, ``m = Σ w_k u_k`` (weights divided by their
  sum when normalised); the result is ``(Σ w_k ‖x_k‖) · m / ‖m‖`` (+ base). mergekit also
  projects the units onto the tangent space at ``m/‖m‖`` and maps their weighted mean back, but
  that weighted tangent mean is exactly zero (``Σ w_k (u_k − (u_k·m̂) m̂) = m − ‖m‖ m̂ = 0``), so
  its float32 result is this one plus rounding. ``‖m‖ < eps``: with two models the weighted sum
  ``w_0 x_0 + w_1 x_1``, otherwise refused — except where every vector is zero (no model changed
  the tensor), which gives the base where mergekit refuses. One model: that model unchanged.

References: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985); mergekit's
``slerp``, ``nuslerp`` and ``multislerp`` methods.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from unmerge_jax.errors import UnmergeError
from unmerge_jax.kernels import merge_sphere as S
from unmerge_jax.merge.base import MergeMethod, Resolved, as_bool, as_float

WEIGHT_SUM_EPS = 1e-6   # nuslerp: |w_0 + w_1| below this → t = 0.5 (mergekit)


class Coefs(NamedTuple):
    """Per-tensor result of the statistics pass: the (m,) float64 coefficients of the vectors in
    ``space`` (``kernels.merge_sphere.SPACES``), whether the base is added back, and the method's
    per-tensor ``diagnostics`` (karcher's convergence; collected by ``merge_resolved``)."""

    coefs: np.ndarray
    space: str
    add_base: bool
    diagnostics: object = None


def gram(chunks, space: str) -> np.ndarray:
    """The float64 Gram of the ``space`` vectors over every chunk of the tensor."""
    g = None
    for c in range(len(chunks)):
        part = np.asarray(S.gram(*chunks.inputs(c), deltas=chunks.deltas, space=space))
        g = part if g is None else g + part
    return g


def _combine(chunks, co: Coefs) -> None:
    cf = np.asarray(co.coefs, np.float64)
    for c in range(len(chunks)):
        chunks.store(c, S.combine(*chunks.inputs(c), cf, chunks.limit, deltas=chunks.deltas, space=co.space,
                                  add_base=co.add_base))


def _count(method: MergeMethod, k: int, want: int, at: str, what: str) -> None:
    if k != want:
        raise UnmergeError(f"merge method {method.name!r} merges {what}; got {k} model(s) besides the base{at}")


# ---------------------------------------------------------------- slerp
def check_slerp(method, shared, weights, density, at):
    """``t`` required (a number, or a gradient evaluated per layer); exactly one model besides the base."""
    out = dict(shared)
    if out.get("t") is None:
        raise UnmergeError(f"merge method 'slerp' needs parameter t (0 gives the base, 1 the other model){at}")
    out["t"] = as_float("t", out["t"])
    _count(method, len(weights), 1, at, "the base with exactly one other model")
    return out


def slerp_stats(res: Resolved, chunks, key) -> Coefs:
    g = gram(chunks, "slerp")
    ca, cb = S.slerp_coefs(g[0, 0], g[1, 1], g[0, 1], float(res.shared["t"]), xp=np)
    return Coefs(np.asarray([ca, cb], np.float64), "slerp", False)


def apply_coefs(res, chunks, stats, key) -> None:
    _combine(chunks, stats)


SLERP = MergeMethod("slerp", {"t": None}, {"weight": 1.0}, True, check_slerp, lambda res: "tensor", apply_coefs,
                    tensor_stats=slerp_stats, options={"base_role": "endpoint", "required": ("t",), "ignores": ("weight",)})


# ---------------------------------------------------------------- nuslerp
def check_nuslerp(method, shared, weights, density, at):
    """``nuslerp_flatten``/``nuslerp_row_wise`` booleans; exactly two models besides the base."""
    out = dict(shared)
    for n in ("nuslerp_flatten", "nuslerp_row_wise"):
        out[n] = as_bool(n, out[n])
    _count(method, len(weights), 2, at, "exactly two models (besides an optional base)")
    return out


def nuslerp_t(weights) -> float:
    """mergekit: ``t = w_1 / (w_0 + w_1)``, 0.5 where ``|w_0 + w_1| < 1e-6``."""
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < WEIGHT_SUM_EPS else float(weights[1]) / total


def _nuslerp_layout(res: Resolved, chunks) -> str:
    """``flat`` (whole tensor), ``rows`` (vectors along the last axis) or ``columns`` / ``columns_nd``
    (along axis 0, of a 2-D / higher-dimensional tensor)."""
    sh = res.shared
    if sh["nuslerp_flatten"]:
        return "flat"
    if not sh["nuslerp_row_wise"] or chunks.out.ndim < 2:
        return "rows"          # a 0-/1-D tensor is one row: its vector is the whole tensor
    # More than two axes (a conv kernel): mergekit's vectors still run along axis 0, one per flat
    # position of the other axes; chunks of rows of the last axis need not hold whole columns.
    return "columns" if chunks.out.ndim == 2 else "columns_nd"


def _columns(chunks) -> int:
    return int(np.prod(chunks.out.shape[1:]))


def nuslerp_statistics(res: Resolved) -> str:
    sh = res.shared
    return "none" if not sh["nuslerp_flatten"] and not sh["nuslerp_row_wise"] else "tensor"


def nuslerp_stats(res: Resolved, chunks, key):
    t = nuslerp_t(res.weights)
    layout = _nuslerp_layout(res, chunks)
    if layout == "flat":
        g = gram(chunks, "delta")
        c0, c1 = S.nuslerp_coefs(g[0, 0], g[1, 1], g[0, 1], t, xp=np)
        return Coefs(np.asarray([c0, c1], np.float64), "delta", True)
    if layout == "rows":
        return None
    s = None
    for c in range(len(chunks)):
        if layout == "columns_nd":
            part = np.asarray(S.column_gram_at(*chunks.inputs(c), chunks.start(c), deltas=chunks.deltas,
                                               columns=_columns(chunks)))
        else:
            part = np.asarray(S.column_gram(*chunks.inputs(c), deltas=chunks.deltas, row_len=chunks.row_len))
        s = part if s is None else s + part
    return np.stack(S.nuslerp_coefs(s[0], s[1], s[2], t, xp=np)).astype(np.float64)


def nuslerp_apply(res: Resolved, chunks, stats, key) -> None:
    layout = _nuslerp_layout(res, chunks)
    if layout == "flat":
        return _combine(chunks, stats)
    for c in range(len(chunks)):
        if layout == "rows":
            got = S.nuslerp_rows(*chunks.inputs(c), np.float64(nuslerp_t(res.weights)), chunks.limit,
                                 deltas=chunks.deltas, row_len=chunks.row_len)
        elif layout == "columns_nd":
            got = S.combine_columns_at(*chunks.inputs(c), stats, chunks.start(c), chunks.limit, deltas=chunks.deltas,
                                       columns=_columns(chunks))
        else:
            got = S.combine_columns(*chunks.inputs(c), stats, chunks.limit, deltas=chunks.deltas,
                                    row_len=chunks.row_len)
        chunks.store(c, got)


NUSLERP = MergeMethod("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": None}, False,
                      check_nuslerp, nuslerp_statistics, nuslerp_apply, tensor_stats=nuslerp_stats,
                      rows=lambda res: not res.shared["nuslerp_flatten"], options={"base_role": "origin"})


# ---------------------------------------------------------------- multislerp
def check_multislerp(method, shared, weights, density, at):
    """``normalize_weights`` a boolean, ``eps`` ≥ 0; normalised weights may not sum to zero."""
    out = dict(shared)
    out["normalize_weights"] = as_bool("normalize_weights", out["normalize_weights"])
    out["eps"] = as_float("eps", out["eps"], minimum=0.0)
    if out["normalize_weights"] and len(weights) > 1 and abs(float(np.sum(weights))) < 1e-12:
        raise UnmergeError(f"multislerp weights {weights.tolist()} sum to zero but normalize_weights divides by their "
                           f"sum{at}; change the weights or set normalize_weights: false")
    return out


def multislerp_coefs(g: np.ndarray, weights, normalize: bool, eps: float, where: str = "") -> np.ndarray:
    """(K,) float64 coefficients of ``Σ c_k x_k`` from the Gram ``g`` of the K vectors (the module
    docstring's formula)."""
    w = np.asarray(weights, np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    if not norms.any():
        return np.zeros_like(w)    # every vector zero (a tensor no model changed): the base
    s = 1.0 / (norms + eps)
    m = w * s
    mean_norm = float(np.sqrt(max(m @ g @ m, 0.0)))
    if mean_norm < eps:
        if len(w) == 2:
            return w    # mergekit's fallback for two (near-)antipodal inputs: their weighted sum
        at = f" for tensor {where}" if where else ""
        raise UnmergeError(f"multislerp: the weighted mean of the unit vectors is zero{at} (antipodal inputs whose "
                           f"weights cancel); use different weights")
    return float(norms @ w) * m / mean_norm


def multislerp_stats(res: Resolved, chunks, key) -> Coefs:
    if chunks.k == 1:
        return Coefs(np.ones(1, np.float64), "weights", False)   # mergekit returns the one model as is
    g = gram(chunks, "delta")
    c = multislerp_coefs(g, res.weights, res.shared["normalize_weights"], res.shared["eps"])
    return Coefs(c.astype(np.float64), "delta", True)


MULTISLERP = MergeMethod("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": None}, False,
                         check_multislerp, lambda res: "tensor", apply_coefs, tensor_stats=multislerp_stats,
                         options={"base_role": "origin"})
