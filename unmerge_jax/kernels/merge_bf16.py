"""mergekit's bfloat16 arithmetic, emulated in float32 with explicit rounding: the kernels of
``unmerge merge --compute-dtype bfloat16``.

mergekit 0.1.5 casts every input to the config's ``dtype`` and merges in it. PyTorch's CPU
bfloat16 operations compute each elementwise operation in float32 and round the result to
bfloat16 (round to nearest, ties to even); a sum over the models accumulates in float32 in model
order and rounds once. These kernels follow that operation by operation, so the result is the
same bits. The rounding is done on the integer bit pattern (:func:`round_bf16`): a float32 →
bfloat16 → float32 convert pair is an identity XLA may drop (excess precision allowed), an
integer operation is not.

Where mergekit computes in float32 (``linear``, ``slerp``'s upcast, ``ramplus_tl``'s λ), a float32
rounding is done on the float64 bits (:func:`round_f32_in_f64`) for the same reason: XLA may keep
excess precision across a float32 convert, or fuse a product into a multiply-add.

``linear`` computes in float32 in mergekit (its inputs rounded to bfloat16 first): the weighted
sum is accumulated with fused multiply-adds (``addcmul_``), emulated here in float64 (a bfloat16
× float32 product is exact in float64) and rounded to float32 at each step.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


class BF16Config(NamedTuple):
    """Static structure of a generalized-task-arithmetic merge in bfloat16."""

    consensus: str | None = None   # None | "sum" | "count"
    normalize: bool = False
    scale: bool = False            # λ ≠ 1: mergekit multiplies (and rounds) only then
    deltas: bool = True            # tensors are task vectors (True) or fine-tuned weights
    masked: bool = False           # keep-masks given


def round_bf16(x):
    """float32 → the nearest bfloat16 value (ties to even), as float32; NaN kept."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(rounded, jnp.float32))


def _divide(x, d):
    """``x / d`` as IEEE float32 division even where ``d`` is one number: XLA rewrites a division by
    a broadcast scalar into a multiplication by its reciprocal (a different rounding), so the
    divisor is materialised behind an optimisation barrier."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(d, x.shape))


def _sum_rounded(xs):
    """PyTorch's bfloat16 ``sum(dim=0)`` over the K models: float32 accumulation in order, one rounding."""
    return round_bf16(sum(xs[1:], xs[0]))


@partial(jax.jit, static_argnames=("cfg",))
def task_vectors_bf16(base, tensors, *, cfg: BF16Config):
    """``(b, δ)``: the base rounded to bfloat16 and ``δ_k = bf16(bf16(θ_k) − b)`` (task-vector
    inputs: ``bf16(δ_k)``), flat."""
    b = round_bf16(base.reshape(-1))
    rows = [round_bf16(t.reshape(-1)) for t in tensors]
    if not cfg.deltas:
        rows = [round_bf16(r - b) for r in rows]
    return b, tuple(rows)


@partial(jax.jit, static_argnames=("cfg",))
def gta_bf16_kernel(b, rows, keep, weights, lam, *, cfg: BF16Config):
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` in bfloat16, one whole tensor.

    With ``δ_k`` from :func:`task_vectors_bf16`, ``δ'_k = δ_k · keep_k`` (``cfg.masked``),
    ``w = bf16(weights)``, ``u_k = bf16(δ'_k w_k)``. Consensus ``sum``: ``s = sign(bf16(Σ u_k))``
    (``count``: of ``Σ sign u_k``; ties → +), ``m = bf16(Σ u_k [sign u_k = s])``, ``D = bf16(Σ w_k
    [sign u_k = s])`` (0 → 1); none: ``m = bf16(Σ u_k)``, ``D = bf16(Σ w_k)`` (|D| < 1e-8 → 1).
    ``m ← bf16(m / D)`` if normalize, ``m ← bf16(λ m)`` if λ ≠ 1, result ``bf16(b + m)``.

    Args:
      b: (n,) float32 base (bfloat16 values). rows: K (n,) float32 task vectors (bfloat16 values).
      keep: K (n,) bool keep-masks (used if ``cfg.masked``). weights: (K,) float. lam: scalar λ.
    Returns:
      (n,) float32 holding bfloat16 values.
    """
    k = len(rows)
    w = round_bf16(jnp.asarray(weights, jnp.float32))
    d = [jnp.where(keep[i], rows[i], 0.0) if cfg.masked else rows[i] for i in range(k)]
    u = [round_bf16(d[i] * w[i]) for i in range(k)]
    if cfg.consensus is None:
        mixed = _sum_rounded(u)
        divisor = _sum_rounded([w[i] for i in range(k)])
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    else:
        sign = [jnp.sign(x) for x in u]
        votes = _sum_rounded(u) if cfg.consensus == "sum" else _sum_rounded(sign)
        majority = jnp.where(votes >= 0, 1.0, -1.0)
        agree = [s == majority for s in sign]
        mixed = _sum_rounded([jnp.where(a, x, 0.0) for a, x in zip(agree, u)])
        divisor = _sum_rounded([jnp.where(a, w[i], 0.0) for i, a in enumerate(agree)])
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    if cfg.normalize:
        mixed = round_bf16(_divide(mixed, divisor))
    if cfg.scale:
        mixed = round_bf16(mixed * jnp.asarray(lam, jnp.float32))
    return round_bf16(b + mixed)


@partial(jax.jit, static_argnames=("normalize",))
def linear_bf16_kernel(tensors, weights, *, normalize: bool):
    """mergekit's ``linear`` on bfloat16 inputs: ``r ← fma(bf16(θ_k), w_k, r)`` in float32 over the
    models in order (``w`` float32), ``r / Σ w`` if normalize, rounded to bfloat16.

    Args:
      tensors: K (n,) float32 full weights. weights: (K,) float.
    Returns:
      (n,) float32 holding bfloat16 values.
    """
    w = jnp.asarray(weights, jnp.float32)
    acc = jnp.zeros(tensors[0].shape, jnp.float32)
    for i, t in enumerate(tensors):
        prod = round_bf16(t).astype(jnp.float64) * w[i].astype(jnp.float64)   # exact
        acc = (acc.astype(jnp.float64) + prod).astype(jnp.float32)
    if normalize:
        acc = _divide(acc, sum((w[i] for i in range(1, len(tensors))), w[0]))
    return round_bf16(acc)


@jax.jit
def passthrough_bf16_kernel(tensor, scale):
    """mergekit's ``passthrough`` in bfloat16: ``bf16(bf16(θ) · scale)`` (``scale`` float32)."""
    return round_bf16(round_bf16(tensor) * jnp.asarray(scale, jnp.float32))


def round_f32_in_f64(x):
    """float64 → the nearest float32 value (ties to even), kept in float64, by integer operations
    on the bits: XLA may drop a float32 convert between float64 operations (excess precision is
    allowed), which would skip a rounding PyTorch does. Exact for results in float32's normal range
    (a float32 subnormal keeps float32's 24-bit precision here instead of fewer bits)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float64), jnp.uint64)
    rounded = (bits + jnp.uint64(0x0FFFFFFF) + ((bits >> 29) & jnp.uint64(1))) & jnp.uint64(0xFFFFFFFFE0000000)
    return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(rounded, jnp.float64))


def _product_f32(x, c):
    """The float32 product ``x · c`` of a bfloat16 value and a float32, in float64: exact there,
    rounded once to float32 precision (no fused multiply-add can skip the rounding)."""
    return round_f32_in_f64(x.astype(jnp.float64) * jnp.asarray(c, jnp.float32).astype(jnp.float64))


@jax.jit
def combine2_bf16_kernel(x, y, ca, cb):
    """``bf16(ca · bf16(x) + cb · bf16(y))`` with float32 products and sum rounded one by one, as
    PyTorch's separate ``mul``/``mul``/``add`` (mergekit's slerp writes it into a bfloat16 result).
    The float32 sum of two float32 numbers is their float64 sum rounded to float32.

    Args:
      x, y: (n,) float32. ca, cb: float32 scalars.
    Returns:
      (n,) float32 holding bfloat16 values.
    """
    px = _product_f32(round_bf16(x), ca)
    py = _product_f32(round_bf16(y), cb)
    return round_bf16(round_f32_in_f64(px + py).astype(jnp.float32))


@jax.jit
def nuslerp_bf16_kernel(v0, v1, sa, sb, sin_theta, colinear, t):
    """mergekit's ``nuslerp`` combination in bfloat16, rows of vectors:
    ``bf16(bf16(bf16(s_a v0) + bf16(s_b v1)) / sin θ)``, or where ``colinear``
    ``bf16(bf16((1 − t) v0) + bf16(t v1))`` (``t`` float32, products in float32 rounded to bfloat16).

    Args:
      v0, v1: (r, n) float32 bfloat16 values. sa, sb, sin_theta: (r, 1) float32 bfloat16 values
        (``sin((1−t)θ)``, ``sin(tθ)``, ``sin θ`` per row). colinear: (r, 1) bool. t: float32 scalar.
    Returns:
      (r, n) float32 holding bfloat16 values.
    """
    t = jnp.asarray(t, jnp.float32)
    spherical = round_bf16(_divide(round_bf16(round_bf16(sa * v0) + round_bf16(sb * v1)),
                                   jnp.broadcast_to(sin_theta, v0.shape)))
    linear = round_bf16(round_bf16((1 - t) * v0) + round_bf16(t * v1))
    return jnp.where(colinear, linear, spherical)


@jax.jit
def add_bf16_kernel(x, y):
    """``bf16(x + y)`` of two bfloat16-valued float32 arrays (PyTorch's bfloat16 ``add``)."""
    return round_bf16(x + y)


@jax.jit
def sub_bf16_kernel(x, y):
    """``bf16(bf16(x) − bf16(y))``: a task vector in bfloat16."""
    return round_bf16(round_bf16(x) - round_bf16(y))


def _weighted_sum(rows, w):
    """PyTorch's ``(rows * w.view(-1, 1)).sum(0)`` in bfloat16: products rounded, summed in float32
    in model order, rounded once."""
    return _sum_rounded([round_bf16(rows[i] * w[i]) for i in range(rows.shape[0])])


@jax.jit
def multislerp_units_bf16(d, denom, w):
    """``u_k = bf16(d_k / denom_k)`` and ``Σ_k bf16(u_k w_k)`` (one rounding).

    Args:
      d: (K, n) float32 bfloat16 values. denom: (K, 1) ``bf16(‖d_k‖ + eps)``. w: (K,) bfloat16 weights.
    Returns:
      ``(u, m)``: (K, n) and (n,) float32 holding bfloat16 values.
    """
    u = round_bf16(_divide(d, jnp.broadcast_to(denom, d.shape)))
    return u, _weighted_sum(u, w)


@jax.jit
def multislerp_direction_bf16(u, m, m_norm):
    """``m̂ = bf16(m / ‖m‖)`` and the products ``bf16(u_k m̂)`` whose sums are the dots."""
    mean = round_bf16(_divide(m, jnp.broadcast_to(m_norm, m.shape)))
    return mean, round_bf16(u * mean)


@jax.jit
def multislerp_tangent_bf16(u, mean, dots, w):
    """``Σ_k bf16(w_k bf16(u_k − bf16(dots_k m̂)))`` (one rounding): the weighted tangent mean."""
    tangent = round_bf16(u - round_bf16(dots * mean))
    return _weighted_sum(tangent, w)


@jax.jit
def multislerp_result_bf16(mean, tangent, c, s, avg):
    """``bf16(bf16(bf16(m̂ c) + bf16(τ s)) · avg)``: the exponential map back, scaled by the mean norm."""
    return round_bf16(round_bf16(round_bf16(mean * c) + round_bf16(tangent * s)) * avg)


@jax.jit
def lerp2_bf16(x, y, w):
    """``bf16(bf16(x w_0) + bf16(y w_1))`` (multislerp's fallback for two models)."""
    return round_bf16(round_bf16(x * w[0]) + round_bf16(y * w[1]))


@jax.jit
def scale_bf16_kernel(x, c):
    """``bf16(x · c)``: a bfloat16 tensor times a bfloat16 scalar (mergekit's rescale)."""
    return round_bf16(x * jnp.asarray(c, jnp.float32))


@jax.jit
def model_stock_bf16_kernel(w0, ws, t, one_minus_t):
    """mergekit's model_stock combination in bfloat16: ``a = bf16(s_K / K)`` with
    ``s_k = bf16(s_{k−1} + θ_k)`` (Python's ``sum``: a rounding per model), then
    ``bf16(bf16(t a) + bf16((1 − t) θ_0))``.

    Args:
      w0: (r, n) base, bfloat16 values. ws: K (r, n) fine-tuned weights. t, one_minus_t: (r, 1)
        bfloat16 values (``1 − t`` as PyTorch rounded it).
    Returns:
      (r, n) float32 holding bfloat16 values.
    """
    s = ws[0]
    for x in ws[1:]:
        s = round_bf16(s + x)
    avg = round_bf16(_divide(s, jnp.float32(len(ws))))
    return round_bf16(round_bf16(t * avg) + round_bf16(one_minus_t * w0))


@partial(jax.jit, static_argnames=("plus",))
def ram_bf16_kernel(b, tv, threshold, eps, r, alpha, *, plus: bool):
    """mergekit's ``ram`` / ``ramplus_tl`` on bfloat16 task vectors ``tv`` (K, n), ``b`` (n,).

    ``nz_k = |δ_k| > bf16(ε)``, ``c = Σ_k nz_k``; the overlap term ``bf16(bf16(δ_k nz_k [c > 1]) / c)``.
    ``ram``: ``bf16(b + bf16(Σ_k (δ_k nz_k [c = 1] + overlap_k)))``. ``ramplus_tl`` (float32 from the
    per-model λ on): ``λ_k = 1 + r · clip(s_k / max(u_k, ε), 0, α)`` from the counts of entries shared
    (``s_k``) and unique (``u_k``) in model k, ``f32(f32(δ_k nz_k [c = 1]) λ_k) + overlap_k`` summed in
    float32 in model order, ``f32(b + ·)`` (float32: mergekit writes it so).

    Args:
      b: (n,) float32 bfloat16 values. tv: (K, n) float32 bfloat16 values. threshold: ``bf16(ε)``
        (float32). eps, r, alpha: float32 scalars (ramplus_tl).
    Returns:
      (n,) float32 holding bfloat16 values (``ramplus_tl``: float32 values).
    """
    nz = jnp.abs(tv) > threshold
    counts = jnp.sum(nz, axis=0)
    overlap, unique = counts > 1, counts == 1
    tvz = jnp.where(nz, tv, 0.0)
    over = round_bf16(_divide(jnp.where(overlap, tvz, 0.0), jnp.maximum(counts, 1).astype(jnp.float32)))
    uniq = jnp.where(unique, tvz, 0.0)
    k = tv.shape[0]
    if not plus:
        merged = _sum_rounded([round_bf16(uniq[i] + over[i]) for i in range(k)])
        return round_bf16(b + merged)
    shared = jnp.sum(nz & overlap, axis=1).astype(jnp.float32)
    uniq_n = jnp.sum(nz & unique, axis=1).astype(jnp.float32)
    rho = _divide(shared, jnp.maximum(uniq_n, jnp.asarray(eps, jnp.float32)))
    step = _product_f32(jnp.clip(rho, 0, jnp.asarray(alpha, jnp.float32)), r)
    lam = round_f32_in_f64(1 + step)
    terms = [round_f32_in_f64(round_f32_in_f64(uniq[i].astype(jnp.float64) * lam[i]) + over[i].astype(jnp.float64))
             for i in range(k)]
    acc = terms[0]
    for x in terms[1:]:
        acc = round_f32_in_f64(acc + x)
    return round_f32_in_f64(b.astype(jnp.float64) + acc).astype(jnp.float32)


@jax.jit
def nearswap_bf16_kernel(a, b, t):
    """mergekit's ``nearswap`` in bfloat16: ``d = max(bf16|a − b|, bf16(1e-6))``,
    ``w = clip(bf16(bf16(1/d) · t), 0, 1)`` (PyTorch's ``t / d`` is ``d.reciprocal() * t``), result
    ``bf16(bf16(w b) + bf16(bf16(1 − w) a))``.

    Args:
      a: (n,) base, b: (n,) the other model; float32 bfloat16 values. t: float32 scalar.
    Returns:
      (n,) float32 holding bfloat16 values.
    """
    d = jnp.maximum(jnp.abs(round_bf16(a - b)), round_bf16(jnp.float32(1e-6)))
    w = jnp.clip(round_bf16(round_bf16(_divide(jnp.ones_like(d), d)) * jnp.asarray(t, jnp.float32)), 0.0, 1.0)
    return round_bf16(round_bf16(w * b) + round_bf16(round_bf16(1 - w) * a))


@jax.jit
def sce_bf16_kernel(b, tv, w):
    """mergekit's ``sce`` mixing in bfloat16 (after its top-variance selection): the sign election
    ``s = sign(bf16(Σ δ_k))`` (ties +), ``e_k = w_k [sign δ_k = s]``, result
    ``bf16(b + bf16(bf16(Σ bf16(δ_k e_k)) / max(bf16(Σ e_k), bf16(1e-6))))``.

    Args:
      b: (n,) base, tv: (K, n) task vectors; float32 bfloat16 values. w: (K,) bfloat16 weights.
    Returns:
      (n,) float32 holding bfloat16 values.
    """
    k = tv.shape[0]
    majority = jnp.where(_sum_rounded([tv[i] for i in range(k)]) >= 0, 1.0, -1.0)
    e = [jnp.where(jnp.sign(tv[i]) == majority, w[i], 0.0) for i in range(k)]
    merged = _sum_rounded([round_bf16(tv[i] * e[i]) for i in range(k)])
    denom = jnp.maximum(_sum_rounded(e), round_bf16(jnp.float32(1e-6)))
    return round_bf16(b + round_bf16(_divide(merged, denom)))


@jax.jit
def fusion_bf16_kernel(b, theta, keep):
    """mergekit's ``arcee_fusion`` combination on bfloat16 inputs: ``f32(b + bf16(θ − b) · keep)``
    (its float32 mask promotes the result to float32)."""
    return b + jnp.where(keep, round_bf16(theta - b), 0.0)


@jax.jit
def div_scalar_bf16(x, s):
    """``bf16(bf16(x) / s)``: a bfloat16 tensor divided by a float32 scalar (PyTorch keeps the
    scalar's float32 value)."""
    return round_bf16(_divide(round_bf16(x), jnp.asarray(s, jnp.float32)))


@jax.jit
def axpy_bf16(y, a, x):
    """``bf16(y + bf16(a · x))`` (``a`` a float32 scalar): PyTorch's ``y += a * x`` in bfloat16."""
    return round_bf16(y + round_bf16(jnp.asarray(a, jnp.float32) * x))


@jax.jit
def karcher_tangent_bf16(tangent, unit, mean, dot, c):
    """``bf16(g + bf16(c · bf16(u − bf16(dot · m))))``: one model's term of the Karcher gradient."""
    return round_bf16(tangent + round_bf16(c * round_bf16(unit - round_bf16(dot * mean))))


@jax.jit
def karcher_step_bf16(mean, tangent, cos_n, sin_n, norm):
    """``bf16(bf16(cos‖g‖ · m) + bf16(sin‖g‖ · bf16(g / ‖g‖)))``: the geodesic step."""
    step = round_bf16(_divide(tangent, jnp.asarray(norm, jnp.float32)))
    return round_bf16(round_bf16(cos_n * mean) + round_bf16(sin_n * step))
